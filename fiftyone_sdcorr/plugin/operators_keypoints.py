"""Operators ``propagate_keypoints``, ``evaluate_keypoints`` and
``flag_keypoint_annotations``: thin glue over :mod:`fiftyone_sdcorr.dataset.propagate`,
:mod:`fiftyone_sdcorr.dataset.evaluate` and :mod:`fiftyone_sdcorr.dataset.review`.

Each can be called from Python like the ``@voxel51/brain`` operators::

    op = foo.get_operator("@sdcorr/sdcorr/propagate_keypoints")
    op(dataset, references=["..."], source_field="gt", output_field="pred", delegate=True)
"""

from __future__ import annotations

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_sdcorr.dataset.config import (
    COMBINE_RULES,
    KEYPOINTS_FIELD,
    THRESHOLDS,
    EvaluationConfig,
    MatchConfig,
    PropagationConfig,
    ReviewConfig,
)
from fiftyone_sdcorr.dataset.engine import ParameterError
from fiftyone_sdcorr.plugin import common
from fiftyone_sdcorr.plugin.field_roles import default_fields, free_field_name, last_evaluation
from fiftyone_sdcorr.plugin.references import (
    choice_input,
    label_fields,
    reference_inputs,
    reference_params,
    references_from,
)



# --------------------------------------------------------------------------- helpers
def _roles(ctx) -> dict:
    """The dataset's keypoint fields by role (the match panel's defaults): the tagged
    references' annotations, the newest predicted field, the ground truth."""
    return default_fields(ctx.dataset) if ctx.dataset is not None else {}


def _enum(inputs, name, values, default, label, description):
    choice_input(inputs, name, values, label, description, required=False, default=default, radio=True)


