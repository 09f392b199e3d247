"""Objects as the unit, with data as FiftyOne imports it (issue 15).

A COCO person-keypoints file is written by hand and imported with FiftyOne's own importer
(``fo.Dataset.from_dir(dataset_type=fo.types.COCODetectionDataset)``): three canvases on a
uniform background holding 1, 2 and 3 pasted copies of one textured object, each canvas
with a half-size copy (a decoy) listed FIRST. Every full-size crop equals the reference
crop, so any describer predicts it exactly: with the deterministic local descriptor
(tests/local_descriptor.py) the answers are known by construction.
"""

import itertools
import json
import uuid

import numpy as np
import pytest
from PIL import Image

import fiftyone as fo
import fiftyone.operators as foo

import fiftyone_sdcorr as sc
from fiftyone_sdcorr.core.common.geometry import DEFAULT_CONTEXT_MARGIN
from fiftyone_sdcorr.core.common.params import ParameterError
from fiftyone_sdcorr.core.features.tiny import tiny_models
from local_descriptor import LocalDescriptor, textured_noise

SIZE, STRIDE = 224, 14
W, H = 460, 240
OBJ_W, OBJ_H = 80, 120
NAMES = ["nose", "left_eye", "right_eye", "left_wrist", "right_wrist"]
SKELETON = [[1, 2], [1, 3], [2, 4], [3, 5]]  # COCO: 1-based
REL = np.array([[0.5, 0.25], [0.3, 0.2], [0.7, 0.2], [0.2, 0.8], [0.8, 0.75]])


def _objects(n):
    """``[(x, y, scale)]`` of canvas ``n``: the decoy first, then ``n`` full-size copies."""
    return [(10, 10, 0.5)] + [(70 + i * 130, 80, 1.0) for i in range(n)]


def _canvas(n):
    obj = Image.fromarray(textured_noise(OBJ_H, OBJ_W, seed=3))
    img = Image.new("RGB", (W, H), (128, 128, 128))
    anns = []
    for x, y, s in _objects(n):
        w, h = int(OBJ_W * s), int(OBJ_H * s)
        img.paste(obj.resize((w, h), Image.BILINEAR) if s != 1 else obj, (x, y))
        pts = [(x + a * w, y + b * h) for a, b in REL]
        anns.append({"bbox": [x, y, w, h], "points": pts})
    return img, anns


def write_coco(folder):
    """A COCO keypoints file and its images in ``folder``; ``{file name: [annotation]}``."""
    (folder / "data").mkdir()
    images, annotations, truth = [], [], {}
    for i in range(3):
        img, anns = _canvas(i + 1)
        name = f"canvas{i}.png"
        img.save(folder / "data" / name)
        images.append({"id": i + 1, "file_name": name, "width": W, "height": H})
        truth[name] = anns
        for a in anns:
            kps = [v for (x, y) in a["points"] for v in (round(x, 2), round(y, 2), 2)]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1,
                                "bbox": a["bbox"], "area": a["bbox"][2] * a["bbox"][3], "iscrowd": 0,
                                "keypoints": kps, "num_keypoints": len(NAMES)})
    labels = {"images": images, "annotations": annotations, "categories": [
        {"id": 1, "name": "person", "supercategory": "person", "keypoints": NAMES, "skeleton": SKELETON}]}
    (folder / "labels.json").write_text(json.dumps(labels))
    return truth


@pytest.fixture
def coco(tmp_path):
    truth = write_coco(tmp_path)
    ds = fo.Dataset.from_dir(data_path=str(tmp_path / "data"), labels_path=str(tmp_path / "labels.json"),
                             dataset_type=fo.types.COCODetectionDataset, label_types=["detections", "keypoints"],
                             name=f"sdcorr-coco-{uuid.uuid4().hex[:8]}")
    ds.match(fo.ViewField("filepath").ends_with("canvas0.png")).tag_samples("ref")
    yield ds, truth, tmp_path
    ds.delete()


def desc():
    return LocalDescriptor(size=SIZE, stride=STRIDE)


