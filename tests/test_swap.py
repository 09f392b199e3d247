"""Instance swapping (issue 18): fiftyone_sdcorr/core/pictures/swap.py and dataset/swap.py.

Answers known by construction, with the deterministic local descriptor
(tests/local_descriptor.py): its descriptors subtract each window's mean and normalise,
so an object and a brightness/contrast change of it (``0.6 x + 60``) match pixel for
pixel, while their colours differ. Canvases (gray background): ``A`` holds the changed
copy ``S`` (the source), ``B`` the object ``T`` elsewhere (a shift) with an elliptic
instance mask, ``C`` a half-size ``T`` (a scale). Swapping ``S`` into ``T`` must give
``0.6 T + 60`` inside T's region (the warp of the source), ``B`` exactly elsewhere.
"""

import hashlib
import inspect
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fiftyone as fo
import fiftyone.operators as foo

import fiftyone_sdcorr as sc
from fiftyone_sdcorr.core.matching.dense import DenseField
from fiftyone_sdcorr.core.common.params import ParameterError
from fiftyone_sdcorr.core.pictures.swap import encode_gif, paste, refine_shape, swap_region, warp_frames
from fiftyone_sdcorr.dataset.config import SwapConfig
from fiftyone_sdcorr.dataset.swap import KEY_FIELD, PROVENANCE_FIELDS
from local_descriptor import LocalDescriptor, textured_noise

W, H = 320, 240
OBJ_W, OBJ_H = 80, 120
PLACES = {"A": (40, 60, 1.0), "B": (200, 70, 1.0), "C": (30, 40, 0.5)}


def _texture():
    return textured_noise(OBJ_H, OBJ_W, seed=3)


def _changed(x):
    return (np.asarray(x, np.float32) * 0.6 + 60).round().astype(np.uint8)


def _canvas(name):
    x, y, s = PLACES[name]
    obj = Image.fromarray(_changed(_texture()) if name == "A" else _texture())
    w, h = int(OBJ_W * s), int(OBJ_H * s)
    img = Image.new("RGB", (W, H), (128, 128, 128))
    img.paste(obj.resize((w, h), Image.BILINEAR) if s != 1 else obj, (x, y))
    return img, (x, y, w, h)


def _ellipse(w, h):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx + 0.5 - w / 2) / (w / 2)) ** 2 + ((yy + 0.5 - h / 2) / (h / 2)) ** 2 <= 0.8


@pytest.fixture
def canvases(tmp_path):
    (tmp_path / "data").mkdir()
    ds = fo.Dataset(f"sdcorr-swap-{uuid.uuid4().hex[:8]}")
    for name in PLACES:
        img, (x, y, w, h) = _canvas(name)
        path = tmp_path / "data" / f"{name}.png"
        img.save(path)
        det = fo.Detection(label="person", bounding_box=[x / W, y / H, w / W, h / H])
        if name == "B":
            det.mask = _ellipse(w, h)
        dets = [det] + ([fo.Detection(label="cat", bounding_box=[0.8, 0.8, 0.1, 0.1])] if name == "A" else [])
        kps = fo.Keypoints(keypoints=[fo.Keypoint(label="person", points=[[(x + w / 2) / W, (y + h / 2) / H]])])
        ds.add_sample(fo.Sample(filepath=str(path), name=name, detections=fo.Detections(detections=dets),
                                keypoints=kps))
    yield ds, tmp_path
    for name in fo.list_datasets():
        if name.startswith(ds.name):
            fo.delete_dataset(name)


def _ids(ds):
    """``{canvas name: its person detection's id}``."""
    return {s.name: s.detections.detections[0].id for s in ds.iter_samples()}


def _run(ds, tmp_path, pairs, out="-out", **kw):
    kw.setdefault("extractor", LocalDescriptor(size=224, stride=14))
    return sc.swap_instances(ds, pairs, ds.name + out, patches_field="detections", resolution=kw.pop("resolution", 96),
                             output_dir=str(tmp_path / "swaps"), progress=False, **kw)


def _result(ds, out="-out"):
    return {s.sdcorr_swap_target_label_id + "<-" + s.sdcorr_swap_source_label_id: s
            for s in fo.load_dataset(ds.name + out).iter_samples()}


