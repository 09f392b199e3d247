"""Operators behind the match panel's views, useful on their own: thin glue over
:mod:`fiftyone_sdcorr.dataset.feature_views`.

- ``write_feature_pca``: a colour picture of each sample's fused features (PCA colours or
  part clusters, the same colour for the same part across samples), as a media field the
  App can show in the grid and the modal.
- ``write_similarity_heatmap``: the similarity of one point of a reference sample (a
  keypoint or an ``(x, y)``) to every location of each target sample, as ``fo.Heatmap``:
  the operator of the function ``write_similarity_heatmaps``. Its URI keeps the singular
  (``@sdcorr/sdcorr/write_similarity_heatmap``, as declared in ``fiftyone.yml``) so that
  users' saved calls keep working; one run writes one heat map per sample.
- ``write_dense_views``: the dense correspondence of a reference sample (or object) to each
  sample as a picture per sample: the reference's position colours carried onto it (the
  paper's colour map) or the reference warped onto it, a media field like the PCA pictures.
"""

from __future__ import annotations

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_sdcorr.dataset.config import VIEW_MODES, FeaturePCAConfig, HeatmapConfig
from fiftyone_sdcorr.dataset.engine import ParameterError
from fiftyone_sdcorr.dataset.feature_views import DENSE_MODES, DENSE_RESOLUTION_RANGE, DenseViewConfig
from fiftyone_sdcorr.plugin import common
from fiftyone_sdcorr.plugin.field_roles import free_field_name
from fiftyone_sdcorr.plugin.object_names import image_size, object_names


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


def sample_objects_of(ctx, patches_field: str) -> list:
    """``[(detection id, name)]`` of the open (else the first selected) sample's objects in
    ``patches_field``, the largest first, named as the match panel names them
    (:func:`~fiftyone_sdcorr.plugin.object_names.object_names`)."""
    sid = ctx.current_sample or (ctx.selected[0] if ctx.selected else None)
    if not sid or ctx.dataset is None or not ctx.dataset.has_sample_field(f"{patches_field}.detections"):
        return []
    try:
        sample = ctx.dataset[sid]
    except KeyError:
        return []
    dets = [d for d in (getattr(sample[patches_field], "detections", None) or []) if d.bounding_box is not None]
    names = object_names([(d.label, d.bounding_box) for d in dets], image_size(sample.filepath, sample.metadata))
    order = sorted(range(len(dets)), key=lambda i: -dets[i].bounding_box[2] * dets[i].bounding_box[3])
    return [(dets[i].id, names[i]) for i in order]


class WriteFeaturePCA(common.RunOperator):
    delegate_large = False  # cheap per sample: immediate by default

    @property
    def config(self):
        return foo.OperatorConfig(
            name="write_feature_pca",
            label="Write feature pictures (PCA colours or part clusters)",
            description="A colour picture of the stored fused features per sample, shown as a media field",
            dynamic=True,
            execute_as_generator=True,
            **_views_config(),
        )

    def __call__(self, sample_collection, output_field=None, *, delegate=False, delegation_target=None, **kwargs):
        """Runs the operator from Python; keywords as in
        :func:`fiftyone_sdcorr.dataset.feature_views.write_feature_pca`."""
        return common.call_operator(self, sample_collection, delegate, delegation_target,
                                    output_field=output_field, **kwargs)

    def resolve_input(self, ctx):
        inputs = types.Object()
        target = common.target_view_input(ctx, inputs, action="Write PCA masks for")
        field = FeaturePCAConfig.output_field
        inputs.str("output_field", default=free_field_name(ctx.dataset, field) if ctx.dataset else field,
                   required=False, label="Output field",
                   description="A new field with a colour picture per sample; choose it as the media field "
                   "(grid settings) to see the pictures")
        choices = types.RadioGroup()
        for mode, label in zip(VIEW_MODES, ("PCA colours", "Part clusters")):
            choices.add_choice(mode, label=label)
        inputs.enum("mode", choices.values(), default=FeaturePCAConfig.mode, required=False, label="Picture",
                    view=choices)
        inputs.int("n_parts", default=FeaturePCAConfig.n_parts, **common.bounds("n_parts"), required=False,
                   label="Parts (part clusters)")
        inputs.str("features_field", default=FeaturePCAConfig.features_field, required=False,
                   label="Stored features field")
        inputs.int("fit_samples", default=FeaturePCAConfig.fit_samples, **common.bounds("fit_samples"),
                   label="Samples to fit the PCA on")
        inputs.str("output_dir", required=False, label="Output directory",
                   description="Where the PNG masks go (default: next to the feature store)")
        common.patches_input(ctx, inputs, target)
        inputs.bool("overwrite", default=FeaturePCAConfig.overwrite, label="Overwrite an existing output field")
        if target is not None:
            inputs.view("count", types.Notice(label=f"{len(target)} samples"))
        self.finish_form(ctx, inputs)
        return types.Property(inputs)

    def run_call(self, ctx):
        from fiftyone_sdcorr.dataset.feature_views import write_feature_pca

        kwargs = common.function_kwargs(ctx.params, write_feature_pca)
        return write_feature_pca, (common.get_target_view(ctx),), kwargs


