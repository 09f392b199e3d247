"""Issue 24, the dataset layer: evaluate_masks pairs objects by geometry (a known IoU by
construction), nothing paired is a warning; output folders are checked before anything is
written; a mask file that cannot be written is an error of its label, never a label
pointing at a missing file; overwrite removes the files of the labels it replaces.

Real datasets, real files, the deterministic local descriptor (no model weights). The
tests run as root here, where a read-only folder is still writable: an unwritable folder
is made with ``chattr +i`` (immutable, refused even to root), skipped where chattr is
missing or the file system does not support it."""

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fiftyone as fo
import fiftyone.operators as foo

import fiftyone_sdcorr as sc
from fiftyone_sdcorr.core.common.params import ParameterError
from fiftyone_sdcorr.dataset.evaluate_masks import MIN_PAIR_IOU
from fiftyone_sdcorr.plugin.operators_masks import evaluate_report
from local_descriptor import LocalDescriptor, textured_noise

PREFIX = "@sdcorr/sdcorr/"
BIG = 600  # pixels per side: 360,000 > 512 x 512, so every mask of these images goes to a file


def desc():
    return LocalDescriptor(size=224, stride=14)


def _immutable(path: Path, on: bool) -> bool:
    """``chattr +i`` / ``-i`` on ``path``; False where that is not possible here."""
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def frozen():
    """Makes folders immutable (``frozen(path)``) and always thaws them afterwards."""
    done = []

    def freeze(path):
        if not _immutable(path, True):
            pytest.skip("chattr +i is not available here (needed for a folder even root cannot write)")
        done.append(path)

    yield freeze
    for path in done:
        _immutable(path, False)


# --------------------------------------------------------------------------- evaluate_masks by geometry
def _square(box, keep_cols=None, size=100):
    """A detection whose mask fills its box (``keep_cols``: only the left columns)."""
    w, h = int(round(box[2] * size)), int(round(box[3] * size))
    mask = np.ones((h, w), bool)
    if keep_cols is not None:
        mask[:, keep_cols:] = False
    return mask


@pytest.fixture
def pairs_world(tmp_path):
    """A 100 x 100 image, the prediction and the ground truth in two separate
    fo.Detections fields with no id or instance link between them."""
    path = str(tmp_path / "img.png")
    Image.fromarray(np.full((100, 100, 3), 90, np.uint8)).save(path)
    ds = fo.Dataset(f"sdcorr-mask-pairs-{uuid.uuid4().hex[:8]}")
    ds.add_sample(fo.Sample(filepath=path))
    yield ds
    ds.delete()


def _put(ds, field, dets):
    s = ds.first()
    s[field] = fo.Detections(detections=[fo.Detection(label=lab, bounding_box=box, mask=mask)
                                         for lab, box, mask in dets])
    s.save()


def test_evaluate_masks_pairs_a_separate_ground_truth_by_geometry_with_the_known_iou(pairs_world):
    ds = pairs_world
    cat_gt, cat_pred = [0.2, 0.2, 0.4, 0.4], [0.3, 0.2, 0.4, 0.4]  # the same 40 x 40 square, shifted by 10 px
    dog = [0.6, 0.6, 0.2, 0.2]  # a 20 x 20 box: prediction fills it, ground truth only its left 10 columns
    _put(ds, "gt", [("cat", cat_gt, _square(cat_gt)), ("dog", dog, _square(dog, keep_cols=10)),
                    ("cat", [0.0, 0.85, 0.1, 0.1], _square([0.0, 0.85, 0.1, 0.1]))])  # far away: unpaired
    _put(ds, "pred", [("cat", cat_pred, _square(cat_pred)), ("dog", dog, _square(dog))])
    # by hand: cat: intersection 30 x 40 = 1200, union 1600 + 1600 - 1200 = 2000; dog: 200 / 400
    want = {"cat": 1200 / 2000, "dog": 200 / 400}
    res = sc.evaluate_masks(ds, "pred", "gt", eval_key="geo", progress=False)
    assert res.per_class["cat"] == pytest.approx(want["cat"]) and res.per_class["dog"] == pytest.approx(want["dog"])
    assert res.mean_object_iou == pytest.approx(0.55) and res.mean_iou == pytest.approx(0.55)
    s = res.summary
    assert (s["objects"], s["paired"], s["paired_by"]["geometry"]) == (2, 2, 2), s.text()
    assert s["unpaired"]["ground_truth"] == 1 and not s["warnings"], s.text()
    assert "evaluation 'geo'" in s.headline()  # the summary names what it wrote
    ds.reload()
    assert sorted(ds.values("pred.detections.geo_iou", unwind=True)) == pytest.approx([0.5, 0.6])
    # a prediction of another label over the cat is not paired with it
    _put(ds, "pred2", [("dog", cat_pred, _square(cat_pred))])
    other = sc.evaluate_masks(ds, "pred2", "gt", eval_key=None, progress=False)
    assert other.summary["paired"] == 0 and other.per_class["cat"] is None


