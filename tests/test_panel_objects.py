"""The match panel on samples with several objects (issue 15), headless.

The COCO canvases of tests/test_objects.py (1, 2 and 3 pasted copies of one object, each
canvas with a half-size decoy listed first), imported with FiftyOne's own importer,
features per object and predictions per object from the real runs, then the panel driven
as the App drives it (tests/panel_driver.py). Every full-size crop equals the
reference's full-size crop, so where each point must land is known by construction.
"""

import uuid

import numpy as np
import pytest

import fiftyone as fo

import fiftyone_sdcorr as sc
from fiftyone_sdcorr.plugin import panel_ranking
from panel_driver import PanelDriver, image_size, place_of
from test_objects import NAMES, H, W, desc, write_coco

from fiftyone_sdcorr.plugin.object_names import object_names

STRIDE_FRACTION = 1.0 / 16  # one token of the test describer's 224 / 14 grid, as a crop fraction


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("panel-objects")
    write_coco(folder)
    ds = fo.Dataset.from_dir(data_path=str(folder / "data"), labels_path=str(folder / "labels.json"),
                             dataset_type=fo.types.COCODetectionDataset, label_types=["detections", "keypoints"],
                             name=f"sdcorr-panel-objects-{uuid.uuid4().hex[:8]}")
    ds.match(fo.ViewField("filepath").ends_with("canvas0.png")).tag_samples("reference")
    store = str(folder / "store")
    sc.compute_fused_features(ds, extractor=desc(), patches_field="detections", store_dir=store,
                              brain_key="sdcorr_objects", progress=False)
    got = sc.propagate_keypoints(ds, "reference", "keypoints", "pred", patches_field="detections",
                                 extractor=desc(), progress=False)
    assert got["predicted"] == 7, got.text()  # the reference canvas0's 2 objects are not targets
    yield ds
    ds.delete()


def names_of(sample):
    """How the panel names the sample's detections (label, position, size in pixels)."""
    dets = sample.detections.detections
    return object_names([(d.label, d.bounding_box) for d in dets], (W, H))


def test_objects_are_named_so_a_user_can_tell_them_apart(world):
    """Not "0: person", "1: person": the label, where the box sits and its size; the
    Object dropdown offers exactly these names."""
    target = _sample(world, "canvas2.png")
    names = names_of(target)
    assert len(set(names)) == len(names) and all(n.startswith("person (") for n in names), names
    assert names == [o["label"] for o in panel_ranking.sample_objects(
        world, target.id, panel_ranking.object_features(world))]
    assert object_names([("cat", [0.0, 0.0, 0.3, 0.2]), ("cat", [0.7, 0.7, 0.3, 0.3])], (400, 400)) == \
        ["cat (top-left, 120×80 px)", "cat (bottom-right, 120×120 px)"]
    assert object_names([("cat", [0.0, 0.0, 0.3, 0.2])] * 2, (400, 400)) == \
        ["cat (top-left, 120×80 px) #1", "cat (top-left, 120×80 px) #2"]


def _sample(ds, name):
    return ds.match(fo.ViewField("filepath").ends_with(name)).first()


def _marker_points(driver, name):
    """Normalised (to its side's crop) points of the marker trace ``name``."""
    (trace,) = driver.traces(name)
    side = name.split("|")[0]
    (img,) = driver.traces(f"{side}|photo")
    x0, s = place_of(img)
    w, h = image_size(img)
    y0 = img["y0"] - s / 2.0
    return [((x - x0) / (w * s), (y - y0) / (h * s)) for x, y in zip(trace["x"], trace["y"])]


def _open(ds, name):
    d = PanelDriver(ds, current_sample=_sample(ds, name).id)
    d.call("on_load")
    d.call("render")
    return d


