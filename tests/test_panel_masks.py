"""The match panel without keypoints (issue 24), headless: a mask-only dataset
(``fo.Segmentation``) and an objects-only one (detections with instance masks and object
features), driven as the App drives them (tests/panel_driver.py).

The panel opens, the reference is chosen by similarity (the tagged reference first),
the masks are drawn over both sides, the dense views work, and on objects the Swap
button prompts ``swap_instances`` with the two objects shown.
"""

import uuid

import pytest

from panel_driver import PanelDriver, image_size
from panel_world import build_mask_dataset, build_objects_dataset

from fiftyone_sdcorr.plugin import panels


@pytest.fixture(scope="module")
def masks(photo_paths, tmp_path_factory):
    dataset, ids, _ = build_mask_dataset(f"sdcorr-panel-masks-{uuid.uuid4().hex[:8]}", photo_paths,
                                         tmp_path_factory.mktemp("panel-masks"))
    yield dataset, ids
    dataset.delete()


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    ds = build_objects_dataset(f"sdcorr-panel-objects-only-{uuid.uuid4().hex[:8]}",
                               tmp_path_factory.mktemp("objects-only"))
    yield ds
    ds.delete()


def test_mask_only_dataset_opens_with_masks_over_both_sides(masks):
    dataset, ids = masks
    d = PanelDriver(dataset, current_sample=ids["target"]).call("on_load")
    # the tagged reference, chosen without keypoints; the copy is the most similar anyway
    assert d.state["reference_id"] == ids["ref"]
    assert d.state["ref_field"] is None
    assert (d.state["mask_field"], d.state["pred_mask_field"]) == ("gt_masks", "pred_masks")
    props = d.properties()
    assert "ref_field" not in props and {"mask_field", "pred_mask_field", "reference"} <= set(props)
    assert not {"show", "error_lines"} & set(props)  # no keypoint options without keypoints
    (ref_mask,) = d.traces("reference|mask")
    (cur_mask,) = d.traces("current|mask")
    assert image_size(ref_mask) == image_size(d.traces("reference|photo")[0])
    assert image_size(cur_mask) == image_size(d.traces("current|photo")[0])
    assert "No annotated reference" not in d.status() and "gt_masks" in d.status()
    assert "propagate_masks" in props and "propagate" not in props
    # the dense view, on the stored features
    d.choose("view_mode", "dense")
    assert d.traces("current|dense") and d.traces("reference|dense")
    # the mask selectors drive the overlays
    d.choose("pred_mask_field", panels.NONE)
    assert not d.traces("current|mask") and d.traces("reference|mask")
    # "Propagate masks from this reference": the form pre-filled with it, a new field
    d.call("on_propagate_masks")
    (prompt,) = [r["params"] for r in d.requests if r["operator_uri"] == "prompt_user_for_operation"]
    assert prompt["operator_uri"] == "@sdcorr/sdcorr/propagate_masks"
    params = prompt["params"]
    assert params["source_field"] == "gt_masks" and params["reference_ids"] == [ids["ref"]]
    assert not dataset.has_field(params["output_field"]) and params["overwrite"] is False


def test_objects_only_dataset_opens_on_objects_and_offers_swap(objects):
    import fiftyone as fo

    ds = objects
    sample = ds.match(fo.ViewField("filepath").ends_with("canvas2.png")).first()
    d = PanelDriver(ds, current_sample=sample.id).call("on_load")
    dets = sample.detections.detections
    assert d.state["object_id"] == dets[1].id  # the largest object
    refs = d.state["references"]
    assert refs and all(r["object"] for r in refs)
    # by similarity: a full-size copy (identical crop) first, the tagged reference's first
    assert refs[0]["similarity"] > 0.99
    assert d.state["reference_object"] == refs[0]["object"]
    assert d.traces("current|photo") and d.traces("reference|photo")
    assert d.traces("current|mask") and d.traces("reference|mask")  # the instance masks
    assert "swap" in d.properties()
    d.call("on_swap")
    (prompt,) = [r["params"] for r in d.requests if r["operator_uri"] == "prompt_user_for_operation"]
    params = prompt["params"]
    assert params["source_id"] == refs[0]["object"] and params["target_id"] == dets[1].id
    # the reference object switch draws the other crop
    other = refs[-1]
    before = d.traces("reference|photo")[0]["source"]
    d.choose("reference", other["object"])  # as the App sends it: the control already shows it
    assert d.state["reference_object"] == other["object"]
    assert d.traces("reference|photo")[0]["source"] != before
    titles = [a["text"] for a in d.figure["layout"]["annotations"]]
    assert titles[1].endswith(other["label"].split(" · ")[1]), (titles, other["label"])
    d.choose("view_mode", "warp")
    assert d.traces("current|warp")
