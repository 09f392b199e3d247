"""The paper's PCK protocol for benchmark pairs: scoring, averaging, predictions files.

As in sd-dino's ``pck_spair_pascal.py`` (docs/evaluation.md, "The protocol"):

- A point **counts** when it is annotated (visible) in both images. A counted point with
  no prediction (``null`` / NaN) counts as wrong.
- A counted point is **correct at alpha** when its distance to the ground truth is
  **strictly below** ``alpha * T``; ``T`` = ``max(w, h)`` of the target object's box
  (SPair-71k, AP-10K) or of the target image (PF-Pascal). Distances are measured in
  target-image pixels; sd-dino measures point and ``T`` in the 840 letterbox frame, a
  uniform scaling of the same numbers (the result is the same up to floating-point ties).
- **Per point** (sd-dino): within a category, correct / counted over all its points
  pooled; overall, the categories' values averaged with weights = their number of
  evaluated pairs. On a full test split those are the paper code's fixed weights
  (SPair-71k: 690, 650, ...); with ``--sample N`` every category weighs ``N`` pairs,
  sd-dino's unweighted mean.
- **Per image** (GeoAware-SC's default): each pair's fraction correct / counted; the mean
  over a category's pairs, and overall the mean over all evaluated pairs (the same as
  the categories averaged with weights = their pairs).
- ``per_point_pooled`` (extra): all counted points pooled across categories, i.e. the
  categories weighted by their points (GeoAware-SC's ``KPT_RESULT``).
- A pair with no counted point is not evaluated (it would be 0 / 0) and is listed in
  ``counts.skipped_pairs``.

Results are percentages keyed by the alpha written with two decimals (``"0.10"``).

Predictions files are JSON Lines, one object per pair::

    {"pair": "<pair identifier>", "trg_kps": [[x, y], ..., null, ...]}

``trg_kps``: predicted target-image pixel coordinates, one per keypoint of the pair in
the order of the pair's source keypoints (SPair-71k: ``src_kps`` of the pair file;
PF-Pascal: ``XA`` / ``YA``; AP-10K: the 17 COCO keypoints). ``null`` = no prediction.

**TSS** (dense flow; sd-dino's ``pck_tss.py``): :func:`score_flow` scores a predicted
flow on the target's correspondence-mask pixels, correct when the end-point error is **at
most** ``alpha * L`` (``<=``, unlike the keypoint benchmarks' ``<``), ``L`` the source
image's longer side; :func:`aggregate_tss` averages each pair's fraction over a subset's
pairs (``per_image``, the paper's number) and :func:`tss_markdown_table` prints it beside
the paper's.

No FiftyOne import.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from fiftyone_sdcorr.core.benchmarks.errors import BenchmarkFormatError
from fiftyone_sdcorr.core.benchmarks.formats import PairRecord, checked_points
from fiftyone_sdcorr.core.common.geometry import points_array


def alpha_key(alpha: float) -> str:
    """``0.1`` -> ``"0.10"`` (the results' keys)."""
    return f"{float(alpha):.2f}"


class PredictionsError(BenchmarkFormatError):
    """A predictions file is malformed or does not fit the pairs; the message names the
    file, the line, the pair and the field."""


# --------------------------------------------------------------------------- scoring
@dataclass
class PairScore:
    """One pair under the protocol: ``counted`` points, ``correct[i]`` at ``alphas[i]``."""

    pair: str
    category: str
    counted: int
    correct: Tuple[int, ...]
    missing: int = 0  # counted points without a prediction

    def fraction(self, i: int) -> float:
        return self.correct[i] / self.counted if self.counted else float("nan")


def score_pair(pred, gt, visible, threshold: float, alphas: Sequence[float], *, pair: str = "",
               category: str = "") -> PairScore:
    """Scores one pair's predictions.

    Args:
        pred: ``(K, 2)`` predicted target pixels (NaN: no prediction, counted as wrong).
        gt: ``(K, 2)`` ground-truth target pixels.
        visible: ``(K,)`` bool, the points that count (annotated in both images).
        threshold: ``T`` in target pixels.
        alphas: PCK alphas.
    """
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 2)
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 2)
    visible = np.asarray(visible, dtype=bool).reshape(-1)
    if not (len(pred) == len(gt) == len(visible)):
        raise ValueError(f"pair {pair!r}: {len(pred)} predictions for {len(gt)} keypoints")
    counted = visible & np.isfinite(gt).all(axis=1)
    dist = np.linalg.norm(pred - gt, axis=1)
    dist = np.where(np.isfinite(dist), dist, np.inf)[counted]
    correct = tuple(int((dist < float(a) * float(threshold)).sum()) for a in alphas)
    missing = int((~np.isfinite(pred).all(axis=1) & counted).sum())
    return PairScore(pair, category, int(counted.sum()), correct, missing)


