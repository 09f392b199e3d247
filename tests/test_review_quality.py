"""Issue 11 item 5: review quality, measured (measure_review_quality and `review-quality`).

Real FiftyOne + MongoDB, real photos (chelsea in eight transformed copies, annotated with
the same six cat points, named so that the skeleton gives two left/right pairs) and the
deterministic LocalDescriptor: no model, no mock.
"""

import json
import os
import math
import uuid

import numpy as np
import pytest
from PIL import Image

import fiftyone as fo

from fiftyone_sdcorr.__main__ import main
from fiftyone_sdcorr.dataset.compute_features import compute_fused_features
from fiftyone_sdcorr.dataset.review_quality import (
    corrupt_instance,
    measure_review_quality,
    quality_table,
)
import benchmark_fixtures as bf
from local_descriptor import LocalDescriptor
from snapshots import field_snapshot

CAT_POINTS = [[0.52, 0.55], [0.42, 0.40], [0.62, 0.40], [0.30, 0.20], [0.75, 0.18], [0.53, 0.75]]
CAT_LABELS = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "chin"]  # pairs (1, 2), (3, 4)
REVIEW = dict(alpha=0.1, min_confidence=0.5, progress=False)
RECALL_SHIFT = 0.9  # measured 1.0 (21/21)
FLAG_RATE_CLEAN = 0.3  # measured 23/123 = 0.19 (shift) and 27/120 = 0.23 (swap), all at corrupted keypoints
RECALL_SWAP = 0.85  # measured 22/24 = 0.92 (seeds 0-2, rate 0.2)


def _kps(pts):
    return fo.Keypoints(keypoints=[fo.Keypoint(label="cat", points=[list(p) for p in pts])])


def _views(img, tmp_path):
    """(path, points) of transformed copies of ``img``: scaled, translated, cropped."""
    w, h = img.size
    out = []
    for s in (1.0, 0.6, 0.8, 1.25):
        p = tmp_path / f"scale{s}.png"
        img.resize((int(w * s), int(h * s)), Image.BICUBIC).save(p)
        out.append((str(p), CAT_POINTS))
    for dx, dy in ((40, 25), (-30, 15)):
        canvas = Image.new("RGB", (w, h))
        canvas.paste(img, (dx, dy))
        p = tmp_path / f"shift{dx}_{dy}.png"
        canvas.save(p)
        out.append((str(p), [[(x * w + dx) / w, (y * h + dy) / h] for x, y in CAT_POINTS]))
    for x0, y0, x1, y1 in ((90, 20, 400, 260), (60, 0, 451, 300)):
        p = tmp_path / f"crop{x0}_{y0}.png"
        img.crop((x0, y0, x1, y1)).save(p)
        out.append((str(p), [[(x * w - x0) / (x1 - x0), (y * h - y0) / (y1 - y0)] for x, y in CAT_POINTS]))
    return out


@pytest.fixture
def cat_ds(photo_paths, tmp_path):
    img = Image.open(photo_paths["chelsea"]).convert("RGB")
    ds = fo.Dataset(f"sdcorr-rq-{uuid.uuid4().hex[:10]}")
    ds.skeletons = {"gt": fo.KeypointSkeleton(labels=CAT_LABELS, edges=[[0, 1], [0, 2]])}
    ds.add_samples([fo.Sample(filepath=p, gt=_kps(q), tags=["mine"]) for p, q in _views(img, tmp_path)]
                   + [fo.Sample(filepath=photo_paths["chelsea"], note="unannotated")])
    ds.save()
    yield ds
    ds.delete()


def _leftovers(ds):
    ds.reload()
    return [n for n in ds.get_field_schema() if n.startswith("sdcorr_rq") or "review" in n]


