"""PCK geometry shared by evaluation and review: visible points, instance matching,
threshold size."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

import fiftyone as fo

from fiftyone_sdcorr.core.common.geometry import points_array
from fiftyone_sdcorr.core.common.images import image_size

#: OKS fall-off constant of :func:`match_instances`. Why 0.1: arbitrary categories have no
#: per-keypoint constants (COCO's ``k_i = 2 sigma_i`` exist only for people, 0.05 ... 0.21);
#: one constant in that range, at the scale of PCK@0.1, makes a point 0.1 s away score
#: ``exp(-1/2) ~ 0.61`` and one 0.3 s away ~0.01, so an instance is paired with the object
#: its points actually lie on
OKS_K = 0.1
#: cost of a pair that may not be matched (different labels, nothing visible in both, or
#: two different ``instance`` links); far above any allowed cost, which is at most ~1
_FORBIDDEN = 1e6


def points_of(kp) -> np.ndarray:
    """A keypoint's points as ``(K, 2)`` float64, NaN where the point is not visible.

    A point is visible when its coordinates are finite AND, if the keypoint has a
    ``visible`` list attribute, its entry there is not ``0`` / ``False``. Both
    conventions are read: COCO as FiftyOne imports it (ints ``0/1/2``; ``v=0`` points are
    already ``[nan, nan]``) and booleans. COCO's ``v=1`` (labelled but occluded) counts,
    as in COCO's OKS. Works for ``fo.Keypoint`` and for any object with ``points`` (a
    list or an array) and an optional ``visible``.
    """
    pts = getattr(kp, "points", None)
    out = points_array(list(pts) if isinstance(pts, np.ndarray) else pts)
    vis = getattr(kp, "visible", None)
    if isinstance(vis, (list, tuple, np.ndarray)):
        for q, v in enumerate(list(vis)[: len(out)]):
            if v is not None and not _truthy(v):
                out[q] = np.nan
    return out


def _truthy(v) -> bool:
    try:
        return bool(float(v))
    except (TypeError, ValueError):
        return bool(v)


def instance_id(obj) -> Optional[str]:
    """The id of the ``fo.Instance`` a label is linked to (its ``instance`` attribute),
    else None (no link, or an ``instance`` that is not an ``fo.Instance``)."""
    inst = getattr(obj, "instance", None)
    if isinstance(inst, fo.Instance):
        return str(inst.id) if inst.id is not None else None
    return None


def _detections(boxes) -> list:
    if boxes is None:
        return []
    items = boxes.detections if isinstance(boxes, fo.Detections) else [boxes]
    return [d for d in (items or []) if d is not None and d.bounding_box is not None]


def linked_detection(boxes, inst_id: Optional[str]):
    """The detection of ``boxes`` linked to the same ``fo.Instance`` (``inst_id``), else None."""
    if inst_id is None:
        return None
    for d in _detections(boxes):
        if instance_id(d) == inst_id:
            return d
    return None


def _inside(d, gt_px, w, h) -> int:
    x, y, bw, bh = d.bounding_box
    vis = gt_px[np.isfinite(gt_px).all(axis=1)]
    return int(((vis[:, 0] >= x * w) & (vis[:, 0] <= (x + bw) * w)
                & (vis[:, 1] >= y * h) & (vis[:, 1] <= (y + bh) * h)).sum())


def object_scale(gt_kp, gt_px: np.ndarray, w: int, h: int, boxes=None) -> float:
    """``s`` of :func:`match_instances`, in pixels: ``sqrt(area)`` of the gt object's box.

    The box: the detection of ``boxes`` linked to the gt by the same ``instance`` id, else
    the detection containing most of the gt's visible points (at least one; detections of
    the gt's label first; ties: the smaller box), else the extent (bounding rectangle) of
    the gt's visible points. A degenerate extent (collinear points) uses its longer side
    squared; a single visible point a tenth of the image's long side."""
    d = linked_detection(boxes, instance_id(gt_kp))
    if d is None:
        ranked = []
        for c in _detections(boxes):
            n = _inside(c, gt_px, w, h)
            if n > 0:
                bw, bh = c.bounding_box[2] * w, c.bounding_box[3] * h
                ranked.append((-(c.label == gt_kp.label), -n, bw * bh, tuple(c.bounding_box), c))
        if ranked:
            d = min(ranked, key=lambda r: r[:4])[4]
    if d is not None:
        area = float(d.bounding_box[2] * w * d.bounding_box[3] * h)
        if area > 0:
            return math.sqrt(area)
    vis = gt_px[np.isfinite(gt_px).all(axis=1)]
    if len(vis) >= 2:
        span = vis.max(axis=0) - vis.min(axis=0)
        if span[0] * span[1] > 0:
            return math.sqrt(float(span[0] * span[1]))
        if span.max() > 0:
            return float(span.max())
    return max(w, h) / 10.0


