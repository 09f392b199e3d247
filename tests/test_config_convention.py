"""One convention for the dataset functions' parameters (issue 16, items 1 and 6).

- every keyword of a public dataset function defaults to ``None`` and means "the default
  of its config class" (``XConfig.build``); the two documented exceptions are the
  keywords where ``None`` is a value of its own (``eval_key=None``: compute only;
  ``tag=None``: no tag), whose defaults are read from the config class;
- ``features=`` (a ``FeatureConfig`` or a dict) gives the same result as the flat
  feature keywords; one setting given both ways with different values is refused,
  naming it;
- the operators' forms read their defaults and ranges from the config classes.
"""

import asyncio
import inspect
import uuid

import numpy as np
import pytest

import fiftyone as fo
from fiftyone.operators.executor import resolve_type
from fiftyone.operators.registry import OperatorRegistry

import fiftyone_sdcorr as sdc
from fiftyone_sdcorr.core.common.params import ParameterError
from fiftyone_sdcorr.dataset.config import (
    RANGES,
    EvaluationConfig,
    FeatureConfig,
    FeaturePCAConfig,
    MatchConfig,
    PropagationConfig,
    ReviewConfig,
)
from local_descriptor import LocalDescriptor

FUNCTIONS = ("compute_fused_features", "propagate_keypoints", "evaluate_keypoints", "flag_keypoint_annotations",
             "write_feature_pca", "write_similarity_heatmaps", "write_dense_views", "swap_instances",
             "propagate_masks")
#: keywords where None is a value of its own: their defaults are the config's
NONE_IS_A_VALUE = {("evaluate_keypoints", "eval_key"): EvaluationConfig.eval_key,
                   ("flag_keypoint_annotations", "tag"): ReviewConfig.tag}
POINTS = [[0.52, 0.55], [0.42, 0.40], [0.62, 0.40], [0.53, 0.75]]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_every_keyword_defaults_to_none(name):
    fn = getattr(sdc, name)
    for p in inspect.signature(fn).parameters.values():
        if p.default is inspect.Parameter.empty:
            continue
        want = NONE_IS_A_VALUE.get((name, p.name))
        assert p.default == want, f"{name}({p.name}={p.default!r})"


def test_build_ignores_none_and_builds_the_nested_match_config():
    cfg = PropagationConfig.build(source_field="a", output_field="b", top_k=None, combine="per_point",
                                  visibility_threshold=None)
    assert cfg.match == MatchConfig(combine="per_point")
    assert cfg.visibility_threshold == PropagationConfig.visibility_threshold
    review = ReviewConfig.build(gt_field="gt", combine=None, tag=None)
    assert review.match.combine == ReviewConfig.match.combine and review.tag is None
    assert EvaluationConfig.build(pred_field="p", gt_field="g", eval_key=None).eval_key is None
    with pytest.raises(ParameterError, match="'top_k'"):
        PropagationConfig.build(source_field="a", output_field="b", top_k=RANGES["top_k"][1] + 1)
    with pytest.raises(ParameterError, match="unknown parameter"):
        EvaluationConfig.build(pred_field="p", gt_field="g", top_k=3)


@pytest.fixture()
def pair(photo_paths):
    ds = fo.Dataset(f"sdcorr-convention-{uuid.uuid4().hex[:8]}")
    ds.add_samples([fo.Sample(filepath=photo_paths["chelsea"],
                              gt=fo.Keypoints(keypoints=[fo.Keypoint(label="cat", points=POINTS)])),
                    fo.Sample(filepath=photo_paths["chelsea"])])
    yield ds
    ds.delete()


def _points(ds, field):
    return np.array([kp.points for s in ds.exists(field) for kp in s[field].keypoints], dtype=float)


def test_features_as_a_dict_or_a_config_equals_the_flat_keywords(pair):
    ds, d = pair, LocalDescriptor(size=448, stride=14)
    ref = [ds.first().id]
    kw = dict(visibility_threshold=0.0, include_references=True, progress=False)
    sdc.propagate_keypoints(ds, ref, "gt", "flat", extractor=d, **kw)
    sdc.propagate_keypoints(ds, ref, "gt", "as_dict", features={"extractor": d}, **kw)
    sdc.propagate_keypoints(ds, ref, "gt", "as_config", features=FeatureConfig.build(extractor=d), **kw)
    sdc.propagate_keypoints(ds, ref, "gt", "both", features={"extractor": d}, extractor=d, **kw)  # the same: fine
    flat = _points(ds, "flat")
    assert flat.shape == (2, len(POINTS), 2)
    for field in ("as_dict", "as_config", "both"):
        np.testing.assert_array_equal(_points(ds, field), flat)


def test_a_setting_given_both_ways_differently_is_refused_by_name(pair, tmp_path):
    ds = pair
    before = ds.get_field_schema()
    with pytest.raises(ParameterError, match="'sd_model'"):
        sdc.propagate_keypoints(ds, [ds.first().id], "gt", "p", sd_model="a/b", features={"sd_model": "c/d"},
                                progress=False)
    with pytest.raises(ParameterError, match="'pca_dim'"):
        sdc.compute_fused_features(ds, pca_dim=64, features={"pca_dim": 32}, store_dir=str(tmp_path),
                                   progress=False)
    with pytest.raises(ParameterError, match="'device'"):
        sdc.flag_keypoint_annotations(ds, "gt", features=FeatureConfig.build(device="cpu"), device="meta",
                                      progress=False)
    with pytest.raises(ParameterError, match="'features'"):
        sdc.propagate_keypoints(ds, [ds.first().id], "gt", "p", features={"no_such_setting": 1}, progress=False)
    assert ds.get_field_schema() == before  # refused before anything was written


def _form(ds, name):
    prop = asyncio.run(resolve_type(OperatorRegistry(), f"@sdcorr/sdcorr/{name}",
                                    {"dataset_name": ds.name, "params": {}}))
    return prop.type.properties


def test_forms_read_defaults_and_ranges_from_the_configs(pair):
    ds = pair
    prop = _form(ds, "propagate_keypoints")
    assert prop["visibility_threshold"].default == PropagationConfig.visibility_threshold
    assert prop["top_k"].default == MatchConfig.top_k
    assert (prop["top_k"].type.min, prop["top_k"].type.max) == RANGES["top_k"]
    assert prop["combine"].default == MatchConfig.combine
    review = _form(ds, "flag_keypoint_annotations")
    assert review["combine"].default == ReviewConfig.match.combine
    assert review["alpha"].default == ReviewConfig.alpha
    assert (review["min_confidence"].type.min, review["min_confidence"].type.max) == RANGES["min_confidence"]
    pca = _form(ds, "write_feature_pca")
    assert pca["mode"].default == FeaturePCAConfig.mode
    assert pca["n_parts"].default == FeaturePCAConfig.n_parts
    assert (pca["n_parts"].type.min, pca["n_parts"].type.max) == RANGES["n_parts"]
    features = _form(ds, "compute_fused_features")
    assert features["projection_samples"].default == FeatureConfig.projection_samples
