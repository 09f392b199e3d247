"""The unit of every run: a whole image (the default) or an object of ``patches_field``.

In the benchmarks one object fills the picture; in users' datasets (COCO, AP-10K, ...) an
image holds several. So each dataset function works on *units*:

- **images** (``patches_field=None``): one unit per sample, its id the sample id; values
  live in sample fields (``sdcorr_features``);
- **objects** (``patches_field="detections"``, or a ``to_patches("detections")`` view): one
  unit per ``fo.Detection`` of that ``fo.Detections`` field, its id the label id; the
  unit's pixels are its box grown by the recipe's ``context_margin`` on each side
  (:class:`~fiftyone_sdcorr.core.common.geometry.Crop`), letterboxed like an image; its values
  live as attributes of the detection (``detections.detections.sdcorr_features``), as
  FiftyOne's ``compute_patch_embeddings`` stores embeddings.

:class:`Units` is the one place that knows this: it lists a collection's units, reads and
writes their values, and loads their pixels. A patches view is read through its source
dataset (only the patches the view holds), so results land on the source detections and
a patches view made afterwards shows them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

import fiftyone as fo

from fiftyone_sdcorr.core.common.geometry import DEFAULT_CONTEXT_MARGIN, Crop
from fiftyone_sdcorr.core.common.images import load_crop, load_image
from fiftyone_sdcorr.core.common.params import ParameterError, check_str
from fiftyone_sdcorr.dataset.pck import image_size_of

#: field types of the values a run writes per object (label attributes)
_ATTRIBUTE_TYPES = {"vector": fo.VectorField, "string": fo.StringField, "float": fo.FloatField}


@dataclass(frozen=True)
class Unit:
    """One image or one object: what features are computed for and matched between."""

    id: str  # the store key and the unit's id: the sample id, or the object's label id
    sample_id: str
    filepath: str
    label_id: Optional[str] = None
    label: Optional[str] = None
    box: Optional[Tuple[float, float, float, float]] = None  # normalised [x, y, w, h]
    instance: Optional[str] = None  # the id of the detection's fo.Instance, if it has one

    @property
    def is_object(self) -> bool:
        return self.label_id is not None

    def load(self, margin: float = DEFAULT_CONTEXT_MARGIN):
        """The unit's pixels: the image, or the object's crop."""
        return load_crop(self.filepath, self.box, margin)[0] if self.is_object else load_image(self.filepath)

    def crop(self, margin: float, metadata=None) -> Optional[Crop]:
        """Where an object's crop sits in its image (None for an image unit)."""
        if not self.is_object:
            return None
        w, h = image_size_of(self.filepath, metadata)
        return Crop.of_box(w, h, self.box, margin)


def patches_field_of(samples, patches_field: Optional[str]) -> Optional[str]:
    """``patches_field`` as given, or the field a ``to_patches()`` view was made from; a
    patches view of another field than the one given is refused."""
    from_view = samples.patches_field if getattr(samples, "_is_patches", False) else None
    if patches_field is None:
        return from_view
    check_str("patches_field", patches_field)
    if from_view is not None and from_view != patches_field:
        raise ParameterError(f"parameter 'patches_field': {patches_field!r}, but the view holds patches of "
                             f"{from_view!r}")
    return patches_field