def test_nothing_paired_is_a_warning_in_the_summary_and_the_notification(pairs_world):
    ds = pairs_world
    _put(ds, "gt", [("cat", [0.7, 0.7, 0.2, 0.2], _square([0.7, 0.7, 0.2, 0.2]))])
    _put(ds, "pred", [("cat", [0.0, 0.0, 0.2, 0.2], _square([0.0, 0.0, 0.2, 0.2]))])  # IoU 0 < MIN_PAIR_IOU
    res = sc.evaluate_masks(ds, "pred", "gt", eval_key=None, progress=False)
    assert res.summary["paired"] == 0 and res.mean_iou is None
    assert any("nothing paired" in w and str(MIN_PAIR_IOU) in w for w in res.summary["warnings"])
    # the operator runs; what it shows carries the warning (the App's notification is then a
    # warning, not a success: plugin.common.show_summary)
    foo.execute_operator(PREFIX + "evaluate_masks", ctx={"dataset": ds, "view": ds.view(), "params": dict(
        pred_field="pred", gt_field="gt", eval_key="op_geo")}).raise_exceptions()
    ds.reload()
    assert "op_geo" in ds.list_evaluations()
    shown = evaluate_report(ds, "pred", "gt", eval_key=None)  # the operator's result
    assert any("nothing paired" in w for w in shown["warnings"]) and "warning: nothing paired" in shown["summary"]


# --------------------------------------------------------------------------- output folders and mask files
@pytest.fixture
def big(tmp_path):
    """A 600 x 600 reference with a class mask and two targets (the same image): every
    mask and confidence map is too large for the database and goes to a PNG file."""
    img = textured_noise(BIG, BIG, seed=5)
    lab = np.zeros((BIG, BIG), np.uint8)
    lab[150:450, 180:420] = 1
    ds = fo.Dataset(f"sdcorr-mask-files-{uuid.uuid4().hex[:8]}")
    samples = []
    for name in ("ref", "t1", "t2"):
        path = str(tmp_path / f"{name}.png")
        Image.fromarray(img).save(path)
        s = fo.Sample(filepath=path, name=name, tags=["ref"] if name == "ref" else [])
        if name == "ref":
            s["gt"] = fo.Segmentation(mask=lab)
        samples.append(s)
    ds.add_samples(samples)
    yield ds, tmp_path
    ds.delete()


def _propagate(ds, out, **kw):
    kw.setdefault("extractor", desc())
    return sc.propagate_masks(ds, "ref", "gt", out, resolution=32, progress=kw.pop("progress", False), **kw)


def test_references_are_not_targets_and_the_summary_counts_files(big):
    ds, tmp = big
    got = _propagate(ds, "pred", confidence_field="conf", mask_dir=str(tmp / "m"))
    assert (got["targets"], got["propagated"], got["references_skipped"], got["failed"]) == (2, 2, 1, 0), got.text()
    assert (got["masks_in_files"], got["masks_in_database"], got["masks_not_written"]) == (4, 0, 0)
    assert ds.match_tags("ref").first()["pred"] is None  # the reference is not predicted onto itself
    for word in ("masks_in_files 4", "masks_in_database 0", "field 'pred'", "field 'conf'"):
        assert word in got.headline(), got.headline()
    heat = ds.match(fo.ViewField("name") == "t1").first().conf
    assert heat.map is None and os.path.isfile(heat.map_path) and list(heat.range) == [0, 255]


