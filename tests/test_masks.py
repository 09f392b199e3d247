"""Mask propagation and evaluation (issue 17, items 2, 3 and 6), with answers known by
construction: a textured reference (tests/local_descriptor.textured_noise) with a class
mask, and targets that are the reference itself or a known warp of it (shift, half size,
mirror), described by the deterministic local descriptor (no model weights)."""

import uuid

import numpy as np
import pytest
from PIL import Image

import fiftyone as fo
import fiftyone.operators as foo

import fiftyone_sdcorr as sc
from fiftyone_sdcorr.core.common.params import ParameterError
from fiftyone_sdcorr.dataset.evaluate_masks import iou_per_class
from fiftyone_sdcorr.dataset.propagate_masks import DB_MAX_PIXELS, resize_nearest
from local_descriptor import LocalDescriptor, textured_noise

SIZE, RES = 200, 64
SHIFT = 28
PREFIX = "@sdcorr/sdcorr/"


def desc():
    return LocalDescriptor(size=224, stride=14)


def _labels(size=SIZE):
    lab = np.zeros((size, size), np.uint8)
    lab[50:150, 60:140] = 1
    lab[80:120, 90:110] = 2
    return lab


def _iou(a, b, c):
    return ((a == c) & (b == c)).sum() / ((a == c) | (b == c)).sum()