def test_the_panel_shows_objects_side_by_side_with_their_match_lines(world):
    ds = world
    target = _sample(ds, "canvas2.png")
    d = _open(ds, "canvas2.png")
    dets = target.detections.detections
    # the current sample's objects, the largest (a full-size copy, not the decoy listed first) shown
    assert [o["id"] for o in d.state["objects"]] == [det.id for det in dets]
    assert d.state["object_id"] == dets[1].id
    assert d.state["object_features"]["patches_field"] == "detections"
    props = d.properties()
    assert [c["value"] for c in props["object"]["view"]["choices"]] == [det.id for det in dets]
    # the reference: the reference object this object's prediction came from
    ref = _sample(ds, "canvas0.png")
    pred = [kp for kp in target.pred.keypoints if kp.sdcorr_detection_id == dets[1].id]
    assert d.state["reference_id"] == ref.id
    assert d.state["reference_object"] == pred[0].sdcorr_reference_id == ref.detections.detections[1].id
    # each side is its object's crop (box + context margin: 100 x 150 px, shown at 256 high)
    for side in ("current", "reference"):
        (img,) = d.traces(f"{side}|photo")
        w, h = image_size(img)
        assert h == 256 and abs(w / h - 100 / 150) < 0.01
    # one line per keypoint; identical crops: each predicted point sits where its
    # reference point sits, within a token
    assert len(d.traces(prefix="line|")) == len(NAMES)
    cur, refp = _marker_points(d, "current|keypoints"), _marker_points(d, "reference|gt")
    assert len(cur) == len(refp) == len(NAMES)
    assert np.abs(np.array(cur) - np.array(refp)).max() < STRIDE_FRACTION
    titles = [a["text"] for a in d.figure["layout"]["annotations"]]
    assert titles == [f"current · canvas2.png · {names_of(target)[1]}",
                      f"reference · canvas0.png · {names_of(ref)[1]}"]


def test_choosing_another_object_reranks_the_references(world):
    ds = world
    target = _sample(ds, "canvas2.png")
    dets = target.detections.detections
    d = _open(ds, "canvas2.png")
    d.call("on_change_object", value=dets[3].id, path="controls.object")
    d.call("render")
    assert d.state["object_id"] == dets[3].id
    assert len(d.traces(prefix="line|")) == len(NAMES)
    assert d.figure["layout"]["annotations"][0]["text"] == f"current · canvas2.png · {names_of(target)[3]}"
    # the decoy: its most similar reference object is the reference's decoy
    d.call("on_change_object", value=dets[0].id, path="controls.object")
    d.call("render")
    decoy_ref = _sample(ds, "canvas0.png").detections.detections[0]
    assert d.state["references"][0]["object"] == decoy_ref.id
    assert d.state["reference_object"] == decoy_ref.id
    cur, refp = _marker_points(d, "current|keypoints"), _marker_points(d, "reference|gt")
    assert np.abs(np.array(cur) - np.array(refp)).max() < 2 * STRIDE_FRACTION
    # an object id of another sample is not a choice
    other = _sample(ds, "canvas1.png").detections.detections[1].id
    d.call("on_change_object", value=other, path="controls.object")
    assert d.state["object_id"] == dets[0].id


def test_another_reference_object_and_click_to_match(world):
    ds = world
    d = _open(ds, "canvas2.png")
    refs = d.state["references"]
    # reference objects of every annotated sample; the full-size copies first
    assert {r["id"] for r in refs} == {_sample(ds, n).id for n in ("canvas0.png", "canvas1.png")}
    assert len(refs) == 2 + 3 and all(r["similarity"] is not None for r in refs)
    assert refs[-1]["similarity"] < refs[0]["similarity"]
    other = next(r for r in refs if r["id"] == _sample(ds, "canvas1.png").id and r["similarity"] > 0.99)
    d.call("on_change_reference", value=other["object"], path="controls.reference")
    d.call("render")
    assert d.state["reference_id"] == other["id"] and d.state["reference_object"] == other["object"]
    assert "came from another reference object" in d.status()
    # click a pixel of the current crop: identical crops, the match is the same place
    (img,) = d.traces("current|photo")
    w, h = image_size(img)
    d.call("on_click_figure", trace="current|photo", idx=[int(0.3 * h), int(0.4 * w)])
    d.call("render")
    (star,) = d.traces("reference|match")
    (rimg,) = d.traces("reference|photo")
    x0, s = place_of(rimg)
    rw, rh = image_size(rimg)
    tx, ty = (star["x"][0] - x0) / (rw * s), (star["y"][0] - (rimg["y0"] - s / 2)) / (rh * s)
    assert abs(tx - 0.4) < STRIDE_FRACTION and abs(ty - 0.3) < STRIDE_FRACTION
    assert "object (image coordinates)" in d.status()


def test_review_and_propagate_act_on_the_chosen_object(world):
    ds = world
    target = _sample(ds, "canvas2.png")
    dets = target.detections.detections
    d = _open(ds, "canvas2.png")
    d.call("on_accept_instance")
    target.reload()
    verdicts = {kp.sdcorr_detection_id: kp.get_attribute_value("sdcorr_verdict", None)
                for kp in target.pred.keypoints}
    assert verdicts == {dets[0].id: None, dets[1].id: "accepted", dets[2].id: None, dets[3].id: None}
    d.call("on_propagate")
    (prompt,) = [r for r in d.requests if r["operator_uri"] == "prompt_user_for_operation"]
    params = prompt["params"]["params"]
    assert params["patches_field"] == "detections" and params["reference_ids"] == [d.state["reference_id"]]


