"""PCK evaluation of predicted keypoints against ground truth, as a FiftyOne evaluation run.

Definitions
-----------
- Instances: predicted and ground-truth ``fo.Keypoint`` objects of a sample are paired
  by :func:`fiftyone_sdcorr.dataset.pck.match_instances`, never by list order: first
  by their FiftyOne ``instance`` link (the same ``fo.Instance`` id), then by an optimal
  assignment on an OKS-like cost (same label only; the points visible in both, scaled
  by the size of the ground-truth object). The result does not depend on the order of
  either list. Points are paired by index. A ground-truth instance left unmatched (on
  a sample that has predictions) counts its visible points as ``missed`` and is counted
  in ``instances``; samples without any prediction are not evaluated.
- A ground-truth point is **visible** when it has finite coordinates and its
  ``visible`` entry (when the keypoint has that list attribute) is not 0 / False (COCO
  ``v=1``, labelled but occluded, is visible).
- A point **counts** when it is visible in both: a visible ground-truth point and a
  finite (not ``[nan, nan]``) prediction. Ground-truth points whose prediction is missing or
  NaN are reported as ``missed`` but do not count.
- Threshold size ``T`` per target instance, in pixels of the target image:
  ``threshold="bbox"`` (default): ``max(w, h)`` of the matched object's box from
  ``bbox_field`` (a ``fo.Detections``/``fo.Detection`` field: the detection linked to
  the ground truth by the same ``instance`` id, else the one with the same label, else
  any, with the most ground-truth points inside it); without ``bbox_field``, the
  extent ``max(x_max - x_min, y_max - y_min)`` of the visible ground-truth points.
  ``threshold="image"``: ``max(image width, image height)`` (PF-Pascal).
- A point is **correct at alpha** when ``||pred - gt|| < alpha * T`` (pixels; strictly below, as the paper's code).
- **Per-point PCK** of a label: correct / counted points pooled over all instances of
  that label; overall per-point PCK = the mean over labels (SPair-71k style); the pooled
  value over all points is reported too (``pooled``).
- **Per-image PCK**: for each sample, correct / counted over all its points; per label:
  the mean over samples of the per-sample PCK restricted to that label; overall: the mean
  over samples.

Fields written (removed again by ``dataset.delete_evaluation(eval_key)``):
- on each predicted ``fo.Keypoint``: ``{eval_key}_correct`` (per-point list: True /
  False at the first alpha, None where the point does not count) and ``{eval_key}_dist``
  (per-point ``distance / T``, None where it does not count; filter any alpha with it);
- on each sample: ``{eval_key}`` (a float: per-image PCK at the first alpha; None when no
  point counts).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import numpy as np

import fiftyone as fo
import fiftyone.core.evaluation as foe

from fiftyone_sdcorr.dataset.config import EvaluationConfig
from fiftyone_sdcorr.dataset.engine import (
    ParameterError,
    Run,
    RunSummary,
    checks_done,
    image_collection,
    require_field,
    values_or_none,
)
from fiftyone_sdcorr.dataset.pck import image_size_of, instance_id, match_instances, points_of, threshold_size
from fiftyone_sdcorr.dataset.progress import ProgressArg
from fiftyone_sdcorr.dataset.units import Units

logger = logging.getLogger(__name__)

FUNCTION = "evaluate_keypoints"
DEFAULT_ALPHAS = EvaluationConfig.alphas
NO_LABEL = "(no label)"


# --------------------------------------------------------------------------- run classes
class KeypointPCKEvaluationConfig(foe.EvaluationMethodConfig):
    """Configuration of a keypoint PCK evaluation run."""

    def __init__(self, pred_field, gt_field, alphas=DEFAULT_ALPHAS, bbox_field=None,
                 threshold=EvaluationConfig.threshold, **kwargs):
        super().__init__(**kwargs)
        self.pred_field = pred_field
        self.gt_field = gt_field
        self.alphas = [float(a) for a in alphas]
        self.bbox_field = bbox_field
        self.threshold = threshold

    @property
    def type(self):
        return "evaluation"

    @property
    def method(self):
        return "sdcorr-pck"


class KeypointPCKEvaluation(foe.EvaluationMethod):
    """The run class FiftyOne builds from :class:`KeypointPCKEvaluationConfig`."""

    def get_fields(self, samples, eval_key):
        return [
            f"{eval_key}",
            f"{self.config.pred_field}.keypoints.{eval_key}_correct",
            f"{self.config.pred_field}.keypoints.{eval_key}_dist",
        ]

    def cleanup(self, samples, eval_key):
        dataset = samples._root_dataset
        pred = self.config.pred_field
        # label attributes first, then the sample field
        for name in (f"{eval_key}_correct", f"{eval_key}_dist"):
            path = f"{pred}.keypoints.{name}"
            if dataset.has_sample_field(path):
                dataset.delete_sample_field(path, error_level=1)
            else:  # undeclared dynamic attribute: unset it in place
                _unset_label_attribute(dataset, pred, name)
        if dataset.has_sample_field(f"{eval_key}"):
            dataset.delete_sample_field(f"{eval_key}", error_level=1)

    def rename(self, samples, eval_key, new_eval_key):
        dataset = samples._root_dataset
        pred = self.config.pred_field
        if dataset.has_sample_field(eval_key):
            dataset.rename_sample_field(eval_key, new_eval_key)
        # label attributes: copied by hand (FiftyOne's rename of embedded list fields
        # would turn a None label field into an empty fo.Keypoints)
        view = dataset.exists(pred)
        ids = view.values("id")
        for name in ("correct", "dist"):
            old, new = f"{pred}.keypoints.{eval_key}_{name}", f"{pred}.keypoints.{new_eval_key}_{name}"
            if not dataset.has_sample_field(old):
                continue
            values = view.values(old)
            if not dataset.has_sample_field(new):
                dataset.add_sample_field(new, fo.ListField)
            dataset.set_values(new, dict(zip(ids, values)), key_field="id")
            dataset.delete_sample_field(old)


def _unset_label_attribute(dataset, pred_field, name):
    view = dataset.exists(pred_field)
    for sample in view.iter_samples(autosave=True):
        kps = sample[pred_field]
        for kp in kps.keypoints or []:
            if kp.has_field(name):
                kp.clear_field(name)


class KeypointPCKResults(foe.EvaluationResults):
    """PCK numbers of one evaluation run; ``report()`` / ``print_report()``.

    Attributes:
        alphas: the alphas, in order.
        per_point: ``{alpha: {"labels": {label: pck}, "mean": m, "pooled": p}}`` with
            per-point PCK (pooled over points within a label).
        per_image: ``{alpha: {"labels": {label: pck}, "mean": m}}`` with per-image PCK.
        counts: ``{label: {"points": n_counted, "missed": n, "instances": n, "images": n}}``.
        sample_pck: ``{sample_id: per-image PCK at each alpha (list)}``.
    """

    def __init__(self, samples, config, eval_key, alphas, per_point, per_image, counts, sample_pck,
                 num_samples=0, num_evaluated=0, backend=None):
        super().__init__(samples, config, eval_key, backend=backend)
        self.alphas = [float(a) for a in alphas]
        self.per_point = per_point
        self.per_image = per_image
        self.counts = counts
        self.sample_pck = sample_pck
        self.num_samples = int(num_samples)
        self.num_evaluated = int(num_evaluated)

    def attributes(self):
        return ["cls", "alphas", "per_point", "per_image", "counts", "sample_pck", "num_samples", "num_evaluated"]

    @classmethod
    def _from_dict(cls, d, samples, config, eval_key):
        return cls(samples, config, eval_key, d["alphas"], d["per_point"], d["per_image"], d["counts"],
                   d.get("sample_pck", {}), d.get("num_samples", 0), d.get("num_evaluated", 0))

    def get_meta(self):
        a = _akey(self.alphas[0]) if self.alphas else None
        return {
            "num_samples": self.num_samples,
            "num_evaluated": self.num_evaluated,
            "pck_per_point": (self.per_point.get(a) or {}).get("mean") if a else None,
            "pck_per_image": (self.per_image.get(a) or {}).get("mean") if a else None,
        }

    def pck(self, alpha=None, kind="per_point", label=None):
        """One number: PCK at ``alpha`` (default: the first), ``kind`` ``"per_point"`` /
        ``"per_image"`` / ``"pooled"``, overall or for ``label``."""
        a = _akey(self.alphas[0] if alpha is None else alpha)
        table = self.per_image if kind == "per_image" else self.per_point
        if a not in table:
            raise KeyError(f"alpha {alpha} not evaluated; alphas: {self.alphas}")
        if label is not None:
            return table[a]["labels"].get(label)
        return table[a]["pooled" if kind == "pooled" else "mean"]

    def report(self) -> dict:
        """``{"alphas", "per_point", "per_image", "counts", "num_samples", "num_evaluated"}``."""
        return {
            "alphas": list(self.alphas),
            "per_point": self.per_point,
            "per_image": self.per_image,
            "counts": self.counts,
            "num_samples": self.num_samples,
            "num_evaluated": self.num_evaluated,
        }

    def report_str(self) -> str:
        labels = sorted(self.counts)
        head = ["label", "points", "missed", "images"]
        for a in self.alphas:
            head += [f"pt@{a:g}", f"img@{a:g}"]
        rows = []
        for lab in labels + ["(mean)"]:
            c = self.counts.get(lab, {})
            if lab == "(mean)":
                row = [lab, str(sum(v["points"] for v in self.counts.values())),
                       str(sum(v["missed"] for v in self.counts.values())), str(self.num_evaluated)]
            else:
                row = [lab, str(c.get("points", 0)), str(c.get("missed", 0)), str(c.get("images", 0))]
            for a in self.alphas:
                k = _akey(a)
                pp = self.per_point[k]["mean"] if lab == "(mean)" else self.per_point[k]["labels"].get(lab)
                pi = self.per_image[k]["mean"] if lab == "(mean)" else self.per_image[k]["labels"].get(lab)
                row += [_fmt(pp), _fmt(pi)]
            rows.append(row)
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        line = lambda r: "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
        out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
        out.append("pt = per-point PCK (pooled within a label; mean over labels); "
                   "img = per-image PCK (mean over images)")
        return "\n".join(out)

    def print_report(self):
        print(self.report_str())


def _fmt(v):
    return "-" if v is None else f"{100.0 * v:.1f}"


def _akey(a) -> str:
    """Alphas as dict keys (JSON/BSON need string keys)."""
    return f"{float(a):g}"


# --------------------------------------------------------------------------- public API
def evaluate_keypoints(
    samples,
    pred_field: str,
    gt_field: str,
    *,
    eval_key: Optional[str] = EvaluationConfig.eval_key,  # None is a value here: compute only
    alphas: Optional[Sequence[float]] = None,
    bbox_field: Optional[str] = None,
    threshold: Optional[str] = None,
    overwrite: Optional[bool] = None,
    patches_field: Optional[str] = None,
    progress: ProgressArg = None,
) -> KeypointPCKResults:
    """PCK of ``pred_field`` against ``gt_field`` (module docstring for the definitions).

    Atomic: everything is checked and computed before the run is registered; a failure
    while writing removes the run and what it wrote.

    Keywords default to ``None``: the default of
    :class:`~fiftyone_sdcorr.dataset.config.EvaluationConfig`, except ``eval_key``, where
    ``None`` means "compute only" (as in FiftyOne's own ``evaluate_*`` functions).

    Args:
        samples: a dataset or view.
        pred_field, gt_field: ``fo.Keypoints`` fields.
        eval_key: the evaluation key (``dataset.list_evaluations()``;
            ``dataset.load_evaluation_results(eval_key)`` returns the
            :class:`KeypointPCKResults`); ``None``: compute only, write nothing.
        alphas: PCK thresholds in (0, 1]; the first one is written per point / per sample.
        bbox_field: a ``fo.Detections`` field giving the object's box (``threshold="bbox"``).
        patches_field: the objects (a ``fo.Detections`` field, or a ``to_patches()`` view):
            their samples are evaluated, their boxes are the default ``bbox_field``.
        threshold: ``"bbox"`` (box, else the extent of the ground-truth points) or
            ``"image"`` (``max(width, height)``).
        overwrite: replace an existing evaluation with the same key.
        progress: True/False/None or ``callable(fraction, label)``.
    """
    # 1. check every parameter and field before anything is registered or written
    if hasattr(samples, "_root_dataset"):  # objects: their samples, their boxes (else checked below)
        units = Units(samples, patches_field)
        samples, bbox_field = units.samples, bbox_field or units.patches_field
    cfg = EvaluationConfig.build(pred_field=pred_field, gt_field=gt_field, eval_key=eval_key, alphas=alphas,
                                 bbox_field=bbox_field, threshold=threshold, overwrite=overwrite)
    check_evaluation(samples, cfg)
    checks_done()
    # 2. compute every number (nothing written yet)
    tally = _Tally(cfg.alphas)
    ids = samples.values("id")
    rows = map(EvalRow, ids, samples.values("filepath"), samples.values("metadata"), samples.values(cfg.pred_field),
               samples.values(cfg.gt_field), values_or_none(samples, cfg.bbox_field, len(ids)))
    summary = RunSummary(FUNCTION, ("samples", "evaluated"), eval_key=cfg.eval_key)
    with Run(samples, summary, len(ids), progress, "evaluating") as run:
        for row in rows:
            tally.add_sample(row, cfg, summary)
            run.step(1)
    config = KeypointPCKEvaluationConfig(cfg.pred_field, cfg.gt_field, alphas=cfg.alphas, bbox_field=cfg.bbox_field,
                                         threshold=cfg.threshold)
    method = config.build()
    results = tally.results(samples, config, cfg.eval_key, method, len(ids))
    results.summary = summary
    # 3. register the run and write its fields; a failure leaves nothing behind
    if cfg.eval_key is not None:
        _save_run(samples, cfg, method, results, tally)
    return results


def check_evaluation(samples, cfg: EvaluationConfig) -> None:
    image_collection(samples)
    require_field(samples, "pred_field", cfg.pred_field, "keypoints")
    require_field(samples, "gt_field", cfg.gt_field, "keypoints")
    if cfg.bbox_field is not None:
        require_field(samples, "bbox_field", cfg.bbox_field, "detections")
    if cfg.eval_key is None:
        return
    root = samples._root_dataset
    if cfg.eval_key in root.list_evaluations():
        if not cfg.overwrite:
            raise ParameterError(f"parameter 'eval_key': an evaluation {cfg.eval_key!r} exists; pass "
                                 "overwrite=True or choose another eval_key")
        return
    if cfg.eval_key in root.list_brain_runs() + root.list_runs():
        raise ParameterError(f"parameter 'eval_key': {cfg.eval_key!r} is the key of another run")
    taken = [f for f in (cfg.eval_key, f"{cfg.pred_field}.keypoints.{cfg.eval_key}_correct",
                         f"{cfg.pred_field}.keypoints.{cfg.eval_key}_dist") if root.has_sample_field(f)]
    if taken:
        raise ParameterError(f"parameter 'eval_key': {cfg.eval_key!r} would write to existing field(s) {taken}; "
                             "choose another eval_key")


def _save_run(samples, cfg: EvaluationConfig, method, results, tally) -> None:
    root, key = samples._root_dataset, cfg.eval_key
    if key in root.list_evaluations():
        root.delete_evaluation(key)
    method.register_run(samples, key, overwrite=cfg.overwrite)
    try:
        if tally.correct_values:
            for name in ("correct", "dist"):
                path = f"{cfg.pred_field}.keypoints.{key}_{name}"
                if not root.has_sample_field(path):
                    root.add_sample_field(path, fo.ListField)  # a plain list: None = does not count
            root.set_values(f"{cfg.pred_field}.keypoints.{key}_correct", tally.correct_values, key_field="id")
            root.set_values(f"{cfg.pred_field}.keypoints.{key}_dist", tally.dist_values, key_field="id")
        if not root.has_sample_field(key):
            root.add_sample_field(key, fo.FloatField)
        if tally.pck_values:
            root.set_values(key, tally.pck_values, key_field="id")
        method.save_run_results(samples, key, results)
    except BaseException:
        root.delete_evaluation(key)  # its cleanup removes the fields written so far
        raise


class EvalRow(NamedTuple):
    """One sample as the evaluation reads it."""

    sample_id: str
    filepath: str
    metadata: Any
    pred: Any  # fo.Keypoints or None
    gt: Any
    boxes: Any  # fo.Detections of bbox_field, or None


class _Tally:
    """PCK counts accumulated sample by sample (module docstring for the definitions)."""

    def __init__(self, alphas):
        self.alphas = list(alphas)
        na = len(self.alphas)
        self.zero = lambda: np.zeros(na)  # noqa: E731
        self.lab_correct: Dict[str, np.ndarray] = {}
        self.lab_count: Dict[str, int] = {}
        self.lab_missed: Dict[str, int] = {}
        self.lab_inst: Dict[str, int] = {}
        self.lab_images: Dict[str, List[np.ndarray]] = {}
        self.sample_pck: Dict[str, List[float]] = {}
        self.img_pcks: List[np.ndarray] = []
        self.correct_values, self.dist_values, self.pck_values = {}, {}, {}

    def add_sample(self, row: "EvalRow", cfg, summary) -> None:
        summary.add("samples")
        pk = list(row.pred.keypoints) if row.pred is not None and row.pred.keypoints else []
        gk = list(row.gt.keypoints) if row.gt is not None and row.gt.keypoints else []
        if not pk or not gk:
            return
        try:
            w, h = image_size_of(row.filepath, row.metadata)
        except Exception as e:  # noqa: BLE001
            summary.fail(row.sample_id, f"no image size for {row.filepath}: {e}")
            return
        per_kp = {"correct": [[None] * len(kp.points or []) for kp in pk],
                  "dist": [[None] * len(kp.points or []) for kp in pk]}
        s_correct, s_count, s_lab = self.zero(), 0, {}
        boxes = row.boxes if cfg.bbox_field else None
        pairs = match_instances(pk, gk, w, h, boxes)
        self._count_missed(gk, {j for _, j in pairs})
        for i, j in pairs:
            got = self._score_pair(pk[i], gk[j], (w, h), boxes, cfg, per_kp, i)
            if got is None:
                continue
            lab, c, n = got
            acc = s_lab.setdefault(lab, [self.zero(), 0])
            acc[0] += c
            acc[1] += n
            s_correct, s_count = s_correct + c, s_count + n
        self.correct_values[row.sample_id], self.dist_values[row.sample_id] = per_kp["correct"], per_kp["dist"]
        self._add_image(row.sample_id, s_correct, s_count, s_lab, summary)

    def _count_missed(self, gk, matched) -> None:
        """Unmatched ground truth: every visible point missed."""
        for j in sorted(set(range(len(gk))) - matched):
            lab = gk[j].label if gk[j].label is not None else NO_LABEL
            self.lab_inst[lab] = self.lab_inst.get(lab, 0) + 1
            n_vis = int(np.isfinite(points_of(gk[j])).all(axis=1).sum())
            self.lab_missed[lab] = self.lab_missed.get(lab, 0) + n_vis

    def _score_pair(self, pred, gt, size, boxes, cfg, per_kp, i):
        """``(label, correct per alpha, points counted)`` of one matched instance pair (None
        when nothing counts); per-point values into ``per_kp``."""
        w, h = size
        scale = np.array([w, h], dtype=np.float64)
        p, g = points_of(pred) * scale, points_of(gt) * scale
        k = min(len(p), len(g))
        lab = gt.label if gt.label is not None else NO_LABEL
        T = threshold_size(cfg.threshold, boxes, gt.label, g, w, h, instance_id(gt))
        self.lab_inst[lab] = self.lab_inst.get(lab, 0) + 1
        gvis, pvis = np.isfinite(g[:k]).all(axis=1), np.isfinite(p[:k]).all(axis=1)
        both = gvis & pvis
        self.lab_missed[lab] = self.lab_missed.get(lab, 0) + int((gvis & ~pvis).sum())
        if T is None or not both.any():
            return None
        d = np.linalg.norm(p[:k] - g[:k], axis=1) / T
        corr = np.stack([(d < a) & both for a in self.alphas])  # strictly below, as the paper's code
        n, c = int(both.sum()), corr.sum(axis=1).astype(np.float64)
        self.lab_correct[lab] = self.lab_correct.get(lab, self.zero()) + c
        self.lab_count[lab] = self.lab_count.get(lab, 0) + n
        for q in np.nonzero(both)[0]:
            per_kp["correct"][i][q], per_kp["dist"][i][q] = bool(corr[0, q]), float(d[q])
        return lab, c, n

    def _add_image(self, sid, s_correct, s_count, s_lab, summary) -> None:
        if not s_count:
            self.pck_values[sid] = None
            return
        summary.add("evaluated")
        v = s_correct / s_count
        self.img_pcks.append(v)
        self.sample_pck[sid] = [float(x) for x in v]
        self.pck_values[sid] = float(v[0])
        for lab, (c, n) in s_lab.items():
            self.lab_images.setdefault(lab, []).append(c / n)

    def results(self, samples, config, eval_key, method, n_samples) -> KeypointPCKResults:
        labels = sorted(set(self.lab_inst))
        per_point, per_image = {}, {}
        total = sum(self.lab_count.values())
        for ai, a in enumerate(self.alphas):
            lp = {lab: float(self.lab_correct[lab][ai] / self.lab_count[lab]) for lab in labels
                  if self.lab_count.get(lab)}
            per_point[_akey(a)] = {
                "labels": lp,
                "mean": float(np.mean(list(lp.values()))) if lp else None,
                "pooled": float(sum(self.lab_correct[lab][ai] for lab in lp) / total) if total else None,
            }
            li = {lab: float(np.mean([v[ai] for v in self.lab_images[lab]])) for lab in labels
                  if self.lab_images.get(lab)}
            per_image[_akey(a)] = {"labels": li,
                                   "mean": float(np.mean([v[ai] for v in self.img_pcks])) if self.img_pcks else None}
        counts = {
            lab: {"points": int(self.lab_count.get(lab, 0)), "missed": int(self.lab_missed.get(lab, 0)),
                  "instances": int(self.lab_inst.get(lab, 0)), "images": len(self.lab_images.get(lab, []))}
            for lab in labels
        }
        return KeypointPCKResults(samples, config, eval_key, self.alphas, per_point, per_image, counts,
                                  self.sample_pck, num_samples=n_samples, num_evaluated=len(self.img_pcks),
                                  backend=method)


__all__ = [
    "evaluate_keypoints",
    "KeypointPCKEvaluation",
    "KeypointPCKEvaluationConfig",
    "KeypointPCKResults",
    "DEFAULT_ALPHAS",
]
