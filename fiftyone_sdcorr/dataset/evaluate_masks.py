"""``evaluate_masks``: intersection over union of predicted masks against ground truth.

- **Images** (``fo.Segmentation`` fields): FiftyOne's own
  ``samples.evaluate_segmentations(pred_field, gt_field=..., eval_key=..., mask_targets=...)``
  runs and, with an ``eval_key``, is stored as FiftyOne's evaluation run (the App's
  evaluation panel shows it: per-sample accuracy / precision / recall fields, the pixel
  confusion matrix; ``dataset.load_evaluation_results(eval_key)``). A prediction of
  another size is resized to the ground truth's by FiftyOne (nearest). From its pixel
  confusion matrix ``C`` (rows: ground truth, columns: prediction) the IoU of class ``c``
  is ``C[c, c] / (sum(C[c, :]) + sum(C[:, c]) - C[c, c])`` (None where neither has it);
  ``mean_iou`` is the mean over the classes other than the background (pixel value 0),
  the background's own IoU is in ``per_class``. ``mask_targets``: given, else the
  dataset's for ``gt_field``, else its default ones, else the values seen.
- **Objects** (``fo.Detections`` fields with instance masks, e.g. the output of
  ``propagate_masks`` with ``patches_field``): each prediction is paired, one to one, with
  the ground-truth detection whose id its ``sdcorr_detection_id`` names, else the one with
  the same ``instance``; the others by geometry (:func:`pair_objects`: the optimal
  assignment on mask IoU, box IoU where a mask is missing, within a label, at IoU >=
  :data:`MIN_PAIR_IOU`), so a ground truth in a field of its own pairs too; both masks are
  drawn over their boxes on the image's pixel grid and their foreground (non-zero)
  compared. Nothing paired is a warning in the summary. Per class (the detection's label): pooled
  ``sum(intersection) / sum(union)`` over its objects; ``mean_iou``: the mean over
  classes; ``mean_object_iou``: the mean over objects. With an ``eval_key``, each paired
  prediction gets ``<eval_key>_iou`` and the run is registered as a FiftyOne evaluation
  (``list_evaluations()``; ``delete_evaluation`` removes the attribute).
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
from scipy.optimize import linear_sum_assignment

import fiftyone as fo
import fiftyone.core.evaluation as foe

from fiftyone_sdcorr.dataset import label_attrs as attrs
from fiftyone_sdcorr.dataset.config import MaskEvaluationConfig
from fiftyone_sdcorr.dataset.engine import (
    ParameterError,
    Run,
    RunSummary,
    checks_done,
    field_kind_text,
    image_collection,
    require_field,
)
from fiftyone_sdcorr.dataset.pck import image_size_of
from fiftyone_sdcorr.dataset.progress import ProgressArg
from fiftyone_sdcorr.dataset.propagate_masks import resize_nearest

FUNCTION = "evaluate_masks"
#: objects paired by geometry: at least this IoU (mask IoU, or box IoU where a mask is missing)
MIN_PAIR_IOU = 0.1


# --------------------------------------------------------------------------- run classes
class MaskIoUEvaluationConfig(foe.EvaluationMethodConfig):
    """Configuration of a mask IoU evaluation run (objects; images use FiftyOne's own)."""

    def __init__(self, pred_field, gt_field, kind="objects", **kwargs):
        super().__init__(**kwargs)
        self.pred_field, self.gt_field, self.kind = pred_field, gt_field, kind

    @property
    def type(self):
        return "evaluation"

    @property
    def method(self):
        return "sdcorr-mask-iou"


class MaskIoUEvaluation(foe.EvaluationMethod):
    """The run class FiftyOne builds from :class:`MaskIoUEvaluationConfig`."""

    def get_fields(self, samples, eval_key):
        return [f"{self.config.pred_field}.detections.{eval_key}_iou"]

    def cleanup(self, samples, eval_key):
        root = samples._root_dataset
        path = f"{self.config.pred_field}.detections.{eval_key}_iou"
        if root.has_sample_field(path):
            root.delete_sample_field(path, error_level=1)


class MaskIoUResults(foe.EvaluationResults):
    """IoU numbers of one evaluation; ``report()`` / ``report_str()`` / ``print_report()``.

    Attributes:
        kind: ``"images"`` or ``"objects"``.
        per_class: ``{class: IoU or None}``.
        mean_iou: the mean over the classes (images: other than the background).
        background: the background class (images; None for objects).
        counts: ``{class: {"gt": pixels or objects, "pred": ...}}``.
        mean_object_iou: objects: the mean IoU over paired objects.
        segmentation_results: images: FiftyOne's ``SegmentationResults`` (confusion
            matrix, ``print_report()``); not stored with this object.
    """

    def __init__(self, samples, config, eval_key, kind, per_class, counts, background=None, mean_object_iou=None,
                 backend=None):
        super().__init__(samples, config, eval_key, backend=backend)
        self.kind, self.per_class, self.counts = kind, dict(per_class), dict(counts)
        self.background, self.mean_object_iou = background, mean_object_iou
        self.segmentation_results = None
        self.summary: Optional[RunSummary] = None

    @property
    def mean_iou(self) -> Optional[float]:
        vals = [v for k, v in self.per_class.items() if v is not None and k != self.background]
        return float(np.mean(vals)) if vals else None

    def attributes(self):
        return ["cls", "kind", "per_class", "counts", "background", "mean_object_iou"]

    @classmethod
    def _from_dict(cls, d, samples, config, eval_key):
        return cls(samples, config, eval_key, d["kind"], d["per_class"], d["counts"], d.get("background"),
                   d.get("mean_object_iou"))

    def report(self) -> dict:
        return {"kind": self.kind, "per_class": dict(self.per_class), "mean_iou": self.mean_iou,
                "background": self.background, "mean_object_iou": self.mean_object_iou, "counts": dict(self.counts)}

    def report_str(self) -> str:
        rows = [(str(c), "-" if v is None else f"{100 * v:.1f}", str(self.counts.get(c, {}).get("gt", 0)),
                 str(self.counts.get(c, {}).get("pred", 0))) for c, v in self.per_class.items()]
        unit = "pixels" if self.kind == "images" else "objects"
        head = ("class", "IoU %", f"gt {unit}", f"pred {unit}")
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(4)]
        line = lambda r: "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
        out = [line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
        miou = "-" if self.mean_iou is None else f"{100 * self.mean_iou:.1f}"
        out.append(f"mean IoU {miou} %" + (f" (background {self.background!r} not counted)" if self.background else ""))
        if self.mean_object_iou is not None:
            out.append(f"mean IoU per object {100 * self.mean_object_iou:.1f} %")
        return "\n".join(out)

    def print_report(self):
        print(self.report_str())


# --------------------------------------------------------------------------- public API
def evaluate_masks(
    samples,
    pred_field: str,
    gt_field: str,
    *,
    eval_key: Optional[str] = MaskEvaluationConfig.eval_key,  # None is a value here: compute only
    mask_targets: Optional[dict] = None,
    overwrite: Optional[bool] = None,
    progress: ProgressArg = None,
) -> MaskIoUResults:
    """IoU per class of ``pred_field`` against ``gt_field`` (module docstring).

    Keywords default to ``None``: the default of
    :class:`~fiftyone_sdcorr.dataset.config.MaskEvaluationConfig`, except ``eval_key``,
    where ``None`` means "compute only" (as in FiftyOne's own ``evaluate_*`` functions).

    Args:
        samples: a dataset or view.
        pred_field, gt_field: two ``fo.Segmentation`` fields, or two ``fo.Detections``
            fields with instance masks.
        eval_key: the evaluation key; ``None``: compute only, write nothing.
        mask_targets: images: ``{pixel value: class name}``.
        overwrite: replace an existing evaluation with the same key.
        progress: True/False/None or ``callable(fraction, label)``.
    """
    # 1. check every parameter and field before anything is registered or written
    cfg = MaskEvaluationConfig.build(pred_field=pred_field, gt_field=gt_field, eval_key=eval_key,
                                     mask_targets=mask_targets, overwrite=overwrite)
    kind = check_mask_evaluation(samples, cfg)
    checks_done()
    # 2. compute (and, with an eval_key, register) the run
    if kind == "images":
        return _evaluate_images(samples, cfg, progress)
    return _evaluate_objects(samples, cfg, progress)


def check_mask_evaluation(samples, cfg: MaskEvaluationConfig) -> str:
    """``"images"`` or ``"objects"``: what the two fields hold (the same kind)."""
    image_collection(samples)
    root = samples._root_dataset
    require_field(samples, "pred_field", cfg.pred_field, "label")
    require_field(samples, "gt_field", cfg.gt_field, "label")
    docs = [getattr(root.get_field(f), "document_type", None) for f in (cfg.pred_field, cfg.gt_field)]
    if docs[0] not in (fo.Segmentation, fo.Detections) or docs[1] is not docs[0]:
        raise ParameterError(f"parameter 'pred_field': fields {cfg.pred_field!r} and {cfg.gt_field!r} hold "
                             f"{field_kind_text(root.get_field(cfg.pred_field))} and "
                             f"{field_kind_text(root.get_field(cfg.gt_field))}; both must be fo.Segmentation, or "
                             "both fo.Detections with instance masks")
    if cfg.eval_key is not None:
        if cfg.eval_key in root.list_evaluations() and not cfg.overwrite:
            raise ParameterError(f"parameter 'eval_key': an evaluation {cfg.eval_key!r} exists; pass "
                                 "overwrite=True or choose another eval_key")
        if cfg.eval_key in root.list_brain_runs() + root.list_runs():
            raise ParameterError(f"parameter 'eval_key': {cfg.eval_key!r} is the key of another run")
    return "images" if docs[0] is fo.Segmentation else "objects"


def iou_per_class(confusion, classes) -> Dict[str, Optional[float]]:
    """``{class: IoU}`` from a confusion matrix (rows: ground truth, columns: prediction);
    None where neither has the class."""
    c = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(c)
    union = c.sum(axis=1) + c.sum(axis=0) - tp
    return {str(k): (float(tp[i] / union[i]) if union[i] > 0 else None) for i, k in enumerate(classes)}


def _evaluate_images(samples, cfg: MaskEvaluationConfig, progress) -> MaskIoUResults:
    """FiftyOne's ``evaluate_segmentations``, then IoU per class from its confusion matrix."""
    root = samples._root_dataset
    targets = cfg.mask_targets or (root.mask_targets or {}).get(cfg.gt_field) or root.default_mask_targets or None
    if cfg.eval_key is not None and cfg.eval_key in root.list_evaluations():
        root.delete_evaluation(cfg.eval_key)
    fo_progress = progress if progress is None or isinstance(progress, bool) else False
    seg = samples.evaluate_segmentations(cfg.pred_field, gt_field=cfg.gt_field, eval_key=cfg.eval_key,
                                         mask_targets=dict(targets) if targets else None, progress=fo_progress)
    cm = np.asarray(seg.pixel_confusion_matrix)
    classes = [str(c) for c in seg.classes]
    counts = {c: {"gt": int(cm[i].sum()), "pred": int(cm[:, i].sum())} for i, c in enumerate(classes)}
    config = MaskIoUEvaluationConfig(cfg.pred_field, cfg.gt_field, kind="images")
    out = MaskIoUResults(samples, config, cfg.eval_key, "images", iou_per_class(cm, classes), counts,
                         background=str(seg.missing) if seg.missing is not None else None)
    out.segmentation_results = seg
    out.summary = RunSummary(FUNCTION, ("samples",), eval_key=cfg.eval_key, pred_field=cfg.pred_field,
                             gt_field=cfg.gt_field)
    out.summary["samples"] = len(samples)
    return out


def _evaluate_objects(samples, cfg: MaskEvaluationConfig, progress) -> MaskIoUResults:
    """Per-object mask IoU, paired by the detection ids ``propagate_masks`` copied."""
    summary = RunSummary(FUNCTION, ("samples", "objects", "paired"), eval_key=cfg.eval_key,
                         pred_field=cfg.pred_field, gt_field=cfg.gt_field, min_pair_iou=MIN_PAIR_IOU,
                         paired_by={"link": 0, "geometry": 0},
                         unpaired={"predictions": 0, "ground_truth": 0, "without_mask": 0})
    ids, fps, metas = samples.values("id"), samples.values("filepath"), samples.values("metadata")
    preds, gts = samples.values(cfg.pred_field), samples.values(cfg.gt_field)
    inter: Dict[str, int] = {}
    union: Dict[str, int] = {}
    counts: Dict[str, Dict[str, int]] = {}
    object_iou: Dict[str, float] = {}
    with Run(samples, summary, len(ids), progress, "evaluating masks") as run:
        for sid, fp, meta, pred, gt in zip(ids, fps, metas, preds, gts):
            summary.add("samples")
            try:
                _tally_sample(fp, meta, pred, gt, inter, union, counts, object_iou, summary)
            except Exception as e:  # noqa: BLE001 -- this sample only
                summary.fail(sid, f"{type(e).__name__}: {e}")
            run.step(1)
    _warn_unpaired(summary, cfg)
    per_class = {c: (inter.get(c, 0) / union[c] if union.get(c) else None) for c in sorted(counts)}
    config = MaskIoUEvaluationConfig(cfg.pred_field, cfg.gt_field, kind="objects")
    method = config.build()
    mean_obj = float(np.mean(list(object_iou.values()))) if object_iou else None
    results = MaskIoUResults(samples, config, cfg.eval_key, "objects", per_class, counts,
                             mean_object_iou=mean_obj, backend=method)
    results.summary = summary
    if cfg.eval_key is not None:
        _save_objects_run(samples, cfg, method, results, object_iou)
    return results


def _warn_unpaired(summary: RunSummary, cfg: MaskEvaluationConfig) -> None:
    """Nothing paired (or nothing to pair) is a warning, never a quiet success."""
    if not summary["objects"]:
        summary.warn(f"no predicted object in {cfg.pred_field!r}: nothing to evaluate")
    elif not summary["paired"]:
        summary.warn(f"nothing paired: no object of {cfg.pred_field!r} has an object of {cfg.gt_field!r} linked to "
                     f"it (id or instance) or overlapping it (the same label, IoU >= {MIN_PAIR_IOU}) with masks on "
                     "both sides; the IoU is undefined")
    elif summary["unpaired"]["predictions"]:
        summary.warn(f"{summary['unpaired']['predictions']} of {summary['objects']} predicted object(s) without a "
                     "ground-truth object: not in the IoU")


def _tally_sample(fp, meta, pred, gt, inter, union, counts, object_iou, summary) -> None:
    """Adds one sample's paired objects to the pooled counts."""
    pds = list(getattr(pred, "detections", None) or [])
    gds = list(getattr(gt, "detections", None) or [])
    for g in gds:
        counts.setdefault(str(g.label), {"gt": 0, "pred": 0})["gt"] += 1
    for p in pds:
        counts.setdefault(str(p.label), {"gt": 0, "pred": 0})["pred"] += 1
        summary.add("objects")
    W, H = image_size_of(fp, meta) if pds and gds else (0, 0)
    pairs = pair_objects(pds, gds, W, H) if pds and gds else []
    summary["unpaired"]["predictions"] += len(pds) - len(pairs)
    summary["unpaired"]["ground_truth"] += len(gds) - len(pairs)
    for p, g, how in pairs:
        summary["paired_by"][how] += 1
        if not g.has_mask or not p.has_mask:
            summary["unpaired"]["without_mask"] += 1
            continue
        label = str(p.label)
        i, u = mask_overlap(p, g, W, H)
        inter[label], union[label] = inter.get(label, 0) + i, union.get(label, 0) + u
        object_iou[p.id] = i / u if u else 1.0
        summary.add("paired")


def pair_objects(preds, gts, width: int, height: int, min_iou: float = MIN_PAIR_IOU):
    """``[(prediction, ground truth, "link" or "geometry")]``, one-to-one: first by link
    (the prediction's ``sdcorr_detection_id`` names the ground-truth detection, or both
    share an ``instance``), then the rest by geometry: the optimal assignment
    (``scipy.optimize.linear_sum_assignment``, the largest total IoU) on mask IoU (box IoU
    where either has no mask), within the same label, a pair only at IoU >= ``min_iou``."""
    by_id = {g.id: g for g in gts}
    by_instance = {str(g.instance.id): g for g in gts if getattr(g, "instance", None) is not None}
    pairs, used, rest = [], set(), []
    for p in preds:
        ref = p.get_field(attrs.DETECTION_ID) if p.has_field(attrs.DETECTION_ID) else None
        inst = getattr(p, "instance", None)
        g = by_id.get(ref) or (by_instance.get(str(inst.id)) if inst is not None else None)
        if g is not None and g.id not in used:
            used.add(g.id)
            pairs.append((p, g, "link"))
        else:
            rest.append(p)
    free = [g for g in gts if g.id not in used]
    if not rest or not free:
        return pairs
    iou = np.zeros((len(rest), len(free)))
    for i, p in enumerate(rest):
        for j, g in enumerate(free):
            if str(p.label) == str(g.label):
                iou[i, j] = object_iou_of(p, g, width, height)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return pairs + [(rest[i], free[j], "geometry") for i, j in zip(rows, cols) if iou[i, j] >= min_iou]


def object_iou_of(a: fo.Detection, b: fo.Detection, width: int, height: int) -> float:
    """The IoU of two detections on the ``width x height`` pixel grid: of their masks when
    both have one, else of their boxes."""
    ra, rb = _rect(a.bounding_box, width, height), _rect(b.bounding_box, width, height)
    iw = min(ra[2], rb[2]) - max(ra[0], rb[0])
    ih = min(ra[3], rb[3]) - max(ra[1], rb[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    if a.has_mask and b.has_mask:
        i, u = mask_overlap(a, b, width, height)
    else:
        area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
        i = iw * ih
        u = area(ra) + area(rb) - i
    return i / u if u else 0.0


def mask_overlap(a: fo.Detection, b: fo.Detection, width: int, height: int):
    """``(intersection, union)`` in image pixels of two detections' foreground masks, each
    drawn over its box on the ``width x height`` grid."""
    ra, rb = _rect(a.bounding_box, width, height), _rect(b.bounding_box, width, height)
    x0, y0 = min(ra[0], rb[0]), min(ra[1], rb[1])
    x1, y1 = max(ra[2], rb[2]), max(ra[3], rb[3])
    canvases = []
    for det, (l, t, r, btm) in ((a, ra), (b, rb)):
        c = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        c[t - y0:btm - y0, l - x0:r - x0] = resize_nearest(np.asarray(det.get_mask()) != 0, r - l, btm - t)
        canvases.append(c)
    return int((canvases[0] & canvases[1]).sum()), int((canvases[0] | canvases[1]).sum())


def _rect(box, width: int, height: int):
    x, y, w, h = box
    l, t = int(round(x * width)), int(round(y * height))
    return l, t, max(l + 1, int(round((x + w) * width))), max(t + 1, int(round((y + h) * height)))


def _save_objects_run(samples, cfg: MaskEvaluationConfig, method, results, object_iou: Dict[str, float]) -> None:
    """Registers the run and writes ``<eval_key>_iou`` on the paired predictions; a failure
    leaves nothing behind."""
    root, key = samples._root_dataset, cfg.eval_key
    if key in root.list_evaluations():
        root.delete_evaluation(key)
    method.register_run(samples, key, overwrite=cfg.overwrite)
    try:
        path = f"{cfg.pred_field}.detections.{key}_iou"
        if not root.has_sample_field(path):
            root.add_sample_field(path, fo.FloatField)
        if object_iou:
            root.set_label_values(path, object_iou)
        method.save_run_results(samples, key, results)
    except BaseException:
        root.delete_evaluation(key)
        raise


__all__ = ["evaluate_masks", "check_mask_evaluation", "iou_per_class", "mask_overlap", "MaskIoUResults",
           "MaskIoUEvaluation", "MaskIoUEvaluationConfig", "FUNCTION", "MIN_PAIR_IOU", "pair_objects",
           "object_iou_of"]
