"""Review quality, measured: how well :func:`flag_keypoint_annotations` finds known errors.

:func:`measure_review_quality` copies the ground-truth keypoints of a view into a new,
temporary field, corrupts them in known ways, reviews the corrupted copy with
:func:`~fiftyone_sdcorr.dataset.review.flag_keypoint_annotations` and compares the flags
with what it did. The user's field is only read; every field it creates is deleted before
it returns (also on an error), and the review is run without a sample tag.

Corruptions (each visible annotated point, independently, with probability ``rate``; the
kind is drawn uniformly among the requested kinds that are possible for that point):

- ``"swap"``: the point and its left/right partner exchange places (both count as
  swapped). Partners: ``flip_pairs`` when given, else the skeleton of ``gt_field``
  (``left_*`` / ``right_*`` labels, :func:`resolve_flip_pairs`), else, on a dataset from
  :func:`import_benchmark`, the skeleton recorded for the instance's category. Possible
  only when the partner is visible and still clean;
- ``"shift"``: the point moves by ``shift x T`` pixels in a random direction (kept in
  the image when one of 32 directions allows, else clipped), with ``T`` the object's
  size: the max side of its box in ``bbox_field`` (a review keyword), else of the extent
  of the instance's visible points (:func:`threshold_size`). Possible when ``T`` exists;
- ``"drop"``: the point is removed (NaN, and ``visible`` False where that attribute
  exists). A point-level review checks only visible points, so a dropped point can never
  be flagged: its recall is reported as ``None`` ("not applicable"), and dropped points
  count neither as true nor as false positives. They still matter: the other samples are
  reviewed with less evidence.

Counted per kind: ``points`` (corrupted points), ``checked`` (the review gave a verdict),
``flagged``; ``recall = flagged / points`` (a corrupted point the review could not check is
missed), ``recall_checked = flagged / checked``, ``precision = flagged / (flagged + clean
points flagged)`` (as if this were the only kind of corruption) and the same over the
``detectable`` points, those moved by more than the review's ``alpha x T``. Clean points:
``flag_rate = flagged / checked`` (the false-alarm rate) and
``flagged_where_corrupted_elsewhere``: flagged clean points whose keypoint (label and
index) is swapped or shifted in another sample, i.e. false alarms caused by corrupted
evidence (the other samples are the references). ``overall``: over all swapped and
shifted points, ``precision = corrupted flagged / all flagged``.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Dict, List, Optional, Sequence

import numpy as np

import fiftyone as fo

from fiftyone_sdcorr.core.common.files import check_output_file, write_text_atomic
from fiftyone_sdcorr.dataset.benchmarks import INFO_KEY, import_benchmark
from fiftyone_sdcorr.dataset.config import ReviewConfig
from fiftyone_sdcorr.dataset.engine import (
    ParameterError,
    check_float,
    check_int,
    image_collection,
    require_field,
    values_or_none,
)
from fiftyone_sdcorr.dataset.label_attrs import SUSPICIOUS
from fiftyone_sdcorr.dataset.matching import resolve_flip_pairs
from fiftyone_sdcorr.dataset.pck import image_size_of, points_of, threshold_size
from fiftyone_sdcorr.dataset.review import flag_keypoint_annotations

FUNCTION = "measure_review_quality"
KINDS = ("swap", "shift", "drop")
#: review keywords this function sets itself
RESERVED = ("review_field", "tag", "overwrite", "references", "gt_field")
DROP_NOTE = ("not applicable: a dropped point is not visible, and the review checks visible points only, "
             "so it can never be flagged")


def measure_review_quality(samples, gt_field: str, *, corruptions: Sequence[str] = KINDS, rate: float = 0.2,
                           shift: float = 0.2, seed: int = 0, flip_pairs=None, **review_kwargs) -> dict:
    """Precision and recall of :func:`flag_keypoint_annotations` on known corruptions.

    Args:
        samples: a dataset or view; its samples with keypoints in ``gt_field`` are used.
        gt_field: the ground truth (``fo.Keypoints``); read, never written.
        corruptions: kinds among ``"swap"``, ``"shift"``, ``"drop"`` (module docstring).
        rate: probability that a visible point is corrupted, in [0, 1].
        shift: displacement of a shifted point, in units of the object's size ``T``.
        seed: the corruptions' random seed (same seed, same corruptions).
        flip_pairs: left/right pairs (indices or skeleton names) for swaps; also given to
            the review (for ``flip=True``). Default: from the skeleton (module docstring).
        **review_kwargs: passed to :func:`flag_keypoint_annotations` (``extractor``,
            ``alpha``, ``min_confidence``, ``bbox_field``, ``features_field``, ...);
            not ``review_field``, ``tag``, ``overwrite`` nor ``references``.

    Returns:
        a JSON-able dict: ``kinds`` (``clean``, ``swap``, ``shift``, ``drop``: counts,
        recall, precision), ``overall``, ``settings``, ``review`` (the review's counts and
        warnings), ``swap_pairs_origin``; :func:`quality_table` prints it.
    """
    kinds = check_quality_args(samples, gt_field, corruptions, rate, shift, seed, review_kwargs)
    root = samples._root_dataset
    annotated = samples.exists(gt_field)
    if len(annotated) < 2:
        raise ParameterError("leave-one-out review needs at least 2 annotated samples")
    alpha = review_kwargs.get("alpha", ReviewConfig.alpha)
    pairs_of = swap_pairs(samples, gt_field, flip_pairs)
    rng = np.random.default_rng(seed)
    corrupted, truth = {}, {}
    for sid, fp, meta, kps, box in zip(annotated.values("id"), annotated.values("filepath"),
                                       annotated.values("metadata"), annotated.values(gt_field),
                                       values_or_none(annotated, review_kwargs.get("bbox_field"), len(annotated))):
        wh = image_size_of(fp, meta)
        out = [corrupt_instance(kp, pairs_of(kp.label), kinds, rate, shift, wh, box, rng)
               for kp in kps.keypoints or []]
        corrupted[sid] = fo.Keypoints(keypoints=[kp for kp, _ in out])
        truth[sid] = [t for _, t in out]
    prefix = f"sdcorr_rq{uuid.uuid4().hex[:8]}"
    gt_tmp, review_tmp = f"{prefix}_gt", f"{prefix}_review"
    if flip_pairs is not None or review_kwargs.get("flip"):
        review_kwargs["flip_pairs"] = flip_pairs if flip_pairs is not None else (pairs_of(None) or None)
    try:
        root.add_sample_field(gt_tmp, fo.EmbeddedDocumentField, embedded_doc_type=fo.Keypoints)
        root.set_values(gt_tmp, corrupted, key_field="id")
        view = root.select(list(corrupted), ordered=True)
        review = flag_keypoint_annotations(view, gt_tmp, review_field=review_tmp, tag=None, **review_kwargs)
        reviewed = dict(zip(view.values("id"), view.values(review_tmp)))
    finally:
        remove_fields(root, prefix)
    report = score_flags(truth, reviewed, alpha)
    report.update(function=FUNCTION, dataset=root.name, gt_field=gt_field, samples=len(corrupted),
                  swap_pairs_origin=pairs_of.origin,
                  settings=dict(corruptions=list(kinds), rate=rate, shift=shift, seed=seed, alpha=alpha,
                                min_confidence=review_kwargs.get("min_confidence", ReviewConfig.min_confidence),
                                bbox_field=review_kwargs.get("bbox_field")),
                  review={k: review.get(k) for k in ("checked", "points_checked", "flagged_points", "failed",
                                                     "warnings", "errors", "flip_pairs_origin")})
    return report


def check_quality_args(samples, gt_field, corruptions, rate, shift, seed, review_kwargs) -> tuple:
    """The checked corruption kinds; refuses bad arguments before anything is written."""
    image_collection(samples)
    require_field(samples, "gt_field", gt_field, "keypoints")
    if isinstance(corruptions, str):
        corruptions = [c.strip() for c in corruptions.split(",") if c.strip()]
    kinds = tuple(dict.fromkeys(corruptions or ()))
    if not kinds or any(k not in KINDS for k in kinds):
        raise ParameterError(f"parameter 'corruptions' must be a non-empty subset of {list(KINDS)}, "
                             f"got {corruptions!r}")
    check_float("rate", rate, lo=0.0, hi=1.0)
    check_float("shift", shift, lo=0.0, lo_open=True)
    check_int("seed", seed, lo=0)
    bad = sorted(set(review_kwargs) & set(RESERVED))
    if bad:
        raise ParameterError(f"parameter(s) {bad}: set by measure_review_quality itself (temporary fields, no tag)")
    return kinds


class SwapPairs:
    """``pairs_of(label)``: left/right index pairs for an instance of ``label``."""

    def __init__(self, shared: List[tuple], origin: str, by_label: Optional[dict] = None):
        self.shared, self.origin, self.by_label = shared, origin, by_label or {}

    def __call__(self, label) -> List[tuple]:
        if self.shared or label is None:
            return self.shared
        return self.by_label.get(label, [])


def swap_pairs(samples, gt_field: str, flip_pairs=None) -> SwapPairs:
    """The left/right partners used for swaps (module docstring)."""
    pairs, origin = resolve_flip_pairs(samples, gt_field, flip_pairs)
    if pairs or flip_pairs is not None:
        return SwapPairs([tuple(p) for p in pairs], origin)
    skeletons = ((samples._root_dataset.info or {}).get(INFO_KEY) or {}).get("skeletons") or {}
    by_label = {c: [tuple(p) for p in s.get("flip_pairs") or []] for c, s in skeletons.items()}
    if any(by_label.values()):
        return SwapPairs([], "benchmark", by_label)
    return SwapPairs([], "none")


def corrupt_instance(kp, pairs, kinds, rate, shift, wh, box, rng):
    """``(corrupted copy of kp, per-point truth)``; truth: None for a point not annotated,
    else ``{"kind": "clean" | "swap" | "shift" | "drop", "moved": distance / T or None}``."""
    pts = points_of(kp)
    k = len(pts)
    scale = np.array(wh, dtype=np.float64)
    T = threshold_size("bbox", box, kp.label, pts * scale, int(wh[0]), int(wh[1]))
    truth = [{"kind": "clean", "moved": 0.0} if np.isfinite(p).all() else None for p in pts]
    partner = {}
    for a, b in pairs:
        if a < k and b < k and a != b:
            partner[a], partner[b] = b, a
    out = pts.copy()
    for q in range(k):
        u, pick, angle = rng.random(), rng.random(), rng.random(32) * 2 * math.pi
        if truth[q] is None or truth[q]["kind"] != "clean" or u >= rate:
            continue
        p = partner.get(q)
        possible = [c for c in kinds if (c != "swap" or (p is not None and truth[p] is not None
                                                         and truth[p]["kind"] == "clean"))
                    and (c != "shift" or T)]
        if not possible:
            continue
        kind = possible[min(int(pick * len(possible)), len(possible) - 1)]
        if kind == "swap":
            out[q], out[p] = pts[p].copy(), pts[q].copy()
            moved = float(np.linalg.norm((pts[p] - pts[q]) * scale) / T) if T else None
            truth[q] = truth[p] = {"kind": "swap", "moved": moved}
        elif kind == "shift":
            out[q] = shifted(pts[q], shift * T, scale, angle)
            truth[q] = {"kind": "shift", "moved": float(np.linalg.norm((out[q] - pts[q]) * scale) / T)}
        else:
            out[q] = np.nan
            truth[q] = {"kind": "drop", "moved": None}
    return copy_keypoint(kp, out, [t is not None and t["kind"] == "drop" for t in truth]), truth


def shifted(p, dist_px: float, scale, angles) -> np.ndarray:
    """``p`` (normalized) moved ``dist_px`` pixels: the first of ``angles`` that stays in
    the image, else the first, clipped to it."""
    for a in angles:
        q = p + dist_px * np.array([math.cos(a), math.sin(a)]) / scale
        if (q >= 0).all() and (q <= 1).all():
            return q
    return np.clip(p + dist_px * np.array([math.cos(angles[0]), math.sin(angles[0])]) / scale, 0.0, 1.0)


def copy_keypoint(kp, pts, dropped) -> fo.Keypoint:
    new = kp.copy()
    new.points = [[float(x), float(y)] for x, y in pts]
    vis = getattr(kp, "visible", None) if "visible" in kp.field_names else None
    if isinstance(vis, list) and len(vis) == len(pts):
        # a dropped point is not visible; the rest keep their value (COCO's 0/1/2 or a bool)
        new.visible = [(False if isinstance(v, bool) else 0) if d else v for v, d in zip(vis, dropped)]
    return new


def remove_fields(root, prefix: str) -> None:
    """Deletes every top-level field whose name starts with ``prefix``."""
    root.reload()
    names = [n for n in root.get_field_schema() if n.startswith(prefix)]
    if names:
        root.delete_sample_fields(names)


def score_flags(truth: Dict[str, list], reviewed: Dict[str, Optional[fo.Keypoints]], alpha: float) -> dict:
    """Counts and rates per kind (module docstring) from the truth and the review."""
    rows = []  # (kind, moved, flag, sample id, (label, point index))
    for sid, instances in truth.items():
        rv = reviewed.get(sid)
        rv_kps = list(rv.keypoints or []) if rv is not None else []
        for j, points in enumerate(instances):
            kp = rv_kps[j] if j < len(rv_kps) else None
            flags = list(getattr(kp, SUSPICIOUS, None) or []) if kp is not None else []
            for q, t in enumerate(points):
                if t is not None:
                    rows.append((t["kind"], t["moved"], flags[q] if q < len(flags) else None, sid,
                                 (getattr(kp, "label", None), q)))
    moved_at: Dict[tuple, set] = {}
    for r in rows:
        if r[0] in ("swap", "shift"):
            moved_at.setdefault(r[4], set()).add(r[3])
    clean = [r for r in rows if r[0] == "clean"]
    fp = sum(r[2] is True for r in clean)
    checked = sum(r[2] is not None for r in clean)
    elsewhere = sum(r[2] is True and bool(moved_at.get(r[4], set()) - {r[3]}) for r in clean)
    kinds = {"clean": dict(points=len(clean), checked=checked, flagged=fp, flag_rate=ratio(fp, checked),
                           flagged_where_corrupted_elsewhere=elsewhere)}
    for kind in ("swap", "shift"):
        kinds[kind] = kind_stats([r for r in rows if r[0] == kind], fp, alpha)
    dropped = sum(r[0] == "drop" for r in rows)
    kinds["drop"] = dict(points=dropped, checked=0, flagged=0, recall=None, precision=None, note=DROP_NOTE)
    moved = [r for r in rows if r[0] in ("swap", "shift")]
    tp = sum(r[2] is True for r in moved)
    overall = dict(corrupted=len(moved), flagged=tp, clean_flagged=fp, recall=ratio(tp, len(moved)),
                   precision=ratio(tp, tp + fp), dropped=dropped, annotated=len(rows))
    return dict(kinds=kinds, overall=overall)


def kind_stats(rows, clean_flagged: int, alpha: float) -> dict:
    tp = sum(r[2] is True for r in rows)
    checked = sum(r[2] is not None for r in rows)
    det = [r for r in rows if r[1] is not None and r[1] > alpha]
    tp_det = sum(r[2] is True for r in det)
    return dict(points=len(rows), checked=checked, flagged=tp, recall=ratio(tp, len(rows)),
                recall_checked=ratio(tp, checked), precision=ratio(tp, tp + clean_flagged),
                detectable=len(det), recall_detectable=ratio(tp_det, len(det)))


def ratio(a: int, b: int) -> Optional[float]:
    return float(a) / b if b else None


def quality_table(report: dict) -> str:
    """The report as a fixed-width text table."""
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    k = report["kinds"]
    lines = [f"review quality on {report['dataset']!r} ({report['gt_field']}): {report['samples']} samples, "
             f"{report['overall']['annotated']} annotated points; " + ", ".join(
                 f"{a}={b}" for a, b in report["settings"].items()),
             f"{'kind':<8}{'points':>8}{'checked':>9}{'flagged':>9}{'recall':>9}{'precision':>11}"
             f"{'detectable':>12}{'recall(det)':>13}"]
    c = k["clean"]
    lines.append(f"{'clean':<8}{c['points']:>8}{c['checked']:>9}{c['flagged']:>9}{'-':>9}{'-':>11}{'-':>12}{'-':>13}"
                 f"   flag rate {f(c['flag_rate'])}; {c['flagged_where_corrupted_elsewhere']} of the {c['flagged']} "
                 "at a keypoint corrupted in another sample")
    for kind in ("swap", "shift"):
        s = k[kind]
        lines.append(f"{kind:<8}{s['points']:>8}{s['checked']:>9}{s['flagged']:>9}{f(s['recall']):>9}"
                     f"{f(s['precision']):>11}{s['detectable']:>12}{f(s['recall_detectable']):>13}")
    d, o = k["drop"], report["overall"]
    lines.append(f"{'drop':<8}{d['points']:>8}{'-':>9}{'-':>9}{'n/a':>9}{'n/a':>11}{'-':>12}{'-':>13}"
                 "   (not visible: never flagged)")
    lines.append(f"{'overall':<8}{o['corrupted']:>8}{'':>9}{o['flagged']:>9}{f(o['recall']):>9}"
                 f"{f(o['precision']):>11}   (swapped + shifted; swap pairs: {report['swap_pairs_origin']})")
    return "\n".join(lines)


def main_review_quality(args) -> int:
    """``python -m fiftyone_sdcorr review-quality``: 0 on success; expected failures raise
    (the command line prints them as one line on stderr and exits 2). ``--out`` is
    checked before anything is imported or computed and written whole."""
    out = check_output_file("out", args.out) if args.out else None
    made = None
    try:
        if args.root:
            made = import_benchmark(args.format, args.root, args.split, name=f"sdcorr-rq-{uuid.uuid4().hex[:8]}",
                                    categories=args.categories, sample=args.sample, progress=False)
            ds, gt, box = made, args.gt_field or "keypoints", args.bbox_field or "detections"
        else:
            if not args.dataset or not fo.dataset_exists(args.dataset):
                raise ParameterError(f"--dataset: no dataset named {args.dataset!r} (or give --format and --root)")
            ds, gt, box = fo.load_dataset(args.dataset), args.gt_field or "keypoints", args.bbox_field
        kw = {k: getattr(args, k) for k in ("alpha", "min_confidence", "features_field", "embedding_field",
                                            "device", "preset", "sd_model", "dino_model", "batch_size")
              if getattr(args, k, None) is not None}
        report = measure_review_quality(ds, gt, corruptions=args.corruptions, rate=args.rate, shift=args.shift,
                                        seed=args.seed, bbox_field=box, flip=args.flip, progress=not args.no_progress,
                                        **kw)
    finally:
        if made is not None:
            made.delete()
    print(quality_table(report))
    if out is not None:
        write_text_atomic(out, json.dumps(report, indent=2))
        print(f"wrote {out}")
    return 0


__all__ = ["measure_review_quality", "quality_table", "score_flags", "corrupt_instance", "swap_pairs",
           "check_quality_args", "main_review_quality", "KINDS", "FUNCTION"]