def _region(name):
    x, y, w, h = _canvas(name)[1]
    m = np.zeros((H, W), bool)
    m[y:y + h, x:x + w] = _ellipse(w, h) if name == "B" else True
    return m


def _hashes(ds):
    return {p: hashlib.sha1(Path(p).read_bytes()).hexdigest() for p in ds.values("filepath")}


# --------------------------------------------------------------------------- core
def test_swap_region_changes_only_the_filled_pixels():
    rng = np.random.default_rng(0)
    target, source = (rng.integers(0, 255, (20, 30, 3), dtype=np.uint8) for _ in range(2))
    ys, xs = np.mgrid[0:20, 0:30]
    xy = np.stack([(xs + 0.5) / 30, (ys + 0.5) / 20], -1).astype(np.float32)
    valid = np.ones((20, 30), bool)
    field = DenseField(xy, np.ones((20, 30), np.float32), np.ones((20, 30), np.float32), valid)
    mask = np.zeros((20, 30), bool)
    mask[5:15, 10:20] = True
    out, filled = swap_region(target, source, field, mask)
    assert (filled == mask).all()
    assert (out[mask] == source[mask]).all() and (out[~mask] == target[~mask]).all()
    assert (paste(np.zeros((40, 40, 3), np.uint8), out, 5, 7)[7:27, 5:35] == out).all()
    with pytest.raises(ValueError, match="fit"):
        paste(np.zeros((10, 10, 3), np.uint8), out, 0, 0)
    assert refine_shape(300, 150, 512) == (512, 256) and refine_shape(10, 10, 64) == (64, 64)


def test_warp_frames_move_points_from_start_to_end():
    bg = np.zeros((20, 20, 3), np.uint8)
    frames = warp_frames(bg, [[2, 2]], [[12, 12]], [[255, 0, 0]], n_frames=3, hold=1)
    assert len(frames) == 4 and (frames[3] == frames[2]).all()
    assert frames[0][2, 2, 0] == 255 and frames[1][7, 7, 0] == 255 and frames[2][12, 12, 0] == 255
    assert frames[2][2, 2, 0] == 0
    gif = Image.open(__import__("io").BytesIO(encode_gif(frames)))
    assert gif.format == "GIF" and gif.n_frames >= 3


# --------------------------------------------------------------------------- dataset
def test_swapping_an_object_with_itself_returns_the_target(canvases):
    ds, tmp = canvases
    ids = _ids(ds)
    before = _hashes(ds)
    summary = _run(ds, tmp, [(ids["B"], ids["B"])])
    assert summary["swapped"] == 1 and summary["failed"] == 0, summary.text()
    s = _result(ds)[f"{ids['B']}<-{ids['B']}"]
    got = np.asarray(Image.open(s.filepath).convert("RGB")).astype(int)
    want = np.asarray(_canvas("B")[0]).astype(int)
    region = _region("B")
    assert (got[~region] == want[~region]).all()  # outside the mask: exactly the target
    err = np.abs(got - want).max(-1)[region]
    assert np.median(err) <= 2 and (err <= 12).mean() > 0.95
    assert _hashes(ds) == before  # no media file of the dataset written
    assert Path(s.filepath).parent == tmp / "swaps" and not list((tmp / "data").glob("*swap*"))


@pytest.mark.parametrize("target", ["B", "C"])
def test_swapping_with_a_known_warp_gives_the_warped_source(canvases, target):
    ds, tmp = canvases
    ids = _ids(ds)
    summary = _run(ds, tmp, [(ids["A"], ids[target])])
    assert summary["swapped"] == 1, summary.text()
    s = _result(ds)[f"{ids[target]}<-{ids['A']}"]
    got = np.asarray(Image.open(s.filepath).convert("RGB")).astype(int)
    canvas = np.asarray(_canvas(target)[0])
    region = _region(target)
    inner = region
    want = _changed(canvas).astype(int)  # the source's colours at the matched places
    err = np.abs(got - want).max(-1)[inner]
    assert np.median(err) <= (4 if target == "B" else 8), np.median(err)
    assert np.abs(got - canvas.astype(int)).max(-1)[inner].mean() > 15  # not the target's own colours
    assert (got[~region] == canvas[~region]).all()
    # provenance and the target's labels, carried
    assert s.sdcorr_swap_source_sample_id == ds.match(fo.ViewField("name") == "A").first().id
    assert s.sdcorr_swap_target_sample_id == ds.match(fo.ViewField("name") == target).first().id
    assert s.sdcorr_swap_settings["resolution"] == 96 and s.sdcorr_swap_coverage > 0.95
    tgt = ds.match(fo.ViewField("name") == target).first()
    assert s.keypoints.keypoints[0].points == tgt.keypoints.keypoints[0].points
    assert s.detections.detections[0].bounding_box == tgt.detections.detections[0].bounding_box
    assert set(PROVENANCE_FIELDS) <= set(fo.load_dataset(ds.name + "-out").get_field_schema())