def _half_token_px(scale_of_box=1.0):
    """Half a token (plus the half pixel of the token centre) in image pixels, for a crop of
    a box ``scale_of_box`` times the object."""
    long_side = OBJ_H * scale_of_box * (1 + 2 * DEFAULT_CONTEXT_MARGIN)
    return (STRIDE / 2 + 0.5) * long_side / SIZE


def _errors(ds, truth, field="pred"):
    """``[(scale, max |pred - truth| px)]`` per object, pairing predictions with their
    detection through ``instance``."""
    out = []
    for s in ds.iter_samples():
        name = s.filepath.rsplit("/", 1)[1]
        dets = s.detections.detections
        assert len(s[field].keypoints) == len(dets)  # every object predicted
        for kp in s[field].keypoints:
            det = [d for d in dets if d.id == kp.sdcorr_detection_id]
            assert len(det) == 1 and kp.label == det[0].label == "person"
            if det[0].get_field("instance") if det[0].has_field("instance") else None:  # FiftyOne's link
                assert kp.instance.id == det[0].instance.id
            j = dets.index(det[0])
            want = np.array(truth[name][j]["points"])
            got = np.array(kp.points) * [W, H]
            out.append((_objects(len(dets) - 1)[j][2], float(np.abs(got - want).max())))
    return out


def test_objects_from_coco_propagate_evaluate_review_export(coco, tmp_path):
    ds, truth, _ = coco
    assert ds.skeletons == {} and ds.default_skeleton is None  # FiftyOne's importer: info["categories"]
    store = str(tmp_path / "store")
    summary = sc.compute_fused_features(ds, extractor=desc(), patches_field="detections", store_dir=store,
                                        progress=False)
    assert summary["total"] == summary["computed"] == 3 + 6, summary.text()
    embs = ds.values("detections.detections.sdcorr_embedding", unwind=True)
    assert len(embs) == 9 and all(isinstance(e, np.ndarray) and abs(np.linalg.norm(e) - 1) < 1e-4 for e in embs)

    # the object embeddings as a FiftyOne similarity index: the other copies rank first
    again = sc.compute_fused_features(ds, extractor=desc(), patches_field="detections", store_dir=store,
                                      brain_key="sdcorr_objects", progress=False)
    assert again["skipped"] == 9 and again["brain_key"] == "sdcorr_objects"
    assert ds.get_brain_info("sdcorr_objects").config.patches_field == "detections"
    dets = ds.values("detections.detections", unwind=True)
    full = [d.id for d in dets if d.bounding_box[2] > 0.1]
    ranked = ds.to_patches("detections").sort_by_similarity(full[0], brain_key="sdcorr_objects", k=6)
    assert set(ranked.values("detections.id")[:6]) == set(full)  # the six full-size copies, decoys after
    got = sc.propagate_keypoints(ds, "ref", "keypoints", "pred", patches_field="detections", flip=True,
                                 extractor=desc(), include_references=True, progress=False)
    assert got["targets"] == got["predicted"] == 9 and not got["failed"], got.text()
    assert got["reference_objects"] == 2  # the reference's decoy and its copy, linked by geometry
    assert sorted(map(tuple, got["flip_pairs"])) == [(1, 2), (3, 4)]  # from the COCO names
    for scale, err in _errors(ds, truth):
        assert err < _half_token_px(scale) * (1 if scale == 1 else 2), (scale, err)

    # evaluation: 100 %, every object matched by geometry, the same under any label order
    res = sc.evaluate_keypoints(ds, "pred", "keypoints", eval_key="pck", bbox_field="detections", progress=False)
    assert res.pck(0.1) == 1.0 and res.counts["person"]["points"] == 9 * len(NAMES), res.report()
    base = res.report()
    sample = ds.match_tags("ref", bool=False).last()
    gt = list(sample.keypoints.keypoints)
    for order in itertools.permutations(range(len(gt))):
        sample.keypoints.keypoints = [gt[i] for i in order]
        sample.save()
        again = sc.evaluate_keypoints(ds, "pred", "keypoints", eval_key=None, bbox_field="detections",
                                      progress=False)
        assert again.report()["per_point"] == base["per_point"] and again.counts == base["counts"]

    # review: one annotation moved far away is the one point flagged
    kp = sample.keypoints.keypoints[-1]
    moved = [list(p) for p in kp.points]
    moved[0] = [moved[0][0], min(1.0, moved[0][1] + 0.2)]
    kp.points = moved
    sample.save()
    review = sc.flag_keypoint_annotations(ds, "keypoints", patches_field="detections", extractor=desc(),
                                          progress=False)
    assert list(review["suspicious"]) == [sample.id], review.text()
    (flag,) = review["suspicious"][sample.id]
    assert flag["point"] == 0

    # the predictions survive FiftyOne's COCO export and re-import (points to a pixel)
    out = tmp_path / "export"
    ds.export(export_dir=str(out), dataset_type=fo.types.COCODetectionDataset, label_field="pred")
    back = fo.Dataset.from_dir(dataset_dir=str(out), dataset_type=fo.types.COCODetectionDataset,
                               label_types=["keypoints"], label_field="kp",
                               name=f"sdcorr-coco-back-{uuid.uuid4().hex[:8]}")
    try:
        for s in ds.iter_samples():
            b = back.match(fo.ViewField("filepath").ends_with(s.filepath.rsplit("/", 1)[1])).first()
            mine = sorted((np.array(k.points) * [W, H]).tolist() for k in s.pred.keypoints)
            theirs = sorted((np.array(k.points) * [W, H]).tolist() for k in b.kp.keypoints)
            assert len(mine) == len(theirs)
            np.testing.assert_allclose(np.array(mine), np.array(theirs), atol=1.0)
            assert sorted(k.visible for k in b.kp.keypoints) == sorted(k.visible for k in s.pred.keypoints)
            # our attributes come back as they were (the link to the detection among them)
            assert {(k.label, k.sdcorr_detection_id, k.sdcorr_reference_id) for k in b.kp.keypoints} == \
                {(k.label, k.sdcorr_detection_id, k.sdcorr_reference_id) for k in s.pred.keypoints}
    finally:
        back.delete()


