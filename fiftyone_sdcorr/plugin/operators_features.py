"""Operator ``compute_fused_features``: thin glue over
:func:`fiftyone_sdcorr.dataset_features.compute_fused_features`."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_sdcorr.models import DEFAULT_DINO_MODEL, DEFAULT_SD_MODEL
from fiftyone_sdcorr.plugin import common

_STORE_DTYPES = ("float16", "bfloat16", "float32")


class ComputeFusedFeatures(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="compute_fused_features",
            label="Compute fused SD + DINOv2 features",
            description=(
                "Dense fused features per sample in an on-disk store and a pooled "
                "embedding field for similarity search and visualization"
            ),
            dynamic=True,
            execute_as_generator=True,
            **common.delegation_config(),
        )

    def __call__(
        self,
        sample_collection,
        sd_model=DEFAULT_SD_MODEL,
        dino_model=DEFAULT_DINO_MODEL,
        *,
        preset=None,
        recipe=None,
        batch_size=None,
        device=None,
        dtype=None,
        store_dir=None,
        store_dtype="float16",
        projection_dim=256,
        projection_samples=16,
        embedding_field="sdcorr_embedding",
        features_field="sdcorr_features",
        overwrite=False,
        prompt_field=None,
        delegate=False,
        delegation_target=None,
    ):
        """Runs the operator from Python, immediately or (``delegate=True``) queued for a
        delegated-operation worker. Arguments as in
        :func:`fiftyone_sdcorr.compute_fused_features`."""
        params = common.model_params(sd_model, dino_model, device, dtype, batch_size, preset, recipe)
        params.update(
            store_dir=None if store_dir is None else str(store_dir),
            store_dtype=store_dtype,
            projection_dim=int(projection_dim),
            projection_samples=int(projection_samples),
            embedding_field=embedding_field,
            features_field=features_field,
            overwrite=bool(overwrite),
            prompt_field=prompt_field,
        )
        return common.call_operator(self, sample_collection, params, delegate, delegation_target)

    def resolve_delegation(self, ctx):
        return common.resolve_delegation(ctx)

    def resolve_input(self, ctx):
        inputs = types.Object()
        target = common.target_view_input(ctx, inputs, action="Compute features for")
        common.model_inputs(ctx, inputs)
        inputs.int("projection_dim", default=256, required=False, min=1,
                   label="Channels per SD layer",
                   description="Fixed projection size per SD tap (smaller = smaller store)")
        inputs.int("projection_samples", default=16, required=False, min=1,
                   label="Projection images",
                   description="Images the fixed projection is fitted on (once per store)")
        inputs.str("store_dir", required=False, label="Feature store directory",
                   description="Default: ~/fiftyone/sdcorr_features/<dataset id> "
                   "(or $SDCORR_STORE_DIR/<dataset id>)")
        choices = types.DropdownView()
        for d in _STORE_DTYPES:
            choices.add_choice(d, label=d)
        inputs.enum("store_dtype", choices.values(), default="float16", required=False,
                    label="Stored dtype", view=choices)
        inputs.str("embedding_field", default="sdcorr_embedding", required=False,
                   label="Embedding field", description="Vector field for the pooled fused vector")
        inputs.str("features_field", default="sdcorr_features", required=False,
                   label="Features field", description="String field for the store file's path")
        inputs.str("prompt_field", required=False, label="Prompt label field",
                   description="Field naming each sample's object (string, Classification, "
                   "Detections, Keypoints...) for a prompt with '{label}', e.g. 'a photo of a {label}'")
        inputs.bool("overwrite", default=False, label="Overwrite",
                    description="Recompute samples that already have features")
        if target is not None:
            inputs.view("count", types.Notice(label=f"{len(target)} samples targeted"))
        return types.Property(inputs, view=types.View(label="Compute fused features"))

    def execute(self, ctx):
        from fiftyone_sdcorr.dataset_features import compute_fused_features

        p = ctx.params
        target = common.get_target_view(ctx)
        kwargs = common.model_kwargs(p)
        kwargs.update(
            store_dir=p.get("store_dir") or None,
            store_dtype=p.get("store_dtype") or "float16",
            projection_dim=int(p.get("projection_dim") or 256),
            projection_samples=int(p.get("projection_samples") or 16),
            embedding_field=p.get("embedding_field") or "sdcorr_embedding",
            features_field=p.get("features_field") or "sdcorr_features",
            overwrite=bool(p.get("overwrite", False)),
            prompt_field=p.get("prompt_field") or None,
        )
        return common.execute(ctx, compute_fused_features, target, **kwargs)

    def resolve_output(self, ctx):
        outputs = types.Object()
        for key in ("computed", "recovered", "skipped", "busy", "failed"):
            outputs.int(key, label=key.capitalize())
        outputs.str("store_dir", label="Feature store")
        return types.Property(outputs, view=types.View(label="Fused features"))


OPERATORS = [ComputeFusedFeatures]
