"""evaluate_keypoints (PCK as a FiftyOne evaluation run) and flag_keypoint_annotations,
through real FiftyOne + MongoDB; their operators immediate and delegated."""

import itertools
import uuid

import numpy as np
import pytest
from PIL import Image

import fiftyone as fo
import fiftyone.operators as foo
from fiftyone import ViewField as F
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionRunState

from fiftyone_sdcorr.dataset.evaluate import KeypointPCKResults, evaluate_keypoints
from fiftyone_sdcorr.dataset.pck import match_instances, points_of
from fiftyone_sdcorr.dataset.review import flag_keypoint_annotations
from local_descriptor import LocalDescriptor
from snapshots import field_snapshot

EVAL_URI = "@sdcorr/sdcorr/evaluate_keypoints"
FLAG_URI = "@sdcorr/sdcorr/flag_keypoint_annotations"
NAN = float("nan")
CAT_POINTS = [[0.52, 0.55], [0.42, 0.40], [0.62, 0.40], [0.30, 0.20], [0.75, 0.18], [0.53, 0.75]]


def _name():
    return f"sdcorr-eval-{uuid.uuid4().hex[:10]}"


def _kps(label, pts):
    return fo.Keypoints(keypoints=[fo.Keypoint(label=label, points=[list(p) for p in pts])])


@pytest.fixture
def hand_ds(tmp_path):
    """Two images with hand-made predictions whose PCK is known (see the test)."""
    Image.new("RGB", (200, 100)).save(tmp_path / "a.png")
    Image.new("RGB", (100, 100)).save(tmp_path / "b.png")
    ds = fo.Dataset(_name())
    a = fo.Sample(
        filepath=str(tmp_path / "a.png"),
        # 200 x 100 px; visible GT points span 100 px in x, 80 px in y -> extent T = 100 px
        gt=_kps("cat", [[0.1, 0.1], [0.6, 0.1], [0.1, 0.9], [NAN, NAN]]),
        # errors: 8 px (0.08 T), 50 px (0.5 T), predicted invisible, GT invisible
        pred=_kps("cat", [[0.14, 0.1], [0.6, 0.6], [NAN, NAN], [0.2, 0.2]]),
        box=fo.Detections(detections=[fo.Detection(label="cat", bounding_box=[0.0, 0.0, 0.5, 0.2])]),
    )
    b = fo.Sample(
        filepath=str(tmp_path / "b.png"),
        # 100 x 100 px; extent T = 100 px; errors 0, 3 px (0.03 T), 20 px (0.2 T)
        gt=_kps("dog", [[0.0, 0.0], [1.0, 1.0], [0.5, 0.5]]),
        pred=_kps("dog", [[0.0, 0.0], [1.0, 0.97], [0.5, 0.7]]),
    )
    c = fo.Sample(filepath=str(tmp_path / "b.png"), note="no labels")
    ds.add_samples([a, b, c])
    yield ds
    ds.delete()




# --------------------------------------------------------------------------- PCK
def test_a_point_exactly_at_the_threshold_is_not_correct(tmp_path):
    """Correct when the distance is strictly below alpha x T, as the paper's code
    (binary-exact numbers, so no rounding decides it)."""
    Image.new("RGB", (80, 80)).save(tmp_path / "s.png")
    ds = fo.Dataset(_name())
    try:
        ds.add_sample(fo.Sample(filepath=str(tmp_path / "s.png"), gt=_kps("x", [[0.25, 0.5]]),
                                pred=_kps("x", [[0.375, 0.5]])))  # 10 px = 0.125 x 80 px
        r = evaluate_keypoints(ds, "pred", "gt", eval_key=None, threshold="image", alphas=(0.125, 0.25),
                               progress=False)
        assert r.pck(0.125) == 0.0 and r.pck(0.25) == 1.0
    finally:
        ds.delete()


