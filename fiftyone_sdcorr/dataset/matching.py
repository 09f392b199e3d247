"""Reference keypoints matched into targets: the matching engine under propagation and
review (FiftyOne labels in, FiftyOne labels out; the tensor work is
:mod:`fiftyone_sdcorr.core.correspondence`).

- **References**: each ``fo.Keypoint`` of a reference is an instance; NaN points are
  invisible; points outside ``[0, 1]`` or malformed are skipped and reported.
- **Ranking** (``combine``): ``"best"``: per target, the reference whose global embedding
  has the highest cosine provides every instance; ``"per_point"``: the ``top_k`` most
  similar references are matched and each point comes from the most confident of them
  (the ``j``-th instance labelled ``L`` of each, with the same number of points).
- **Flip alignment**: the mirrored reference is matched too, with left/right labels
  swapped (pairs from ``flip_pairs`` or the dataset's skeleton), and the better of the
  two (mean similarity) is kept.
- **Cost**: per target, every candidate reference instance (and mirrored variant) is
  matched in ONE ``(sum K) x N`` similarity product (:func:`match_prepared`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import fiftyone as fo

from fiftyone_sdcorr.core import correspondence as corr
from fiftyone_sdcorr.core.correspondence import Prepared, match_prepared
from fiftyone_sdcorr.core.features import FusedFeatures
from fiftyone_sdcorr.dataset.config import MatchConfig
from fiftyone_sdcorr.dataset.engine import ParameterError, reason, values_or_none


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
    root = samples._root_dataset
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


class Propagator:
    """Matches references into targets (the engine behind :func:`propagate_keypoints`
    and :func:`fiftyone_sdcorr.flag_keypoint_annotations`).

    Per target: one similarity matrix for every candidate reference instance (and its
    mirrored variant with flip alignment), see :func:`match_prepared`.
    """

    def __init__(self, references: List[Reference], match: MatchConfig = MatchConfig(),
                 flip_pairs: Sequence[Tuple[int, int]] = ()):
        self.references = references
        self.combine = match.combine
        self.top_k = match.top_k
        self.soft_window = match.soft_window if match.soft_argmax else None
        self.temperature = match.temperature
        self.flip = match.flip
        self.flip_pairs = list(flip_pairs)
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
            perm = corr.swap_permutation(k, pairs)
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
                if count == 2 and mean_similarity(matches[first + 1]) > mean_similarity(m):
                    m = matches[first + 1]
                    m.flipped = True
                npts = corr.tokens_to_normalized(m.tokens, tgt_features).cpu().numpy().clip(0.0, 1.0)
                c = m.confidence.double().cpu().numpy()
                valid = m.valid.cpu().numpy()
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
                    flip=False) -> Tuple[List[Reference], Dict[str, List[str]]]:
    """Reads, validates and describes the references; usable ones + problems by sample id."""
    ids, fps = ref_view.values("id"), ref_view.values("filepath")
    labels = ref_view.values(source_field)
    stored = dict(zip(ids, values_or_none(ref_view, features_field, len(ids))))
    embs = values_or_none(ref_view, embedding_field, len(ids))
    problems: Dict[str, List[str]] = {}
    refs: List[Reference] = []
    for sid, fp, kps, emb in zip(ids, fps, labels, embs):
        insts, probs = parse_reference_keypoints(kps)
        problems.setdefault(sid, []).extend(f"reference: {p}" for p in probs)
        if insts:
            refs.append(Reference(id=sid, filepath=fp, instances=insts, embedding=unit_vector(emb)))
    feats = source.get([(r.id, r.filepath, stored[r.id]) for r in refs])
    usable = []
    for r in refs:
        f = feats.get(r.id)
        if isinstance(f, Exception) or f is None:
            problems[r.id].append(f"reference left out: {reason(f) if f is not None else 'no features'}")
            continue
        r.features, r.gvec = f, f.global_vector()
        if flip:
            try:
                r.flipped = source.describe_flipped(r.filepath)
            except Exception as e:  # noqa: BLE001
                problems[r.id].append(f"reference: no flip alignment, the mirrored features failed ({reason(e)})")
        usable.append(r)
    return usable, {k: v for k, v in problems.items() if v}


def prepare_matching(samples, ref_view, source_field: str, cfg, given: dict, summary, stored_paths):
    """The matcher of a propagation or review run: features source, references,
    flip pairs; what changes the result goes into ``summary``'s warnings.

    Returns ``(propagator, source, problems by reference id)``.
    """
    from fiftyone_sdcorr.dataset.feature_source import FeatureSource

    source = FeatureSource(samples, cfg.features_field, given, cfg.batch_size)
    source.locate(list(stored_paths) + values_or_none(ref_view, cfg.features_field, len(ref_view)))
    pairs, origin = resolve_flip_pairs(samples, source_field, cfg.match.flip_pairs) if cfg.match.flip else ([], "off")
    if cfg.match.flip and not pairs:
        summary.warn("flip alignment without left/right pairs (no skeleton labels like left_*/right_*, no "
                     "flip_pairs): every point keeps its label when mirrored")
    refs, problems = load_references(ref_view, source_field, source, features_field=cfg.features_field,
                                     embedding_field=cfg.embedding_field, flip=cfg.match.flip)
    if not refs:
        detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in list(problems.items())[:5])
        raise ParameterError(f"no usable reference among {len(ref_view)} reference sample(s): {detail}")
    if cfg.match.flip and any(r.flipped is None for r in refs):
        summary.warn(f"flip alignment unavailable for {sum(r.flipped is None for r in refs)} of {len(refs)} "
                     "reference(s): " + next(m for v in problems.values() for m in v if "flip" in m))
    left_out = len(ref_view) - len(refs)
    if left_out:
        summary.warn(f"{left_out} of {len(ref_view)} reference(s) left out (no usable points or features); "
                     f"see {cfg.error_field!r}")
    for note in source.notes:
        summary.warn(note)
    used = {r.id for r in refs}
    summary.update(references_used=sorted(used), flip_pairs=[list(p) for p in pairs],
                   flip_pairs_origin=origin,
                   references_left_out=sorted(set(ref_view.values("id")) - used))
    return Propagator(refs, cfg.match, pairs), source, problems


__all__ = [
    "flip_pairs_from_labels", "resolve_flip_pairs", "skeleton_for", "RefInstance", "Reference",
    "parse_reference_keypoints", "unit_vector", "InstancePrediction", "Propagator", "to_keypoints",
    "resolve_references", "load_references", "prepare_matching",
]