def _variants():
    """``{name: (image, the reference's mask carried by the same warp)}``."""
    image, lab = textured_noise(SIZE, SIZE, seed=1), _labels()
    shifted, moved = np.full_like(image, 128), np.zeros_like(lab)
    shifted[:, SHIFT:], moved[:, SHIFT:] = image[:, :-SHIFT], lab[:, :-SHIFT]
    half = np.asarray(Image.fromarray(image).resize((SIZE // 2, SIZE // 2), Image.BILINEAR))
    return {"same": (image, lab), "shift": (shifted, moved), "half": (half, lab[1::2, 1::2]),
            "mirror": (image[:, ::-1], lab[:, ::-1])}


@pytest.fixture
def world(tmp_path):
    """A reference (tagged ``ref``, ``gt`` = its mask), a decoy reference of another
    texture and mask, and one target per variant with its known mask in ``truth``."""
    ds = fo.Dataset(f"sdcorr-masks-{uuid.uuid4().hex[:8]}")
    samples = []
    decoy = np.zeros((SIZE, SIZE), np.uint8)
    decoy[10:40, 10:40] = 1
    for name, (img, lab) in [("ref", _variants()["same"]), ("decoy", (textured_noise(SIZE, SIZE, seed=7), decoy))] \
            + list(_variants().items()):
        path = str(tmp_path / f"{name}.png")
        Image.fromarray(np.ascontiguousarray(img)).save(path)
        s = fo.Sample(filepath=path, name=name, truth=fo.Segmentation(mask=np.ascontiguousarray(lab)))
        if name in ("ref", "decoy"):
            s.tags.append("ref")
            s["gt"] = fo.Segmentation(mask=np.ascontiguousarray(lab))
        samples.append(s)
    ds.add_samples(samples)
    ds.mask_targets = {"gt": {0: "background", 1: "body", 2: "head"}, "truth": {0: "background", 1: "body",
                                                                             2: "head"}}
    ds.save()
    yield ds, tmp_path
    ds.delete()


def _targets(ds):
    return ds.match_tags("ref", bool=False)


def _pred(ds, name, field="pred"):
    return ds.match(fo.ViewField("name") == name).first()[field]


def test_identity_and_known_warps_give_the_known_masks(world):
    ds, tmp = world
    got = sc.propagate_masks(_targets(ds), "ref", "gt", "pred", resolution=RES, flip=True, extractor=desc(),
                             confidence_field="pred_conf", mask_dir=str(tmp / "masks"), progress=False)
    assert got["targets"] == got["propagated"] == 4 and not got["failed"], got.text()
    assert got["masks_in_database"] == 8 and got["masks_in_files"] == 0  # 4 masks + 4 heat maps, all small
    truth = {k: lab for k, (_, lab) in _variants().items()}
    same = _pred(ds, "same")
    assert same.mask.shape == (SIZE, SIZE) and same.mask.dtype == np.uint8
    for c in (1, 2):  # the reference's mask back, with any model
        assert _iou(same.mask, truth["same"], c) >= 0.98
    assert same.sdcorr_reference_id == ds.match(fo.ViewField("name") == "ref").first().id  # not the decoy
    assert not same.sdcorr_flipped and same.confidence > 0.9
    shift = _pred(ds, "shift").mask
    assert _iou(shift, truth["shift"], 1) > 0.9 and _iou(shift, truth["shift"], 2) > 0.8
    half = _pred(ds, "half").mask
    assert half.shape == (SIZE // 2, SIZE // 2)  # at the target's own size
    assert _iou(half, truth["half"], 1) > 0.9 and _iou(half, truth["half"], 2) > 0.8
    mirror = _pred(ds, "mirror")
    assert mirror.sdcorr_flipped  # the mirrored reference matched better
    assert _iou(mirror.mask, truth["mirror"], 1) >= 0.95 and _iou(mirror.mask, truth["mirror"], 2) >= 0.9
    # the confidence heat map, 8-bit, at the mask's size
    heat = _pred(ds, "same", "pred_conf")
    assert heat.map.shape == (SIZE, SIZE) and heat.map.dtype == np.uint8 and list(heat.range) == [0, 255]
    assert ds.count("pred_error") == 0
    assert ds.mask_targets["pred"] == ds.mask_targets["gt"]  # the App names the classes of the new field

    # evaluation: FiftyOne's own segmentation run; IoU per class equals the hand-computed one
    res = sc.evaluate_masks(_targets(ds).match(fo.ViewField("name") != "half"), "pred", "truth", eval_key="miou",
                            progress=False)
    assert "miou" in ds.list_evaluations() and ds.get_evaluation_info("miou").config.method == "simple"
    preds = [_pred(ds, n).mask for n in ("same", "shift", "mirror")]
    gts = [truth[n] for n in ("same", "shift", "mirror")]
    for value, name in ((0, "background"), (1, "body"), (2, "head")):
        inter = sum(((p == value) & (g == value)).sum() for p, g in zip(preds, gts))
        union = sum(((p == value) | (g == value)).sum() for p, g in zip(preds, gts))
        assert res.per_class[name] == pytest.approx(inter / union)
    assert res.background == "background"
    assert res.mean_iou == pytest.approx((res.per_class["body"] + res.per_class["head"]) / 2)
    assert "mean IoU" in res.report_str() and res.report()["per_class"] == res.per_class
    assert ds.load_evaluation_results("miou").pixel_confusion_matrix.sum() == 3 * SIZE * SIZE


def test_min_confidence_leaves_low_confidence_pixels_unlabelled(world):
    ds, tmp = world
    view = ds.match(fo.ViewField("name") == "shift")
    kw = dict(resolution=RES, extractor=desc(), confidence_field="conf", progress=False)
    sc.propagate_masks(view, "ref", "gt", "all", min_confidence=0.0, **kw)
    sc.propagate_masks(view, "ref", "gt", "sure", min_confidence=0.6, **dict(kw, confidence_field="conf2"))
    s = view.first()
    conf = s.conf.map / 255.0
    low = conf < 0.6 - 1 / 255
    assert low.any() and (s.sure.mask[low] == 0).all()  # below the threshold: unlabelled
    high = conf > 0.6 + 1 / 255
    assert (s.sure.mask[high] == s.all.mask[high]).all()  # above it: the same classes
    # the grey strip (content that is not in the reference) is among the unsure pixels
    assert conf[:, :SHIFT - 8].mean() < conf[:, SHIFT + 20:].mean()


def test_new_fields_only_and_refusals_before_anything_is_written(world):
    ds, _ = world
    before = ds.get_field_schema()
    with pytest.raises(ParameterError, match="'output_field'.*already exists"):
        sc.propagate_masks(_targets(ds), "ref", "gt", "truth", extractor=desc(), progress=False)
    with pytest.raises(ParameterError, match="'output_field'.*source_field"):
        sc.propagate_masks(_targets(ds), "ref", "gt", "gt", extractor=desc(), progress=False)
    with pytest.raises(ParameterError, match="'source_field'.*not fo.Segmentation"):
        sc.propagate_masks(_targets(ds), "ref", "name", "p", extractor=desc(), progress=False)
    with pytest.raises(ParameterError, match="'resolution'|mask_resolution"):
        sc.propagate_masks(_targets(ds), "ref", "gt", "p", resolution=1, extractor=desc(), progress=False)
    with pytest.raises(ParameterError, match="references"):
        sc.propagate_masks(_targets(ds), "no-such-tag", "gt", "p", extractor=desc(), progress=False)
    assert ds.get_field_schema() == before
    # overwrite=True writes into an existing field of the same kind
    view = ds.match(fo.ViewField("name") == "same")
    got = sc.propagate_masks(view, "ref", "gt", "truth", overwrite=True, resolution=RES, extractor=desc(),
                             progress=False)
    assert got["propagated"] == 1 and view.first().truth.sdcorr_reference_id is not None


def test_large_masks_go_to_files_named_by_label_id(world, monkeypatch):
    import fiftyone_sdcorr.dataset.propagate_masks as pm

    ds, tmp = world
    monkeypatch.setattr(pm, "DB_MAX_PIXELS", 100 * 100)  # the half-size target's mask still fits
    view = ds.match(fo.ViewField("name").is_in(["same", "half"]))
    got = sc.propagate_masks(view, "ref", "gt", "pred", resolution=RES, extractor=desc(), max_side=150,
                             mask_dir=str(tmp / "m"), progress=False)
    assert got["masks_in_files"] == 1 and got["masks_in_database"] == 1, got.text()
    same = _pred(ds, "same")
    assert same.mask is None and same.mask_path == str(tmp / "m" / f"{same.id}.png")
    assert same.get_mask().shape == (150, 150)  # the long side capped at max_side
    small = resize_nearest(_labels(), 150, 150)  # the reference's mask at pixel centres
    assert _iou(same.get_mask(), small, 1) >= 0.98 and _iou(same.get_mask(), small, 2) >= 0.98
    assert _pred(ds, "half").mask is not None and _pred(ds, "half").mask_path is None
    assert DB_MAX_PIXELS == 512 * 512


def test_iou_per_class_from_a_confusion_matrix():
    cm = [[5, 1, 0], [2, 3, 0], [0, 0, 0]]  # rows: ground truth
    got = iou_per_class(cm, ["a", "b", "c"])
    assert got == {"a": pytest.approx(5 / 8), "b": pytest.approx(3 / 6), "c": None}


# --------------------------------------------------------------------------- objects
W, H = 460, 240
OBJ_W, OBJ_H = 80, 120


def _ellipse(w=OBJ_W, h=OBJ_H):
    """The object's instance mask in box coordinates (bool, as FiftyOne's detections hold)."""
    ys, xs = np.mgrid[0:h, 0:w]
    return ((xs + 0.5 - w / 2) / (0.4 * w)) ** 2 + ((ys + 0.5 - h / 2) / (0.45 * h)) ** 2 <= 1


def _box(x, y, s=1.0):
    return [x / W, y / H, OBJ_W * s / W, OBJ_H * s / H]


@pytest.fixture
def objects(tmp_path):
    """A reference canvas with one masked object (and an unmasked decoy of another label),
    and a target canvas with two full-size copies and a half-size one (boxes only), each
    with its known mask in ``gt_objects`` (linked by ``instance``)."""
    obj = Image.fromarray(textured_noise(OBJ_H, OBJ_W, seed=3))
    ds = fo.Dataset(f"sdcorr-mask-objects-{uuid.uuid4().hex[:8]}")
    samples = []
    for name, placed in (("ref", [(70, 80, 1.0)]), ("target", [(10, 10, 0.5), (120, 60, 1.0), (300, 100, 1.0)])):
        img = Image.new("RGB", (W, H), (128, 128, 128))
        dets, gts = [], []
        for x, y, s in placed:
            img.paste(obj.resize((int(OBJ_W * s), int(OBJ_H * s)), Image.BILINEAR) if s != 1 else obj, (x, y))
            inst = fo.Instance()
            dets.append(fo.Detection(label="person", bounding_box=_box(x, y, s), instance=inst,
                                     mask=_ellipse() if name == "ref" else None))
            gts.append(fo.Detection(label="person", bounding_box=_box(x, y, s), instance=inst,
                                    mask=_ellipse(int(OBJ_W * s), int(OBJ_H * s))))
        path = str(tmp_path / f"{name}.png")
        img.save(path)
        samples.append(fo.Sample(filepath=path, name=name, tags=[name], detections=fo.Detections(detections=dets),
                                 gt_objects=fo.Detections(detections=gts)))
    ds.add_samples(samples)
    yield ds, tmp_path
    ds.delete()


def test_objects_get_the_reference_instance_mask_in_box_coordinates(objects):
    ds, tmp = objects
    target = ds.match_tags("target")
    got = sc.propagate_masks(target, "ref", "detections", "pred", patches_field="detections", resolution=RES,
                             extractor=desc(), confidence_field="pred_conf", progress=False)
    assert got["targets"] == got["propagated"] == 3 and not got["failed"], got.text()
    assert got["reference_objects"] == 1
    s = target.first()
    assert ds.get_field("pred").document_type is fo.Detections
    by_target = {d.sdcorr_detection_id: d for d in s.pred.detections}
    for det in s.detections.detections:  # every target detection: a copy of its box, label and instance
        p = by_target[det.id]
        assert p.id != det.id and p.label == det.label and p.bounding_box == det.bounding_box
        assert p.instance.id == det.instance.id and p.mask.dtype == bool  # the reference's mask was bool
        full = det.bounding_box[2] > 0.1
        want = _ellipse() if full else _ellipse(OBJ_W // 2, OBJ_H // 2)
        assert p.mask.shape == want.shape  # box coordinates, the box's pixels
        iou = (p.mask & want).sum() / (p.mask | want).sum()
        assert iou >= (0.95 if full else 0.85), (full, iou)
    assert s.detections.detections[0].mask is None  # the target detections are never written
    heat = s.pred_conf
    assert heat.map.shape == (H, W) and heat.map[:5, :].max() == 0  # zero outside every box

    # evaluation per object, paired by instance (gt_objects has detections of its own ids)
    res = sc.evaluate_masks(target, "pred", "gt_objects", eval_key="objects", progress=False)
    assert res.kind == "objects" and res.summary["paired"] == 3
    inter = union = 0
    ious = []
    for p in s.pred.detections:
        g = next(g for g in s.gt_objects.detections if g.instance.id == p.instance.id)
        ious.append((p.mask & g.mask).sum() / (p.mask | g.mask).sum())
        inter, union = inter + (p.mask & g.mask).sum(), union + (p.mask | g.mask).sum()
    assert res.per_class["person"] == pytest.approx(inter / union)
    assert res.mean_object_iou == pytest.approx(np.mean(ious)) and res.mean_iou == res.per_class["person"]
    ds.reload()
    assert "objects" in ds.list_evaluations()
    assert sorted(target.values("pred.detections.objects_iou", unwind=True)) == pytest.approx(sorted(ious))
    assert ds.load_evaluation_results("objects").per_class == res.per_class
    ds.delete_evaluation("objects")
    assert not ds.has_sample_field("pred.detections.objects_iou")


def test_objects_own_masks_are_the_region_and_patches_views_work(objects):
    ds, _ = objects
    target = ds.match_tags("target").first()
    own = np.zeros((OBJ_H, OBJ_W), bool)
    own[:, : OBJ_W // 2] = True  # the left half of each full-size target object only
    for det in target.detections.detections[1:]:
        det.mask = own
    target.save()
    patches = ds.match_tags("target").to_patches("detections")
    got = sc.propagate_masks(patches, "ref", "detections", "pred", resolution=RES, extractor=desc(), progress=False)
    assert got["propagated"] == 3, got.text()
    target.reload()
    for p in target.pred.detections[1:]:
        assert not p.mask[:, OBJ_W // 2 + 1:].any()  # nothing outside the target's own mask
        assert p.mask[:, : OBJ_W // 2].sum() > 0.8 * _ellipse()[:, : OBJ_W // 2].sum()
    boxes = sc.propagate_masks(patches, "ref", "detections", "pred_box", target_region="box", resolution=RES,
                               extractor=desc(), progress=False)
    assert boxes["propagated"] == 3
    target.reload()
    assert target.pred_box.detections[1].mask[:, OBJ_W // 2 + 4:].any()  # the whole box is the region


# --------------------------------------------------------------------------- operators
def test_operators_propagate_and_evaluate_on_stored_features(world):
    ds, tmp = world
    sc.compute_fused_features(ds, extractor=desc(), store_dir=str(tmp / "store"), progress=False)
    view = ds.match(fo.ViewField("name").is_in(["same", "shift"]))
    params = dict(source_field="gt", output_field="op_masks", references="tag", reference_tag="ref",
                  resolution=RES)
    res = foo.execute_operator(PREFIX + "propagate_masks", ctx={"dataset": ds, "view": view, "params": params})
    res.raise_exceptions()
    ds.reload()
    assert ds.count("op_masks") == 2 and ds.count("op_masks_error") == 0
    same = _pred(ds, "same", "op_masks").mask
    assert _iou(same, _labels(), 1) >= 0.98 and _iou(same, _labels(), 2) >= 0.98
    # an existing output field is refused (no overwrite)
    with pytest.raises(Exception, match="already exists"):
        foo.execute_operator(PREFIX + "propagate_masks", ctx={"dataset": ds, "view": view,
                                                             "params": params}).raise_exceptions()
    # through the programmatic __call__, references by id
    op = foo.get_operator(PREFIX + "propagate_masks")
    op(view, "gt", "op_masks2", references=[ds.match_tags("ref").first().id], resolution=RES).raise_exceptions()
    ds.reload()
    assert ds.count("op_masks2") == 2
    ev = foo.execute_operator(PREFIX + "evaluate_masks", ctx={"dataset": ds, "view": view, "params": dict(
        pred_field="op_masks", gt_field="truth", eval_key="op_eval")})
    ev.raise_exceptions()
    ds.reload()
    assert "op_eval" in ds.list_evaluations()
    again = sc.evaluate_masks(view, "op_masks", "truth", eval_key=None, progress=False)
    cm = ds.load_evaluation_results("op_eval").pixel_confusion_matrix  # FiftyOne's own run, as the App shows it
    assert np.array_equal(cm, again.segmentation_results.pixel_confusion_matrix)
    assert again.per_class["body"] > 0.9


# --------------------------------------------------------------------------- conventions and forms
@pytest.mark.parametrize("name", ["propagate_masks", "evaluate_masks"])
def test_every_keyword_defaults_to_none(name):
    import inspect

    from fiftyone_sdcorr.dataset.config import MaskEvaluationConfig

    for p in inspect.signature(getattr(sc, name)).parameters.values():
        if p.default is not inspect.Parameter.empty:
            want = MaskEvaluationConfig.eval_key if (name, p.name) == ("evaluate_masks", "eval_key") else None
            assert p.default == want, f"{name}({p.name}={p.default!r})"


def test_forms_read_the_config_and_refuse_what_the_run_refuses(world):
    import asyncio

    from fiftyone.operators.executor import resolve_type
    from fiftyone.operators.registry import OperatorRegistry

    from fiftyone_sdcorr.dataset.config import RANGES, MaskPropagationConfig

    ds, _ = world

    def form(name, params):
        prop = asyncio.run(resolve_type(OperatorRegistry(), PREFIX + name, {"dataset_name": ds.name,
                                                                             "params": params}))
        return prop.type.properties

    props = form("propagate_masks", {})
    assert props["resolution"].default == MaskPropagationConfig.resolution
    assert (props["resolution"].type.min, props["resolution"].type.max) == RANGES["mask_resolution"]
    assert props["min_confidence"].default == MaskPropagationConfig.min_confidence
    assert props["output_field"].default == "sdcorr_masks"
    assert not [k for k, p in props.items() if p.invalid]
    bad = form("propagate_masks", {"source_field": "gt", "output_field": "truth", "references": "tag",
                                   "reference_tag": "ref"})
    assert bad["output_field"].invalid and "already exists" in bad["output_field"].error_message
    ev = form("evaluate_masks", {"pred_field": "gt", "gt_field": "name"})
    assert [k for k, p in ev.items() if p.invalid] == ["pred_field"]


def test_coco_instance_masks_as_fiftyone_imports_them(tmp_path):
    """COCO segmentation polygons through FiftyOne's own importer (pycocotools decodes them
    into detection masks): the reference canvas's instance masks go to every object of the
    other canvases; the pasted copies are identical crops, so their IoU is known (1)."""
    import json

    from test_objects import desc, write_coco

    write_coco(tmp_path)
    labels = json.loads((tmp_path / "labels.json").read_text())
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    for a in labels["annotations"]:
        x, y, w, h = a["bbox"]
        a["segmentation"] = [np.stack([x + w / 2 + 0.45 * w * np.cos(t), y + h / 2 + 0.45 * h * np.sin(t)], 1)
                             .ravel().round(1).tolist()]
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    ds = fo.Dataset.from_dir(data_path=str(tmp_path / "data"), labels_path=str(tmp_path / "labels.json"),
                             dataset_type=fo.types.COCODetectionDataset, label_types=["segmentations"],
                             label_field="gt", name=f"sdcorr-coco-masks-{uuid.uuid4().hex[:8]}")
    try:
        assert all(d.mask is not None for d in ds.values("gt.detections", unwind=True))
        ds.match(fo.ViewField("filepath").ends_with("canvas0.png")).tag_samples("reference")
        sc.compute_fused_features(ds, extractor=desc(), patches_field="gt", store_dir=str(tmp_path / "store"),
                                  progress=False)
        got = sc.propagate_masks(ds, "reference", "gt", "pred_inst", patches_field="gt", target_region="box",
                                 resolution=64, progress=False)
        # the reference canvas's 2 objects are references, not targets (issue 24)
        assert got["targets"] == got["propagated"] == 7 and got["references_skipped"] == 2, got.text()
        assert not got["failed"], got.text()
        targets = ds.match_tags("reference", bool=False)
        res = sc.evaluate_masks(targets, "pred_inst", "gt", eval_key="coco_masks", progress=False)
        assert res.counts["person"] == {"gt": 7, "pred": 7}  # every object of the two other canvases paired
        assert res.per_class["person"] > 0.95, res.report_str()
        assert "coco_masks" in ds.list_evaluations()
    finally:
        ds.delete()
