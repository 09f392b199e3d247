"""Operators ``propagate_keypoints``, ``evaluate_keypoints`` and
``flag_keypoint_annotations``: thin glue over :mod:`fiftyone_sdcorr.propagation`,
:mod:`fiftyone_sdcorr.evaluation` and :mod:`fiftyone_sdcorr.review`.

Each can be called from Python like the ``@voxel51/brain`` operators::

    op = foo.get_operator("@sdcorr/sdcorr/propagate_keypoints")
    op(dataset, references=["..."], source_field="gt", output_field="pred", delegate=True)
"""

from __future__ import annotations

from typing import Sequence

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_sdcorr.plugin import common

REFERENCE_MODES = ("annotated", "tag", "selected", "ids")


# --------------------------------------------------------------------------- helpers
def _label_fields(ctx, doc_types) -> list:
    if ctx.dataset is None:
        return []
    fields = []
    for t in doc_types:
        fields.extend(ctx.dataset.get_field_schema(embedded_doc_type=t).keys())
    return sorted(set(fields))


def _field_choice(inputs, name, fields, label, description, required=True, default=None):
    if fields:
        choices = types.DropdownView()
        for f in fields:
            choices.add_choice(f, label=f)
        inputs.enum(name, choices.values(), required=required, label=label, description=description,
                    view=choices, default=default if default in fields else (fields[0] if required else None))
    else:
        inputs.str(name, required=required, label=label, description=description, default=default)


def _enum(inputs, name, values, default, label, description):
    choices = types.RadioGroup()
    for v in values:
        choices.add_choice(v, label=v)
    inputs.enum(name, choices.values(), default=default, required=False, label=label,
                description=description, view=choices)


def _references(ctx, source_field):
    """The reference samples from the params (see :data:`REFERENCE_MODES`)."""
    p = ctx.params
    mode = p.get("references") or "annotated"
    ds = ctx.dataset
    if mode == "ids":
        return [str(i) for i in (p.get("reference_ids") or [])]
    if mode == "tag":
        tag = p.get("reference_tag")
        if not tag:
            raise ValueError("references='tag' needs a reference_tag")
        return ds.match_tags(tag)
    if mode == "selected":
        if not ctx.selected:
            raise ValueError("references='selected' but no sample is selected")
        return list(ctx.selected)
    return ds.exists(source_field)


def _reference_inputs(ctx, inputs):
    _enum(inputs, "references", REFERENCE_MODES, "annotated", "References",
          "annotated: every sample with keypoints in the source field; tag: samples with a tag; "
          "selected: the selected samples; ids: the reference_ids param (from Python)")
    if ctx.params.get("references") == "tag":
        tags = ctx.dataset.distinct("tags") if ctx.dataset is not None else []
        _field_choice(inputs, "reference_tag", tags, "Reference tag", "Samples with this tag are references")


def _parse_alphas(v) -> list:
    if v is None or v == "":
        return [0.10, 0.05, 0.01]
    if isinstance(v, str):
        return [float(x) for x in v.replace(";", ",").split(",") if x.strip()]
    if isinstance(v, (int, float)):
        return [float(v)]
    return [float(x) for x in v]


def _reference_params(references):
    """Python ``references`` (None, a tag, ids, a view) -> operator params."""
    if references is None:
        return {"references": "annotated"}
    if isinstance(references, str):
        return {"references": "tag", "reference_tag": references}
    if hasattr(references, "values"):
        return {"references": "ids", "reference_ids": list(references.values("id"))}
    return {"references": "ids", "reference_ids": [str(i) for i in references]}


