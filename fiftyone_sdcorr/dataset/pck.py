"""PCK geometry shared by evaluation and review: instance pairing, threshold size."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

import fiftyone as fo

from fiftyone_sdcorr.core.geometry import points_array
from fiftyone_sdcorr.core.images import image_size


def points_of(kp) -> np.ndarray:
    """A keypoint's points as ``(K, 2)`` float64, NaN where missing or not finite."""
    return points_array(kp.points)


def pair_instances(pred, gt):
    """[(pred_index, gt_index)] paired by label and order within the label."""
    by_label: Dict[Optional[str], List[int]] = {}
    for i, kp in enumerate(gt):
        by_label.setdefault(kp.label, []).append(i)
    used: Dict[Optional[str], int] = {}
    pairs = []
    for i, kp in enumerate(pred):
        j = used.get(kp.label, 0)
        cands = by_label.get(kp.label, [])
        if j < len(cands):
            pairs.append((i, cands[j]))
        used[kp.label] = j + 1
    return pairs


def box_size(dets, label, gt_px, w, h) -> Optional[float]:
    if dets is None:
        return None
    items = dets.detections if isinstance(dets, fo.Detections) else [dets]
    items = [d for d in items if d is not None and d.bounding_box is not None]
    if not items:
        return None
    same = [d for d in items if d.label == label]
    pool = same or items
    if len(pool) > 1:
        def inside(d):
            x, y, bw, bh = d.bounding_box
            vis = gt_px[np.isfinite(gt_px).all(axis=1)]
            return int(((vis[:, 0] >= x * w) & (vis[:, 0] <= (x + bw) * w)
                        & (vis[:, 1] >= y * h) & (vis[:, 1] <= (y + bh) * h)).sum())
        pool = sorted(pool, key=inside, reverse=True)
    _, _, bw, bh = pool[0].bounding_box
    return float(max(bw * w, bh * h))


def extent(gt_px) -> Optional[float]:
    vis = gt_px[np.isfinite(gt_px).all(axis=1)]
    if len(vis) < 2:
        return None
    span = vis.max(axis=0) - vis.min(axis=0)
    size = float(max(span))
    return size if size > 0 else None


def image_size_of(filepath, metadata):
    """``(width, height)`` of the image, from the file, else FiftyOne's metadata."""
    try:
        return image_size(filepath)
    except Exception:  # noqa: BLE001 -- fall back to FiftyOne's metadata
        if metadata is not None and metadata.width and metadata.height:
            return int(metadata.width), int(metadata.height)
        raise


def threshold_size(threshold: str, boxes, label, gt_px: np.ndarray, w: int, h: int) -> Optional[float]:
    """``T`` in pixels: ``max(w, h)`` of the image (``"image"``), else of the object's box
    from ``boxes`` (when given), else the extent of the visible ground-truth points."""
    if threshold == "image":
        return float(max(w, h))
    size = box_size(boxes, label, gt_px, w, h) if boxes is not None else None
    return size if size is not None else extent(gt_px)


__all__ = ["image_size_of", "points_of", "pair_instances", "box_size", "extent", "threshold_size"]
