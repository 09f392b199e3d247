"""Issue 19: bad and unusual benchmark, prediction and cache files through the real CLI.

Table-driven: each case builds ONE bad file (or path) in a copy of a tiny benchmark
folder (tests/benchmark_fixtures.py), runs ``python -m fiftyone_sdcorr``'s ``main()``
and checks that

(a) it exits 2 with one ``<command>: error: ...`` line on stderr that names the file, the
    pair and the field (regexes), and no traceback;
(b) nothing saved was lost or touched: the files listed by the case are byte for byte
    what they were, and no result file appeared.

Then the saved-work cases, with the tiny real models where work is saved: a resumed
``--save-predictions`` under a full disk (a file-size limit in a subprocess: the real
``EFBIG`` of a write that does not fit) keeps every saved line, a recomputed pair is
never saved twice, ``--feature-cache`` follows an image's content, not its name,
``import-benchmark --overwrite`` of a bad split leaves the old dataset, a box outside its
image is a warning in the result, ``shards=True`` is refused, and the offline ``demo``
and a missing model speak in one line.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List

import pytest

import benchmark_fixtures as bf
from fiftyone_sdcorr.__main__ import main
from fiftyone_sdcorr.core.benchmarks.pck import read_predictions

SPAIR_PAIR = "000002-2008_000001-2008_000002:cat"  # T = 100, four points
AP_PAIR = "000000000001-000000000002:antelope"


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    base = tmp_path_factory.mktemp("benchmarks")
    return {"spair": bf.write_spair(base), "pfpascal": bf.write_pfpascal(base), "ap10k": bf.write_ap10k(base)}


@dataclass
class World:
    tmp: Path
    roots: dict  # fresh copies, free to damage
    preds: Path  # ground-truth SPair predictions
    out: Path  # where results would go

    def spair_pair(self, name=SPAIR_PAIR) -> Path:
        return self.roots["spair"] / "PairAnnotation" / "test" / f"{name}.json"

    def edit(self, path: Path, **fields) -> Path:
        d = json.loads(path.read_text())
        d.update(fields)
        path.write_text(json.dumps(d))
        return path

    def evaluate(self, fmt="spair", *extra, predictions=True) -> List[str]:
        argv = ["evaluate-pairs", "--format", fmt, "--root", str(self.roots[fmt]), "--out", str(self.out),
                "--no-progress"]
        return argv + (["--predictions", str(self.preds)] if predictions else []) + [str(a) for a in extra]


@pytest.fixture
def world(originals, tmp_path):
    roots = {k: Path(shutil.copytree(v, tmp_path / "data" / v.name)) for k, v in originals.items()}
    preds = bf.write_predictions(tmp_path / "preds.jsonl", bf.spair_predictions("gt"))
    return World(tmp_path, roots, preds, tmp_path / "results" / "out.json")


# --------------------------------------------------------------------------- the table
@dataclass
class Case:
    id: str
    build: Callable[[World], list]  # makes the bad file, returns argv
    expect: List[str]  # regexes the stderr line must match (file, pair, field)
    keep: Callable[[World], list] = field(default=lambda w: [])  # files that must not change


def _gzip(w):
    gz = w.tmp / "preds.jsonl.gz"
    gz.write_bytes(gzip.compress(w.preds.read_bytes()))
    return w.evaluate("spair", "--predictions", gz)


def _latin1(w):
    w.preds.write_bytes(w.preds.read_bytes() + '{"pair": "caf\xe9"}\n'.encode("latin-1"))
    return w.evaluate()


def _pred_line(w, **obj):
    rows = [json.loads(x) for x in w.preds.read_text().splitlines()]
    rows = [dict(r, **obj) if r["pair"] == SPAIR_PAIR else r for r in rows]
    w.preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return w.evaluate()


def _out_under_file(w):
    (w.tmp / "afile").write_text("x")
    return w.evaluate("spair", "--out", w.tmp / "afile" / "out.json")


def _pickle_projection(w):
    bomb = w.tmp / "unpickled-marker"
    w.bomb = bomb
    (w.tmp / "proj.safetensors").write_bytes(pickle.dumps(_Bomb(str(bomb))))
    return w.evaluate("spair", "--pca", "fixed", "--projection", w.tmp / "proj.safetensors",
                      "--sd-model", w.tmp / "no-sd", "--dino-model", w.tmp / "no-dino", predictions=False)


class _Bomb:
    """Unpickling it would create a file: the test asserts it never exists."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _cache_is_file(w):
    (w.tmp / "cache").write_text("not a folder")
    return w.evaluate("spair", "--feature-cache", w.tmp / "cache", "--sd-model", w.tmp / "no-sd",
                      predictions=False)