def test_patches_view_runs_write_on_the_source_detections(coco, tmp_path):
    ds, truth, _ = coco
    patches = ds.to_patches("detections")
    store = str(tmp_path / "store")
    first = sc.compute_fused_features(patches, extractor=desc(), store_dir=store, progress=False)
    assert first["computed"] == 9 and not first["failed"], first.text()
    assert all(p is not None for p in ds.values("detections.detections.sdcorr_features", unwind=True))
    again = sc.compute_fused_features(ds, extractor=desc(), patches_field="detections", store_dir=store,
                                      progress=False)
    assert again["skipped"] == 9 and again["computed"] == 0  # the same units, resumed
    before = ds.values("detections.detections.bounding_box")
    got = sc.propagate_keypoints(patches, "ref", "keypoints", "pred", link_instances=True, include_references=True,
                                 progress=False)
    assert got["predicted"] == 9, got.text()
    assert all(i is not None for i in ds.values("detections.detections.instance", unwind=True))
    assert ds.values("detections.detections.bounding_box") == before  # only an instance was added
    for scale, err in _errors(ds, truth):
        assert err < _half_token_px(scale) * (1 if scale == 1 else 2)
    assert all(kp.get_field("instance") is not None for kps in ds.values("pred") for kp in kps.keypoints)
    # a patches view of another field than the one named is refused before anything runs
    with pytest.raises(ParameterError, match="holds patches of 'detections'"):
        sc.propagate_keypoints(patches, "ref", "keypoints", "pred2", patches_field="keypoints", progress=False)
    # image features are another configuration: their own fields, both coexist
    whole = sc.compute_fused_features(ds, extractor=desc(), store_dir=store, progress=False)
    assert whole["computed"] == 3


