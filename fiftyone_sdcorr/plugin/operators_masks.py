"""Operators ``propagate_masks`` and ``evaluate_masks``: thin glue over
:mod:`fiftyone_sdcorr.dataset.propagate_masks` and :mod:`fiftyone_sdcorr.dataset.evaluate_masks`.

Callable from Python like the ``@voxel51/brain`` operators::

    op = foo.get_operator("@sdcorr/sdcorr/propagate_masks")
    op(dataset, "gt_masks", "masks", references="ref", delegate=True)
"""

from __future__ import annotations

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types
from fiftyone import ViewField as F

from fiftyone_sdcorr.dataset.config import MASK_REGIONS, MASKS_FIELD, MaskEvaluationConfig, MaskPropagationConfig
from fiftyone_sdcorr.plugin import common
from fiftyone_sdcorr.plugin.field_roles import free_field_name
from fiftyone_sdcorr.plugin.panel_masks import evaluation_defaults
from fiftyone_sdcorr.plugin.references import (
    choice_input,
    label_fields,
    reference_inputs,
    reference_params,
    references_from,
)

MASK_DOCS = (fo.Segmentation, fo.Detections)


def _mask_fields(ctx) -> list:
    return label_fields(ctx, MASK_DOCS)


def _source_fields(ctx, patches_field) -> list:
    """The source masks fields that fit the unit chosen: with objects, the fo.Detections
    fields with instance masks (the objects field first); on whole images, the
    fo.Segmentation fields (every mask field when there is none of that kind)."""
    fields = _mask_fields(ctx)
    if ctx.dataset is None:
        return fields
    dets = set(label_fields(ctx, [fo.Detections]))
    fit = [f for f in fields if (f in dets) == bool(patches_field)]
    if patches_field in fit:
        fit = [patches_field] + [f for f in fit if f != patches_field]
    return fit or fields


def _masked(dataset, source_field):
    """The samples annotated in ``source_field``: a segmentation, or a detection with a mask."""
    if getattr(dataset.get_field(source_field), "document_type", None) is fo.Detections:
        masked = F("detections").filter((F("mask") != None) | (F("mask_path") != None)).length() > 0  # noqa: E711
        return dataset.match(F(source_field).apply(masked))
    return dataset.exists(source_field)


# --------------------------------------------------------------------------- propagate
class PropagateMasks(common.RunOperator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="propagate_masks",
            label="Propagate masks (SD + DINOv2 dense correspondence)",
            description="Predict segmentation masks on target samples or objects from masked references",
            dynamic=True,
            execute_as_generator=True,
            **common.delegation_config(),
        )

    def __call__(self, sample_collection, source_field, output_field, references=None, *, delegate=False,
                 delegation_target=None, **kwargs):
        """Runs the operator from Python (``delegate=True`` queues it); keywords as in
        :func:`fiftyone_sdcorr.propagate_masks`."""
        return common.call_operator(self, sample_collection, delegate, delegation_target,
                                    source_field=source_field, output_field=output_field,
                                    **reference_params(references), **kwargs)

    def resolve_input(self, ctx):
        inputs = types.Object()
        target = common.target_view_input(ctx, inputs, action="Propagate to")
        patches = common.patches_input(ctx, inputs, target)
        choice_input(inputs, "source_field", _source_fields(ctx, patches), "Source masks field",
                     "Images: the references' fo.Segmentation; objects: a fo.Detections field with instance masks")
        reference_inputs(ctx, inputs, "a mask")
        inputs.str("output_field", default=free_field_name(ctx.dataset, MASKS_FIELD) if ctx.dataset is not None
                   else None, required=False, label="Output field",
                   description="A new field: fo.Segmentation (images) or fo.Detections (objects)")
        _run_inputs(inputs)
        _object_inputs(inputs)
        common.model_inputs(ctx, inputs, follow=False, advanced=False)
        if target is not None:
            inputs.view("count", types.Notice(label=f"{len(target)} target samples"))
        self.finish_form(ctx, inputs)
        return types.Property(inputs, view=types.View(label="Propagate masks"))

    def run_call(self, ctx):
        from fiftyone_sdcorr.dataset.propagate_masks import propagate_masks

        p = ctx.params
        kwargs = common.function_kwargs(p, propagate_masks, positional=("source_field", "output_field"))
        args = (common.get_target_view(ctx), references_from(ctx, p.get("source_field"), _masked), p.get("source_field"),
                p.get("output_field") or MASKS_FIELD)
        return propagate_masks, args, kwargs

    def resolve_output(self, ctx):
        outputs = types.Object()
        for key in ("targets", "propagated", "failed"):
            outputs.int(key, label=key.capitalize())
        outputs.str("output_field", label="Output field")
        outputs.str("error_field", label="Error field")
        return types.Property(outputs, view=types.View(label="Mask propagation"))