def _cache_under_file(w):
    (w.tmp / "cache").write_text("not a folder")
    return w.evaluate("spair", "--feature-cache", w.tmp / "cache" / "sub", "--sd-model", w.tmp / "no-sd",
                      predictions=False)


def _saved_is_folder(w):
    (w.tmp / "saved").mkdir()
    return w.evaluate("spair", "--save-predictions", w.tmp / "saved", "--sd-model", w.tmp / "no-sd",
                      predictions=False)


def _pf_csv(w, column, value, row=0):
    csv = w.roots["pfpascal"] / "test_pairs_pf_pascal.csv"
    lines = csv.read_text().splitlines()
    cells = lines[1 + row].split(",")
    cells[column] = value
    lines[1 + row] = ",".join(cells)
    csv.write_text("\n".join(lines) + "\n")
    return w.evaluate("pfpascal", predictions=False) + ["--predictions", str(w.preds)]


def _ap_image(w, image_id=2, **fields):
    fam, sp = bf.AP_IMAGES[image_id][:2]
    w.edit(w.roots["ap10k"] / "ImageAnnotation" / fam / sp / f"{image_id:012d}.json", **fields)
    return w.evaluate("ap10k")


def _ap_50(w):
    kps = [v for k in bf.ap_keypoints(2) for v in k][:50]
    return _ap_image(w, keypoints=kps)


SP = r"SPair-71k/PairAnnotation/test/000002-2008_000001-2008_000002:cat\.json"
PAIR = re.escape(f"(pair '{SPAIR_PAIR}')")
AP_IMG = r"ap-10k/ImageAnnotation/Bovidae/antelope/000000000002\.json"

