"""Masks in the match panel: which fields hold masks, which of them were predicted, and the
overlays drawn over each side of the figure (trace ``<side>|mask``).

- Mask fields: ``fo.Segmentation`` fields, and ``fo.Detections`` fields whose detections
  carry instance masks (``mask`` or ``mask_path``).
- Predicted: the labels carry ``sdcorr_reference_id`` (written by ``propagate_masks``);
  the others are annotations.
- The panel's defaults: the reference side shows the annotation field with the most
  masked samples among tagged references (else overall), the current side the newest
  predicted field (else the same annotations).
- An overlay is an RGBA picture at the side's display size: a colour per class
  (segmentation) or per instance (detections), half opaque where there is a mask. On an
  object's crop the masks of that part of the picture are shown.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

import fiftyone as fo
from bson import ObjectId

from fiftyone_sdcorr.core.pictures import visualize as vis
from fiftyone_sdcorr.plugin.field_roles import REFERENCE_ATTR, last_evaluation, oldest_first
from fiftyone_sdcorr.plugin.object_names import image_size
from fiftyone_sdcorr.plugin.panel_ranking import reference_tags

MASK_ALPHA = 115  # of 255: the photo stays visible under the mask


def _has_masks(dataset, field: str) -> bool:
    for attr in ("mask", "mask_path"):
        try:
            if dataset.count(f"{field}.detections.{attr}") > 0:
                return True
        except Exception:  # noqa: BLE001 -- no such attribute
            continue
    return False


def mask_fields(dataset) -> List[str]:
    """The dataset's mask fields (schema order): segmentations, then detections with masks."""
    if dataset is None:
        return []
    segs = list(dataset.get_field_schema(embedded_doc_type=fo.Segmentation))
    dets = [f for f in dataset.get_field_schema(embedded_doc_type=fo.Detections) if _has_masks(dataset, f)]
    return segs + dets


def is_predicted(dataset, field: str) -> bool:
    """Whether ``field``'s labels were written by ``propagate_masks`` (they name their reference)."""
    path = f"{field}.detections.{REFERENCE_ATTR}" if _is_detections(dataset, field) else \
        f"{field}.{REFERENCE_ATTR}"
    try:
        return dataset.count(path) > 0
    except Exception:  # noqa: BLE001
        return False


def _is_detections(dataset, field: str) -> bool:
    return getattr(dataset.get_field(field), "document_type", None) is fo.Detections


def default_mask_fields(dataset, fields: Optional[List[str]] = None) -> Dict[str, Optional[str]]:
    """``{"mask_field": annotations shown on the reference, "pred_mask_field": predictions
    shown on the current sample}`` (see the module docstring); None where there is none."""
    fields = mask_fields(dataset) if fields is None else fields
    predicted = [f for f in fields if is_predicted(dataset, f)]
    annotations = [f for f in fields if f not in predicted]
    tags = reference_tags(dataset)
    view = dataset.match_tags(tags) if tags else dataset

    def count(f):
        return view.count(f"{f}.detections") if _is_detections(dataset, f) else view.count(f)

    ann = max(annotations, key=lambda f: (count(f), -annotations.index(f))) if annotations else None
    predicted = oldest_first(dataset, predicted)
    return {"mask_field": ann, "pred_mask_field": predicted[-1] if predicted else ann}


def masked_samples(dataset, field: Optional[str], current_id: Optional[str] = None):
    """The samples with masks in ``field`` (None without a field, or when no sample but
    the current one has them: then every sample is a candidate reference)."""
    if not field or dataset is None or not dataset.has_sample_field(field):
        return None
    view = dataset.exists(f"{field}.detections") if _is_detections(dataset, field) else dataset.exists(field)
    others = view.match({"_id": {"$ne": ObjectId(current_id)}}) if current_id else view
    return view if len(others) else None


