"""Reference keypoints matched into targets: the matching engine under propagation and
review (FiftyOne labels in, FiftyOne labels out; the tensor work is
:mod:`fiftyone_sdcorr.core.matching.correspondence`).

- **References**: each ``fo.Keypoint`` of a reference is an instance; NaN points are
  invisible; points outside ``[0, 1]`` or malformed are skipped and reported.
- **Ranking** (``combine``): ``"best"``: per target, the reference whose global embedding
  has the highest cosine provides every instance; ``"per_point"``: the ``top_k`` most
  similar references are matched and each point comes from the most confident of them
  (the ``j``-th instance labelled ``L`` of each, with the same number of points).
- **Flip alignment**: the mirrored reference is matched too, with left/right labels
  swapped (pairs from ``flip_pairs`` or the dataset's skeleton), and the better of the
  two (mean similarity) is kept.
- **Cost**: per batch of targets of one descriptor shape, the targets that use the same
  references are matched in ONE batched ``T x (sum K) x N`` similarity product, every
  candidate reference instance (and mirrored variant) at once
  (:func:`match_prepared_many`), on the features' device (the GPU when present).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

import fiftyone as fo

from fiftyone_sdcorr.core.matching import correspondence as corr
from fiftyone_sdcorr.core.matching.correspondence import Prepared, PreparedBatch, match_prepared_many
from fiftyone_sdcorr.core.features.fusion import FusedFeatures
from fiftyone_sdcorr.core.features.methods import get_method, method_of
from fiftyone_sdcorr.dataset.config import MatchConfig
from fiftyone_sdcorr.dataset import label_attrs as attrs
from fiftyone_sdcorr.dataset.engine import ParameterError, reason
from fiftyone_sdcorr.dataset.pck import points_of
from fiftyone_sdcorr.dataset.units import Unit, Units, by_sample, link_to_objects


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


def skeleton_for(samples, field_name: str, label: Optional[str] = None):
    """The ``fo.KeypointSkeleton`` of ``field_name`` (and ``label``), or None:
    :func:`fiftyone_sdcorr.dataset.skeletons.keypoint_skeleton` (the field's skeleton,
    the default one, or the COCO categories in ``dataset.info``)."""
    from fiftyone_sdcorr.dataset.skeletons import keypoint_skeleton

    return keypoint_skeleton(samples, field_name, label)


def resolve_flip_pairs(samples, field_name: str, flip_pairs=None,
                       label: Optional[str] = None) -> Tuple[List[Tuple[int, int]], str]:
    """``(pairs, origin)``: ``flip_pairs`` as given (index pairs, or name pairs looked up in
    the skeleton), else derived from the skeleton's point labels, else none. The skeleton
    is :func:`skeleton_for` ``(samples, field_name, label)``, so COCO's ``left_eye`` /
    ``right_eye`` ... names in ``dataset.info["categories"]`` give pairs too."""
    sk = skeleton_for(samples, field_name, label)
    labels = list(getattr(sk, "labels", None) or [])
    if flip_pairs is not None:
        out = []
        for a, b in flip_pairs:
            if isinstance(a, str) or isinstance(b, str):
                if not labels:
                    raise ParameterError("parameter 'flip_pairs' names points, but the dataset has no skeleton labels")
                try:
                    a, b = labels.index(a), labels.index(b)
                except ValueError as e:
                    raise ParameterError(f"parameter 'flip_pairs': {e}; skeleton labels: {labels}") from None
            out.append((int(a), int(b)))
        return out, "parameter"
    if labels:
        return flip_pairs_from_labels(labels), "skeleton"
    return [], "none"



# --------------------------------------------------------------------------- references
@dataclass
class RefInstance:
    index: int  # position in the reference's fo.Keypoints
    label: Optional[str]
    ordinal: int  # j-th instance with this label
    points: np.ndarray  # K x 2 float, NaN = unusable


@dataclass
class Reference:
    """A reference unit (an image, or an object: :mod:`.units`) and its keypoint instances,
    in the unit's normalised frame (an object's crop)."""

    id: str
    filepath: str
    instances: List[RefInstance]
    features: Optional[FusedFeatures] = None
    flipped: Optional[FusedFeatures] = None
    embedding: Optional[torch.Tensor] = None  # from embedding_field
    gvec: Optional[torch.Tensor] = None  # from the dense features
    problems: List[str] = field(default_factory=list)
    sample_id: Optional[str] = None  # its sample (the id itself for an image)
    label: Optional[str] = None  # an object's label (None for an image)
    unit: Optional[Unit] = None

    def __post_init__(self):
        if self.sample_id is None:
            self.sample_id = self.id


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


def unit_vector(v) -> Optional[torch.Tensor]:
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


def mean_similarity(m: corr.Matches) -> float:
    return float(m.similarity[m.valid].mean()) if bool(m.valid.any()) else float("-inf")


#: most bytes of stacked float32 target descriptors matched at once on a GPU (64 targets
#: of the paper's 1536 x 60 x 60 maps are 1.4 GB)
BATCH_BYTES_GPU = 4 << 30
#: the same on a CPU, where matching is bound by memory traffic and a large batch only adds
#: fresh pages to touch: one paper-size target at a time, small maps in batches
BATCH_BYTES_CPU = 32 << 20


class Propagator:
    """Matches references into targets (the engine behind :func:`propagate_keypoints`
    and :func:`fiftyone_sdcorr.flag_keypoint_annotations`).

    :meth:`predict_many` takes a batch of targets: those of one descriptor shape are
    stacked on their device, ranked against the references from one product, and the
    targets that use the same references are matched together: one batched similarity
    product for every candidate reference instance (and its mirrored variant with flip
    alignment), see :func:`match_prepared_many`; the matches come to the host once per
    such group. :meth:`predict` is the same for one target.
    """

    def __init__(self, references: List[Reference], match: MatchConfig = MatchConfig(),
                 flip_pairs: Sequence[Tuple[int, int]] = ()):
        self.references = references
        self.combine = match.combine
        self.top_k = match.top_k
        window = match.soft_window or get_method(method_of(references[0].features.meta if references else {})).soft_window
        self.soft_window = window if match.soft_argmax else None
        self.temperature = match.temperature
        self.flip = match.flip
        self.flip_pairs = list(flip_pairs)
        self.same_label = match.same_label
        self._prep: Dict[Tuple[str, bool], Prepared] = {}
        self._tokens: Dict[Tuple[str, int], Tuple[torch.Tensor, torch.Tensor]] = {}
        self._gvec: Dict[str, torch.Tensor] = {}  # on the host: ranking needs no device round trip
        self._plans: Dict[Tuple[str, ...], tuple] = {}
        for r in references:
            self._prep[(r.id, False)] = Prepared.of(r.features)
            if r.gvec is None:
                r.gvec = self._prep[(r.id, False)].global_vector()
            self._gvec[r.id] = r.gvec.float().cpu()
            if self.flip and r.flipped is not None:
                self._prep[(r.id, True)] = Prepared.of(r.flipped)
            for inst in r.instances:
                self._tokens[(r.id, inst.index)] = corr.keypoints_to_tokens(torch.as_tensor(inst.points), r.features)

    def rank(self, gvec: torch.Tensor, tgt_emb: Optional[torch.Tensor], exclude: Optional[str] = None,
             label: Optional[str] = None):
        """``[(cosine, reference)]``, most similar first; ``gvec``: the target's global
        vector (:meth:`PreparedBatch.global_vectors`), used unless every reference has an
        embedding of ``tgt_emb``'s size. ``exclude``: a sample whose references are left
        out; ``label``: only references of this label (with ``same_label``; objects)."""
        refs = [r for r in self.references if r.sample_id != exclude
                and (label is None or not self.same_label or r.label == label)]
        return rank_candidates(refs, gvec, tgt_emb, lambda r: r.embedding, lambda r: self._gvec[r.id])

    def _queries(self, ref: Reference, inst: RefInstance):
        """The (source, tokens, valid) queries of one reference instance: as is, and mirrored."""
        tokens, valid = self._tokens[(ref.id, inst.index)]
        qs = [(self._prep[(ref.id, False)], tokens, valid)]
        if self.flip and (ref.id, True) in self._prep:
            k = len(tokens)
            pairs = [(i, j) for i, j in self.flip_pairs if i < k and j < k]
            perm = corr.swap_permutation(k, pairs)
            mirrored = corr.mirror_tokens(tokens, ref.features)[perm]
            qs.append((self._prep[(ref.id, True)], mirrored, valid[perm]))
        return qs

    def _plan(self, chosen):
        """``(plan, queries, slots)`` of the chosen references (best first), made once per
        choice: the candidates of each output instance (the best reference's instances)
        and the queries that match them, on the references' device."""
        key = tuple(r.id for _, r in chosen)
        if key not in self._plans:
            best = chosen[0][1]
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
                    dev = self._prep[(r.id, False)].unit.device
                    qs = [(src, tok.to(dev), val.to(dev)) for src, tok, val in self._queries(r, o)]
                    slots.append((len(queries), len(qs)))
                    queries.extend(qs)
            self._plans[key] = (plan, queries, slots)
        return self._plans[key]

    def predict(self, tgt_features: FusedFeatures, tgt_emb: Optional[torch.Tensor] = None,
                exclude: Optional[str] = None, label: Optional[str] = None) -> List[InstancePrediction]:
        """The instances predicted in one target (:meth:`predict_many` of one)."""
        out = self.predict_many([(tgt_features, tgt_emb, exclude, label)])[0]
        if isinstance(out, Exception):
            raise out
        return out

    def predict_many(self, items) -> List[Union[List[InstancePrediction], Exception]]:
        """``items``: ``[(FusedFeatures, embedding or None, excluded sample id or None[, label])]``
        (see :meth:`rank`) -> per target, its ``[InstancePrediction]`` or the exception it raised (a target
        fails alone). Targets of one descriptor shape (and device) are matched together,
        up to :data:`BATCH_BYTES_GPU` of float32 descriptors at once on a GPU (on a CPU
        :data:`BATCH_BYTES_CPU`: there a batch only adds memory traffic)."""
        out: List = [None] * len(items)
        groups: Dict[tuple, List[int]] = {}
        for i, (f, *_) in enumerate(items):
            try:
                d = corr.descriptors_of(f)
                if d.dim() != 3:
                    raise ValueError(f"target descriptors must be C x H x W, got shape {tuple(d.shape)}")
            except Exception as e:  # noqa: BLE001
                out[i] = e
                continue
            groups.setdefault((tuple(d.shape), str(d.device)), []).append(i)
        for (shape, device), idx in groups.items():
            limit = BATCH_BYTES_GPU if device.startswith("cuda") else BATCH_BYTES_CPU
            size = max(1, limit // (4 * math.prod(shape)))
            for start in range(0, len(idx), size):
                self._isolated(items, idx[start:start + size], out)
        return out

    def _isolated(self, items, idx: List[int], out: list) -> None:
        """:meth:`_predict_group`; when it raises, target by target, so that a failure
        (bad features, out of memory) stays with its target."""
        try:
            self._predict_group(items, idx, out)
        except Exception as e:  # noqa: BLE001
            if len(idx) == 1:
                out[idx[0]] = e
                return
            for i in idx:
                self._isolated(items, [i], out)

    def _predict_group(self, items, idx: List[int], out: list) -> None:
        """Targets ``idx`` of one descriptor shape: ranked from one product, then matched
        in groups that use the same references."""
        batch = PreparedBatch.of([items[i][0] for i in idx])
        gvecs, empty = batch.global_vectors().cpu(), (~batch.mask.any(dim=1)).cpu().tolist()
        n = 1 if self.combine == "best" else self.top_k
        by_choice: Dict[Tuple[str, ...], list] = {}
        for j, i in enumerate(idx):
            label = items[i][3] if len(items[i]) > 3 else None
            ranked = self.rank(gvecs[j], items[i][1], exclude=items[i][2], label=label)
            if not ranked:
                out[i] = ValueError("no usable reference (other than the target itself)" if label is None else
                                    f"no usable reference object labelled {label!r} (other than the target's sample)")
            elif empty[j]:
                out[i] = ValueError("tgt_mask allows no target token")
            else:
                by_choice.setdefault(tuple(r.id for _, r in ranked[:n]), []).append((j, i, ranked[:n]))
        for members in by_choice.values():
            plan, queries, slots = self._plan(members[0][2])
            sub = batch if len(members) == len(idx) else batch.select([j for j, _, _ in members])
            matches = match_prepared_many(sub, queries, soft_window=self.soft_window, temperature=self.temperature,
                                          out_device="cpu")
            for (_, i, chosen), ms in zip(members, matches):
                out[i] = self._instances(items[i][0], chosen, plan, slots, ms)

    def _instances(self, tgt_features: FusedFeatures, chosen, plan, slots, matches) -> List[InstancePrediction]:
        """The predicted instances of one target from its matches (on the host)."""
        best_sim, best = chosen[0]
        sim_of = {r.id: s for s, r in chosen}
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
                if count == 2 and mean_similarity(matches[first + 1]) > mean_similarity(m):
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


def predict_rows(engine: Propagator, rows, *, leave_out_self: bool = False) -> dict:
    """``[(unit, features (or the error loading them, or None), embedding)]`` -> unit id
    -> its ``[InstancePrediction]`` or the exception it raised, for the units whose
    features loaded, in one :meth:`Propagator.predict_many` call. ``leave_out_self``: a
    sample is never its own reference (review); an object is matched to reference
    objects of its label (``same_label``)."""
    ids, items, out = [], [], {}
    for unit, f, emb in rows:
        sid = unit.id
        if f is None or isinstance(f, Exception):
            continue
        try:
            items.append((f, unit_vector(emb), unit.sample_id if leave_out_self else None,
                          unit.label if unit.is_object else None))
            ids.append(sid)
        except Exception as e:  # noqa: BLE001
            out[sid] = e
    out.update(zip(ids, engine.predict_many(items)))
    return out


def in_image(unit: Unit, preds: List[InstancePrediction], margin: float) -> List[InstancePrediction]:
    """An object's predictions moved from its crop into its image (in place; an image
    unit's are returned as they are)."""
    if unit.is_object and preds:
        crop = unit.crop(margin)
        for p in preds:
            p.points = crop.to_image(p.points)
    return preds


def to_keypoints(preds: List[InstancePrediction], visibility_threshold: float) -> fo.Keypoints:
    """One ``fo.Keypoint`` per prediction; points under ``visibility_threshold`` are NaN.
    ``visible`` is COCO's per point: 2 (visible) or 0 (NaN), as FiftyOne's COCO
    importer writes it and its exporter reads it."""
    kps = []
    for p in preds:
        points, visible = [], []
        for (x, y), c in zip(p.points, p.confidence):
            if not (np.isfinite(x) and np.isfinite(y)) or c < visibility_threshold:
                points.append([float("nan"), float("nan")])
                visible.append(0)
            else:
                points.append([float(x), float(y)])
                visible.append(2)
        kps.append(fo.Keypoint(
            label=p.label,
            points=points,
            visible=visible,
            confidence=[float(c) for c in p.confidence],
            **{attrs.REFERENCE_ID: p.reference_id,
               attrs.REFERENCE_IDS: list(p.reference_ids),
               attrs.SIMILARITY: float(p.similarity) if math.isfinite(p.similarity) else None,
               attrs.INSTANCE: int(p.instance),
               attrs.FLIPPED: bool(p.flipped)},
        ))
    return fo.Keypoints(keypoints=kps)



def rank_candidates(candidates: Sequence, gvec: torch.Tensor, tgt_emb: Optional[torch.Tensor],
                    emb_of: Callable, gvec_of: Callable) -> list:
    """``[(cosine, candidate)]``, most similar first: by the embeddings (``emb_of``) when
    every candidate has one of ``tgt_emb``'s size, else by the global vectors
    (``gvec``, ``gvec_of``); a candidate without a comparable vector ranks last (-inf).
    The one similarity rule of propagation, mask propagation and swap pairing."""
    if not candidates:
        return []
    use_emb = tgt_emb is not None and all(
        emb_of(c) is not None and emb_of(c).numel() == tgt_emb.numel() for c in candidates)
    t = (tgt_emb if use_emb else gvec).float().cpu()
    sims = []
    for c in candidates:
        v = emb_of(c) if use_emb else gvec_of(c)
        sims.append((float(t @ v) if v is not None and v.numel() == t.numel() else float("-inf"), c))
    sims.sort(key=lambda x: -x[0])
    return sims


# --------------------------------------------------------------------------- references of a run
def resolve_references(samples, references):
    """``references``: a view or dataset (of the same dataset), a list of sample ids, or a
    tag -> a view."""
    root = samples._root_dataset
    if references is None:
        raise ParameterError("parameter 'references' is required (a view, a list of sample ids, or a tag)")
    if isinstance(references, str):
        if not references.strip():
            raise ParameterError("parameter 'references' is an empty tag")
        view = root.match_tags(references)
    elif isinstance(references, (list, tuple, set)):
        ids = [str(i) for i in references]
        bad = [i for i in ids if not re.fullmatch(r"[0-9a-f]{24}", i)]
        if bad:
            raise ParameterError(f"parameter 'references': {bad[:3]} are not sample ids")
        view = root.select(ids)
        missing = set(ids) - set(view.values("id"))
        if missing:
            raise ParameterError(f"parameter 'references': no sample with id(s) {sorted(missing)[:3]}")
    elif hasattr(references, "values") and hasattr(references, "_root_dataset"):
        if references._root_dataset.name != root.name:
            raise ParameterError(f"parameter 'references' comes from dataset {references._root_dataset.name!r}, "
                                 f"the samples from {root.name!r}")
        view = references
    else:
        raise ParameterError("parameter 'references' must be a view, a list of sample ids or a tag, got "
                             f"{type(references).__name__}")
    if len(view) == 0:
        raise ParameterError(f"parameter 'references' selects no sample ({references!r})"
                             if isinstance(references, str) else "parameter 'references' selects no sample")
    return view


def load_references(ref_view, source_field: str, source, *, features_field=None, embedding_field=None,
                    flip=False, patches_field=None) -> Tuple[List[Reference], Dict[str, List[str]]]:
    """Reads, validates and describes the references: one per reference image, or (with
    ``patches_field``) one per reference object that a keypoint instance belongs to
    (:func:`~fiftyone_sdcorr.dataset.units.link_to_objects`), its points in the object's
    crop. Returns the usable ones + problems by sample id."""
    units = Units(ref_view, patches_field)
    samples = units.samples
    kps_of = dict(zip(samples.values("id"), samples.values(source_field)))
    stored = dict(zip((u.id for u in units.units()), units.values(features_field)))
    embs = dict(zip((u.id for u in units.units()), units.values(embedding_field)))
    problems: Dict[str, List[str]] = {sid: [] for sid in kps_of}
    refs: List[Reference] = []
    if not units.objects:
        for u in units.units():
            insts, probs = parse_reference_keypoints(kps_of[u.id])
            problems[u.id].extend(f"reference: {p}" for p in probs)
            if insts:
                refs.append(Reference(id=u.id, filepath=u.filepath, instances=insts, embedding=unit_vector(embs[u.id]),
                                      unit=u))
    else:
        metadata = dict(zip(samples.values("id"), samples.values("metadata")))
        objects_of = by_sample(units.units())
        for sid, kps in kps_of.items():
            refs += _object_references(sid, kps, objects_of.get(sid, []), metadata.get(sid), source.margin, embs,
                                       problems[sid], patches_field)
    feats = source.get([(r.id, r.unit, stored[r.id]) for r in refs])
    usable = []
    for r in refs:
        f = feats.get(r.id)
        what = "reference left out" if not units.objects else f"reference object {r.id} ({r.label}) left out"
        if isinstance(f, Exception) or f is None:
            problems[r.sample_id].append(f"{what}: {reason(f) if f is not None else 'no features'}")
            continue
        r.features, r.gvec = f, f.global_vector()
        if flip:
            try:
                r.flipped = source.describe_flipped(r.unit)
            except Exception as e:  # noqa: BLE001
                problems[r.sample_id].append(f"reference: no flip alignment, the mirrored features failed ({reason(e)})")
        usable.append(r)
    return usable, {k: v for k, v in problems.items() if v}


def _object_references(sid, kps, objects, metadata, margin, embs, problems, patches_field) -> List[Reference]:
    """The reference objects of one sample: each keypoint instance linked to its object,
    its points moved into the object's crop."""
    items = list(getattr(kps, "keypoints", None) or [])
    if not items:
        problems.append("reference has no keypoints")
        return []
    linked = dict(link_to_objects(items, objects))
    out = []
    for k, kp in enumerate(items):
        obj = linked.get(k)
        if obj is None:
            problems.append(f"reference: instance {k} ({kp.label}) lies in no object of {patches_field!r}, left out")
            continue
        try:
            crop = obj.crop(margin, metadata)
        except Exception as e:  # noqa: BLE001 -- an unreadable image or a box without area
            problems.append(f"reference object {obj.id}: {reason(e)}")
            continue
        pts = crop.to_crop(points_of(kp))
        pts[~((pts >= 0) & (pts <= 1)).all(axis=1)] = np.nan  # outside the crop: not matchable
        insts, probs = parse_reference_keypoints(fo.Keypoints(keypoints=[fo.Keypoint(
            label=kp.label, points=[[float(x), float(y)] for x, y in pts])]))
        problems.extend(f"reference object {obj.id}: {p}" for p in probs)
        if insts:
            insts[0].index = k
            out.append(Reference(id=obj.id, filepath=obj.filepath, instances=insts, embedding=unit_vector(embs[obj.id]),
                                 sample_id=sid, label=obj.label, unit=obj))
    return out


def without_references(rows, references: Sequence[Reference], summary, include: bool = False) -> list:
    """The target rows ``[(unit, ...)]`` that are not references themselves (a reference
    image, or a reference object): a reference is not predicted onto itself unless
    ``include`` (``include_references=True``); how many were left out goes into
    ``summary["references_skipped"]``."""
    if include:
        summary["references_skipped"] = 0
        return list(rows)
    ids = {r.id for r in references}
    keep = [row for row in rows if row[0].id not in ids]
    summary["references_skipped"] = len(rows) - len(keep)
    return keep


def feature_source(samples, cfg, given: dict):
    """The features source of a propagation or review run: it checks the feature keywords
    against the configuration recorded on ``cfg.features_field`` (part of the run's checks:
    no model loads here)."""
    from fiftyone_sdcorr.dataset.feature_source import FeatureSource

    return FeatureSource(samples, cfg.features_field, given, cfg.batch_size, Units(samples, cfg.patches_field))


def prepare_matching(samples, ref_view, source_field: str, cfg, source, summary, stored_paths):
    """The matcher of a propagation or review run: references and flip pairs, with
    features from ``source`` (:func:`feature_source`); what changes the result goes into
    ``summary``'s warnings.

    Returns ``(propagator, source, problems by reference id)``.
    """
    ref_units = Units(ref_view, cfg.patches_field)
    source.locate(list(stored_paths) + ref_units.values(cfg.features_field))
    pairs, origin = resolve_flip_pairs(samples, source_field, cfg.match.flip_pairs) if cfg.match.flip else ([], "off")
    if cfg.match.flip and not pairs:
        summary.warn("flip alignment without left/right pairs (no skeleton labels like left_*/right_*, no "
                     "flip_pairs): every point keeps its label when mirrored")
    refs, problems = load_references(ref_view, source_field, source, features_field=cfg.features_field,
                                     embedding_field=cfg.embedding_field, flip=cfg.match.flip,
                                     patches_field=cfg.patches_field)
    if not refs:
        detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in list(problems.items())[:5])
        raise ParameterError(f"no usable reference among {len(ref_units.samples)} reference sample(s): {detail}")
    if cfg.match.flip and any(r.flipped is None for r in refs):
        summary.warn(f"flip alignment unavailable for {sum(r.flipped is None for r in refs)} of {len(refs)} "
                     "reference(s): " + next(m for v in problems.values() for m in v if "flip" in m))
    ref_ids = ref_units.samples.values("id")
    used = {r.sample_id for r in refs}
    left_out = len(set(ref_ids) - used)
    if left_out:
        summary.warn(f"{left_out} of {len(ref_ids)} reference(s) left out (no usable points or features); "
                     f"see {cfg.error_field!r}")
    for note in source.notes:
        summary.warn(note)
    summary.update(references_used=sorted(used), flip_pairs=[list(p) for p in pairs],
                   flip_pairs_origin=origin, references_left_out=sorted(set(ref_ids) - used))
    if ref_units.objects:
        summary["reference_objects"] = len(refs)
    return Propagator(refs, cfg.match, pairs), source, problems


__all__ = [
    "flip_pairs_from_labels", "resolve_flip_pairs", "skeleton_for", "RefInstance", "Reference",
    "parse_reference_keypoints", "unit_vector", "InstancePrediction", "Propagator", "predict_rows", "in_image", "to_keypoints",
    "BATCH_BYTES_GPU", "BATCH_BYTES_CPU",
    "resolve_references", "load_references", "feature_source", "prepare_matching", "without_references",
]