# --------------------------------------------------------------------------- propagate
class PropagateKeypoints(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="propagate_keypoints",
            label="Propagate keypoints (SD + DINOv2 correspondence)",
            description="Predict keypoints on target samples from annotated references",
            dynamic=True,
            execute_as_generator=True,
            **common.delegation_config(),
        )

    def __call__(self, sample_collection, source_field, output_field, references=None, *,
                 visibility_threshold=None, soft_argmax=True, flip=False, flip_pairs=None, combine="best",
                 top_k=3, features_field="sdcorr_features", embedding_field="sdcorr_embedding", store_dir=None,
                 sd_model=None, dino_model=None, device=None, dtype=None, batch_size=None, preset=None,
                 recipe=None, overwrite=False, delegate=False, delegation_target=None):
        """Runs the operator from Python (``delegate=True`` queues it). ``references``: None
        (annotated samples), a tag, sample ids or a view. Other arguments as in
        :func:`fiftyone_sdcorr.propagate_keypoints`."""
        params = common.model_params(sd_model, dino_model, device, dtype, batch_size, preset, recipe)
        params.update(_reference_params(references))
        params.update(source_field=source_field, output_field=output_field, soft_argmax=bool(soft_argmax),
                      flip=bool(flip), combine=combine, top_k=int(top_k), features_field=features_field,
                      embedding_field=embedding_field, overwrite=bool(overwrite))
        if visibility_threshold is not None:
            params["visibility_threshold"] = float(visibility_threshold)
        if flip_pairs is not None:
            params["flip_pairs"] = [list(p) for p in flip_pairs]
        if store_dir is not None:
            params["store_dir"] = str(store_dir)
        return common.call_operator(self, sample_collection, params, delegate, delegation_target)

    def resolve_delegation(self, ctx):
        return common.resolve_delegation(ctx)

    def resolve_input(self, ctx):
        from fiftyone_sdcorr.propagation import DEFAULT_VISIBILITY_THRESHOLD

        inputs = types.Object()
        target = common.target_view_input(ctx, inputs, action="Propagate to")
        _field_choice(inputs, "source_field", _label_fields(ctx, [fo.Keypoints]), "Source keypoints field",
                      "The references' annotations (never written)")
        _reference_inputs(ctx, inputs)
        inputs.str("output_field", default="sdcorr_keypoints", required=False, label="Output field",
                   description="A new fo.Keypoints field for the predictions")
        inputs.float("visibility_threshold", default=DEFAULT_VISIBILITY_THRESHOLD, min=0.0, max=1.0,
                     label="Visibility threshold", description="Points with lower confidence become NaN")
        _enum(inputs, "combine", ("best", "per_point"), "best", "Several references",
              "best: the most similar reference (global embedding); per_point: per point, the most "
              "confident of the top-k most similar references")
        inputs.int("top_k", default=3, min=1, label="Top k (per_point)")
        inputs.bool("soft_argmax", default=True, label="Window soft-argmax (sub-token)")
        inputs.bool("flip", default=False, label="Flip alignment",
                    description="Also match the mirrored reference (left/right pairs from the skeleton)")
        inputs.str("features_field", default="sdcorr_features", required=False, label="Stored features field")
        inputs.str("embedding_field", default="sdcorr_embedding", required=False, label="Embedding field")
        inputs.bool("overwrite", default=False, label="Overwrite an existing output field")
        common.model_inputs(ctx, inputs)
        if target is not None:
            inputs.view("count", types.Notice(label=f"{len(target)} target samples"))
        return types.Property(inputs, view=types.View(label="Propagate keypoints"))

    def execute(self, ctx):
        from fiftyone_sdcorr.propagation import DEFAULT_VISIBILITY_THRESHOLD, propagate_keypoints

        p = ctx.params
        source_field = p["source_field"]
        kwargs = common.model_kwargs(p)
        vt = p.get("visibility_threshold")
        kwargs.update(
            visibility_threshold=DEFAULT_VISIBILITY_THRESHOLD if vt is None else float(vt),
            soft_argmax=bool(p.get("soft_argmax", True)),
            flip=bool(p.get("flip", False)),
            flip_pairs=p.get("flip_pairs") or None,
            combine=p.get("combine") or "best",
            top_k=int(p.get("top_k") or 3),
            features_field=p.get("features_field") or None,
            embedding_field=p.get("embedding_field") or None,
            store_dir=p.get("store_dir") or None,
            overwrite=bool(p.get("overwrite", False)),
        )
        args = (common.get_target_view(ctx), _references(ctx, source_field), source_field,
                p.get("output_field") or "sdcorr_keypoints")
        return common.execute(ctx, propagate_keypoints, *args, **kwargs)

    def resolve_output(self, ctx):
        outputs = types.Object()
        for key in ("targets", "predicted", "failed"):
            outputs.int(key, label=key.capitalize())
        outputs.str("output_field", label="Output field")
        outputs.str("error_field", label="Error field")
        return types.Property(outputs, view=types.View(label="Keypoint propagation"))


