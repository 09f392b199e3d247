"""COCO person keypoints through FiftyOne's own importer and exporter: the skeleton from
``dataset.info["categories"]`` (names, 1-based pairs -> 0-based edges), left/right flip
pairs from the names, ``write_skeletons``, COCO's 0/1/2 visibility on predictions (an
export / re-import round trip), and FiftyOne's one-argument progress callables."""

from __future__ import annotations

import json
import math
import uuid

import numpy as np
import pytest
from PIL import Image

import fiftyone as fo
import fiftyone.core.utils as fou

from fiftyone_sdcorr.core.common.params import ParameterError
from fiftyone_sdcorr.dataset.matching import InstancePrediction, resolve_flip_pairs, to_keypoints
from fiftyone_sdcorr.dataset.progress import Progress, takes_fraction_and_label
from fiftyone_sdcorr.dataset.skeletons import (
    coco_edges,
    keypoint_skeleton,
    skeleton_from_categories,
    write_skeletons,
)

COCO_NAMES = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
]
COCO_SKELETON = [  # 1-based, as in person_keypoints_*.json
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
    [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7],
]
COCO_FLIP_PAIRS = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]
IMAGES = [("a.png", 64, 48), ("b.png", 80, 60), ("c.png", 100, 50)]
PERSONS = {"a.png": 1, "b.png": 2, "c.png": 1}


def _person(rng, w, h, box):
    """17 ``[x, y, v]`` in pixels inside ``box`` (x, y, bw, bh): a few not labelled (0),
    a few labelled but occluded (1), the rest visible (2)."""
    x0, y0, bw, bh = box
    flat, v = [], []
    for i in range(17):
        vis = 0 if i in (3, 4) else 1 if i == 15 else 2
        x = float(round(x0 + rng.uniform(0.05, 0.95) * bw))
        y = float(round(y0 + rng.uniform(0.05, 0.95) * bh))
        flat += [0.0, 0.0, 0] if vis == 0 else [x, y, vis]
        v.append(vis)
    return flat, sum(1 for x in v if x > 0)


@pytest.fixture
def coco_dir(tmp_path):
    """A COCO person-keypoints labels file and its 3 images (one with two persons)."""
    rng = np.random.default_rng(7)
    data = tmp_path / "data"
    data.mkdir()
    images, annotations = [], []
    for image_id, (name, w, h) in enumerate(IMAGES, start=1):
        Image.new("RGB", (w, h), (40 * image_id, 90, 160)).save(data / name)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for k in range(PERSONS[name]):
            box = [k * w / 2 + 1, 2.0, w / 2 - 2, h - 4]
            flat, n = _person(rng, w, h, box)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0,
                                "keypoints": flat, "num_keypoints": n})
    labels = {
        "info": {"description": "hand-made COCO person keypoints"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person", "supercategory": "person",
                        "keypoints": COCO_NAMES, "skeleton": COCO_SKELETON}],
    }
    (tmp_path / "person_keypoints.json").write_text(json.dumps(labels))
    return tmp_path


def _import(data_path, labels_path):
    ds = fo.Dataset.from_dir(data_path=str(data_path), labels_path=str(labels_path),
                             dataset_type=fo.types.COCODetectionDataset,
                             label_types=["detections", "keypoints"],
                             name=f"sdcorr-coco-{uuid.uuid4().hex[:10]}")
    ds.persistent = False
    return ds


@pytest.fixture
def coco_ds(coco_dir):
    ds = _import(coco_dir / "data", coco_dir / "person_keypoints.json")
    yield ds
    if not ds.deleted:
        ds.delete()


def test_the_importer_leaves_the_skeleton_in_info_only(coco_ds):
    ds = coco_ds
    assert len(ds) == 3 and ds.count("keypoints.keypoints") == 4 and ds.count("detections.detections") == 4
    assert not ds.skeletons and ds.default_skeleton is None  # what FiftyOne's importer leaves
    kp = ds.match(fo.ViewField("filepath").ends_with("b.png")).first().keypoints.keypoints[0]
    assert kp.label == "person" and len(kp.points) == 17
    assert kp.visible[3] == 0 and all(math.isnan(v) for v in kp.points[3]) and kp.visible[15] == 1