def _sort_key(kp, px: np.ndarray) -> tuple:
    """A total order on instances from their content only (never their list position)."""
    lab = kp.label
    pts = tuple((0, float(x), float(y)) if np.isfinite([x, y]).all() else (1, 0.0, 0.0) for x, y in px)
    inst = instance_id(kp)
    return (lab is not None, lab or "", pts, inst is not None, inst or "")


def match_instances(pred: Sequence, gt: Sequence, width: int, height: int, boxes=None) -> List[Tuple[int, int]]:
    """Pairs predicted and ground-truth instances: ``[(pred_index, gt_index)]``.

    ``pred`` and ``gt`` are ``fo.Keypoint`` objects (or any objects with ``label``,
    ``points`` normalised to ``[0, 1]``, and optionally ``visible`` / ``instance``);
    ``width x height`` is the image size in pixels; ``boxes`` an optional
    ``fo.Detections`` (or ``fo.Detection``) with the objects' boxes.

    1. **Instance links** first: a prediction and a ground truth linked to the same
       ``fo.Instance`` (their ``instance`` attribute, compared by ``.id``) pair up, if
       their labels agree (when both have one). Several with one id: the cheapest
       assignment below among them.
    2. **Geometry** for the rest: the optimal assignment
       (``scipy.optimize.linear_sum_assignment``) on an OKS-like cost. For a candidate
       pair with the same label (None matches None),
       ``cost = 1 - mean_q exp(-d_q^2 / (2 s^2 k^2))`` over the points ``q`` visible in
       both (:func:`points_of`), with ``d_q`` the distance in pixels, ``s`` the gt
       object's scale (:func:`object_scale`: ``sqrt`` of its box's area) and
       ``k =`` :data:`OKS_K`. A tiny term in the mean relative
       distance ``d / s`` breaks ties between pairs whose similarities all underflow.
       Not allowed (never returned): different labels, no point visible in both, or two
       different ``instance`` links.

    Ground-truth (and predicted) instances left without an allowed partner stay
    unmatched. Deterministic and independent of the order of either list: both are put
    in an order derived from their content before the assignment.

    Returns:
        the pairs, sorted by ``pred_index``; each index at most once.
    """
    w, h = int(width), int(height)
    scale = np.array([w, h], dtype=np.float64)
    p_px = [points_of(kp) * scale for kp in pred]
    g_px = [points_of(kp) * scale for kp in gt]
    p_ord = sorted(range(len(pred)), key=lambda i: _sort_key(pred[i], p_px[i]))
    g_ord = sorted(range(len(gt)), key=lambda j: _sort_key(gt[j], g_px[j]))
    s_of = {j: object_scale(gt[j], g_px[j], w, h, boxes) for j in g_ord}
    p_inst = {i: instance_id(pred[i]) for i in p_ord}
    g_inst = {j: instance_id(gt[j]) for j in g_ord}

    def labels_ok(i, j):  # the same label; None matches None only
        return pred[i].label == gt[j].label

    def geo_cost(i, j) -> Optional[float]:
        p, g = p_px[i], g_px[j]
        k = min(len(p), len(g))
        both = np.isfinite(p[:k]).all(axis=1) & np.isfinite(g[:k]).all(axis=1)
        if not both.any():
            return None
        d2 = ((p[:k][both] - g[:k][both]) ** 2).sum(axis=1)
        s = s_of[j]
        sim = np.exp(-d2 / (2.0 * s * s * OKS_K * OKS_K))
        rel = float(np.minimum(np.sqrt(d2) / s, 1e3).mean())
        return float(1.0 - sim.mean()) + 1e-9 * rel

    pairs: List[Tuple[int, int]] = []
    assign = lambda pi, gj, cost_fn: pairs.extend(_assign(pi, gj, cost_fn))  # noqa: E731

    # 1. instance links (a link is authoritative: no common visible point needed)
    ids = sorted({v for v in p_inst.values() if v} & {v for v in g_inst.values() if v})
    for iid in ids:
        def linked_cost(i, j):
            a, b = pred[i].label, gt[j].label
            if a is not None and b is not None and a != b:
                return None
            v = geo_cost(i, j)
            return 2.0 if v is None else v
        assign([i for i in p_ord if p_inst[i] == iid], [j for j in g_ord if g_inst[j] == iid], linked_cost)
    # 2. geometry for the rest
    used_p, used_g = {i for i, _ in pairs}, {j for _, j in pairs}

    def free_cost(i, j):
        if not labels_ok(i, j) or (p_inst[i] and g_inst[j] and p_inst[i] != g_inst[j]):
            return None
        return geo_cost(i, j)

    assign([i for i in p_ord if i not in used_p], [j for j in g_ord if j not in used_g], free_cost)
    return sorted(pairs)