# --------------------------------------------------------------------------- evaluate
class EvaluateKeypoints(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="evaluate_keypoints",
            label="Evaluate keypoints (PCK)",
            description="PCK of predicted keypoints against ground truth, stored as an evaluation run",
            dynamic=True,
            execute_as_generator=True,
            allow_delegated_execution=True,
            allow_immediate_execution=True,
            default_choice_to_delegated=False,
        )

    def __call__(self, sample_collection, pred_field, gt_field, *, eval_key="sdcorr_pck",
                 alphas: Sequence[float] = (0.10, 0.05, 0.01), bbox_field=None, threshold="bbox",
                 delegate=False, delegation_target=None):
        """Runs the operator from Python; arguments as in :func:`fiftyone_sdcorr.evaluate_keypoints`."""
        params = dict(pred_field=pred_field, gt_field=gt_field, eval_key=eval_key,
                      alphas=", ".join(f"{float(a):g}" for a in _parse_alphas(alphas)), threshold=threshold)
        if bbox_field:
            params["bbox_field"] = bbox_field
        return common.call_operator(self, sample_collection, params, delegate, delegation_target)

    def resolve_delegation(self, ctx):
        return common.resolve_delegation(ctx)

    def resolve_input(self, ctx):
        inputs = types.Object()
        target = common.target_view_input(ctx, inputs, action="Evaluate")
        kp_fields = _label_fields(ctx, [fo.Keypoints])
        _field_choice(inputs, "pred_field", kp_fields, "Predicted keypoints", "fo.Keypoints predictions",
                      default="sdcorr_keypoints")
        _field_choice(inputs, "gt_field", kp_fields, "Ground-truth keypoints", "fo.Keypoints ground truth")
        inputs.str("eval_key", default="sdcorr_pck", required=False, label="Evaluation key")
        inputs.str("alphas", default="0.1, 0.05, 0.01", required=False, label="Alphas",
                   description="Comma-separated PCK thresholds (the first is written per point)")
        _enum(inputs, "threshold", ("bbox", "image"), "bbox", "Threshold size",
              "bbox: the object's box (box field, else the extent of the ground-truth points); "
              "image: max(width, height)")
        box_fields = _label_fields(ctx, [fo.Detections, fo.Detection])
        _field_choice(inputs, "bbox_field", box_fields, "Box field (optional)",
                      "Detections giving the target object's box", required=False)
        if target is not None:
            inputs.view("count", types.Notice(label=f"{len(target)} samples"))
        return types.Property(inputs, view=types.View(label="Evaluate keypoints"))

    def execute(self, ctx):
        p = ctx.params
        kwargs = dict(eval_key=p.get("eval_key") or "sdcorr_pck", alphas=_parse_alphas(p.get("alphas")),
                      bbox_field=p.get("bbox_field") or None, threshold=p.get("threshold") or "bbox")
        args = (common.get_target_view(ctx), p["pred_field"], p["gt_field"])
        return common.execute(ctx, _evaluate_report, *args, **kwargs)

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("eval_key", label="Evaluation key")
        outputs.str("report", label="Report", view=types.CodeView(language="text"))
        return types.Property(outputs, view=types.View(label="PCK"))


def _evaluate_report(samples, pred_field, gt_field, progress=None, **kwargs):
    from fiftyone_sdcorr.evaluation import evaluate_keypoints

    results = evaluate_keypoints(samples, pred_field, gt_field, progress=progress, **kwargs)
    return {"eval_key": kwargs.get("eval_key"), "report": results.report_str(), **results.report()}


