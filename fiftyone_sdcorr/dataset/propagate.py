"""``propagate_keypoints``: annotated references -> predicted ``fo.Keypoints`` on targets.

- **Output**: a NEW ``fo.Keypoints`` field ``output_field`` on the targets (an existing
  field only with ``overwrite=True``; never an input field); per-sample problems in
  ``<output_field>_error`` (``None`` when there was none).
- **Predicted keypoints**: each predicted ``fo.Keypoint`` keeps the reference instance's
  ``label`` and point order; ``confidence`` per point in ``[0, 1]``
  (``clamp(cosine, 0, 1) * exp(-(cycle_error / 2)^2)``); points below
  ``visibility_threshold`` are ``[nan, nan]``. Attributes ``sdcorr_reference_id``,
  ``sdcorr_reference_ids`` (per point), ``sdcorr_similarity``, ``sdcorr_instance``,
  ``sdcorr_flipped``.
- **Objects** (``patches_field``, a ``fo.Detections`` field, or a ``to_patches()`` view):
  each target object gets its own ``fo.Keypoint`` from the most similar reference object
  (the references' keypoint instances linked to their objects by ``instance`` or
  geometry), in image coordinates, with the object's label, ``sdcorr_detection_id`` (its
  detection's id) and the detection's ``instance`` when it has one. ``same_label``: only
  reference objects of the target's label. ``link_instances=True`` gives each target
  detection without an ``instance`` a new ``fo.Instance`` first (the only change ever
  made to the detections); off by default because FiftyOne's COCO exporter (1.22) fails
  on labels with an ``instance`` unless called with ``extra_attrs=False``.
- **References and matching rules**: :mod:`fiftyone_sdcorr.dataset.matching`. A reference
  (image, or reference object) is never a target: it is not predicted onto itself, and
  the summary counts it in ``references_skipped``.
- **Features**: :mod:`fiftyone_sdcorr.dataset.feature_source` (stored ones of one
  fingerprint; missing ones computed with the same configuration).
"""

from __future__ import annotations

import time
from typing import Optional

import fiftyone as fo

from fiftyone_sdcorr.dataset.config import FEATURE_FIELDS, FEATURE_PARAMS, PropagationConfig, flat_keywords, \
    merge_features
from fiftyone_sdcorr.dataset.engine import (
    Run,
    RunSummary,
    checks_done,
    declare_outputs,
    guard_outputs,
    image_collection,
    inputs_of as _inputs,
    reason,
    require_field,
)
from fiftyone_sdcorr.dataset.label_attrs import DETECTION_ID
from fiftyone_sdcorr.dataset.matching import (
    feature_source,
    in_image,
    predict_rows,
    prepare_matching,
    resolve_references,
    to_keypoints,
    without_references,
)
from fiftyone_sdcorr.dataset.progress import ProgressArg
from fiftyone_sdcorr.dataset.units import Units, by_sample, patches_field_of, sample_batches

FUNCTION = "propagate_keypoints"
DEFAULT_VISIBILITY_THRESHOLD = PropagationConfig.visibility_threshold