def test_known_pck_per_point_and_per_image(hand_ds):
    ds = hand_ds
    r = evaluate_keypoints(ds, "pred", "gt", alphas=(0.1, 0.04, 0.01), progress=False)
    assert isinstance(r, KeypointPCKResults)
    # counted points: cat 2 (0.08, 0.5), dog 3 (0, 0.03, 0.2)
    assert r.counts["cat"] == {"points": 2, "missed": 1, "instances": 1, "images": 1}
    assert r.counts["dog"]["points"] == 3 and r.counts["dog"]["missed"] == 0
    # per point @0.1: cat 1/2, dog 2/3 -> mean over labels 7/12; pooled 3/5
    assert r.pck(0.1, "per_point", "cat") == pytest.approx(0.5)
    assert r.pck(0.1, "per_point", "dog") == pytest.approx(2 / 3)
    assert r.pck(0.1) == pytest.approx((0.5 + 2 / 3) / 2)
    assert r.pck(0.1, "pooled") == pytest.approx(3 / 5)
    # @0.04: cat 0/2, dog 2/3; @0.01: cat 0, dog 1/3
    assert r.pck(0.04) == pytest.approx((0 + 2 / 3) / 2)
    assert r.pck(0.01) == pytest.approx((0 + 1 / 3) / 2)
    # per image @0.1: image a 1/2, image b 2/3 -> 7/12 (equal here, one label per image)
    assert r.pck(0.1, "per_image") == pytest.approx(7 / 12)
    # written back: per-point correctness at the first alpha, per-sample PCK
    a, b, c = list(ds)
    assert a.pred.keypoints[0].sdcorr_pck_correct == [True, False, None, None]
    assert a.pred.keypoints[0].sdcorr_pck_dist[:2] == pytest.approx([0.08, 0.5])
    assert b.pred.keypoints[0].sdcorr_pck_correct == [True, True, False]
    assert a.sdcorr_pck == pytest.approx(0.5) and b.sdcorr_pck == pytest.approx(2 / 3)
    assert c.sdcorr_pck is None
    # the App can filter failures
    failing = ds.filter_labels("pred", F("sdcorr_pck_correct").contains(False))
    assert sorted(failing.values("id")) == sorted([a.id, b.id])
    assert "cat" in r.report_str() and "per-point" in r.report_str()


def test_per_point_and_per_image_differ(tmp_path):
    """Two images of one label with different point counts: per-point pools, per-image averages."""
    Image.new("RGB", (100, 100)).save(tmp_path / "x.png")
    ds = fo.Dataset(_name())
    gt4 = [[0.0, 0.0], [1.0, 1.0], [0.2, 0.2], [0.4, 0.4]]
    ds.add_samples([
        fo.Sample(filepath=str(tmp_path / "x.png"), gt=_kps("a", gt4), pred=_kps("a", gt4)),  # 4/4
        fo.Sample(filepath=str(tmp_path / "x.png"), gt=_kps("a", gt4[:2]),
                  pred=_kps("a", [[0.5, 0.5], [0.0, 0.5]])),  # 0/2
    ])
    try:
        r = evaluate_keypoints(ds, "pred", "gt", alphas=(0.1,), progress=False)
        assert r.pck(0.1, "per_point") == pytest.approx(4 / 6)
        assert r.pck(0.1, "per_image") == pytest.approx(0.5)
    finally:
        ds.delete()


# --------------------------------------------------------------------------- instance matching
# a big 9-point person over most of a 200 x 200 image, and a small 3-point decoy inside it
BIG = [[0.2, 0.1], [0.5, 0.1], [0.8, 0.1], [0.2, 0.5], [0.5, 0.5], [0.8, 0.5], [0.2, 0.9], [0.5, 0.9], [0.8, 0.9]]
DECOY = [[0.45, 0.45], [0.55, 0.45], [0.5, 0.55]]


def _kp(label, pts, **attrs):
    return fo.Keypoint(label=label, points=[list(p) for p in pts], **attrs)