def score_record(record: PairRecord, pred, alphas: Sequence[float]) -> PairScore:
    """:func:`score_pair` for a :class:`~fiftyone_sdcorr.core.benchmarks.formats.PairRecord`."""
    if not (math.isfinite(record.threshold) and record.threshold > 0):
        raise ValueError(f"pair {record.pair!r}: threshold size must be positive, got {record.threshold}")
    return score_pair(pred, record.trg_kps, record.visible, record.threshold, alphas,
                      pair=record.pair, category=record.category)


# --------------------------------------------------------------------------- averaging
def _pct(x: float) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else 100.0 * float(x)


def _category_block(scores: List[PairScore], alphas: Sequence[float]) -> dict:
    ev = [s for s in scores if s.counted]
    pts = sum(s.counted for s in ev)
    block = {"pairs": len(ev), "points": pts, "skipped_pairs": len(scores) - len(ev),
             "missing_predictions": sum(s.missing for s in ev), "per_point": {}, "per_image": {}}
    for i, a in enumerate(alphas):
        k = alpha_key(a)
        block["per_point"][k] = _pct(sum(s.correct[i] for s in ev) / pts) if pts else None
        block["per_image"][k] = _pct(float(np.mean([s.fraction(i) for s in ev]))) if ev else None
    return block


def aggregate(scores: Iterable[PairScore], alphas: Sequence[float]) -> dict:
    """Per category and overall PCK (module docstring), JSON-ready.

    Returns ``{"alphas", "per_point", "per_image", "per_point_pooled", "categories":
    {name: {"per_point", "per_image", "pairs", "points", "skipped_pairs",
    "missing_predictions"}}, "counts": {...}}``; values in percent, ``None`` where nothing
    was evaluated.
    """
    by_cat: Dict[str, List[PairScore]] = {}
    for s in scores:
        by_cat.setdefault(s.category, []).append(s)
    cats = {c: _category_block(by_cat[c], alphas) for c in sorted(by_cat)}
    used = {c: b for c, b in cats.items() if b["pairs"]}
    n_pairs = sum(b["pairs"] for b in used.values())
    n_points = sum(b["points"] for b in used.values())
    out = {"alphas": [alpha_key(a) for a in alphas], "per_point": {}, "per_image": {}, "per_point_pooled": {}}
    for i, a in enumerate(alphas):
        k = alpha_key(a)
        out["per_point"][k] = (sum(b["pairs"] * b["per_point"][k] for b in used.values()) / n_pairs
                               if n_pairs else None)
        out["per_image"][k] = (sum(b["pairs"] * b["per_image"][k] for b in used.values()) / n_pairs
                               if n_pairs else None)
        correct = sum(s.correct[i] for ss in by_cat.values() for s in ss if s.counted)
        out["per_point_pooled"][k] = _pct(correct / n_points) if n_points else None
    out["categories"] = cats
    out["counts"] = {
        "pairs": n_pairs, "points": n_points, "categories": len(used),
        "skipped_pairs": sum(b["skipped_pairs"] for b in cats.values()),
        "missing_predictions": sum(b["missing_predictions"] for b in cats.values()),
        "category_weights": {c: b["pairs"] for c, b in used.items()},
    }
    return out


