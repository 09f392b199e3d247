"""Forms that start right (issue 24), resolved with FiftyOne's own ``resolve_type`` as the
App server resolves them:

- a dataset with object features only: *Objects (patches field)* is preselected, the
  source masks field follows it (propagate_masks opens valid, not in error on the source
  field), ``write_dense_views`` offers the open sample's objects by name;
- a features field that does not exist on such a dataset: the advice is to choose the
  objects field as *Objects*, never to name the per-object record as a features field
  (that ran a whole-image propagation that recomputed features);
- evaluate_masks: the predictions default to the newest predicted field, never to the
  annotations they came from; the ground truth to a separate ground-truth field.
"""

import asyncio
import uuid

import numpy as np
import pytest

import fiftyone as fo
from fiftyone.operators.executor import resolve_type
from fiftyone.operators.registry import OperatorRegistry

from fiftyone_sdcorr.dataset.engine import preflight
from fiftyone_sdcorr.dataset.propagate import propagate_keypoints
from fiftyone_sdcorr.plugin.object_names import object_names
from panel_world import build_mask_dataset, build_objects_dataset

PREFIX = "@sdcorr/sdcorr/"


def _resolve(ds, name, params, **request):
    prop = asyncio.run(resolve_type(OperatorRegistry(), PREFIX + name,
                                    {"dataset_name": ds.name, "params": params, **request}))
    return prop.type.properties


def _invalid(props):
    return {k: p.error_message for k, p in props.items() if p.invalid}


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    ds = build_objects_dataset(f"sdcorr-forms-objects-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("fobj"))
    yield ds
    ds.delete()


@pytest.fixture(scope="module")
def masks(photo_paths, tmp_path_factory):
    ds, ids, _ = build_mask_dataset(f"sdcorr-forms-masks-{uuid.uuid4().hex[:8]}", photo_paths,
                                    tmp_path_factory.mktemp("fmasks"))
    yield ds, ids
    ds.delete()


def test_object_features_preselect_objects_and_the_source_follows(objects):
    ds = objects
    props = _resolve(ds, "propagate_masks", {})
    assert props["patches_field"].default == "detections"
    assert props["source_field"].default == "detections"
    names = list(props)
    assert names.index("patches_field") < names.index("source_field")  # chosen first, the source follows
    assert not _invalid(props), _invalid(props)
    # with the default values sent, as the App sends them: still valid
    defaults = {k: p.default for k, p in props.items() if p.default is not None}
    assert not _invalid(_resolve(ds, "propagate_masks", defaults))
    for name in ("propagate_keypoints", "compute_fused_features", "write_dense_views"):
        assert _resolve(ds, name, {})["patches_field"].default == "detections", name


def test_write_dense_views_offers_the_open_samples_objects(objects):
    ds = objects
    sample = ds.match(fo.ViewField("filepath").ends_with("canvas2.png")).first()
    props = _resolve(ds, "write_dense_views", {}, current_sample=sample.id)
    ref = props["reference_id"]
    dets = sample.detections.detections
    names = dict(zip((d.id for d in dets), object_names([(d.label, d.bounding_box) for d in dets],
                                                          (sample.metadata.width, sample.metadata.height)
                                                          if sample.metadata else (460, 240))))
    choices = {c.value: c.label for c in ref.view.choices}
    assert choices == names
    assert ref.default == dets[1].id  # the largest (the decoy is listed first)
    assert ref.view.label == "Reference object"
    assert not _invalid(props), _invalid(props)


def test_a_missing_features_field_advises_the_objects_field(objects):
    """Per-object features, whole images asked: the refusal says to choose the objects
    field as Objects; it never tells to name ``detections__sdcorr_features``."""
    ds = objects
    ref = ds.match_tags("reference").first()
    ref["kps"] = fo.Keypoints(keypoints=[fo.Keypoint(label="person", points=[(0.3, 0.5), (0.4, 0.6)])])
    ref.save()
    try:
        err = str(preflight(propagate_keypoints, ds, ds.match_tags("reference"), "kps", "out", progress=False))
        assert "choose 'detections' as Objects" in err, err
        assert "name that field" not in err and "detections__" not in err, err
    finally:
        ds.delete_sample_field("kps")


def test_evaluate_masks_defaults_follow_the_runs(masks):
    ds, ids = masks
    props = _resolve(ds, "evaluate_masks", {})
    assert props["pred_field"].default == "pred_masks"  # never the annotations it came from
    target = ds[ids["target"]]
    target["gt_eval"] = fo.Segmentation(mask=np.ones((30, 45), dtype=np.uint8))
    target.save()
    try:
        props = _resolve(ds, "evaluate_masks", {})
        assert (props["pred_field"].default, props["gt_field"].default) == ("pred_masks", "gt_eval")
    finally:
        ds.delete_sample_field("gt_eval")