class Crash(BaseException):
    """Not an Exception: nothing in the run catches it (a kill, an out-of-memory end)."""


class CrashingDescriptor(LocalDescriptor):
    def __init__(self, after):
        super().__init__(size=224, stride=14)
        self.calls, self.after = 0, after

    def describe(self, images, **kw):
        self.calls += 1
        if self.calls > self.after:
            raise Crash()
        return super().describe(images, **kw)


def test_a_crashed_run_completes_on_rerun_without_duplicates(canvases):
    ds, tmp = canvases
    ids = _ids(ds)
    pairs = [(ids["A"], ids["B"]), (ids["B"], ids["B"]), (ids["A"], ids["C"]), (ids["B"], ids["C"])]
    with pytest.raises(Crash):
        _run(ds, tmp, pairs, extractor=CrashingDescriptor(after=3), batch_size=1)  # one image per call
    out = fo.load_dataset(ds.name + "-out")
    assert len(out) == 2  # the pairs before the crash, each whole
    summary = _run(ds, tmp, pairs, batch_size=1)
    assert (summary["skipped"], summary["swapped"], summary["failed"]) == (2, 2, 0), summary.text()
    keys = out.values(KEY_FIELD)
    assert len(out) == 4 and len(set(keys)) == 4
    again = _run(ds, tmp, pairs)
    assert (again["skipped"], again["swapped"]) == (4, 0) and len(out) == 4
    redo = _run(ds, tmp, pairs[:1], overwrite=True)
    assert redo["swapped"] == 1 and len(out) == 4
    other = _run(ds, tmp, pairs[:1], min_confidence=0.5)  # other settings: a new sample
    assert other["swapped"] == 1 and len(out) == 5


def test_bad_pairs_and_outputs_are_refused_before_anything_is_written(canvases):
    ds, tmp = canvases
    ids = _ids(ds)
    cat = ds.match(fo.ViewField("name") == "A").first().detections.detections[1].id
    cases = [([(cat, ids["B"])], "same label"), ([(ids["A"], "nope")], "no object"), ([], "non-empty"),
             ([(ids["A"],)], "item 0")]
    for pairs, msg in cases:
        with pytest.raises(ParameterError, match=msg):
            _run(ds, tmp, pairs)
    with pytest.raises(ParameterError, match="dataset of the samples"):
        sc.swap_instances(ds, [(ids["A"], ids["B"])], ds.name, patches_field="detections")
    with pytest.raises(ParameterError, match="resolution"):
        _run(ds, tmp, [(ids["A"], ids["B"])], resolution=1)
    assert not fo.dataset_exists(ds.name + "-out") and not (tmp / "swaps").exists()


def test_every_keyword_defaults_to_none():
    for p in inspect.signature(sc.swap_instances).parameters.values():
        if p.default is not inspect.Parameter.empty:
            assert p.default is None, p.name


def test_whole_image_pairs_with_a_segmentation_region(canvases):
    ds, tmp = canvases
    a, b = (ds.match(fo.ViewField("name") == n).first() for n in ("A", "B"))
    b["region"] = fo.Segmentation(mask=_region("B").astype(np.uint8))
    b.save()
    summary = sc.swap_instances(ds, [(a.id, b.id)], ds.name + "-img", mask_field="region", resolution=96,
                                extractor=LocalDescriptor(size=224, stride=14), animation=True, animation_frames=4,
                                output_dir=str(tmp / "swaps"), progress=False)
    assert summary["swapped"] == 1, summary.text()
    s = fo.load_dataset(ds.name + "-img").first()
    got = np.asarray(Image.open(s.filepath).convert("RGB")).astype(int)
    canvas = np.asarray(_canvas("B")[0]).astype(int)
    assert (got[~_region("B")] == canvas[~_region("B")]).all()
    assert s.sdcorr_swap_source_label_id is None and s.region is not None
    gif = Image.open(s.sdcorr_swap_animation)
    assert gif.n_frames >= 4 and Path(s.sdcorr_swap_animation).parent == tmp / "swaps"


