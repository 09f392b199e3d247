"""The benchmark command: ``python -m fiftyone_sdcorr bench --tiny`` end to end.

Runs the real CLI in a subprocess (tiny random models, small recipe, CPU) once per test
module, then checks the printed table and the JSON: keys present, rates positive, the
ratios computed from both sides of the same run, the FLOP counts consistent with the
recipe. Also the report command on that JSON, the bundled architecture configs, the
FLOP counter on the real SD 1.5 / DINOv2-B shapes (meta tensors, no compute) and the
CLI's demo dispatch. A CUDA variant runs only where a GPU is present.

Needs no FiftyOne: the benchmark imports none.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def _run_cli(args, tmp_path, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fiftyone_sdcorr", *args],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results" / "tiny.json"
    proc = _run_cli(
        ["bench", "--tiny", "--device", "cpu", "--out", str(out), "--models-dir", str(tmp / "models")], tmp
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc, json.loads(out.read_text()), out


def _pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_table_printed(tiny_run):
    proc, data, out = tiny_run
    text = proc.stdout
    for label in ("(a) plain fp32 b1", "(b) optimised", "speedup (b)/(a)", "agreement (b) vs (a)",
                  "store", "matching (cpu", "FLOPs/image", "matmul ceiling", "not a speed claim"):
        assert label in text, f"{label!r} missing from the table:\n{text}"
    assert f"wrote {out}" in text


def test_json_environment_and_settings(tiny_run):
    _, d, _ = tiny_run
    assert d["schema"] == "sdcorr-bench/1"
    assert d["mode"] == "tiny" and d["speed_claim"] is False
    env = d["environment"]
    for key in ("device", "device_name", "torch", "cuda", "diffusers", "transformers", "python", "cpu_count"):
        assert key in env
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    s = d["settings"]
    assert s["recipe"]["sd_mode"] == "tiled" and s["recipe"]["sd_size"] == 192
    assert s["batches"] == [1, 2] and s["dtype"] == "bfloat16"
    assert s["plain_images"] >= 2 and s["agreement_images"] >= 2


def test_flops_consistent_with_recipe(tiny_run):
    _, d, _ = tiny_run
    f = d["flops"]
    assert f["tiles_per_image"] == 4 and f["tile"] == 128  # 2 x 2 overlapping tiles
    for k in ("vae_encoder_per_tile", "unet_to_last_tap_per_tile", "unet_full_per_tile", "dino_per_image"):
        assert _pos(f[k]), k
    assert f["unet_to_last_tap_per_tile"] < f["unet_full_per_tile"]  # the early stop saves work
    assert f["optimised_per_image"] == 4 * (f["vae_encoder_per_tile"] + f["unet_to_last_tap_per_tile"]) + f["dino_per_image"]
    assert f["plain_per_image"] == 4 * (f["vae_encoder_per_tile"] + f["unet_full_per_tile"]) + f["dino_per_image"]
    for dt in ("bf16", "fp32"):
        assert _pos(d["matmul"][dt]["tflops"])


def test_extraction_figures(tiny_run):
    _, d, _ = tiny_run
    ex = d["extraction"]
    p = ex["plain"]
    assert p["dtype"] == "float32" and p["batch"] == 1 and p["tiles_per_call"] == 1 and p["full_forward"] is True
    assert "AttnProcessor" in p["attention"]["sd"]
    assert _pos(p["images_per_s"]) and _pos(p["seconds"])
    assert p["images_per_s"] == pytest.approx(p["images"] / p["seconds"])
    runs = ex["optimised"]
    assert [r["batch"] for r in runs] == [1, 2]
    for r in runs:
        assert "error" not in r
        assert r["full_forward"] is False and r["dtype"] == "bfloat16"
        assert r["tiles_per_call"] == 4 * r["batch"]
        assert _pos(r["images_per_s"]) and r["images"] % r["batch"] == 0
        assert r["achieved_tflops"] == pytest.approx(r["images_per_s"] * r["flops_per_image"] / 1e12)
        assert set(r["stages_one_batch_s"]) == {"preprocess", "sd", "dino", "to_host"}
        assert all(v >= 0 for v in r["stages_one_batch_s"].values())
        st = r["stages_one_batch_s"]
        assert r["models_only_images_per_s"] == pytest.approx(r["batch"] / (st["sd"] + st["dino"]))
        assert r["peak_mem_bytes"] is None  # CPU: no per-path peak, only process RSS
    best = next(r for r in runs if r["batch"] == ex["chosen_batch"])
    # the ratio is computed from both sides of this run
    assert ex["speedup"] == pytest.approx(best["images_per_s"] / p["images_per_s"])
    assert best["images_per_s"] == max(r["images_per_s"] for r in runs)


def test_agreement_bf16_vs_fp32(tiny_run):
    _, d, _ = tiny_run
    ag = d["extraction"]["agreement"]
    assert ag["images"] >= 2 and ag["pairs"] >= 2 and ag["nn_points"] > 0 and ag["tokens"] > 0
    # bf16 against fp32 on the same images: close, but not bit-identical
    assert 0.95 < ag["cosine_mean"] <= 1.0 + 1e-6
    assert ag["cosine_min"] <= ag["cosine_p01"] <= ag["cosine_mean"]
    assert 50.0 <= ag["nn_equal_pct"] <= 100.0
    assert set(ag["raw_cosine_mean"]) == {"sd_s5", "sd_s4", "sd_s3", "dino"}
    assert all(0.9 < v <= 1.0 + 1e-6 for v in ag["raw_cosine_mean"].values())


def test_store_and_matching(tiny_run):
    _, d, _ = tiny_run
    s = d["store"]
    c, (gh, gw) = s["channels"], s["grid"]
    assert (gh, gw) == (8, 8)  # dino_size 112 / patch 14
    # fp16 payload plus a small header
    assert c * gh * gw * 2 <= s["bytes_per_sample"] <= c * gh * gw * 2 + 16384
    for k in ("write_samples_per_s", "read_samples_per_s", "read_mb_per_s"):
        assert _pos(s[k]), k
    m = d["matching"]
    assert m["device"] == "cpu" and m["keypoints"] == 20 and m["targets"] == 8
    for k in ("vectorised", "loop", "propagation", "from_store", "batched_prenormalised"):
        assert _pos(m[k]["targets_per_s"]), k
        assert m[k]["keypoints_per_s"] == pytest.approx(m[k]["targets_per_s"] * m["keypoints"])
    assert m["speedup"] == pytest.approx(m["vectorised"]["targets_per_s"] / m["loop"]["targets_per_s"])
    # vectorised and loop find the same nearest neighbours
    assert m["nn_equal_pct"] == 100.0
    assert m["batched_prenormalised"]["nn_equal_pct_vs_loop"] == 100.0
    # the package API, batched: Propagator.predict_many over the targets, same answers as one by one
    pb = m["propagation_batched"]
    assert pb["keypoints"] == 20 and pb["batch"] == 64 and pb["targets"] == 8 and pb["failed"] == 0
    assert _pos(pb["targets_per_s"]) and _pos(pb["per_target_targets_per_s"]) and "predict_many" in pb["call"]
    assert pb["equal_to_per_target_pct"] == 100.0


def test_targets_not_claimed_in_tiny_mode(tiny_run):
    _, d, _ = tiny_run
    t = d["targets"]
    assert set(t) == {"end_to_end_images_per_s", "end_to_end_peak_mem_bytes", "end_to_end_speedup_vs_plain",
                      "images_per_s", "speedup_vs_plain", "peak_mem_bytes",
                      "bf16_nn_equal_pct", "matching_speedup_cpu", "propagation_targets_per_s"}
    assert not any(v["applicable"] for v in t.values())
    # issue 10's headline reads the end-to-end stage (the compiled one only when it is faster)
    assert t["end_to_end_images_per_s"]["value"] == d["end_to_end"]["images_per_s"]
    assert t["end_to_end_speedup_vs_plain"]["value"] == d["end_to_end"]["speedup_vs_plain"]
    assert t["end_to_end_images_per_s"]["note"].startswith("end_to_end;")
    # the propagation target reads the batched package API (issue 10: >= 500 targets/s)
    prop = t["propagation_targets_per_s"]
    assert prop["threshold"] == 500.0 and prop["value"] == d["matching"]["propagation_batched"]["targets_per_s"]


def test_end_to_end_stage_runs_the_public_api(tiny_run):
    """The headline stage: compute_fused_features on JPEG files through FiftyOne."""
    _, d, _ = tiny_run
    e2e = d["end_to_end"]
    assert "error" not in e2e and "skipped" not in e2e, e2e
    assert e2e["computed"] == e2e["images"] and e2e["failed"] == 0
    assert e2e["images_per_s"] > 0 and e2e["speedup_vs_plain"] > 0 and e2e["store_bytes_per_sample"] > 0
    # the compact store options: bytes and nearest-neighbour agreement per dtype
    compact = d["store"]["compact"]
    assert set(compact) == {"float16", "bfloat16", "float32", "int8"}
    assert compact["int8"]["bytes_per_sample"] < 0.6 * compact["float16"]["bytes_per_sample"]  # + scales, header
    assert compact["float32"]["nn_equal_to_float32"] == 1.0


def test_pipeline_stage_without_a_database(tiny_run):
    """compute_fused_features' own pipeline, timed without FiftyOne (what a GPU machine
    without MongoDB can measure), and the headline target falls back to it only there."""
    from fiftyone_sdcorr.bench.runs import evaluate_targets

    _, d, _ = tiny_run
    pipe = d["pipeline"]
    assert "error" not in pipe, pipe
    assert pipe["computed"] == pipe["images"] and pipe["images_per_s"] > 0 and pipe["speedup_vs_plain"] > 0
    assert evaluate_targets(d)["end_to_end_images_per_s"]["value"] == d["end_to_end"]["images_per_s"]
    no_db = dict(d, end_to_end={"skipped": "FiftyOne unavailable: No module named 'fiftyone'"})
    t = evaluate_targets(no_db)["end_to_end_images_per_s"]
    assert t["value"] == pipe["images_per_s"] and t["note"].startswith("pipeline; ") and "without database" in t["note"]


def test_bench_runs_where_fiftyone_cannot_be_imported(tmp_path):
    """The lent GPU machines have no FiftyOne (nor MongoDB): the bench still runs, says the
    FiftyOne stage was skipped, times the pipeline without a database and measures batched
    propagation with the core product."""
    shim = tmp_path / "shim" / "fiftyone"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no fiftyone on this machine')\n")
    env = _env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(shim.parent), env.get("PYTHONPATH", "")])
    out = tmp_path / "nofo.json"
    proc = subprocess.run([sys.executable, "-m", "fiftyone_sdcorr", "bench", "--tiny", "--device", "cpu", "--batch", "2",
                           "--quiet", "--out", str(out), "--models-dir", str(tmp_path / "models")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    d = json.loads(out.read_text())
    assert "no fiftyone" in d["end_to_end"]["skipped"]
    assert d["pipeline"]["computed"] == d["pipeline"]["images"] and _pos(d["pipeline"]["images_per_s"])
    pb = d["matching"]["propagation_batched"]
    assert _pos(pb["targets_per_s"]) and "match_prepared_many" in pb["call"] and "could not load" in pb["note"]
    assert d["targets"]["end_to_end_images_per_s"]["value"] == d["pipeline"]["images_per_s"]


def test_report_from_json(tiny_run, tmp_path):
    _, d, out = tiny_run
    # a tiny run is no speed claim: the report says so rather than tabulating it
    proc = _run_cli(["bench-report", str(out.parent), "--md", str(tmp_path / "B.md"), "--png", str(tmp_path / "b.png")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "No benchmark results yet" in (tmp_path / "B.md").read_text()
    # the same file presented as a full run is tabulated and plotted
    full = dict(d, mode="full", speed_claim=True)
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "fake-full.json").write_text(json.dumps(full))
    proc = _run_cli(["bench-report", str(tmp_path / "res"), "--md", str(tmp_path / "B.md"), "--png", str(tmp_path / "b.png")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "B.md").read_text()
    assert "fake-full.json" in md and f"{d['extraction']['speedup']:.3g}x" in md
    # the headline table: end to end through compute_fused_features, and the targets met
    headline = next(line for line in md.splitlines() if "fake-full.json" in line)
    assert f"{d['end_to_end']['images_per_s']:.3g} ({d['end_to_end']['batch']})" in headline
    assert " of 0 |" in headline  # a tiny run claims no target
    png = tmp_path / "b.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bundled_configs_are_the_published_architectures():
    from fiftyone_sdcorr.bench.common import load_config

    u = load_config("sd15_unet")
    assert u["block_out_channels"] == [320, 640, 1280, 1280] and u["cross_attention_dim"] == 768
    assert u["layers_per_block"] == 2 and u["attention_head_dim"] == 8 and u["sample_size"] == 64
    assert u["up_block_types"] == ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    v = load_config("sd15_vae")
    assert v["block_out_channels"] == [128, 256, 512, 512] and v["latent_channels"] == 4
    assert v["scaling_factor"] == pytest.approx(0.18215)
    dn = load_config("dinov2_base")
    assert (dn["hidden_size"], dn["num_hidden_layers"], dn["num_attention_heads"], dn["patch_size"]) == (768, 12, 12, 14)
    assert dn["mlp_ratio"] * dn["hidden_size"] == 3072 and dn["image_size"] == 518


def test_flop_count_full_size_paper_recipe():
    """Real SD 1.5 / DINOv2-B shapes on meta tensors: parameter counts and FLOPs match
    the published architectures and the recipe's cost estimate (no compute, no weights)."""
    from diffusers import UNet2DConditionModel
    from transformers import Dinov2Config, Dinov2Model

    from fiftyone_sdcorr.bench.common import load_config
    from fiftyone_sdcorr.bench.extraction import count_flops
    from fiftyone_sdcorr.core.features.extractor import PRESETS

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(load_config("sd15_unet"))
        dcfg = {k: v for k, v in load_config("dinov2_base").items() if k not in ("architectures", "model_type")}
        dino = Dinov2Model(Dinov2Config(**dcfg))
    assert 855e6 < sum(p.numel() for p in unet.parameters()) < 865e6  # SD 1.5 UNet: 859.5 M
    assert 85e6 < sum(p.numel() for p in dino.parameters()) < 88e6  # DINOv2-B: 86.6 M
    f = count_flops(unet.config, load_config("sd15_vae"), dino, PRESETS["paper"])
    assert f["tiles_per_image"] == 4 and f["tile"] == 512
    assert 1.0e12 < f["vae_encoder_per_tile"] < 1.25e12  # RECIPE: about 1.1 TFLOP
    assert 0.3 * f["unet_full_per_tile"] < f["unet_to_last_tap_per_tile"] < 0.9 * f["unet_full_per_tile"]
    assert 0.95e12 < f["dino_per_image"] < 1.25e12  # RECIPE: about 1.1 TFLOP at 840
    assert 6e12 < f["optimised_per_image"] < 9e12  # RECIPE: roughly 7 TFLOP
    cpu = count_flops(unet.config, load_config("sd15_vae"), dino, PRESETS["cpu"])
    assert cpu["tiles_per_image"] == 1 and cpu["optimised_per_image"] < f["optimised_per_image"] / 3