def test_instances_paired_by_geometry_in_any_order(tmp_path):
    """The decoy listed first in the ground truth does not steal the big person's
    prediction: 9 points counted (all correct), the decoy's 3 missed, for every order of
    the ground-truth and prediction lists (a stray 'dog' prediction has no ground truth)."""
    Image.new("RGB", (200, 200)).save(tmp_path / "p.png")
    ds = fo.Dataset(_name())
    try:
        samples = []
        for g in itertools.permutations([("person", DECOY), ("person", BIG)]):
            for p in itertools.permutations([("person", BIG), ("dog", [[0.1, 0.1], [0.3, 0.3]])]):
                samples.append(fo.Sample(filepath=str(tmp_path / "p.png"),
                                         gt=fo.Keypoints(keypoints=[_kp(lab, q) for lab, q in g]),
                                         pred=fo.Keypoints(keypoints=[_kp(lab, q) for lab, q in p])))
        ds.add_samples(samples)
        assert len(ds) == 4
        for sample in ds:
            r = evaluate_keypoints(ds.select(sample.id), "pred", "gt", eval_key=None, alphas=(0.1, 0.01),
                                   progress=False)
            assert r.counts == {"person": {"points": 9, "missed": 3, "instances": 2, "images": 1}}
            assert r.pck(0.1) == 1.0 and r.pck(0.01) == 1.0 and r.pck(0.1, "per_image") == 1.0
        r = evaluate_keypoints(ds, "pred", "gt", eval_key="geo", alphas=(0.1,), progress=False)
        assert r.counts["person"] == {"points": 36, "missed": 12, "instances": 8, "images": 4}
        assert r.pck(0.1) == 1.0
        for sample in ds:
            for kp in sample.pred.keypoints:
                if kp.label == "person":
                    assert kp.geo_correct == [True] * 9 and kp.geo_dist == [0.0] * 9
                else:  # the stray prediction is not scored
                    assert kp.geo_correct == [None, None]
            assert sample.geo == 1.0
        # the old pairing (first person with first person) would have scored the decoy
        # listed first against the big person's prediction
    finally:
        ds.delete()


def test_match_instances_optimal_and_order_independent():
    """Three people, each prediction a perturbed copy of one of them (one with a wrong
    point): the same pairs, by identity, for all 36 orders of the two lists."""
    people = {"a": BIG, "b": [[x * 0.3, y * 0.3] for x, y in BIG], "c": [[x * 0.3 + 0.6, y * 0.3 + 0.6] for x, y in BIG]}
    preds = {n: [[x + 0.004, y - 0.003] for x, y in q] for n, q in people.items()}
    preds["a"][4] = [0.95, 0.95]  # one wrong point does not break the pairing
    for go in itertools.permutations("abc"):
        for po in itertools.permutations("abc"):
            gt = [_kp("person", people[n]) for n in go]
            pr = [_kp("person", preds[n]) for n in po]
            pairs = match_instances(pr, gt, 200, 200)
            assert sorted((po[i], go[j]) for i, j in pairs) == [("a", "a"), ("b", "b"), ("c", "c")]
    # a label never matches another label; no point visible in both: no pair
    assert match_instances([_kp("dog", BIG)], [_kp("cat", BIG)], 200, 200) == []
    assert match_instances([_kp("cat", [[NAN, NAN]] * 9)], [_kp("cat", BIG)], 200, 200) == []
    assert match_instances([_kp(None, BIG)], [_kp(None, BIG), _kp("cat", BIG)], 200, 200) == [(0, 0)]


