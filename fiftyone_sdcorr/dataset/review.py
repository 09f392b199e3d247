"""Annotation review: flag keypoint annotations that disagree with the correspondence evidence.

For every annotated sample, each of its ground-truth points is predicted from the OTHER
annotated references (leave-one-out, with the propagation engine of
:mod:`fiftyone_sdcorr.dataset.propagate`). A point is **suspicious** when

- it is visible in the annotation and the evidence predicts it (a valid match), and
- the evidence is confident: ``confidence >= min_confidence``, and
- the annotation is far from the evidence: ``distance > alpha * T``, with ``T`` the
  threshold size of :mod:`fiftyone_sdcorr.dataset.evaluate` (the object's box from
  ``bbox_field``, else the extent of the annotated points; or the image size with
  ``threshold="image"``).

Ground-truth and evidence instances are paired as in evaluation, never by list order:
:func:`fiftyone_sdcorr.dataset.pck.match_instances` (FiftyOne ``instance`` links, then
an optimal assignment on an OKS-like cost among instances of the same label). Only the
annotation's visible points are checked (finite, and not ``visible`` 0 / False).

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

from typing import List, NamedTuple, Optional

import numpy as np

import fiftyone as fo

from fiftyone_sdcorr.dataset import label_attrs as attrs
from fiftyone_sdcorr.dataset.config import FEATURE_FIELDS, FEATURE_PARAMS, ReviewConfig, flat_keywords, \
    merge_features
from fiftyone_sdcorr.dataset.engine import (
    ParameterError,
    Run,
    RunSummary,
    checks_done,
    declare_outputs,
    guard_outputs,
    image_collection,
    inputs_of as _inputs,
    reason,
    require_field,
    values_or_none,
)
from fiftyone_sdcorr.dataset.matching import (
    feature_source,
    in_image,
    predict_rows,
    prepare_matching,
    resolve_references,
)
from fiftyone_sdcorr.dataset.pck import image_size_of, instance_id, match_instances, points_of, threshold_size
from fiftyone_sdcorr.dataset.progress import ProgressArg
from fiftyone_sdcorr.dataset.units import Units, by_sample, patches_field_of, sample_batches

FUNCTION = "flag_keypoint_annotations"
DEFAULT_TAG = ReviewConfig.tag


class Labels(NamedTuple):
    """What one annotated sample is reviewed against."""

    gt: fo.Keypoints
    boxes: Optional[fo.Detections]  # of ``bbox_field``, else of the objects reviewed
    metadata: Optional[fo.Metadata]


class PointReview(NamedTuple):
    """The check of one annotated point against its evidence."""

    suspicious: bool
    evidence: List[float]  # the predicted [x, y]
    confidence: float
    distance: float  # distance / T
    reference_id: Optional[str]


@flat_keywords(match=True)
def flag_keypoint_annotations(
    samples,
    gt_field: str,
    *,
    references=None,
    tag: Optional[str] = ReviewConfig.tag,  # None is a value here: no tag
    review_field: Optional[str] = None,
    alpha: Optional[float] = None, min_confidence: Optional[float] = None,
    bbox_field: Optional[str] = None, threshold: Optional[str] = None,
    features=None,
    match=None,
    patches_field: Optional[str] = None,
    overwrite: Optional[bool] = None,
    progress: ProgressArg = None,
) -> RunSummary:
    """Flags annotated points far from confident leave-one-out correspondence evidence.

    Keywords default to ``None``: the default of
    :class:`~fiftyone_sdcorr.dataset.config.ReviewConfig` (its ``match``: ``combine="per_point"``),
    except ``tag``, where ``None`` means "no tag".

    Args:
        samples: a dataset or view; its samples with keypoints in ``gt_field`` are checked.
        gt_field: the annotations (``fo.Keypoints``), never written.
        references: the evidence (view, sample ids or tag); default: the annotated
            samples of ``samples``. A sample is never its own evidence.
        tag: sample tag added to samples with a suspicious point (None: no tag).
        review_field: new ``fo.Keypoints`` field for the per-point review.
        alpha, min_confidence: the flagging rule (module docstring).
        bbox_field, threshold: threshold size, as in :func:`evaluate_keypoints`.
        features, match: the features and the matching, as in :func:`propagate_keypoints`
            (each setting may also be given as its own keyword: ``flip=True``, ...).
        patches_field: a ``fo.Detections`` field (or a ``to_patches()`` view): the evidence
            is predicted per object, from reference objects of other samples, and paired
            with the annotations by geometry; the objects' boxes are the default
            ``bbox_field``.
        overwrite: allow an existing ``review_field`` (the tag is first removed).
        progress: True/False/None or ``callable(fraction, label)``.

    Returns:
        a :class:`RunSummary`: ``checked``, ``points_checked``, ``flagged_points``,
        ``flagged_samples``, ``suspicious`` ({id: [{"instance", "point", "label",
        "distance", "confidence", "evidence"}]}), ``failed``, ``errors``, ``warnings``.
    """
    # 1. check every parameter and field before anything loads or is written
    given = merge_features(features, {}, FEATURE_PARAMS + FEATURE_FIELDS)
    cfg = ReviewConfig.build(
        gt_field=gt_field, review_field=review_field, tag=tag, alpha=alpha, min_confidence=min_confidence,
        bbox_field=bbox_field, threshold=threshold, features_field=given.get("features_field"),
        embedding_field=given.get("embedding_field"), batch_size=given.get("batch_size"), overwrite=overwrite,
        match=match,
        patches_field=patches_field_of(samples, patches_field) if hasattr(samples, "_root_dataset") else patches_field)
    annotated, ref_view = check_review(samples, references, cfg)
    source = feature_source(annotated, cfg, given)
    checks_done()
    return _review(samples, annotated, ref_view, cfg, source, progress)


def _review(samples, annotated, ref_view, cfg: ReviewConfig, source, progress) -> RunSummary:
    """The run after its checks: the evidence, then batches of annotated samples."""
    # 2. the evidence: references and their features
    summary = RunSummary(FUNCTION, ("checked", "points_checked", "flagged_points"), review_field=cfg.review_field,
                         error_field=cfg.error_field, tag=cfg.tag, alpha=cfg.alpha, min_confidence=cfg.min_confidence,
                         suspicious={})
    units = Units(annotated, cfg.patches_field)
    rows = list(zip(units.units(), units.values(cfg.features_field), units.values(cfg.embedding_field)))
    engine, source, problems = prepare_matching(annotated, ref_view, cfg.gt_field, cfg, source, summary,
                                                [st for _, st, _ in rows])
    refs = {r.id: r for r in engine.references}
    labels = _labels(annotated, cfg)
    # 3. review batch by batch (a sample's objects together), write in bulk, tag the suspicious samples
    with Run(samples, summary, len(rows), progress, "reviewing", cfg.error_field) as run:
        declare_outputs(samples, _outputs(cfg))
        if cfg.overwrite and cfg.tag:
            annotated.untag_samples(cfg.tag)
        for batch in sample_batches(rows, cfg.batch_size):
            _review_batch(cfg, engine, source, refs, labels, batch, problems, run)
        if summary["suspicious"] and cfg.tag:
            samples._root_dataset.select(list(summary["suspicious"])).tag_samples(cfg.tag)
    summary["flagged_samples"] = sorted(summary["suspicious"])
    return summary


def _review_batch(cfg, engine, source, refs, labels, batch, problems, run: Run) -> None:
    """One batch of ``(unit, stored path, embedding)``: leave-one-out evidence, one write."""
    need = [(u.id, u, st) for u, st, _ in batch if u.id not in refs]
    got = source.get(need) if need else {}
    feats = {u.id: refs[u.id].features if u.id in refs else got.get(u.id) for u, _, _ in batch}
    preds = predict_rows(engine, [(u, feats[u.id], emb) for u, _, emb in batch], leave_out_self=True)
    run.write(cfg.review_field, {
        sid: _review_sample(cfg, sid, labels[sid], [(u, feats[u.id], preds.get(u.id)) for u, _, _ in group],
                            problems, run, source.margin)
        for sid, group in by_sample(batch).items()})
    run.flush_errors()
    run.step(len(batch))


def check_review(samples, references, cfg: ReviewConfig):
    """Fields and views of a review, checked before anything is written; the annotated
    samples and the evidence view."""
    image_collection(samples)
    samples = Units(samples, cfg.patches_field).samples  # a patches view: its source samples
    require_field(samples, "gt_field", cfg.gt_field, "keypoints")
    if cfg.bbox_field is not None:
        require_field(samples, "bbox_field", cfg.bbox_field, "detections")
    guard_outputs(samples, _outputs(cfg), _inputs(cfg, "gt_field", "features_field", "embedding_field", "bbox_field"),
                  cfg.overwrite)
    annotated = samples.exists(cfg.gt_field)
    if len(annotated) == 0:
        raise ParameterError(f"parameter 'gt_field': no sample of the collection has keypoints in {cfg.gt_field!r}")
    ref_view = annotated if references is None else resolve_references(samples, references)
    if references is None and len(ref_view) < 2:
        raise ParameterError(f"parameter 'gt_field': leave-one-out review needs at least 2 samples annotated in "
                             f"{cfg.gt_field!r}")
    return annotated, ref_view


def _labels(annotated, cfg: ReviewConfig) -> dict:
    """``{sample id: Labels}``; the boxes of ``bbox_field``, else of the objects reviewed."""
    n = len(annotated)
    boxes = cfg.bbox_field or cfg.patches_field
    return {sid: Labels(*rest) for sid, *rest in zip(annotated.values("id"), annotated.values(cfg.gt_field),
                                                     values_or_none(annotated, boxes, n), annotated.values("metadata"))}


def _outputs(cfg) -> dict:
    return {"review_field": (cfg.review_field, "keypoints"),
            "review_field (its error field)": (cfg.error_field, "string")}


def _review_sample(cfg, sid, labels: Labels, results, problems, run: Run, margin: float) -> Optional[fo.Keypoints]:
    """The review of one annotated sample from its units' ``(unit, features, evidence or
    the exception predicting it raised)``, or None with the failure recorded. Objects'
    evidence is moved from their crops into the image, then paired with the annotations."""
    msgs, preds, failed = list(problems.get(sid, [])), [], False
    for unit, feat, got in results:
        what = "target" if not unit.is_object else f"target object {unit.id} ({unit.label})"
        bad = feat if feat is None or isinstance(feat, Exception) else got if isinstance(got, Exception) else False
        if bad is not False:
            msgs.append(f"{what}: {reason(bad) if bad is not None else 'no features'}")
            failed = True
            continue
        preds += in_image(unit, got, margin)
    if failed and not preds:
        run.fail(sid, "; ".join(msgs))
        return None
    run.summary.add("checked")
    gt, box, metadata = labels
    w, h = (results[0][1].letterbox.width, results[0][1].letterbox.height) if not results[0][0].is_object else \
        image_size_of(results[0][0].filepath, metadata)
    scale = np.array([w, h], dtype=np.float64)
    gk = list(gt.keypoints or [])
    paired = {j: i for i, j in match_instances(preds, gk, w, h, box)}
    out = []
    for j, g_kp in enumerate(gk):
        i = paired.get(j)
        if i is None:
            why = ("no evidence instance matches it" if any(p.label == g_kp.label for p in preds)
                   else "no evidence instance with this label")
            msgs.append(f"instance {j} ({g_kp.label}): {why}")
        out.append(_review_instance(cfg, sid, j, g_kp, preds[i] if i is not None else None, scale, box, run))
    if msgs:
        run.note(sid, "; ".join(msgs))
    else:
        run.ok(sid)
    return fo.Keypoints(keypoints=out)


def _review_instance(cfg, sid, j, g_kp, pred, scale, box, run: Run) -> fo.Keypoint:
    """A copy of annotated instance ``j`` with the review of each of its points."""
    g_n = points_of(g_kp)
    T = threshold_size(cfg.threshold, box, g_kp.label, g_n * scale,
                       int(scale[0]), int(scale[1]), instance_id(g_kp))
    checked: List[Optional[PointReview]] = [None] * len(g_n)
    if pred is not None and T:
        for q in range(min(len(g_n), len(pred.points))):
            if not np.isfinite(g_n[q]).all() or not np.isfinite(pred.points[q]).all():
                continue
            d = float(np.linalg.norm((pred.points[q] - g_n[q]) * scale) / T)
            c = float(pred.confidence[q])
            checked[q] = r = PointReview(bool(c >= cfg.min_confidence and d > cfg.alpha),
                                         [float(x) for x in pred.points[q]], c, d, pred.reference_ids[q])
            run.summary.add("points_checked")
            if r.suspicious:
                run.summary.add("flagged_points")
                run.summary["suspicious"].setdefault(sid, []).append({
                    "instance": j, "point": q, "label": g_kp.label, "distance": d, "confidence": c,
                    "evidence": r.evidence})

    def column(name):
        return [getattr(r, name) if r is not None else None for r in checked]

    return fo.Keypoint(
        label=g_kp.label, points=[list(map(float, xy)) if xy is not None else None for xy in (g_kp.points or [])],
        **{attrs.SUSPICIOUS: column("suspicious"), attrs.EVIDENCE: column("evidence"),
           attrs.EVIDENCE_CONFIDENCE: column("confidence"), attrs.DISTANCE: column("distance"),
           attrs.REFERENCE_IDS: column("reference_id")},
    )


__all__ = ["flag_keypoint_annotations", "check_review", "Labels", "PointReview", "DEFAULT_TAG", "FUNCTION"]