def test_the_operator_swaps_with_stored_features(canvases):
    ds, tmp = canvases
    ids = _ids(ds)
    sc.compute_fused_features(ds, extractor=LocalDescriptor(size=224, stride=14), patches_field="detections",
                              store_dir=str(tmp / "store"), progress=False)
    res = foo.execute_operator("@sdcorr/sdcorr/swap_instances", ctx={"dataset": ds, "params": {
        "patches_field": "detections", "source_id": ids["A"], "target_id": ids["B"], "resolution": 64,
        "output_dataset": ds.name + "-op", "output_dir": str(tmp / "op")}})
    res.raise_exceptions()
    out = fo.load_dataset(ds.name + "-op")
    assert len(out) == 1 and out.first().sdcorr_swap_target_label_id == ids["B"]
    assert Path(out.first().filepath).parent == tmp / "op"
    op = foo.get_operator("@sdcorr/sdcorr/swap_instances")
    op(ds, [(ids["B"], ids["B"])], ds.name + "-op", patches_field="detections", resolution=64,
       output_dir=str(tmp / "op"))
    assert len(out) == 2
    # the form's automatic pairing from a tag, refinement "none"
    ds.match(fo.ViewField("name") == "A").tag_samples("src")
    res = foo.execute_operator("@sdcorr/sdcorr/swap_instances", ctx={"dataset": ds, "params": {
        "patches_field": "detections", "pairing": "auto", "sources": "src", "refine": "none", "resolution": 64,
        "output_dataset": ds.name + "-auto", "output_dir": str(tmp / "op")}})
    res.raise_exceptions()
    assert _pairs_in(ds.name + "-auto") == {ids["B"]: ids["A"], ids["C"]: ids["A"]}
    op(ds, sources="src", output_dataset=ds.name + "-auto", patches_field="detections", resolution=64,
       output_dir=str(tmp / "op"))
    assert len(fo.load_dataset(ds.name + "-auto")) == 2  # the same pairs: skipped


def test_refinement_with_tiny_models_is_seeded_and_stays_inside_the_mask(canvases, tmp_path_factory):
    from fiftyone_sdcorr.core.features.extractor import FeatureExtractor
    from fiftyone_sdcorr.core.features.tiny import tiny_models

    ds, tmp = canvases
    ids = _ids(ds)
    sd, dino = tiny_models(tmp_path_factory.mktemp("tiny"))
    fx = FeatureExtractor(sd, dino, device="cpu", preset="cpu", sd_size=128, dino_size=112)
    kw = dict(extractor=fx, refine=True, refine_steps=4, refine_strength=0.5, refine_size=64, seed=7,
              refine_guidance=1.0, resolution=32)
    plain = _run(ds, tmp, [(ids["A"], ids["B"])], out="-plain", extractor=fx, resolution=32)
    first = _run(ds, tmp, [(ids["A"], ids["B"])], out="-r1", **kw)
    second = _run(ds, tmp, [(ids["A"], ids["B"])], out="-r2", **kw)
    assert plain["swapped"] == first["swapped"] == second["swapped"] == 1, first.text()
    imgs = [np.asarray(Image.open(fo.load_dataset(ds.name + o).first().filepath).convert("RGB")).astype(int)
            for o in ("-plain", "-r1", "-r2")]
    assert (imgs[1] == imgs[2]).all()  # seeded: the same pixels again
    region = _region("B")
    assert (imgs[1][~region] == imgs[0][~region]).all()  # only inside the mask
    assert (imgs[1][region] != imgs[0][region]).any()
    assert fo.load_dataset(ds.name + "-r1").first().sdcorr_swap_settings["seed"] == 7
    same = _run(ds, tmp, [(ids["A"], ids["B"])], out="-r1", **{**kw, "refine": "img2img"})
    assert same["skipped"] == 1  # "img2img" is True: the same settings as swaps made before inpainting
    # inpainting inside the mask: seeded, only inside the mask, another result than img2img
    inp = {**kw, "refine": "inpaint"}
    for o in ("-i1", "-i2"):
        assert _run(ds, tmp, [(ids["A"], ids["B"])], out=o, **inp)["swapped"] == 1
    inps = [np.asarray(Image.open(fo.load_dataset(ds.name + o).first().filepath).convert("RGB")).astype(int)
            for o in ("-i1", "-i2")]
    assert (inps[0] == inps[1]).all() and (inps[0][~region] == imgs[0][~region]).all()
    assert (inps[0][region] != imgs[0][region]).any() and (inps[0][region] != imgs[1][region]).any()
    assert fo.load_dataset(ds.name + "-i1").first().sdcorr_swap_settings["refine"] == "inpaint"
    with pytest.raises(ParameterError, match="refine"):
        _run(ds, tmp, [(ids["A"], ids["B"])], out="-bad", refine="outpaint")


