"""PCK evaluation of predicted keypoints against ground truth, as a FiftyOne evaluation run.

Definitions (RECIPE.md, "Evaluation protocol")
----------------------------------------------
- Instances: predicted and ground-truth ``fo.Keypoint`` objects are paired by label and
  order: the ``j``-th predicted instance labelled ``L`` with the ``j``-th ground-truth
  instance labelled ``L``. Points are paired by index.
- A point **counts** when it is visible in both: finite ground truth and a finite
  (not ``[nan, nan]``) prediction. Ground-truth points whose prediction is missing or
  NaN are reported as ``missed`` but do not count.
- Threshold size ``T`` per target instance, in pixels of the target image:
  ``threshold="bbox"`` (default): ``max(w, h)`` of the object's box from ``bbox_field``
  (a ``fo.Detections``/``fo.Detection`` field: the detection with the same label, else
  the one with the most ground-truth points inside it); without ``bbox_field``, the
  extent ``max(x_max - x_min, y_max - y_min)`` of the visible ground-truth points.
  ``threshold="image"``: ``max(image width, image height)`` (PF-Pascal).
- A point is **correct at alpha** when ``||pred - gt|| <= alpha * T`` (pixels).
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
import math
from typing import Dict, List, Optional, Sequence

import numpy as np

import fiftyone as fo
import fiftyone.core.evaluation as foe

from fiftyone_sdcorr.images import image_size
from fiftyone_sdcorr.progress import Progress, ProgressArg

logger = logging.getLogger(__name__)

DEFAULT_ALPHAS = (0.10, 0.05, 0.01)
THRESHOLDS = ("bbox", "image")
NO_LABEL = "(no label)"


# --------------------------------------------------------------------------- run classes
class KeypointPCKEvaluationConfig(foe.EvaluationMethodConfig):
    """Configuration of a keypoint PCK evaluation run."""

    def __init__(self, pred_field, gt_field, alphas=DEFAULT_ALPHAS, bbox_field=None, threshold="bbox", **kwargs):
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


# --------------------------------------------------------------------------- geometry
def _points(kp) -> np.ndarray:
    raw = kp.points or []
    out = np.full((len(raw), 2), np.nan)
    for i, xy in enumerate(raw):
        try:
            x, y = float(xy[0]), float(xy[1])
        except (TypeError, ValueError, IndexError):
            continue
        if math.isfinite(x) and math.isfinite(y):
            out[i] = (x, y)
    return out


def _pair_instances(pred, gt):
    """[(pred_index, gt_index)] paired by label and order within the label."""
    by_label: Dict[Optional[str], List[int]] = {}
    for i, kp in enumerate(gt):
        by_label.setdefault(kp.label, []).append(i)
    used: Dict[Optional[str], int] = {}
    pairs = []
    for i, kp in enumerate(pred):
        j = used.get(kp.label, 0)
        cands = by_label.get(kp.label, [])
        if j < len(cands):
            pairs.append((i, cands[j]))
        used[kp.label] = j + 1
    return pairs


def _box_size(dets, label, gt_px, w, h) -> Optional[float]:
    if dets is None:
        return None
    items = dets.detections if isinstance(dets, fo.Detections) else [dets]
    items = [d for d in items if d is not None and d.bounding_box is not None]
    if not items:
        return None
    same = [d for d in items if d.label == label]
    pool = same or items
    if len(pool) > 1:
        def inside(d):
            x, y, bw, bh = d.bounding_box
            vis = gt_px[np.isfinite(gt_px).all(axis=1)]
            return int(((vis[:, 0] >= x * w) & (vis[:, 0] <= (x + bw) * w)
                        & (vis[:, 1] >= y * h) & (vis[:, 1] <= (y + bh) * h)).sum())
        pool = sorted(pool, key=inside, reverse=True)
    _, _, bw, bh = pool[0].bounding_box
    return float(max(bw * w, bh * h))


def _extent(gt_px) -> Optional[float]:
    vis = gt_px[np.isfinite(gt_px).all(axis=1)]
    if len(vis) < 2:
        return None
    span = vis.max(axis=0) - vis.min(axis=0)
    size = float(max(span))
    return size if size > 0 else None


def _size_of(sample_filepath, metadata):
    try:
        return image_size(sample_filepath)
    except Exception:  # noqa: BLE001 -- fall back to FiftyOne's metadata
        if metadata is not None and metadata.width and metadata.height:
            return int(metadata.width), int(metadata.height)
        raise


# --------------------------------------------------------------------------- public API
def evaluate_keypoints(
    samples,
    pred_field: str,
    gt_field: str,
    *,
    eval_key: Optional[str] = "sdcorr_pck",
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    bbox_field: Optional[str] = None,
    threshold: str = "bbox",
    overwrite: bool = True,
    progress: ProgressArg = True,
) -> KeypointPCKResults:
    """PCK of ``pred_field`` against ``gt_field`` (module docstring for the definitions).

    Args:
        samples: a dataset or view.
        pred_field, gt_field: ``fo.Keypoints`` fields.
        eval_key: the evaluation key (``dataset.list_evaluations()``;
            ``dataset.load_evaluation_results(eval_key)`` returns the
            :class:`KeypointPCKResults`); ``None``: compute only, write nothing.
        alphas: PCK thresholds; the first one is written per point / per sample.
        bbox_field: a ``fo.Detections`` field giving the object's box (``threshold="bbox"``).
        threshold: ``"bbox"`` (box, else the extent of the ground-truth points) or
            ``"image"`` (``max(width, height)``).
        overwrite: replace an existing evaluation with the same key.
        progress: True/False or ``callable(fraction, label)``.
    """
    alphas = [float(a) for a in alphas]
    if not alphas or any(not (a > 0) for a in alphas):
        raise ValueError(f"alphas must be positive numbers, got {alphas}")
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
    root = samples._root_dataset
    for name, f in (("pred_field", pred_field), ("gt_field", gt_field)):
        if not root.has_sample_field(f):
            raise ValueError(f"{name} {f!r} does not exist on dataset {root.name!r}")
    if bbox_field and not root.has_sample_field(bbox_field):
        raise ValueError(f"bbox_field {bbox_field!r} does not exist on dataset {root.name!r}")
    if pred_field == gt_field:
        raise ValueError("pred_field and gt_field must differ")

    config = KeypointPCKEvaluationConfig(pred_field, gt_field, alphas=alphas, bbox_field=bbox_field,
                                         threshold=threshold)
    method = config.build()
    if eval_key is not None:
        if eval_key not in root.list_evaluations():
            taken = [f for f in (eval_key, f"{pred_field}.keypoints.{eval_key}_correct",
                                 f"{pred_field}.keypoints.{eval_key}_dist") if root.has_sample_field(f)]
            if taken:
                raise ValueError(f"eval_key {eval_key!r} would write to existing field(s) {taken}; "
                                 "choose another eval_key")
        if eval_key in root.list_evaluations() and overwrite:
            root.delete_evaluation(eval_key)
        method.register_run(samples, eval_key, overwrite=overwrite)

    ids = samples.values("id")
    fps = samples.values("filepath")
    metas = samples.values("metadata")
    preds = samples.values(pred_field)
    gts = samples.values(gt_field)
    boxes = samples.values(bbox_field) if bbox_field else [None] * len(ids)

    na = len(alphas)
    # label -> [correct per alpha], counted, missed, instances
    lab_correct: Dict[str, np.ndarray] = {}
    lab_count: Dict[str, int] = {}
    lab_missed: Dict[str, int] = {}
    lab_inst: Dict[str, int] = {}
    lab_images: Dict[str, List[np.ndarray]] = {}  # per-image per-label pck vectors
    sample_pck: Dict[str, List[Optional[float]]] = {}
    img_pcks: List[np.ndarray] = []
    correct_values, dist_values, pck_values = {}, {}, {}
    evaluated = 0

    bar = Progress(progress, len(ids), "evaluating")
    try:
        for sid, fp, meta, pred, gt, box in zip(ids, fps, metas, preds, gts, boxes):
            bar.update(1)
            pk = list(pred.keypoints) if pred is not None and pred.keypoints else []
            gk = list(gt.keypoints) if gt is not None and gt.keypoints else []
            if not pk or not gk:
                continue
            try:
                w, h = _size_of(fp, meta)
            except Exception as e:  # noqa: BLE001
                logger.warning("sample %s: no image size (%s); skipped", sid, e)
                continue
            scale = np.array([w, h], dtype=np.float64)
            per_kp_correct = [[None] * len(kp.points or []) for kp in pk]
            per_kp_dist = [[None] * len(kp.points or []) for kp in pk]
            s_correct = np.zeros(na)
            s_count = 0
            s_lab: Dict[str, List] = {}
            for i, j in _pair_instances(pk, gk):
                p = _points(pk[i]) * scale
                g = _points(gk[j]) * scale
                k = min(len(p), len(g))
                lab = gk[j].label if gk[j].label is not None else NO_LABEL
                if threshold == "image":
                    T = float(max(w, h))
                else:
                    T = _box_size(box, gk[j].label, g, w, h) if bbox_field else None
                    if T is None:
                        T = _extent(g)
                lab_inst[lab] = lab_inst.get(lab, 0) + 1
                gvis = np.isfinite(g[:k]).all(axis=1)
                pvis = np.isfinite(p[:k]).all(axis=1)
                both = gvis & pvis
                lab_missed[lab] = lab_missed.get(lab, 0) + int((gvis & ~pvis).sum())
                if T is None or not both.any():
                    continue
                d = np.linalg.norm(p[:k] - g[:k], axis=1) / T
                corr = np.stack([(d <= a) & both for a in alphas])  # na x k
                n = int(both.sum())
                c = corr.sum(axis=1).astype(np.float64)
                lab_correct[lab] = lab_correct.get(lab, np.zeros(na)) + c
                lab_count[lab] = lab_count.get(lab, 0) + n
                acc = s_lab.setdefault(lab, [np.zeros(na), 0])
                acc[0] += c
                acc[1] += n
                s_correct += c
                s_count += n
                for q in np.nonzero(both)[0]:
                    per_kp_correct[i][q] = bool(corr[0, q])
                    per_kp_dist[i][q] = float(d[q])
            correct_values[sid] = per_kp_correct
            dist_values[sid] = per_kp_dist
            if s_count:
                evaluated += 1
                v = s_correct / s_count
                img_pcks.append(v)
                sample_pck[sid] = [float(x) for x in v]
                pck_values[sid] = float(v[0])
                for lab, (c, n) in s_lab.items():
                    lab_images.setdefault(lab, []).append(c / n)
            else:
                pck_values[sid] = None
    finally:
        bar.close()

    labels = sorted(set(lab_inst))
    per_point, per_image = {}, {}
    for ai, a in enumerate(alphas):
        k = _akey(a)
        lp = {lab: float(lab_correct[lab][ai] / lab_count[lab]) for lab in labels if lab_count.get(lab)}
        total = sum(lab_count.values())
        per_point[k] = {
            "labels": lp,
            "mean": float(np.mean(list(lp.values()))) if lp else None,
            "pooled": float(sum(lab_correct[lab][ai] for lab in lp) / total) if total else None,
        }
        li = {lab: float(np.mean([v[ai] for v in lab_images[lab]])) for lab in labels if lab_images.get(lab)}
        per_image[k] = {"labels": li, "mean": float(np.mean([v[ai] for v in img_pcks])) if img_pcks else None}
    counts = {
        lab: {"points": int(lab_count.get(lab, 0)), "missed": int(lab_missed.get(lab, 0)),
              "instances": int(lab_inst.get(lab, 0)), "images": len(lab_images.get(lab, []))}
        for lab in labels
    }
    results = KeypointPCKResults(samples, config, eval_key, alphas, per_point, per_image, counts, sample_pck,
                                 num_samples=len(ids), num_evaluated=evaluated, backend=method)

    if eval_key is not None:
        view = root.select(list(correct_values)) if correct_values else None
        if view is not None:
            for name in ("correct", "dist"):
                path = f"{pred_field}.keypoints.{eval_key}_{name}"
                if not root.has_sample_field(path):
                    # a plain list: None marks points that do not count
                    root.add_sample_field(path, fo.ListField)
            root.set_values(f"{pred_field}.keypoints.{eval_key}_correct", correct_values, key_field="id")
            root.set_values(f"{pred_field}.keypoints.{eval_key}_dist", dist_values, key_field="id")
        if not root.has_sample_field(f"{eval_key}"):
            root.add_sample_field(f"{eval_key}", fo.FloatField)
        if pck_values:
            root.set_values(f"{eval_key}", pck_values, key_field="id")
        method.save_run_results(samples, eval_key, results)
    return results


__all__ = [
    "evaluate_keypoints",
    "KeypointPCKEvaluation",
    "KeypointPCKEvaluationConfig",
    "KeypointPCKResults",
    "DEFAULT_ALPHAS",
]
