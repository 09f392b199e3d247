"""``python -m fiftyone_sdcorr evaluate-pairs``: the paper's protocol on SPair-71k,
PF-Pascal and AP-10K, from the benchmarks' own files.

Two ways to get predictions:

- ``--predictions FILE``: any method's predicted target keypoints, one JSON object per
  line (``{"pair": "<id>", "trg_kps": [[x, y], ...]}``; format and pair identifiers:
  :mod:`fiftyone_sdcorr.core.benchmarks.pck`, :mod:`fiftyone_sdcorr.core.benchmarks.formats`),
  scored with no model loaded.
- otherwise the models: fused SD + DINOv2 features per image, co-PCA per pair (the paper)
  or a fixed projection, nearest neighbour, optional soft-argmax and flip alignment
  (:mod:`fiftyone_sdcorr.core.matching.pair_matching`). ``--save-predictions FILE`` writes what the
  model predicts in the same JSON Lines format, one line per pair as it is done; rerun
  with the same file and settings to resume where it stopped (a half-written last line
  is dropped, a pair whose point count changed is recomputed and kept once; the file is
  cleaned by replacing it whole, so a full disk or a kill never loses saved lines).

``--format tss`` (dense flow, sd-dino's ``pck_tss.py``): :func:`evaluate_tss` reads
``TSS_CVPR2016`` (:func:`fiftyone_sdcorr.core.benchmarks.formats.read_tss`) and scores
either a folder of flow files (``--predictions DIR``: ``<subset>/<pair folder>/flow<n>.flo``
or ``.npy``, the ground truth's own relative paths) or the features' nearest neighbour per
target pixel (:func:`fiftyone_sdcorr.core.matching.dense.dense_match`); per-subset PCK@0.05 beside
the paper's.

Every expected failure (a bad file, parameter or path, models not found) is one
:class:`ValueError` subclass naming the file, pair and field; ``--out``, ``--markdown``,
``--save-predictions``, ``--feature-cache`` and ``--projection`` are checked before any
model loads.

Writes the results as JSON (``--out``) and a markdown table (``--markdown``, default:
``--out`` with ``.md``), and prints the table. Protocol: :mod:`fiftyone_sdcorr.core.benchmarks.pck`.
No FiftyOne import.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fiftyone_sdcorr.core.benchmarks.formats import (
    ALPHAS,
    FORMATS,
    PAPER_TEST_PAIRS,
    THRESHOLDS,
    TSS_ALPHAS,
    TSS_PAPER_PCK,
    TSS_SUBSETS,
    BenchmarkFormatError,
    PairRecord,
    flip_pairs,
    read_pairs,
    read_tss,
    read_tss_mask,
)
from fiftyone_sdcorr.core.common.files import check_output_file, check_output_folder, with_filename, write_text_atomic
from fiftyone_sdcorr.core.benchmarks.flow_io import FLOW_SUFFIXES, read_flow
from fiftyone_sdcorr.core.features.models import DEFAULT_DINO_MODEL, DEFAULT_SD_MODEL
from fiftyone_sdcorr.core.features.methods import DEFAULT_METHOD, METHODS, get_method
from fiftyone_sdcorr.core.matching.pair_matching import FEATURES, PCA_MODES, PairMatcher, PairMatchOptions
from fiftyone_sdcorr.core.common.params import ParameterError, check_choice, check_int, check_str
from fiftyone_sdcorr.core.benchmarks.pck import (
    PredictionsError,
    aggregate,
    aggregate_tss,
    markdown_table,
    parse_predictions_line,
    predictions_line,
    read_predictions,
    score_flow,
    score_predictions,
    score_record,
    tss_markdown_table,
)

#: recipe fields settable from the command line (the rest: ``recipe={...}`` in Python)
RECIPE_OPTIONS = ("sd_size", "sd_mode", "dino_size", "pca_dim", "alpha", "taps", "prompt", "timestep", "padding",
                  "noise")
#: ``--format`` of evaluate-pairs: the keypoint benchmarks and TSS (dense flow; no importer)
EVAL_FORMATS = FORMATS + ("tss",)


# --------------------------------------------------------------------------- Python API
def evaluate_pairs(
    format: str,
    root,
    split: str = "test",
    *,
    categories: Optional[Sequence[str]] = None,
    sample: Optional[int] = None,
    seed: int = 0,
    predictions=None,
    records: Optional[Sequence[PairRecord]] = None,
    method: str = DEFAULT_METHOD,
    adapter=None,
    sd_model: str = DEFAULT_SD_MODEL,
    dino_model: str = DEFAULT_DINO_MODEL,
    unet_model=None,
    device=None,
    dtype=None,
    batch_size: Optional[int] = None,
    preset: str = "paper",
    recipe: Optional[dict] = None,
    features: str = "fused",
    pca: str = "co",
    soft_argmax: bool = False,
    flip: bool = False,
    pca_device=None,
    projection=None,
    fit_images: int = 32,
    cache_images: int = 64,
    feature_cache=None,
    save_predictions=None,
    extractor=None,
    progress: bool = True,
    dense_resolution: Optional[int] = None, tss_masks: str = "none",
) -> dict:
    """PCK of a benchmark split under the paper's protocol; returns the results dict.

    Args:
        format: ``"spair"``, ``"pfpascal"``, ``"ap10k"``, or ``"tss"`` (dense flow:
            :func:`evaluate_tss` with ``categories`` as its subsets, ``dense_resolution``
            and ``tss_masks``; ``split`` is not used).
        root: the benchmark's folder (:mod:`fiftyone_sdcorr.core.benchmarks.formats`).
        split: the benchmark's split name (``"test"``).
        categories: only these categories; sample: at most this many pairs per category
            (seeded by ``seed``).
        predictions: a predictions file (JSON Lines), or a dict ``{pair: (K, 2)}``; when
            given no model is loaded.
        records: the pairs to evaluate instead of reading them (e.g.
            :func:`fiftyone_sdcorr.dataset.benchmarks.benchmark_pairs` of an imported dataset).
        method, adapter: the feature method (``"sd-dino"``, the paper; ``"dino-diy"``:
            DIY-SC's adapter on DINOv2, matched with its 15 x 15 soft-argmax window when
            ``soft_argmax``) and its adapter file (default: the shipped one)
        sd_model, dino_model, unet_model, device, dtype, batch_size, preset, recipe: the
            :class:`~fiftyone_sdcorr.FeatureExtractor` (``recipe``: recipe field overrides;
            ``alpha`` there is the SD share of the fused descriptor).
        features: ``"fused"``, ``"sd"`` or ``"dino"``; pca: ``"co"`` (per pair, the paper)
            or ``"fixed"``; soft_argmax, flip: the GeoAware-SC refinements; pca_device: where
            the per-pair co-PCA runs (default: the extractor's device).
        projection: a saved :class:`~fiftyone_sdcorr.FixedProjection` (``pca="fixed"``);
            without one it is fitted on the first ``fit_images`` images of the pairs.
        cache_images: raw features of this many images are kept in memory (a category's
            test images recur in many pairs).
        feature_cache: a folder where each image's raw maps are kept (float16 safetensors,
            keyed by the image file's content (sha256), mirror, prompt label and the
            extractor's settings): reruns and ablations (``features``, ``pca``,
            ``soft_argmax``, ``flip``) reuse them; a damaged file is recomputed.
        save_predictions: write (and resume from) the model's predictions here (module
            docstring); the file only ever grows by whole lines or is replaced whole.
        extractor: an already loaded extractor (its settings win over the model options).

    Returns:
        ``{"per_point", "per_image", "per_point_pooled", "categories", "counts", "alphas",
        "benchmark", "method", "warnings"}`` (PCK in percent; :func:`~fiftyone_sdcorr.core.benchmarks.pck.aggregate`).
    """
    # 1. check every parameter (and where the model's work goes) before any model loads
    check_choice("format", format, EVAL_FORMATS)
    if format == "tss":  # dense flow: its own files and protocol (evaluate_tss)
        return _evaluate_tss_format(**locals())
    check_str("split", split)
    if sample is not None:
        check_int("sample", sample, lo=1)
    alphas = ALPHAS[format]
    if predictions is None:
        save_predictions, feature_cache = _check_model_outputs(save_predictions, feature_cache, projection, pca)
        opts = _match_options(method, features, pca, soft_argmax, flip, pca_device, cache_images)
        model = dict(zip(MODEL_KEYWORDS, (sd_model, dino_model, device, dtype, batch_size, preset, recipe,
                                          feature_cache, unet_model, method, adapter)))
    # 2. the pairs
    records = _pairs(format, root, split, categories, sample, seed, records)
    warnings: List[str] = _geometry_warnings(records)
    # 3. scores: from the predictions given, or from the model
    if predictions is not None:
        scores, method = _prediction_scores(records, predictions, alphas)
    else:
        scores, method = _model_scores(format, records, alphas, opts, model, extractor, projection, fit_images,
                                       save_predictions, progress, warnings)
    # 4. the paper's aggregation
    result = aggregate(scores, alphas)
    info = _benchmark_info(format, root, split, categories, sample, seed, records, result)
    return {**result, "benchmark": info, "method": method, "warnings": warnings}


#: the model keywords of :func:`evaluate_pairs`, in the order it passes them on
MODEL_KEYWORDS = ("sd_model", "dino_model", "device", "dtype", "batch_size", "preset", "recipe", "feature_cache",
                  "unet_model", "method", "adapter")


def _match_options(method: str, features, pca, soft_argmax, flip, pca_device, cache_images) -> PairMatchOptions:
    """How pairs are matched: the options given, with the method's soft-argmax window and
    temperature (its authors' evaluation); a method without SD has no SD ablations."""
    m = get_method(method)
    if not m.uses_sd and (features, pca) != ("fused", "co"):
        raise ParameterError(f"parameters 'features' and 'pca' choose SD ablations; method {m.name!r} has no SD")
    return PairMatchOptions(features=features, pca=pca, soft_argmax=soft_argmax, flip=flip, pca_device=pca_device,
                            cache_images=cache_images, soft_window=m.soft_window, temperature=m.temperature)


def _prediction_scores(records, predictions, alphas):
    """``(scores, method)`` of given predictions (a JSON Lines file or a dict)."""
    source = None if isinstance(predictions, dict) else str(predictions)
    preds = predictions if isinstance(predictions, dict) else read_predictions(predictions)
    return score_predictions(records, preds, alphas, source=source), {"source": "predictions", "file": source}


def _evaluate_tss_format(*, root, categories, sample, predictions, extractor, features, dense_resolution, tss_masks,
                         progress, pca, save_predictions, feature_cache, projection, soft_argmax, flip, records,
                         sd_model, dino_model, device, dtype, batch_size, preset, recipe, unet_model, method,
                         adapter, **_ignored):
    """:func:`evaluate_pairs` with ``format="tss"``: its keypoint-only options refused,
    the rest passed to :func:`evaluate_tss`."""
    _check_tss_options(pca, save_predictions=save_predictions, feature_cache=feature_cache, projection=projection,
                       soft_argmax=soft_argmax, flip=flip, records=records)
    model = dict(sd_model=sd_model, dino_model=dino_model, device=device, dtype=dtype, batch_size=batch_size,
                 preset=preset, recipe=recipe, unet_model=unet_model, method=get_method(method).name, adapter=adapter)
    return evaluate_tss(root, subsets=categories, sample=sample, predictions=predictions, extractor=extractor,
                        features=features, dense_resolution=dense_resolution, masks=tss_masks, model=model,
                        progress=progress)


def _pairs(fmt, root, split, categories, sample, seed, records) -> List[PairRecord]:
    """The pairs given, else those read from the benchmark's files; none is an error."""
    records = list(records if records is not None else
                   read_pairs(fmt, root, split, categories=categories, sample=sample, seed=seed))
    if not records:
        raise BenchmarkFormatError(f"no {fmt} pairs for split {split!r} under {root}"
                                   + (f" in categories {list(categories)}" if categories else ""))
    return records


def _model_scores(fmt, records, alphas, opts, model: dict, extractor, projection, fit_images, save_predictions,
                  progress, warnings: List[str]):
    """``(scores, method)`` of the model on the pairs (its predictions saved as they come)."""
    matcher = _matcher(extractor, opts, projection, records, fit_images, **model)
    method = {"source": "model", **_method_config(matcher, opts, projection)}
    if opts.flip and fmt == "pfpascal":
        warnings.append("flip alignment on PF-Pascal: its pair lists name no keypoints, so the mirrored "
                        "source keeps every label (no left/right swap)")
    return _run_model(matcher, records, fmt, alphas, save_predictions, method, progress), method


def _check_model_outputs(save_predictions, feature_cache, projection, pca):
    """``(save_predictions, feature_cache)`` checked as an output file and folder; a
    projection is refused unless ``pca="fixed"``."""
    if save_predictions is not None:
        save_predictions = check_output_file("save_predictions", save_predictions)
    if feature_cache is not None:
        feature_cache = check_output_folder("feature_cache", feature_cache)
    if projection is not None and pca != "fixed":
        raise ParameterError(f"parameter 'projection': a fixed projection is used with pca='fixed', not {pca!r}")
    return save_predictions, feature_cache


def _benchmark_info(fmt, root, split, categories, sample, seed, records, result) -> dict:
    paper = PAPER_TEST_PAIRS.get(fmt)
    weights = result["counts"]["category_weights"]
    return {"format": fmt, "root": str(root), "split": split, "categories": list(categories) if categories else None,
            "sample": sample, "seed": seed, "threshold": THRESHOLDS[fmt], "pairs_read": len(records),
            "weights_equal_paper": (weights == paper) if paper and split == "test" else None}


def _geometry_warnings(records: Sequence[PairRecord], show: int = 5) -> List[str]:
    """Suspicious geometry the readers found (a box outside its image: T is then not the
    object's size), one line per pair, at most ``show`` and a count of the rest."""
    found = [w for r in records for w in (r.extra or {}).get("warnings", [])]
    out = found[:show]
    if len(found) > show:
        out.append(f"... and {len(found) - show} more pairs with suspicious geometry")
    return out


def _load_projection(path):
    """A saved :class:`~fiftyone_sdcorr.FixedProjection` (safetensors only: never unpickled)."""
    from fiftyone_sdcorr.core.features.fusion import FixedProjection

    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.is_file():
        raise ParameterError(f"parameter 'projection': {p} is not a file")
    try:
        return FixedProjection.load(p)
    except Exception as e:  # noqa: BLE001 -- safetensors / key errors: not a saved projection
        raise ParameterError(f"parameter 'projection': {p} is not a saved FixedProjection (.safetensors): "
                             f"{type(e).__name__}: {e}") from None


def _matcher(extractor, opts, projection, records, fit_images, **model) -> PairMatcher:
    proj = _load_projection(projection) if opts.pca == "fixed" and projection is not None else None
    if opts.pca == "fixed" and proj is None:
        check_int("fit_images", fit_images, lo=1)
    if extractor is None:
        extractor = _build_extractor(model)
    store = None
    if model.get("feature_cache") is not None:
        from fiftyone_sdcorr.core.features.store import FeatureStore

        store = FeatureStore(model["feature_cache"], fsync=False)
    matcher = PairMatcher(extractor, opts, proj, raw_store=store)
    if opts.pca == "fixed" and proj is None:
        paths = list(dict.fromkeys(p for r in records for p in (r.src, r.trg)))[:fit_images]
        label = {p: r.category for r in records for p in (r.src, r.trg)}
        matcher.fit_projection(paths, [label[p] for p in paths])
    return matcher


def _build_extractor(model: dict):
    """A :class:`~fiftyone_sdcorr.FeatureExtractor` from the model keywords of :func:`evaluate_pairs`."""
    from fiftyone_sdcorr.core.features.extractor import FeatureExtractor

    return FeatureExtractor(model.get("sd_model", DEFAULT_SD_MODEL), model.get("dino_model", DEFAULT_DINO_MODEL),
                            device=model.get("device"), dtype=model.get("dtype"), batch_size=model.get("batch_size"),
                            preset=model.get("preset", "paper"), unet_model=model.get("unet_model"),
                            method=model.get("method", DEFAULT_METHOD), adapter=model.get("adapter"),
                            **(model.get("recipe") or {}))


def _method_config(matcher: PairMatcher, opts: PairMatchOptions, projection) -> dict:
    cfg = dict(matcher.extractor.config()) if hasattr(matcher.extractor, "config") else {}
    cfg.update(features=opts.features, pca=opts.pca, soft_argmax=opts.soft_argmax, flip=opts.flip,
               projection=str(projection) if projection else ("fitted" if opts.pca == "fixed" else None))
    return json.loads(json.dumps(cfg, default=str))


def _run_model(matcher, records, fmt, alphas, save_predictions, method, progress) -> list:
    done = _resume(save_predictions, method, records) if save_predictions else {}
    out = open(save_predictions, "ab", buffering=0) if save_predictions else None
    scores, bar = [], _progress(len(records), progress)
    try:
        for r in records:
            pred = done.get(r.pair)
            if pred is None:
                pred = matcher.predict(r, flip_pairs(fmt, r.category)).trg_kps
                if out is not None:
                    _append_line(out, predictions_line(r.pair, pred))
            scores.append(score_record(r, pred, alphas))
            bar.update(1)
    finally:
        bar.close()
        if out is not None:
            out.close()
    return scores


def _append_line(f, line: str) -> None:
    """One whole line at the end of the file, or nothing: on a failed write (a full disk)
    the file is cut back to where it was, so it never ends in half a line."""
    data, pos = (line + "\n").encode("utf-8"), f.tell()
    try:
        view = memoryview(data)
        while view:
            view = view[f.write(view):]
    except BaseException as e:
        os.ftruncate(f.fileno(), pos)
        raise with_filename(e, f.name)


def _resume(path, method, records) -> Dict[str, np.ndarray]:
    """Predictions already saved with the same settings (a sidecar ``<file>.config.json``
    records them), for the pairs they still fit. Dropped from the file: lines that do not
    parse (the half-written last line of a killed run), earlier lines of a pair saved
    twice, and lines whose point count no longer fits the pair (recomputed, so the file
    never holds a pair twice). Lines of other pairs are kept. The file and the sidecar are
    only ever replaced whole (temporary file + rename): a full disk leaves them as they were."""
    path = Path(path)
    side = path.with_name(path.name + ".config.json")
    if path.exists() and path.stat().st_size:
        stored = _stored_settings(side)
        if stored != method:
            diff = sorted(k for k in set(stored or {}) | set(method) if (stored or {}).get(k) != method.get(k))
            why = f"predictions of other settings ({', '.join(diff)})" if stored else "predictions of unknown settings"
            raise ParameterError(f"parameter 'save_predictions': {path} holds {why}; choose another file or "
                                 "delete it")
    text = json.dumps(method, indent=2, sort_keys=True)
    if not side.exists() or side.read_text(errors="replace") != text:
        write_text_atomic(side, text)
    if not path.exists():
        return {}
    done, kept, clean = _saved_lines(path, {r.pair: len(r.src_kps) for r in records})
    if not clean:
        write_text_atomic(path, "".join(ln + "\n" for ln in kept.values()))
    return done


def _stored_settings(side: Path) -> Optional[dict]:
    if not side.exists():
        return None
    try:
        return json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PredictionsError(f"{side}: not readable JSON settings ({e}); delete it with its predictions "
                               "file, or choose another file") from None


def _saved_lines(path: Path, sizes: Dict[str, int]):
    """``(predictions that fit, {pair: line} to keep, whether the file is already exactly that)``."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PredictionsError(f"{path}: not a predictions file (not UTF-8 text); choose another file") from None
    lines = text.splitlines()
    done: Dict[str, np.ndarray] = {}
    kept: Dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        try:
            pair, pts = parse_predictions_line(line, f"{path}, line {n}")
        except PredictionsError:
            continue
        kept.pop(pair, None)  # a pair saved twice keeps its last line
        done.pop(pair, None)
        if pair in sizes and len(pts) != sizes[pair]:
            continue  # of another point count: recomputed
        kept[pair] = line
        if pair in sizes:
            done[pair] = pts
    clean = list(kept.values()) == lines and (not text or text.endswith("\n"))
    return done, kept, clean


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="evaluate-pairs", unit="pair", file=sys.stderr)


# --------------------------------------------------------------------------- TSS (dense flow)
TSS_MASKS = ("none", "dataset")


def evaluate_tss(root, *, subsets: Optional[Sequence[str]] = None, sample: Optional[int] = None, predictions=None,
                 extractor=None, features: str = "fused", dense_resolution: Optional[int] = None,
                 masks: str = "none", model: Optional[dict] = None, progress: bool = True) -> dict:
    """PCK of TSS under sd-dino's ``pck_tss.py`` protocol (docs/evaluation.md, "TSS").

    Args:
        root: the ``TSS_CVPR2016`` folder (:func:`~fiftyone_sdcorr.core.benchmarks.formats.read_tss`).
        subsets: only these of FG3DCar, JODS, PASCAL; sample: the first N pairs of each.
        predictions: a folder of flow files, ``{pair}.flo`` or ``{pair}.npy`` (pair =
            ``"{subset}/{folder}/flow{n}"``: the same relative path as the ground truth),
            or a dict ``{pair: H x W x 2}``; then no model is loaded.
        extractor: a :class:`~fiftyone_sdcorr.FeatureExtractor` (co-PCA per pair, as the
            paper) or any ``Describer`` (``describe([a, b])``); default: one built from ``model``.
        features: ``"fused"``, ``"sd"`` or ``"dino"`` (a FeatureExtractor only).
        dense_resolution: cells per side of the dense grid (default: the token grid, as
            ``nearest_neighbor_flow``, 60 at the paper's recipe).
        masks: ``"none"`` (the paper's default run: every target pixel matched against the
            whole source) or ``"dataset"`` (both sides restricted to TSS's object masks).
        model: the :class:`~fiftyone_sdcorr.FeatureExtractor` keywords (``evaluate_pairs``').
    """
    check_choice("masks", masks, TSS_MASKS)
    check_choice("features", features, FEATURES)
    if dense_resolution is not None:
        check_int("dense_resolution", dense_resolution, lo=2, hi=4096)
    pairs = read_tss(root, subsets, sample)
    if not pairs:
        raise BenchmarkFormatError(f"no TSS pairs under {root}")
    if predictions is not None:
        flows = _tss_prediction_source(predictions, pairs)
        method = {"source": "predictions", "folder": None if isinstance(predictions, dict) else str(predictions)}
    else:
        describe, method = _tss_describer(extractor, features, model or {})
        method.update(dense_resolution=dense_resolution, masks=masks)
        flows = lambda p: _tss_model_flow(describe, p, dense_resolution, masks)  # noqa: E731
    scores = _tss_scores(pairs, flows, progress)
    result = aggregate_tss(scores, TSS_ALPHAS, TSS_PAPER_PCK)
    info = {"format": "tss", "root": str(root), "subsets": list(subsets) if subsets else list(TSS_SUBSETS),
            "sample": sample, "threshold": "source image max(H, W)", "correct_when": "error <= alpha x L",
            "pairs_read": len(pairs)}
    return {**result, "benchmark": info, "method": method, "warnings": []}


def _check_tss_options(pca: str, **given) -> None:
    """Options of the keypoint path that TSS does not have are refused, not ignored."""
    used = sorted(k for k, v in given.items() if v not in (None, False))
    if pca != "co":
        used.append("pca")
    if used:
        raise ParameterError(f"parameter(s) {used} not available with format 'tss' (dense flow: co-PCA per pair, "
                             "nearest neighbour per pixel, no saved predictions or feature cache)")


def _tss_scores(pairs, flows, progress: bool) -> list:
    """Each pair's :class:`~fiftyone_sdcorr.core.benchmarks.pck.FlowScore` (ground truth
    checked finite on its mask)."""
    scores, bar = [], _progress(len(pairs), progress)
    try:
        for p in pairs:
            gt, mask = p.load_flow(), p.load_mask()
            if not np.isfinite(gt[mask]).all():
                raise BenchmarkFormatError(f"{p.flow}: the ground-truth flow is not finite on pixels of {p.mask}")
            pred = flows(p)
            scores.append(score_flow(pred, gt, mask, p.threshold, TSS_ALPHAS, pair=p.pair, subset=p.subset,
                                     category=p.category))
            bar.update(1)
    finally:
        bar.close()
    return scores


def _tss_prediction_source(predictions, pairs):
    """``pair -> H x W x 2`` flow from a dict or a folder (every pair's file found first)."""
    if isinstance(predictions, dict):
        missing = [p.pair for p in pairs if p.pair not in predictions]
        get = lambda p: np.asarray(predictions[p.pair], dtype=np.float32)  # noqa: E731
        where = "predictions"
    else:
        folder = Path(os.path.expanduser(os.fspath(predictions)))
        if not folder.is_dir():
            raise PredictionsError(f"TSS predictions {folder}: must be a folder of flow files "
                                   "({subset}/{pair folder}/flow{n}.flo or .npy)")
        files = {p.pair: _tss_prediction_file(folder, p.pair) for p in pairs}
        missing = [k for k, f in files.items() if f is None]
        get = lambda p: read_flow(files[p.pair])  # noqa: E731
        where = str(folder)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise PredictionsError(f"{where}: no flow for {len(missing)} of {len(pairs)} pairs: "
                               f"{', '.join(missing[:5])}{more} (expected <pair>.flo or <pair>.npy)")
    return lambda p: _fit_prediction(get(p), p, where)


def _tss_prediction_file(folder: Path, pair: str) -> Optional[Path]:
    found = [folder / f"{pair}{s}" for s in FLOW_SUFFIXES if (folder / f"{pair}{s}").exists()]
    if len(found) > 1:
        raise PredictionsError(f"{folder}: pair {pair!r} has both {found[0].name} and {found[1].name}; keep one")
    return found[0] if found else None


def _fit_prediction(flow: np.ndarray, p, where: str) -> np.ndarray:
    """A predicted flow on the target's grid: its own size, or the size both images are
    padded to in sd-dino (right and bottom; cropped back)."""
    w, h = p.trg_size
    padded = (max(p.src_size[1], h), max(p.src_size[0], w))
    if flow.ndim != 3 or flow.shape[2] != 2 or flow.shape[:2] not in ((h, w), padded):
        raise PredictionsError(f"{where} (pair {p.pair!r}): flow of shape {tuple(flow.shape)}; expected "
                               f"{h} x {w} x 2 (the target image{'s' if padded == (h, w) else ''} grid)"
                               + ("" if padded == (h, w) else f" or {padded[0]} x {padded[1]} x 2 (padded)"))
    return flow[:h, :w]


def _tss_describer(extractor, features: str, model: dict):
    """``(describe(src, trg, label) -> (fs, ft), method)``: a FeatureExtractor's co-PCA per
    pair (the paper), or any Describer's ``describe``."""
    if extractor is None:
        extractor = _build_extractor(model)
    cfg = json.loads(json.dumps(dict(extractor.config()) if hasattr(extractor, "config") else {}, default=str))
    if hasattr(extractor, "extract") and hasattr(extractor, "recipe"):
        matcher = PairMatcher(extractor, PairMatchOptions(features=features, pca="co", cache_images=0))

        def describe(a, b, label):
            return tuple(matcher.describe(extractor.extract([a, b], labels=[label, label])))
        return describe, {"source": "model", **cfg, "features": features, "pca": "co"}
    return (lambda a, b, label: tuple(extractor.describe([a, b]))), {"source": "model", **cfg}


def _padded(image, size: Tuple[int, int]):
    """``image`` (PIL) on a ``size`` canvas, zeros right and bottom (sd-dino's ``pad_to_same_shape``)."""
    from PIL import Image

    if image.size == tuple(size):
        return image
    canvas = Image.new(image.mode, size, 0)
    canvas.paste(image, (0, 0))
    return canvas


def _tss_model_flow(describe, p, resolution: Optional[int], masks: str) -> np.ndarray:
    """The flow of one TSS pair from the features: both images padded to one size (as
    sd-dino does), each target pixel's nearest source cell (:func:`~fiftyone_sdcorr.core.matching.dense.dense_match`),
    cropped back to the target."""
    from fiftyone_sdcorr.core.matching.dense import dense_match
    from fiftyone_sdcorr.core.common.images import load_image

    size = (max(p.src_size[0], p.trg_size[0]), max(p.src_size[1], p.trg_size[1]))
    src, trg = (_padded(load_image(f), size) for f in (p.src, p.trg))
    fs, ft = describe(src, trg, p.category)
    region = {}
    if masks == "dataset":
        region = {"source_mask": _pad_mask(read_tss_mask(p.src_mask, p.src_size), size),
                  "target_mask": _pad_mask(read_tss_mask(p.mask, p.trg_size), size)}
    res = resolution or max(2, int(ft.letterbox.size // ft.stride))
    field = dense_match(fs, ft, resolution=res, cycle=False, **region).sample(*size)
    w, h = p.trg_size
    return _fill_unmatched(field.flow(*size))[:h, :w]


def _fill_unmatched(flow: np.ndarray) -> np.ndarray:
    """Pixels without a match (their grid cell's centre off the image, or outside the
    region: a strip under half a cell wide) take the flow of the nearest matched pixel, as
    sd-dino's interpolated token-grid flow gives every pixel one."""
    bad = ~np.isfinite(flow).all(-1)
    if not bad.any() or bad.all():
        return flow
    from scipy.ndimage import distance_transform_edt

    _, (rows, cols) = distance_transform_edt(bad, return_distances=True, return_indices=True)
    return flow[rows, cols]


def _pad_mask(mask: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    out = np.zeros((size[1], size[0]), bool)
    out[: mask.shape[0], : mask.shape[1]] = mask
    return out


# --------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``evaluate-pairs`` sub-command's arguments."""
    g = p.add_argument_group("benchmark")
    g.add_argument("--format", required=True, choices=EVAL_FORMATS,
                   help="which benchmark's files --root holds (tss: dense flow, TSS_CVPR2016)")
    g.add_argument("--root", required=True,
                   help="the benchmark folder (SPair-71k, PF-dataset-PASCAL, ap-10k, TSS_CVPR2016)")
    g.add_argument("--split", default="test", help="split name as the benchmark spells it (default: test; "
                   "not used by tss)")
    g.add_argument("--categories", nargs="+", metavar="NAME",
                   help="only these categories (tss: subsets FG3DCar JODS PASCAL)")
    g.add_argument("--sample", type=int, help="at most N pairs per category (seeded, without replacement; "
                   "tss: the first N pairs of each subset, as pck_tss.py)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--predictions", help="score these predictions (JSON Lines; tss: a folder of flow files "
                   "<subset>/<pair folder>/flow<n>.flo or .npy) instead of running the models")
    g.add_argument("--out", required=True, help="results JSON file")
    g.add_argument("--markdown", help="markdown table file (default: --out with .md)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    m = p.add_argument_group("model (ignored with --predictions)")
    m.add_argument("--method", default=DEFAULT_METHOD, choices=tuple(METHODS),
                   help="; ".join(f"{k}: {v.summary}" for k, v in METHODS.items()))
    m.add_argument("--adapter", help="dino-diy: a DIY-SC adapter (.safetensors; default: the shipped one)")
    m.add_argument("--sd-model", default=DEFAULT_SD_MODEL, help="SD checkpoint: Hub id or diffusers folder")
    m.add_argument("--dino-model", default=DEFAULT_DINO_MODEL, help="DINOv2 checkpoint: Hub id or folder")
    m.add_argument("--unet-model", default=None,
                   help="a replacement SD UNet: diffusers folder / Hub id, or a .safetensors state dict")
    m.add_argument("--preset", default="paper", help="recipe preset: paper, whole, cpu")
    m.add_argument("--device", help="cuda, cpu, ... (default: CUDA when available)")
    m.add_argument("--dtype", help="float32, float16, bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    m.add_argument("--batch-size", type=int, help="images per forward pass")
    m.add_argument("--features", default="fused", choices=FEATURES, help="fused (default), sd or dino")
    m.add_argument("--pca", default="co", choices=PCA_MODES, help="co: per pair (the paper); fixed: one projection")
    m.add_argument("--projection", help="a saved FixedProjection (.safetensors) for --pca fixed")
    m.add_argument("--fit-images", type=int, default=32, help="images the fixed projection is fitted on (default 32)")
    m.add_argument("--soft-argmax", action="store_true", help="window soft-argmax refinement (GeoAware-SC)")
    m.add_argument("--flip", action="store_true", help="flip alignment: also match the mirrored source")
    m.add_argument("--pca-device", help="where the per-pair co-PCA runs (default: the models' device)")
    m.add_argument("--cache-images", type=int, default=64, help="images whose raw features stay in memory (64)")
    m.add_argument("--feature-cache", default=None,
                   help="folder for each image's raw maps (float16), keyed by the image's content: reruns "
                   "and ablations reuse them")
    m.add_argument("--save-predictions", help="write (and resume from) the model's predictions, JSON Lines")
    m.add_argument("--dense-resolution", type=int,
                   help="tss: cells per side of the dense matching grid (default: the token grid, 60)")
    m.add_argument("--tss-masks", default="none", choices=TSS_MASKS,
                   help="tss: none (the paper's run) or dataset (match inside TSS's object masks)")
    r = p.add_argument_group("recipe overrides (default: the preset's)")
    r.add_argument("--alpha", type=float, help="SD share of the fused descriptor (paper: 0.5)")
    r.add_argument("--pca-dim", type=int, help="channels kept per SD tap (paper: 256)")
    r.add_argument("--taps", nargs="+", help="SD taps, e.g. s5 s4 s3 (paper)")
    r.add_argument("--sd-mode", choices=("tiled", "whole"), help="tiled (paper) or whole")
    r.add_argument("--sd-size", type=int, help="SD letterbox side (paper: 960)")
    r.add_argument("--dino-size", type=int, help="DINOv2 letterbox side (paper: 840)")
    r.add_argument("--prompt", help='SD prompt, may hold "{label}" (the category); default empty')
    r.add_argument("--timestep", type=int, help="diffusion timestep (paper: 100)")
    r.add_argument("--padding", choices=("zero", "edge"), help="letterbox padding")
    r.add_argument("--no-noise", dest="noise", action="store_const", const=False,
                   help="no noise: the clean latent at t=0 (for a replacement UNet such as CleanDIFT's)")


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    """The ``import-benchmark`` sub-command's arguments (it runs
    :func:`fiftyone_sdcorr.dataset.benchmarks.import_benchmark`; FiftyOne is imported only then)."""
    p.add_argument("--format", required=True, choices=FORMATS, help="which benchmark's files --root holds")
    p.add_argument("--root", required=True, help="the benchmark folder (SPair-71k, PF-dataset-PASCAL, ap-10k)")
    p.add_argument("--split", default="test", help="the split whose pairs and images are imported (default: test)")
    p.add_argument("--name", help="dataset name (default: <format>-<split>)")
    p.add_argument("--categories", nargs="+", metavar="NAME", help="only these categories")
    p.add_argument("--sample", type=int, help="at most N pairs per category (seeded, as evaluate-pairs)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")
    p.add_argument("--temporary", action="store_true", help="a non-persistent dataset (default: persistent)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _recipe_of(args) -> dict:
    rec = {k: getattr(args, k) for k in RECIPE_OPTIONS if getattr(args, k, None) is not None}
    if "taps" in rec:
        rec["taps"] = tuple(rec["taps"])
    return rec


def main(args: argparse.Namespace) -> int:
    """Runs ``evaluate-pairs``; 0 on success. Expected failures (bad parameters, files,
    models) raise; ``python -m fiftyone_sdcorr`` prints them as one line and exits 2.
    ``--out`` and ``--markdown`` are checked before anything is read or loaded, and
    written whole (temporary file + rename)."""
    out = check_output_file("out", args.out)
    md = check_output_file("markdown", args.markdown if args.markdown else out.with_suffix(".md"))
    if md.absolute() == out.absolute():
        raise ParameterError(f"parameters 'out' and 'markdown' name the same file {out}")
    result = evaluate_pairs(
        args.format, args.root, args.split, categories=args.categories, sample=args.sample, seed=args.seed,
        predictions=args.predictions, method=args.method, adapter=args.adapter, sd_model=args.sd_model,
        dino_model=args.dino_model,
        unet_model=args.unet_model, device=args.device,
        dtype=args.dtype, batch_size=args.batch_size, preset=args.preset, recipe=_recipe_of(args),
        features=args.features, pca=args.pca, soft_argmax=args.soft_argmax, flip=args.flip,
        pca_device=args.pca_device, projection=args.projection, fit_images=args.fit_images,
        cache_images=args.cache_images, feature_cache=args.feature_cache, save_predictions=args.save_predictions,
        progress=not args.no_progress, dense_resolution=getattr(args, "dense_resolution", None),
        tss_masks=getattr(args, "tss_masks", "none"),
    )
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    b = result["benchmark"]
    if b["format"] == "tss":
        table = tss_markdown_table(result, title=f"TSS: {result['method']['source']}")
    else:
        table = markdown_table(result, title=f"{b['format']} {b['split']}: {result['method']['source']}")
    write_text_atomic(md, table + "\n")
    print(table)
    for w in result["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(f"\nwrote {os.fspath(out)} and {os.fspath(md)}")
    return 0


__all__ = ["evaluate_pairs", "evaluate_tss", "add_arguments", "add_import_arguments", "main", "RECIPE_OPTIONS",
           "EVAL_FORMATS", "TSS_MASKS"]