# --------------------------------------------------------------------------- the corruptions themselves
def test_corruptions_are_what_they_say():
    kp = fo.Keypoint(label="cat", points=[list(p) for p in CAT_POINTS[:5]] + [[math.nan, math.nan]],
                     visible=[True] * 5 + [False])
    wh = (400, 200)
    pts = np.array(CAT_POINTS[:5]) * wh
    T = max(pts.max(0) - pts.min(0))  # the extent of the visible points, in pixels
    rng = np.random.default_rng(0)
    # every point swapped: (1, 2) and (3, 4) exchange places; 0 has no partner, 5 is not annotated
    new, truth = corrupt_instance(kp, [(1, 2), (3, 4)], ("swap",), 1.0, 0.2, wh, None, rng)
    assert new.points[1] == CAT_POINTS[2] and new.points[2] == CAT_POINTS[1]
    assert new.points[3] == CAT_POINTS[4] and new.points[0] == CAT_POINTS[0]
    assert [t and t["kind"] for t in truth] == ["clean", "swap", "swap", "swap", "swap", None]
    assert truth[1]["moved"] == pytest.approx(np.linalg.norm(pts[1] - pts[2]) / T)
    assert kp.points[1] == CAT_POINTS[1]  # the original is untouched
    # every point shifted by exactly 0.3 T, inside the image
    new, truth = corrupt_instance(kp, [], ("shift",), 1.0, 0.3, wh, None, rng)
    moved = np.linalg.norm((np.array(new.points[:5]) - np.array(CAT_POINTS[:5])) * wh, axis=1)
    assert moved == pytest.approx([0.3 * T] * 5)
    assert all(0 <= v <= 1 for p in new.points[:5] for v in p)
    # a box gives T: 0.5 x 200 px -> max(0.25 * 400, 0.5 * 200) = 100 px
    box = fo.Detections(detections=[fo.Detection(label="cat", bounding_box=[0.2, 0.1, 0.25, 0.5])])
    new, truth = corrupt_instance(kp, [], ("shift",), 1.0, 0.3, wh, box, rng)
    assert np.linalg.norm((np.array(new.points[0]) - CAT_POINTS[0]) * wh) == pytest.approx(30.0)
    # dropped: NaN and not visible
    new, truth = corrupt_instance(kp, [], ("drop",), 1.0, 0.3, wh, None, rng)
    assert all(math.isnan(v) for p in new.points for v in p) and new.visible == [False] * 6
    # rate 0: nothing changes
    new, truth = corrupt_instance(kp, [(1, 2)], ("swap", "shift", "drop"), 0.0, 0.3, wh, None, rng)
    assert new.points[:5] == kp.points[:5] and [t and t["kind"] for t in truth][:5] == ["clean"] * 5


# --------------------------------------------------------------------------- measured on a real photo
def test_shifted_points_are_flagged_clean_points_rarely_and_the_dataset_is_unchanged(cat_ds):
    ds = cat_ds
    before = field_snapshot(ds)
    skeletons = {k: (v.labels, v.edges) for k, v in ds.skeletons.items()}
    desc = LocalDescriptor(size=448)
    # nothing corrupted: no point of these eight views is flagged
    base = measure_review_quality(ds, "gt", rate=0.0, extractor=desc, **REVIEW)
    assert base["kinds"]["clean"] == dict(points=48, checked=48, flagged=0, flag_rate=0.0,
                                          flagged_where_corrupted_elsewhere=0)
    assert base["overall"]["precision"] is None and base["kinds"]["shift"]["recall"] is None
    # 20 % of the points shifted by 0.3 T, three seeds pooled
    n = dict(shifted=0, found=0, clean=0, false=0, elsewhere=0)
    for seed in (0, 1, 2):
        report = measure_review_quality(ds, "gt", corruptions=("shift",), rate=0.2, shift=0.3, seed=seed,
                                        extractor=desc, **REVIEW)
        print("\n" + quality_table(report))
        shift, clean = report["kinds"]["shift"], report["kinds"]["clean"]
        assert report["samples"] == 8 and report["overall"]["annotated"] == 48
        assert shift["points"] + clean["points"] == 48 and shift["detectable"] == shift["points"]
        assert report["kinds"]["swap"]["points"] == 0 and report["kinds"]["drop"]["points"] == 0
        for k, v in dict(shifted=shift["points"], found=shift["flagged"], clean=clean["checked"],
                         false=clean["flagged"], elsewhere=clean["flagged_where_corrupted_elsewhere"]).items():
            n[k] += v
    print(n)
    assert n["shifted"] >= 20
    assert n["found"] / n["shifted"] >= RECALL_SHIFT, n  # measured 1.0
    assert n["false"] / n["clean"] <= FLAG_RATE_CLEAN, n
    # every false alarm is at a keypoint shifted in another sample: corrupted evidence, not noise
    assert n["elsewhere"] == n["false"], n
    # the dataset as it was: fields, values, tags, schema, skeletons; no field left behind
    assert field_snapshot(ds) == before
    assert not _leftovers(ds)
    assert {k: (v.labels, v.edges) for k, v in ds.skeletons.items()} == skeletons
    json.dumps(report)  # JSON-able