def test_output_folders_under_a_file_or_unwritable_are_refused_before_anything_is_written(big, frozen):
    ds, tmp = big
    (tmp / "a-file").write_text("not a folder")
    schema = ds.get_field_schema()
    with pytest.raises(ParameterError, match="'mask_dir'.*a-file.*file"):
        _propagate(ds, "pred", mask_dir=str(tmp / "a-file" / "masks"))
    locked = tmp / "locked"
    locked.mkdir()
    frozen(locked)
    with pytest.raises(ParameterError, match="'mask_dir'.*cannot write"):
        _propagate(ds, "pred", mask_dir=str(locked))
    with pytest.raises(ParameterError, match="'mask_dir'"):  # a folder to be made inside it
        _propagate(ds, "pred", mask_dir=str(locked / "new"))
    assert ds.get_field_schema() == schema  # no field created, so a rerun with a good folder is not refused
    got = _propagate(ds, "pred", mask_dir=str(tmp / "good"))
    assert got["propagated"] == 2 and not got["failed"], got.text()
    # write_dense_views' output_dir: the same checks, before any field is created
    sc.compute_fused_features(ds, extractor=desc(), store_dir=str(tmp / "store"), progress=False)
    ref = ds.match_tags("ref").first().id
    schema = ds.get_field_schema()
    with pytest.raises(ParameterError, match="'output_dir'.*a-file.*file"):
        sc.write_dense_views(ds, ref, "dense", output_dir=str(tmp / "a-file" / "views"), resolution=16, progress=False)
    with pytest.raises(ParameterError, match="'output_dir'.*cannot write"):
        sc.write_dense_views(ds, ref, "dense", output_dir=str(locked), resolution=16, progress=False)
    assert ds.get_field_schema() == schema
    # through the operator: an error naming the input (its path and its form label), not a raw NotADirectoryError
    with pytest.raises(Exception, match=r"Path: mask_dir\. Reason: \*Mask folder.*a-file"):
        foo.execute_operator(PREFIX + "propagate_masks", ctx={"dataset": ds, "view": ds.view(), "params": dict(
            source_field="gt", output_field="op_pred", references="tag", reference_tag="ref", resolution=32,
            mask_dir=str(tmp / "a-file" / "m"))}).raise_exceptions()


def test_a_mask_that_cannot_be_written_is_an_error_of_its_label_never_a_dangling_path(big, frozen):
    ds, tmp = big
    folder = tmp / "masks"
    folder.mkdir()  # writable at the checks; made immutable once the run starts (a disk gone read-only)

    def progress(fraction, label):
        if fraction == 0:
            frozen(folder)

    got = _propagate(ds, "pred", confidence_field="conf", mask_dir=str(folder), progress=progress)
    assert got["failed"] == 2 and got["propagated"] == 0 and got["masks_not_written"] == 2, got.text()
    assert got["masks_in_files"] == 0
    for s in ds.match_tags("ref", bool=False):
        assert s["pred"] is None and s["conf"] is None  # no label pointing at a file never written
        assert "was not written" in s["pred_error"], s["pred_error"]
    assert list(folder.iterdir()) == []  # no half-written or temporary file either


def test_overwrite_removes_the_files_of_the_labels_it_replaces(big):
    ds, tmp = big
    folder = tmp / "masks"
    _propagate(ds, "pred", confidence_field="conf", mask_dir=str(folder))
    old = sorted(p.name for p in folder.iterdir())
    assert len(old) == 4  # 2 masks + 2 confidence maps, named by label id
    mine = folder / "not-ours.png"
    mine.write_bytes(b"a user's file")
    got = _propagate(ds, "pred", confidence_field="conf", mask_dir=str(folder), overwrite=True)
    assert got["files_removed"] == 4 and got["masks_in_files"] == 4, got.text()
    now = {p.name for p in folder.iterdir()}
    assert not now & set(old) and mine.name in now and len(now) == 5
    for s in ds.match_tags("ref", bool=False):
        assert Path(s.pred.mask_path).name == f"{s.pred.id}.png" and os.path.isfile(s.pred.mask_path)
