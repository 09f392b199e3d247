"""Benchmarks: extraction, matching and feature-store speed, against the plain recipe.

``python -m fiftyone_sdcorr bench`` runs everything in one process, on one device, and
writes one JSON file (schema ``sdcorr-bench/1``, see ``results/README.md``):

- **extraction** at the paper recipe with the *full-size* architectures (SD 1.5 UNet and
  VAE, DINOv2-B) built from the configs in ``fiftyone_sdcorr/configs`` with random
  weights (speed does not depend on weight values), saved with ``save_pretrained`` and
  loaded through :class:`~fiftyone_sdcorr.core.features.extractor.FeatureExtractor`, i.e. the real
  loading path:

  (a) *plain*: fp32, one tile per UNet call, the full UNet forward with hooks
      (``unet_taps(..., full_forward=True)``), classic (non-SDPA) attention, batch 1;
  (b) *optimised*: bf16 (or fp16), the tiles of several images in one call, the UNet
      stopped after the last tap, SDPA attention, channels-last, optionally
      ``torch.compile``; one entry per batch size asked for.

  Both in the same run, with the ratio (b)/(a), peak memory, FLOPs per image per stage
  (``torch.utils.flop_counter.FlopCounterMode`` on meta tensors of the same
  architectures: exact shapes, no compute), achieved TFLOP/s against a measured matrix
  multiply of the same device, and the agreement of (b) with (a): cosine similarity of
  the fused descriptors per token and the percentage of equal nearest neighbours.
- **matching**: targets/s and keypoints/s with features read back from a
  :class:`~fiftyone_sdcorr.core.features.store.FeatureStore`, vectorised
  :func:`~fiftyone_sdcorr.core.matching.correspondence.match_points` against the per-token loop
  :func:`~fiftyone_sdcorr.bench.reference.match_points_loop`, same run, with the ratio.
- **store**: bytes per sample, write and read rates.

``--tiny`` runs the same code with tiny random models (:mod:`fiftyone_sdcorr.core.features.tiny`) and a
small recipe on the CPU in seconds; it proves the command and its JSON, it is not a speed
claim. ``--cpu-preset`` measures the cost per image of the paper recipe and of
``PRESETS["cpu"]`` on the CPU with the full-size models (batch 1, fp32).

No FiftyOne import.
"""

# The command's description (``python -m fiftyone_sdcorr bench --help`` prints the text
# above) and the names its importers use: fiftyone_sdcorr/__main__.py imports this module.
# The code lives in the stage modules:
#   common          schema, targets, clock, formats, configs, environment
#   extraction      models, FLOPs, matmul ceiling, (a) plain and (b) optimised paths, agreement
#   end_to_end      compute_fused_features on JPEG files, and its pipeline without a database
#   store_matching  feature store and matching
#   runs            run_bench (numbered steps), --cpu-preset, --matching-only, targets, JSON
#   report          the printed table, bench-report's markdown and plot, the generated block
#   cli             arguments and main functions

from fiftyone_sdcorr.bench.cli import add_bench_arguments, add_report_arguments, main_bench, main_report
from fiftyone_sdcorr.bench.common import SCHEMA, TARGETS, TINY_RECIPE, environment, load_config
from fiftyone_sdcorr.bench.end_to_end import bench_end_to_end, bench_pipeline
from fiftyone_sdcorr.bench.extraction import (agreement, bench_images, build_full_models, count_flops,
                                              make_extractor, matmul_rate, plain_extract, staged_extract)
from fiftyone_sdcorr.bench.report import (GENERATED_BLOCK_END, GENERATED_BLOCK_START, format_table, load_results,
                                          report_markdown, report_plot, update_generated_block)
from fiftyone_sdcorr.bench.runs import evaluate_targets, run_bench, run_cpu_preset, run_matching_only
from fiftyone_sdcorr.bench.store_matching import bench_store_and_matching

__all__ = [
    "GENERATED_BLOCK_END", "GENERATED_BLOCK_START", "SCHEMA", "TARGETS", "TINY_RECIPE",
    "add_bench_arguments", "add_report_arguments", "agreement", "bench_end_to_end", "bench_images",
    "bench_pipeline", "bench_store_and_matching", "build_full_models", "count_flops", "environment",
    "evaluate_targets", "format_table", "load_config", "load_results", "main_bench", "main_report",
    "make_extractor", "matmul_rate", "plain_extract", "report_markdown", "report_plot", "run_bench",
    "run_cpu_preset", "run_matching_only", "staged_extract", "update_generated_block",
]
