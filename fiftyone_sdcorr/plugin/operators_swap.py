"""Operator ``swap_instances``: thin glue over :mod:`fiftyone_sdcorr.dataset.swap`.

From Python, like the ``@voxel51/brain`` operators::

    op = foo.get_operator("@sdcorr/sdcorr/swap_instances")
    op(dataset, pairs=[[source_detection_id, target_detection_id]], output_dataset="swaps",
       patches_field="detections")

In the App: "Pairs" is one pair per run, ``source_id`` and ``target_id`` (the match
panel's "Swap instances" button fills them with its reference object and current
object), or automatic pairing from a tag (``sources``: each target with its most similar
source of that tag). A grouped dataset: the active slice is swapped, and the new samples
can join their targets' groups as a new slice (``output_slice``).
"""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_sdcorr.dataset.config import SwapConfig
from fiftyone_sdcorr.dataset.engine import ParameterError
from fiftyone_sdcorr.plugin import common

#: the form's one pair and its pairing choice (the function takes ``pairs`` or ``sources``)
PAIR_PARAMS = ("source_id", "target_id", "pairing", "sources")
#: the form's pairing choices: one pair, or automatic from a tag
PAIRING = {"pair": "This pair (source id, target id)", "auto": "Automatic: the most similar source of a tag"}


def default_output_dataset(ctx) -> str:
    return f"{ctx.dataset.name}-swaps" if ctx.dataset is not None else "sdcorr-swaps"


def pairs_of(params) -> tuple:
    """``(pairs, sources)`` from the params: ``sources`` (automatic pairing: from Python,
    or the form's tag with pairing "auto"), else ``pairs`` (Python) or one ``source_id`` /
    ``target_id``."""
    pairs = params.get("pairs")
    pairs = [list(p) if isinstance(p, (list, tuple)) else p for p in pairs] if pairs else None
    if params.get("pairing") == "auto" or params.get("sources"):
        if not params.get("sources"):
            raise ParameterError("parameter 'sources': give the tag of the source samples")
        return pairs, params["sources"]  # both from Python: the function refuses
    if pairs:
        return pairs, None
    src, tgt = params.get("source_id"), params.get("target_id")
    if not src or not tgt:
        raise ParameterError("parameter 'source_id': give a source and a target id (or pairs from Python)")
    return [[src, tgt]], None


def swap_target(ctx):
    """The targeted samples; of a grouped collection, its active slice."""
    target = common.get_target_view(ctx)
    if target is not None and target.media_type == "group":
        target = target.select_group_slices(getattr(ctx, "group_slice", None) or target.group_slice)
    return target


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

    def __call__(self, sample_collection, pairs=None, output_dataset=None, *, delegate=False, delegation_target=None,
                 **kwargs):
        """Runs the operator from Python; keywords as in :func:`fiftyone_sdcorr.swap_instances`."""
        pairs = [list(p) for p in pairs] if pairs is not None else None
        return common.call_operator(self, sample_collection, delegate, delegation_target, pairs=pairs,
                                    output_dataset=output_dataset, **kwargs)

    def resolve_input(self, ctx):
        inputs = types.Object()
        target = common.target_view_input(ctx, inputs, action="Swap within", allow_selected=False)
        common.patches_input(ctx, inputs, target)
        self.pairs_input(ctx, inputs)
        inputs.str("output_dataset", default=default_output_dataset(ctx), required=True, label="Output dataset",
                   description="New samples go here (created if missing); the media of this dataset is never written")
        if ctx.dataset is not None and ctx.dataset.media_type == "group":
            inputs.str("output_slice", required=False, label="Or a new group slice",
                       description="The new samples join their targets' groups as this slice (then the output "
                       "dataset is not used); existing samples and media are never changed")
        inputs.int("resolution", default=SwapConfig.resolution, **common.bounds("swap_resolution"),
                   label="Dense grid (cells per side)")
        inputs.float("min_confidence", default=SwapConfig.min_confidence, **common.bounds("min_confidence"),
                     label="Minimum match confidence", description="Less confident pixels keep the target's colour")
        refine = types.RadioGroup()
        for value, label in (("none", "No"), ("img2img", "Image-to-image (the paper's)"),
                             ("inpaint", "Inpainting inside the mask")):
            refine.add_choice(value, label=label)
        inputs.enum("refine", refine.values(), default="none", required=False, view=refine,
                    label="Refine with Stable Diffusion", description="A low-strength SD pass over the swapped "
                    "object with the features' SD weights, blended in only inside the mask")
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

    @staticmethod
    def pairs_input(ctx, inputs) -> None:
        """The pairing choice: this pair (``source_id``, ``target_id``), or automatic from a tag."""
        pairing = types.RadioGroup()
        for value, label in PAIRING.items():
            pairing.add_choice(value, label=label)
        inputs.enum("pairing", pairing.values(), default="pair", required=False, label="Pairs", view=pairing)
        if ctx.params.get("pairing") == "auto":
            inputs.str("sources", required=True, label="Source tag",
                       description="Each target (object or sample) is paired with the most similar source of this "
                       "tag (same label; never itself)")
            return
        inputs.str("source_id", required=False, label="Source id",
                   description="The object (detection id) or sample whose appearance is carried")
        inputs.str("target_id", required=False, label="Target id",
                   description="The object (detection id) or sample painted; its image is the background")

    def run_call(self, ctx):
        from fiftyone_sdcorr.dataset.swap import swap_instances

        p = {k: v for k, v in ctx.params.items() if k not in PAIR_PARAMS}
        if p.get("refine") in ("none", "img2img", "inpaint"):
            p["refine"] = {"none": False}.get(p["refine"], p["refine"])
        kwargs = common.function_kwargs(p, swap_instances, positional=("pairs", "output_dataset"))
        pairs, sources = pairs_of(ctx.params)
        if sources is not None:
            kwargs["sources"] = sources
        out = None if kwargs.get("output_slice") else ctx.params.get("output_dataset") or default_output_dataset(ctx)
        return swap_instances, (swap_target(ctx), pairs, out), kwargs

    def resolve_output(self, ctx):
        outputs = types.Object()
        for key in ("pairs", "swapped", "skipped", "failed"):
            outputs.int(key, label=key.capitalize())
        outputs.str("output_dataset", label="Output dataset")
        outputs.str("output_dir", label="Output folder")
        return types.Property(outputs, view=types.View(label="Instance swapping"))


OPERATORS = [SwapInstances]