def test_all_kinds_counted_and_reproducible(cat_ds):
    ds = cat_ds
    before = field_snapshot(ds)
    kw = dict(rate=0.3, shift=0.3, seed=2, extractor=LocalDescriptor(size=448), **REVIEW)
    report = measure_review_quality(ds, "gt", **kw)
    print("\n" + quality_table(report))
    k = report["kinds"]
    assert sum(k[x]["points"] for x in ("clean", "swap", "shift", "drop")) == 48
    assert report["swap_pairs_origin"] == "skeleton"
    assert k["swap"]["points"] % 2 == 0 and k["swap"]["points"] > 0 and k["drop"]["points"] > 0
    assert k["drop"]["recall"] is None and k["drop"]["flagged"] == 0 and "not applicable" in k["drop"]["note"]
    o = report["overall"]
    assert o["corrupted"] == k["swap"]["points"] + k["shift"]["points"]
    assert o["flagged"] == k["swap"]["flagged"] + k["shift"]["flagged"]
    assert o["precision"] == pytest.approx(o["flagged"] / (o["flagged"] + k["clean"]["flagged"]))
    # same seed, same corruptions and flags; another seed, other corruptions
    again = measure_review_quality(ds, "gt", **kw)
    assert again["kinds"] == report["kinds"]
    other = measure_review_quality(ds, "gt", **dict(kw, seed=3))
    assert other["kinds"] != report["kinds"]
    assert field_snapshot(ds) == before and not _leftovers(ds)


def test_left_right_swaps_are_flagged(cat_ds):
    ds = cat_ds
    desc = LocalDescriptor(size=448)
    n = dict(swapped=0, found=0, clean=0, false=0)
    for seed in (0, 1, 2):
        report = measure_review_quality(ds, "gt", corruptions=("swap",), rate=0.2, seed=seed, extractor=desc,
                                        **REVIEW)
        print("\n" + quality_table(report))
        swap, clean = report["kinds"]["swap"], report["kinds"]["clean"]
        assert swap["points"] % 2 == 0 and swap["detectable"] == swap["points"]  # eyes / ears > 0.1 T apart
        for k, v in dict(swapped=swap["points"], found=swap["flagged"], clean=clean["checked"],
                         false=clean["flagged"]).items():
            n[k] += v
    print(n)
    assert n["swapped"] >= 10
    assert n["found"] / n["swapped"] >= RECALL_SWAP, n
    assert n["false"] / n["clean"] <= FLAG_RATE_CLEAN, n


def test_a_view_is_measured_alone(cat_ds):
    ds = cat_ds
    before = field_snapshot(ds)
    report = measure_review_quality(ds.exists("gt").limit(5), "gt", corruptions="shift", rate=0.3,
                                    extractor=LocalDescriptor(size=448), **REVIEW)
    assert report["samples"] == 5 and report["overall"]["annotated"] == 30
    assert field_snapshot(ds) == before and not _leftovers(ds)


