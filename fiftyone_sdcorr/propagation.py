"""Keypoint propagation: annotated references -> predicted ``fo.Keypoints`` on targets.

Speaks FiftyOne (DESIGN.md, layer 4); the matching itself is
:mod:`fiftyone_sdcorr.correspondence` (a ``K x N`` similarity per reference instance).

Rules
-----
- **Output**: a NEW field ``output_field`` of ``fo.Keypoints`` on the targets. The source
  field is never written; a field that already exists is written only with
  ``overwrite=True``. Problems are recorded per sample in the string field
  ``<output_field>_error`` (``None`` when there was none); it follows the same rule.
- **Predicted keypoints**: each predicted ``fo.Keypoint`` keeps the reference instance's
  ``label`` and point order; ``confidence`` is a per-point list in ``[0, 1]``
  (correspondence.py: cosine similarity times a cycle-consistency factor); points whose
  confidence is below ``visibility_threshold`` are ``[nan, nan]`` (FiftyOne's convention
  for invisible points). Attributes: ``sdcorr_reference_id`` (the reference sample the
  instance came from; with ``combine="per_point"`` the one that gave most points),
  ``sdcorr_reference_ids`` (per point), ``sdcorr_similarity`` (global-embedding cosine
  between target and ``sdcorr_reference_id``), ``sdcorr_instance`` (index of the
  instance in the reference's ``fo.Keypoints``), ``sdcorr_flipped`` (flip alignment kept
  the mirrored reference).
- **Several instances in one reference**: each ``fo.Keypoint`` of a reference is an
  instance and propagates as its own predicted instance, in the reference's order.
- **Several references** (``combine``):
  ``"best"``: per target, the reference whose global embedding has the highest cosine
  with the target's provides every instance.
  ``"per_point"``: the ``top_k`` references by global cosine are matched; the output
  instances are those of the best reference; for instance ``j`` with label ``L`` (the
  ``j``-th instance labelled ``L``), each point is taken from whichever of the top-k
  references' ``j``-th ``L`` instance (with the same number of points) matched it with
  the highest confidence.
- **Reference points**: NaN points are invisible (predicted NaN, confidence 0); points
  outside ``[0, 1]`` or infinite are skipped the same way and recorded in the reference's
  error field; a reference without keypoints, or with no usable point, or whose image
  cannot be read, is recorded and left out. Targets whose image cannot be read are
  recorded; the rest of the run completes.
- **Features**: dense features stored by ``compute_fused_features`` (a path in
  ``features_field``) are used when present; others are computed with ``extractor`` (any
  :class:`~fiftyone_sdcorr.features.Describer`; by default a
  :class:`~fiftyone_sdcorr.extractor.FeatureExtractor` built from the model arguments) and
  not stored. Global vectors come from ``embedding_field`` when the target and all its
  candidate references have one, else from the dense features
  (:meth:`FusedFeatures.global_vector`). With a ``FeatureExtractor``, computed features
  use the store's fixed projection (``<store>/_tensors/projection.safetensors``, the store
  found from the stored paths or the dataset's default store) when it was fitted for the
  same extractor configuration, else a projection fitted once on the references.
- **Cost**: per target, its tokens are normalised once and every candidate reference
  instance (and mirrored variant) is matched in ONE ``(sum K) x N`` similarity product
  (:func:`match_prepared`, equal to ``correspondence.match_points``); reference tokens
  are normalised once per run. About 35 ms per target for 1536 x 60 x 60 features and
  15 points on one loaded CPU thread, most of it normalising the target.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

import fiftyone as fo
import fiftyone.core.media as fom

from fiftyone_sdcorr import correspondence as corr
from fiftyone_sdcorr.progress import Progress, ProgressArg
from fiftyone_sdcorr.correspondence import Prepared, match_prepared
from fiftyone_sdcorr.features import FixedProjection, FusedFeatures, fuse_raw
from fiftyone_sdcorr.images import load_image

logger = logging.getLogger(__name__)

DEFAULT_VISIBILITY_THRESHOLD = 0.2
COMBINE_RULES = ("best", "per_point")
PROJECTION_NAME = "projection"



# --------------------------------------------------------------------------- progress
# --------------------------------------------------------------------------- collections
def _root(samples):
    return samples._root_dataset


def _has_field(samples, name: Optional[str]) -> bool:
    if not name:
        return False
    return _root(samples).has_sample_field(name)


def resolve_references(samples, references):
    """``references``: a view / dataset, a list of sample ids, or a tag string -> a view."""
    root = _root(samples)
    if references is None:
        raise ValueError("references are required (a view, a list of sample ids, or a tag)")
    if isinstance(references, str):
        return root.match_tags(references)
    if isinstance(references, (list, tuple, set)):
        ids = [str(i) for i in references]
        return root.select(ids)
    if hasattr(references, "values") and hasattr(references, "_root_dataset"):
        if references._root_dataset.name != root.name:
            raise ValueError(
                f"references come from dataset {references._root_dataset.name!r}, targets from {root.name!r}"
            )
        return references
    raise TypeError(f"references must be a view, a list of sample ids or a tag, got {type(references).__name__}")


def check_output_field(samples, output_field: str, protected: Sequence[str], overwrite: bool) -> None:
    """Refuses protected names and, unless ``overwrite``, any field that exists already."""
    if not output_field or not isinstance(output_field, str):
        raise ValueError("output_field must be a non-empty field name")
    if "." in output_field or output_field.startswith("_"):
        raise ValueError(f"output_field {output_field!r} must be a top-level field name")
    for p in protected:
        if p and output_field == p:
            raise ValueError(f"refusing to write to {output_field!r}: it is an input field of this run")
    root = _root(samples)
    if output_field in ("id", "filepath", "tags", "metadata", "created_at", "last_modified_at"):
        raise ValueError(f"refusing to write to the built-in field {output_field!r}")
    if root.has_sample_field(output_field) and not overwrite:
        raise ValueError(
            f"field {output_field!r} already exists on dataset {root.name!r}; choose a new field "
            "name or pass overwrite=True"
        )


# --------------------------------------------------------------------------- flip pairs
_SIDE_PATTERNS = [
    (re.compile(r"^(left)([ _\-.]?)(.*)$"), {"left": "right"}),
    (re.compile(r"^(right)([ _\-.]?)(.*)$"), {"right": "left"}),
    (re.compile(r"^(l)([_\-. ])(.*)$"), {"l": "r"}),
    (re.compile(r"^(r)([_\-. ])(.*)$"), {"r": "l"}),
]
_SUFFIX_PATTERNS = [
    (re.compile(r"^(.*?)([ _\-.]?)(left)$"), {"left": "right"}),
    (re.compile(r"^(.*?)([ _\-.]?)(right)$"), {"right": "left"}),
    (re.compile(r"^(.*?)([_\-. ])(l)$"), {"l": "r"}),
    (re.compile(r"^(.*?)([_\-. ])(r)$"), {"r": "l"}),
]


def _mirror_name(name: str) -> Optional[str]:
    low = str(name).strip().lower()
    for rx, swap in _SIDE_PATTERNS:
        m = rx.match(low)
        if m and m.group(3):
            return swap[m.group(1)] + m.group(2) + m.group(3)
    for rx, swap in _SUFFIX_PATTERNS:
        m = rx.match(low)
        if m and m.group(1):
            return m.group(1) + m.group(2) + swap[m.group(3)]
    return None


def flip_pairs_from_labels(labels: Sequence[str]) -> List[Tuple[int, int]]:
    """Left/right index pairs from keypoint names: ``left_eye``/``right_eye``,
    ``l_eye``/``r_eye``, ``eye_left``/``eye_right``, ``eye_l``/``eye_r``, ``Left Eye`` ...
    (case-insensitive). Unpaired names keep their label under a mirror."""
    index = {str(n).strip().lower(): i for i, n in enumerate(labels) if n is not None}
    pairs, seen = [], set()
    for i, n in enumerate(labels):
        if n is None or i in seen:
            continue
        other = _mirror_name(n)
        if other is None or other not in index:
            continue
        j = index[other]
        if j == i or j in seen:
            continue
        pairs.append((min(i, j), max(i, j)))
        seen.update((i, j))
    return sorted(pairs)


def skeleton_for(samples, field_name: str):
    root = _root(samples)
    sk = (root.skeletons or {}).get(field_name)
    return sk if sk is not None else root.default_skeleton


def resolve_flip_pairs(samples, field_name: str, flip_pairs=None) -> Tuple[List[Tuple[int, int]], str]:
    """``(pairs, origin)``: ``flip_pairs`` as given (index pairs, or name pairs looked up in
    the skeleton), else derived from the skeleton's point labels, else none."""
    sk = skeleton_for(samples, field_name)
    labels = list(getattr(sk, "labels", None) or [])
    if flip_pairs is not None:
        out = []
        for a, b in flip_pairs:
            if isinstance(a, str) or isinstance(b, str):
                if not labels:
                    raise ValueError("flip_pairs given by name, but the dataset has no skeleton labels")
                try:
                    a, b = labels.index(a), labels.index(b)
                except ValueError as e:
                    raise ValueError(f"flip pair name not in skeleton labels {labels}: {e}") from None
            out.append((int(a), int(b)))
        return out, "parameter"
    if labels:
        return flip_pairs_from_labels(labels), "skeleton"
    return [], "none"


