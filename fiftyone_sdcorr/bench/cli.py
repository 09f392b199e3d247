"""The command line of the benchmark: ``python -m fiftyone_sdcorr bench`` and
``bench-report`` (arguments and the two ``main`` functions; ``fiftyone_sdcorr/__main__.py``
dispatches to them).

No FiftyOne import.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fiftyone_sdcorr.bench.report import (GENERATED_BLOCK_END, GENERATED_BLOCK_START, format_table, load_results,
                                          report_markdown, report_plot, update_generated_block)
from fiftyone_sdcorr.bench.runs import run_bench


# ====================================================================== bench
def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiny", action="store_true", help="tiny random models and a small recipe (seconds on a CPU; not a speed claim)")
    p.add_argument("--matching-only", action="store_true", help="only the feature store and matching benchmarks, on fused maps of the paper's size (1536 x 60 x 60) from random values (no models)")
    p.add_argument("--cpu-preset", action="store_true", help="cost per image on this CPU, full-size models, paper recipe vs PRESETS['cpu'] (batch 1, fp32)")
    p.add_argument("--methods", action="store_true", help="cost per image of each method on --device, batch 1 "
                   "(fp32 on CPU, bf16 on CUDA): what --cpu-preset costs (sd-dino paper / cpu preset, dino-diy at "
                   "840 / 448 px), with the ratio to the paper recipe")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="JSON path (default: results/bench-<device>-<date>.json)")
    p.add_argument("--images", type=int, default=None, help="images timed per optimised batch size (default 32 on CUDA, 4 on CPU; --cpu-preset: per recipe, default 2)")
    p.add_argument("--plain-images", type=int, default=None, help="images timed on the plain path (default 8 on CUDA, 2 on CPU)")
    p.add_argument("--agree-images", type=int, default=4, help="images for the bf16 vs fp32 agreement (<= plain images)")
    p.add_argument("--batch", default=None, help="images per pass of the optimised path; a comma list sweeps (default '1,2,4,8,16' on CUDA, '1,2' on CPU)")
    p.add_argument("--dtype", default="bf16", help="optimised path dtype: bf16 (fp16 where unsupported) or fp16 / fp32")
    p.add_argument("--preset", default="paper", help="recipe preset for the extraction runs (paper, whole, cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks of the optimised path")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (default, reduce-overhead = CUDA graphs, max-autotune)")
    p.add_argument("--channels-last", action="store_true",
                   help="NHWC convolutions on the optimised path (off by default, as in FeatureExtractor: slower on an H100)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up batches before timing (default 1; --cpu-preset: 0)")
    p.add_argument("--keypoints", type=int, default=20, help="keypoints per source in the matching benchmark")
    p.add_argument("--targets", type=int, default=None, help="target images in the matching / store benchmark (default 64, tiny 16)")
    p.add_argument("--mem-cap-gb", type=float, default=8.0, help="memory cap (GB, 1e9 bytes) for choosing the batch")
    p.add_argument("--models-dir", default=None, help="where the random full-size (or tiny) checkpoints are built (default ~/.cache/fiftyone_sdcorr/full-random or $SDCORR_BENCH_MODELS)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--no-end-to-end", action="store_true",
                   help="skip the end-to-end compute_fused_features stage (it needs FiftyOne's database)")


def fill_defaults(args) -> None:
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") and not args.cpu_preset
    if args.images is None:
        args.images = 2 if (args.cpu_preset or args.tiny) else (32 if cuda else 4)
    if args.plain_images is None:
        args.plain_images = 8 if cuda else 2
    if args.batch is None:
        args.batch = "1,2,4,8,16" if cuda else ("1,2" if args.tiny else "1")
    if args.warmup is None:
        args.warmup = 0 if (args.cpu_preset or args.tiny) else 1
    if args.targets is None:
        args.targets = 8 if args.tiny else 64


def main_bench(args) -> int:
    args._t0 = time.perf_counter()
    fill_defaults(args)
    if args.tiny and args.cpu_preset:
        raise SystemExit("--tiny and --cpu-preset exclude each other")
    result = run_bench(args)
    print(format_table(result))
    print(f"\nwrote {result['_path']}")
    return 0


# ====================================================================== bench-report
def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", default=["results"], help="result files or folders (default: results/)")
    p.add_argument("--md", default="results/BENCHMARKS.md", help="markdown table to write")
    p.add_argument("--png", default="results/benchmarks.png", help="plot to write (needs matplotlib)")
    p.add_argument("--readme", default=None,
                   help="also put the table (and the plot's link) into this document (the project's: "
                        f"docs/performance.md), between the lines {GENERATED_BLOCK_START!r} and "
                        f"{GENERATED_BLOCK_END!r}, or in place of a line 'BENCH_TABLE'")


def main_report(args) -> int:
    results = load_results(args.inputs or ["results"])
    md = report_markdown(results)
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(md)
    print(md)
    png = None
    try:
        png = report_plot(results, args.png)
    except ImportError as e:
        print(f"no plot: {e}", file=sys.stderr)
    print(f"wrote {args.md}" + (f" and {png}" if png else ""))
    if args.readme:
        if not update_generated_block(args.readme, md, png):
            print(f"{args.readme} has neither the {GENERATED_BLOCK_START} / {GENERATED_BLOCK_END} markers nor a "
                  "BENCH_TABLE line", file=sys.stderr)
            return 1
        print(f"updated {args.readme}")
    return 0