def _parse_alphas(v):
    """The form's comma-separated alphas -> a list of numbers (lists pass as they are)."""
    if not isinstance(v, str):
        return v
    try:
        return [float(x) for x in v.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise ParameterError(f"parameter 'alphas' must be numbers separated by commas, got {v!r}") from None


# --------------------------------------------------------------------------- propagate
class PropagateKeypoints(common.RunOperator):
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

    def __call__(self, sample_collection, source_field, output_field, references=None, *, delegate=False,
                 delegation_target=None, **kwargs):
        """Runs the operator from Python (``delegate=True`` queues it). ``references``: None
        (annotated samples), a tag, sample ids or a view. Other keywords as in
        :func:`fiftyone_sdcorr.propagate_keypoints`."""
        return common.call_operator(self, sample_collection, delegate, delegation_target,
                                    source_field=source_field, output_field=output_field,
                                    **reference_params(references), **kwargs)

    def resolve_input(self, ctx):
        inputs = types.Object()
        target = common.target_view_input(ctx, inputs, action="Propagate to")
        roles = _roles(ctx)
        choice_input(inputs, "source_field", label_fields(ctx, [fo.Keypoints]), "Source keypoints field",
                      "The references' annotations (never written)", default=roles.get("ref_field"))
        reference_inputs(ctx, inputs, "keypoints")
        inputs.str("output_field", default=free_field_name(ctx.dataset) if ctx.dataset is not None else None,
                   required=False, label="Output field", description="A new fo.Keypoints field for the predictions")
        inputs.float("visibility_threshold", default=PropagationConfig.visibility_threshold,
                     **common.bounds("visibility_threshold"), label="Visibility threshold",
                     description="Points with lower confidence become NaN")
        _enum(inputs, "combine", COMBINE_RULES, MatchConfig.combine, "Several references",
              "best: the most similar reference (global embedding); per_point: per point, the most "
              "confident of the top-k most similar references")
        inputs.int("top_k", default=MatchConfig.top_k, **common.bounds("top_k"), label="Top k (per_point)")
        inputs.bool("soft_argmax", default=MatchConfig.soft_argmax, label="Window soft-argmax (sub-token)")
        inputs.bool("flip", default=MatchConfig.flip, label="Flip alignment",
                    description="Also match the mirrored reference (left/right pairs from the skeleton)")
        inputs.str("features_field", default=PropagationConfig.features_field, required=False,
                   label="Stored features field")
        inputs.str("embedding_field", default=PropagationConfig.embedding_field, required=False,
                   label="Embedding field")
        common.patches_input(ctx, inputs, target)
        inputs.bool("same_label", default=MatchConfig.same_label, required=False, label="Same label only",
                    description="Objects: match each target object to reference objects of its label")
        inputs.bool("overwrite", default=PropagationConfig.overwrite, label="Overwrite an existing output field")
        common.model_inputs(ctx, inputs, follow=False, advanced=False)
        if target is not None:
            inputs.view("count", types.Notice(label=f"{len(target)} target samples"))
        self.finish_form(ctx, inputs)
        return types.Property(inputs, view=types.View(label="Propagate keypoints"))

    def run_call(self, ctx):
        from fiftyone_sdcorr.dataset.propagate import propagate_keypoints

        p = ctx.params
        kwargs = common.function_kwargs(p, propagate_keypoints, positional=("source_field", "output_field"))
        args = (common.get_target_view(ctx), references_from(ctx, p.get("source_field")), p.get("source_field"),
                p.get("output_field") or KEYPOINTS_FIELD)
        return propagate_keypoints, args, kwargs

    def resolve_output(self, ctx):
        outputs = types.Object()
        for key in ("targets", "predicted", "failed"):
            outputs.int(key, label=key.capitalize())
        outputs.str("output_field", label="Output field")
        outputs.str("error_field", label="Error field")
        return types.Property(outputs, view=types.View(label="Keypoint propagation"))


# --------------------------------------------------------------------------- evaluate
class EvaluateKeypoints(common.RunOperator):
    delegate_large = False  # no model: immediate by default

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

    def __call__(self, sample_collection, pred_field, gt_field, *, delegate=False, delegation_target=None,
                 **kwargs):
        """Runs the operator from Python; keywords as in :func:`fiftyone_sdcorr.evaluate_keypoints`."""
        alphas = kwargs.get("alphas")
        if alphas is not None and not isinstance(alphas, str):  # the form's type: comma-separated text
            kwargs["alphas"] = ", ".join(str(a) for a in alphas) if isinstance(alphas, (list, tuple)) else alphas
        return common.call_operator(self, sample_collection, delegate, delegation_target, pred_field=pred_field,
                                    gt_field=gt_field, **kwargs)

    def resolve_input(self, ctx):
        inputs = types.Object()
        target = common.target_view_input(ctx, inputs, action="Evaluate")
        kp_fields = label_fields(ctx, [fo.Keypoints])
        roles = _roles(ctx)  # the newest prediction; the ground truth of the last evaluation, else the panel's
        last = last_evaluation(ctx.dataset, kp_fields)
        choice_input(inputs, "pred_field", kp_fields, "Predicted keypoints", "fo.Keypoints predictions",
                      default=roles.get("pred_field") or last["pred_field"])
        choice_input(inputs, "gt_field", kp_fields, "Ground-truth keypoints", "fo.Keypoints ground truth",
                      default=last["gt_field"] or roles.get("gt_field"))
        inputs.str("eval_key", default=EvaluationConfig.eval_key, required=False, label="Evaluation key")
        inputs.str("alphas", default=", ".join(f"{a:g}" for a in EvaluationConfig.alphas), required=False,
                   label="Alphas",
                   description="Comma-separated PCK thresholds (the first is written per point)")
        _enum(inputs, "threshold", THRESHOLDS, EvaluationConfig.threshold, "Threshold size",
              "bbox: the object's box (box field, else the extent of the ground-truth points); "
              "image: max(width, height)")
        box_fields = label_fields(ctx, [fo.Detections, fo.Detection])
        choice_input(inputs, "bbox_field", box_fields, "Box field (optional)",
                      "Detections giving the target object's box", required=False)
        common.patches_input(ctx, inputs, target)
        if target is not None:
            inputs.view("count", types.Notice(label=f"{len(target)} samples"))
        self.finish_form(ctx, inputs)
        return types.Property(inputs, view=types.View(label="Evaluate keypoints"))

    def run_call(self, ctx):
        from fiftyone_sdcorr.dataset.evaluate import evaluate_keypoints

        p = dict(ctx.params)
        if "alphas" in p:
            p["alphas"] = _parse_alphas(p["alphas"])
        kwargs = common.function_kwargs(p, evaluate_keypoints, positional=("pred_field", "gt_field"))
        args = (common.get_target_view(ctx), p.get("pred_field"), p.get("gt_field"))
        return _evaluate_report, args, kwargs

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("eval_key", label="Evaluation key")
        outputs.str("report", label="Report", view=types.MarkdownView())
        return types.Property(outputs, view=types.View(label="PCK"))


def _evaluate_report(samples, pred_field, gt_field, progress=None, **kwargs):
    from fiftyone_sdcorr.dataset.evaluate import evaluate_keypoints

    results = evaluate_keypoints(samples, pred_field, gt_field, progress=progress, **kwargs)
    return {"eval_key": results.key, "summary": results.summary.text(), "report": results.report_str(),
            "warnings": results.summary["warnings"], "failed": results.summary["failed"], **results.report()}


# --------------------------------------------------------------------------- review
class FlagKeypointAnnotations(common.RunOperator):
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

    def __call__(self, sample_collection, gt_field, references=None, *, delegate=False, delegation_target=None,
                 **kwargs):
        """Runs the operator from Python; keywords as in
        :func:`fiftyone_sdcorr.flag_keypoint_annotations`."""
        return common.call_operator(self, sample_collection, delegate, delegation_target, gt_field=gt_field,
                                    **reference_params(references), **kwargs)

    def resolve_input(self, ctx):
        inputs = types.Object()
        target = common.target_view_input(ctx, inputs, action="Review")
        choice_input(inputs, "gt_field", label_fields(ctx, [fo.Keypoints]), "Annotations",
                      "fo.Keypoints field to review (never written)", default=_roles(ctx).get("gt_field"))
        reference_inputs(ctx, inputs, "keypoints")
        inputs.str("tag", default=ReviewConfig.tag, required=False, label="Tag for flagged samples")
        inputs.str("review_field", default=free_field_name(ctx.dataset, ReviewConfig.review_field)
                   if ctx.dataset is not None else ReviewConfig.review_field, required=False, label="Review field",
                   description="New fo.Keypoints field with per-point flags and evidence")
        inputs.float("alpha", default=ReviewConfig.alpha, **common.bounds("alpha"), label="Alpha",
                     description="Flag points farther than alpha x object size from the evidence")
        inputs.float("min_confidence", default=ReviewConfig.min_confidence, **common.bounds("min_confidence"),
                     label="Minimum evidence confidence")
        _enum(inputs, "combine", COMBINE_RULES, ReviewConfig.match.combine, "Evidence", "As in propagate_keypoints")
        inputs.int("top_k", default=ReviewConfig.match.top_k, **common.bounds("top_k"), label="Top k (per_point)")
        box_fields = label_fields(ctx, [fo.Detections, fo.Detection])
        choice_input(inputs, "bbox_field", box_fields, "Box field (optional)", "Object boxes", required=False)
        inputs.str("features_field", default=ReviewConfig.features_field, required=False,
                   label="Stored features field")
        inputs.str("embedding_field", default=ReviewConfig.embedding_field, required=False, label="Embedding field")
        common.patches_input(ctx, inputs, target)
        inputs.bool("overwrite", default=ReviewConfig.overwrite, label="Overwrite an existing review field")
        common.model_inputs(ctx, inputs, follow=False, advanced=False)
        if target is not None:
            inputs.view("count", types.Notice(label=f"{len(target)} samples"))
        self.finish_form(ctx, inputs)
        return types.Property(inputs, view=types.View(label="Flag keypoint annotations"))

    def run_call(self, ctx):
        from fiftyone_sdcorr.dataset.review import flag_keypoint_annotations

        p = ctx.params
        gt_field = p.get("gt_field")
        kwargs = common.function_kwargs(p, flag_keypoint_annotations, positional=("gt_field",))
        if (p.get("references") or "annotated") != "annotated":
            kwargs["references"] = references_from(ctx, gt_field)
        return flag_keypoint_annotations, (common.get_target_view(ctx), gt_field), kwargs

    def resolve_output(self, ctx):
        outputs = types.Object()
        for key in ("checked", "points_checked", "flagged_points"):
            outputs.int(key, label=key.replace("_", " ").capitalize())
        outputs.str("tag", label="Tag")
        return types.Property(outputs, view=types.View(label="Annotation review"))


OPERATORS = [PropagateKeypoints, EvaluateKeypoints, FlagKeypointAnnotations]