def test_cli_help_and_demo_dispatch(tmp_path):
    proc = _run_cli(["--help"], tmp_path)
    assert proc.returncode == 0
    for cmd in ("bench", "bench-report", "demo"):
        assert cmd in proc.stdout
    proc = _run_cli(["bench", "--help"], tmp_path)
    assert proc.returncode == 0 and "--tiny" in proc.stdout and "--cpu-preset" in proc.stdout
    from fiftyone_sdcorr.__main__ import main

    import importlib.util

    if importlib.util.find_spec("fiftyone_sdcorr.demo") is None:
        assert main(["demo"]) == 2  # a clear message, not a traceback


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_bench_on_cuda(tmp_path):
    out = tmp_path / "cuda.json"
    proc = _run_cli(["bench", "--tiny", "--device", "cuda", "--batch", "1,2", "--out", str(out),
                     "--models-dir", str(tmp_path / "models")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    d = json.loads(out.read_text())
    assert d["environment"]["device"] == "cuda" and d["environment"]["device_name"]
    for r in d["extraction"]["optimised"]:
        assert r["peak_mem_bytes"] > 0  # torch.cuda.max_memory_allocated
    assert d["extraction"]["plain"]["peak_mem_bytes"] > 0
    assert d["matching_device"]["device"].startswith("cuda")
    assert d["extraction"]["agreement"]["nn_equal_pct"] >= 50.0


def test_generated_block_is_replaced_idempotently(tmp_path):
    """bench-report --readme docs/performance.md: the generated block of a document."""
    from fiftyone_sdcorr.bench.report import GENERATED_BLOCK_END, GENERATED_BLOCK_START, update_generated_block

    doc = tmp_path / "performance.md"
    doc.write_text("# x\n\n## Benchmarks\n\nBENCH_TABLE\n\n## Next\n")
    assert update_generated_block(doc, "| a |\n|---|\n| 1 |\n", str(tmp_path / "results" / "b.png"))
    first = doc.read_text()
    assert "BENCH_TABLE" not in first and "| 1 |" in first and "![benchmark plot](results/b.png)" in first
    assert first.index(GENERATED_BLOCK_END) < first.index("\n\n## Next")
    assert update_generated_block(doc, "| a |\n|---|\n| 2 |\n", None)
    second = doc.read_text()
    assert "| 2 |" in second and "| 1 |" not in second and second.count(GENERATED_BLOCK_START) == 1
    assert second.endswith("## Next\n")
    plain = tmp_path / "OTHER.md"
    plain.write_text("no markers\n")
    assert not update_generated_block(plain, "| a |\n", None)


def test_bench_modules_by_stage():
    """The bench is split by stage; every function is at most 60 lines; the old module
    path (``fiftyone_sdcorr.bench.benchmark``, which __main__ imports) still names the
    command's description, its arguments and its main functions."""
    import ast

    from fiftyone_sdcorr.bench import benchmark, cli, report, runs

    long = []
    for path in sorted((REPO / "fiftyone_sdcorr" / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
    assert benchmark.__doc__.startswith("Benchmarks: extraction, matching and feature-store speed")
    assert benchmark.main_bench is cli.main_bench and benchmark.main_report is cli.main_report
    assert benchmark.add_bench_arguments is cli.add_bench_arguments
    assert benchmark.add_report_arguments is cli.add_report_arguments
    assert benchmark.run_bench is runs.run_bench and benchmark.update_generated_block is report.update_generated_block


def test_cpu_preset_run_with_tiny_models(tmp_path):
    """``--cpu-preset``'s run (full-size models in practice; tiny random ones here): both
    recipes costed, the stages of the files in results/, store and matching on the paper
    features."""
    import time
    import types

    from fiftyone_sdcorr.bench.runs import run_cpu_preset, tiny_adapter
    from fiftyone_sdcorr.core.features.tiny import tiny_models

    models = tiny_models(tmp_path / "models")
    args = types.SimpleNamespace(images=1, warmup=0, keypoints=5, targets=2, _t0=time.perf_counter(), tiny=True)
    out = run_cpu_preset(args, *models, quiet=True, adapter=tiny_adapter(args, models))
    recipes = out["cpu_preset"]["recipes"]
    assert set(recipes) == {"paper", "cpu", "dino-diy", "dino-diy-cpu"}  # both methods, both presets
    for r in recipes.values():
        assert set(r["stages_mean_s"]) == {"preprocess", "sd", "dino", "descriptors"} and _pos(r["s_per_image"])
    assert recipes["paper"]["grid"] == 60 and recipes["cpu"]["grid"] < 60
    assert recipes["dino-diy"]["grid"] == 60 and recipes["dino-diy-cpu"]["grid"] < 60
    assert [recipes[k]["method"] for k in recipes] == ["sd-dino", "sd-dino", "dino-diy", "dino-diy"]
    assert recipes["dino-diy"]["stages_mean_s"]["sd"] < 0.01 and recipes["dino-diy"]["flops"] is None  # no SD run
    ratio = out["cpu_preset"]["ratio_to_paper"]
    assert ratio["paper"] == 1.0 and all(_pos(v) for v in ratio.values())
    assert out["matching"]["keypoints"] == 5 and out["store"]["samples"] == 2
    assert set(out["targets"]) == {"matching_speedup_cpu"}


def test_dense_stage(tiny_run):
    """The dense stage (core/matching/dense.py): target cells and pixels matched per second at each
    grid resolution, with the working memory; on the CPU in every run."""
    _, d, _ = tiny_run
    dn = d["dense"]
    assert dn["device"] == "cpu" and dn["pairs"] == 1 and dn["cycle"] is True
    assert set(dn["resolutions"]) == {"60", "120"}
    for key, e in dn["resolutions"].items():
        assert e["resolution"] == int(key) and 0 < e["target_cells"] <= int(key) ** 2
        assert _pos(e["cells_per_s"]) and _pos(e["pixels_per_s"]) and _pos(e["match_s_per_pair"])
        assert e["working_bytes"] >= 2 * int(key) ** 2 * dn["channels"] * 4 and e["peak_bytes"] is None


def test_dense_stage_direct():
    """bench_dense on two small fused maps: every target cell of the image is matched."""
    from fiftyone_sdcorr.bench.dense import bench_dense
    from fiftyone_sdcorr.core.features.fusion import FusedFeatures
    from fiftyone_sdcorr.core.common.geometry import Letterbox

    g = torch.Generator().manual_seed(0)
    fused = [FusedFeatures(torch.randn(16, 8, 8, generator=g), Letterbox.fit(112, 112, 112), 14, 8) for _ in range(2)]
    out = bench_dense(fused, "cpu", resolutions=(16,), pairs=2)
    e = out["resolutions"]["16"]
    assert out["pairs"] == 2 and e["target_cells"] == 2 * 16 * 16 and e["pixels"] == 2 * 112 * 112