def test_inpainting_pipeline_denoises_only_inside_the_mask(tmp_path):
    """SD's ordinary 4-channel UNet in diffusers' inpainting pipeline: at every step the
    latents outside the mask are put back to the image's, so two images that differ only
    inside the mask give nearly the same output away from it (same seed; not exactly: the
    VAE's attention sees the whole image), while the image-to-image pass carries the
    difference everywhere (here over twice as much)."""
    import torch

    from fiftyone_sdcorr.core.features.extractor import FeatureExtractor
    from fiftyone_sdcorr.core.pictures.swap import img2img_pipeline, is_inpainting, sd_parts_of
    from fiftyone_sdcorr.core.features.tiny import tiny_models

    sd, dino = tiny_models(tmp_path / "tiny")
    parts = sd_parts_of(FeatureExtractor(sd, dino, device="cpu", preset="cpu", sd_size=128, dino_size=112))
    one = np.asarray(Image.fromarray(textured_noise(64, 64, seed=1)).convert("RGB"))
    two = one.copy()
    two[:, 32:] = 255 - two[:, 32:]  # differs only inside the mask (the right half)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    kw = dict(prompt="a photo", strength=0.8, num_inference_steps=5, guidance_scale=1.0, output_type="np")

    def run(pipe, image, **extra):
        return pipe(image=Image.fromarray(image), generator=torch.Generator("cpu").manual_seed(3), **kw,
                    **extra).images[0]

    inpaint, img2img = img2img_pipeline(parts, "inpaint"), img2img_pipeline(parts)
    assert is_inpainting(inpaint) and not is_inpainting(img2img) and inpaint.unet.config.in_channels == 4
    extra = dict(mask_image=Image.fromarray(mask), width=64, height=64)
    a, b = run(inpaint, one, **extra), run(inpaint, two, **extra)
    c, d = run(img2img, one), run(img2img, two)
    far = (slice(None), slice(0, 16))  # away from the mask
    kept, carried, inside = (float(np.abs(x - y).max()) for x, y in ((a[far], b[far]), (c[far], d[far]),
                                                                         (a[:, 40:], b[:, 40:])))
    assert kept < carried / 2 and kept < inside / 4, (kept, carried, inside)


def test_config_defaults_are_the_forms():
    assert SwapConfig.build(output_dataset="x").resolution == SwapConfig.resolution