# --------------------------------------------------------------------------- TSS: dense flow
@dataclass
class FlowScore:
    """One TSS pair under ``pck_tss.py``'s protocol: ``counted`` mask pixels,
    ``correct[i]`` of them within ``alphas[i] * L``, the end-point errors' sum over the
    predicted ones (``epe_sum`` / ``predicted`` is the pair's AEPE)."""

    pair: str
    subset: str
    category: str
    counted: int
    correct: Tuple[int, ...]
    epe_sum: float
    predicted: int
    missing: int = 0

    def fraction(self, i: int) -> float:
        return self.correct[i] / self.counted if self.counted else float("nan")


def score_flow(pred, gt, mask, threshold: float, alphas: Sequence[float], *, pair: str = "", subset: str = "",
               category: str = "") -> FlowScore:
    """Scores a predicted flow against the ground truth on the pixels of ``mask``.

    As ``run_evaluation_semantic`` in sd-dino's ``pck_tss.py``: the end-point error
    ``|pred - gt|`` at each mask pixel; correct when **at most** ``alpha * L``
    (``epe.le``: ``<=``, where the keypoint benchmarks use ``<``); ``L`` = ``threshold``,
    the source image's longer side. A mask pixel with a NaN prediction counts as wrong.

    Args:
        pred, gt: ``H x W x 2`` flows on the target's grid (target pixel + flow = source point).
        mask: ``H x W`` bool, the pixels that count.
        threshold: ``L`` in source pixels.
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if not (pred.shape == gt.shape and gt.shape[:2] == mask.shape and gt.ndim == 3 and gt.shape[2] == 2):
        raise ValueError(f"pair {pair!r}: flow {pred.shape}, ground truth {gt.shape} and mask {mask.shape} "
                         "must be H x W x 2, H x W x 2 and H x W")
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"pair {pair!r}: threshold size must be positive, got {threshold}")
    epe = np.linalg.norm(pred[mask] - gt[mask], axis=1)
    finite = np.isfinite(epe)
    scored = np.where(finite, epe, np.inf)
    correct = tuple(int((scored <= float(a) * float(threshold)).sum()) for a in alphas)
    return FlowScore(pair, subset, category, int(mask.sum()), correct, float(epe[finite].sum()),
                     int(finite.sum()), int((~finite).sum()))


def _flow_block(scores: List[FlowScore], alphas: Sequence[float]) -> dict:
    ev = [s for s in scores if s.counted]
    pixels = sum(s.counted for s in ev)
    aepe = [s.epe_sum / s.predicted for s in ev if s.predicted]
    block = {"pairs": len(ev), "pixels": pixels, "skipped_pairs": len(scores) - len(ev),
             "missing_predictions": sum(s.missing for s in ev), "per_image": {}, "per_pixel": {},
             "aepe": float(np.mean(aepe)) if aepe else None}
    for i, a in enumerate(alphas):
        k = alpha_key(a)
        block["per_image"][k] = _pct(float(np.mean([s.fraction(i) for s in ev]))) if ev else None
        block["per_pixel"][k] = _pct(sum(s.correct[i] for s in ev) / pixels) if pixels else None
    return block


def aggregate_tss(scores: Iterable[FlowScore], alphas: Sequence[float], paper: Optional[Dict] = None) -> dict:
    """Per subset PCK of TSS pairs, JSON-ready (percent; ``None`` where nothing was evaluated).

    ``per_image`` is the number sd-dino reports (``PCK_0_05_per_image``: each pair's
    fraction of correct mask pixels, averaged over the subset's pairs). ``per_pixel`` pools
    the pixels with each pair's own ``L`` (sd-dino's ``PCK_*_per_dataset`` pools them with
    the last pair's ``L`` for all: not reproduced). ``mean_of_subsets``: the subsets'
    ``per_image`` averaged. ``paper``: ``{subset: PCK@0.05}`` shown beside ours.

    Returns ``{"alphas", "subsets": {name: {"per_image", "per_pixel", "aepe", "pairs",
    "pixels", "skipped_pairs", "missing_predictions", "paper_pck_0.05"}}, "mean_of_subsets",
    "categories", "counts"}``.
    """
    scores = list(scores)
    by_sub: Dict[str, List[FlowScore]] = {}
    by_cat: Dict[str, List[FlowScore]] = {}
    for s in scores:
        by_sub.setdefault(s.subset, []).append(s)
        by_cat.setdefault(s.category, []).append(s)
    subsets = {name: _flow_block(ss, alphas) for name, ss in by_sub.items()}
    for name, b in subsets.items():
        b["paper_pck_0.05"] = (paper or {}).get(name)
    used = [b for b in subsets.values() if b["pairs"]]
    keys = [alpha_key(a) for a in alphas]
    mean = {k: (float(np.mean([b["per_image"][k] for b in used])) if used else None) for k in keys}
    return {"alphas": keys, "subsets": subsets, "mean_of_subsets": mean,
            "categories": {c: _flow_block(by_cat[c], alphas) for c in sorted(by_cat)},
            "counts": {"pairs": sum(b["pairs"] for b in used), "pixels": sum(b["pixels"] for b in used),
                       "skipped_pairs": sum(b["skipped_pairs"] for b in subsets.values()),
                       "missing_predictions": sum(b["missing_predictions"] for b in subsets.values())}}


def tss_markdown_table(result: dict, title: Optional[str] = None) -> str:
    """One row per TSS subset: pairs, pixels, per-image PCK at each alpha, AEPE and the
    paper's PCK@0.05; then the mean of the subsets."""
    keys = list(result["alphas"])
    head = ["subset", "pairs", "pixels"] + [f"PCK@{k}" for k in keys] + ["AEPE", "paper PCK@0.05"]
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, b in result["subsets"].items():
        row = [name, str(b["pairs"]), str(b["pixels"])] + [_cell(b["per_image"][k]) for k in keys]
        row += [_cell(b["aepe"]), _cell(b.get("paper_pck_0.05"))]
        lines.append("| " + " | ".join(row) + " |")
    c = result["counts"]
    row = ["**mean of subsets**", str(c["pairs"]), str(c["pixels"])]
    row += [f"**{_cell(result['mean_of_subsets'][k])}**" for k in keys] + ["", ""]
    lines.append("| " + " | ".join(row) + " |")
    lines += ["", "PCK in percent, per image (sd-dino's pck_tss.py): each pair's fraction of mask pixels whose "
                  "end-point error is at most alpha x L (L: the source image's longer side), averaged over the "
                  "subset's pairs. AEPE in pixels. paper: - where not known."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- report
def _cell(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def markdown_table(result: dict, title: Optional[str] = None) -> str:
    """A markdown table: one row per category and an overall row (per point: categories
    weighted by pairs; per image: mean over pairs)."""
    keys = list(result["alphas"])
    head = ["category", "pairs", "points"] + [f"per point @{k}" for k in keys] + [f"per image @{k}" for k in keys]
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, b in result["categories"].items():
        row = [name, str(b["pairs"]), str(b["points"])]
        row += [_cell(b["per_point"][k]) for k in keys] + [_cell(b["per_image"][k]) for k in keys]
        lines.append("| " + " | ".join(row) + " |")
    c = result["counts"]
    row = ["**all**", str(c["pairs"]), str(c["points"])]
    row += [f"**{_cell(result[kind][k])}**" for kind in ("per_point", "per_image") for k in keys]
    lines.append("| " + " | ".join(row) + " |")
    lines += ["", "PCK in percent. Per point: points pooled within a category, categories averaged with "
                  "weights = their evaluated pairs (sd-dino). Per image: mean over pairs of each pair's "
                  "fraction (GeoAware-SC). A point is correct when its error is strictly below alpha x T."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- predictions files
def _open_predictions(path: Path):
    """The file as text lines; a folder, a compressed or a non-UTF-8 file is refused."""
    if path.is_dir():
        raise PredictionsError(f"predictions file {path} is a folder")
    if not path.is_file():
        raise PredictionsError(f"predictions file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic[:4] == b"PK\x03\x04" or magic[:1] == b"\x80":
        raise PredictionsError(f"{path}: a compressed or binary file; predictions are JSON Lines text "
                               "(decompress it first)")
    return open(path, "rb")


def parse_predictions_line(line: str, where: str) -> Tuple[str, np.ndarray]:
    """One line -> ``(pair, (K, 2))``; :class:`PredictionsError` naming ``where``, the pair
    and the field otherwise."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise PredictionsError(f"{where}: not JSON ({e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("pair"), str) or "trg_kps" not in obj:
        raise PredictionsError(f'{where}: expected {{"pair": "<id>", "trg_kps": [[x, y], ...]}}')
    try:
        return obj["pair"], checked_points(obj["trg_kps"], f"{where} (pair {obj['pair']!r})", "trg_kps")
    except BenchmarkFormatError as e:
        raise PredictionsError(str(e)) from None


def read_predictions(path) -> Dict[str, np.ndarray]:
    """A predictions file (JSON Lines, module docstring) -> ``{pair: (K, 2) float64}``
    (``null`` -> NaN). Blank lines are skipped; a malformed line or a pair given twice
    raises :class:`PredictionsError` naming the file, the line, the pair and the field."""
    path = Path(path)
    out: Dict[str, np.ndarray] = {}
    with _open_predictions(path) as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise PredictionsError(f"{path}, line {n}: not UTF-8 text; predictions are JSON Lines") from None
            if not line.strip():
                continue
            pair, pts = parse_predictions_line(line, f"{path}, line {n}")
            if pair in out:
                raise PredictionsError(f"{path}, line {n}: pair {pair!r} appears twice")
            out[pair] = pts
    return out


def predictions_line(pair: str, trg_kps) -> str:
    """One line of a predictions file (NaN written as ``null``)."""
    pts = points_array(np.asarray(trg_kps, dtype=np.float64).reshape(-1, 2).tolist())
    rows = [[round(float(x), 4), round(float(y), 4)] if np.isfinite([x, y]).all() else None for x, y in pts]
    return json.dumps({"pair": pair, "trg_kps": rows})


def score_predictions(records: Sequence[PairRecord], predictions: Dict[str, np.ndarray],
                      alphas: Sequence[float], source: Optional[str] = None) -> List[PairScore]:
    """Scores each record with its predictions; every record must have predictions of
    the right length (extra predictions, e.g. of pairs not sampled, are ignored).
    ``source``: the predictions file, for the messages."""
    where = f"{source}: " if source else ""
    missing = [r.pair for r in records if r.pair not in predictions]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise PredictionsError(f"{where}no predictions for {len(missing)} of {len(records)} pairs: "
                               f"{', '.join(missing[:5])}{more}")
    scores = []
    for r in records:
        pred = predictions[r.pair]
        if len(pred) != len(r.src_kps):
            raise PredictionsError(f"{source or 'predictions'} (pair {r.pair!r}): field 'trg_kps' holds {len(pred)} "
                                   f"predicted points, but the pair has {len(r.src_kps)} source keypoints (one "
                                   "[x, y] or null each, in order)")
        scores.append(score_record(r, pred, alphas))
    return scores


__all__ = [
    "alpha_key", "PredictionsError", "PairScore", "score_pair", "score_record", "aggregate",
    "markdown_table", "read_predictions", "parse_predictions_line", "predictions_line", "score_predictions",
    "FlowScore", "score_flow", "aggregate_tss", "tss_markdown_table",
]