# --------------------------------------------------------------------------- features
def _is_feature_extractor(ext) -> bool:
    return hasattr(ext, "extract") and hasattr(ext, "recipe")


class FeatureSource:
    """Dense features per sample: stored ones first, else computed (never stored here).

    For a :class:`FeatureExtractor`, computed features use the store's fixed projection
    when there is one (so they are comparable to stored ones), else one fitted on the
    first images described (the references) and reused for all later ones.
    """

    def __init__(self, extractor=None, model_kwargs: Optional[dict] = None, store_dir=None,
                 batch_size: int = 8):
        self._extractor = extractor
        self._model_kwargs = dict(model_kwargs or {})
        self._store = None
        self._store_dir = store_dir
        self.projection: Optional[FixedProjection] = None
        self.batch_size = max(1, int(batch_size))

    @property
    def store(self):
        if self._store is None:
            from fiftyone_sdcorr.store import FeatureStore

            self._store = FeatureStore(self._store_dir)
        return self._store

    @property
    def extractor(self):
        if self._extractor is None:
            from fiftyone_sdcorr.extractor import FeatureExtractor

            kw = dict(self._model_kwargs)
            recipe = kw.pop("recipe", None) or {}
            kw = {k: v for k, v in kw.items() if v is not None}
            self._extractor = FeatureExtractor(**kw, **recipe)
        return self._extractor

    def load_stored(self, path) -> FusedFeatures:
        return self.store.load(path)

    def note_stored_path(self, path) -> None:
        """Without an explicit ``store_dir``, the store is the one holding stored features
        (``<root>/<shard>/<key>.safetensors``)."""
        if self._store_dir is None and path:
            from pathlib import Path

            self._store_dir = str(Path(path).parent.parent)
            self._store = None

    def _projection_for(self, ext):
        """The store's fixed projection when it was fitted for this extractor's config."""
        if self.projection is None and self._store_dir is not None:
            try:
                if self.store.has_tensors(PROJECTION_NAME):
                    tensors, meta = self.store.load_tensors(PROJECTION_NAME)
                    if _same_config(meta.get("extractor"), ext.config()):
                        self.projection = FixedProjection.from_state_dict(tensors)
                    else:
                        logger.warning("the store's projection was fitted for another extractor "
                                       "configuration; fitting one on the references")
            except Exception as e:  # noqa: BLE001
                logger.warning("could not load the store's projection: %s", e)
        return self.projection

    def describe(self, images: List[Any]) -> List[FusedFeatures]:
        """Describe already loaded images (PIL)."""
        ext = self.extractor
        if not images:
            return []
        if _is_feature_extractor(ext):
            proj = self._projection_for(ext)
            if proj is None:
                logger.info("fitting a fixed projection on %d image(s) (no usable store projection)", len(images))
                raws = ext.extract(images)
                self.projection = FixedProjection.fit([r.sd for r in raws], dim=ext.recipe.pca_dim)
                return [fuse_raw(r, self.projection, alpha=ext.recipe.alpha, meta=ext.config()) for r in raws]
            return ext.describe(images, projection=proj)
        return list(ext.describe(images))

    def get(self, items: List[Tuple[str, str, Optional[str]]]) -> Dict[str, Union[FusedFeatures, Exception]]:
        """``items``: ``(id, filepath, stored_path or None)`` -> id -> features or the error."""
        out: Dict[str, Union[FusedFeatures, Exception]] = {}
        todo = []
        for sid, fp, stored in items:
            self.note_stored_path(stored)
            if stored:
                try:
                    out[sid] = self.load_stored(stored)
                    continue
                except Exception as e:  # noqa: BLE001 -- fall back to computing
                    logger.warning("stored features of %s unusable (%s); recomputing", sid, e)
            todo.append((sid, fp))
        images = []
        for sid, fp in todo:
            try:
                if fom.get_media_type(fp) != fom.IMAGE:
                    raise ValueError(f"{fp} is not an image (media type {fom.get_media_type(fp)!r})")
                images.append((sid, load_image(fp)))
            except Exception as e:  # noqa: BLE001
                out[sid] = e
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            try:
                feats = self.describe([im for _, im in chunk])
                for (sid, _), f in zip(chunk, feats):
                    out[sid] = f
            except Exception:  # noqa: BLE001 -- isolate the failing image
                for sid, im in chunk:
                    try:
                        out[sid] = self.describe([im])[0]
                    except Exception as e:  # noqa: BLE001
                        out[sid] = e
        return out

    def describe_flipped(self, filepath: str) -> FusedFeatures:
        from PIL import ImageOps

        return self.describe([ImageOps.mirror(load_image(filepath))])[0]