def test_the_match_panel_prompts_a_swap_of_its_current_and_reference_objects(tmp_path):
    from panel_driver import PanelDriver
    from test_objects import desc, write_coco

    write_coco(tmp_path)
    ds = fo.Dataset.from_dir(data_path=str(tmp_path / "data"), labels_path=str(tmp_path / "labels.json"),
                             dataset_type=fo.types.COCODetectionDataset, label_types=["detections", "keypoints"],
                             name=f"sdcorr-swap-panel-{uuid.uuid4().hex[:8]}")
    try:
        ds.match(fo.ViewField("filepath").ends_with("canvas0.png")).tag_samples("reference")
        sc.compute_fused_features(ds, extractor=desc(), patches_field="detections", store_dir=str(tmp_path / "store"),
                                  progress=False)
        sc.propagate_keypoints(ds, "reference", "keypoints", "pred", patches_field="detections", extractor=desc(),
                               progress=False)
        target = ds.match(fo.ViewField("filepath").ends_with("canvas2.png")).first()
        d = PanelDriver(ds, current_sample=target.id)
        d.call("on_load")
        d.call("on_swap")
        (prompt,) = [r for r in d.requests if r["operator_uri"] == "prompt_user_for_operation"]
        assert prompt["params"]["operator_uri"].endswith("/swap_instances")
        params = prompt["params"]["params"]
        assert params["source_id"] == d.state["reference_object"] and params["target_id"] == d.state["object_id"]
        assert params["patches_field"] == "detections"
        res = foo.execute_operator("@sdcorr/sdcorr/swap_instances", ctx={"dataset": ds, "params": {
            **params, "output_dataset": ds.name + "-swaps", "output_dir": str(tmp_path / "swaps"), "resolution": 48}})
        res.raise_exceptions()
        assert fo.load_dataset(ds.name + "-swaps").first().sdcorr_swap_target_label_id == d.state["object_id"]
    finally:
        for name in (ds.name + "-swaps", ds.name):
            if fo.dataset_exists(name):
                fo.delete_dataset(name)



# --------------------------------------------------------------------------- automatic pairing
def _auto(samples, tmp, sources, out, **kw):
    kw.setdefault("extractor", LocalDescriptor(size=224, stride=14))
    return sc.swap_instances(samples, sources=sources, output_dataset=out, patches_field="detections",
                             resolution=kw.pop("resolution", 96), output_dir=str(tmp / "swaps"), progress=False, **kw)


def _pairs_in(name):
    return {s.sdcorr_swap_target_label_id: s.sdcorr_swap_source_label_id for s in fo.load_dataset(name)}


def test_automatic_pairing_takes_the_most_similar_source_of_the_label_never_itself(canvases):
    ds, tmp = canvases
    ids = _ids(ds)
    a = ds.match(fo.ViewField("name") == "A").first()
    cat = a.detections.detections[1].id
    a.tags.append("src")
    a.save()
    summary = _auto(ds, tmp, "src", ds.name + "-auto")
    # A's person and cat are the only sources of their labels: never paired with themselves,
    # and skipped as sources, not failed targets (issue 24)
    assert (summary["pairs"], summary["swapped"], summary["failed"]) == (2, 2, 0), summary.text()
    assert summary["sources_skipped"] == 2 and set(summary["skipped_sources"]) == {ids["A"], cat}
    assert "sources_skipped 2" in summary.headline() and f"dataset {ds.name + '-auto'!r}" in summary.headline()
    assert _pairs_in(ds.name + "-auto") == {ids["B"]: ids["A"], ids["C"]: ids["A"]}
    # the same pairs given explicitly are the same new samples: skipped
    again = _run(ds, tmp, [(ids["A"], ids["B"]), (ids["A"], ids["C"])], out="-auto")
    assert (again["skipped"], again["swapped"]) == (2, 0), again.text()
    # B is its own most similar source (cosine 1): the other person is taken
    own = _auto(ds.match(fo.ViewField("name") == "B"), tmp, [ids["A"], ids["B"]], ds.name + "-own")
    assert own["swapped"] == 1 and _pairs_in(ds.name + "-own") == {ids["B"]: ids["A"]}


def test_automatic_pairing_ranks_by_the_stored_embeddings_when_every_unit_has_one(canvases):
    ds, tmp = canvases
    ids = _ids(ds)
    emb = {"A": [1.0, 0.0], "B": [0.0, 1.0], "C": [0.2, 0.9]}
    for s in ds.iter_samples(autosave=True):
        for d in s.detections.detections:
            d["emb"] = emb[s.name] if d.id == ids[s.name] else [0.5, 0.5]
    ds.add_dynamic_sample_fields()
    c = ds.match(fo.ViewField("name") == "C")
    _auto(c, tmp, [ids["A"], ids["B"]], ds.name + "-e1", embedding_field="emb")
    assert _pairs_in(ds.name + "-e1") == {ids["C"]: ids["B"]}
    for s in c.iter_samples(autosave=True):
        s.detections.detections[0]["emb"] = [0.9, 0.2]
    _auto(c, tmp, [ids["A"], ids["B"]], ds.name + "-e2", embedding_field="emb")
    assert _pairs_in(ds.name + "-e2") == {ids["C"]: ids["A"]}