def test_keypoint_skeleton_from_coco_categories(coco_ds):
    ds = coco_ds
    edges = [[a - 1, b - 1] for a, b in COCO_SKELETON]
    for sk in (keypoint_skeleton(ds, "keypoints"), keypoint_skeleton(ds, "keypoints", "person"),
               keypoint_skeleton(ds.limit(1), "keypoints")):  # a view answers as its dataset
        assert list(sk.labels) == COCO_NAMES
        assert [list(e) for e in sk.edges] == edges
    assert min(i for e in edges for i in e) == 0 and max(i for e in edges for i in e) == 16
    assert keypoint_skeleton(ds, "keypoints", "dog") is None  # no category of that name

    import fiftyone_sdcorr as sdc

    assert sdc.keypoint_skeleton is keypoint_skeleton and sdc.write_skeletons is write_skeletons


def test_flip_pairs_from_coco_names(coco_ds):
    pairs, origin = resolve_flip_pairs(coco_ds, "keypoints")
    assert origin == "skeleton" and pairs == COCO_FLIP_PAIRS
    assert resolve_flip_pairs(coco_ds, "keypoints", label="person") == (COCO_FLIP_PAIRS, "skeleton")
    # point names given as flip pairs are looked up in the COCO names too
    assert resolve_flip_pairs(coco_ds, "keypoints", [("left_eye", "right_eye")]) == ([(1, 2)], "parameter")


def test_write_skeletons(coco_ds):
    ds = coco_ds
    sk = write_skeletons(ds, "keypoints")
    assert list(sk.labels) == COCO_NAMES
    again = fo.load_dataset(ds.name)  # saved: a fresh handle sees it
    again.reload()
    assert list(again.skeletons["keypoints"].labels) == COCO_NAMES
    assert [list(e) for e in again.skeletons["keypoints"].edges] == [[a - 1, b - 1] for a, b in COCO_SKELETON]
    assert write_skeletons(ds, "keypoints").labels == sk.labels  # the same one: nothing to do
    # a different skeleton is kept unless overwrite
    ds.skeletons = {"keypoints": fo.KeypointSkeleton(labels=["a", "b"], edges=[[0, 1]])}
    with pytest.raises(ParameterError, match="overwrite"):
        write_skeletons(ds, "keypoints")
    assert list(ds.skeletons["keypoints"].labels) == ["a", "b"]
    assert list(keypoint_skeleton(ds, "keypoints").labels) == ["a", "b"]  # the field's own wins
    assert list(write_skeletons(ds, "keypoints", overwrite=True).labels) == COCO_NAMES
    with pytest.raises(ParameterError, match="not a keypoints field"):
        write_skeletons(ds, "detections")
    with pytest.raises(ParameterError, match="not a keypoints field"):
        write_skeletons(ds, "nope")


def test_write_skeletons_without_names(tmp_dataset, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "s.png")
    tmp_dataset.add_sample(fo.Sample(filepath=str(tmp_path / "s.png"),
                                     kp=fo.Keypoints(keypoints=[fo.Keypoint(points=[[0.5, 0.5]])])))
    assert keypoint_skeleton(tmp_dataset, "kp") is None
    with pytest.raises(ParameterError, match="no keypoint names"):
        write_skeletons(tmp_dataset, "kp")
    tmp_dataset.default_skeleton = fo.KeypointSkeleton(labels=["tip"], edges=[])
    assert list(keypoint_skeleton(tmp_dataset, "kp").labels) == ["tip"]
    assert list(write_skeletons(tmp_dataset, "kp").labels) == ["tip"]


def test_categories_choice_and_edges():
    person = {"id": 1, "name": "person", "keypoints": ["left_a", "right_a"], "skeleton": [[1, 2]]}
    dog = {"id": 2, "name": "dog", "keypoints": ["nose", "tail", "left_paw"], "skeleton": [[1, 2], [2, 3]]}
    plain = {"id": 3, "name": "car"}  # no keypoints: never chosen
    assert skeleton_from_categories([person, dog, plain]) is None  # two different sets: ambiguous
    assert list(skeleton_from_categories([person, dog, plain], "dog").labels) == ["nose", "tail", "left_paw"]
    assert [list(e) for e in skeleton_from_categories([person, plain]).edges] == [[0, 1]]
    twin = dict(person, id=4, name="child")
    assert list(skeleton_from_categories([person, twin]).labels) == ["left_a", "right_a"]  # same names
    assert skeleton_from_categories(None) is None and skeleton_from_categories([plain]) is None
    assert coco_edges([[1, 2], [2, 9], "x", [3]], 3) == [[0, 1]]  # out of range / malformed dropped
    assert coco_edges([[0, 1], [1, 2]], 3) == [[0, 1], [1, 2]]  # holds a 0: already 0-based


