"""The match panel through FiftyOne's operator machinery (no browser).

Each panel method runs as the App runs it: ``execute_operator(panel_uri, params={
"__method__": ..., "panel_id": ..., "panel_state": ..., <event params>})``. The panel answers
with App messages (``patch_panel_state`` and ``show_panel_output``); :class:`PanelDriver`
applies the state patches the way the App does and keeps the last rendered output, so
the tests assert on exactly what the App would draw.

Dataset: real photos; a reference with ground-truth keypoints (and a skeleton), a target
that is the same image (identity pair: every match must land where it started) and a
second reference of another image; dense features from the deterministic local
descriptor (tests/local_descriptor.py) written into the real feature store; predicted
keypoints from the real ``propagate_keypoints``.
"""

import math
import os
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

import fiftyone as fo
import fiftyone.operators as foo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from panel_world import GT_POINTS, SKELETON_LABELS, build_panel_dataset, clone_demo, demo_ids  # noqa: E402
from snapshots import field_snapshot  # noqa: E402

from fiftyone_sdcorr.core.pictures import visualize as vis  # noqa: E402
from fiftyone_sdcorr.plugin import panels  # noqa: E402

from panel_driver import PANEL_URI, PanelDriver, image_size, place_of, to_plot  # noqa: E402,F401


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(photo_paths, tmp_path_factory):
    dataset, ids, describer = build_panel_dataset(
        f"sdcorr-panel-{uuid.uuid4().hex[:8]}", photo_paths, tmp_path_factory.mktemp("panel"))
    yield dataset, ids, describer
    dataset.delete()


# --------------------------------------------------------------------------- tests
def test_panel_is_registered():
    from fiftyone.operators.registry import OperatorRegistry

    panel = OperatorRegistry().get_operator(PANEL_URI)
    assert panel is not None
    assert panel.config.surfaces == "grid modal"
    assert "on_change_current_sample" in panel.resolve_panel_config()


