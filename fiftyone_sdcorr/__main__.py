"""The package's command line: ``python -m fiftyone_sdcorr <command> ...`` (or ``sdcorr``).

Commands:
    bench         extraction / matching / store benchmark (fiftyone_sdcorr.bench.benchmark)
    bench-report  markdown table + plot from results/*.json
    convert-adapter   a DIY-SC adapter checkpoint (.pth state dict) to checked safetensors
                      (fiftyone_sdcorr.core.features.adapter; weights_only unpickling)
    demo          end-to-end demo (fiftyone_sdcorr.demo, when installed)
    evaluate-pairs    PCK on SPair-71k / PF-Pascal / AP-10K pairs, the paper's protocol
                      (fiftyone_sdcorr.pair_eval; no FiftyOne needed)
    import-benchmark  a benchmark split into a FiftyOne dataset (fiftyone_sdcorr.dataset.benchmarks)
    review-quality    precision / recall of the annotation review on known corruptions
                      (fiftyone_sdcorr.dataset.review_quality)

Adding a command: add a sub-parser in :func:`build_parser` and dispatch in :func:`main`.

Failures: a command raises; :func:`main` turns an expected failure (a bad parameter,
benchmark, predictions or image file, a model that cannot be found, a file-system error
such as a full disk: :func:`expected_errors`) into one line on stderr,
``<command>: error: <message>``, and exit status 2; ``--verbose`` (anywhere on the
line) prints the traceback too. Ctrl-C exits 130. Anything else is a bug and keeps its
traceback.

``demo`` is dispatched to ``fiftyone_sdcorr.demo:main(args)``. If that module defines
``add_arguments(parser)``, its arguments are registered on the ``demo`` sub-parser and
``main`` receives the parsed :class:`argparse.Namespace`; otherwise ``main`` receives
the list of the remaining command-line strings (``python -m fiftyone_sdcorr demo a b``
-> ``main(["a", "b"])``). The demo module is imported only when ``demo`` is asked for,
so the other commands never pay for its imports (FiftyOne).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import traceback
import warnings
from typing import List, Optional, Tuple


def _demo_module():
    if importlib.util.find_spec("fiftyone_sdcorr.demo") is None:
        return None
    return importlib.import_module("fiftyone_sdcorr.demo")


def _add_review_quality_arguments(p, formats) -> None:
    src = p.add_argument_group("what to corrupt: a FiftyOne dataset, or a benchmark split imported for the run")
    src.add_argument("--dataset", help="the dataset's name")
    src.add_argument("--format", choices=formats, help="a benchmark's format (with --root)")
    src.add_argument("--root", help="the benchmark folder; imported into a temporary dataset, deleted afterwards")
    src.add_argument("--split", default="test", help="benchmark split (default: test)")
    src.add_argument("--categories", nargs="+", metavar="NAME", help="benchmark: only these categories")
    src.add_argument("--sample", type=int, help="benchmark: at most N pairs per category")
    p.add_argument("--gt-field", help="the ground-truth keypoints field (default: keypoints)")
    p.add_argument("--bbox-field", help="object boxes for T (default: detections on a benchmark, else none)")
    p.add_argument("--corruptions", default="swap,shift,drop", help="comma-separated kinds (default: swap,shift,drop)")
    p.add_argument("--rate", type=float, default=0.2, help="probability a visible point is corrupted (default 0.2)")
    p.add_argument("--shift", type=float, default=0.2, help="shift distance in units of the object's size (0.2)")
    p.add_argument("--seed", type=int, default=0, help="corruption seed (default 0)")
    p.add_argument("--alpha", type=float, help="the review's alpha (default: flag_keypoint_annotations')")
    p.add_argument("--min-confidence", type=float, help="the review's min_confidence")
    p.add_argument("--features-field", help="stored features to use (default: sdcorr_features)")
    p.add_argument("--embedding-field", help="stored global embeddings (default: sdcorr_embedding)")
    p.add_argument("--sd-model", help="SD model (when features are computed)")
    p.add_argument("--dino-model", help="DINOv2 model (when features are computed)")
    p.add_argument("--preset", help="feature recipe preset")
    p.add_argument("--device", help="torch device")
    p.add_argument("--batch-size", type=int, help="batch size")
    p.add_argument("--flip", action="store_true", help="flip alignment in the review")
    p.add_argument("--out", help="write the report as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_convert_adapter_arguments(p) -> None:
    p.add_argument("pth", metavar="PTH", help="the PyTorch checkpoint (a state dict of tensors)")
    p.add_argument("out", metavar="OUT.safetensors", help="the safetensors file to write")
    p.add_argument("--source", help="metadata 'source' (default: the file's name and sha256)")
    p.add_argument("--licence", help="metadata 'licence' (default: CC0-1.0 for the authors' checkpoint, "
                   "else unknown)")


def _main_convert_adapter(args) -> int:
    from fiftyone_sdcorr.core.features.adapter import adapter_digest, convert_checkpoint

    out = convert_checkpoint(args.pth, args.out, source=args.source, licence=args.licence)
    print(f"wrote {out} (adapter digest {adapter_digest(out)})")
    return 0


def build_parser(with_demo_module=None) -> argparse.ArgumentParser:
    from fiftyone_sdcorr.bench import benchmark as bench

    parser = argparse.ArgumentParser(
        prog="python -m fiftyone_sdcorr",
        description="fiftyone-sdcorr: fused Stable Diffusion + DINOv2 features for FiftyOne",
        epilog="An expected failure prints one line on stderr and exits 2; add --verbose (anywhere) for "
               "its traceback.",
    )
    parser.add_argument("--verbose", action="store_true", help="on a failure, print the traceback too")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True

    p = sub.add_parser("bench", help="benchmark extraction, matching and the feature store; writes JSON",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_bench_arguments(p)

    p = sub.add_parser("bench-report", help="markdown table and PNG plot from benchmark JSON files")
    bench.add_report_arguments(p)

    p = sub.add_parser("convert-adapter", help="a DIY-SC adapter .pth state dict to a checked .safetensors file",
                       description="Convert a DIY-SC adapter checkpoint (a plain state dict, read with "
                                   "torch.load(weights_only=True) only) to safetensors, then load it back strictly.")
    _add_convert_adapter_arguments(p)

    from fiftyone_sdcorr import pair_eval

    p = sub.add_parser("evaluate-pairs", help="PCK on SPair-71k, PF-Pascal or AP-10K pairs (the paper's protocol)",
                       description=pair_eval.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pair_eval.add_arguments(p)

    p = sub.add_parser("import-benchmark", help="a SPair-71k, PF-Pascal or AP-10K split into a FiftyOne dataset")
    pair_eval.add_import_arguments(p)

    p = sub.add_parser("review-quality", help="precision / recall of flag_keypoint_annotations on known corruptions "
                       "(swapped, shifted, dropped points) of a copy of the ground truth")
    _add_review_quality_arguments(p, pair_eval.FORMATS)

    # demo: its own arguments when the module declares them, else passed through
    if with_demo_module is not None and hasattr(with_demo_module, "add_arguments"):
        p = sub.add_parser("demo", help="end-to-end demo (fiftyone_sdcorr.demo)")
        with_demo_module.add_arguments(p)
    else:
        p = sub.add_parser("demo", help="end-to-end demo (fiftyone_sdcorr.demo)", add_help=False)
        p.add_argument("demo_args", nargs=argparse.REMAINDER)
    return parser


def expected_errors() -> Tuple[type, ...]:
    """What a command may fail with that is the user's to fix, not a bug: every
    ``ValueError`` the package raises for a bad input (``ParameterError``,
    ``BenchmarkFormatError`` and ``PredictionsError``, ``ImageLoadError``), models not
    found (``ModelLoadError``), unusable feature files (``FeatureStoreError``) and
    file-system errors (``OSError``: a full disk, a permission)."""
    from fiftyone_sdcorr.core.features.models import ModelLoadError
    from fiftyone_sdcorr.core.features.store import FeatureStoreError

    return (ValueError, ModelLoadError, FeatureStoreError, OSError)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    command = argv[0] if argv and not argv[0].startswith("-") else "fiftyone_sdcorr"
    # diffusers passes huggingface_hub a deprecated argument on every load: noise, not news
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except expected_errors() as e:
        if verbose:
            traceback.print_exc()
        print(f"{command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if not isinstance(e, OSError) or e.filename is None or str(e.filename) in text \
        else f"{text}: {e.filename}"


def _run(argv: List[str]) -> int:
    demo = None
    if argv and argv[0] == "demo":
        demo = _demo_module()
        if demo is None:
            print("the demo is not available: fiftyone_sdcorr.demo is not installed", file=sys.stderr)
            return 2
    args = build_parser(demo).parse_args(argv)
    if args.command == "bench":
        from fiftyone_sdcorr.bench.benchmark import main_bench

        return main_bench(args)
    if args.command == "bench-report":
        from fiftyone_sdcorr.bench.benchmark import main_report

        return main_report(args)
    if args.command == "convert-adapter":
        return _main_convert_adapter(args)
    if args.command == "evaluate-pairs":
        from fiftyone_sdcorr.pair_eval import main as main_evaluate_pairs

        return main_evaluate_pairs(args)
    if args.command == "import-benchmark":
        from fiftyone_sdcorr.dataset.benchmarks import main_import

        return main_import(args)
    if args.command == "review-quality":
        from fiftyone_sdcorr.dataset.review_quality import main_review_quality

        return main_review_quality(args)
    if args.command == "demo":
        if hasattr(demo, "add_arguments"):
            rc = demo.main(args)
        else:
            rc = demo.main(list(args.demo_args))
        return rc if isinstance(rc, int) else 0  # a demo may return a summary
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