def _run_inputs(inputs) -> None:
    """The dense grid, the output rule and the stored features (defaults and ranges from
    :class:`MaskPropagationConfig`)."""
    c = MaskPropagationConfig
    inputs.int("resolution", default=c.resolution, **common.bounds("mask_resolution"), label="Resolution",
               description="Cells per side of the dense grid (memory grows with its square)")
    inputs.float("min_confidence", default=c.min_confidence, **common.bounds("min_confidence"),
                 label="Minimum confidence", description="Pixels matched with a lower confidence stay unlabelled (0)")
    inputs.str("confidence_field", required=False, label="Confidence field (optional)",
               description="A new fo.Heatmap field of the per-pixel confidence")
    inputs.int("max_side", default=c.max_side, **common.bounds("max_side"), label="Largest mask side (pixels)")
    inputs.str("mask_dir", required=False, label="Mask folder (optional)",
               description="Where large masks go as PNG files (default: beside the feature store)")
    inputs.bool("flip", default=c.flip, label="Flip alignment",
                description="Also match the mirrored reference; the better mean similarity wins")
    inputs.str("features_field", default=c.features_field, required=False, label="Stored features field")
    inputs.str("embedding_field", default=c.embedding_field, required=False, label="Embedding field")


def _object_inputs(inputs) -> None:
    c = MaskPropagationConfig
    choice_input(inputs, "target_region", MASK_REGIONS, "Object region",
            "Objects: mask: a target detection's own mask when it has one, else its box; box: its box",
            required=False, default=c.target_region, radio=True)
    inputs.bool("same_label", default=c.same_label, required=False, label="Same label only",
                description="Objects: match each target object to reference objects of its label")
    inputs.bool("overwrite", default=c.overwrite, label="Overwrite existing output fields")


# --------------------------------------------------------------------------- evaluate
class EvaluateMasks(common.RunOperator):
    delegate_large = False  # no model: immediate by default

    @property
    def config(self):
        return foo.OperatorConfig(
            name="evaluate_masks",
            label="Evaluate masks (IoU)",
            description="IoU per class of predicted masks against ground truth, stored as an evaluation run",
            dynamic=True,
            execute_as_generator=True,
            allow_delegated_execution=True,
            allow_immediate_execution=True,
            default_choice_to_delegated=False,
        )

    def __call__(self, sample_collection, pred_field, gt_field, *, delegate=False, delegation_target=None,
                 **kwargs):
        """Runs the operator from Python; keywords as in :func:`fiftyone_sdcorr.evaluate_masks`."""
        return common.call_operator(self, sample_collection, delegate, delegation_target, pred_field=pred_field,
                                    gt_field=gt_field, **kwargs)

    def resolve_input(self, ctx):
        inputs = types.Object()
        target = common.target_view_input(ctx, inputs, action="Evaluate")
        fields = _mask_fields(ctx)
        defaults = evaluation_defaults(ctx.dataset) if ctx.dataset is not None else {}
        choice_input(inputs, "pred_field", fields, "Predicted masks", "fo.Segmentation or fo.Detections with masks",
                     default=defaults.get("pred_field"))
        choice_input(inputs, "gt_field", fields, "Ground-truth masks", "The same kind as the predictions",
                     default=defaults.get("gt_field"))
        inputs.str("eval_key", default=MaskEvaluationConfig.eval_key, required=False, label="Evaluation key")
        inputs.bool("overwrite", default=MaskEvaluationConfig.overwrite, label="Replace an evaluation of this key")
        if target is not None:
            inputs.view("count", types.Notice(label=f"{len(target)} samples"))
        self.finish_form(ctx, inputs)
        return types.Property(inputs, view=types.View(label="Evaluate masks"))

    def run_call(self, ctx):
        from fiftyone_sdcorr.dataset.evaluate_masks import evaluate_masks

        p = ctx.params
        kwargs = common.function_kwargs(p, evaluate_masks, positional=("pred_field", "gt_field"))
        return evaluate_report, (common.get_target_view(ctx), p.get("pred_field"), p.get("gt_field")), kwargs

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("eval_key", label="Evaluation key")
        outputs.str("report", label="Report", view=types.MarkdownView())
        return types.Property(outputs, view=types.View(label="Mask IoU"))


def evaluate_report(samples, pred_field, gt_field, progress=None, **kwargs):
    """:func:`~fiftyone_sdcorr.evaluate_masks` as the operator's result (a JSON-able dict)."""
    from fiftyone_sdcorr.dataset.evaluate_masks import evaluate_masks

    results = evaluate_masks(samples, pred_field, gt_field, progress=progress, **kwargs)
    return {"eval_key": results.key, "summary": results.summary.text(), "report": results.report_str(),
            "warnings": results.summary["warnings"], "failed": results.summary["failed"], **results.report()}


OPERATORS = [PropagateMasks, EvaluateMasks]