# --------------------------------------------------------------------------- predictions as COCO
def _predictions(ds):
    """Predictions from the ground truth: each visible point moved a little; points 3, 4
    (not labelled) and 15 (low confidence) invisible."""
    out = {}
    for sid, kps in zip(ds.values("id"), ds.values("keypoints")):
        preds = []
        for j, kp in enumerate(kps.keypoints):
            pts = np.array(kp.points, dtype=np.float64) + 0.01
            conf = np.full(len(pts), 0.9)
            conf[15] = 0.05
            preds.append(InstancePrediction(label=kp.label, instance=j, points=pts, confidence=conf,
                                            reference_ids=[sid], reference_id=sid, similarity=0.8,
                                            flipped=False))
        out[sid] = to_keypoints(preds, visibility_threshold=0.2)
    return out


def test_to_keypoints_writes_coco_visibility_and_survives_a_coco_round_trip(coco_ds, tmp_path):
    ds = coco_ds
    preds = _predictions(ds)
    ds.set_values("pred", preds, key_field="id")
    kp = ds.first().pred.keypoints[0]
    assert kp.visible == [0 if i in (3, 4, 15) else 2 for i in range(17)]
    assert all(isinstance(v, int) for v in kp.visible)
    assert all(math.isnan(v) for i in (3, 4, 15) for v in kp.points[i])

    # FiftyOne's exporter writes ONE label field per export; a keypoints field becomes one
    # annotation per fo.Keypoint (keypoints, no bbox). ``categories`` keeps the names.
    out = tmp_path / "export"
    ds.export(export_dir=str(out), dataset_type=fo.types.COCODetectionDataset, label_field="pred",
              categories=ds.info["categories"])
    written = json.loads((out / "labels.json").read_text())
    assert written["categories"][0]["keypoints"] == COCO_NAMES
    assert len(written["annotations"]) == 4
    assert all(a["keypoints"][3 * 3 + 2] == 0 and a["keypoints"][5 * 3 + 2] == 2 for a in written["annotations"])
    back = _import(out / "data", out / "labels.json")
    try:
        assert list(keypoint_skeleton(back, "keypoints").labels) == COCO_NAMES
        assert resolve_flip_pairs(back, "keypoints")[0] == COCO_FLIP_PAIRS
        sizes = {name: (w, h) for name, w, h in IMAGES}
        orig = {s.filepath.rsplit("/", 1)[-1]: s for s in ds}
        assert len(back) == len(ds)
        for s in back:
            name = s.filepath.rsplit("/", 1)[-1]
            w, h = sizes[name]
            mine = orig[name].pred.keypoints
            theirs = s.keypoints.keypoints
            assert len(theirs) == len(mine) == PERSONS[name]
            for a, b in zip(mine, theirs):
                assert list(b.visible) == list(a.visible)
                for (xa, ya), (xb, yb), v in zip(a.points, b.points, a.visible):
                    if v == 0:
                        assert math.isnan(xb) and math.isnan(yb)
                    else:
                        assert abs(xa - xb) * w <= 1.0 and abs(ya - yb) * h <= 1.0
    finally:
        back.delete()

    # the detections field exports the same way, as its own labels file
    boxes = tmp_path / "boxes"
    ds.export(export_dir=str(boxes), dataset_type=fo.types.COCODetectionDataset, label_field="detections",
              categories=ds.info["categories"], export_media=False)
    written = json.loads((boxes / "labels.json").read_text())
    assert len(written["annotations"]) == 4 and all("bbox" in a for a in written["annotations"])


def test_benchmark_visibility_is_coco():
    from fiftyone_sdcorr.core.benchmarks.formats import ImageRecord
    from fiftyone_sdcorr.dataset.benchmarks import _keypoints

    img = ImageRecord(key="cat/x", path="/x.png", category="cat", width=100, height=50,
                      points=np.array([[10.0, 5.0], [np.nan, np.nan]]), bbox=None, extra={})
    kp = _keypoints(img, "spair").keypoints[0]
    assert kp.visible == [2, 0] and all(isinstance(v, int) for v in kp.visible)


