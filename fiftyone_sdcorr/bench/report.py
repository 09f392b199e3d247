"""Reporting of benchmark results: the plain-text table printed after a run, the markdown
tables and the plot of ``bench-report``, and the generated block of docs/performance.md.

No FiftyOne import.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from fiftyone_sdcorr.bench.common import SCHEMA, TARGETS, fmt_bytes, fmt_flops, fmt_num as _f

#: The lines that enclose the generated block of a document (docs/performance.md).
GENERATED_BLOCK_START = "<!-- bench-report:start -->"
GENERATED_BLOCK_END = "<!-- bench-report:end -->"


# ====================================================================== the table printed after a run
def _extraction_rows(result: dict) -> list:
    rows = []
    ex, fl = result["extraction"], result["flops"]
    p = ex["plain"]
    rows.append(("FLOPs/image plain | optimised", f"{fmt_flops(fl['plain_per_image'])} | {fmt_flops(fl['optimised_per_image'])}"))
    rows.append(("  per tile: VAE enc | UNet to tap | UNet full", f"{fmt_flops(fl['vae_encoder_per_tile'])} | {fmt_flops(fl['unet_to_last_tap_per_tile'])} | {fmt_flops(fl['unet_full_per_tile'])}  (x{fl['tiles_per_image']} tiles of {fl['tile']} px)"))
    rows.append(("  DINOv2 per image", fmt_flops(fl["dino_per_image"])))
    mm = result["matmul"]
    rows.append(("matmul ceiling", ", ".join(f"{k} {v['tflops']:.3g} TFLOP/s" for k, v in mm.items())))
    rows.append(("(a) plain fp32 b1", f"{_f(p['images_per_s'])} img/s, peak {fmt_bytes(p['peak_mem_bytes'])}, {_f(p['achieved_tflops'], '.3g')} TFLOP/s ({_f((p['fraction_of_matmul'] or 0) * 100, '.1f')}% of fp32 matmul)"))
    for r in ex["optimised"]:
        if "error" in r:
            rows.append((f"(b) optimised b{r['batch']}", r["error"][:60]))
            continue
        st = r["stages_one_batch_s"]
        rows.append((f"(b) optimised {r['dtype']} b{r['batch']}", f"{_f(r['images_per_s'])} img/s, peak {fmt_bytes(r['peak_mem_bytes'])}, {_f(r['achieved_tflops'], '.3g')} TFLOP/s ({_f((r['fraction_of_matmul'] or 0) * 100, '.1f')}% of matmul)"))
        rows.append(("    one batch: prep | SD | DINO | to host", f"{st['preprocess']:.3g} s | {st['sd']:.3g} s | {st['dino']:.3g} s | {st.get('to_host', 0):.3g} s  (models alone {_f(r.get('models_only_images_per_s'))} img/s)"))
    rows.append(("speedup (b)/(a)", f"{_f(ex['speedup'], '.3g')}x at batch {ex['chosen_batch']}"))
    rows += _end_to_end_rows(result)
    ag = ex["agreement"]
    rows.append(("agreement (b) vs (a)", f"cosine mean {ag['cosine_mean']:.4f} (p01 {ag['cosine_p01']:.4f}), NN equal {_f(ag['nn_equal_pct'], '.2f')}% of {ag['nn_points']} points"))
    return rows


def _end_to_end_rows(result: dict) -> list:
    rows = []
    for key, name in (("end_to_end", "end to end: compute_fused_features"),
                      ("end_to_end_compiled", "end to end, compiled"),
                      ("pipeline", "its pipeline, no database"),
                      ("pipeline_compiled", "its pipeline, no database, compiled")):
        e2e = result.get(key) or {}
        if "images_per_s" in e2e:
            rows.append((name, f"{_f(e2e['images_per_s'])} img/s ({_f(e2e.get('speedup_vs_plain'), '.3g')}x plain), default batch {e2e['batch']}, peak {fmt_bytes(e2e['peak_mem_bytes'])}, {e2e['images']} JPEG files, warm-up {_f(e2e.get('warmup_seconds'), '.3g')} s"))
        elif e2e:
            rows.append((name, str(e2e.get("skipped") or e2e.get("error"))[:90]))
    return rows


def _cpu_preset_rows(cpu_preset: dict) -> list:
    rows = []
    for name, r in cpu_preset["recipes"].items():
        st = r["stages_mean_s"]
        flops = (f", {r['flops']['optimised_per_image'] / 1e12:.2f} TFLOP, {r['achieved_gflops']:.0f} GFLOP/s"
                 if r.get("flops") else "")
        ratio = cpu_preset.get("ratio_to_paper", {}).get(name)
        rows.append((f"{r.get('method', 'sd-dino')} {name!r} (grid {r['grid']})", f"{r['s_per_image']:.2f} s/image wall ({r['images_per_hour']:.0f}/h)" + (f", {ratio:.2f}x the paper recipe's time" if ratio is not None else "") + flops))
        if "cpu_s_per_image" in r:
            rows.append(("    process CPU time", f"{r['cpu_s_per_image']:.1f} CPU-s/image over {r['torch_threads']} threads (idle-machine estimate {r['est_idle_s_per_image']:.1f} s/image)"))
        rows.append(("    prep | SD | DINO | descriptors", f"{st['preprocess']:.2f} s | {st['sd']:.2f} s | {st['dino']:.2f} s | {st.get('descriptors', 0.0):.2f} s"))
    rows.append(("cpu preset speedup vs paper", f"{cpu_preset['speedup_cpu_vs_paper']:.2f}x"))
    return rows


def _matching_rows(key: str, m: dict) -> list:
    rows = [(f"{key} ({m['device']}, {m['keypoints']} kp)", f"vectorised {_f(m['vectorised']['targets_per_s'])} targets/s ({_f(m['vectorised']['keypoints_per_s'])} kp/s), loop {_f(m['loop']['targets_per_s'])} targets/s: {_f(m['speedup'], '.3g')}x; NN equal {m['nn_equal_pct']:.1f}%")]
    kr = m.get("loop_keypoint_rows_only")
    if kr:
        rows.append(("    vs the loop over keypoint rows only", f"{_f(kr['targets_per_s'])} targets/s: vectorised is {_f(kr['speedup_of_vectorised'], '.3g')}x"))
    bp = m.get("batched_prenormalised")
    if bp:
        rows.append(("    headroom: batched, pre-normalised", f"{_f(bp['targets_per_s'])} targets/s: {_f(bp['speedup_vs_loop'], '.3g')}x the loop"))
    rows.append(("    with soft-argmax + cycle", f"{_f(m['propagation']['targets_per_s'])} targets/s" + (f"; from store {_f(m['from_store']['targets_per_s'])} targets/s" if "from_store" in m else "")))
    pb = m.get("propagation_batched")
    if pb:
        how = ("Propagator.predict_many" if "per_target_targets_per_s" in pb else
               "core match_prepared_many: no FiftyOne here")
        one = (f"; one by one {_f(pb['per_target_targets_per_s'])} targets/s: "
               f"{_f(pb['speedup_vs_per_target'], '.3g')}x" if "per_target_targets_per_s" in pb else "")
        rows.append((f"    propagation, batches of {pb['batch']}", f"{_f(pb['targets_per_s'])} targets/s ({how}){one}"))
    return rows


def _target_rows(targets: dict) -> list:
    rows = []
    for name, t in targets.items():
        state = "n/a" if t["met"] is None else ("MET" if t["met"] else "not met")
        if not t["applicable"]:
            state += " (not applicable here)"
        v = t["value"]
        rows.append((f"target {name} {t['op']} {t['threshold']:g}", f"{_f(v, '.4g')}: {state}"))
    return rows


def _dense_rows(dense: dict) -> List[tuple]:
    """One row per grid resolution of the dense stage."""
    rows = []
    for r, e in dense["resolutions"].items():
        mem = fmt_bytes(e["peak_bytes"]) if e.get("peak_bytes") else f"{fmt_bytes(e['working_bytes'])} by design"
        rows.append((f"dense ({dense['device']}, grid {r})",
                     f"{_f(e['cells_per_s'], '.4g')} cells/s, {_f(e['pixels_per_s'], '.4g')} px/s, "
                     f"{_f(e['match_s_per_pair'], '.3g')} s/pair, {mem}; per-pixel loop "
                     f"{_f(e.get('loop_cells_per_s'), '.4g')} cells/s: {_f(e.get('speedup_vs_loop'), '.3g')}x"))
    return rows


def format_table(result: dict) -> str:
    """A plain-text table of the headline figures of one result."""
    env = result["environment"]
    rows = [("device", env["device_name"]),
            ("mode", result["mode"] + ("" if result.get("speed_claim") else " (not a speed claim)")),
            ("torch / CUDA", f"{env['torch']} / {env['cuda']}")]
    if "extraction" in result:
        rows += _extraction_rows(result)
    if "cpu_preset" in result:
        rows += _cpu_preset_rows(result["cpu_preset"])
    if "store" in result:
        s = result["store"]
        rows.append(("store", f"{fmt_bytes(s['bytes_per_sample'])}/sample ({s['channels']}x{s['grid'][0]}x{s['grid'][1]} fp16), write {_f(s['write_samples_per_s'], '.4g')}/s, read {_f(s['read_samples_per_s'], '.4g')}/s ({_f(s['read_mb_per_s'], '.4g')} MB/s)"))
    for key in ("matching", "matching_device"):
        if key in result:
            rows += _matching_rows(key, result[key])
    for key in ("dense", "dense_device"):
        if key in result and "resolutions" in result[key]:
            rows += _dense_rows(result[key])
    if "targets" in result:
        rows += _target_rows(result["targets"])
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


# ====================================================================== bench-report: markdown
def load_results(paths: Sequence) -> List[dict]:
    out = []
    for p in paths:
        p = Path(p)
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        for f in files:
            try:
                d = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if d.get("schema") == SCHEMA:
                d["_file"] = f.name
                out.append(d)
    return out


def _run_label(r: dict) -> str:
    s = r.get("settings", {})
    extra = [s["dtype"]] if s.get("dtype") else []
    if s.get("compile"):
        extra.append("torch.compile")
    if s.get("preset", "paper") != "paper":
        extra.append(f"preset {s['preset']}")
    return r["environment"]["device_name"] + (f" ({', '.join(extra)})" if extra else "")


def _headline_table(full: List[dict]) -> List[str]:
    """Issue 10's headline: the public API end to end, and the targets met."""
    lines = [
        "| device | date | end to end img/s (default batch) | compiled (warm-up s) | x plain | peak mem | propagation targets/s | targets met | file |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in full:
        e2e, comp = r.get("end_to_end") or {}, r.get("end_to_end_compiled") or {}
        prop = (r.get("matching_device") or r.get("matching") or {}).get("propagation_batched") or {}
        t = [v for v in (r.get("targets") or {}).values() if v.get("applicable")]
        lines.append(
            f"| {_run_label(r)} | {r['created_utc'][:10]} | {_f(e2e.get('images_per_s'), '.3g')} ({e2e.get('batch')}) | "
            f"{_f(comp.get('images_per_s'), '.3g')} ({_f(comp.get('warmup_seconds'), '.3g')}) | "
            f"{_f(max(e2e.get('speedup_vs_plain') or 0, comp.get('speedup_vs_plain') or 0) or None, '.3g')}x | "
            f"{fmt_bytes(e2e.get('peak_mem_bytes'))} | {_f(prop.get('targets_per_s'), '.3g')} | "
            f"{sum(bool(v['met']) for v in t)} of {len(t)} | `{r['_file']}` |"
        )
    return lines


def _extraction_table(full: List[dict]) -> List[str]:
    lines = [
        "| device | date | plain fp32 img/s | optimised img/s (batch) | speedup | peak mem | TFLOP/s (% of matmul) | bf16 NN equal | matching vs loop (CPU) | file |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in full:
        ex = r["extraction"]
        best = next((o for o in ex["optimised"] if o.get("batch") == ex["chosen_batch"]), {})
        lines.append(
            f"| {_run_label(r)} | {r['created_utc'][:10]} | {_f(ex['plain']['images_per_s'], '.3g')} | "
            f"{_f(best.get('images_per_s'), '.3g')} ({best.get('batch')}) | {_f(ex['speedup'], '.3g')}x | "
            f"{fmt_bytes(best.get('peak_mem_bytes'))} | {_f(best.get('achieved_tflops'), '.3g')} "
            f"({_f((best.get('fraction_of_matmul') or 0) * 100, '.0f')}%) | {_f(ex['agreement']['nn_equal_pct'], '.1f')}% | "
            f"{_f(r['matching']['speedup'], '.3g')}x | `{r['_file']}` |"
        )
    return lines


def _cpu_table(cpu: List[dict]) -> List[str]:
    lines = [
        "| CPU | date | method | recipe | s/image (wall) | x paper recipe | CPU-s/image (threads) | images/hour | "
        "TFLOP/image | token grid | load avg (1 min) | file |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in cpu:
        la = r["environment"].get("load_average_start") or [None]
        for name, rec in r["cpu_preset"]["recipes"].items():
            cpu_s = f"{rec['cpu_s_per_image']:.1f} ({rec['torch_threads']})" if "cpu_s_per_image" in rec else "n/a"
            tflop = f"{rec['flops']['optimised_per_image'] / 1e12:.2f}" if rec.get("flops") else "n/a"
            ratio = (r["cpu_preset"].get("ratio_to_paper") or {}).get(name)
            lines.append(
                f"| {r['environment']['device_name']} | {r['created_utc'][:10]} | {rec.get('method', 'sd-dino')} | "
                f"{rec.get('preset', name)} | {rec['s_per_image']:.1f} | {_f(ratio, '.2f')} | "
                f"{cpu_s} | {rec['images_per_hour']:.0f} | {tflop} | "
                f"{rec['grid']}x{rec['grid']} | {_f(la[0], '.1f')} | `{r['_file']}` |"
            )
    return lines


def _matching_table(match: List[dict]) -> List[str]:
    lines = [
        "| matching on | date | keypoints | vectorised targets/s | with soft-argmax + cycle | reference per-token loop targets/s | ratio | ratio vs a loop over keypoint rows only | NN equal | store MB/sample | file |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in match:
        m = r["matching"]
        kr = m.get("loop_keypoint_rows_only") or {}
        lines.append(
            f"| {r['environment']['device_name']} | {r['created_utc'][:10]} | {m['keypoints']} | "
            f"{_f(m['vectorised']['targets_per_s'], '.3g')} | {_f(m['propagation']['targets_per_s'], '.3g')} | "
            f"{_f(m['loop']['targets_per_s'], '.3g')} | {_f(m['speedup'], '.3g')}x | "
            f"{_f(kr.get('speedup_of_vectorised'), '.3g')}x | {m['nn_equal_pct']:.1f}% | "
            f"{r['store']['bytes_per_sample'] / 1e6:.1f} | `{r['_file']}` |"
        )
    return lines


def _dense_table(results: List[dict]) -> List[str]:
    lines = [
        "| dense matching on | date | grid | target cells/s | target pixels/s | s per pair | memory | per-pixel loop cells/s | ratio | file |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for key in ("dense", "dense_device"):
            d = r.get(key) or {}
            for g, e in (d.get("resolutions") or {}).items():
                mem = fmt_bytes(e["peak_bytes"]) if e.get("peak_bytes") else f"{fmt_bytes(e['working_bytes'])} (by design)"
                lines.append(
                    f"| {r['environment']['device_name']} ({d['device']}) | {r['created_utc'][:10]} | {g} | "
                    f"{_f(e['cells_per_s'], '.4g')} | {_f(e['pixels_per_s'], '.4g')} | {_f(e['match_s_per_pair'], '.3g')} | "
                    f"{mem} | {_f(e.get('loop_cells_per_s'), '.4g')} | {_f(e.get('speedup_vs_loop'), '.3g')}x | `{r['_file']}` |")
    return lines


def report_markdown(results: List[dict]) -> str:
    """The benchmark tables of docs/performance.md (and results/BENCHMARKS.md), from result files."""
    full = [r for r in results if r["mode"] == "full"]
    cpu = [r for r in results if r["mode"] == "cpu-preset"]
    # only runs against the reference baseline (all source tokens); earlier files timed a
    # per-keypoint loop under the same name
    match = [r for r in results if r.get("speed_claim") and "matching" in r
             and r["matching"]["loop"].get("source_tokens")]
    dense = [r for r in results if r.get("speed_claim") and any(
        "loop_cells_per_s" in e for e in ((r.get("dense") or {}).get("resolutions") or {}).values())]
    tables = [
        _headline_table(full) + [""] + _extraction_table(full) if full else None,
        _cpu_table(cpu) if cpu else None,
        _matching_table(match) if match else None,
        _dense_table(dense) if dense else None,
    ]
    lines = []
    for table in tables:
        if table:
            if lines:
                lines.append("")
            lines += table
    if not lines:
        lines.append("No benchmark results yet (only `--tiny` runs, which are not speed claims).")
    return "\n".join(lines) + "\n"


# ====================================================================== bench-report: plot
def _plot_series(full: List[dict], cpu: List[dict]) -> tuple:
    """``(labels, plain, optimised, end to end)`` images/s per run."""
    labels, plain, opt, e2e = [], [], [], []
    for r in full:
        ex = r["extraction"]
        best = next((o for o in ex["optimised"] if o.get("batch") == ex["chosen_batch"]), {})
        labels.append(f"{_run_label(r)}\n{r['created_utc'][:10]}")
        plain.append(ex["plain"]["images_per_s"] or 0)
        opt.append(best.get("images_per_s") or 0)
        e2e.append(max((r.get(k) or {}).get("images_per_s") or 0 for k in ("end_to_end", "end_to_end_compiled")))
    for r in cpu:
        recs = r["cpu_preset"]["recipes"]
        labels.append(f"{r['environment']['device_name'][:40]}\n(paper | cpu preset, fp32)")
        plain.append(1.0 / recs["paper"]["s_per_image"])
        opt.append(1.0 / recs["cpu"]["s_per_image"])
        e2e.append(0)
    return labels, plain, opt, e2e


def report_plot(results: List[dict], path) -> Optional[str]:
    """A bar chart of images/s (plain vs optimised per device, log scale) as PNG."""
    full = [r for r in results if r["mode"] == "full"]
    cpu = [r for r in results if r["mode"] == "cpu-preset"]
    if not full and not cpu:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, plain, opt, e2e = _plot_series(full, cpu)
    fig, ax = plt.subplots(figsize=(max(6, 2.6 * len(labels)), 4.8))
    x = np.arange(len(labels))
    w = 0.27
    ax.bar(x - w, plain, w, label="plain recipe fp32, batch 1 / CPU: paper recipe")
    ax.bar(x, opt, w, label="optimised extract (bf16, batched, early stop) / CPU: cpu preset")
    ax.bar(x + w, e2e, w, label="end to end: compute_fused_features on JPEG files (faster of eager / compiled)")
    for xi, vals in enumerate(zip(plain, opt, e2e)):
        for dx, v in zip((-w, 0, w), vals):
            if v:
                ax.text(xi + dx, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("images / s (paper recipe unless noted)")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.axhline(TARGETS["images_per_s"], ls="--", lw=0.8, color="gray")
    ax.text(len(labels) - 0.5, TARGETS["images_per_s"], " target 30/s (H100)", va="bottom", ha="right", fontsize=7, color="gray")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, frameon=False)
    ax.set_title("SD + DINOv2 feature extraction (random weights, real architectures)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# ====================================================================== the generated block of a document
def update_generated_block(path, md: str, png: Optional[str]) -> bool:
    """Replace the generated benchmark block of a document (docs/performance.md): the
    lines between :data:`GENERATED_BLOCK_START` and :data:`GENERATED_BLOCK_END`, or, the
    first time, a line ``BENCH_TABLE``. The plot's link is relative to the document.
    False (nothing written) when the document has neither."""
    path = Path(path)
    text = path.read_text()
    body = md.rstrip("\n")
    if png:
        try:
            rel = os.path.relpath(Path(png).resolve(), path.resolve().parent)
        except ValueError:
            rel = str(png)
        body += f"\n\n![benchmark plot]({rel})"
    block = f"{GENERATED_BLOCK_START}\n{body}\n{GENERATED_BLOCK_END}"
    if GENERATED_BLOCK_START in text and GENERATED_BLOCK_END in text:
        head, rest = text.split(GENERATED_BLOCK_START, 1)
        _, tail = rest.split(GENERATED_BLOCK_END, 1)
        new = head + block + tail
    elif re.search(r"(?m)^BENCH_TABLE[ \t]*$", text):
        new = re.sub(r"(?m)^BENCH_TABLE[ \t]*$", lambda _m: block, text, count=1)
    else:
        return False
    path.write_text(new)
    return True
