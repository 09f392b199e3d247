"""TSS (issue 17, items 5 and 6): the reader, flow files, the ``pck_tss.py`` protocol and
``evaluate-pairs --format tss``, on TSS-format folders written here with known answers.

Layout written (as sd-dino's ``data/prepare_tss.sh`` leaves ``TSS_CVPR2016``)::

    TSS_CVPR2016/{FG3DCar,JODS,PASCAL}/{pair folder}/image1.png image2.png flow1.flo flow2.flo mask1.png mask2.png

``flowN.flo`` lies on ``imageN`` and points into the other image; ``maskN.png`` marks the
pixels of ``imageN`` that count. Ground-truth flows hold whole or half pixels, so
predictions off by a chosen amount have exactly that error (the ``<=`` boundary case).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fiftyone_sdcorr.__main__ import main
from fiftyone_sdcorr.core.benchmarks.errors import BenchmarkFormatError
from fiftyone_sdcorr.core.benchmarks.formats import read_tss, tss_category
from fiftyone_sdcorr.core.benchmarks.flow_io import read_flo, read_flow, write_flo
from fiftyone_sdcorr.core.benchmarks.pck import score_flow
from fiftyone_sdcorr.pair_eval import evaluate_pairs
from local_descriptor import LocalDescriptor, textured_noise

# image sizes (W, H): a source's longer side is L; image1 -> L = 200, image2 -> L = 160
SIZES = {1: (200, 120), 2: (160, 100)}
FOLDERS = {"FG3DCar": ["001_005"], "JODS": ["car_01"], "PASCAL": ["bike_01", "plane_02"]}


def _mask(size, box) -> np.ndarray:
    w, h = size
    m = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    return m


def _gt_flow(size, n: int) -> np.ndarray:
    """A ground truth of whole and half pixels (exact in float32)."""
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([np.round(xs * 0.1) * 0.5 - 3 * n, np.round(ys * 0.1) * 0.5 + n], -1).astype(np.float32)


def write_pair_folder(folder: Path, images=None, flows=None, masks=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in (1, 2):
        w, h = SIZES[n] if images is None else images[n].shape[1::-1]
        img = images[n] if images is not None else np.full((h, w, 3), 40 * n, np.uint8)
        Image.fromarray(img).save(folder / f"image{n}.png")
        write_flo(folder / f"flow{n}.flo", flows[n] if flows else _gt_flow((w, h), n))
        m = masks[n] if masks else _mask((w, h), (10 * n, 5, w - 10, h - 5 * n))
        Image.fromarray(m).save(folder / f"mask{n}.png")


def write_tss(base: Path) -> Path:
    root = base / "TSS_CVPR2016"
    for subset, names in FOLDERS.items():
        for name in names:
            write_pair_folder(root / subset / name)
    return root


def write_predictions(root: Path, out: Path, change=None, suffix=".flo") -> Path:
    """A predictions folder holding the ground truth (``change(pair, flow, mask)`` may alter it)."""
    for p in read_tss(root):
        flow = p.load_flow().copy()
        if change is not None:
            flow = change(p, flow, p.load_mask())
        dest = out / f"{p.pair}{suffix}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_flo(dest, flow) if suffix == ".flo" else np.save(dest, flow)
    return out


@pytest.fixture()
def root(tmp_path):
    return write_tss(tmp_path)


# --------------------------------------------------------------------------- files and the reader
def test_flo_round_trip_and_npy(tmp_path):
    flow = np.random.default_rng(0).normal(size=(7, 5, 2)).astype(np.float32)
    write_flo(tmp_path / "a.flo", flow)
    raw = (tmp_path / "a.flo").read_bytes()
    assert np.frombuffer(raw[:4], "<f4")[0] == 202021.25 and list(np.frombuffer(raw[4:12], "<i4")) == [5, 7]
    assert len(raw) == 12 + 7 * 5 * 8
    np.testing.assert_array_equal(read_flo(tmp_path / "a.flo"), flow)
    np.save(tmp_path / "b.npy", flow.astype(np.float64))
    np.testing.assert_array_equal(read_flow(tmp_path / "b.npy"), flow)


def test_the_reader_follows_utils_tss(root):
    pairs = read_tss(root)
    assert [p.pair for p in pairs] == [
        "FG3DCar/001_005/flow2", "FG3DCar/001_005/flow1", "JODS/car_01/flow2", "JODS/car_01/flow1",
        "PASCAL/bike_01/flow2", "PASCAL/bike_01/flow1", "PASCAL/plane_02/flow2", "PASCAL/plane_02/flow1"]
    first, second = pairs[:2]
    # image1 -> image2 with flow2 and mask2 (on the target image2); L = the source's longer side
    assert first.src.endswith("image1.png") and first.trg.endswith("image2.png") and first.flow.endswith("flow2.flo")
    assert first.mask.endswith("mask2.png") and first.threshold == 200.0 and first.trg_size == (160, 100)
    assert second.src.endswith("image2.png") and second.flow.endswith("flow1.flo") and second.threshold == 160.0
    assert [p.category for p in pairs[::2]] == ["car", "car", "bicycle", "aeroplane"]
    assert first.load_mask().sum() == (160 - 10 - 20) * (100 - 10 - 5)  # mask2: x 20..150, y 5..90
    assert [p.pair for p in read_tss(root, ["PASCAL"], sample=3)] == [p.pair for p in pairs[4:7]]
    assert tss_category("JODS", "Busd_3") == "bus" and tss_category("PASCAL", "suv") == "car"


# --------------------------------------------------------------------------- the protocol
def test_score_flow_counts_the_boundary_as_correct():
    gt = np.zeros((1, 4, 2), np.float32)
    pred = gt.copy()
    pred[0, :, 0] = [10.0, 10.0 + 1e-4, 6.0, np.nan]  # L = 200: 0.05 L = 10
    s = score_flow(pred, gt, np.ones((1, 4), bool), 200.0, (0.01, 0.05, 0.10))
    assert s.counted == 4 and s.correct == (0, 2, 3) and s.missing == 1


def test_ground_truth_as_predictions_scores_100(root, tmp_path):
    res = evaluate_pairs("tss", root, predictions=write_predictions(root, tmp_path / "pred"), progress=False)
    assert set(res["subsets"]) == {"FG3DCar", "JODS", "PASCAL"} and res["counts"]["pairs"] == 8
    for b in res["subsets"].values():
        assert all(v == 100.0 for v in b["per_image"].values()) and b["aepe"] == 0.0
        assert "paper_pck_0.05" in b
    assert res["mean_of_subsets"]["0.05"] == 100.0 and res["benchmark"]["correct_when"] == "error <= alpha x L"


def _off_by(amount, every):
    """Moves every ``every``-th mask pixel (row-major) by ``amount`` pixels in x."""
    def change(p, flow, mask):
        ys, xs = np.nonzero(mask)
        flow[ys[::every], xs[::every], 0] += amount
        return flow
    return change


def test_a_known_fraction_off_by_exactly_the_threshold_is_correct(root, tmp_path):
    # flow2 pairs: L = 200 -> 0.05 L = 10 px exactly: still correct (<=)
    res = evaluate_pairs("tss", root, predictions=write_predictions(root, tmp_path / "p", _off_by(10.0, 4)),
                         categories=["FG3DCar"], progress=False)
    fg = res["subsets"]["FG3DCar"]
    frac = {}
    for p in read_tss(root, ["FG3DCar"]):
        n = int(p.load_mask().sum())
        frac[p.pair] = 1 - len(range(0, n, 4)) / n
    # flow1 pairs have L = 160 (0.05 L = 8 px): the moved quarter is wrong there
    want = 100 * (1.0 + frac["FG3DCar/001_005/flow1"]) / 2
    assert fg["per_image"]["0.05"] == pytest.approx(want)
    # at 0.01 both pairs lose the quarter; at 0.10 nothing is lost
    assert fg["per_image"]["0.01"] == pytest.approx(100 * np.mean(list(frac.values())))
    assert fg["per_image"]["0.10"] == 100.0
    assert fg["aepe"] == pytest.approx(np.mean([10.0 * (1 - f) for f in frac.values()]))


def test_per_image_is_the_mean_of_pairs_not_pixels_pooled(root, tmp_path):
    def change(p, flow, mask):  # all of one pair wrong, the other right
        return flow + 50.0 if p.pair.endswith("flow2") else flow
    res = evaluate_pairs("tss", root, predictions=write_predictions(root, tmp_path / "p", change, ".npy"),
                         progress=False)
    for name, b in res["subsets"].items():
        assert b["per_image"]["0.15"] == pytest.approx(50.0)
        pairs = read_tss(root, [name])
        n1 = sum(int(p.load_mask().sum()) for p in pairs if p.pair.endswith("flow1"))
        assert b["per_pixel"]["0.15"] == pytest.approx(100 * n1 / sum(int(p.load_mask().sum()) for p in pairs))


def test_padded_predictions_are_cropped(root, tmp_path):
    def pad(p, flow, mask):
        h = max(p.src_size[1], p.trg_size[1])
        w = max(p.src_size[0], p.trg_size[0])
        out = np.full((h, w, 2), 1e9, np.float32)
        out[: flow.shape[0], : flow.shape[1]] = flow
        return out
    res = evaluate_pairs("tss", root, predictions=write_predictions(root, tmp_path / "p", pad, ".npy"), progress=False)
    assert res["mean_of_subsets"]["0.01"] == 100.0


# --------------------------------------------------------------------------- the model path
def _shifted_pair(base: Path, shift: int = 28) -> Path:
    """image2 = image1 moved right by ``shift``: flow2 = (-shift, 0), flow1 = (+shift, 0)."""
    img1 = textured_noise(200, 200, seed=1)
    img2 = np.full_like(img1, 128)
    img2[:, shift:] = img1[:, :-shift]
    flows = {1: np.zeros((200, 200, 2), np.float32), 2: np.zeros((200, 200, 2), np.float32)}
    flows[1][..., 0], flows[2][..., 0] = shift, -shift
    masks = {1: _mask((200, 200), (20, 20, 180 - shift, 180)), 2: _mask((200, 200), (20 + shift, 20, 180, 180))}
    root = base / "TSS_CVPR2016"
    write_pair_folder(root / "JODS" / "car_shift", {1: img1, 2: img2}, flows, masks)
    return root


@pytest.mark.parametrize("masks", ["none", "dataset"])
def test_features_find_a_known_shift(tmp_path, masks):
    root = _shifted_pair(tmp_path)
    res = evaluate_pairs("tss", root, categories=["JODS"], extractor=LocalDescriptor(size=224, stride=14),
                         dense_resolution=64, tss_masks=masks, progress=False)
    b = res["subsets"]["JODS"]
    assert b["pairs"] == 2 and b["per_image"]["0.05"] > 95.0 and b["aepe"] < 3.0
    assert res["method"]["source"] == "model" and res["method"]["masks"] == masks


# --------------------------------------------------------------------------- the command
def test_cli_prints_the_table_and_writes_json(root, tmp_path, capsys):
    preds = write_predictions(root, tmp_path / "pred")
    out = tmp_path / "res" / "tss.json"
    rc = main(["evaluate-pairs", "--format", "tss", "--root", str(root), "--predictions", str(preds),
               "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0 and "| FG3DCar |" in printed and "paper PCK@0.05" in printed and "mean of subsets" in printed
    res = json.loads(out.read_text())
    assert res["subsets"]["PASCAL"]["pairs"] == 4 and out.with_suffix(".md").exists()


def _damage_gt_magic(root, tmp):
    f = root / "JODS" / "car_01" / "flow2.flo"
    f.write_bytes(b"\x00\x00\x00\x00" + f.read_bytes()[4:])
    return f, None


def _truncate_gt(root, tmp):
    f = root / "PASCAL" / "bike_01" / "flow1.flo"
    f.write_bytes(f.read_bytes()[:-8])
    return f, None


def _missing_mask(root, tmp):
    f = root / "FG3DCar" / "001_005" / "mask1.png"
    f.unlink()
    return f, None


def _mask_size(root, tmp):
    f = root / "PASCAL" / "plane_02" / "mask2.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(f)
    return f, None


def _flow_size(root, tmp):
    f = root / "JODS" / "car_01" / "flow1.flo"
    write_flo(f, np.zeros((3, 4, 2), np.float32))
    return f, None


def _no_subset(root, tmp):
    import shutil
    shutil.rmtree(root / "JODS")
    return root / "JODS", None


def _pickled_prediction(root, tmp):
    preds = write_predictions(root, tmp / "pred")
    f = preds / "PASCAL" / "bike_01" / "flow2.flo"
    f.unlink()
    npy = f.with_suffix(".npy")
    np.save(npy, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    return npy, preds


def _wrong_shape_prediction(root, tmp):
    preds = write_predictions(root, tmp / "pred")
    f = preds / "FG3DCar" / "001_005" / "flow1.flo"
    write_flo(f, np.zeros((5, 5, 2), np.float32))
    return "FG3DCar/001_005/flow1", preds


def _missing_prediction(root, tmp):
    preds = write_predictions(root, tmp / "pred")
    (preds / "JODS" / "car_01" / "flow2.flo").unlink()
    return "JODS/car_01/flow2", preds


def _two_predictions(root, tmp):
    preds = write_predictions(root, tmp / "pred")
    np.save(preds / "JODS" / "car_01" / "flow2.npy", np.zeros((100, 160, 2), np.float32))
    return "flow2.npy", preds


def _not_a_flo_prediction(root, tmp):
    preds = write_predictions(root, tmp / "pred")
    f = preds / "PASCAL" / "plane_02" / "flow1.flo"
    f.write_bytes(pickle.dumps({"flow": 1}))
    return f, preds


BAD = {
    "gt magic": (_damage_gt_magic, r"magic number"),
    "gt truncated": (_truncate_gt, r"must be \d+ bytes"),
    "missing mask": (_missing_mask, r"lacks \[.mask1.png.\]"),
    "mask size": (_mask_size, r"mask is 10 x 10"),
    "flow size": (_flow_size, r"flow is 4 x 3"),
    "missing subset": (_no_subset, r"missing subset folder \S*JODS"),
    "pickled npy": (_pickled_prediction, r"pickled arrays are refused"),
    "prediction shape": (_wrong_shape_prediction, r"flow of shape \(5, 5, 2\)"),
    "missing prediction": (_missing_prediction, r"no flow for 1 of 8 pairs"),
    "two predictions": (_two_predictions, r"has both"),
    "not a flo": (_not_a_flo_prediction, r"magic number"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_tss_files_exit_2_naming_the_file(root, tmp_path, capsys, case):
    make, pattern = BAD[case]
    named, preds = make(root, tmp_path)
    out = tmp_path / "out.json"
    argv = ["evaluate-pairs", "--format", "tss", "--root", str(root), "--out", str(out), "--no-progress"]
    if preds is None:  # a bad benchmark file: the ground truth as predictions, so no model is needed
        preds = tmp_path / "unused"
        preds.mkdir()
    rc = main(argv + ["--predictions", str(preds)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("evaluate-pairs: error: ") and str(named).replace(str(root), "") in err, err
    import re
    assert re.search(pattern, err), err
    assert not out.exists()


def test_keypoint_only_options_are_refused_for_tss(root, tmp_path):
    with pytest.raises(ValueError, match=r"not available with format 'tss'.*"):
        evaluate_pairs("tss", root, predictions=tmp_path, soft_argmax=True, progress=False)
    with pytest.raises(ValueError, match=r"unknown TSS subset"):
        evaluate_pairs("tss", root, predictions=tmp_path, categories=["cat"], progress=False)


def test_bad_files_are_benchmark_format_errors(root):
    (root / "PASCAL" / "bike_01" / "image1.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="image1.png"):
        read_tss(root)
    with pytest.raises(BenchmarkFormatError, match="not a folder"):
        read_tss(root / "nope")


def test_the_command_runs_the_tiny_models(root, tmp_path, capsys):
    """The FeatureExtractor path (co-PCA per pair, fused, sd, dino) end to end with tiny
    random models: every pair scored, numbers in range (not meaningful)."""
    from fiftyone_sdcorr.core.features.tiny import tiny_models

    sd, dino = tiny_models(tmp_path / "tiny")[:2]
    out = tmp_path / "tss.json"
    for features in ("fused", "dino"):
        rc = main(["evaluate-pairs", "--format", "tss", "--root", str(root), "--categories", "PASCAL", "--sample", "2",
                   "--sd-model", sd, "--dino-model", dino, "--device", "cpu", "--sd-size", "128", "--sd-mode", "whole",
                   "--dino-size", "56", "--pca-dim", "8", "--features", features, "--out", str(out), "--no-progress"])
        assert rc == 0, capsys.readouterr().err
        res = json.loads(out.read_text())
        b = res["subsets"]["PASCAL"]
        assert b["pairs"] == 2 and 0.0 <= b["per_image"]["0.05"] <= 100.0 and b["missing_predictions"] == 0
        assert res["method"]["features"] == features and res["method"]["dense_resolution"] is None
    rc = main(["evaluate-pairs", "--format", "tss", "--root", str(root), "--save-predictions", str(tmp_path / "p.jsonl"),
               "--out", str(out)])
    assert rc == 2 and "not available with format 'tss'" in capsys.readouterr().err