class Units:
    """The units of a collection (see the module docstring)."""

    def __init__(self, samples, patches_field: Optional[str] = None, *, _allowed: Optional[set] = None):
        self.patches_field = patches_field_of(samples, patches_field)
        self.dataset = samples._root_dataset
        self.allowed: Optional[set] = _allowed  # label ids of a patches view
        if self.patches_field is None:
            self.samples = samples
        else:
            self._check_field()
            if getattr(samples, "_is_patches", False):
                self.allowed = set(samples.values(f"{self.patches_field}.id"))
                sids = list(dict.fromkeys(samples.values("sample_id")))
                self.samples = self.dataset.select(sids, ordered=True)
            else:
                self.samples = samples
        self._units: Optional[List[Unit]] = None

    def _check_field(self) -> None:
        name = self.patches_field
        if not self.dataset.has_sample_field(name):
            raise ParameterError(f"parameter 'patches_field': field {name!r} does not exist on dataset "
                                 f"{self.dataset.name!r}")
        doc = getattr(self.dataset.get_field(name), "document_type", None)
        if doc is not fo.Detections:
            raise ParameterError(f"parameter 'patches_field': field {name!r} holds "
                                 f"{getattr(doc, '__name__', type(self.dataset.get_field(name)).__name__)}, "
                                 "not fo.Detections")

    @property
    def objects(self) -> bool:
        return self.patches_field is not None

    @property
    def what(self) -> str:
        return "objects" if self.objects else "samples"

    def path(self, name: str) -> str:
        """Where the value ``name`` of a unit lives: a sample field, or a detection attribute."""
        return f"{self.patches_field}.detections.{name}" if self.objects else name

    def record_name(self, name: str) -> str:
        """The field part of a run record's key (a run key has no dots)."""
        return f"{self.patches_field}__{name}" if self.objects else name

    # ---- listing and reading
    def units(self) -> List[Unit]:
        if self._units is None:
            self._units = self._list()
        return self._units

    def _list(self) -> List[Unit]:
        ids, fps = self.samples.values("id"), self.samples.values("filepath")
        if not self.objects:
            return [Unit(sid, sid, fp) for sid, fp in zip(ids, fps)]
        lp = self.path("")[:-1]
        lids, labels, boxes, insts = self.samples.values([f"{lp}.id", f"{lp}.label", f"{lp}.bounding_box",
                                                          f"{lp}.instance._id"])
        out = []
        for sid, fp, li, la, bo, ins in zip(ids, fps, lids, labels, boxes, insts):
            for lid, lab, box, inst in zip(li or [], la or [], bo or [], ins or []):
                if self.allowed is None or lid in self.allowed:
                    out.append(Unit(lid, sid, fp, lid, lab, tuple(box) if box is not None else None,
                                    str(inst) if inst is not None else None))
        return out

    def values(self, name: Optional[str]) -> List[Any]:
        """The value ``name`` of each unit (aligned with :meth:`units`); Nones when it is absent."""
        units = self.units()
        if not name or not self.dataset.has_sample_field(self.path(name)):
            return [None] * len(units)
        if not self.objects:
            return self.samples.values(name)
        lp = self.path("")[:-1]
        lids, vals = self.samples.values([f"{lp}.id", self.path(name)])
        by_id = {lid: v for li, vs in zip(lids, vals) for lid, v in zip(li or [], vs or [])}
        return [by_id.get(u.id) for u in units]

    def fresh(self, ids: Sequence[str], names: Sequence[str]) -> Dict[str, tuple]:
        """``{unit id: (value of each name)}`` read from the database now (workers write meanwhile)."""
        want = set(ids)
        sids = list(dict.fromkeys(u.sample_id for u in self.units() if u.id in want))
        sub = Units(self.dataset.select(sids), self.patches_field, _allowed=want if self.objects else None)
        cols = [sub.values(n) for n in names]
        return {u.id: tuple(c[i] for c in cols) for i, u in enumerate(sub.units())}

    # ---- writing
    def write(self, name: str, values: Mapping[str, Any]) -> None:
        """``{unit id: value}`` into ``name`` (a sample field, or the detections' attribute)."""
        if not values:
            return
        if self.objects:
            self.dataset.set_label_values(self.path(name), dict(values))
        else:
            self.dataset.set_values(name, dict(values), key_field="id")

    def link_instances(self) -> List[Unit]:
        """The units, every object linked to a FiftyOne ``fo.Instance``: a detection without
        one gets a new one (added, never replacing one it has), so that the labels a run
        writes for it can carry the same ``instance`` (the App then highlights them together)."""
        units = self.units()
        new = {u.id: fo.Instance() for u in units if u.is_object and u.instance is None}
        if new:
            self.dataset.set_label_values(self.path("instance"), new)
            self._units = [replace(u, instance=new[u.id].id) if u.id in new else u for u in units]
        return self.units()

    def declare(self, kind: str, name: str) -> None:
        """An object attribute ``name`` of ``kind`` declared on the detections (so vectors
        read back as arrays and the App can filter by it)."""
        path = self.path(name)
        if self.dataset.has_sample_field(path):
            return
        try:
            self.dataset.add_sample_field(path, _ATTRIBUTE_TYPES[kind])
        except ValueError:
            self.dataset.reload()  # another worker declared it meanwhile
            if not self.dataset.has_sample_field(path):
                raise


