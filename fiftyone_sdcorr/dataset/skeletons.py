"""Names and edges of the keypoints of a field: one answer for every caller (flip
alignment, review, the match panel).

Where they are found, first hit wins:

1. ``dataset.skeletons[field]``: the field's own ``fo.KeypointSkeleton``;
2. ``dataset.default_skeleton``;
3. ``dataset.info["categories"]``, as FiftyOne's COCO importer
   (``fo.types.COCODetectionDataset`` with ``label_types`` including ``"keypoints"``)
   leaves them: each category dict may carry ``"keypoints"`` (the point names) and
   ``"skeleton"`` (COCO's 1-based index pairs). With a ``label``, the category whose
   ``name`` is that label; without one, the only category that has keypoints, or the
   first of them when they all name the same points. The 1-based pairs become 0-based
   edges (a skeleton holding a ``0`` is taken as 0-based already).

The COCO importer sets neither ``dataset.skeletons`` nor ``default_skeleton``, so the
App draws no skeleton for such a dataset: :func:`write_skeletons` stores the answer of
step 3 on the field.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import fiftyone as fo

from fiftyone_sdcorr.core.common.params import ParameterError


def keypoint_skeleton(samples, field: Optional[str], label: Optional[str] = None) -> Optional[fo.KeypointSkeleton]:
    """The ``fo.KeypointSkeleton`` (``labels``: point names, ``edges``: 0-based index
    lists) of the keypoints in ``field`` (and of objects labelled ``label``) of
    ``samples`` (a dataset or view), or ``None`` when nothing names them. See the
    module docstring for the order of the sources."""
    root = samples._root_dataset
    sk = (root.skeletons or {}).get(field) if field else None
    if sk is not None:
        return sk
    if root.default_skeleton is not None:
        return root.default_skeleton
    return skeleton_from_categories((root.info or {}).get("categories"), label)


def skeleton_from_categories(categories: Any, label: Optional[str] = None) -> Optional[fo.KeypointSkeleton]:
    """The skeleton of COCO ``categories`` (a list of category dicts, as in a COCO
    labels file and in ``dataset.info["categories"]`` after FiftyOne's COCO import):
    that of the category named ``label``, else (``label=None``) that of the only one
    with keypoints, or of the first when all of them name the same points; ``None``
    otherwise."""
    if not isinstance(categories, (list, tuple)):
        return None
    with_points = [c for c in categories if isinstance(c, dict) and _names(c)]
    if label is not None:
        chosen = next((c for c in with_points if str(c.get("name")) == str(label)), None)
    elif len(with_points) == 1 or (with_points and len({tuple(_names(c)) for c in with_points}) == 1):
        chosen = with_points[0]
    else:
        chosen = None
    if chosen is None:
        return None
    names = _names(chosen)
    return fo.KeypointSkeleton(labels=names, edges=coco_edges(chosen.get("skeleton"), len(names)))


def coco_edges(skeleton: Any, num_points: int) -> List[List[int]]:
    """COCO's ``skeleton`` (1-based index pairs) as 0-based edges; pairs that do not
    name two of the ``num_points`` points are dropped. A skeleton that holds a ``0``
    is taken as 0-based already."""
    if not isinstance(skeleton, (list, tuple)):
        return []
    pairs = []
    for e in skeleton:
        if not isinstance(e, (list, tuple)) or len(e) < 2:
            continue
        try:
            pairs.append([int(i) for i in e])
        except (TypeError, ValueError):
            continue
    offset = 0 if any(i == 0 for e in pairs for i in e) else 1
    edges = []
    for e in pairs:
        e = [i - offset for i in e]
        if all(0 <= i < num_points for i in e):
            edges.append(e)
    return edges


def write_skeletons(dataset, field: str, overwrite: bool = False, label: Optional[str] = None) -> fo.KeypointSkeleton:
    """Stores the skeleton of the keypoints in ``field`` as ``dataset.skeletons[field]``
    and saves the dataset, so the App draws it and every caller finds it there.

    The skeleton comes from ``dataset.info["categories"]`` (COCO import; ``label``
    picks the category, see :func:`skeleton_from_categories`), else from
    ``dataset.default_skeleton``. Nothing changes when the field already has the same
    one; a different existing one is replaced only with ``overwrite=True``.

    Returns:
        the field's ``fo.KeypointSkeleton``.

    Raises:
        ParameterError: ``field`` is not a keypoints field; nothing names its points;
            it has a different skeleton and ``overwrite`` is False.
    """
    root = dataset._root_dataset
    if not isinstance(field, str) or not field:
        raise ParameterError(f"parameter 'field' must be a field name, got {field!r}")
    f = root.get_field(field) if root.has_sample_field(field) else None
    if f is None or not (isinstance(f, fo.EmbeddedDocumentField)
                         and issubclass(f.document_type, (fo.Keypoints, fo.Keypoint))):
        raise ParameterError(f"parameter 'field': {field!r} is not a keypoints field of dataset {root.name!r}")
    new = skeleton_from_categories((root.info or {}).get("categories"), label)
    if new is None and root.default_skeleton is not None:
        d = root.default_skeleton
        new = fo.KeypointSkeleton(labels=list(d.labels or []), edges=[list(e) for e in (d.edges or [])])
    if new is None:
        raise ParameterError(f"no keypoint names for field {field!r}: dataset {root.name!r} has no "
                             "default skeleton and no COCO categories with keypoints in info['categories']"
                             + (f" named {label!r}" if label is not None else ""))
    old = (root.skeletons or {}).get(field)
    if old is not None:
        if _same(old, new):
            return old
        if not overwrite:
            raise ParameterError(f"field {field!r} already has a different skeleton (labels "
                                 f"{list(old.labels or [])}); pass overwrite=True to replace it")
    skeletons = dict(root.skeletons or {})
    skeletons[field] = new
    root.skeletons = skeletons  # the setter saves the dataset
    return root.skeletons[field]


def _names(category: dict) -> List[str]:
    names = category.get("keypoints")
    if not isinstance(names, (list, tuple)) or not names:
        return []
    return [str(n) for n in names]


def _same(a, b) -> bool:
    def edges(s) -> List[List[int]]:
        return [list(map(int, e)) for e in (getattr(s, "edges", None) or [])]

    def labels(s) -> Sequence[Any]:
        return list(getattr(s, "labels", None) or [])

    return labels(a) == labels(b) and edges(a) == edges(b)


__all__ = ["keypoint_skeleton", "skeleton_from_categories", "coco_edges", "write_skeletons"]