def _same_config(a, b) -> bool:
    """Extractor configs match (``pca_dim`` aside: the stored projection fixes it)."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    strip = lambda d: {k: v for k, v in d.items() if k != "pca_dim"}  # noqa: E731
    return strip(a) == strip(b)


def _err(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------- references
@dataclass
class RefInstance:
    index: int  # position in the reference's fo.Keypoints
    label: Optional[str]
    ordinal: int  # j-th instance with this label
    points: np.ndarray  # K x 2 float, NaN = unusable


@dataclass
class Reference:
    id: str
    filepath: str
    instances: List[RefInstance]
    features: Optional[FusedFeatures] = None
    flipped: Optional[FusedFeatures] = None
    embedding: Optional[torch.Tensor] = None  # from embedding_field
    gvec: Optional[torch.Tensor] = None  # from the dense features
    problems: List[str] = field(default_factory=list)


def parse_reference_keypoints(kps) -> Tuple[List[RefInstance], List[str]]:
    """fo.Keypoints -> usable instances and a list of problems (strings)."""
    problems: List[str] = []
    if kps is None or not getattr(kps, "keypoints", None):
        return [], ["reference has no keypoints"]
    instances, counts = [], {}
    for i, kp in enumerate(kps.keypoints):
        raw = kp.points or []
        pts = np.full((len(raw), 2), np.nan, dtype=np.float64)
        bad = []
        for p, xy in enumerate(raw):
            try:
                x, y = float(xy[0]), float(xy[1])
            except (TypeError, ValueError, IndexError):
                bad.append(p)
                continue
            if math.isnan(x) or math.isnan(y):
                continue  # invisible point: FiftyOne's convention
            if not (math.isfinite(x) and math.isfinite(y)) or not (0 <= x <= 1 and 0 <= y <= 1):
                bad.append(p)
                continue
            pts[p] = (x, y)
        if bad:
            problems.append(f"instance {i}: points {bad} outside [0, 1] or malformed, skipped")
        if len(raw) == 0:
            problems.append(f"instance {i}: no points")
            continue
        ordinal = counts.get(kp.label, 0)
        counts[kp.label] = ordinal + 1
        instances.append(RefInstance(index=i, label=kp.label, ordinal=ordinal, points=pts))
    if instances and not any(np.isfinite(inst.points).all(axis=1).any() for inst in instances):
        problems.append("reference has no usable (visible, in-range) point")
        instances = []
    return instances, problems


def _unit(v) -> Optional[torch.Tensor]:
    if v is None:
        return None
    t = torch.as_tensor(np.asarray(v, dtype=np.float32)).reshape(-1)
    if t.numel() == 0 or not bool(torch.isfinite(t).all()):
        return None
    return t / t.norm().clamp_min(1e-12)


# --------------------------------------------------------------------------- matching
@dataclass
class InstancePrediction:
    label: Optional[str]
    instance: int
    points: np.ndarray  # K x 2, NaN where invalid (before the visibility threshold)
    confidence: np.ndarray  # K
    reference_ids: List[Optional[str]]
    reference_id: str
    similarity: float
    flipped: bool


def _mean_similarity(m: corr.Matches) -> float:
    return float(m.similarity[m.valid].mean()) if bool(m.valid.any()) else float("-inf")


class Propagator:
    """Matches references into targets (the engine behind :func:`propagate_keypoints`
    and :func:`fiftyone_sdcorr.flag_keypoint_annotations`).

    Per target: one similarity matrix for every candidate reference instance (and its
    mirrored variant with flip alignment), see :func:`match_prepared`.
    """

    def __init__(self, references: List[Reference], *, combine="best", top_k=3, soft_argmax=True,
                 soft_window=corr.DEFAULT_SOFT_WINDOW, temperature=corr.DEFAULT_TEMPERATURE,
                 flip=False, flip_pairs=None):
        if combine not in COMBINE_RULES:
            raise ValueError(f"combine must be one of {COMBINE_RULES}, got {combine!r}")
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.references = references
        self.combine = combine
        self.top_k = int(top_k)
        self.soft_window = int(soft_window) if soft_argmax else None
        self.temperature = float(temperature)
        self.flip = bool(flip)
        self.flip_pairs = list(flip_pairs or [])
        self._prep: Dict[Tuple[str, bool], Prepared] = {}
        self._tokens: Dict[Tuple[str, int], Tuple[torch.Tensor, torch.Tensor]] = {}
        for r in references:
            self._prep[(r.id, False)] = Prepared.of(r.features)
            if r.gvec is None:
                r.gvec = self._prep[(r.id, False)].global_vector()
            if self.flip and r.flipped is not None:
                self._prep[(r.id, True)] = Prepared.of(r.flipped)
            for inst in r.instances:
                self._tokens[(r.id, inst.index)] = corr.keypoints_to_tokens(torch.as_tensor(inst.points), r.features)

    def rank(self, tgt: Prepared, tgt_emb: Optional[torch.Tensor], exclude: Optional[str] = None):
        """``[(cosine, reference)]``, most similar first."""
        refs = [r for r in self.references if r.id != exclude]
        if not refs:
            return []
        use_emb = tgt_emb is not None and all(
            r.embedding is not None and r.embedding.numel() == tgt_emb.numel() for r in refs)
        t = tgt_emb if use_emb else tgt.global_vector()
        sims = []
        for r in refs:
            v = r.embedding if use_emb else r.gvec
            s = float(t @ v) if v is not None and v.numel() == t.numel() else float("-inf")
            sims.append((s, r))
        sims.sort(key=lambda x: -x[0])
        return sims

    def _queries(self, ref: Reference, inst: RefInstance):
        """The (source, tokens, valid) queries of one reference instance: as is, and mirrored."""
        tokens, valid = self._tokens[(ref.id, inst.index)]
        qs = [(self._prep[(ref.id, False)], tokens, valid)]
        if self.flip and (ref.id, True) in self._prep:
            k = len(tokens)
            pairs = [(i, j) for i, j in self.flip_pairs if i < k and j < k]
            perm = corr._swap_permutation(k, pairs)
            mirrored = corr.mirror_tokens(tokens, ref.features)[perm]
            qs.append((self._prep[(ref.id, True)], mirrored, valid[perm]))
        return qs

    def predict(self, tgt_features: FusedFeatures, tgt_emb: Optional[torch.Tensor] = None,
                exclude: Optional[str] = None) -> List[InstancePrediction]:
        tgt = Prepared.of(tgt_features)
        ranked = self.rank(tgt, tgt_emb, exclude=exclude)
        if not ranked:
            raise ValueError("no usable reference (other than the target itself)")
        n = 1 if self.combine == "best" else self.top_k
        chosen = ranked[:n]
        best_sim, best = chosen[0]
        sim_of = {r.id: s for s, r in chosen}

        # candidates per output instance (the best reference's instances)
        plan = []
        for inst in best.instances:
            cands = [(best, inst)]
            for _, r in chosen[1:]:
                other = next((o for o in r.instances if o.label == inst.label and o.ordinal == inst.ordinal
                              and len(o.points) == len(inst.points)), None)
                if other is not None:
                    cands.append((r, other))
            plan.append((inst, cands))
        queries, slots = [], []
        for inst, cands in plan:
            for r, o in cands:
                qs = self._queries(r, o)
                slots.append((len(queries), len(qs)))
                queries.extend(qs)
        matches = match_prepared(tgt, queries, soft_window=self.soft_window, temperature=self.temperature)

        out, si = [], 0
        for inst, cands in plan:
            k = len(inst.points)
            pts = np.full((k, 2), np.nan)
            conf = np.zeros(k)
            rids: List[Optional[str]] = [None] * k
            flipped = False
            for r, _ in cands:
                first, count = slots[si]
                si += 1
                m = matches[first]
                if count == 2 and _mean_similarity(matches[first + 1]) > _mean_similarity(m):
                    m = matches[first + 1]
                    m.flipped = True
                npts = corr.tokens_to_normalized(m.tokens, tgt_features).numpy().clip(0.0, 1.0)
                c = m.confidence.double().numpy()
                valid = m.valid.numpy()
                unset = np.array([x is None for x in rids])
                better = valid & ((c > conf) | unset)
                pts[better] = npts[better]
                conf[better] = c[better]
                for p in np.nonzero(better)[0]:
                    rids[p] = r.id
                if r is best:
                    flipped = bool(m.flipped)
            counts: Dict[str, int] = {}
            for x in rids:
                if x is not None:
                    counts[x] = counts.get(x, 0) + 1
            main = max(counts, key=lambda x: (counts[x], x == best.id)) if counts else best.id
            out.append(InstancePrediction(
                label=inst.label, instance=inst.index, points=pts, confidence=conf,
                reference_ids=rids, reference_id=main, similarity=float(sim_of.get(main, best_sim)),
                flipped=flipped,
            ))
        return out


def to_keypoints(preds: List[InstancePrediction], visibility_threshold: float) -> fo.Keypoints:
    kps = []
    for p in preds:
        points = []
        for (x, y), c in zip(p.points, p.confidence):
            if not (np.isfinite(x) and np.isfinite(y)) or c < visibility_threshold:
                points.append([float("nan"), float("nan")])
            else:
                points.append([float(x), float(y)])
        kps.append(fo.Keypoint(
            label=p.label,
            points=points,
            confidence=[float(c) for c in p.confidence],
            sdcorr_reference_id=p.reference_id,
            sdcorr_reference_ids=list(p.reference_ids),
            sdcorr_similarity=float(p.similarity) if math.isfinite(p.similarity) else None,
            sdcorr_instance=int(p.instance),
            sdcorr_flipped=bool(p.flipped),
        ))
    return fo.Keypoints(keypoints=kps)


# --------------------------------------------------------------------------- loading
def _values_or_none(view, field_name, n):
    if field_name and _has_field(view, field_name):
        return view.values(field_name)
    return [None] * n


def load_references(ref_view, source_field: str, source: FeatureSource, *, features_field=None,
                    embedding_field=None, flip=False) -> Tuple[List[Reference], Dict[str, List[str]]]:
    """Reads, validates and describes the references; returns usable ones + problems by id."""
    if not _has_field(ref_view, source_field):
        raise ValueError(f"source field {source_field!r} does not exist on dataset {_root(ref_view).name!r}")
    ids = ref_view.values("id")
    fps = ref_view.values("filepath")
    labels = ref_view.values(source_field)
    stored = _values_or_none(ref_view, features_field, len(ids))
    embs = _values_or_none(ref_view, embedding_field, len(ids))
    problems: Dict[str, List[str]] = {}
    refs: List[Reference] = []
    for sid, fp, kps, emb in zip(ids, fps, labels, embs):
        if kps is not None and not isinstance(kps, fo.Keypoints):
            problems.setdefault(sid, []).append(
                f"reference field {source_field!r} holds {type(kps).__name__}, not Keypoints"
            )
            continue
        insts, probs = parse_reference_keypoints(kps)
        if probs:
            problems.setdefault(sid, []).extend(f"reference: {p}" for p in probs)
        if insts:
            refs.append(Reference(id=sid, filepath=fp, instances=insts, embedding=_unit(emb)))
    feats = source.get([(r.id, r.filepath, s) for r, s in zip(refs, [stored[ids.index(r.id)] for r in refs])])
    usable = []
    for r in refs:
        f = feats.get(r.id)
        if isinstance(f, Exception) or f is None:
            problems.setdefault(r.id, []).append(f"reference left out: {_err(f) if f is not None else 'no features'}")
            continue
        r.features, r.gvec = f, f.global_vector()
        if flip:
            try:
                r.flipped = source.describe_flipped(r.filepath)
            except Exception as e:  # noqa: BLE001
                problems.setdefault(r.id, []).append(f"reference: flipped features failed ({_err(e)}); no flip")
        usable.append(r)
    return usable, problems


def _locate_store(source: FeatureSource, samples, stored_paths) -> None:
    """Points ``source`` at the feature store: the one holding stored features, else the
    default store of the dataset (``compute_fused_features``' default)."""
    first = next((p for p in stored_paths if p), None)
    if first:
        source.note_stored_path(first)
    elif source._store_dir is None:
        try:
            from fiftyone_sdcorr.dataset_features import default_store_dir

            source._store_dir = default_store_dir(samples)
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------- public API
def propagate_keypoints(
    targets,
    references,
    source_field: str,
    output_field: str,
    *,
    extractor=None,
    sd_model=None,
    dino_model=None,
    device=None,
    dtype=None,
    batch_size=None,
    preset: str = "paper",
    recipe: Optional[dict] = None,
    features_field: Optional[str] = "sdcorr_features",
    embedding_field: Optional[str] = "sdcorr_embedding",
    store_dir=None,
    visibility_threshold: float = DEFAULT_VISIBILITY_THRESHOLD,
    soft_argmax: bool = True,
    soft_window: int = corr.DEFAULT_SOFT_WINDOW,
    temperature: float = corr.DEFAULT_TEMPERATURE,
    flip: bool = False,
    flip_pairs=None,
    combine: str = "best",
    top_k: int = 3,
    overwrite: bool = False,
    progress: ProgressArg = True,
) -> dict:
    """Propagates keypoints from annotated references to every target sample.

    Args:
        targets: a dataset or view of the samples to label.
        references: a view, a list of sample ids, or a sample tag; samples carrying
            ``fo.Keypoints`` in ``source_field``.
        source_field: the references' keypoints field (never written).
        output_field: the NEW ``fo.Keypoints`` field for the predictions.
        extractor: any Describer (``describe(images) -> [FusedFeatures]``); by default a
            ``FeatureExtractor(sd_model, dino_model, device=, dtype=, batch_size=,
            preset=, **recipe)``, built only if some features must be computed.
        features_field: sample field with stored dense-feature paths (used when present).
        embedding_field: sample field with global vectors (used when present).
        store_dir: feature store root (for its fixed projection, if any).
        visibility_threshold: points with confidence below it become ``[nan, nan]``.
        soft_argmax: window soft-argmax refinement (``soft_window``, ``temperature``).
        flip: flip alignment; left/right pairs from ``flip_pairs`` (index or name pairs)
            or the dataset's skeleton for ``source_field`` (``left_*``/``right_*``,
            ``l_*``/``r_*`` ...).
        combine: ``"best"`` or ``"per_point"`` (module docstring); ``top_k`` for the latter.
        overwrite: allow writing to an existing ``output_field`` (never ``source_field``).
        progress: True/False (progress bar) or ``callable(fraction, label)``.

    Returns:
        a summary dict: ``targets``, ``predicted``, ``failed``, ``references_used``,
        ``errors`` (sample id -> message), ``output_field``, ``error_field``,
        ``flip_pairs``, ``seconds_matching``.
    """
    import time

    error_field = f"{output_field}_error"
    if output_field == source_field:
        raise ValueError(f"output_field must differ from source_field {source_field!r}")
    protected = [source_field, features_field, embedding_field]
    check_output_field(targets, output_field, protected, overwrite)
    check_output_field(targets, error_field, protected, overwrite)
    if combine not in COMBINE_RULES:
        raise ValueError(f"combine must be one of {COMBINE_RULES}, got {combine!r}")
    ref_view = resolve_references(targets, references)
    if len(ref_view) == 0:
        raise ValueError("references are empty: no sample to propagate from")
    n_targets = len(targets)
    if n_targets == 0:
        raise ValueError("targets are empty: no sample to propagate to")

    pairs, pairs_origin = resolve_flip_pairs(targets, source_field, flip_pairs) if flip else ([], "off")
    if flip and not pairs:
        logger.warning("flip alignment without left/right pairs: every point keeps its label when mirrored")

    model_kw = dict(sd_model=sd_model, dino_model=dino_model, device=device, dtype=dtype,
                    batch_size=batch_size, preset=preset, recipe=recipe)
    source = FeatureSource(extractor, model_kw, store_dir=store_dir, batch_size=batch_size or 8)
    stored = _values_or_none(targets, features_field, n_targets)
    _locate_store(source, targets, stored + _values_or_none(ref_view, features_field, len(ref_view)))
    refs, problems = load_references(ref_view, source_field, source, features_field=features_field,
                                     embedding_field=embedding_field, flip=flip)
    if not refs:
        detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in list(problems.items())[:5])
        raise ValueError(f"no usable reference in {len(ref_view)} reference sample(s): {detail}")

    engine = Propagator(refs, combine=combine, top_k=top_k, soft_argmax=soft_argmax, soft_window=soft_window,
                        temperature=temperature, flip=flip, flip_pairs=pairs)
    root = _root(targets)
    ids = targets.values("id")
    fps = targets.values("filepath")
    embs = _values_or_none(targets, embedding_field, n_targets)

    if not root.has_sample_field(output_field):
        root.add_sample_field(output_field, fo.EmbeddedDocumentField, embedded_doc_type=fo.Keypoints)
    if not root.has_sample_field(error_field):
        root.add_sample_field(error_field, fo.StringField)

    predicted, failed, t_match = 0, 0, 0.0
    errors: Dict[str, str] = {}
    written_errors: Dict[str, Optional[str]] = {}
    chunk = max(1, int(batch_size or 8))
    bar = Progress(progress, n_targets, "propagating")
    try:
        for start in range(0, n_targets, chunk):
            sl = slice(start, start + chunk)
            feats = source.get(list(zip(ids[sl], fps[sl], stored[sl])))
            values: Dict[str, Optional[fo.Keypoints]] = {}
            for sid, emb in zip(ids[sl], embs[sl]):
                f = feats.get(sid)
                msgs = list(problems.get(sid, []))
                if isinstance(f, Exception) or f is None:
                    msgs.append(f"target: {_err(f) if f is not None else 'no features'}")
                    values[sid] = None
                    failed += 1
                else:
                    try:
                        t0 = time.perf_counter()
                        preds = engine.predict(f, _unit(emb))
                        t_match += time.perf_counter() - t0
                        values[sid] = to_keypoints(preds, visibility_threshold)
                        predicted += 1
                    except Exception as e:  # noqa: BLE001
                        msgs.append(f"target: {_err(e)}")
                        values[sid] = None
                        failed += 1
                msg = "; ".join(msgs) if msgs else None
                written_errors[sid] = msg
                if msg:
                    errors[sid] = msg
            if values:
                root.set_values(output_field, values, key_field="id")
            bar.update(len(ids[sl]))
        # reference problems on references that are not targets
        for sid, msgs in problems.items():
            if sid not in written_errors:
                written_errors[sid] = "; ".join(msgs)
                errors[sid] = written_errors[sid]
        root.set_values(error_field, written_errors, key_field="id")
    finally:
        bar.close()

    summary = {
        "output_field": output_field,
        "error_field": error_field,
        "targets": n_targets,
        "predicted": predicted,
        "failed": failed,
        "references_used": [r.id for r in refs],
        "references_left_out": sorted(set(ref_view.values("id")) - {r.id for r in refs}),
        "errors": errors,
        "combine": combine,
        "flip_pairs": [list(p) for p in pairs],
        "flip_pairs_origin": pairs_origin,
        "seconds_matching": t_match,
    }
    if errors:
        logger.warning("propagate_keypoints: %d sample(s) with problems, see field %r", len(errors), error_field)
    return summary


__all__ = [
    "propagate_keypoints",
    "flip_pairs_from_labels",
    "resolve_flip_pairs",
    "FeatureSource",
    "Propagator",
    "load_references",
    "DEFAULT_VISIBILITY_THRESHOLD",
]