def test_references_are_ranked_through_the_similarity_index(world):
    ds = world
    target = _sample(ds, "canvas2.png")
    obj = target.detections.detections[1].id
    key = panel_ranking.similarity_key(ds, "sdcorr_embedding", "detections")
    assert key == "sdcorr_objects"
    refs = ds.match_tags("reference")
    order = panel_ranking.index_order(ds, key, obj, refs, "detections")
    full = [det.id for det in refs.first().detections.detections if det.bounding_box[2] > 0.1]
    assert order is not None and order[0] == full[0] and len(order) == 2
    # whole-image features absent, a similarity index over the samples absent: no index
    assert panel_ranking.similarity_key(ds) is None


def test_dense_view_matches_inside_the_object_crops(world):
    """Dense correspondence on object frames: the crops' own stored features; identical
    crops, so each pixel of the current crop takes the reference crop's colour of the
    same place, and the warped reference crop is the current crop."""
    import base64
    import io

    from PIL import Image

    from fiftyone_sdcorr.core.matching.dense import position_colors

    def pixels(trace):
        with Image.open(io.BytesIO(base64.b64decode(trace["source"].split(",", 1)[1]))) as im:
            return np.asarray(im).astype(float)

    d = _open(world, "canvas2.png")
    d.call("on_change_view_mode", value="dense", path="controls.view_mode")
    d.call("render")
    (ref,), (cur,) = d.traces("reference|dense"), d.traces("current|dense")
    w, h = image_size(d.traces("current|photo")[0])
    assert image_size(ref) == image_size(d.traces("reference|photo")[0]) == (w, h)
    colors = position_colors(w, h).astype(float)
    got = pixels(cur)
    assert np.array_equal(pixels(ref), colors)
    sure = got[..., 3] > 0.5 * 255
    assert sure.mean() > 0.8
    token = 255.0 * STRIDE_FRACTION * max(w, h) / np.array([w, h])  # one token in colour units (R: x, G: y)
    err = (np.abs(got[..., :2] - colors[..., :2]) / token)[sure].max(-1)
    assert np.median(err) < 0.25 and (err < 1.0).mean() > 0.95
    assert "current object" in d.status()
    d.call("on_change_view_mode", value="warp", path="controls.view_mode")
    d.call("render")
    (warp,) = d.traces("current|warp")
    photo, got = pixels(d.traces("current|photo")[0]), pixels(warp)
    valid = got[..., 3] > 0
    assert valid.mean() > 0.95 and np.median(np.abs(got[..., :3] - photo)[valid]) < 8


def test_dense_pictures_per_object(world, tmp_path):
    """write_dense_views on a patches view: the reference OBJECT's position colours carried
    onto every object, each drawn in its crop's place; identical full-size copies get the
    colour map itself (within a token)."""
    from PIL import Image

    from fiftyone_sdcorr.core.matching.dense import position_colors
    from fiftyone_sdcorr.core.common.geometry import Crop
    from fiftyone_sdcorr.dataset.feature_views import write_dense_views

    ds = world
    ref_det = _sample(ds, "canvas0.png").detections.detections[1]
    got = write_dense_views(ds.to_patches("detections"), ref_det.id, "dense_objects", resolution=64,
                            output_dir=str(tmp_path), progress=False)
    assert got["written"] == 3 and not got["failed"], got.text()
    target = _sample(ds, "canvas2.png")
    target.reload()
    pic = np.asarray(Image.open(target["dense_objects"])).astype(float)
    H, W = pic.shape[:2]
    assert (W, H) == Image.open(target.filepath).size  # small canvases: drawn at their own size
    margin = panel_ranking.object_features(ds).margin
    for det in target.detections.detections[1:]:  # the full-size copies
        crop = Crop.of_box(W, H, det.bounding_box, margin)
        left, top, right, bottom = (int(round(v)) for v in (crop.left, crop.top, crop.right, crop.bottom))
        region = pic[top:bottom, left:right]
        want = position_colors(right - left, bottom - top).astype(float)
        token = 255.0 * STRIDE_FRACTION * max(right - left, bottom - top) / np.array([right - left, bottom - top])
        err = (np.abs(region[..., :2] - want[..., :2]) / token).max(-1)
        assert np.median(err) < 0.25 and (err < 1.0).mean() > 0.95
    assert "dense_objects" in ds.app_config.media_fields