def test_instance_link_wins_over_geometry(tmp_path):
    """Predictions linked (``instance``) to the other person are scored against it, though
    their points lie on the first one; without links geometry pairs them."""
    Image.new("RGB", (200, 200)).save(tmp_path / "p.png")
    left = [[x * 0.4, y] for x, y in BIG]          # x in 0.08 .. 0.32
    right = [[x * 0.4 + 0.6, y] for x, y in BIG]   # x in 0.68 .. 0.92
    ia, ib = fo.Instance(), fo.Instance()
    ds = fo.Dataset(_name())
    try:
        linked = fo.Sample(filepath=str(tmp_path / "p.png"),
                           gt=fo.Keypoints(keypoints=[_kp("person", left, instance=ia),
                                                      _kp("person", right, instance=ib)]),
                           pred=fo.Keypoints(keypoints=[_kp("person", left, instance=ib),
                                                        _kp("person", right[:3], instance=ia)]))
        plain = fo.Sample(filepath=str(tmp_path / "p.png"),
                          gt=fo.Keypoints(keypoints=[_kp("person", left), _kp("person", right)]),
                          pred=fo.Keypoints(keypoints=[_kp("person", left), _kp("person", right[:3])]))
        ds.add_samples([linked, plain])
        linked, plain = list(ds)  # the links as read back from the database
        assert linked.gt.keypoints[1].instance.id == linked.pred.keypoints[0].instance.id
        g, p = linked.gt.keypoints, linked.pred.keypoints
        assert match_instances(p, g, 200, 200) == [(0, 1), (1, 0)]
        assert match_instances(plain.pred.keypoints, plain.gt.keypoints, 200, 200) == [(0, 0), (1, 1)]
        r = evaluate_keypoints(ds.select(linked.id), "pred", "gt", eval_key=None, alphas=(0.1,), progress=False)
        # 9 + 3 points counted, every one 0.6 x 200 = 120 px away (T = extent 160 px): none correct
        assert r.counts["person"] == {"points": 12, "missed": 0, "instances": 2, "images": 1}
        assert r.pck(0.1) == 0.0
        r = evaluate_keypoints(ds.select(plain.id), "pred", "gt", eval_key=None, alphas=(0.1,), progress=False)
        assert r.counts["person"] == {"points": 12, "missed": 0, "instances": 2, "images": 1}
        assert r.pck(0.1) == 1.0
    finally:
        ds.delete()


def test_visible_attribute(tmp_path):
    """COCO ``visible`` ints: 0 does not count (even with finite coordinates), 1 and 2 do;
    booleans likewise."""
    Image.new("RGB", (100, 100)).save(tmp_path / "v.png")
    gt_pts = [[0.1, 0.1], [0.9, 0.1], [0.5, 0.5], [0.1, 0.9], [0.9, 0.9]]
    # point 2 predicted 40 px off (wrong if it counted), point 4 not predicted
    pred_pts = [[0.1, 0.1], [0.9, 0.1], [0.9, 0.5], [0.1, 0.9], [NAN, NAN]]
    ds = fo.Dataset(_name())
    try:
        coco = fo.Sample(filepath=str(tmp_path / "v.png"),
                         gt=fo.Keypoints(keypoints=[_kp("x", gt_pts, visible=[2, 1, 0, 2, 1])]),
                         pred=_kps("x", pred_pts))
        flags = fo.Sample(filepath=str(tmp_path / "v.png"),
                          gt=fo.Keypoints(keypoints=[_kp("y", gt_pts[:3], visible=[True, True, False])]),
                          pred=_kps("y", pred_pts[:3]))
        ds.add_samples([coco, flags])
        assert np.isnan(points_of(ds.first().gt.keypoints[0])[2]).all()  # v=0: not visible
        r = evaluate_keypoints(ds, "pred", "gt", eval_key="vis", alphas=(0.1,), progress=False)
        # x: points 0, 1, 3 count (v=2, 1, 2), point 4 (v=1) missed; y: points 0, 1
        assert r.counts["x"] == {"points": 3, "missed": 1, "instances": 1, "images": 1}
        assert r.counts["y"] == {"points": 2, "missed": 0, "instances": 1, "images": 1}
        assert r.pck(0.1, "per_point", "x") == 1.0 and r.pck(0.1, "per_point", "y") == 1.0
        coco, flags = list(ds)
        assert coco.pred.keypoints[0].vis_correct == [True, True, None, True, None]
        assert flags.pred.keypoints[0].vis_correct == [True, True, None]
    finally:
        ds.delete()


