"""Annotation review: flag keypoint annotations that disagree with the correspondence evidence.

For every annotated sample, each of its ground-truth points is predicted from the OTHER
annotated references (leave-one-out, with the propagation engine of
:mod:`fiftyone_sdcorr.propagation`). A point is **suspicious** when

- it is visible in the annotation and the evidence predicts it (a valid match), and
- the evidence is confident: ``confidence >= min_confidence``, and
- the annotation is far from the evidence: ``distance > alpha * T``, with ``T`` the
  threshold size of :mod:`fiftyone_sdcorr.evaluation` (the object's box from
  ``bbox_field``, else the extent of the annotated points; or the image size with
  ``threshold="image"``).

Ground-truth and predicted instances are paired by label and order (as in evaluation).

Written (the ground-truth field itself is never modified):
- ``review_field`` (new ``fo.Keypoints``, default ``"sdcorr_review"``): a copy of each
  reviewed ground-truth instance (same label and points) with per-point attributes
  ``sdcorr_suspicious`` (True / False; None where the point could not be checked),
  ``sdcorr_evidence`` (the predicted ``[x, y]``), ``sdcorr_evidence_confidence``,
  ``sdcorr_distance`` (``distance / T``) and ``sdcorr_reference_ids``;
- ``<review_field>_error``: per-sample problems (None when there was none);
- the sample tag ``tag`` (default ``"sdcorr:suspicious"``) on samples with at least one
  suspicious point.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional

import numpy as np

import fiftyone as fo

from fiftyone_sdcorr.evaluation import THRESHOLDS, _box_size, _extent, _pair_instances, _points
from fiftyone_sdcorr.progress import Progress, ProgressArg
from fiftyone_sdcorr.propagation import (
    FeatureSource,
    Propagator,
    _err,
    _has_field,
    _locate_store,
    _unit,
    _values_or_none,
    check_output_field,
    load_references,
    resolve_flip_pairs,
    resolve_references,
)

logger = logging.getLogger(__name__)

DEFAULT_TAG = "sdcorr:suspicious"


def flag_keypoint_annotations(
    samples,
    gt_field: str,
    *,
    references=None,
    tag: str = DEFAULT_TAG,
    review_field: str = "sdcorr_review",
    alpha: float = 0.1,
    min_confidence: float = 0.5,
    bbox_field: Optional[str] = None,
    threshold: str = "bbox",
    combine: str = "per_point",
    top_k: int = 3,
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
    soft_argmax: bool = True,
    flip: bool = False,
    flip_pairs=None,
    overwrite: bool = False,
    progress: ProgressArg = True,
) -> dict:
    """Flags annotated points far from confident leave-one-out correspondence evidence.

    Args:
        samples: a dataset or view; its samples with keypoints in ``gt_field`` are checked.
        gt_field: the annotations (``fo.Keypoints``), never written.
        references: the evidence (view, sample ids or tag); default: the annotated
            samples of ``samples``. A sample is never its own evidence.
        tag: sample tag added to samples with a suspicious point.
        review_field: new ``fo.Keypoints`` field for the per-point review.
        alpha, min_confidence: the flagging rule (module docstring).
        bbox_field, threshold: threshold size, as in :func:`evaluate_keypoints`.
        combine, top_k, soft_argmax, flip, flip_pairs: as in :func:`propagate_keypoints`
            (``"per_point"`` by default: each point from the most confident of the
            ``top_k`` most similar references).
        extractor, sd_model, ..., store_dir: features, as in :func:`propagate_keypoints`.
        overwrite: allow an existing ``review_field``; the tag is then first removed from
            the checked samples.
        progress: True/False or ``callable(fraction, label)``.

    Returns:
        ``{"checked", "points_checked", "flagged_points", "flagged_samples" (ids),
        "suspicious" ({id: [{"instance", "point", "label", "distance", "confidence",
        "evidence"}]}), "errors" ({id: message}), "review_field", "tag"}``.
    """
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
    if not (alpha > 0):
        raise ValueError(f"alpha must be positive, got {alpha}")
    root = samples._root_dataset
    if not _has_field(samples, gt_field):
        raise ValueError(f"gt_field {gt_field!r} does not exist on dataset {root.name!r}")
    error_field = f"{review_field}_error"
    protected = [gt_field, features_field, embedding_field, bbox_field]
    check_output_field(samples, review_field, protected, overwrite)
    check_output_field(samples, error_field, protected, overwrite)

    annotated = samples.exists(gt_field)
    if references is None:
        ref_view = annotated
    else:
        ref_view = resolve_references(samples, references)
    if len(annotated) == 0:
        raise ValueError(f"no sample of the collection has keypoints in {gt_field!r}")
    if len(ref_view) < 2 and references is None:
        raise ValueError("leave-one-out review needs at least 2 annotated samples")

    pairs, _ = resolve_flip_pairs(samples, gt_field, flip_pairs) if flip else ([], "off")
    model_kw = dict(sd_model=sd_model, dino_model=dino_model, device=device, dtype=dtype,
                    batch_size=batch_size, preset=preset, recipe=recipe)
    source = FeatureSource(extractor, model_kw, store_dir=store_dir, batch_size=batch_size or 8)
    _locate_store(source, samples, _values_or_none(annotated, features_field, len(annotated))
                  + _values_or_none(ref_view, features_field, len(ref_view)))
    refs, problems = load_references(ref_view, gt_field, source, features_field=features_field,
                                     embedding_field=embedding_field, flip=flip)
    if not refs:
        raise ValueError("no usable reference annotation to compare against")
    engine = Propagator(refs, combine=combine, top_k=top_k, soft_argmax=soft_argmax, flip=flip,
                        flip_pairs=pairs)
    ref_feats = {r.id: r for r in refs}

    ids = annotated.values("id")
    fps = annotated.values("filepath")
    gts = annotated.values(gt_field)
    stored = _values_or_none(annotated, features_field, len(ids))
    embs = _values_or_none(annotated, embedding_field, len(ids))
    boxes = annotated.values(bbox_field) if bbox_field else [None] * len(ids)

    if not root.has_sample_field(review_field):
        root.add_sample_field(review_field, fo.EmbeddedDocumentField, embedded_doc_type=fo.Keypoints)
    if not root.has_sample_field(error_field):
        root.add_sample_field(error_field, fo.StringField)
    if overwrite and tag:
        annotated.untag_samples(tag)

    values: Dict[str, Optional[fo.Keypoints]] = {}
    errors: Dict[str, str] = {}
    suspicious: Dict[str, List[dict]] = {}
    n_points = n_flagged = 0
    chunk = max(1, int(batch_size or 8))
    bar = Progress(progress, len(ids), "reviewing")
    try:
        for start in range(0, len(ids), chunk):
            sl = slice(start, start + chunk)
            need = [(sid, fp, st) for sid, fp, st in zip(ids[sl], fps[sl], stored[sl]) if sid not in ref_feats]
            got = source.get(need) if need else {}
            for sid, gt, emb, box in zip(ids[sl], gts[sl], embs[sl], boxes[sl]):
                bar.update(1)
                msgs = [m for m in problems.get(sid, [])]
                feat = ref_feats[sid].features if sid in ref_feats else got.get(sid)
                if isinstance(feat, Exception) or feat is None:
                    msgs.append(f"target: {_err(feat) if feat is not None else 'no features'}")
                    errors[sid] = "; ".join(msgs)
                    values[sid] = None
                    continue
                try:
                    preds = engine.predict(feat, _unit(emb), exclude=sid)
                except Exception as e:  # noqa: BLE001
                    msgs.append(f"target: {_err(e)}")
                    errors[sid] = "; ".join(msgs)
                    values[sid] = None
                    continue
                w, h = feat.letterbox.width, feat.letterbox.height
                scale = np.array([w, h], dtype=np.float64)
                gk = list(gt.keypoints or [])
                pk = [fo.Keypoint(label=p.label) for p in preds]
                paired = dict((j, i) for i, j in _pair_instances(pk, gk))
                out = []
                for j, g_kp in enumerate(gk):
                    g_n = _points(g_kp)
                    k = len(g_n)
                    flags: List[Optional[bool]] = [None] * k
                    evid: List[Optional[list]] = [None] * k
                    confs: List[Optional[float]] = [None] * k
                    dists: List[Optional[float]] = [None] * k
                    rids: List[Optional[str]] = [None] * k
                    i = paired.get(j)
                    g_px = g_n * scale
                    if threshold == "image":
                        T = float(max(w, h))
                    else:
                        T = _box_size(box, g_kp.label, g_px, w, h) if bbox_field else None
                        T = T if T is not None else _extent(g_px)
                    if i is not None and T:
                        p = preds[i]
                        for q in range(min(k, len(p.points))):
                            if not np.isfinite(g_n[q]).all() or not np.isfinite(p.points[q]).all():
                                continue
                            d = float(np.linalg.norm((p.points[q] - g_n[q]) * scale) / T)
                            c = float(p.confidence[q])
                            flag = bool(c >= min_confidence and d > alpha)
                            flags[q], evid[q], confs[q], dists[q], rids[q] = (
                                flag, [float(x) for x in p.points[q]], c, d, p.reference_ids[q])
                            n_points += 1
                            if flag:
                                n_flagged += 1
                                suspicious.setdefault(sid, []).append({
                                    "instance": j, "point": q, "label": g_kp.label, "distance": d,
                                    "confidence": c, "evidence": evid[q],
                                })
                    elif i is None:
                        msgs.append(f"instance {j} ({g_kp.label}): no evidence instance with this label")
                    out.append(fo.Keypoint(
                        label=g_kp.label, points=[list(map(float, xy)) if xy is not None else None
                                                  for xy in (g_kp.points or [])],
                        sdcorr_suspicious=flags, sdcorr_evidence=evid, sdcorr_evidence_confidence=confs,
                        sdcorr_distance=dists, sdcorr_reference_ids=rids,
                    ))
                values[sid] = fo.Keypoints(keypoints=out)
                if msgs:
                    errors[sid] = "; ".join(msgs)
            done = {k: v for k, v in values.items() if k in set(ids[sl])}
            if done:
                root.set_values(review_field, done, key_field="id")
        root.set_values(error_field, {sid: errors.get(sid) for sid in ids}, key_field="id")
        if suspicious and tag:
            root.select(list(suspicious)).tag_samples(tag)
    finally:
        bar.close()

    return {
        "checked": len(ids),
        "points_checked": n_points,
        "flagged_points": n_flagged,
        "flagged_samples": sorted(suspicious),
        "suspicious": suspicious,
        "errors": errors,
        "review_field": review_field,
        "error_field": error_field,
        "tag": tag,
        "alpha": alpha,
        "min_confidence": min_confidence,
    }


__all__ = ["flag_keypoint_annotations", "DEFAULT_TAG"]