# --------------------------------------------------------------------------- review
class FlagKeypointAnnotations(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="flag_keypoint_annotations",
            label="Flag suspicious keypoint annotations",
            description="Leave-one-out correspondence check of every annotated point",
            dynamic=True,
            execute_as_generator=True,
            **common.delegation_config(),
        )

    def __call__(self, sample_collection, gt_field, references=None, *, tag="sdcorr:suspicious",
                 review_field="sdcorr_review", alpha=0.1, min_confidence=0.5, bbox_field=None,
                 threshold="bbox", combine="per_point", top_k=3, features_field="sdcorr_features",
                 embedding_field="sdcorr_embedding", store_dir=None, sd_model=None, dino_model=None,
                 device=None, dtype=None, batch_size=None, preset=None, recipe=None, overwrite=False,
                 delegate=False, delegation_target=None):
        """Runs the operator from Python; arguments as in
        :func:`fiftyone_sdcorr.flag_keypoint_annotations`."""
        params = common.model_params(sd_model, dino_model, device, dtype, batch_size, preset, recipe)
        params.update(_reference_params(references))
        params.update(gt_field=gt_field, tag=tag, review_field=review_field, alpha=float(alpha),
                      min_confidence=float(min_confidence), threshold=threshold, combine=combine,
                      top_k=int(top_k), features_field=features_field, embedding_field=embedding_field,
                      overwrite=bool(overwrite))
        if bbox_field:
            params["bbox_field"] = bbox_field
        if store_dir is not None:
            params["store_dir"] = str(store_dir)
        return common.call_operator(self, sample_collection, params, delegate, delegation_target)

    def resolve_delegation(self, ctx):
        return common.resolve_delegation(ctx)

    def resolve_input(self, ctx):
        inputs = types.Object()
        target = common.target_view_input(ctx, inputs, action="Review")
        _field_choice(inputs, "gt_field", _label_fields(ctx, [fo.Keypoints]), "Annotations",
                      "fo.Keypoints field to review (never written)")
        _reference_inputs(ctx, inputs)
        inputs.str("tag", default="sdcorr:suspicious", required=False, label="Tag for flagged samples")
        inputs.str("review_field", default="sdcorr_review", required=False, label="Review field",
                   description="New fo.Keypoints field with per-point flags and evidence")
        inputs.float("alpha", default=0.1, min=0.0, label="Alpha",
                     description="Flag points farther than alpha x object size from the evidence")
        inputs.float("min_confidence", default=0.5, min=0.0, max=1.0, label="Minimum evidence confidence")
        _enum(inputs, "combine", ("best", "per_point"), "per_point", "Evidence", "As in propagate_keypoints")
        inputs.int("top_k", default=3, min=1, label="Top k (per_point)")
        box_fields = _label_fields(ctx, [fo.Detections, fo.Detection])
        _field_choice(inputs, "bbox_field", box_fields, "Box field (optional)", "Object boxes", required=False)
        inputs.str("features_field", default="sdcorr_features", required=False, label="Stored features field")
        inputs.str("embedding_field", default="sdcorr_embedding", required=False, label="Embedding field")
        inputs.bool("overwrite", default=False, label="Overwrite an existing review field")
        common.model_inputs(ctx, inputs)
        if target is not None:
            inputs.view("count", types.Notice(label=f"{len(target)} samples"))
        return types.Property(inputs, view=types.View(label="Flag keypoint annotations"))

    def execute(self, ctx):
        from fiftyone_sdcorr.review import flag_keypoint_annotations

        p = ctx.params
        gt_field = p["gt_field"]
        kwargs = common.model_kwargs(p)
        refs = None if (p.get("references") or "annotated") == "annotated" else _references(ctx, gt_field)
        kwargs.update(
            references=refs, tag=p.get("tag") or "sdcorr:suspicious",
            review_field=p.get("review_field") or "sdcorr_review",
            alpha=float(p.get("alpha") or 0.1),
            min_confidence=float(p["min_confidence"]) if p.get("min_confidence") is not None else 0.5,
            bbox_field=p.get("bbox_field") or None, threshold=p.get("threshold") or "bbox",
            combine=p.get("combine") or "per_point", top_k=int(p.get("top_k") or 3),
            features_field=p.get("features_field") or None, embedding_field=p.get("embedding_field") or None,
            store_dir=p.get("store_dir") or None, overwrite=bool(p.get("overwrite", False)),
        )
        return common.execute(ctx, flag_keypoint_annotations, common.get_target_view(ctx), gt_field, **kwargs)

    def resolve_output(self, ctx):
        outputs = types.Object()
        for key in ("checked", "points_checked", "flagged_points"):
            outputs.int(key, label=key.replace("_", " ").capitalize())
        outputs.str("tag", label="Tag")
        return types.Property(outputs, view=types.View(label="Annotation review"))


OPERATORS = [PropagateKeypoints, EvaluateKeypoints, FlagKeypointAnnotations]