@flat_keywords(match=True)
def propagate_keypoints(
    targets,
    references,
    source_field: str,
    output_field: str,
    *,
    features=None,
    match=None,
    visibility_threshold: Optional[float] = None,
    patches_field: Optional[str] = None,
    link_instances: Optional[bool] = None,
    include_references: Optional[bool] = None,
    overwrite: Optional[bool] = None,
    progress: ProgressArg = None,
) -> RunSummary:
    """Propagates keypoints from annotated references to every target sample, or to every
    target object (``patches_field``, or a ``to_patches()`` view).

    Every keyword defaults to ``None``: the default of
    :class:`~fiftyone_sdcorr.dataset.config.PropagationConfig` /
    :class:`~fiftyone_sdcorr.dataset.config.MatchConfig`. Each setting of ``features`` and
    ``match`` may also be given as its own keyword (``flip=True``, ``sd_model=...``: the one
    shim, :func:`~fiftyone_sdcorr.dataset.config.flat_keywords`).

    Args:
        targets: a dataset or view of the samples to label.
        references: a view, a list of sample ids, or a sample tag; samples carrying
            ``fo.Keypoints`` in ``source_field``.
        source_field: the references' keypoints field (never written).
        output_field: the NEW ``fo.Keypoints`` field for the predictions.
        features: which features: a :class:`~fiftyone_sdcorr.dataset.config.FeatureConfig`
            or a dict of ``features_field``, ``embedding_field`` (the stored dense features
            and global vectors), and, only where features must be computed, ``method``,
            ``adapter``, ``extractor``, ``sd_model``, ``dino_model``, ``preset``,
            ``recipe``, ``pca_dim``, ``device``, ``dtype``, ``batch_size``, ``store_dir``;
            by default the configuration recorded on ``features_field`` by
            ``compute_fused_features`` (given ones must match it); ``batch_size`` is also
            the number of targets matched at once.
        match: a :class:`~fiftyone_sdcorr.dataset.config.MatchConfig` or a dict of its
            settings: ``soft_argmax``, ``soft_window`` (None: the method's), ``temperature``
            (window soft-argmax refinement); ``flip``, ``flip_pairs`` (flip alignment; pairs
            by index or skeleton label, default from the skeleton's ``left_*``/``right_*``
            labels); ``combine``, ``top_k`` (``"best"`` or ``"per_point"`` over the
            ``top_k`` most similar); ``same_label`` (objects).
        visibility_threshold: points with confidence below it become ``[nan, nan]``.
        patches_field, link_instances: per object (module docstring).
        include_references: also predict onto the references (default: they are skipped,
            counted in ``references_skipped``).
        overwrite: allow writing to an existing ``output_field``.
        progress: True/False/None (a progress bar; None: FiftyOne's setting) or
            ``callable(fraction, label)``.

    Returns:
        a :class:`RunSummary`: ``targets``, ``predicted``, ``failed``, ``errors``,
        ``warnings``, ``references_used``, ``output_field``, ``error_field``,
        ``flip_pairs``, ``seconds_matching``.
    """
    # 1. check every parameter and field before anything loads or is written
    given = merge_features(features, {}, FEATURE_PARAMS + FEATURE_FIELDS)
    cfg = PropagationConfig.build(
        source_field=source_field, output_field=output_field, features_field=given.get("features_field"),
        embedding_field=given.get("embedding_field"), visibility_threshold=visibility_threshold,
        batch_size=given.get("batch_size"), overwrite=overwrite, match=match,
        patches_field=patches_field_of(targets, patches_field) if hasattr(targets, "_root_dataset") else patches_field,
        link_instances=link_instances, include_references=include_references)
    ref_view = check_propagation(targets, references, cfg)
    source = feature_source(targets, cfg, given)
    checks_done()
    return _propagate(targets, ref_view, source_field, cfg, source, progress)


def _propagate(targets, ref_view, source_field: str, cfg: PropagationConfig, source, progress) -> RunSummary:
    """The run after its checks: references, then batches of targets."""
    # 2. references and their features (the models load only if features must be computed)
    summary = RunSummary(FUNCTION, ("targets", "predicted", "references_skipped"),
                         output_field=cfg.output_field,
                         error_field=cfg.error_field, combine=cfg.match.combine)
    units = Units(targets, cfg.patches_field)
    stored, embs = units.values(cfg.features_field), units.values(cfg.embedding_field)
    engine, source, problems = prepare_matching(targets, ref_view, source_field, cfg, source, summary, stored)
    # 3. predict batch by batch (a sample's objects in one batch), write in bulk, record problems per sample
    rows = without_references(list(zip(units.link_instances() if cfg.link_instances else units.units(), stored,
                                       embs)), engine.references, summary, cfg.include_references)
    summary["targets"], summary["seconds_matching"] = len(rows), 0.0
    with Run(targets, summary, len(rows), progress, "propagating", cfg.error_field) as run:
        declare_outputs(targets, _outputs(cfg))
        for batch in sample_batches(rows, cfg.batch_size):
            _propagate_batch(cfg, engine, source, batch, problems, run)
        for sid in set(problems) - {u.sample_id for u, _, _ in rows}:  # references that are not targets
            run.note(sid, "; ".join(problems[sid]))
    return summary