def test_operators_on_a_patches_view(coco, tmp_path):
    ds, _, _ = coco
    sd, dino = tiny_models(tmp_path / "tiny")
    patches = ds.to_patches("detections")
    params = dict(sd_model=sd, dino_model=dino, device="cpu", recipe=dict(sd_size=128, sd_mode="whole",
                  dino_size=56), pca_dim=8, projection_samples=2, store_dir=str(tmp_path / "store"), batch_size=2)
    res = foo.execute_operator("@sdcorr/sdcorr/compute_fused_features",
                               ctx={"dataset": ds, "view": patches, "params": params})
    res.raise_exceptions()
    ds.reload()
    assert all(p is not None for p in ds.values("detections.detections.sdcorr_features", unwind=True))
    res = foo.execute_operator("@sdcorr/sdcorr/propagate_keypoints", ctx={"dataset": ds, "view": patches, "params": {
        "source_field": "keypoints", "output_field": "pred", "references": "tag", "reference_tag": "ref",
        "patches_field": "detections", "include_references": True}})
    res.raise_exceptions()
    ds.reload()
    assert [len(k.keypoints) for k in ds.values("pred")] == [2, 3, 4]


def test_feature_views_per_object(coco, tmp_path):
    ds, truth, _ = coco
    sc.compute_fused_features(ds, extractor=desc(), patches_field="detections", store_dir=str(tmp_path / "s"),
                              progress=False)
    pca = sc.write_feature_pca(ds, "pca", patches_field="detections", progress=False)
    assert pca["written"] == 3 and not pca["failed"], pca.text()
    pic = np.asarray(Image.open(ds.match(fo.ViewField("filepath").ends_with("canvas2.png")).first().pca))
    assert pic.shape[:2] == (H, W)
    assert pic[0:3, -3:].max() == 0 and pic[H // 2, 70 + OBJ_W // 2].max() > 0  # black outside the objects
    # the same full-size copy in two places: the same colours
    a = pic[80:80 + OBJ_H, 70:70 + OBJ_W].astype(int)
    b = pic[80:80 + OBJ_H, 200:200 + OBJ_W].astype(int)
    assert np.abs(a - b).mean() < 2
    # heat maps of one reference object's nose: hottest at every copy's nose
    ref = ds.match_tags("ref").first()
    ref_det = [d for d in ref.detections.detections if d.bounding_box[2] > 0.1][0]
    heat = sc.write_similarity_heatmaps(ds.to_patches("detections"), ref_det.id, keypoints_field="keypoints",
                                        keypoint="nose", output_field="heat", progress=False)
    assert heat["written"] == 3 and not heat["failed"], heat.text()
    s2 = ds.match(fo.ViewField("filepath").ends_with("canvas2.png")).first()
    m = np.asarray(Image.open(s2.heat.map_path)).astype(float)
    for x, y, scale in _objects(3)[1:]:
        region = m[y:y + OBJ_H, x:x + OBJ_W]
        r, c = np.unravel_index(region.argmax(), region.shape)
        assert abs(c - REL[0][0] * OBJ_W) <= STRIDE and abs(r - REL[0][1] * OBJ_H) <= STRIDE


def test_a_bad_box_fails_alone(coco, tmp_path):
    """A detection without area, or outside its image, gets its own error record; the other
    objects are computed and nothing else changes."""
    ds, _, _ = coco
    s = ds.match(fo.ViewField("filepath").ends_with("canvas1.png")).first()
    s.detections.detections[1].bounding_box = [0.5, 0.5, 0.0, 0.2]
    s.detections.detections[2].bounding_box = [1.5, 1.5, 0.1, 0.1]
    s.save()
    got = sc.compute_fused_features(ds, extractor=desc(), patches_field="detections", store_dir=str(tmp_path / "s"),
                                    progress=False)
    assert got["computed"] == 7 and got["failed"] == 2, got.text()
    s.reload()
    errors = [d.sdcorr_features_error for d in s.detections.detections]
    assert errors[0] is None and "no area" in errors[1] and "outside" in errors[2] and "canvas1.png" in errors[1]
