"""Operators behind the match panel's views, useful on their own: thin glue over
:mod:`fiftyone_sdcorr.feature_views`.

- ``write_feature_pca``: PCA colours of each sample's fused features as an RGB
  ``fo.Segmentation`` the App overlays (same colours for the same part across samples).
- ``write_similarity_heatmap``: the similarity of one point of a reference sample (a
  keypoint or an ``(x, y)``) to every location of each target sample, as ``fo.Heatmap``.
"""

from __future__ import annotations

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_sdcorr.plugin import common


def _views_config():
    # cheap per sample (reads stored features): immediate by default, delegation allowed
    return dict(allow_immediate_execution=True, allow_delegated_execution=True,
                default_choice_to_delegated=False)


def _reference_id(ctx):
    rid = ctx.params.get("reference_id")
    if rid:
        return str(rid)
    if ctx.current_sample:
        return ctx.current_sample
    if ctx.selected:
        return ctx.selected[0]
    return None


class WriteFeaturePCA(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="write_feature_pca",
            label="Write feature PCA colour masks",
            description="First three principal components of the stored fused features as "
            "an RGB segmentation mask per sample",
            dynamic=True,
            execute_as_generator=True,
            **_views_config(),
        )

    def __call__(self, sample_collection, output_field="sdcorr_pca", *, features_field="sdcorr_features",
                 output_dir=None, fit_samples=32, overwrite=False, delegate=False, delegation_target=None):
        """Runs the operator from Python; arguments as in
        :func:`fiftyone_sdcorr.feature_views.write_feature_pca`."""
        params = dict(output_field=output_field, features_field=features_field,
                      fit_samples=int(fit_samples), overwrite=bool(overwrite))
        if output_dir:
            params["output_dir"] = str(output_dir)
        return common.call_operator(self, sample_collection, params, delegate, delegation_target)

    def resolve_delegation(self, ctx):
        return common.resolve_delegation(ctx)

    def resolve_input(self, ctx):
        inputs = types.Object()
        target = common.target_view_input(ctx, inputs, action="Write PCA masks for")
        inputs.str("output_field", default="sdcorr_pca", required=False, label="Output field",
                   description="fo.Segmentation field (RGB masks)")
        inputs.str("features_field", default="sdcorr_features", required=False, label="Stored features field")
        inputs.int("fit_samples", default=32, min=1, label="Samples to fit the PCA on")
        inputs.str("output_dir", required=False, label="Output directory",
                   description="Where the PNG masks go (default: next to the feature store)")
        inputs.bool("overwrite", default=False, label="Overwrite an existing output field")
        if target is not None:
            inputs.view("count", types.Notice(label=f"{len(target)} samples"))
        return types.Property(inputs)

    def execute(self, ctx):
        from fiftyone_sdcorr.feature_views import write_feature_pca

        p = ctx.params
        view = common.get_target_view(ctx)
        kwargs = dict(output_field=p.get("output_field") or "sdcorr_pca",
                      features_field=p.get("features_field") or "sdcorr_features",
                      output_dir=p.get("output_dir") or None,
                      fit_samples=int(p.get("fit_samples") or 32),
                      overwrite=bool(p.get("overwrite", False)))
        return common.execute(ctx, write_feature_pca, view, **kwargs)


class WriteSimilarityHeatmap(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="write_similarity_heatmap",
            label="Write similarity heat maps",
            description="Similarity of one reference point (a keypoint or x, y) to every "
            "location of each sample, as fo.Heatmap",
            dynamic=True,
            execute_as_generator=True,
            **_views_config(),
        )

    def __call__(self, sample_collection, reference_id, point=None, *, keypoints_field=None, keypoint=None,
                 output_field="sdcorr_heatmap", features_field="sdcorr_features", output_dir=None,
                 overwrite=False, delegate=False, delegation_target=None):
        """Runs the operator from Python; arguments as in
        :func:`fiftyone_sdcorr.feature_views.write_similarity_heatmaps`."""
        params = dict(reference_id=str(reference_id), output_field=output_field,
                      features_field=features_field, overwrite=bool(overwrite))
        if point is not None:
            params["x"], params["y"] = float(point[0]), float(point[1])
        if keypoints_field:
            params["keypoints_field"] = keypoints_field
        if keypoint is not None:
            params["keypoint"] = str(keypoint)
        if output_dir:
            params["output_dir"] = str(output_dir)
        return common.call_operator(self, sample_collection, params, delegate, delegation_target)

    def resolve_delegation(self, ctx):
        return common.resolve_delegation(ctx)

    def resolve_input(self, ctx):
        inputs = types.Object()
        target = common.target_view_input(ctx, inputs, action="Write heat maps for")
        inputs.str("reference_id", default=_reference_id(ctx), required=False, label="Reference sample id",
                   description="The sample the point belongs to (default: the open or first selected sample)")
        fields = sorted(ctx.dataset.get_field_schema(embedded_doc_type=fo.Keypoints)) if ctx.dataset else []
        if fields:
            choices = types.DropdownView()
            for f in fields:
                choices.add_choice(f, label=f)
            inputs.enum("keypoints_field", choices.values(), required=False, label="Keypoints field",
                        view=choices, description="Take the point from this field of the reference")
        inputs.str("keypoint", required=False, label="Keypoint",
                   description="Index or skeleton label of the reference keypoint")
        inputs.float("x", required=False, min=0.0, max=1.0, label="x (normalised)",
                     description="Or give the point directly")
        inputs.float("y", required=False, min=0.0, max=1.0, label="y (normalised)")
        inputs.str("output_field", default="sdcorr_heatmap", required=False, label="Output field")
        inputs.str("features_field", default="sdcorr_features", required=False, label="Stored features field")
        inputs.str("output_dir", required=False, label="Output directory")
        inputs.bool("overwrite", default=False, label="Overwrite an existing output field")
        if target is not None:
            inputs.view("count", types.Notice(label=f"{len(target)} samples"))
        return types.Property(inputs)

    def execute(self, ctx):
        from fiftyone_sdcorr.feature_views import write_similarity_heatmaps

        p = ctx.params
        view = common.get_target_view(ctx)
        rid = _reference_id(ctx)
        if not rid:
            raise ValueError("no reference sample: give reference_id, open a sample or select one")
        point = None
        if p.get("x") is not None and p.get("y") is not None:
            point = (float(p["x"]), float(p["y"]))
        keypoint = p.get("keypoint")
        if isinstance(keypoint, str) and keypoint.strip().lstrip("-").isdigit():
            keypoint = int(keypoint)
        kwargs = dict(keypoints_field=p.get("keypoints_field") or None, keypoint=keypoint,
                      output_field=p.get("output_field") or "sdcorr_heatmap",
                      features_field=p.get("features_field") or "sdcorr_features",
                      output_dir=p.get("output_dir") or None, overwrite=bool(p.get("overwrite", False)))
        return common.execute(ctx, write_similarity_heatmaps, view, rid, point, **kwargs)


OPERATORS = [WriteFeaturePCA, WriteSimilarityHeatmap]