def test_on_load_draws_the_pair_with_keypoint_lines(world):
    dataset, ids, _ = world
    d = PanelDriver(dataset, current_sample=ids["target"]).call("on_load")

    # default reference: the most similar annotated sample by the global embedding
    assert d.state["reference_id"] == ids["ref"]
    assert [r["id"] for r in d.state["references"]] == [ids["ref"], ids["ref2"]]
    assert d.state["references"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert d.state["gt_field"] == "gt" and d.state["pred_field"] == "pred"

    # dropdown offers the references, current value is the chosen one
    props = d.properties()
    ref_view = props["reference"]["view"]
    assert [c["value"] for c in ref_view["choices"]] == [ids["ref"], ids["ref2"]]
    assert props["figure"]["view"]["on_click"].endswith("on_click_figure")

    cur, ref = d.traces("current|photo")[0], d.traces("reference|photo")[0]
    assert cur["type"] == "image" and cur["source"].startswith("data:image/jpeg;base64,")
    w, h = image_size(cur)
    assert max(w, h) <= panels.MAX_SIDE
    assert image_size(ref) == (w, h)
    # side by side, same height, reference to the right
    assert ref["x0"] > cur["x0"] + w * cur["dx"] - cur["dx"]
    layout = d.figure["layout"]
    assert layout["paper_bgcolor"] == "rgba(0,0,0,0)" and layout["plot_bgcolor"] == "rgba(0,0,0,0)"

    # one line per visible keypoint, from the prediction (current) to the reference point
    target = dataset[ids["target"]]
    pred = target["pred"].keypoints[0]
    lines = d.traces(prefix="line|")
    visible = [i for i, p in enumerate(GT_POINTS) if not math.isnan(p[0])]
    assert len(lines) == len(visible)
    for i, line in zip(visible, lines):
        assert line["name"] == f"line|{SKELETON_LABELS[i]}"
        start = to_plot(cur, w, h, pred.points[i])
        end = to_plot(ref, w, h, GT_POINTS[i])
        assert line["x"] == pytest.approx([start[0], end[0]])
        assert line["y"] == pytest.approx([start[1], end[1]])
        # identity pair: the prediction is the reference point (within half a token)
        assert np.allclose(pred.points[i], GT_POINTS[i], atol=0.5 * 14 / 224 + 1e-9)
    # per-label colours, opacity from confidence (rgba)
    assert len({line["line"]["color"][:-7] for line in lines}) == len(lines)
    assert all(line["line"]["color"].startswith("rgba(") for line in lines)
    # skeleton edges drawn on both images
    assert d.traces("reference|skeleton") and d.traces("current|skeleton")
    # predicted markers carry ids "<instance>:<point>" so a click can select them
    markers = d.traces("current|keypoints")[0]
    assert markers["ids"] == [f"0:{i}" for i in visible]


def test_click_on_a_pixel_shows_its_match_and_heat_map(world):
    dataset, ids, describer = world
    d = PanelDriver(dataset, current_sample=ids["target"]).call("on_load")
    cur = d.traces("current|photo")[0]
    w, h = image_size(cur)
    row, col = int(0.55 * h), int(0.46 * w)
    d.call("on_click_figure", trace="current|photo", trace_idx=0, idx=[row, col])

    x, y = (col + 0.5) / w, (row + 0.5) / h
    assert d.state["click"] == {"side": "current", "x": pytest.approx(x), "y": pytest.approx(y)}
    # identity pair: the best match is the token under the click, in the same place
    fused = describer.describe_one(dataset[ids["target"]].filepath)
    token = fused.letterbox.normalized_to_token([x, y], fused.stride)
    expected = fused.letterbox.token_to_normalized(token.double(), fused.stride).tolist()
    ref = d.traces("reference|photo")[0]
    star = d.traces("reference|match")[0]
    ex, ey = to_plot(ref, w, h, expected)
    assert star["x"] == pytest.approx([ex]) and star["y"] == pytest.approx([ey])
    assert abs(expected[0] - x) <= 0.5 * 14 / 224 * max(1, fused.letterbox.size / fused.letterbox.resized_width)
    click = d.traces("current|click")[0]
    assert click["x"] == pytest.approx([to_plot(cur, w, h, (x, y))[0]])
    # the heat map lies over the other (reference) image, same placement and size
    heat = d.traces("reference|heatmap")[0]
    assert heat["type"] == "image" and image_size(heat) == (w, h)
    assert (heat["x0"], heat["dx"]) == (ref["x0"], ref["dx"])
    assert "cosine 1.000" in d.status()

    # and the other way round: a click on the reference is matched into the current image
    d.call("on_click_figure", trace="reference|photo", idx=[row, col])
    assert d.traces("current|match") and d.traces("current|heatmap")
    assert not d.traces("reference|heatmap")

    # a click on the heat map itself counts as a click on that image
    d.call("on_click_figure", trace="current|heatmap", idx=[10, 10])
    assert d.state["click"]["side"] == "current"

    # switching the heat map off keeps the match but drops the overlay
    d.call("on_change_heatmap", value=False)
    assert d.traces("reference|match") and not d.traces("reference|heatmap")


def test_match_in_a_different_image_uses_the_real_features(world):
    dataset, ids, describer = world
    d = PanelDriver(dataset, current_sample=ids["target"]).call("on_load")
    d.call("on_change_reference", value=ids["ref2"])
    assert d.state["reference_id"] == ids["ref2"]
    assert d.state["controls"]["reference"] == ids["ref2"]
    cur = d.traces("current|photo")[0]
    w, h = image_size(cur)
    d.call("on_click_figure", trace="current|photo", idx=[h // 3, w // 3])
    x, y = (w // 3 + 0.5) / w, (h // 3 + 0.5) / h
    a = describer.describe_one(dataset[ids["target"]].filepath)
    b = describer.describe_one(dataset[ids["ref2"]].filepath)
    m = vis.match_point(a, b, (x, y))
    ref = d.traces("reference|photo")[0]
    rw, rh = image_size(ref)
    star = d.traces("reference|match")[0]
    assert (star["x"][0], star["y"][0]) == pytest.approx(to_plot(ref, rw, rh, m.target_xy))
    # no prediction from ref2 in the target: no lines, and the status says so
    assert not d.traces(prefix="line|")
    assert "Propagate" in d.status()


def test_feature_views_pca_and_parts(world):
    dataset, ids, _ = world
    d = PanelDriver(dataset, current_sample=ids["target"]).call("on_load")
    d.call("on_change_view_mode", value="pca")
    pa, pb = d.traces("current|pca")[0], d.traces("reference|pca")[0]
    # identity pair, co-fitted PCA: the same colours in both images
    assert pa["source"] == pb["source"]
    assert image_size(pa) == image_size(d.traces("current|photo")[0])
    d.call("on_change_view_mode", value="parts")
    assert "n_parts" in d.properties()
    ca, cb = d.traces("current|parts")[0], d.traces("reference|parts")[0]
    assert ca["source"] == cb["source"] and 0 < ca["opacity"] < 1
    d.call("on_change_n_parts", value=3)
    assert d.state["controls"]["n_parts"] == 3
    assert d.traces("current|parts")[0]["source"] != ca["source"]

    # different images: PCA differs, but is deterministic from one render to the next
    d.call("on_change_reference", value=ids["ref2"])
    d.call("on_change_view_mode", value="pca")
    first = d.traces("reference|pca")[0]["source"]
    d.call("on_change_show", value="ground_truth")
    assert d.traces("reference|pca")[0]["source"] == first


# --------------------------------------------------------------------------- dense views
CROP = (0.20, 0.05, 1.0, 0.95)  # the crop world's target is this crop of the reference image


@pytest.fixture(scope="module")
def crop_world(photo_paths, tmp_path_factory):
    dataset, ids, describer = build_panel_dataset(
        f"sdcorr-panel-crop-{uuid.uuid4().hex[:8]}", photo_paths, tmp_path_factory.mktemp("panel-crop"), crop=CROP)
    yield dataset, ids, describer
    dataset.delete()


def _pixels(trace):
    """The picture of an image trace (its data URI) as an array."""
    import base64
    import io

    from PIL import Image

    raw = base64.b64decode(trace["source"].split(",", 1)[1])
    with Image.open(io.BytesIO(raw)) as im:
        return np.asarray(im)


def test_dense_view_colours_the_crop_by_the_reference_positions(crop_world):
    from fiftyone_sdcorr.core.matching.dense import position_colors

    dataset, ids, _ = crop_world
    d = PanelDriver(dataset, current_sample=ids["target"]).call("on_load")
    views = [c["value"] for c in d.properties()["view_mode"]["view"]["choices"]]
    assert {"dense", "warp"} <= set(views)
    d.call("on_change_view_mode", value="dense")
    assert d.state["controls"]["view_mode"] == "dense" and "Dense correspondence" in d.status()
    (ref,), (cur,) = d.traces("reference|dense"), d.traces("current|dense")
    rw, rh = image_size(d.traces("reference|photo")[0])
    cw, ch = image_size(d.traces("current|photo")[0])
    # the reference: the paper's colour map over the whole image, drawn where the photo is
    colors = position_colors(rw, rh)
    assert np.array_equal(_pixels(ref), colors)
    assert (ref["x0"], ref["dx"]) == (d.traces("reference|photo")[0]["x0"], d.traces("reference|photo")[0]["dx"])
    # the current crop: each pixel the colour of the reference position it shows (the crop's
    # offsets are known), opacity = confidence
    got = _pixels(cur).astype(float)
    assert got.shape == (ch, cw, 4) and np.median(got[..., 3]) > 0.5 * 255
    ys, xs = np.mgrid[0:ch, 0:cw]
    tx = CROP[0] + (xs + 0.5) / cw * (CROP[2] - CROP[0])
    ty = CROP[1] + (ys + 0.5) / ch * (CROP[3] - CROP[1])
    want = colors[(ty * rh).astype(int), (tx * rw).astype(int)].astype(float)
    token = 255.0 * 14 / 224 * max(rw, rh) / np.array([rw, rh])  # one token in colour units (R: x, G: y)
    err = np.abs(got[..., :2] - want[..., :2]) / token
    sure = got[..., 3] > 0.5 * 255
    # (the test descriptor is not scale-invariant and the crop is shown larger: most of the
    # crop, not its left edge, where the fur looks alike)
    assert np.median(err[sure]) < 0.5 and (err[sure].max(-1) < 1.5).mean() > 0.8  # 0.17; 88%
    near = [err[int((y - CROP[1]) / (CROP[3] - CROP[1]) * ch), int((x - CROP[0]) / (CROP[2] - CROP[0]) * cw)].max()
            for x, y in GT_POINTS[:4]]
    assert sum(e < 1.5 for e in near) >= 3, near  # the keypoints: the nose, mouth, right eye exact
    # computed once per pair: the next drawing reuses the pictures
    d.call("on_change_show", value="ground_truth")
    assert d.traces("current|dense")[0]["source"] == cur["source"]


def test_warp_view_draws_the_reference_carried_onto_the_crop(crop_world):
    from PIL import Image

    dataset, ids, _ = crop_world
    d = PanelDriver(dataset, current_sample=ids["target"]).call("on_load")
    d.call("on_change_view_mode", value="warp")
    (warp,) = d.traces("current|warp")
    assert not d.traces("reference|warp") and not d.traces(prefix="current|dense")
    assert "Reference warped" in d.status()
    photo = _pixels(d.traces("current|photo")[0]).astype(float)
    got = _pixels(warp).astype(float)
    assert got.shape == photo.shape[:2] + (4,)
    valid = got[..., 3] > 0
    assert valid.mean() > 0.95
    # the warped reference looks like the current crop; the reference merely resized does not
    # (compared at a token's scale: 16 x 16 blocks)
    def coarse(a):
        return np.asarray(Image.fromarray(a.astype(np.uint8)).resize((16, 16), Image.BOX), float)

    ref = Image.open(dataset[ids["ref"]].filepath).convert("RGB").resize(photo.shape[1::-1])
    err = np.abs(coarse(got[..., :3]) - coarse(photo)).mean()
    base = np.abs(coarse(np.asarray(ref, float)) - coarse(photo)).mean()
    assert err < 0.6 * base  # 9.3 against 21
    # features missing: the same message as the other feature views
    d = PanelDriver(dataset, current_sample=ids["plain"]).call("on_load")
    d.call("on_change_view_mode", value="warp")
    assert not d.traces("current|warp") and "Feature views need stored features" in d.status()


def test_show_ground_truth_and_error_lines(world):
    dataset, ids, _ = world
    d = PanelDriver(dataset, current_sample=ids["target"]).call("on_load")
    n_errors = len(d.traces(prefix="error|"))
    assert n_errors == 4  # predicted and ground truth both exist on the target
    d.call("on_change_error_lines", value=False)
    assert not d.traces(prefix="error|")
    d.call("on_change_show", value="ground_truth")
    assert d.traces("current|gt") and not d.traces("current|keypoints")
    assert all(t["line"]["dash"] == "dot" for t in d.traces(prefix="line|"))
    d.call("on_change_show", value="both")
    assert d.traces("current|gt") and d.traces("current|keypoints")


def test_accept_and_reject_write_filterable_review(world):
    dataset, ids, _ = world
    d = PanelDriver(dataset, current_sample=ids["target"]).call("on_load")
    # a click on a predicted marker selects that point
    d.call("on_click_figure", trace="current|keypoints", id="0:2", idx=2)
    assert d.state["selected_point"] == {"instance": 0, "point": 2}
    assert {"accept_point", "reject_point"} <= set(d.properties())
    d.call("on_reject_point")
    kp = dataset[ids["target"]]["pred"].keypoints[0]
    assert kp[panels.POINT_REVIEW_ATTR][2] == "rejected"
    assert kp[panels.POINT_REVIEW_ATTR][0] is None
    assert any(r["operator_uri"] == "reload_samples" for r in d.requests)
    # named by its keypoint name, as the figure's hover names it, and marked on the figure
    assert "**nose**" in d.status() and "rejected" in d.status() and "point 2" not in d.status()
    (marks,) = d.traces("current|verdicts")
    assert marks["text"] == ["✗"]
    (pred,) = d.traces("current|keypoints")
    nose = pred["ids"].index("0:2")
    assert (marks["x"][0], marks["y"][0]) == (pred["x"][nose], pred["y"][nose])
    d.call("on_click_figure", trace="current|keypoints", id="0:0", idx=0)
    d.call("on_accept_point")
    assert "**left eye**" in d.status()
    assert sorted(d.traces("current|verdicts")[0]["text"]) == ["✓", "✗"]

    d.call("on_clear")
    d.call("on_accept_instance")
    kp = dataset[ids["target"]]["pred"].keypoints[0]
    assert kp[panels.REVIEW_ATTR] == "accepted"
    assert dataset.match_labels(tags="sdcorr:accepted").count() == 1
    d.call("on_reject_instance")
    assert dataset.match_labels(tags="sdcorr:accepted").count() == 0
    assert dataset.match_labels(tags="sdcorr:rejected", fields="pred").count() == 1
    # the source annotation is never touched
    assert panels.REVIEW_ATTR not in dataset[ids["ref"]]["gt"].keypoints[0]


def test_propagate_prompts_the_operator_with_this_reference(world):
    dataset, ids, _ = world
    d = PanelDriver(dataset, current_sample=ids["target"]).call("on_load")
    d.call("on_propagate")
    prompts = [r for r in d.requests if r["operator_uri"] == "prompt_user_for_operation"]
    assert len(prompts) == 1
    p = prompts[0]["params"]
    assert p["operator_uri"] == "@sdcorr/sdcorr/propagate_keypoints"
    assert p["params"]["references"] == "ids"
    assert p["params"]["reference_ids"] == [ids["ref"]]
    # the reference field shown, a NEW output field, overwrite off, the current view as targets
    assert p["params"]["source_field"] == "gt"
    assert p["params"]["output_field"] == "sdcorr_keypoints" and not dataset.has_field("sdcorr_keypoints")
    assert p["params"]["overwrite"] is False
    # the App shows the whole dataset: FiftyOne's target selector then offers only "DATASET"
    assert p["params"]["view_target"] == "DATASET"

    # a filtered view in the App: the current view is the target
    d = PanelDriver(dataset, current_sample=ids["target"], view=dataset.exists("gt")).call("on_load")
    d.call("on_propagate")
    p = [r for r in d.requests if r["operator_uri"] == "prompt_user_for_operation"][0]["params"]
    assert p["params"]["view_target"] == "CURRENT_VIEW"

    # with samples selected in the grid, the selection is the target
    d = PanelDriver(dataset, current_sample=ids["target"], selected=[ids["target"], ids["plain"]]).call("on_load")
    d.call("on_propagate")
    p = [r for r in d.requests if r["operator_uri"] == "prompt_user_for_operation"][0]["params"]
    assert p["params"]["view_target"] == "SELECTED_SAMPLES"
    assert p["params"]["reference_ids"] == [d.state["reference_id"]]


def test_missing_features_and_no_reference(world):
    dataset, ids, _ = world
    # a sample without stored features: photos and lines still draw, clicks explain
    d = PanelDriver(dataset, current_sample=ids["plain"]).call("on_load")
    assert d.traces("current|photo") and d.traces("reference|photo")
    assert "compute_features" in d.properties()
    d.call("on_click_figure", trace="current|photo", idx=[5, 5])
    assert not d.traces("reference|match")
    assert "features" in d.status()
    d.call("on_compute_features")
    assert any(r["params"].get("operator_uri") == "@sdcorr/sdcorr/compute_fused_features"
               for r in d.requests if r["operator_uri"] == "prompt_user_for_operation")

    # grid with nothing selected: a hint, no figure
    d = PanelDriver(dataset).call("on_load")
    assert "figure" not in d.properties() and "hint" in d.properties()


def test_grid_with_two_selected_samples(world):
    dataset, ids, _ = world
    d = PanelDriver(dataset, selected=[ids["target"], ids["ref2"]]).call("on_load")
    assert d.state["current_id"] == ids["target"]
    assert d.state["reference_id"] == ids["ref2"]
    assert d.traces("current|photo") and d.traces("reference|photo")
    d.call("on_change_selected")
    assert d.state["reference_id"] == ids["ref2"]


def test_visualize_helpers_exact_geometry(world):
    dataset, ids, describer = world
    fused = describer.describe_one(dataset[ids["ref2"]].filepath)  # 600 x 400: letterboxed
    lb = fused.letterbox
    w, h = lb.width, lb.height
    # a token map of column indices resampled to the image reads back each pixel's token
    cols = np.tile(np.arange(fused.grid, dtype=np.float32), (fused.grid, 1))
    rows = cols.T.copy()
    up_c = vis.token_map_to_image(cols, fused, w, h, mode="nearest")
    up_r = vis.token_map_to_image(rows, fused, w, h, mode="nearest")
    for px, py in [(0, 0), (w - 1, h - 1), (123, 77), (300, 399)]:
        tok = lb.pixel_to_token([px + 0.5, py + 0.5], fused.stride).tolist()
        assert (up_c[py, px], up_r[py, px]) == (tok[0], tok[1])
    # display index <-> normalised round trip
    for (x, y) in [(0.0, 0.0), (0.999, 0.5), (0.3141, 0.2718)]:
        r, c = vis.normalized_to_pixel_index(x, y, 300, 200)
        nx, ny = vis.pixel_index_to_normalized(r, c, 300, 200)
        assert abs(nx - x) <= 0.5 / 300 + 1e-12 and abs(ny - y) <= 0.5 / 200 + 1e-12
    # k-means is deterministic for a seed, and shared between the two images
    a = describer.describe_one(dataset[ids["target"]].filepath)
    p1, p2 = vis.kmeans_parts(a, fused, k=5, seed=3), vis.kmeans_parts(a, fused, k=5, seed=3)
    assert np.array_equal(p1.labels_a, p2.labels_a) and np.array_equal(p1.labels_b, p2.labels_b)
    assert set(np.unique(p1.labels_b)) <= set(range(-1, 5))
    assert (p1.labels_b[~fused.valid_mask().numpy()] == -1).all()
    sizes = np.bincount(np.concatenate([p1.labels_a[p1.labels_a >= 0], p1.labels_b[p1.labels_b >= 0]]))
    assert list(sizes) == sorted(sizes, reverse=True)


# --------------------------------------------------------------------------- the demo dataset
@pytest.fixture(scope="module")
def demo(demo_build):
    """A copy of the README demo's dataset (the demo command, tiny models, run once per session)."""
    dataset = clone_demo(demo_build, f"sdcorr-panel-demo-{uuid.uuid4().hex[:8]}")
    yield dataset, demo_ids(dataset)
    dataset.delete()


@pytest.fixture
def demo_copy(demo):
    """A throw-away clone of the demo dataset (features, records and runs included), for
    tests that write into it."""
    dataset, _ = demo
    clone = dataset.clone(f"sdcorr-panel-demo-copy-{uuid.uuid4().hex[:8]}")
    yield clone, demo_ids(clone)
    clone.delete()


def choices(d, name):
    return [c["value"] for c in d.properties()[name]["view"]["choices"]]


def prompt_params(d):
    prompts = [r for r in d.requests if r["operator_uri"] == "prompt_user_for_operation"]
    assert len(prompts) == 1
    assert prompts[0]["params"]["operator_uri"] == "@sdcorr/sdcorr/propagate_keypoints"
    return prompts[0]["params"]["params"]


def test_defaults_on_the_demo_dataset_show_its_reference(demo):
    """The demo annotates its reference in `keypoints`, predicts into `predicted` and keeps
    the copies' ground truth in `ground_truth`: the panel picks exactly these (not the first
    field alphabetically) and draws the reference's match lines."""
    dataset, ids = demo
    for d in (PanelDriver(dataset, current_sample=ids["crop"]).call("on_load"),
              PanelDriver(dataset, selected=[ids["crop"], ids["reference"]]).call("on_load")):
        assert (d.state["ref_field"], d.state["pred_field"], d.state["gt_field"]) == \
            ("keypoints", "predicted", "ground_truth")
        assert d.state["reference_id"] == ids["reference"]
        # one line per reference keypoint, error lines against the copy's ground truth
        assert len(d.traces(prefix="line|")) == 5
        assert len(d.traces(prefix="error|")) == 5
        assert "No predictions" not in d.status() and "has no keypoints" not in d.status()
        # the selectors offer the Keypoints fields (and "none" where a field is optional)
        assert set(choices(d, "ref_field")) == {"keypoints", "ground_truth", "predicted"}
        assert choices(d, "pred_field")[0] == "predicted"
        assert set(choices(d, "gt_field")) == {"keypoints", "ground_truth", "predicted", panels.NONE}
        assert d.state["controls"]["ref_field"] == "keypoints"
        assert d.state["controls"]["pred_field"] == "predicted"
        assert d.state["controls"]["gt_field"] == "ground_truth"
    # the tagged reference heads the reference list
    d = PanelDriver(dataset, current_sample=ids["mirrored"]).call("on_load")
    assert d.state["references"][0]["id"] == ids["reference"] and d.state["references"][0]["tagged"]
    assert "reference" in d.state["references"][0]["label"]


def test_field_selectors_change_the_figure_and_are_remembered_per_dataset(demo_copy, world):
    dataset, ids = demo_copy
    d = PanelDriver(dataset, current_sample=ids["crop"]).call("on_load")
    photo = d.traces("reference|photo")[0]["source"]

    # no ground truth: no error lines, the prediction lines stay
    d.call("on_change_gt_field", value=panels.NONE)
    assert d.state["gt_field"] is None and d.state["controls"]["gt_field"] == panels.NONE
    assert not d.traces(prefix="error|") and len(d.traces(prefix="line|")) == 5

    # the copies' ground truth as reference keypoints: the references are the other copies
    d.call("on_change_ref_field", value="ground_truth")
    refs = [r["id"] for r in d.state["references"]]
    assert set(refs) == {ids["half_size"], ids["crop_upscaled"], ids["mirrored"]}
    assert d.state["reference_id"] in refs
    assert d.traces("reference|photo")[0]["source"] != photo
    assert d.traces("reference|gt")  # the copy's annotation is drawn on the reference side

    # a field that is not a Keypoints field is refused
    d.call("on_change_pred_field", value="role")
    assert d.state["pred_field"] == "predicted" and d.state["controls"]["pred_field"] == "predicted"
    d.call("on_change_ref_field", value=panels.NONE)  # the references' field cannot be "none"
    assert d.state["ref_field"] == "ground_truth"

    # a new panel on this dataset starts from these choices ...
    d2 = PanelDriver(dataset, current_sample=ids["half_size"]).call("on_load")
    assert (d2.state["ref_field"], d2.state["pred_field"], d2.state["gt_field"]) == \
        ("ground_truth", "predicted", None)
    # ... a panel on another dataset does not
    w, wids, _ = world
    d3 = PanelDriver(w, current_sample=wids["target"]).call("on_load")
    assert (d3.state["ref_field"], d3.state["pred_field"], d3.state["gt_field"]) == ("gt", "pred", "gt")
    # and the same panel moved to another dataset takes that dataset's fields
    d2.dataset, d2.current_sample = w, wids["target"]
    d2.call("on_change_dataset")
    assert (d2.state["ref_field"], d2.state["gt_field"]) == ("gt", "gt")
    d2.dataset, d2.current_sample = dataset, ids["half_size"]
    d2.call("on_change_dataset")
    assert d2.state["ref_field"] == "ground_truth"


def test_a_choice_draws_the_figure_once_duplicates_and_echoes_draw_nothing(demo_copy):
    """What the App sends for one dropdown choice (measured in Chromium): the change event
    twice, with the same state, then the change event of every control the panel set in
    answer (an echo). FiftyOne renders the figure after every event; before this was
    handled, choosing a reference field drew the figure 3 times, and under load the redraws
    queued up. Now one choice, one drawing; and a real choice still draws."""
    dataset, ids = demo_copy
    d = PanelDriver(dataset, current_sample=ids["crop"]).call("on_load")

    def drew():
        return any(r["operator_uri"] == "show_panel_output" for r in d.requests)

    # the user picks ground_truth as reference keypoints: the App sets the control, then sends
    d.state.setdefault("controls", {})["ref_field"] = "ground_truth"
    choice = {"__method__": "on_change_ref_field", "panel_id": d.panel_id, "panel_state": d.state,
              "path": "controls.ref_field", "value": "ground_truth"}
    d.send(choice)
    assert drew() and d.state["ref_field"] == "ground_truth"
    reference = d.state["reference_id"]
    assert reference != ids["reference"]  # a copy: chelsea has no ground_truth
    # ... the same event again, as the App sends it (the state before the answer)
    before = dict(d.state)
    d.send({**d.last_params})
    assert not drew() and d.state == before
    # ... the echo of the reference control the panel set
    d.call("on_change_reference", path="controls.reference", value=reference)
    assert not drew() and d.state["reference_id"] == reference
    # ... a late copy of the first event, after the state took the choice: nothing to do
    d.call("on_change_ref_field", path="controls.ref_field", value="ground_truth")
    assert not drew()

    # real choices still draw: another reference, another view, back to the first field
    other = next(r["id"] for r in d.state["references"] if r["id"] != reference)
    d.call("on_change_reference", path="controls.reference", value=other)
    assert drew() and d.state["reference_id"] == other
    d.call("on_change_reference", path="controls.reference", value=reference)  # and straight back
    assert drew() and d.state["reference_id"] == reference
    d.call("on_change_view_mode", path="controls.view_mode", value="parts")
    assert drew() and d.traces("current|parts")
    d.call("on_change_view_mode", path="controls.view_mode", value="parts")  # the same again
    assert not drew()
    d.call("on_change_ref_field", path="controls.ref_field", value="keypoints")
    assert drew() and d.state["reference_id"] == ids["reference"]


def test_choices_in_quick_succession_the_last_one_wins(demo_copy):
    """Two choices sent before the answer to the first came back (the CI failure of
    test_browser.py: "Reference keypoints" then "Ground truth", the figure stuck on the
    state the second event was sent with): each event is handled on the newest state, so
    the figure ends on both choices; the same for the Reference and View dropdowns."""
    import copy

    dataset, ids = demo_copy
    d = PanelDriver(dataset, current_sample=ids["crop"]).call("on_load")
    d.call("on_change_gt_field", path="controls.gt_field", value=panels.NONE)
    d.call("on_change_ref_field", path="controls.ref_field", value="ground_truth")
    assert d.state["reference_id"] != ids["reference"] and not d.traces(prefix="error|")

    def stale_event(state, method, path, value):
        return {"__method__": method, "panel_id": d.panel_id, "panel_state": state, "path": path, "value": value}

    # the App sets both controls, and sends both events with the state it holds
    sent = copy.deepcopy(d.state)
    sent["controls"].update(ref_field="keypoints", gt_field="ground_truth")
    d.send(stale_event(copy.deepcopy(sent), "on_change_ref_field", "controls.ref_field", "keypoints"))
    d.send(stale_event(copy.deepcopy(sent), "on_change_gt_field", "controls.gt_field", "ground_truth"))
    assert (d.state["ref_field"], d.state["gt_field"]) == ("keypoints", "ground_truth")
    assert d.state["reference_id"] == ids["reference"]
    titles = [a["text"] for a in d.figure["layout"]["annotations"]]
    assert "reference · chelsea.png" in titles, titles
    assert len(d.traces(prefix="error|")) == 5

    # three dropdowns without waiting: another reference, a view, the ground-truth shown
    other = next(r for r in d.state["references"] if r["id"] != ids["reference"]) \
        if len(d.state["references"]) > 1 else None
    sent = copy.deepcopy(d.state)
    events = [("on_change_view_mode", "controls.view_mode", "parts"),
              ("on_change_show", "controls.show", "both")]
    if other is not None:
        events.insert(0, ("on_change_reference", "controls.reference", other["id"]))
    for method, path, value in events:  # the App shows each choice in its control before it sends it
        sent["controls"][path.split(".", 1)[1]] = value
        d.send(stale_event(copy.deepcopy(sent), method, path, value))
    assert d.traces("current|parts") and d.traces("current|gt") and d.traces("current|keypoints")
    if other is not None:
        assert d.state["reference_id"] == other["id"]


def test_propagate_from_the_panel_is_safe_and_its_result_becomes_the_default(demo_copy):
    """The prompt targets the current view, names the reference shown and the panel's
    reference field, writes a NEW field, never pre-checks overwrite; running it with those
    params changes no existing field; the panel then shows the new predictions."""
    dataset, ids = demo_copy
    view = dataset.match_tags("target")  # the App's current view
    d = PanelDriver(dataset, current_sample=ids["crop"], view=view).call("on_load")
    d.call("on_propagate")
    params = prompt_params(d)
    assert params == {
        "view_target": "CURRENT_VIEW",
        "references": "ids",
        "reference_ids": [ids["reference"]],
        "source_field": "keypoints",
        "output_field": "sdcorr_keypoints",
        "overwrite": False,
    }

    before = field_snapshot(dataset)
    # the App adds the panel's id and state to every operator a panel triggers, prompts included
    sent = {**params, "panel_id": d.panel_id, "panel_state": d.state}
    result = foo.execute_operator("@sdcorr/sdcorr/propagate_keypoints", {"view": view}, params=sent)
    result.raise_exceptions()
    new_fields = ("sdcorr_keypoints", "sdcorr_keypoints_error")
    after = field_snapshot(dataset, exclude=new_fields)
    assert after == before, "propagating from the panel changed an existing field"
    assert dataset.count("sdcorr_keypoints") == len(view)
    assert not dataset.match_tags("reference").exists("sdcorr_keypoints")
    kp = dataset[ids["crop"]]["sdcorr_keypoints"].keypoints[0]
    assert kp["sdcorr_reference_id"] == ids["reference"]

    # the open panel switches to the fresh predictions on the next sample; a new panel
    # starts with them (the newest predicted field)
    d.current_sample = ids["half_size"]
    d.call("on_change_current_sample")
    assert d.state["pred_field"] == "sdcorr_keypoints"
    assert len(d.traces(prefix="line|")) == 5
    d2 = PanelDriver(dataset, current_sample=ids["crop"]).call("on_load")
    assert d2.state["pred_field"] == "sdcorr_keypoints"
    assert choices(d2, "pred_field")[:2] == ["sdcorr_keypoints", "predicted"]
    # a chosen field stays chosen, in this panel and in new ones, until a newer one appears
    d2.call("on_change_pred_field", value="predicted")
    assert PanelDriver(dataset, current_sample=ids["crop"]).call("on_load").state["pred_field"] == "predicted"

    # the next proposal is the next free name
    d2.call("on_propagate")
    assert prompt_params(d2)["output_field"] == "sdcorr_keypoints_2"


def test_instance_selector(demo_copy):
    """A reference with two instances: the selector shows one or all of them."""
    dataset, ids = demo_copy
    ref = dataset[ids["reference"]]
    first = ref["keypoints"].keypoints[0]
    second = fo.Keypoint(label="cat2", points=[(min(1.0, x * 0.5 + 0.4), y) for x, y in first.points])
    ref["keypoints"].keypoints.append(second)
    ref.save()
    d = PanelDriver(dataset, current_sample=ids["crop"]).call("on_load")
    assert choices(d, "instance") == [panels.ALL_INSTANCES, "0", "1"]
    assert len(d.traces("reference|gt")) == 2
    d.call("on_change_instance", value="1")
    assert d.state["instance"] == 1
    markers = d.traces("reference|gt")
    assert len(markers) == 1 and len(markers[0]["x"]) == 5
    # instance 1 has no prediction (propagated before it existed): no lines, and the status says so
    assert not d.traces(prefix="line|") and "No predictions" in d.status()
    d.call("on_change_instance", value="0")
    assert len(d.traces(prefix="line|")) == 5 and len(d.traces("reference|gt")) == 1
    d.call("on_change_instance", value=panels.ALL_INSTANCES)
    assert d.state["instance"] is None and len(d.traces("reference|gt")) == 2
    # another reference resets the choice (here through another reference field: chelsea is
    # the only reference annotated in `keypoints`; choosing the reference already shown
    # changes nothing)
    d.call("on_change_instance", value="1")
    assert d.state["instance"] == 1
    d.call("on_change_reference", value=ids["reference"])
    assert d.state["instance"] == 1
    d.call("on_change_ref_field", value="ground_truth")
    assert d.state["reference_id"] != ids["reference"] and d.state["instance"] is None


def test_tagged_references_come_first(world):
    """Any tag containing "reference" marks a reference; tagged ones head the list even
    when an untagged one is more similar."""
    dataset, ids, _ = world
    clone = dataset.clone(f"sdcorr-panel-tags-{uuid.uuid4().hex[:8]}")
    try:
        clone.untag_samples("reference")
        clone.select(ids["ref2"]).tag_samples("cup-Reference")
        d = PanelDriver(clone, current_sample=ids["target"]).call("on_load")
        assert [r["id"] for r in d.state["references"]] == [ids["ref2"], ids["ref"]]
        assert d.state["reference_id"] == ids["ref2"]
        assert d.state["references"][1]["similarity"] == pytest.approx(1.0, abs=1e-4)
    finally:
        clone.delete()


def test_field_defaults_without_tags_and_newest_prediction(tmp_dataset, photo_paths):
    """No tagged reference: the annotation field with the most keypoints; several predicted
    fields: the newest (created last), whatever the names' order."""
    from fiftyone_sdcorr.plugin.field_roles import default_fields, free_field_name

    def kps(attrs=None):
        kp = fo.Keypoint(label="x", points=[(0.1, 0.2)], **(attrs or {}))
        return fo.Keypoints(keypoints=[kp])

    ds = tmp_dataset
    ds.add_samples([fo.Sample(filepath=photo_paths["chelsea"], zz_annot=kps()),
                    fo.Sample(filepath=photo_paths["coffee"], zz_annot=kps(), aa_other=kps())])
    assert default_fields(ds) == {"ref_field": "zz_annot", "pred_field": None, "gt_field": "zz_annot"}
    for name in ("zz_pred", "aa_pred"):  # created in this order: aa_pred is the newest
        ds.set_values(name, [kps({"sdcorr_reference_id": "x"})] * len(ds))
    assert default_fields(ds)["pred_field"] == "aa_pred"
    assert free_field_name(ds, "zz_annot") == "zz_annot_2"
    ds.add_sample_field("zz_annot_2_error", fo.StringField)
    assert free_field_name(ds, "zz_annot") == "zz_annot_3"


# --------------------------------------------------------------------------- view operators
def test_write_feature_pca_operator(world, tmp_path):
    from PIL import Image

    dataset, ids, describer = world
    view = dataset.select([ids["target"], ids["ref"], ids["ref2"], ids["plain"]])
    result = foo.execute_operator(
        "@sdcorr/sdcorr/write_feature_pca", {"view": view},
        params={"output_field": "pca_view", "output_dir": str(tmp_path / "pca")},
    )
    result.raise_exceptions()
    assert dataset.count("pca_view") == 3  # the sample without features is skipped
    # a picture per sample (a media field the App can show), written into output_dir
    pic_t = dataset[ids["target"]]["pca_view"]
    pic_r = dataset[ids["ref"]]["pca_view"]
    assert os.path.isfile(pic_t) and Path(pic_t).parent == tmp_path / "pca"
    dataset.reload()
    assert "pca_view" in dataset.app_config.media_fields
    a, b = np.asarray(Image.open(pic_t)), np.asarray(Image.open(pic_r))
    w, h = vis.display_size(*Image.open(dataset[ids["target"]].filepath).size, 512)
    assert a.shape == (h, w, 3)
    # one PCA for the whole collection: the same image gets the same colours
    assert np.array_equal(a, b)
    assert a.std() > 10  # colourful, not flat
    # never overwrites without asking
    with pytest.raises(Exception, match="overwrite"):
        foo.execute_operator(
            "@sdcorr/sdcorr/write_feature_pca", {"view": view},
            params={"output_field": "pca_view", "output_dir": str(tmp_path / "pca")},
        )


def test_write_similarity_heatmap_operator(world, tmp_path):
    from PIL import Image

    dataset, ids, describer = world
    view = dataset.select([ids["target"], ids["ref2"]])
    result = foo.execute_operator(
        "@sdcorr/sdcorr/write_similarity_heatmap", {"view": view},
        params={"reference_id": ids["ref"], "keypoints_field": "gt", "keypoint": "nose",
                "output_field": "nose_heat", "output_dir": str(tmp_path / "heat")},
    )
    result.raise_exceptions()
    heat = dataset[ids["target"]]["nose_heat"]
    assert isinstance(heat, fo.Heatmap) and heat.range == [0, 255]
    arr = np.asarray(Image.open(heat.map_path)).astype(float)
    h, w = arr.shape
    # identity pair: the hottest place is the nose of the reference (within a token)
    peak_row, peak_col = np.unravel_index(np.argmax(arr), arr.shape)
    nose = GT_POINTS[2]
    token = 14 / 224 * max(w, h) / w
    assert abs((peak_col + 0.5) / w - nose[0]) <= token and abs((peak_row + 0.5) / h - nose[1]) <= token * w / h
    assert arr.max() >= 250  # cosine 1 at the point itself
    # by explicit point, through the Python call of the operator
    op = foo.get_operator("@sdcorr/sdcorr/write_similarity_heatmap")
    op(view, ids["ref"], point=(0.2, 0.8), output_field="corner_heat", output_dir=str(tmp_path / "h2"))
    assert dataset.count("corner_heat") == 2