def test_threshold_from_the_linked_detection(tmp_path):
    """``T`` is the box of the detection linked by ``instance`` (50 px), not the bigger box
    holding more ground-truth points (100 px) that the geometry would choose."""
    Image.new("RGB", (100, 100)).save(tmp_path / "t.png")
    gt_pts = [[0.6, 0.6], [0.9, 0.6], [0.6, 0.9], [0.9, 0.9]]
    pred_pts = [[0.6, 0.6], [0.8, 0.6], [0.6, 0.9], [0.9, 0.9]]  # point 1: 10 px off
    ds = fo.Dataset(_name())
    try:
        samples = []
        for link in (True, False):
            inst = fo.Instance()
            samples.append(fo.Sample(
                filepath=str(tmp_path / "t.png"),
                gt=fo.Keypoints(keypoints=[_kp("p", gt_pts, **({"instance": inst} if link else {}))]),
                pred=_kps("p", pred_pts),
                box=fo.Detections(detections=[
                    fo.Detection(label="p", bounding_box=[0.0, 0.0, 1.0, 1.0]),
                    fo.Detection(label="p", bounding_box=[0.5, 0.5, 0.5, 0.5], instance=fo.Instance()),
                    fo.Detection(label="p", bounding_box=[0.0, 0.0, 0.5, 0.5],
                                 **({"instance": inst} if link else {}))])))
        ds.add_samples(samples)
        r = evaluate_keypoints(ds, "pred", "gt", eval_key="tb", bbox_field="box", alphas=(0.15,), progress=False)
        linked, plain = list(ds)
        assert linked.pred.keypoints[0].tb_dist == pytest.approx([0.0, 0.2, 0.0, 0.0])  # 10 / 50
        assert plain.pred.keypoints[0].tb_dist == pytest.approx([0.0, 0.1, 0.0, 0.0])   # 10 / 100
        assert linked.tb == pytest.approx(0.75) and plain.tb == 1.0
        assert r.pck(0.15) == pytest.approx(7 / 8)
    finally:
        ds.delete()


