"""The operators' forms run the dataset functions' own checks on the values a user types.

Found by driving the App: a rerun whose output field already exists (the demo's
``predicted``, or a second review into ``sdcorr_review``) clicked "Execute" and nothing
happened: the run raised its ParameterError inside FiftyOne's streamed (generator)
execution, which ends the stream without a word. Now (one mechanism for every form):

- each form ends with ``RunOperator.finish_form``, which runs the operator's dataset
  function under ``engine.preflight``: the function stops where its checks end
  (``checks_done``), before any model loads or anything is written; a refusal marks the
  input its message names as invalid, with the function's own message. FiftyOne's form
  validation then disables "Execute" and shows the message under the input;
- a failure after the checks (e.g. models that cannot load) is said by an error
  notification and the output view before the run's exception ends the stream.

Forms are resolved here with FiftyOne's own ``resolve_type`` (what the App server calls
for every change of a form), on a real dataset whose features come from a deterministic
local descriptor (no weights). The browser side is in tests/test_browser_operators.py.
"""

import asyncio
import uuid

import pytest

import fiftyone as fo
import fiftyone.operators as foo
from fiftyone.operators.executor import ExecutionError, resolve_type
from fiftyone.operators.registry import OperatorRegistry

from fiftyone_sdcorr.dataset.compute_features import compute_fused_features
from fiftyone_sdcorr.dataset.engine import Run, RunSummary, preflight
from fiftyone_sdcorr.dataset.propagate import propagate_keypoints
from fiftyone_sdcorr.plugin.common import form_labels, in_form_words
from local_descriptor import LocalDescriptor
from snapshots import field_snapshot

PREFIX = "@sdcorr/sdcorr/"


def _kps(points):
    return fo.Keypoints(keypoints=[fo.Keypoint(label="cat", points=points)])


@pytest.fixture(scope="module")
def world(photo_paths, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("forms")
    ds = fo.Dataset(f"sdcorr-forms-{uuid.uuid4().hex[:8]}")
    pts = [(0.3, 0.35), (0.62, 0.33), (0.46, 0.55)]
    ds.add_samples([
        fo.Sample(filepath=photo_paths["chelsea"], gt=_kps(pts), pred=_kps(pts), note="a"),
        fo.Sample(filepath=photo_paths["chelsea"], gt=_kps([(x + 0.01, y) for x, y in pts]), note="b"),
        fo.Sample(filepath=photo_paths["coffee"], note="c"),
    ])
    summary = compute_fused_features(ds, extractor=LocalDescriptor(size=224, stride=14),
                                     store_dir=str(tmp / "store"), progress=False)
    assert summary["computed"] == 3
    yield ds, tmp
    ds.delete()


def _form(ds, name, params, **request):
    """The form of operator ``name`` as the App gets it for ``params``:
    ``{property name: (invalid, error message)}`` of its inputs."""
    prop = asyncio.run(resolve_type(OperatorRegistry(), PREFIX + name,
                                    {"dataset_name": ds.name, "params": params, **request}))
    assert isinstance(prop, fo.operators.types.Property), prop
    return {k: (bool(p.invalid), p.error_message) for k, p in prop.type.properties.items()}


def _labels(ds, name, params):
    """``{param: label}`` of the form's inputs."""
    prop = asyncio.run(resolve_type(OperatorRegistry(), PREFIX + name, {"dataset_name": ds.name, "params": params}))
    return form_labels(prop.type)


def _refusal(ds, name, params, **ctx):
    """The message the operator's run refuses ``params`` with (``execute_operator``)."""
    with pytest.raises(ExecutionError) as info:
        foo.execute_operator(PREFIX + name, ctx={"dataset": ds, "params": params, **ctx})
    return str(info.value)


#: operator, params a user might type that clash with existing fields, the input the
#: refusal belongs to, a piece of its message, and the change that makes the form valid
CLASHES = [
    ("compute_fused_features", {"embedding_field": "gt"}, "embedding_field", "holds EmbeddedDocumentField(Keypoints)",
     {"embedding_field": "new_embedding", "features_field": "new_features"}),
    ("propagate_keypoints", {"source_field": "gt", "output_field": "pred"}, "output_field", "already exists",
     {"overwrite": True}),
    ("propagate_keypoints", {"source_field": "gt", "output_field": "gt"}, "output_field", "is the source_field",
     {"output_field": "pred_2"}),
    # a typo in the features field (no model given): not "compute new features with the default
    # models" (a 5 GB download), but a refusal that names the field holding the features
    ("propagate_keypoints", {"source_field": "gt", "output_field": "p3", "features_field": "sdcorr_featurs"},
     "features_field", "are in 'sdcorr_features'", {"features_field": "sdcorr_features"}),
    ("flag_keypoint_annotations", {"gt_field": "gt", "review_field": "r3", "features_field": "sdcorr_featurs"},
     "features_field", "does not exist", {"features_field": "sdcorr_features"}),
    ("evaluate_keypoints", {"pred_field": "note", "gt_field": "gt"}, "pred_field", "holds StringField",
     {"pred_field": "pred"}),
    ("flag_keypoint_annotations", {"gt_field": "gt", "review_field": "pred"}, "review_field", "already exists",
     {"review_field": "gt_review"}),
    ("write_feature_pca", {"output_field": "gt"}, "output_field", "holds EmbeddedDocumentField(Keypoints)",
     {"output_field": "pca_2"}),
    ("write_similarity_heatmap", {"x": 0.5, "y": 0.5}, "reference_id", "no reference sample",
     {"reference_id": None}),  # None: the first sample's id (below)
]


@pytest.mark.parametrize("name,params,param,text,fix", CLASHES,
                         ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CLASHES)])