def test_automatic_pairing_refusals(canvases):
    ds, tmp = canvases
    ids = _ids(ds)
    with pytest.raises(ParameterError, match="one of parameters 'pairs'"):
        sc.swap_instances(ds, [(ids["A"], ids["B"])], ds.name + "-x", sources="src", patches_field="detections")
    with pytest.raises(ParameterError, match="one of parameters 'pairs'"):
        sc.swap_instances(ds, output_dataset=ds.name + "-x", patches_field="detections")
    with pytest.raises(ParameterError, match="'sources' selects no sample"):
        _auto(ds, tmp, "no-such-tag", ds.name + "-x")
    with pytest.raises(ParameterError, match="'sources'"):
        _auto(ds, tmp, ["nope"], ds.name + "-x")
    assert not fo.dataset_exists(ds.name + "-x")


# --------------------------------------------------------------------------- group slices
@pytest.fixture
def grouped(tmp_path):
    """Two groups: "left" holds canvases A and B (person detections), "right" canvas C."""
    (tmp_path / "gdata").mkdir()
    ds = fo.Dataset(f"sdcorr-swap-group-{uuid.uuid4().hex[:8]}")
    ds.add_group_field("group", default="left")
    for left in ("A", "B"):
        g = fo.Group()
        for sl, name in (("left", left), ("right", "C")):
            img, (x, y, w, h) = _canvas(name)
            path = tmp_path / "gdata" / f"{left}-{sl}.png"
            img.save(path)
            det = fo.Detection(label="person", bounding_box=[x / W, y / H, w / W, h / H])
            ds.add_sample(fo.Sample(filepath=str(path), group=g.element(sl), name=name,
                                    detections=fo.Detections(detections=[det])))
    yield ds, tmp_path
    fo.delete_dataset(ds.name)


def test_output_slice_adds_the_swaps_to_their_targets_groups(grouped):
    ds, tmp = grouped
    left = ds.select_group_slices("left")
    ids = {s.name: s.detections.detections[0].id for s in left}
    before = {s.id: (hashlib.sha1(Path(s.filepath).read_bytes()).hexdigest(), s.detections.to_json())
              for s in ds.select_group_slices()}
    kw = dict(patches_field="detections", resolution=96, extractor=LocalDescriptor(size=224, stride=14),
              output_dir=str(tmp / "swaps"), progress=False)
    summary = sc.swap_instances(left, [(ids["A"], ids["B"])], output_slice="swap", **kw)
    assert summary["swapped"] == 1 and summary["output_slice"] == "swap", summary.text()
    assert summary["output_dataset"] == ds.name
    assert set(ds.group_slices) == {"left", "right", "swap"}
    (new,) = ds.select_group_slices("swap")
    target = left.match(fo.ViewField("name") == "B").first()
    assert new.group.id == target.group.id and new.sdcorr_swap_target_label_id == ids["B"]
    assert len(ds.get_group(target.group.id)) == 3 and "sdcorr:swap" in new.tags
    assert new.detections.detections[0].id != ids["B"]  # a copy of the target's labels, its own ids
    got = np.asarray(Image.open(new.filepath).convert("RGB")).astype(int)
    x, y, w, h = _canvas("B")[1]
    region = np.zeros((H, W), bool)
    region[y:y + h, x:x + w] = True  # no instance mask: the box
    assert (got[~region] == np.asarray(_canvas("B")[0]).astype(int)[~region]).all()
    after = {s.id: (hashlib.sha1(Path(s.filepath).read_bytes()).hexdigest(), s.detections.to_json())
             for s in ds.select_group_slices(["left", "right"])}
    assert after == before  # no existing media or label changed
    again = sc.swap_instances(left, [(ids["A"], ids["B"])], output_slice="swap", **kw)
    assert (again["skipped"], again["swapped"]) == (1, 0) and len(ds.select_group_slices("swap")) == 1
    auto = sc.swap_instances(left, sources=[ids["A"]], output_slice="swap", **kw)  # B <- A again: skipped
    assert (auto["skipped"], auto["sources_skipped"], auto["failed"]) == (1, 1, 0), auto.text()  # A: the source