def test_bbox_and_image_thresholds(hand_ds):
    ds = hand_ds
    # box of a: 0.5 x 0.2 of 200 x 100 -> max(100, 20) = 100 px: same as the extent
    with pytest.raises(ValueError, match="existing field"):  # the key names the sample field
        evaluate_keypoints(ds, "pred", "gt", eval_key="box", bbox_field="box", progress=False)
    r = evaluate_keypoints(ds, "pred", "gt", eval_key="by_box", bbox_field="box", alphas=(0.1,), progress=False)
    assert r.pck(0.1, "per_point", "cat") == pytest.approx(0.5)
    # image threshold: a: 200 px -> errors 0.04, 0.25 -> 1/2 at 0.1, 1/2 at 0.05
    r = evaluate_keypoints(ds, "pred", "gt", eval_key="img", threshold="image", alphas=(0.1, 0.05),
                           progress=False)
    assert r.pck(0.05, "per_point", "cat") == pytest.approx(0.5)
    assert ds.first().pred.keypoints[0].img_dist[:2] == pytest.approx([0.04, 0.25])
    with pytest.raises(ValueError, match="threshold"):
        evaluate_keypoints(ds, "pred", "gt", threshold="nope", progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        evaluate_keypoints(ds, "pred", "nope", progress=False)


def test_run_listed_reloadable_and_deleted(hand_ds):
    ds = hand_ds
    before = field_snapshot(ds)
    evaluate_keypoints(ds, "pred", "gt", eval_key="pck_run", progress=False)
    assert "pck_run" in ds.list_evaluations()
    info = ds.get_evaluation_info("pck_run")
    assert info.config.method == "sdcorr-pck" and info.config.pred_field == "pred"
    # a fresh handle, no cache: the results come back from the database with their report
    fresh = fo.load_dataset(ds.name)
    fresh.reload()
    r = fresh.load_evaluation_results("pck_run", cache=False)
    assert isinstance(r, KeypointPCKResults)
    assert r.pck(0.1) == pytest.approx((0.5 + 2 / 3) / 2)
    assert set(r.report()) >= {"per_point", "per_image", "counts", "alphas"}
    r.print_report()
    # renaming the run renames its fields
    ds.rename_evaluation("pck_run", "pck_run2")
    assert ds.first().pck_run2 == pytest.approx(0.5)
    assert ds.first().pred.keypoints[0].pck_run2_correct == [True, False, None, None]
    assert ds.load_evaluation_results("pck_run2").pck(0.1) == pytest.approx((0.5 + 2 / 3) / 2)
    # the evaluation's fields go away with it, and nothing else changed
    ds.delete_evaluation("pck_run2")
    assert ds.list_evaluations() == []
    schema = ds.get_field_schema(flat=True)
    assert not [k for k in schema if "pck_run" in k]
    assert field_snapshot(ds) == before


def test_eval_operator_immediate_and_delegated(hand_ds):
    ds = hand_ds
    res = foo.execute_operator(EVAL_URI, ctx={"dataset": ds, "view": ds.view(), "params": dict(
        pred_field="pred", gt_field="gt", eval_key="op_pck", alphas="0.1, 0.04")})
    res.raise_exceptions()
    ds.reload()
    assert "op_pck" in ds.list_evaluations()
    assert ds.load_evaluation_results("op_pck").pck(0.04) == pytest.approx(1 / 3)
    op = foo.get_operator(EVAL_URI)
    res = op(ds, "pred", "gt", eval_key="op_pck2", alphas=(0.1,), delegate=True)
    res.raise_exceptions()
    assert res.delegated
    svc = DelegatedOperationService()
    svc.execute_queued_operations(operator=EVAL_URI, dataset_name=ds.name)
    doc = svc.get(res.result["id"])
    assert doc.run_state == ExecutionRunState.COMPLETED, doc.result
    assert doc.result.result["eval_key"] == "op_pck2"
    ds.reload()
    assert "op_pck2" in ds.list_evaluations()


# --------------------------------------------------------------------------- review
@pytest.fixture
def review_ds(photo_paths, tmp_path):
    """Four views of chelsea (original, 60 % scale, shifted, cropped), each annotated with the
    cat points; one point of the shifted view is moved to a wrong place."""
    img = Image.open(photo_paths["chelsea"]).convert("RGB")
    w, h = img.size
    paths, pts = [photo_paths["chelsea"]], [CAT_POINTS]
    img.resize((int(w * 0.6), int(h * 0.6)), Image.BICUBIC).save(tmp_path / "small.png")
    paths.append(str(tmp_path / "small.png"))
    pts.append(CAT_POINTS)
    dx, dy = 40, 25
    canvas = Image.new("RGB", (w, h))
    canvas.paste(img.crop((0, 0, w - dx, h - dy)), (dx, dy))
    canvas.save(tmp_path / "shift.png")
    paths.append(str(tmp_path / "shift.png"))
    shifted = [[(x * w + dx) / w, (y * h + dy) / h] for x, y in CAT_POINTS]
    shifted[1] = [0.15, 0.85]  # the "left eye" annotated far away
    pts.append(shifted)
    x0, y0, x1, y1 = 90, 20, 400, 260
    img.crop((x0, y0, x1, y1)).save(tmp_path / "crop.png")
    paths.append(str(tmp_path / "crop.png"))
    pts.append([[(x * w - x0) / (x1 - x0), (y * h - y0) / (y1 - y0)] for x, y in CAT_POINTS])
    ds = fo.Dataset(_name())
    ds.add_samples([fo.Sample(filepath=p, gt=_kps("cat", q)) for p, q in zip(paths, pts)]
                   + [fo.Sample(filepath=paths[0], note="unannotated")])
    yield ds
    ds.delete()


def test_flag_moved_annotation(review_ds):
    ds = review_ds
    before = field_snapshot(ds, exclude=("tags",))
    summary = flag_keypoint_annotations(ds, "gt", extractor=LocalDescriptor(size=448), alpha=0.1,
                                        min_confidence=0.5, progress=False)
    shifted = ds.skip(2).first()
    assert summary["checked"] == 4 and summary["points_checked"] >= 20
    assert summary["flagged_samples"] == [shifted.id], summary["suspicious"]
    assert [(s["instance"], s["point"]) for s in summary["suspicious"][shifted.id]] == [(0, 1)]
    assert ds.match_tags("sdcorr:suspicious").values("id") == [shifted.id]
    rv = shifted.sdcorr_review.keypoints[0]
    assert rv.sdcorr_suspicious[1] is True and rv.sdcorr_suspicious.count(True) == 1
    assert rv.points == shifted.gt.keypoints[0].points  # a copy of the annotation
    # the evidence for the moved point is near where it should be
    w, h = Image.open(shifted.filepath).size
    true_xy = np.array([(CAT_POINTS[1][0] * w + 40) / w, (CAT_POINTS[1][1] * h + 25) / h])
    assert np.abs((np.array(rv.sdcorr_evidence[1]) - true_xy) * [w, h]).max() < 30
    # ground truth and every other field untouched; the unannotated sample not reviewed
    assert field_snapshot(ds, exclude=("tags", "sdcorr_review", "sdcorr_review_error")) == before
    assert ds.last().sdcorr_review is None
    with pytest.raises(ValueError, match="already exists"):
        flag_keypoint_annotations(ds, "gt", extractor=LocalDescriptor(size=448), progress=False)


def test_flag_needs_two_annotations(review_ds):
    ds = review_ds
    with pytest.raises(ValueError, match="at least 2"):
        flag_keypoint_annotations(ds.limit(1), "gt", extractor=LocalDescriptor(size=448), progress=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from fiftyone_sdcorr.core.features.tiny import tiny_models

    return tiny_models(tmp_path_factory.mktemp("tiny-models"))


def test_flag_operator_immediate_and_delegated(review_ds, models):
    sd, dino = models
    ds = review_ds
    recipe = dict(sd_size=128, sd_mode="whole", dino_size=56, pca_dim=8)
    params = dict(gt_field="gt", sd_model=sd, dino_model=dino, device="cpu", recipe=recipe,
                  review_field="rv1", min_confidence=0.0)
    res = foo.execute_operator(FLAG_URI, ctx={"dataset": ds, "view": ds.view(), "params": params})
    res.raise_exceptions()
    ds.reload()
    assert ds.count("rv1") == 4 and ds.count("rv1_error") == 0
    op = foo.get_operator(FLAG_URI)
    res = op(ds, "gt", review_field="rv2", sd_model=sd, dino_model=dino, device="cpu", recipe=recipe,
             tag="rv2-flag", delegate=True)
    res.raise_exceptions()
    svc = DelegatedOperationService()
    svc.execute_queued_operations(operator=FLAG_URI, dataset_name=ds.name)
    doc = svc.get(res.result["id"])
    assert doc.run_state == ExecutionRunState.COMPLETED, doc.result
    assert doc.result.result["checked"] == 4
    ds.reload()
    assert ds.count("rv2") == 4
    assert all(len(kp.sdcorr_suspicious) == 6 for kps in ds.exists("rv2").values("rv2") for kp in kps.keypoints)