def evaluation_defaults(dataset) -> Dict[str, Optional[str]]:
    """The evaluate_masks form's defaults: the predictions are the newest predicted masks
    field (never the annotations the predictions came from); the ground truth is the one
    of the last mask evaluation when it still exists, else the annotations with the most
    masks on samples that are not tagged references (a separate ground-truth field wins
    over the references' own)."""
    fields = mask_fields(dataset)
    last = last_evaluation(dataset, fields)
    predicted = oldest_first(dataset, [f for f in fields if is_predicted(dataset, f)])
    annotations = [f for f in fields if f not in predicted]
    tags = reference_tags(dataset)
    others = dataset.match_tags(tags, bool=False) if tags else dataset

    def count(f):
        return others.count(f"{f}.detections") if _is_detections(dataset, f) else others.count(f)

    gt = last["gt_field"] or (max(annotations, key=lambda f: (count(f), -annotations.index(f)))
                              if annotations else None)
    pred = predicted[-1] if predicted else last["pred_field"] or next((f for f in fields if f != gt), None)
    return {"pred_field": pred, "gt_field": gt}


def _label_map(sample, field: str, size) -> Optional[np.ndarray]:
    """``field``'s masks of ``sample`` as an ``(h, w)`` int map at the image's ``size``:
    segmentation classes, or detection index + 1; None without masks."""
    label = sample[field] if sample.has_field(field) else None
    if label is None:
        return None
    w, h = size
    if isinstance(label, fo.Segmentation):
        mask = label.get_mask() if hasattr(label, "get_mask") else label.mask
        if mask is None:
            return None
        mask = np.asarray(mask)
        mask = mask[..., 0] if mask.ndim == 3 else mask
        rows = (np.arange(h) * mask.shape[0] // h).clip(0, mask.shape[0] - 1)
        cols = (np.arange(w) * mask.shape[1] // w).clip(0, mask.shape[1] - 1)
        return mask[rows][:, cols].astype(np.int64)
    out = np.zeros((h, w), dtype=np.int64)
    for i, det in enumerate(getattr(label, "detections", None) or []):
        _paste(out, det, i + 1)
    return out if out.any() else None


def _paste(out: np.ndarray, det, value: int) -> None:
    """Pastes a detection's instance mask (box-relative) into the image-size map ``out``."""
    mask = det.get_mask() if hasattr(det, "get_mask") else det.mask
    if mask is None or det.bounding_box is None:
        return
    h, w = out.shape
    x, y, bw, bh = det.bounding_box
    x0, y0 = int(round(x * w)), int(round(y * h))
    x1, y1 = min(w, x0 + max(1, int(round(bw * w)))), min(h, y0 + max(1, int(round(bh * h))))
    if x1 <= max(x0, 0) or y1 <= max(y0, 0):
        return
    mask = np.asarray(mask)
    rows = (np.arange(y1 - y0) * mask.shape[0] // (y1 - y0)).clip(0, mask.shape[0] - 1)
    cols = (np.arange(x1 - x0) * mask.shape[1] // (x1 - x0)).clip(0, mask.shape[1] - 1)
    piece = mask[rows][:, cols] > 0
    region = out[max(y0, 0):y1, max(x0, 0):x1]
    region[piece[-region.shape[0]:, -region.shape[1]:]] = value


def overlay_uri(frame, field: Optional[str], width: int, height: int) -> Optional[str]:
    """The PNG data URI of ``field``'s masks over ``frame`` (whole image or object crop) at
    the display size ``width`` x ``height``; None when there is nothing to draw."""
    if not field:
        return None
    sample = frame.sample
    size = image_size(sample.filepath, sample.metadata)
    if size is None:
        return None
    labels = _label_map(sample, field, size)
    if labels is None:
        return None
    if frame.is_object:
        c = frame.crop
        labels = labels[c.top:c.bottom, c.left:c.right]
    rows = (np.arange(height) * labels.shape[0] // height).clip(0, labels.shape[0] - 1)
    cols = (np.arange(width) * labels.shape[1] // width).clip(0, labels.shape[1] - 1)
    labels = labels[rows][:, cols]
    if not labels.any():
        return None
    rgba = np.zeros((height, width, 4), dtype=np.uint8)
    for value in np.unique(labels[labels > 0]):
        rgba[labels == value] = list(vis.hex_to_rgb(vis.palette_color(int(value) - 1))) + [MASK_ALPHA]
    return vis.to_data_uri(rgba, fmt="png")


__all__ = ["mask_fields", "is_predicted", "default_mask_fields", "evaluation_defaults", "masked_samples", "overlay_uri", "MASK_ALPHA"]