# --------------------------------------------------------------------------- progress
def test_fiftyone_progress_callables_get_the_bar(coco_ds):
    import fiftyone_sdcorr as sdc

    ds = coco_ds
    ds.set_values("pred", _predictions(ds), key_field="id")
    seen = []

    def fn(pb):
        seen.append((type(pb), pb.complete, pb.progress))

    r = sdc.evaluate_keypoints(ds, "pred", "keypoints", eval_key=None, alphas=(0.1,),
                               progress=fo.report_progress(fn, n=4))
    assert r is not None
    assert seen and all(issubclass(t, fou.ProgressBar) for t, _, _ in seen)
    assert seen[-1][1] is True and seen[-1][2] == 1.0  # a final, complete call
    assert len(seen) == 3  # n=4 increments over 3 samples: one per sample

    seen.clear()
    sdc.evaluate_keypoints(ds, "pred", "keypoints", eval_key=None, alphas=(0.1,),
                           progress=fo.report_progress(fn, dt=3600))
    assert [c for _, c, _ in seen] == [True]  # dt: only the final call within an hour

    # ours, cb(fraction, label), still gets fractions and labels, ending at 1.0
    ours = []
    sdc.evaluate_keypoints(ds, "pred", "keypoints", eval_key=None, alphas=(0.1,),
                           progress=lambda f, label: ours.append((f, label)))
    assert ours[0][0] == 0.0 and ours[-1][0] == 1.0 and all(isinstance(t, str) for _, t in ours)


def test_a_failing_fiftyone_callable_never_stops_the_run(coco_ds, caplog):
    import fiftyone_sdcorr as sdc

    ds = coco_ds
    ds.set_values("pred", _predictions(ds), key_field="id")

    def boom(pb):
        raise RuntimeError("boom")

    r = sdc.evaluate_keypoints(ds, "pred", "keypoints", eval_key=None, alphas=(0.1,), progress=boom)
    assert r is not None and "progress callback failed" in caplog.text


def test_progress_tells_the_two_callables_apart():
    import functools

    class Bar:
        def one(self, pb):
            pass

        def two(self, fraction, label):
            pass

    assert takes_fraction_and_label(lambda f, label: None)
    assert takes_fraction_and_label(lambda *a: None)
    assert takes_fraction_and_label(Bar().two)
    assert takes_fraction_and_label(functools.partial(lambda x, f, label: None, 1))
    assert not takes_fraction_and_label(lambda pb: None)
    assert not takes_fraction_and_label(Bar().one)
    assert not takes_fraction_and_label(fo.report_progress(lambda pb: None, n=3))
    assert not takes_fraction_and_label(fo.report_progress(lambda pb: None, dt=1.0))

    calls = []
    p = Progress(lambda pb: calls.append(pb.iteration), total=2)
    assert p.callback is None and isinstance(p.bar, fou.ProgressBar)
    p.update(1)
    p.update(1)
    p.close()
    assert calls == [1, 2]


def test_a_corrupted_copy_keeps_coco_visibility():
    from fiftyone_sdcorr.dataset.review_quality import copy_keypoint

    kp = fo.Keypoint(label="person", points=[[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]], visible=[2, 1, 2])
    new = copy_keypoint(kp, np.array([[0.1, 0.1], [0.25, 0.2], [np.nan, np.nan]]), [False, False, True])
    assert new.visible == [2, 1, 0] and all(isinstance(v, int) and not isinstance(v, bool) for v in new.visible)
    old = fo.Keypoint(points=[[0.1, 0.1], [0.2, 0.2]], visible=[True, True])
    assert copy_keypoint(old, np.array([[0.1, 0.1], [np.nan, np.nan]]), [False, True]).visible == [True, False]


def test_the_panel_names_and_joins_coco_points(coco_ds):
    from fiftyone_sdcorr.plugin.panel_figure import point_labels, skeleton_of

    assert point_labels(coco_ds, "keypoints", 18) == COCO_NAMES + ["point 17"]
    assert point_labels(coco_ds, "keypoints", 3, "person") == COCO_NAMES[:3]
    assert point_labels(coco_ds, "keypoints", 2, "not-a-category") == COCO_NAMES[:2]  # the only one
    assert [list(e) for e in skeleton_of(coco_ds, "keypoints", "person").edges][:2] == [[15, 13], [13, 11]]