def test_a_form_refuses_what_its_run_refuses_with_the_same_message(world, name, params, param, text, fix):
    ds, _ = world
    before = field_snapshot(ds)
    form = _form(ds, name, params)
    invalid = {k: msg for k, (bad, msg) in form.items() if bad}
    # the refusal is under the input it concerns, in the function's own words ...
    assert list(invalid) == [param], invalid
    assert text in invalid[param], invalid
    # ... and it is exactly what running these values says, naming the input by its label
    labels = _labels(ds, name, params)
    assert invalid[param] in in_form_words(_refusal(ds, name, params), labels)
    assert f"parameter '{param}'" not in invalid[param] and f"*{labels[param]}*" in invalid[param], invalid
    # resolving the form (on every change) wrote nothing, and neither did the refused run
    ds.reload()
    assert field_snapshot(ds) == before
    # the user's fix makes the form valid
    fixed = {**params, **{k: (v if v is not None else ds.first().id) for k, v in fix.items()}}
    assert not [k for k, (bad, _) in _form(ds, name, fixed).items() if bad]


def test_forms_open_ready_to_run_on_free_output_names(world):
    """As a form opens, its output fields are names no field holds yet (the second
    review goes to ``sdcorr_review_2``), and the form's own defaults pass the checks."""
    ds, _ = world
    ds.add_sample_field("sdcorr_review", fo.EmbeddedDocumentField, embedded_doc_type=fo.Keypoints)
    try:
        prop = asyncio.run(resolve_type(OperatorRegistry(), PREFIX + "flag_keypoint_annotations",
                                        {"dataset_name": ds.name, "params": {}}))
        props = prop.type.properties
        assert props["review_field"].default == "sdcorr_review_2"
        assert props["gt_field"].default == "gt"
        # checked as the App first resolves a form it opens (no values yet: the defaults
        # count) and as it sends them
        defaults = {k: p.default for k, p in props.items() if p.default is not None}
        for params in ({}, defaults):
            assert not [k for k, (bad, _) in _form(ds, "flag_keypoint_annotations", params).items() if bad]
    finally:
        ds.delete_sample_field("sdcorr_review")


def test_preflight_stops_before_models_load_or_anything_is_written(world):
    """The checks alone: models that do not exist are never loaded, no store folder is
    made, no field declared and no run recorded; a refusal comes back as the error."""
    ds, tmp = world
    before, runs = field_snapshot(ds), ds.list_runs()
    store = tmp / "never_made"
    assert preflight(compute_fused_features, ds, sd_model=str(tmp / "no_sd"), dino_model=str(tmp / "no_dino"),
                     features_field="other_features", embedding_field="other_embedding",
                     store_dir=str(store), progress=False) is None
    assert preflight(propagate_keypoints, ds, ds.limit(1), "gt", "fresh", features_field="missing_features",
                     sd_model=str(tmp / "no_sd"), progress=False) is None
    err = preflight(propagate_keypoints, ds, ds.limit(1), "gt", "pred", progress=False)
    assert "already exists" in str(err)
    ds.reload()
    assert not store.exists()
    assert field_snapshot(ds) == before and ds.list_runs() == runs


def test_a_run_without_checks_done_is_caught_under_preflight(world):
    """A dataset function that would start its run without declaring where its checks
    end is a programming error, found before it computes anything."""
    ds, _ = world

    def no_checks(samples, progress=False):
        with Run(samples, RunSummary("no_checks", ("n",)), len(samples), progress, "x"):
            raise AssertionError("the run started")

    with pytest.raises(RuntimeError, match="checks_done"):
        preflight(no_checks, ds)