def test_bad_arguments_are_refused_before_anything_is_written(cat_ds):
    ds = cat_ds
    before = field_snapshot(ds)
    desc = LocalDescriptor(size=448)
    for kw, match in [(dict(corruptions=("swap", "blur")), "corruptions"), (dict(corruptions=()), "corruptions"),
                      (dict(rate=1.5), "rate"), (dict(shift=0), "shift"), (dict(seed=-1), "seed"),
                      (dict(review_field="x"), "review_field"), (dict(tag="t"), "tag")]:
        with pytest.raises(ValueError, match=match):
            measure_review_quality(ds, "gt", extractor=desc, progress=False, **kw)
    with pytest.raises(ValueError, match="does not exist"):
        measure_review_quality(ds, "nope", extractor=desc, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        measure_review_quality(ds.limit(1), "gt", extractor=desc, progress=False)
    assert field_snapshot(ds) == before and not _leftovers(ds)


def test_an_error_in_the_review_still_removes_the_temporary_fields(cat_ds):
    ds = cat_ds
    before = field_snapshot(ds)
    with pytest.raises(ValueError):
        measure_review_quality(ds, "gt", extractor=LocalDescriptor(size=448), alpha=5.0, progress=False)
    assert field_snapshot(ds) == before and not _leftovers(ds)


def test_command_line_with_stored_features(cat_ds, tmp_path, capsys):
    ds = cat_ds
    compute_fused_features(ds, extractor=LocalDescriptor(size=448), store_dir=str(tmp_path / "store"),
                           progress=False)
    before = field_snapshot(ds)
    out = tmp_path / "rq.json"
    rc = main(["review-quality", "--dataset", ds.name, "--gt-field", "gt", "--corruptions", "shift",
               "--rate", "0.2", "--shift", "0.3", "--alpha", "0.1", "--min-confidence", "0.5",
               "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "shift" in text and "recall" in text and "flag rate" in text
    report = json.loads(out.read_text())
    print(report["kinds"])
    assert report["kinds"]["shift"]["recall"] >= RECALL_SHIFT
    assert report["kinds"]["clean"]["flag_rate"] <= FLAG_RATE_CLEAN
    assert field_snapshot(ds) == before and not _leftovers(ds)
    rc = main(["review-quality", "--dataset", "no-such-dataset-xyz", "--gt-field", "gt"])
    assert rc == 2 and "no dataset" in capsys.readouterr().err


# --------------------------------------------------------------------------- on a benchmark
@pytest.fixture(scope="module")
def spair_root(tmp_path_factory):
    return bf.write_spair(tmp_path_factory.mktemp("benchmarks"))


def test_on_an_imported_benchmark_swaps_use_the_recorded_skeletons(spair_root):
    from fiftyone_sdcorr.dataset.benchmarks import import_benchmark

    ds = import_benchmark("spair", spair_root, "test", name=f"rq-spair-{uuid.uuid4().hex[:8]}", progress=False)
    try:
        before = field_snapshot(ds)
        assert "keypoints" not in (ds.skeletons or {})  # two categories: no shared skeleton on the field
        report = measure_review_quality(ds, "keypoints", rate=1.0, seed=0, bbox_field="detections",
                                        extractor=LocalDescriptor(size=224), min_confidence=0.0, progress=False)
        print("\n" + quality_table(report))
        assert report["swap_pairs_origin"] == "benchmark"
        k = report["kinds"]
        assert k["swap"]["points"] > 0 and k["swap"]["points"] % 2 == 0
        assert sum(k[x]["points"] for x in ("clean", "swap", "shift", "drop")) == report["overall"]["annotated"]
        assert field_snapshot(ds) == before and not _leftovers(ds)
    finally:
        ds.delete()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fiftyone_sdcorr.core.features.tiny import tiny_models

    return tiny_models(tmp_path_factory.mktemp("tiny-models"))


def test_command_line_on_a_benchmark_root_leaves_no_dataset(spair_root, tiny, tmp_path, capsys):
    sd, dino = tiny
    datasets = sorted(fo.list_datasets())
    out = tmp_path / "bench.json"
    rc = main(["review-quality", "--format", "spair", "--root", str(spair_root), "--sd-model", str(sd),
               "--dino-model", str(dino), "--device", "cpu", "--preset", "cpu", "--min-confidence", "0",
               "--seed", "1", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    report = json.loads(out.read_text())
    assert report["swap_pairs_origin"] == "benchmark" and report["samples"] == 5
    assert report["settings"]["bbox_field"] == "detections"
    assert sorted(fo.list_datasets()) == datasets  # the imported split is deleted
    assert os.path.exists(out) and "overall" in text
