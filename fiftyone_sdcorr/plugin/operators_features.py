"""Operator ``compute_fused_features``: thin glue over
:func:`fiftyone_sdcorr.dataset.compute_features.compute_fused_features`."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_sdcorr.dataset.config import STORE_DTYPES, FeatureConfig
from fiftyone_sdcorr.dataset.engine import ParameterError, check_bool, check_int
from fiftyone_sdcorr.plugin import common


class ComputeFusedFeatures(common.RunOperator):
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

    def __call__(self, sample_collection, sd_model=None, dino_model=None, *, delegate=False,
                 delegation_target=None, shards=1, **kwargs):
        """Runs the operator from Python, immediately or (``delegate=True``) queued for a
        delegated-operation worker. Keywords as in
        :func:`fiftyone_sdcorr.compute_fused_features`.

        ``shards=N`` (with ``delegate=True``) queues N delegated operations, each on an
        N-th of the view: N workers (``fiftyone delegated launch`` on any machines that
        share the database and the store) run them at once. Returns the list of results.
        """
        shards = check_int("shards", shards, lo=1, hi=10_000)  # True is not 1 shard: refused
        check_bool("delegate", delegate)
        if shards != 1:
            if not delegate:
                raise ParameterError("parameter 'shards' splits a view into delegated operations: "
                                     "pass delegate=True")
            return [common.call_operator(self, view, True, delegation_target, sd_model=sd_model,
                                         dino_model=dino_model, **kwargs)
                    for view in common.shard_views(sample_collection, shards)]
        return common.call_operator(self, sample_collection, delegate, delegation_target,
                                    sd_model=sd_model, dino_model=dino_model, **kwargs)

    def resolve_input(self, ctx):
        inputs = types.Object()
        target = common.target_view_input(ctx, inputs, action="Compute features for")
        common.patches_input(ctx, inputs, target)
        common.model_inputs(ctx, inputs)
        last = common.last_features(ctx.dataset)  # the defaults follow the last run
        inputs.int("pca_dim", default=last.get("pca_dim", FeatureConfig.recipe.pca_dim), required=False,
                   **common.bounds("pca_dim"),
                   label="Channels per SD layer",
                   description="Fixed projection size per SD tap (smaller = smaller store)")
        inputs.int("projection_samples", default=FeatureConfig.projection_samples, required=False,
                   **common.bounds("projection_samples"),
                   label="Projection images",
                   description="Images the fixed projection is fitted on (once per store)")
        inputs.str("store_dir", required=False, label="Feature store directory", default=last.get("store_dir"),
                   description="Default: ~/fiftyone/sdcorr_features/<dataset id> "
                   "(or $SDCORR_STORE_DIR/<dataset id>)")
        choices = types.DropdownView()
        for d in STORE_DTYPES:
            choices.add_choice(d, label=d)
        inputs.enum("store_dtype", choices.values(), default=last.get("store_dtype", FeatureConfig.store_dtype),
                    required=False,
                    label="Stored dtype", view=choices)
        inputs.str("embedding_field", default=last.get("embedding_field", FeatureConfig.embedding_field),
                   required=False,
                   label="Embedding field", description="Vector field for the pooled fused vector")
        inputs.str("features_field", default=last.get("features_field", FeatureConfig.features_field),
                   required=False,
                   label="Features field", description="String field for the store file's path")
        inputs.str("brain_key", required=False, label="Similarity index (brain key)",
                   description="Also register the embeddings as a FiftyOne similarity index under this key "
                   "(the App's similarity search, sort_by_similarity, the match panel's ranking)")
        inputs.str("prompt_field", required=False, label="Prompt label field",
                   description="Field naming each sample's object (string, Classification, "
                   "Detections, Keypoints...) for a prompt with '{label}', e.g. 'a photo of a {label}'")
        inputs.bool("overwrite", default=False, label="Overwrite",
                    description="Recompute samples that already have features, and replace fields that "
                    "hold other features")
        if target is not None:
            inputs.view("count", types.Notice(label=f"{len(target)} samples targeted"))
        self.finish_form(ctx, inputs)
        return types.Property(inputs, view=types.View(label="Compute fused features"))

    def run_call(self, ctx):
        from fiftyone_sdcorr.dataset.compute_features import compute_fused_features

        kwargs = common.function_kwargs(ctx.params, compute_fused_features)
        return compute_fused_features, (common.get_target_view(ctx),), kwargs

    def resolve_output(self, ctx):
        outputs = types.Object()
        for key in ("computed", "recovered", "skipped", "busy", "failed"):
            outputs.int(key, label=key.capitalize())
        outputs.str("store_dir", label="Feature store")
        return types.Property(outputs, view=types.View(label="Fused features"))


OPERATORS = [ComputeFusedFeatures]