def link_to_objects(keypoints: Sequence, objects: Sequence[Unit]) -> List[Tuple[int, Unit]]:
    """``[(keypoint index, object)]``: which object of an image each ``fo.Keypoint`` belongs
    to. By FiftyOne's ``instance`` link when both carry one; the rest by an optimal
    assignment (``scipy.optimize.linear_sum_assignment``, so list order never matters) on
    ``cost = (1 - share of the instance's visible points inside the box)
    + 0.1 * (1 - area of their extent / area of the box)`` (the second term prefers the
    tighter of two boxes that both hold the points); a keypoint none of whose points lies
    in a box (or whose label differs from the box's) is linked to no object."""
    from scipy.optimize import linear_sum_assignment

    from fiftyone_sdcorr.dataset.pck import points_of

    out, free_k, free_o = [], list(range(len(keypoints))), list(objects)
    by_instance = {o.instance: o for o in objects if o.instance is not None}
    for k, kp in enumerate(keypoints):
        inst = getattr(kp, "instance", None)
        o = by_instance.get(str(inst.id)) if inst is not None else None
        if o is not None and o in free_o:
            out.append((k, o))
            free_k.remove(k)
            free_o.remove(o)
    if not free_k or not free_o:
        return sorted(out, key=lambda x: x[0])
    big = 1e6
    cost = np.full((len(free_k), len(free_o)), big)
    for a, k in enumerate(free_k):
        pts = points_of(keypoints[k])
        pts = pts[np.isfinite(pts).all(axis=1)]
        if not len(pts):
            continue
        span = pts.max(axis=0) - pts.min(axis=0)
        for b, o in enumerate(free_o):
            label = keypoints[k].label
            if o.box is None or (label is not None and o.label is not None and label != o.label):
                continue
            x, y, w, h = o.box
            inside = ((pts[:, 0] >= x) & (pts[:, 0] <= x + w) & (pts[:, 1] >= y) & (pts[:, 1] <= y + h)).mean()
            if inside > 0 and w > 0 and h > 0:
                cost[a, b] = (1 - inside) + 0.1 * (1 - min(1.0, span[0] * span[1] / (w * h)))
    rows, cols = linear_sum_assignment(cost)
    out += [(free_k[a], free_o[b]) for a, b in zip(rows, cols) if cost[a, b] < big]
    return sorted(out, key=lambda x: x[0])


def by_sample(rows) -> Dict[str, list]:
    """``{sample id: [row, ...]}`` in order; a row is a :class:`Unit` or a tuple that starts
    with one."""
    out: Dict[str, list] = {}
    for row in rows:
        out.setdefault((row if isinstance(row, Unit) else row[0]).sample_id, []).append(row)
    return out


def sample_batches(rows, size: int):
    """Batches of about ``size`` rows (see :func:`by_sample`) that never split a sample's
    units: a value per sample (its keypoints) is written whole."""
    batch: list = []
    for group in by_sample(rows).values():
        if batch and len(batch) + len(group) > size:
            yield batch
            batch = []
        batch += group
    if batch:
        yield batch


__all__ = ["Unit", "Units", "patches_field_of", "by_sample", "sample_batches", "link_to_objects"]
