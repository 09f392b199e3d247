"""Operator ``swap_instances``: thin glue over :mod:`fiftyone_sdcorr.dataset.swap`.

From Python, like the ``@voxel51/brain`` operators::

    op = foo.get_operator("@sdcorr/sdcorr/swap_instances")
    op(dataset, pairs=[[source_detection_id, target_detection_id]], output_dataset="swaps",
       patches_field="detections")

In the App: one pair per run, ``source_id`` and ``target_id`` (the match panel's "Swap
instances" button fills them with its reference object and current object).
"""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_sdcorr.dataset.config import SwapConfig
from fiftyone_sdcorr.dataset.engine import ParameterError
from fiftyone_sdcorr.plugin import common

#: the form's one pair (the function takes ``pairs``)
PAIR_PARAMS = ("source_id", "target_id")


def default_output_dataset(ctx) -> str:
    return f"{ctx.dataset.name}-swaps" if ctx.dataset is not None else "sdcorr-swaps"


def pairs_of(params) -> list:
    """``pairs`` from the params: ``pairs`` (Python) or one ``source_id`` / ``target_id``."""
    pairs = params.get("pairs")
    if pairs:
        return [list(p) if isinstance(p, (list, tuple)) else p for p in pairs]
    src, tgt = params.get("source_id"), params.get("target_id")
    if not src or not tgt:
        raise ParameterError("parameter 'source_id': give a source and a target id (or pairs from Python)")
    return [[src, tgt]]


class SwapInstances(common.RunOperator):
    delegate_large = False  # a few pairs: immediate by default

    @property
    def config(self):
        return foo.OperatorConfig(
            name="swap_instances",
            label="Swap instances (dense SD + DINOv2 correspondence)",
            description="New samples: a target object painted with its dense match in a source object",
            dynamic=True,
            execute_as_generator=True,
            **common.delegation_config(),
        )

    def __call__(self, sample_collection, pairs, output_dataset, *, delegate=False, delegation_target=None,
                 **kwargs):
        """Runs the operator from Python; keywords as in :func:`fiftyone_sdcorr.swap_instances`."""
        pairs = [list(p) for p in pairs]
        return common.call_operator(self, sample_collection, delegate, delegation_target, pairs=pairs,
                                    output_dataset=output_dataset, **kwargs)

    def resolve_input(self, ctx):
        inputs = types.Object()
        target = common.target_view_input(ctx, inputs, action="Swap within", allow_selected=False)
        common.patches_input(ctx, inputs, target)
        inputs.str("source_id", required=False, label="Source id",
                   description="The object (detection id) or sample whose appearance is carried")
        inputs.str("target_id", required=False, label="Target id",
                   description="The object (detection id) or sample painted; its image is the background")
        inputs.str("output_dataset", default=default_output_dataset(ctx), required=True, label="Output dataset",
                   description="New samples go here (created if missing); the media of this dataset is never written")
        inputs.int("resolution", default=SwapConfig.resolution, **common.bounds("swap_resolution"),
                   label="Dense grid (cells per side)")
        inputs.float("min_confidence", default=SwapConfig.min_confidence, **common.bounds("min_confidence"),
                     label="Minimum match confidence", description="Less confident pixels keep the target's colour")
        inputs.bool("refine", default=SwapConfig.refine, label="Refine with Stable Diffusion",
                    description="The paper's image-to-image pass over the swapped object, with the features' SD")
        inputs.float("refine_strength", default=SwapConfig.refine_strength, **common.bounds("refine_strength"),
                     label="Refinement strength")
        inputs.int("seed", default=SwapConfig.seed, **common.bounds("seed"), label="Seed")
        inputs.bool("animation", default=SwapConfig.animation, label="Warp animation (GIF)")
        inputs.str("output_dir", required=False, label="Output folder",
                   description="Blank: beside the feature store")
        inputs.str("features_field", default=SwapConfig.features_field, required=False, label="Stored features field")
        inputs.bool("overwrite", default=SwapConfig.overwrite, label="Redo pairs already swapped")
        common.model_inputs(ctx, inputs, follow=False, advanced=False)
        self.finish_form(ctx, inputs)
        return types.Property(inputs, view=types.View(label="Swap instances"))

    def run_call(self, ctx):
        from fiftyone_sdcorr.dataset.swap import swap_instances

        p = {k: v for k, v in ctx.params.items() if k not in PAIR_PARAMS}
        kwargs = common.function_kwargs(p, swap_instances, positional=("pairs", "output_dataset"))
        args = (common.get_target_view(ctx), pairs_of(ctx.params),
                ctx.params.get("output_dataset") or default_output_dataset(ctx))
        return swap_instances, args, kwargs

    def resolve_output(self, ctx):
        outputs = types.Object()
        for key in ("pairs", "swapped", "skipped", "failed"):
            outputs.int(key, label=key.capitalize())
        outputs.str("output_dataset", label="Output dataset")
        outputs.str("output_dir", label="Output folder")
        return types.Property(outputs, view=types.View(label="Instance swapping"))


OPERATORS = [SwapInstances]