class WriteSimilarityHeatmap(common.RunOperator):
    delegate_large = False  # cheap per sample: immediate by default

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

    def __call__(self, sample_collection, reference_id, point=None, *, delegate=False, delegation_target=None,
                 **kwargs):
        """Runs the operator from Python; keywords as in
        :func:`fiftyone_sdcorr.dataset.feature_views.write_similarity_heatmaps`."""
        x, y = (None, None) if point is None else point
        return common.call_operator(self, sample_collection, delegate, delegation_target,
                                    reference_id=reference_id, x=x, y=y, **kwargs)

    def resolve_input(self, ctx):
        inputs = types.Object()
        target = common.target_view_input(ctx, inputs, action="Write heat maps for")
        inputs.str("reference_id", default=_reference_id(ctx), required=False, label="Reference sample id",
                   description="The sample the point belongs to (default: the open or first selected sample); "
                   "with objects, the reference detection's id")
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
        field = HeatmapConfig.output_field
        inputs.str("output_field", default=free_field_name(ctx.dataset, field) if ctx.dataset else field,
                   required=False, label="Output field")
        inputs.str("features_field", default=HeatmapConfig.features_field, required=False,
                   label="Stored features field")
        inputs.str("output_dir", required=False, label="Output directory")
        common.patches_input(ctx, inputs, target)
        inputs.bool("overwrite", default=HeatmapConfig.overwrite, label="Overwrite an existing output field")
        if target is not None:
            inputs.view("count", types.Notice(label=f"{len(target)} samples"))
        self.finish_form(ctx, inputs)
        return types.Property(inputs)

    def run_call(self, ctx):
        from fiftyone_sdcorr.dataset.feature_views import write_similarity_heatmaps

        p = dict(ctx.params)
        rid = _reference_id(ctx)
        if not rid:
            raise ParameterError("parameter 'reference_id': no reference sample; give its id, open a sample "
                                 "or select one")
        p.pop("reference_id", None)
        point = None if p.get("x") is None and p.get("y") is None else (p.get("x"), p.get("y"))
        keypoint = p.get("keypoint")
        if isinstance(keypoint, str) and keypoint.strip().isdigit():
            p["keypoint"] = int(keypoint)
        kwargs = common.function_kwargs(p, write_similarity_heatmaps, positional=("reference_id", "point"))
        return write_similarity_heatmaps, (common.get_target_view(ctx), rid, point), kwargs


class WriteDenseViews(common.RunOperator):
    delegate_large = False  # per sample a dense match on the CPU: immediate by default, delegation allowed

    @property
    def config(self):
        return foo.OperatorConfig(
            name="write_dense_views",
            label="Write dense correspondence pictures",
            description="The dense match of a reference to each sample as a picture per sample: the "
            "reference's position colours carried onto it, or the reference warped onto it (a media field)",
            dynamic=True,
            execute_as_generator=True,
            **_views_config(),
        )

    def __call__(self, sample_collection, reference_id, output_field=None, *, delegate=False,
                 delegation_target=None, **kwargs):
        """Runs the operator from Python; keywords as in
        :func:`fiftyone_sdcorr.dataset.feature_views.write_dense_views`."""
        return common.call_operator(self, sample_collection, delegate, delegation_target,
                                    reference_id=reference_id, output_field=output_field, **kwargs)

    def resolve_input(self, ctx):
        inputs = types.Object()
        target = common.target_view_input(ctx, inputs, action="Write dense pictures for")
        patches = common.patches_input(ctx, inputs, target)
        objects = sample_objects_of(ctx, patches) if patches else []
        if objects:  # the open (or first selected) sample's objects, by name
            choices = types.DropdownView()
            for oid, name in objects:
                choices.add_choice(oid, label=name)
            inputs.enum("reference_id", choices.values(), default=objects[0][0], required=False,
                        label="Reference object", view=choices,
                        description="The object of the open sample every object is matched to")
        else:
            inputs.str("reference_id", default=None if patches else _reference_id(ctx), required=False,
                       label="Reference object id" if patches else "Reference sample id",
                       description="The reference detection's id (open a sample to choose among its objects)"
                       if patches else "The sample every sample is matched to (default: the open or first "
                       "selected sample)")
        field = DenseViewConfig.output_field
        inputs.str("output_field", default=free_field_name(ctx.dataset, field) if ctx.dataset else field,
                   required=False, label="Output field",
                   description="A new field with a picture per sample; choose it as the media field "
                   "(grid settings) to see the pictures")
        choices = types.RadioGroup()
        for mode, label in zip(DENSE_MODES, ("Position colours (the reference's colour at each match)",
                                             "Reference warped onto each sample")):
            choices.add_choice(mode, label=label)
        inputs.enum("mode", choices.values(), default=DenseViewConfig.mode, required=False, label="Picture",
                    view=choices)
        inputs.int("resolution", default=DenseViewConfig.resolution, min=DENSE_RESOLUTION_RANGE[0],
                   max=DENSE_RESOLUTION_RANGE[1], required=False, label="Dense grid (cells per side)")
        inputs.str("features_field", default=DenseViewConfig.features_field, required=False,
                   label="Stored features field")
        inputs.str("output_dir", required=False, label="Output directory",
                   description="Where the PNG pictures go (default: next to the feature store)")
        inputs.bool("overwrite", default=DenseViewConfig.overwrite, label="Overwrite an existing output field")
        if target is not None:
            inputs.view("count", types.Notice(label=f"{len(target)} samples"))
        self.finish_form(ctx, inputs)
        return types.Property(inputs)

    def run_call(self, ctx):
        from fiftyone_sdcorr.dataset.feature_views import write_dense_views

        patches = ctx.params.get("patches_field")
        objects = sample_objects_of(ctx, patches) if patches and not ctx.params.get("reference_id") else []
        rid = objects[0][0] if objects else _reference_id(ctx)
        if not rid:
            raise ParameterError("parameter 'reference_id': no reference sample; give its id, open a sample "
                                 "or select one")
        kwargs = common.function_kwargs(ctx.params, write_dense_views, positional=("reference_id",))
        return write_dense_views, (common.get_target_view(ctx), rid), kwargs


OPERATORS = [WriteFeaturePCA, WriteSimilarityHeatmap, WriteDenseViews]