CASES = [
    # --- predictions files
    Case("gzip predictions", _gzip, [r"preds\.jsonl\.gz", "compressed"]),
    Case("predictions not UTF-8", _latin1, [r"preds\.jsonl, line 5", "not UTF-8"]),
    Case("predictions point is a string", lambda w: _pred_line(w, trg_kps=[[1, 2], ["a", 3], None, None]),
         [r"preds\.jsonl, line \d", PAIR, r"'trg_kps\[1\]'", r"\['a', 3\]"]),
    Case("predictions point count", lambda w: _pred_line(w, trg_kps=[[1, 2]]),
         [r"preds\.jsonl", PAIR, "'trg_kps' holds 1 predicted points", "4 source keypoints"]),
    Case("predictions pair twice", lambda w: (w.preds.write_text(w.preds.read_text() * 2), w.evaluate())[1],
         [r"preds\.jsonl, line 5", "appears twice"]),
    Case("predictions NaN", lambda w: _pred_line(w, trg_kps=[[float("nan"), 2], None, None, None]),
         [r"preds\.jsonl", PAIR, r"'trg_kps\[0\]'", "finite"]),
    Case("predictions file is a folder", lambda w: w.evaluate("spair", "--predictions", w.tmp),
         ["is a folder"]),
    # --- output paths, checked before anything runs
    Case("--out a folder", lambda w: w.evaluate("spair", "--out", w.tmp), ["parameter 'out'", "is a folder"]),
    Case("--out under a file", _out_under_file, ["parameter 'out'", r"afile, which is a file"]),
    Case("--markdown is --out", lambda w: w.evaluate("spair", "--markdown", w.out), ["'markdown'", "same file"]),
    Case("--feature-cache a file", _cache_is_file, ["parameter 'feature_cache'", "is a file, not a folder"],
         keep=lambda w: [w.tmp / "cache"]),
    Case("--feature-cache under a file", _cache_under_file, ["parameter 'feature_cache'", "which is a file"]),
    Case("--save-predictions a folder", _saved_is_folder, ["parameter 'save_predictions'", "is a folder"]),
    Case("pickle as --projection", _pickle_projection, ["parameter 'projection'", r"proj\.safetensors",
                                                         "not a saved FixedProjection"],
         keep=lambda w: [w.tmp / "proj.safetensors"]),
    Case("--projection without --pca fixed",
         lambda w: w.evaluate("spair", "--projection", w.preds, "--sd-model", w.tmp / "no-sd", predictions=False),
         ["parameter 'projection'", "pca='fixed'"]),
    # --- SPair-71k pair files
    Case("kps_ids with 'a'", lambda w: (w.edit(w.spair_pair(), kps_ids=["0", "a", "8", "9"]), w.evaluate())[1],
         [SP, PAIR, r"'kps_ids\[1\]'", "keypoint id in 0..14", "'a'"]),
    Case("negative keypoint id", lambda w: (w.edit(w.spair_pair(), kps_ids=[-3, 1, 8, 9]), w.evaluate())[1],
         [SP, PAIR, r"'kps_ids\[0\]'", "-3"]),
    Case("keypoint id past the category", lambda w: (w.edit(w.spair_pair(), kps_ids=[0, 1, 8, 15]),
                                                     w.evaluate())[1], [SP, r"'kps_ids\[3\]'", "0..14"]),
    Case("boolean keypoint id", lambda w: (w.edit(w.spair_pair(), kps_ids=[True, 1, 8, 9]), w.evaluate())[1],
         [SP, r"'kps_ids\[0\]'", "True"]),
    Case("zero-area box", lambda w: (w.edit(w.spair_pair(), trg_bndbox=[60, 50, 60, 130]), w.evaluate())[1],
         [SP, PAIR, "'trg_bndbox'", "positive width and height"]),
    Case("3-number box", lambda w: (w.edit(w.spair_pair(), src_bndbox=[1, 2, 3]), w.evaluate())[1],
         [SP, PAIR, "'src_bndbox'", r"4 numbers", r"\[1, 2, 3\]"]),
    Case("trg_imsize []", lambda w: (w.edit(w.spair_pair(), trg_imsize=[]), w.evaluate())[1],
         [SP, PAIR, "'trg_imsize'", r"\[\]"]),
    Case("image size 0", lambda w: (w.edit(w.spair_pair(), src_imsize=[0, 240, 3]), w.evaluate())[1],
         [SP, r"'src_imsize\[0\]'", "positive integer"]),
    Case("non-numeric src_kps entry",
         lambda w: (w.edit(w.spair_pair(), src_kps=[[100, 60], ["x", 62], [120, 100], [90, 200]]), w.evaluate())[1],
         [SP, PAIR, r"'src_kps\[1\]'", r"\['x', 62\]"]),
    Case("src_kps shorter than kps_ids",
         lambda w: (w.edit(w.spair_pair(), src_kps=[[100, 60], [140, 62], [120, 100]]), w.evaluate())[1],
         [SP, "'src_kps' \\(3\\)", "'kps_ids' \\(4\\)"]),
    Case("pair file not JSON", lambda w: (w.spair_pair().write_text("{oops"), w.evaluate())[1],
         [SP, "not readable JSON"]),
    Case("pair file a JSON list", lambda w: (w.spair_pair().write_text("[1, 2]"), w.evaluate())[1],
         [SP, "JSON object"]),
    Case("category not the file's", lambda w: (w.edit(w.spair_pair(), category="dog"), w.evaluate())[1],
         [SP, "'category'", "'cat'", "'dog'"]),
    Case("unknown --categories", lambda w: w.evaluate("spair", "--categories", "cat", "catt"),
         ["parameter 'categories'", r"\['catt'\]", r"categories there: \['cat', 'dog'\]"]),
    Case("--sample 0", lambda w: w.evaluate("spair", "--sample", "0"), ["parameter 'sample'"]),
    # --- PF-Pascal
    Case("PF-Pascal class 0", lambda w: _pf_csv(w, 2, "0"),
         [r"test_pairs_pf_pascal\.csv, data row 0", "'class'", "1..20", "'0'"]),
    Case("PF-Pascal class 21", lambda w: _pf_csv(w, 2, "21", row=1),
         [r"test_pairs_pf_pascal\.csv, data row 1", "'class'", "'21'"]),
    Case("PF-Pascal coordinate 'abc'", lambda w: _pf_csv(w, 4, "20.25;abc;50.0"),
         [r"data row 0", "'YA'", "abc"]),
    Case("PF-Pascal class 0 filtered out", lambda w: _pf_csv(w, 2, "0") + ["--categories", "cat"],
         [r"data row 0", "'class'"]),
    # --- AP-10K image files
    Case("AP-10K 50 keypoint values", _ap_50, [AP_IMG, re.escape(f"(image of pair '{AP_PAIR}')"),
                                                "'keypoints'", "51 numbers", "50 values"]),
    Case("AP-10K visibility 5", lambda w: _ap_image(w, keypoints=[5] * 51), [AP_IMG, r"'keypoints\[2\]'", "0, 1 or 2"]),
    Case("AP-10K width 0", lambda w: _ap_image(w, width=0), [AP_IMG, "'width'", "positive integer"]),
    Case("AP-10K bbox of zero width", lambda w: _ap_image(w, bbox=[10, 10, 0, 250]), [AP_IMG, "'bbox'"]),
    Case("AP-10K path out of ImageAnnotation",
         lambda w: (w.edit(w.roots["ap10k"] / "PairAnnotation" / "test" / f"{AP_PAIR}.json",
                           src_json_path="data/ap-10k/ImageAnnotation/../../secret.json"), w.evaluate("ap10k"))[1],
         [re.escape(f"{AP_PAIR}.json"), "'src_json_path'", "ImageAnnotation"]),
    # --- models not found: one line, not a traceback
    Case("models not found", lambda w: w.evaluate("spair", "--sd-model", w.tmp / "no-such-sd", predictions=False),
         ["could not load Stable Diffusion model", "no-such-sd"]),
    # --- import-benchmark and review-quality
    Case("import: image_width 0",
         lambda w: (w.edit(w.roots["spair"] / "ImageAnnotation" / "cat" / "2008_000002.json", image_width=0),
                    ["import-benchmark", "--format", "spair", "--root", str(w.roots["spair"]), "--name",
                     "bad-files-never", "--no-progress"])[1],
         [r"ImageAnnotation/cat/2008_000002\.json", r"\(image 'cat/2008_000002'\)", "'image_width'", "got 0"]),
    Case("import: negative id in an image file",
         lambda w: (w.edit(w.roots["spair"] / "ImageAnnotation" / "cat" / "2008_000002.json",
                           kps={"-3": [1, 2], "0": [3, 4]}),
                    ["import-benchmark", "--format", "spair", "--root", str(w.roots["spair"]), "--name",
                     "bad-files-never", "--no-progress"])[1],
         [r"2008_000002\.json", r"'kps\[-3\]'", ">= 0"]),
    Case("import: unknown category",
         lambda w: ["import-benchmark", "--format", "ap10k", "--root", str(w.roots["ap10k"]), "--name",
                    "bad-files-never", "--categories", "unicorn"], ["parameter 'categories'", "unicorn"]),
    Case("review-quality: --out a folder",
         lambda w: ["review-quality", "--format", "spair", "--root", str(w.roots["spair"]), "--out", str(w.tmp)],
         ["review-quality: error", "parameter 'out'", "is a folder"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_file_exits_2_naming_file_pair_and_field(world, case, capsys):
    argv = case.build(world)
    keep = {p: p.read_bytes() for p in case.keep(world)}
    rc = main(argv)
    cap = capsys.readouterr()
    errors = [ln for ln in cap.err.splitlines() if ": error: " in ln]
    assert rc == 2, cap.out + cap.err
    assert "Traceback" not in cap.err + cap.out, cap.err
    assert len(errors) == 1 and errors[0].startswith(f"{argv[0]}: error: "), cap.err
    for pattern in case.expect:
        assert re.search(pattern, errors[0]), f"{pattern!r} not in {errors[0]!r}"
    assert not world.out.exists() and not world.out.with_suffix(".md").exists()
    assert {p: p.read_bytes() for p in keep} == keep
    assert not (world.tmp / "unpickled-marker").exists()  # nothing is ever unpickled
    import fiftyone as fo

    assert not fo.dataset_exists("bad-files-never") and not [n for n in fo.list_datasets() if ".importing-" in n]


def test_the_table_covers_the_issue():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


def test_verbose_shows_the_traceback(world, capsys):
    assert main(world.evaluate("spair", "--out", world.tmp, "--verbose")) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "parameter 'out'" in err.splitlines()[-1]


# --------------------------------------------------------------------------- warnings, booleans
def test_a_box_far_outside_the_image_is_a_warning_in_the_result(world, capsys):
    """T from a box 10x the image made PCK 100 silently: now the result says so."""
    far = [[x + 900, y] for x, y in json.loads(world.spair_pair().read_text())["trg_kps"]]
    rows = bf.spair_predictions("gt")
    rows[SPAIR_PAIR] = far
    bf.write_predictions(world.preds, rows)
    world.edit(world.spair_pair(), trg_bndbox=[-5000, -5000, 5000, 5000])
    assert main(world.evaluate()) == 0
    res = json.loads(world.out.read_text())
    assert any(SPAIR_PAIR in w and "'trg_bndbox'" in w and "outside" in w for w in res["warnings"]), res["warnings"]
    assert f"warning: {res['warnings'][0]}" in capsys.readouterr().err
    # an ordinary box is no warning
    world.edit(world.spair_pair(), trg_bndbox=[60, 50, 160, 130])
    assert main(world.evaluate()) == 0 and json.loads(world.out.read_text())["warnings"] == []


def test_shards_true_is_not_one_shard():
    from fiftyone_sdcorr.core.common.params import ParameterError
    from fiftyone_sdcorr.plugin.operators_features import ComputeFusedFeatures

    op = ComputeFusedFeatures()
    for bad in (True, False, 0, 2.5, "2"):
        with pytest.raises(ParameterError, match="shards"):
            op(None, shards=bad, delegate=True)
    with pytest.raises(ParameterError, match="delegate"):
        op(None, shards=2, delegate=1)


# --------------------------------------------------------------------------- saved work
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fiftyone_sdcorr.core.features.tiny import tiny_models

    return tiny_models(tmp_path_factory.mktemp("tiny-models"))


def _model_args(world, tiny, *extra):
    return world.evaluate("spair", "--sd-model", tiny[0], "--dino-model", tiny[1], "--device", "cpu",
                          "--sd-size", 128, "--sd-mode", "whole", "--dino-size", 56, "--pca-dim", 8, *extra,
                          predictions=False)


def _cli(argv, file_size_limit=None):
    """The real command in a subprocess; with ``file_size_limit`` every write past that
    many bytes fails as on a full disk (``EFBIG``: RLIMIT_FSIZE, SIGXFSZ ignored)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    proc = subprocess.run([sys.executable, "-m", "fiftyone_sdcorr", *map(str, argv)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                          preexec_fn=limit if file_size_limit else None)
    return proc.returncode, proc.stdout, proc.stderr


def test_resumed_predictions_survive_a_full_disk_and_never_hold_a_pair_twice(world, tiny):
    saved = world.tmp / "saved.jsonl"
    args = _model_args(world, tiny, "--save-predictions", saved)
    rc, out, err = _cli(args)
    assert rc == 0, err
    real = saved.read_text().splitlines()
    assert len(real) == 4
    # 3,000 saved lines of other pairs, a recomputed pair (its point count changed), a
    # missing pair and the half-written last line of a killed run
    first = json.loads(real[0])
    first["trg_kps"] = first["trg_kps"][:2]
    other = [json.dumps({"pair": f"{i:06d}-other:cat", "trg_kps": [[i, i + 0.5]] * 5}) for i in range(3000)]
    saved.write_text("\n".join(other + [json.dumps(first)] + real[1:3]) + "\n" + real[3][:25])
    before, settings = saved.read_bytes(), saved.with_name("saved.jsonl.config.json").read_bytes()
    # the disk fills up while the resumed file is cleaned: nothing saved is lost
    rc, out, err = _cli(args, file_size_limit=len(before) // 2)
    assert rc == 2 and "Traceback" not in err, err
    assert re.search(r"evaluate-pairs: error: .*File too large.*saved\.jsonl", err), err
    assert saved.read_bytes() == before and saved.with_name("saved.jsonl.config.json").read_bytes() == settings
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".tmp-")]
    # resumed with room: the other pairs' lines kept in order, each pair once, scoreable
    rc, out, err = _cli(args)
    assert rc == 0, err
    lines = saved.read_text().splitlines()
    assert lines[:3000] == other and len(lines) == 3004
    preds = read_predictions(saved)  # no "appears twice"
    assert len(preds[first["pair"]]) == 4
    # the disk fills up while a new line is appended: the file is cut back to whole lines
    saved.write_text("\n".join(lines[:-1]) + "\n")
    before = saved.read_bytes()
    rc, out, err = _cli(args, file_size_limit=len(before) + 10)
    assert rc == 2 and "File too large" in err and "Traceback" not in err, err
    assert saved.read_bytes() == before


def test_feature_cache_follows_the_image_content_not_its_name(world, tiny):
    cache = world.tmp / "cache"
    args = _model_args(world, tiny, "--feature-cache", cache)
    rc, out, err = _cli(args)
    assert rc == 0, err
    files = {p: p.read_bytes() for p in cache.rglob("*.safetensors")}
    assert len(files) == 5  # five images
    # an image replaced under the same name is another image: its maps are computed again
    img = world.roots["spair"] / "JPEGImages" / "cat" / "2008_000002.jpg"
    bf.write_image(img, 300, 260, seed=999)
    rc, out, err = _cli(args)
    assert rc == 0, err
    after = {p: p.read_bytes() for p in cache.rglob("*.safetensors")}
    assert len(after) == 6 and all(after[p] == b for p, b in files.items())
    # a damaged cache file (here a pickle's first bytes) is recomputed, not a crash, not unpickled
    from fiftyone_sdcorr.core.features.store import read_header

    victim = next(p for p in after if p not in files)
    victim.write_bytes(b"\x80\x04not a safetensors file")
    rc, out, err = _cli(args)
    assert rc == 0, err
    assert read_header(victim)[1] and len(list(cache.rglob("*.safetensors"))) == 6


def test_overwrite_replaces_a_dataset_only_with_a_complete_import(world, capsys, monkeypatch):
    import fiftyone as fo

    name = f"bad-files-overwrite-{os.getpid()}"
    argv = ["import-benchmark", "--format", "spair", "--root", str(world.roots["spair"]), "--name", name,
            "--no-progress"]
    try:
        assert main(argv) == 0
        ds = fo.load_dataset(name)
        ids, n = ds.values("id"), len(ds)
        world.edit(world.roots["spair"] / "ImageAnnotation" / "cat" / "2008_000002.json", image_width=0)
        assert main(argv + ["--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "'image_width'" in err and "2008_000002.json" in err and "Traceback" not in err
        ds = fo.load_dataset(name)
        assert len(ds) == n and ds.values("id") == ids and ds.persistent
        assert not [d for d in fo.list_datasets() if ".importing-" in d]
        world.edit(world.roots["spair"] / "ImageAnnotation" / "cat" / "2008_000002.json", image_width=300)
        # a failure midway through a valid import (the disk fills up): the old dataset stays
        import fiftyone_sdcorr.dataset.benchmarks as fb

        def full(*a, **k):
            raise OSError(28, "No space left on device")

        with monkeypatch.context() as m:
            m.setattr(fb, "_add_pairs", full)
            assert main(argv + ["--overwrite"]) == 2
        assert "No space left on device" in capsys.readouterr().err
        assert fo.load_dataset(name).values("id") == ids
        assert not [d for d in fo.list_datasets() if ".importing-" in d]
        assert main(argv + ["--overwrite", "--categories", "dog"]) == 0
        ds = fo.load_dataset(name)
        assert ds.distinct("category") == ["dog"] and ds.persistent
    finally:
        if fo.dataset_exists(name):
            fo.delete_dataset(name)


def test_offline_demo_prints_one_line(tmp_path):
    rc, out, err = _cli(["demo", "--no-app", "--workdir", tmp_path / "w", "--dataset",
                         f"bad-files-demo-{os.getpid()}"])
    assert rc == 2, err
    assert "Traceback" not in err and "Traceback" not in out
    assert re.search(r"^demo: error: could not load .*HF_HUB_OFFLINE", err, re.M), err
