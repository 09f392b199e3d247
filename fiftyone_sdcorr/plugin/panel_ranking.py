"""Which annotated reference the match panel shows: references ranked by similarity to the
current sample, or (with object features) reference objects ranked by similarity to the
current object.

- **Ranking**: through FiftyOne's similarity index when a similarity brain run exists over
  the embeddings in use (``config.embeddings_field`` = ``sdcorr_embedding`` and the same
  ``patches_field``; the newest such run): ``results.use_view(<the candidates>)`` then
  ``results.sort_by_similarity(<the query id>)``; the units the index does not hold (or
  every unit, when the index cannot answer) follow by the cosine of their embeddings.
  Without such a run: the cosine of the embeddings. The similarity shown is always that
  cosine.
- **Objects**: a ``fo.Detections`` field whose detections carry stored features
  (:func:`object_features`: a ``compute_fused_features`` record for the field, else the
  attribute ``<field>.detections.sdcorr_features``). A reference object is a detection of
  a reference sample that a keypoint instance of the reference field is linked to
  (:func:`~fiftyone_sdcorr.dataset.units.link_to_objects`, as propagation links them).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

import fiftyone as fo
from bson import ObjectId

from fiftyone_sdcorr.core.common.geometry import DEFAULT_CONTEXT_MARGIN
from fiftyone_sdcorr.dataset.config import EMBEDDING_FIELD, FEATURES_FIELD
from fiftyone_sdcorr.dataset.engine import find_record, recorded_fields
from fiftyone_sdcorr.dataset.units import Unit, Units, link_to_objects
from fiftyone_sdcorr.plugin.object_names import image_size, object_names

logger = logging.getLogger(__name__)

REFERENCE_TAG = "reference"  # a sample tag containing this word marks a reference
FEATURES_FUNCTION = "compute_fused_features"


def reference_tags(dataset) -> List[str]:
    """The sample tags that mark references: ``reference`` and any tag containing it
    (``reference_cat``, ``sdcorr:reference``; case-insensitive)."""
    return [t for t in dataset.distinct("tags") if REFERENCE_TAG in str(t).lower()]


def cosine(a, b) -> float:
    """The cosine of two vectors; NaN when either is missing, empty, zero or of another size."""
    if a is None or b is None:
        return float("nan")
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or not a.size:
        return float("nan")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return float("nan")
    return float(a @ b / (na * nb))


# --------------------------------------------------------------------------- similarity index
def similarity_key(dataset, embedding_field: str = EMBEDDING_FIELD, patches_field: Optional[str] = None):
    """The newest similarity brain run over ``embedding_field`` (of ``patches_field``'s
    objects, or of the samples), or None."""
    import fiftyone.brain as fob

    found = []
    for key in dataset.list_brain_runs(type=fob.Similarity):
        info = dataset.get_brain_info(key)
        cfg = info.config
        if getattr(cfg, "embeddings_field", None) == embedding_field and \
                getattr(cfg, "patches_field", None) == patches_field:
            found.append((info.timestamp, key))
    return max(found)[1] if found else None


def index_order(dataset, key: str, query_id: str, candidates, patches_field: Optional[str] = None):
    """The ids of ``candidates`` (samples, or their objects of ``patches_field``) the
    similarity index ``key`` holds, most similar to ``query_id`` first (FiftyOne's
    ``sort_by_similarity`` on the index restricted to the candidates); None when the index
    cannot answer (the query is not in it, the run is broken)."""
    try:
        results = dataset.load_brain_results(key, cache=False)
        view = candidates if patches_field is None else candidates.to_patches(patches_field)
        results.use_view(view)
        n = results.index_size
        if not n:
            return []
        ranked = results.sort_by_similarity(query_id, k=n)
        return ranked.values("id" if patches_field is None else f"{patches_field}.id")
    except Exception as e:  # noqa: BLE001 -- ranking falls back to the cosine of the embeddings
        logger.info("similarity index %r could not rank for %s: %s", key, query_id, e)
        return None


def similarity_ranks(dataset, query_id: str, query_emb, candidates, ids: Sequence[str], embs: Sequence,
                     patches_field: Optional[str] = None, embedding_field: str = EMBEDDING_FIELD):
    """``(rank, cosine)`` of each of ``ids`` (aligned with ``embs``): the rank is the
    position in the similarity index's answer (:func:`index_order`), else after those by
    descending cosine, without an embedding last; lower ranks first."""
    sims = [cosine(query_emb, e) for e in embs]
    key = similarity_key(dataset, embedding_field, patches_field) if ids else None
    order = index_order(dataset, key, query_id, candidates, patches_field) if key else None
    pos = {i: n for n, i in enumerate(order or [])}
    out = []
    for i, s in zip(ids, sims):
        if i in pos:
            out.append(((0, pos[i], 0.0), s))
        else:
            out.append(((1, math.isnan(s), -np.nan_to_num(s, nan=-9)), s))
    return out


def _label(base: str, tagged: bool, sim: float) -> str:
    label = base + (" · reference" if tagged else "")
    return label + (f" · {sim:.2f}" if not math.isnan(sim) else "")


def _references_view(dataset, current_id: str, ref_field: Optional[str], candidates=None):
    """The samples that can be references: with keypoints in ``ref_field``; without a
    keypoints field (None), those of ``candidates`` (default: every sample); never the
    current one."""
    others = {"_id": {"$ne": ObjectId(current_id)}}
    if not ref_field:
        return (candidates if candidates is not None else dataset).match(others)
    if not dataset.has_sample_field(ref_field):
        return None
    return dataset.exists(f"{ref_field}.keypoints").match(others)


def rank_references(dataset, current_id: str, ref_field: Optional[str], limit: int = 200,
                    candidates=None) -> List[dict]:
    """Annotated references (samples with keypoints in ``ref_field``; without a keypoints
    field the samples of ``candidates``, default every sample): tagged references
    (:func:`reference_tags`) first, then the others; within each, most similar first
    (see the module docstring: the similarity index over ``sdcorr_embedding`` when there
    is one, else the cosine of the embeddings), without embeddings in dataset order.
    Returns ``[{"id", "label", "similarity", "tagged"}]`` (the current sample is left out)."""
    refs = _references_view(dataset, current_id, ref_field, candidates)
    if refs is None:
        return []
    ids, paths, tags = refs.values("id"), refs.values("filepath"), refs.values("tags")
    ref_tags = set(reference_tags(dataset))
    tagged = [bool(ref_tags.intersection(t or [])) for t in tags]
    if dataset.has_sample_field(EMBEDDING_FIELD) and ids:
        cur = dataset.select(current_id).values(EMBEDDING_FIELD)
        ranks = similarity_ranks(dataset, current_id, cur[0] if cur else None, refs, ids,
                                 refs.values(EMBEDDING_FIELD))
    else:
        ranks = [((1, True, 0.0), float("nan"))] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: (not tagged[i], ranks[i][0]))
    out = []
    for i in order[:limit]:
        sim = ranks[i][1]
        out.append({"id": ids[i], "label": _label(os.path.basename(paths[i]), tagged[i], sim),
                    "similarity": None if math.isnan(sim) else sim, "tagged": tagged[i]})
    return out


# --------------------------------------------------------------------------- objects
@dataclass(frozen=True)
class ObjectFeatures:
    """Where a dataset's object features live: the detections of ``patches_field``, their
    attributes ``features`` (stored path) and ``embedding`` (vector); ``margin`` is the
    context margin the crops were computed with."""

    patches_field: str
    features: str = FEATURES_FIELD
    embedding: str = EMBEDDING_FIELD
    margin: float = DEFAULT_CONTEXT_MARGIN

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> Optional["ObjectFeatures"]:
        return cls(**d) if isinstance(d, dict) and d.get("patches_field") else None

    def units(self, samples) -> Units:
        return Units(samples, self.patches_field)


def _recorded_objects(dataset, field: str) -> Optional[ObjectFeatures]:
    """The object features recorded by ``compute_fused_features`` on ``field`` (run
    records are named ``<field>__<features attribute>``)."""
    for name in recorded_fields(dataset, FEATURES_FUNCTION):
        if not name.startswith(f"{field}__"):
            continue
        attr = name[len(field) + 2:]
        if not dataset.has_sample_field(f"{field}.detections.{attr}"):
            continue
        record = find_record(dataset, FEATURES_FUNCTION, name) or {}
        run = record.get("run") or {}
        margin = (record.get("settings") or {}).get("context_margin", DEFAULT_CONTEXT_MARGIN)
        return ObjectFeatures(field, attr, run.get("embedding_field") or EMBEDDING_FIELD, float(margin))
    return None


def object_features(dataset) -> Optional[ObjectFeatures]:
    """The first ``fo.Detections`` field (schema order) whose detections carry stored
    features (recorded ones first), or None: then the panel works on whole images."""
    if dataset is None:
        return None
    fields = list(dataset.get_field_schema(embedded_doc_type=fo.Detections))
    for field in fields:
        found = _recorded_objects(dataset, field)
        if found is not None:
            return found
    for field in fields:
        if dataset.has_sample_field(f"{field}.detections.{FEATURES_FIELD}") and \
                dataset.count(f"{field}.detections.{FEATURES_FIELD}") > 0:
            return ObjectFeatures(field)
    return None


def sample_objects(dataset, sample_id: str, objects: ObjectFeatures) -> List[dict]:
    """The objects of one sample, in detection order: ``[{"id", "label", "index", "area"}]``
    (the label names the object by its label, position and size, :func:`object_names`;
    the area is the box's, normalised)."""
    units = objects.units(dataset.select(sample_id)).units()
    names = _names_of(units)
    return [{"id": u.id, "index": i, "label": names[i],
             "area": float(u.box[2] * u.box[3]) if u.box else 0.0} for i, u in enumerate(units)]


def _names_of(units: List[Unit]) -> List[str]:
    """The names of one sample's objects (:func:`object_names`)."""
    if not units:
        return []
    return object_names([(u.label, u.box) for u in units], image_size(units[0].filepath))


def reference_key(reference: dict) -> str:
    """The value that names an entry of the reference choice: its object's id when it is
    a reference object, else its sample's id."""
    return reference.get("object") or reference["id"]


def linked_instances(units: List[Unit], keypoints) -> Dict[str, int]:
    """``{object id: index of the keypoint instance linked to it}`` for one sample's objects."""
    items = list(getattr(keypoints, "keypoints", None) or [])
    if not items or not units:
        return {}
    return {obj.id: k for k, obj in link_to_objects(items, units)}


def _reference_objects(refs, units: Units, ref_field: str):
    """``[(unit, its name in its sample, linked instance)]`` of the reference samples' objects
    (``units``) that a keypoint instance of ``ref_field`` is linked to; without a
    keypoints field (None) every object (no instance)."""
    by_sid: Dict[str, List[Unit]] = {}
    for u in units.units():
        by_sid.setdefault(u.sample_id, []).append(u)
    out = []
    ids = refs.values("id")
    for sid, kps in zip(ids, refs.values(ref_field) if ref_field else [None] * len(ids)):
        objs = by_sid.get(sid, [])
        links = linked_instances(objs, kps) if ref_field else {u.id: None for u in objs}
        names = _names_of(objs) if links else []
        out += [(u, names[i], links[u.id]) for i, u in enumerate(objs) if u.id in links]
    return out


def _unit_values(units: Units, name: str) -> Dict[str, object]:
    return dict(zip((u.id for u in units.units()), units.values(name)))


def rank_reference_objects(dataset, current_id: str, object_id: str, ref_field: Optional[str],
                           objects: ObjectFeatures, limit: int = 200, candidates=None) -> List[dict]:
    """The reference objects (see the module docstring), most similar to the current
    object ``object_id`` first: objects of its label first (as propagation's
    ``same_label``), then those of tagged references, then by similarity (the similarity
    index over the objects' embeddings when there is one, else their cosine). Returns
    ``[{"id": sample id, "object": detection id, "instance": linked keypoint instance,
    "label", "similarity", "tagged"}]``. Without a keypoints field (None) every object of
    the samples of ``candidates`` (default: every other sample) is a reference object."""
    refs = _references_view(dataset, current_id, ref_field, candidates)
    if refs is None:
        return []
    ref_units = objects.units(refs)
    cands = _reference_objects(refs, ref_units, ref_field)
    if not cands:
        return []
    cur = objects.units(dataset.select(current_id))
    target = next((u for u in cur.units() if u.id == object_id), None)
    cur_emb = _unit_values(cur, objects.embedding).get(object_id)
    embs_of = _unit_values(ref_units, objects.embedding)
    ids = [u.id for u, _, _ in cands]
    ranks = similarity_ranks(dataset, object_id, cur_emb, refs, ids, [embs_of.get(i) for i in ids],
                             objects.patches_field, objects.embedding)
    ref_tags = set(reference_tags(dataset))
    tags = dict(zip(refs.values("id"), refs.values("tags")))
    tagged = [bool(ref_tags.intersection(tags.get(u.sample_id) or [])) for u, _, _ in cands]
    label = target.label if target is not None else None
    order = sorted(range(len(cands)), key=lambda i: (label is not None and cands[i][0].label != label,
                                                     not tagged[i], ranks[i][0]))
    out = []
    for i in order[:limit]:
        u, name, inst = cands[i]
        sim = ranks[i][1]
        base = f"{os.path.basename(u.filepath)} · {name}"
        out.append({"id": u.sample_id, "object": u.id, "instance": inst, "label": _label(base, tagged[i], sim),
                    "similarity": None if math.isnan(sim) else sim, "tagged": tagged[i]})
    return out


__all__ = ["reference_tags", "cosine", "similarity_key", "index_order", "similarity_ranks", "rank_references",
           "ObjectFeatures", "object_features", "sample_objects", "reference_key", "linked_instances", "rank_reference_objects",
           "REFERENCE_TAG"]