def _assign(pi: List[int], gj: List[int], cost_fn) -> List[Tuple[int, int]]:
    """The optimal assignment of ``pi`` to ``gj`` on ``cost_fn(i, j)`` (None: not allowed)."""
    if not pi or not gj:
        return []
    c = np.full((len(pi), len(gj)), _FORBIDDEN)
    for a, i in enumerate(pi):
        for b, j in enumerate(gj):
            v = cost_fn(i, j)
            if v is not None:
                c[a, b] = v
    rows, cols = linear_sum_assignment(c)
    return [(pi[a], gj[b]) for a, b in zip(rows, cols) if c[a, b] < _FORBIDDEN]


def box_size(dets, label, gt_px, w, h, inst_id: Optional[str] = None) -> Optional[float]:
    """``max(w, h)`` in pixels of the object's box: the detection linked to the same
    ``fo.Instance`` (``inst_id``), else the detection with ``label`` (else any) with the
    most ground-truth points inside it; None without detections."""
    items = _detections(dets)
    if not items:
        return None
    linked = linked_detection(dets, inst_id)
    if linked is not None:
        pool = [linked]
    else:
        same = [d for d in items if d.label == label]
        pool = same or items
        if len(pool) > 1:
            pool = sorted(pool, key=lambda d: _inside(d, gt_px, w, h), reverse=True)
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


def threshold_size(threshold: str, boxes, label, gt_px: np.ndarray, w: int, h: int,
                   inst_id: Optional[str] = None) -> Optional[float]:
    """``T`` in pixels: ``max(w, h)`` of the image (``"image"``), else of the object's box
    from ``boxes`` (when given: the detection linked by the same ``instance`` id
    ``inst_id``, else :func:`box_size`'s choice), else the extent of the visible
    ground-truth points."""
    if threshold == "image":
        return float(max(w, h))
    size = box_size(boxes, label, gt_px, w, h, inst_id) if boxes is not None else None
    return size if size is not None else extent(gt_px)


__all__ = ["image_size_of", "points_of", "instance_id", "match_instances", "object_scale", "linked_detection",
           "box_size", "extent", "threshold_size", "OKS_K"]
