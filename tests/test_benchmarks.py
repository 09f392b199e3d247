"""Issue 11: the paper's PCK protocol on SPair-71k, PF-Pascal and AP-10K.

Fixtures are tiny benchmark folders in each benchmark's own file format
(tests/benchmark_fixtures.py) with answers known by construction: identity pairs,
a mirrored pair, hand-computed PCK under both averagings, a point exactly at the
threshold, points not visible in one image.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fiftyone as fo

import benchmark_fixtures as bf
from fiftyone_sdcorr.core.benchmarks.formats import (
    BenchmarkFormatError,
    flip_pairs,
    keypoint_names,
    read_images,
    read_pairs,
)
from fiftyone_sdcorr.core.benchmarks.pck import (
    PredictionsError,
    aggregate,
    alpha_key,
    markdown_table,
    read_predictions,
    score_pair,
)
from fiftyone_sdcorr.pair_eval import evaluate_pairs



def run_cli(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "fiftyone_sdcorr", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("benchmarks")
    return {"spair": bf.write_spair(base), "pfpascal": bf.write_pfpascal(base), "ap10k": bf.write_ap10k(base),
            "base": base}


def approx(v):
    return pytest.approx(v, abs=1e-9)


# --------------------------------------------------------------------------- the protocol itself
def test_alpha_keys_have_two_decimals():
    assert [alpha_key(a) for a in (0.1, 0.05, 0.01, 0.15)] == ["0.10", "0.05", "0.01", "0.15"]


def test_a_point_exactly_at_the_threshold_is_not_correct():
    # distance 10 (a 6-8-10 triangle), T = 200: 0.05 x 200 = 10 exactly -> wrong; 0.10 -> 20 -> right
    s = score_pair([[106.0, 58.0]], [[100.0, 50.0]], [True], 200.0, (0.05, 0.10))
    assert (s.counted, s.correct) == (1, (0, 1))
    s = score_pair([[106.0, 58.0]], [[100.0, 50.0]], [True], 200.0 + 1e-9, (0.05,))
    assert s.correct == (1,)


def test_points_not_visible_in_both_images_do_not_count():
    gt = [[10.0, 10.0], [np.nan, np.nan], [30.0, 30.0]]
    pred = [[10.0, 10.0], [999.0, 999.0], [900.0, 900.0]]
    s = score_pair(pred, gt, [True, True, False], 100.0, (0.10,))
    assert (s.counted, s.correct) == (1, (1,))


def test_a_counted_point_without_prediction_is_wrong_and_an_empty_pair_is_skipped():
    s = score_pair([[np.nan, np.nan], [5.0, 5.0]], [[1.0, 1.0], [5.0, 5.0]], [True, True], 100.0, (0.10,),
                   pair="p", category="c")
    assert (s.counted, s.correct, s.missing) == (2, (1,), 1)
    empty = score_pair([[1.0, 1.0]], [[1.0, 1.0]], [False], 100.0, (0.10,), pair="q", category="c")
    res = aggregate([s, empty], (0.10,))
    assert res["categories"]["c"]["pairs"] == 1 and res["counts"]["skipped_pairs"] == 1
    assert res["per_point"]["0.10"] == approx(50.0) and res["per_image"]["0.10"] == approx(50.0)


def test_per_point_weights_categories_by_pairs_and_per_image_averages_pairs():
    # category a: two pairs, 1/1 and 1/3 correct; category b: one pair, 0/2
    scores = [score_pair([[0, 0]], [[0, 0]], [True], 10, (0.1,), pair="1", category="a"),
              score_pair([[0, 0], [9, 9], [9, 9]], [[0, 0], [0, 0], [0, 0]], [True] * 3, 10, (0.1,), pair="2",
                         category="a"),
              score_pair([[9, 9], [9, 9]], [[0, 0], [0, 0]], [True] * 2, 10, (0.1,), pair="3", category="b")]
    res = aggregate(scores, (0.1,))
    assert res["categories"]["a"]["per_point"]["0.10"] == approx(100 * 2 / 4)
    assert res["categories"]["a"]["per_image"]["0.10"] == approx(100 * (1 + 1 / 3) / 2)
    assert res["per_point"]["0.10"] == approx((2 * 50.0 + 1 * 0.0) / 3)
    assert res["per_image"]["0.10"] == approx(100 * (1 + 1 / 3 + 0) / 3)
    assert res["per_point_pooled"]["0.10"] == approx(100 * 2 / 6)
    assert "| **all** | 3 | 6 |" in markdown_table(res)


# --------------------------------------------------------------------------- SPair-71k
def test_spair_reader_reads_the_pair_files(bench_root):
    pairs = read_pairs("spair", bench_root["spair"])
    assert [p.pair for p in pairs] == [p["_name"] for p in bf.spair_pairs()]
    p = pairs[2]
    assert (p.category, p.kp_ids, p.threshold, p.num_keypoints) == ("cat", (0, 1, 8, 9), 100.0, 15)
    assert p.src.endswith("JPEGImages/cat/2008_000001.jpg") and p.trg.endswith("JPEGImages/cat/2008_000002.jpg")
    assert p.src_size == (320, 240) and p.visible.all() and p.extra["mirror"] == 0
    assert read_pairs("spair", bench_root["spair"], categories=["dog"])[0].threshold == 200.0
    with pytest.raises(BenchmarkFormatError, match="splits here"):
        read_pairs("spair", bench_root["spair"], split="val")


def test_spair_ground_truth_scores_100_everywhere(bench_root, tmp_path):
    preds = bf.write_predictions(tmp_path / "gt.jsonl", bf.spair_predictions("gt"))
    rc, out = run_cli("evaluate-pairs", "--format", "spair", "--root", bench_root["spair"], "--split", "test",
                      "--predictions", preds, "--out", tmp_path / "r.json")
    assert rc == 0, out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["alphas"] == ["0.01", "0.05", "0.10"]
    for block in [res] + list(res["categories"].values()):
        assert block["per_point"] == {"0.01": 100.0, "0.05": 100.0, "0.10": 100.0}
        assert block["per_image"] == {"0.01": 100.0, "0.05": 100.0, "0.10": 100.0}
    assert sorted(res["categories"]) == ["cat", "dog"]
    assert res["counts"]["pairs"] == 4 and res["counts"]["points"] == 15
    assert res["method"]["source"] == "predictions" and res["benchmark"]["threshold"] == "bbox"
    md = (tmp_path / "r.md").read_text()
    assert "| **all** | 4 | 15 | **100.00**" in md and md.splitlines()[2] in out


def test_spair_hand_computed_pck_under_both_averagings(bench_root, tmp_path):
    """Errors (tests/benchmark_fixtures.SPAIR_ERRORS): cat pairs 0 and 1 exact (4 and 5
    points); cat pair 2, T = 100: errors 0, 3, 7, 20; dog pair 3, T = 200: errors 10
    (exactly 0.05 T: wrong at 0.05) and 1."""
    preds = bf.write_predictions(tmp_path / "err.jsonl", bf.spair_predictions("errors"))
    res = evaluate_pairs("spair", bench_root["spair"], predictions=preds, progress=False)
    cat_correct = {"0.01": 4 + 5 + 1, "0.05": 4 + 5 + 2, "0.10": 4 + 5 + 3}  # of 13 points
    dog_correct = {"0.01": 1, "0.05": 1, "0.10": 2}  # of 2
    cat_img = {"0.01": (1 + 1 + 1 / 4) / 3, "0.05": (1 + 1 + 2 / 4) / 3, "0.10": (1 + 1 + 3 / 4) / 3}
    dog_img = {"0.01": 1 / 2, "0.05": 1 / 2, "0.10": 1.0}
    for k in ("0.01", "0.05", "0.10"):
        cat_pt, dog_pt = 100 * cat_correct[k] / 13, 100 * dog_correct[k] / 2
        assert res["categories"]["cat"]["per_point"][k] == approx(cat_pt)
        assert res["categories"]["dog"]["per_point"][k] == approx(dog_pt)
        assert res["per_point"][k] == approx((3 * cat_pt + 1 * dog_pt) / 4)  # weights: pairs
        assert res["categories"]["cat"]["per_image"][k] == approx(100 * cat_img[k])
        assert res["per_image"][k] == approx(100 * (3 * cat_img[k] + dog_img[k]) / 4)  # mean over pairs
        assert res["per_point_pooled"][k] == approx(100 * (cat_correct[k] + dog_correct[k]) / 15)
    assert res["counts"]["category_weights"] == {"cat": 3, "dog": 1}


def test_spair_mirrored_pair(bench_root):
    """The target of pair 1 is the source mirrored: the mirrored ground truth scores 100,
    the unmirrored source positions score 0; the identity pair scores 100 either way."""
    pairs = {p.pair: p for p in read_pairs("spair", bench_root["spair"])}
    mirror, identity = "000001-2008_000001-2008_000003:cat", "000000-2008_000001-2008_000001:cat"
    for kind, want in (("gt", 100.0), ("unmirrored", 0.0)):
        preds = {k: np.asarray(v, dtype=float) for k, v in bf.spair_predictions(kind).items()}
        res = evaluate_pairs("spair", bench_root["spair"], records=[pairs[mirror]], predictions=preds)
        assert res["per_point"] == {k: want for k in ("0.01", "0.05", "0.10")}
        res = evaluate_pairs("spair", bench_root["spair"], records=[pairs[identity]], predictions=preds)
        assert res["per_image"]["0.01"] == 100.0


def test_spair_sample_per_category_and_category_filter(bench_root, tmp_path):
    preds = bf.write_predictions(tmp_path / "gt.jsonl", bf.spair_predictions("gt"))
    a = evaluate_pairs("spair", bench_root["spair"], predictions=preds, sample=1, seed=3)
    b = evaluate_pairs("spair", bench_root["spair"], predictions=preds, sample=1, seed=3)
    assert a["counts"]["category_weights"] == {"cat": 1, "dog": 1} and a == b
    assert a["benchmark"]["sample"] == 1 and a["benchmark"]["weights_equal_paper"] is False
    only = evaluate_pairs("spair", bench_root["spair"], predictions=preds, categories=["dog"])
    assert list(only["categories"]) == ["dog"]


def test_predictions_that_do_not_fit_are_refused_with_reasons(bench_root, tmp_path):
    rows = bf.spair_predictions("gt")
    missing = dict(list(rows.items())[1:])
    short = dict(rows, **{next(iter(rows)): rows[next(iter(rows))][:2]})
    for name, data, msg in (("missing", missing, "no predictions for 1 of 4 pairs"),
                            ("short", short, "2 predicted points, but the pair has 4")):
        f = bf.write_predictions(tmp_path / f"{name}.jsonl", data)
        rc, out = run_cli("evaluate-pairs", "--format", "spair", "--root", bench_root["spair"],
                          "--predictions", f, "--out", tmp_path / f"{name}.json")
        assert rc == 2 and msg in out, out
        assert not (tmp_path / f"{name}.json").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"pair": "x", "trg_kps": [[1, 2]]}\n\n{"pair": "y", "trg_kps": [[1, "a"]]}\n')
    with pytest.raises(PredictionsError, match="line 3"):
        read_predictions(bad)
    bad.write_text('{"pair": "x", "trg_kps": [[1, 2], null]}\n{"pair": "x", "trg_kps": []}\n')
    with pytest.raises(PredictionsError, match="appears twice"):
        read_predictions(bad)


# --------------------------------------------------------------------------- PF-Pascal
def test_pfpascal_image_threshold_four_alphas_and_ties(bench_root, tmp_path):
    """Pair 0 (aeroplane, target 200 x 300: T = 300): errors 3 (= 0.01 T: wrong at 0.01),
    14, 44. Pair 1 (cat, target 250 x 250: T = 250): errors 2.4 and 37.5 (= 0.15 T)."""
    pairs = read_pairs("pfpascal", bench_root["pfpascal"])
    assert [p.pair for p in pairs] == ["0000-2008_000100-2009_000200:aeroplane", "0001-2009_000200-2010_000300:cat"]
    assert [p.threshold for p in pairs] == [300.0, 250.0]
    np.testing.assert_allclose(pairs[0].src_kps[0], [10.5, 20.25])
    rows = bf.pf_rows()
    errors = ([(3, 0), (14, 0), (0, 44)], [(2.4, 0), (22.5, 30)])
    preds = {p.pair: [[x + dx, y + dy] for (x, y), (dx, dy) in zip(r["b"], e)] for p, r, e in zip(pairs, rows, errors)}
    f = bf.write_predictions(tmp_path / "pf.jsonl", preds)
    rc, out = run_cli("evaluate-pairs", "--format", "pfpascal", "--root", bench_root["pfpascal"],
                      "--predictions", f, "--out", tmp_path / "pf.json")
    assert rc == 0, out
    res = json.loads((tmp_path / "pf.json").read_text())
    assert res["alphas"] == ["0.01", "0.05", "0.10", "0.15"] and res["benchmark"]["threshold"] == "image"
    aero = {"0.01": 0 / 3, "0.05": 2 / 3, "0.10": 2 / 3, "0.15": 3 / 3}
    cat = {"0.01": 1 / 2, "0.05": 1 / 2, "0.10": 1 / 2, "0.15": 1 / 2}
    for k in aero:
        assert res["categories"]["aeroplane"]["per_point"][k] == approx(100 * aero[k])
        assert res["per_point"][k] == approx(100 * (aero[k] + cat[k]) / 2)
        assert res["per_image"][k] == approx(100 * (aero[k] + cat[k]) / 2)


def test_pfpascal_training_list_without_points_is_refused(bench_root, tmp_path):
    root = bench_root["pfpascal"]
    (root / "trn_pairs_pf_pascal.csv").write_text(
        "source_image,target_image,class,flip\nPF-dataset-PASCAL/JPEGImages/2008_000100.jpg,"
        "PF-dataset-PASCAL/JPEGImages/2009_000200.jpg,1,0\n")
    with pytest.raises(BenchmarkFormatError, match="training list has no keypoints"):
        read_pairs("pfpascal", root, split="trn")


# --------------------------------------------------------------------------- AP-10K
def test_ap10k_points_invisible_in_one_image_do_not_count(bench_root, tmp_path):
    pairs = read_pairs("ap10k", bench_root["ap10k"])
    assert [p.pair for p in pairs] == ["000000000001-000000000002:antelope", "000000000003-000000000004:cat"]
    assert [p.threshold for p in pairs] == [250.0, 200.0]
    assert [int(p.visible.sum()) for p in pairs] == [15, 13]  # 17 - {3, 4}; 17 - {0} - {5, 6, 7}
    preds = {}
    for p in pairs:
        rows = [list(xy) if v else ([9999.0, 9999.0] if i % 2 else None)
                for i, (xy, v) in enumerate(zip(p.trg_kps, p.visible))]
        preds[p.pair] = rows
    f = bf.write_predictions(tmp_path / "ap.jsonl", preds)
    rc, out = run_cli("evaluate-pairs", "--format", "ap10k", "--root", bench_root["ap10k"],
                      "--predictions", f, "--out", tmp_path / "ap.json")
    assert rc == 0, out
    res = json.loads((tmp_path / "ap.json").read_text())
    assert res["per_point"] == {"0.01": 100.0, "0.05": 100.0, "0.10": 100.0}
    assert res["counts"]["points"] == 28 and sorted(res["categories"]) == ["antelope", "cat"]
    # one visible point moved by 0.10 T exactly: wrong at 0.10 only for that pair
    p = pairs[0]
    i = int(np.flatnonzero(p.visible)[0])
    preds[p.pair][i] = [p.trg_kps[i][0] + 25.0, p.trg_kps[i][1]]
    res = evaluate_pairs("ap10k", bench_root["ap10k"], predictions={k: np.asarray(
        [[np.nan, np.nan] if v is None else v for v in rows], dtype=float) for k, rows in preds.items()})
    assert res["categories"]["antelope"]["per_point"]["0.10"] == approx(100 * 14 / 15)
    assert res["categories"]["antelope"]["per_point"]["0.05"] == approx(100 * 14 / 15)


def test_skeleton_names_give_the_flip_pairs():
    from fiftyone_sdcorr.dataset.matching import flip_pairs_from_labels

    for fmt, cat, n in (("spair", "cat", 15), ("spair", "bus", 30), ("ap10k", "antelope", 17)):
        assert flip_pairs_from_labels(keypoint_names(fmt, cat, n)) == flip_pairs(fmt, cat)
    assert (0, 1) in flip_pairs("spair", "cat") and (5, 8) in flip_pairs("ap10k", "x")
    assert flip_pairs("pfpascal", "cat") == []


# --------------------------------------------------------------------------- the model path
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fiftyone_sdcorr.core.features.tiny import tiny_models

    return tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="module")
def tiny_extractor(tiny):
    from fiftyone_sdcorr import FeatureExtractor

    return FeatureExtractor(*tiny, device="cpu", sd_size=128, sd_mode="whole", dino_size=56, pca_dim=8)


def _well_formed(res, keys=("0.01", "0.05", "0.10")):
    assert res["alphas"] == list(keys)
    for block in [res] + list(res["categories"].values()):
        for kind in ("per_point", "per_image"):
            assert list(block[kind]) == list(keys)
            assert all(v is None or 0.0 <= v <= 100.0 for v in block[kind].values())
    json.dumps(res, allow_nan=False)


@pytest.mark.parametrize("features, pca, flip, soft", [
    ("fused", "co", False, False), ("sd", "fixed", False, True), ("dino", "co", True, False),
    ("fused", "fixed", True, True),
])
def test_model_path_runs_on_spair(bench_root, tiny_extractor, features, pca, flip, soft):
    res = evaluate_pairs("spair", bench_root["spair"], extractor=tiny_extractor, features=features, pca=pca,
                         flip=flip, soft_argmax=soft, fit_images=3, progress=False)
    _well_formed(res)
    assert res["counts"]["pairs"] == 4 and res["counts"]["points"] == 15
    assert (res["method"]["features"], res["method"]["pca"], res["method"]["flip"]) == (
        features, pca, flip)


def test_model_path_on_pfpascal_and_ap10k(bench_root, tiny_extractor):
    res = evaluate_pairs("pfpascal", bench_root["pfpascal"], extractor=tiny_extractor, flip=True, progress=False)
    _well_formed(res, ("0.01", "0.05", "0.10", "0.15"))
    assert any("PF-Pascal" in w for w in res["warnings"])
    res = evaluate_pairs("ap10k", bench_root["ap10k"], extractor=tiny_extractor, flip=True, progress=False)
    _well_formed(res)
    assert res["counts"]["points"] == 28


def test_evaluate_pairs_command_with_tiny_models_resumes(bench_root, tiny, tmp_path):
    saved = tmp_path / "preds.jsonl"
    args = ["evaluate-pairs", "--format", "spair", "--root", bench_root["spair"], "--sd-model", tiny[0],
            "--dino-model", tiny[1], "--device", "cpu", "--sd-size", "128", "--sd-mode", "whole",
            "--dino-size", "56", "--pca-dim", "8", "--flip", "--save-predictions", saved, "--no-progress"]
    rc, out = run_cli(*args, "--out", tmp_path / "a.json")
    assert rc == 0, out
    first = json.loads((tmp_path / "a.json").read_text())
    _well_formed(first)
    assert first["method"]["source"] == "model" and first["method"]["flip"] is True
    lines = saved.read_text().splitlines()
    assert len(lines) == 4 and set(read_predictions(saved)) == {p["_name"] for p in bf.spair_pairs()}
    # an interrupted run: the last line half written; the rerun recomputes only that pair
    saved.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    rc, out = run_cli(*args, "--out", tmp_path / "b.json")
    assert rc == 0, out
    assert len(saved.read_text().splitlines()) == 4
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["per_point"] == first["per_point"] and second["per_image"] == first["per_image"]
    # the saved predictions score the same without any model
    res = evaluate_pairs("spair", bench_root["spair"], predictions=saved)
    assert res["per_point"] == first["per_point"]
    # other settings refuse to resume into the same file
    rc, out = run_cli(*[a for a in args if a != "--flip"], "--out", tmp_path / "c.json")
    assert rc == 2 and "other settings (flip)" in out, out


# --------------------------------------------------------------------------- importers
@pytest.fixture
def cleanup_datasets():
    names = []
    yield names
    for n in names:
        if fo.dataset_exists(n):
            fo.delete_dataset(n)


def test_import_spair_keeps_points_boxes_pairs_and_skeletons(bench_root, cleanup_datasets, tmp_path):
    import fiftyone_sdcorr as sdc
    from fiftyone_sdcorr.dataset.benchmarks import benchmark_flip_pairs
    from fiftyone_sdcorr.dataset.matching import resolve_flip_pairs

    name = f"spair-test-{os.getpid()}"
    cleanup_datasets.append(name)
    ds = sdc.import_benchmark("spair", bench_root["spair"], "test", name=name, progress=False)
    assert len(ds) == 5 and ds.count_sample_tags() == {"test": 5, "spair": 5}
    s = ds.match({"benchmark_key": "cat/2008_000002"}).first()
    assert s.category == "cat" and s.benchmark_attributes["azimuth_id"] == 3
    kp = s.keypoints.keypoints[0]
    assert kp.label == "cat" and len(kp.points) == 15
    assert [i for i, v in enumerate(kp.visible) if v] == [0, 1, 8, 9]
    assert kp.points[0] == pytest.approx([110 / 300, 70 / 260]) and all(np.isnan(kp.points[2]))
    assert s.detections.detections[0].bounding_box == pytest.approx([60 / 300, 50 / 260, 100 / 300, 80 / 260])
    assert len(s.benchmark_pairs) == 1 and s.benchmark_pairs[0]["threshold"] == 100.0
    info = ds.info["sdcorr_benchmark"]
    assert info["pairs"] == 4 and sorted(info["skeletons"]) == ["cat", "dog"]
    assert [tuple(p) for p in info["skeletons"]["cat"]["flip_pairs"]] == flip_pairs("spair", "cat")
    assert benchmark_flip_pairs(ds, "dog") == flip_pairs("spair", "dog")
    # the pairs read back from the dataset score exactly as the files do
    preds = bf.write_predictions(tmp_path / "err.jsonl", bf.spair_predictions("errors"))
    records = sdc.benchmark_pairs(ds)
    assert [r.pair for r in records] == [p["_name"] for p in bf.spair_pairs()]
    from_ds = evaluate_pairs("spair", bench_root["spair"], records=records, predictions=preds)
    from_files = evaluate_pairs("spair", bench_root["spair"], predictions=preds)
    for k in ("per_point", "per_image", "categories", "counts"):
        assert from_ds[k] == from_files[k]
    # one category: its skeleton goes on the keypoints field, so flip alignment finds left/right
    one = sdc.import_benchmark("spair", bench_root["spair"], "test", name=name, categories=["cat"],
                               overwrite=True, progress=False)
    assert one.skeletons["keypoints"].labels[0] == "right_kp01-00"
    pairs, origin = resolve_flip_pairs(one, "keypoints")
    assert origin == "skeleton" and pairs == flip_pairs("spair", "cat")
    with pytest.raises(ValueError, match="exists"):
        sdc.import_benchmark("spair", bench_root["spair"], name=name, progress=False)


def test_import_ap10k_and_pfpascal(bench_root, cleanup_datasets):
    import fiftyone_sdcorr as sdc

    name = f"ap10k-test-{os.getpid()}"
    cleanup_datasets.append(name)
    ds = sdc.import_benchmark("ap10k", bench_root["ap10k"], name=name, progress=False)
    assert len(ds) == 4 and sorted(ds.distinct("category")) == ["antelope", "cat"]
    assert ds.skeletons["keypoints"].labels[:3] == ["left_eye", "right_eye", "nose"]
    s = ds.match({"benchmark_key": "antelope/000000000002"}).first()
    kp = s.keypoints.keypoints[0]
    assert kp.coco_visibility[3] == 0 and not kp.visible[3] and all(np.isnan(kp.points[3]))
    assert s.benchmark_attributes["family"] == "Bovidae"
    assert s.detections.detections[0].bounding_box == pytest.approx([10 / 300, 10 / 300, 100 / 300, 250 / 300])
    assert [r.pair for r in sdc.benchmark_pairs(ds)] == [p.pair for p in read_pairs("ap10k", bench_root["ap10k"])]

    name2 = f"pf-test-{os.getpid()}"
    cleanup_datasets.append(name2)
    rc, out = run_cli("import-benchmark", "--format", "pfpascal", "--root", bench_root["pfpascal"], "--name", name2,
                      "--no-progress")
    assert rc == 0 and "4 images, 2 pairs in 2 categories" in out, out
    pf = fo.load_dataset(name2)
    with_points = pf.exists("keypoints")
    assert with_points.values("benchmark_key") == ["aeroplane/2008_000100"]  # from Annotations/aeroplane/*.mat
    kp = with_points.first().keypoints.keypoints[0]
    assert kp.visible == [2, 2, 0, 2]  # COCO's visibility: 2 visible, 0 not labelled
    recs = sdc.benchmark_pairs(pf)
    assert [r.threshold for r in recs] == [300.0, 250.0]
    rc, out = run_cli("import-benchmark", "--format", "pfpascal", "--root", bench_root["pfpascal"], "--name", name2)
    assert rc == 2 and "exists" in out


def test_images_reader_uses_image_annotations(bench_root, tmp_path):
    import shutil

    root = Path(shutil.copytree(bench_root["spair"], tmp_path / "SPair-71k"))
    ann = root / "ImageAnnotation" / "cat" / "2008_000002.json"
    d = json.loads(ann.read_text())
    d["kps"].update({str(i): None for i in range(15, 30)})  # ids padded to 30 with nulls
    ann.write_text(json.dumps(d))
    pairs = read_pairs("spair", root)
    imgs = {i.key: i for i in read_images("spair", root, pairs)}
    assert sorted(imgs) == ["cat/2008_000001", "cat/2008_000002", "cat/2008_000003", "dog/2009_000010",
                            "dog/2009_000011"]
    assert imgs["cat/2008_000003"].points.shape == (15, 2) and imgs["cat/2008_000003"].extra["pose"] == "Frontal"
    assert imgs["cat/2008_000002"].points.shape == (15, 2)
    np.testing.assert_allclose(imgs["cat/2008_000002"].points[[0, 1, 8, 9]], pairs[2].trg_kps)


def test_commands_are_listed_and_ncnet_pair_lists_are_read(bench_root, tmp_path):
    rc, out = run_cli("--help")
    assert rc == 0 and "evaluate-pairs" in out and "import-benchmark" in out
    rc, out = run_cli("evaluate-pairs", "--help")
    assert rc == 0 and "--predictions" in out and "--pca" in out and "--flip" in out
    root = bench_root["pfpascal"]
    (root / "image_pairs").mkdir(exist_ok=True)
    (root / "image_pairs" / "val_pairs.csv").write_text((root / "test_pairs_pf_pascal.csv").read_text())
    assert [p.pair for p in read_pairs("pfpascal", root, "val")] == [p.pair for p in read_pairs("pfpascal", root)]


def test_feature_cache_serves_reruns_and_ablations(bench_root, tiny, tmp_path):
    """--feature-cache: the raw maps of each image are kept on disk; a rerun and another
    ablation extract nothing, and give the same numbers as without the cache."""
    from fiftyone_sdcorr import FeatureExtractor

    class Counting(FeatureExtractor):  # the real extractor, counting what it extracts
        extracted = 0

        def extract(self, images, labels=None):
            images = list(images)
            Counting.extracted += len(images)
            return super().extract(images, labels=labels)

    ext = Counting(*tiny, device="cpu", sd_size=128, sd_mode="whole", dino_size=56, pca_dim=8)
    kw = dict(extractor=ext, feature_cache=str(tmp_path / "cache"), cache_images=0, progress=False)
    first = evaluate_pairs("spair", bench_root["spair"], **kw)
    n = Counting.extracted
    assert n > 0 and len(list((tmp_path / "cache").rglob("*.safetensors"))) == n
    again = evaluate_pairs("spair", bench_root["spair"], **kw)
    sd_only = evaluate_pairs("spair", bench_root["spair"], features="sd", **kw)
    assert Counting.extracted == n  # nothing extracted again
    plain = evaluate_pairs("spair", bench_root["spair"], extractor=ext, features="sd", cache_images=0,
                           progress=False)
    assert again["per_point"] == first["per_point"] and sd_only["per_point"] == plain["per_point"]
    # another recipe is another key: never served the first recipe's maps
    other = Counting(*tiny, device="cpu", sd_size=128, sd_mode="whole", dino_size=56, pca_dim=8, timestep=50)
    before = Counting.extracted
    evaluate_pairs("spair", bench_root["spair"], **dict(kw, extractor=other))
    assert Counting.extracted == before + n


def test_cli_model_path_with_a_replacement_unet_without_noise(bench_root, tiny, tmp_path):
    """evaluate-pairs --unet-model DIR --no-noise (CleanDIFT's way), end to end on the CLI."""
    from fiftyone_sdcorr.core.features.tiny import build_tiny_unet

    unet = build_tiny_unet(tmp_path / "unet", layout="file")
    out = tmp_path / "clean.json"
    rc, log = run_cli("evaluate-pairs", "--format", "spair", "--root", bench_root["spair"], "--out", out,
                      "--sd-model", tiny[0], "--dino-model", tiny[1], "--unet-model", unet, "--no-noise",
                      "--device", "cpu", "--sd-size", 128, "--sd-mode", "whole", "--dino-size", 56, "--pca-dim", 8,
                      "--no-progress")
    assert rc == 0, log[-3000:]
    res = json.loads(out.read_text())
    _well_formed(res)
    method = res["method"]
    assert method["unet_model"] == str(unet) and method["noise"] is False and method["timestep"] == 261, method
