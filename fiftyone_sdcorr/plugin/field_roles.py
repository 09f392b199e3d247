"""Which keypoints field plays which role in a dataset, as the panel and the operators'
forms see it: every ``fo.Keypoints`` field, the predicted ones (written by propagation:
their instances carry ``sdcorr_reference_id``), the annotations (the others); the fields
shown by default; the next free name for a new output field.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import fiftyone as fo

from fiftyone_sdcorr.dataset import label_attrs
from fiftyone_sdcorr.dataset.config import KEYPOINTS_FIELD
from fiftyone_sdcorr.plugin.panel_ranking import reference_tags

REFERENCE_ATTR = label_attrs.REFERENCE_ID  # what a predicted keypoint carries
OUTPUT_FIELD = KEYPOINTS_FIELD  # the first name offered for new predictions


def keypoint_fields(dataset) -> List[str]:
    """The ``fo.Keypoints`` fields of ``dataset``, in schema order."""
    if dataset is None:
        return []
    return list(dataset.get_field_schema(embedded_doc_type=fo.Keypoints))


def _is_predicted_field(dataset, name: str) -> bool:
    try:
        if dataset.count(f"{name}.keypoints.{REFERENCE_ATTR}") > 0:
            return True
    except Exception:
        pass
    return False


def predicted_fields(dataset, fields: Optional[List[str]] = None) -> List[str]:
    """Keypoints fields written by propagation (their instances carry
    ``sdcorr_reference_id``), oldest first: by the field's ``created_at`` where FiftyOne
    records it, else in schema order (newest last either way)."""
    fields = keypoint_fields(dataset) if fields is None else fields
    return oldest_first(dataset, [f for f in fields if _is_predicted_field(dataset, f)])


def oldest_first(dataset, names: List[str]) -> List[str]:
    """``names`` by the field's ``created_at`` where FiftyOne records it, else in the
    order given (the newest last either way)."""
    def created(i_name):
        i, name = i_name
        try:
            at = getattr(dataset.get_field(name), "created_at", None)
        except Exception:
            at = None
        return (at is not None, at.timestamp() if at is not None else 0.0, i)

    return [name for _, name in sorted(enumerate(names), key=created)]


def last_evaluation(dataset, fields: List[str]) -> Dict[str, Optional[str]]:
    """``{"pred_field", "gt_field"}`` of the newest FiftyOne evaluation run of the dataset
    whose predictions are one of ``fields`` and whose fields still exist (Nones without
    one): the form of the next evaluation starts from what the last one compared."""
    found = []
    for key in (dataset.list_evaluations() if dataset is not None else []):
        try:
            info = dataset.get_evaluation_info(key)
        except Exception:  # noqa: BLE001 -- a run of a backend that is not installed
            continue
        pred, gt = getattr(info.config, "pred_field", None), getattr(info.config, "gt_field", None)
        if pred in fields and gt in fields:
            found.append((info.timestamp, pred, gt))
    if not found:
        return {"pred_field": None, "gt_field": None}
    _, pred, gt = max(found, key=lambda t: t[0])
    return {"pred_field": pred, "gt_field": gt}


def field_roles(dataset) -> Dict[str, List[str]]:
    """``{"keypoints": every Keypoints field (schema order), "predicted": the predicted
    ones (oldest first), "annotations": the others}``."""
    fields = keypoint_fields(dataset)
    pred = predicted_fields(dataset, fields) if dataset is not None else []
    return {"keypoints": fields, "predicted": pred, "annotations": [f for f in fields if f not in pred]}


def default_fields(dataset, roles: Optional[Dict[str, List[str]]] = None) -> Dict[str, Optional[str]]:
    """The fields the panel shows by default, ``{"ref_field", "pred_field", "gt_field"}``:

    - reference keypoints: the annotation field holding the most keypoints of tagged
      references (:func:`reference_tags`); without tagged references, the annotation
      field with the most keypoints;
    - predicted: the newest predicted field (:func:`predicted_fields`);
    - ground truth: the annotation field with the most keypoints on samples that are not
      tagged references; else the reference field (one field holds both).
    """
    roles = roles or field_roles(dataset)
    annotations = roles["annotations"]
    out = {"ref_field": None, "pred_field": roles["predicted"][-1] if roles["predicted"] else None,
           "gt_field": None}
    if not annotations:
        return out

    def most(view, fields):
        counts = [(view.count(f"{f}.keypoints"), -i, f) for i, f in enumerate(fields)]
        best = max(counts)
        return best[2] if best[0] > 0 else None

    tags = reference_tags(dataset)
    tagged = dataset.match_tags(tags) if tags else None
    ref = most(tagged, annotations) if tagged is not None else None
    out["ref_field"] = ref or most(dataset, annotations) or annotations[0]
    others = dataset.match_tags(tags, bool=False) if tags else dataset
    out["gt_field"] = most(others, annotations) or out["ref_field"]
    return out


def free_field_name(dataset, base: str = OUTPUT_FIELD) -> str:
    """``base``, ``base_2``, ``base_3``, ...: the first name that is not a field of
    ``dataset`` yet (nor is its ``<name>_error`` companion)."""
    def taken(name):
        return dataset.has_field(name) or dataset.has_field(f"{name}_error")

    name, i = base, 1
    while taken(name):
        i += 1
        name = f"{base}_{i}"
    return name