def test_output_slice_refusals(grouped, canvases):
    ds, tmp = grouped
    left = ds.select_group_slices("left")
    sid = left.first().id
    kw = dict(extractor=LocalDescriptor(size=224, stride=14), progress=False)
    cases = [(dict(output_slice="right"), "holds other samples"), (dict(output_slice="a.b"), "output_slice"),
             (dict(output_slice="swap", output_dataset=ds.name + "-x"), "one of parameters 'output_dataset'")]
    for extra, msg in cases:
        with pytest.raises(ParameterError, match=msg):
            sc.swap_instances(left, [(sid, sid)], **extra, **kw)
    flat, _ = canvases
    with pytest.raises(ParameterError, match="not grouped"):
        sc.swap_instances(flat, [(flat.first().id, flat.first().id)], output_slice="swap", **kw)
    assert ds.group_slices == ["left", "right"] and not fo.dataset_exists(ds.name + "-x")


# --------------------------------------------------------------------------- issue 24: refusals and the output folder
def test_refinement_with_no_denoising_step_is_refused_naming_both_parameters(canvases):
    """diffusers runs int(refine_steps x refine_strength) steps: 30 x 0.02 is none, refused
    in the checks (no model loads, no output dataset); 30 x 0.04 is one step, accepted."""
    from fiftyone_sdcorr.dataset.engine import preflight

    ds, tmp = canvases
    ids = _ids(ds)
    for strength, steps in ((0.02, 30), (0.3, 3), (0.0, 30)):
        with pytest.raises(ParameterError, match="'refine_strength' and 'refine_steps'.*no denoising step"):
            _run(ds, tmp, [(ids["A"], ids["B"])], refine=True, refine_strength=strength, refine_steps=steps,
                 sd_model=str(tmp / "no-such-model"))
    with pytest.raises(ParameterError, match="refine_steps"):
        _run(ds, tmp, [(ids["A"], ids["B"])], refine="inpaint", refine_strength=0.02, refine_steps=30)
    assert not fo.dataset_exists(ds.name + "-out")
    ok = preflight(sc.swap_instances, ds, [(ids["A"], ids["B"])], ds.name + "-out", patches_field="detections",
                   refine=True, refine_strength=0.04, refine_steps=30, extractor=LocalDescriptor(size=224, stride=14))
    assert ok is None
    assert preflight(sc.swap_instances, ds, [(ids["A"], ids["B"])], ds.name + "-out", patches_field="detections",
                     refine_strength=0.01, extractor=LocalDescriptor(size=224, stride=14)) is None  # refine off


def test_swaps_go_beside_the_store_the_features_were_computed_with(canvases):
    ds, tmp = canvases
    ids = _ids(ds)
    sc.compute_fused_features(ds, extractor=LocalDescriptor(size=224, stride=14), patches_field="detections",
                              store_dir=str(tmp / "store"), progress=False)
    stored = Path(ds.values("detections.detections.sdcorr_features", unwind=True)[0])
    namespace = stored.parent.parent  # <store>/<fingerprint>
    assert namespace.parent == tmp / "store"
    got = sc.swap_instances(ds, [(ids["A"], ids["B"])], ds.name + "-beside", patches_field="detections",
                            resolution=64, progress=False)
    out = fo.load_dataset(ds.name + "-beside")
    want = namespace / "_swaps" / str(out._doc.id)
    assert got["swapped"] == 1 and got["output_dir"] == str(want), got.text()
    assert Path(out.first().filepath).parent == want and os.path.isfile(out.first().filepath)
    assert f"folder {str(want)!r}" in got.headline()
    # an output_dir under a file is refused in the checks, naming the parameter
    (tmp / "a-file").write_text("x")
    with pytest.raises(ParameterError, match="'output_dir'.*file"):
        sc.swap_instances(ds, [(ids["A"], ids["C"])], ds.name + "-x", patches_field="detections",
                          output_dir=str(tmp / "a-file" / "swaps"), progress=False)