def _propagate_batch(cfg, engine, source, batch, problems, run: Run) -> None:
    """One batch of ``(unit, stored path, embedding)``: features, matches, one write."""
    feats = source.get([(u.id, u, st) for u, st, _ in batch])
    preds = _predict_batch(engine, [(u, feats.get(u.id), emb) for u, _, emb in batch], run)
    results = [(u, feats.get(u.id), preds.get(u.id)) for u, _, _ in batch]
    run.write(cfg.output_field, {sid: _record(cfg, sid, got, problems, run, source.margin)
                                 for sid, got in by_sample(results).items()})
    run.flush_errors()
    run.step(len(batch))


def check_propagation(targets, references, cfg: PropagationConfig):
    """Fields and views of a propagation, checked before anything is written; the
    references' view."""
    image_collection(targets, "targets")
    require_field(targets, "source_field", cfg.source_field, "keypoints")
    for param, kind in (("features_field", "string"), ("embedding_field", "vector")):
        name = getattr(cfg, param)
        if name and targets._root_dataset.has_sample_field(name):
            require_field(targets, param, name, kind)
    guard_outputs(targets, _outputs(cfg), _inputs(cfg, "source_field", "features_field", "embedding_field"),
                  cfg.overwrite)
    return resolve_references(targets, references)


def _outputs(cfg) -> dict:
    return {"output_field": (cfg.output_field, "keypoints"),
            "output_field (its error field)": (cfg.error_field, "string")}


def _predict_batch(engine, rows, run: Run) -> dict:
    """:func:`predict_rows` of one batch, its time counted in ``seconds_matching``."""
    t0 = time.perf_counter()
    out = predict_rows(engine, rows)
    run.summary["seconds_matching"] += time.perf_counter() - t0
    return out


def _record(cfg, sid, results, problems, run: Run, margin: float) -> Optional[fo.Keypoints]:
    """One target sample's keypoints from its units' ``(unit, features, predictions)``, or
    None with the failure recorded. Objects: one ``fo.Keypoint`` each, moved from the
    object's crop into the image, with the object's label and ``instance``."""
    msgs, out = list(problems.get(sid, [])), []
    for unit, features, preds in results:
        what = "target" if not unit.is_object else f"target object {unit.id} ({unit.label})"
        if features is None or isinstance(features, Exception):
            msgs.append(f"{what}: {reason(features) if features is not None else 'no features'}")
            continue
        if isinstance(preds, Exception):
            msgs.append(f"{what}: {reason(preds)}")
            continue
        kps = to_keypoints(in_image(unit, preds, margin), cfg.visibility_threshold).keypoints
        if unit.is_object:
            for kp in kps:
                kp.label, kp[DETECTION_ID] = unit.label, unit.id
                if unit.instance is not None:
                    kp.instance = fo.Instance(id=unit.instance)
        out += kps
        run.summary.add("predicted")
    if not out and any(f is None or isinstance(f, Exception) or isinstance(p, Exception) for _, f, p in results):
        run.fail(sid, "; ".join(msgs))
        return None
    if msgs:
        run.note(sid, "; ".join(msgs))
    else:
        run.ok(sid)
    return fo.Keypoints(keypoints=out)


__all__ = ["propagate_keypoints", "check_propagation", "DEFAULT_VISIBILITY_THRESHOLD", "FUNCTION"]
