"""``propagate_masks``: reference masks -> predicted masks on targets, by dense correspondence.

- **Units**: whole images (default), or the objects of ``patches_field`` (a
  ``fo.Detections`` field, or a ``to_patches()`` view), as for keypoints (:mod:`.units`).
- **References**: images: a ``fo.Segmentation`` in ``source_field`` (``mask`` or
  ``mask_path``, read with FiftyOne's ``get_mask()``; integer classes, 0 = unlabelled;
  RGB masks are refused per reference). Objects: every detection of the ``fo.Detections``
  field ``source_field`` (it may be ``patches_field`` itself) that carries an instance
  mask (``mask`` / ``mask_path``, in box coordinates); detections without one are not
  references.
- **Reference choice**: each target unit takes the most similar reference unit by the
  global embedding (``embedding_field`` when every reference has one, else the mean
  descriptor), with :meth:`Propagator.rank <fiftyone_sdcorr.dataset.matching.Propagator.rank>`,
  the code keypoint propagation ranks with; objects: only reference objects of the
  target's label (``same_label``). ``flip=True``: the mirrored reference (described from
  the mirrored image) is matched too, its mask mirrored, and the match with the higher
  mean similarity is kept (no label swap).
- **Dense matching** (:func:`fiftyone_sdcorr.core.matching.dense.dense_match`): on a
  ``resolution x resolution`` grid over each letterbox frame, every target cell of the
  target's region takes its nearest source cell (chunked, on the features' device); the
  region of an image is the whole image, of an object its own mask when it has one
  (``target_region="mask"``) else its box, inside its crop (box + context margin).
  The reference side is its whole image or crop: target pixels that match the
  reference's background stay 0.
- **Output**: each target pixel takes the class of its matched reference pixel; pixels
  with confidence below ``min_confidence`` (and outside the region) are 0. Images: a NEW
  ``fo.Segmentation`` field at the image's size (its long side capped at ``max_side``; the
  App and ``evaluate_segmentations`` stretch it over the image), in the reference mask's
  dtype. Objects: a NEW ``fo.Detections`` field: per target detection a copy of its box,
  ``label`` and ``instance`` with the propagated ``mask`` in box coordinates (a bool mask
  when the reference's was bool) and ``sdcorr_detection_id`` (the target detection's id).
  Every output label has ``sdcorr_reference_id``, ``sdcorr_similarity`` (mean cosine),
  ``sdcorr_flipped`` and ``confidence`` (mean over the region). ``confidence_field``: a
  NEW ``fo.Heatmap`` per sample (8-bit, ``range=[0, 255]`` for ``0..1``; objects pasted
  into their boxes). Per-sample problems go to ``<output_field>_error``.
- **Storage** (the FiftyOne way): a mask or heat map of at most :data:`DB_MAX_PIXELS`
  pixels goes into the database (``mask`` / ``map``) while its sample's masks stay under
  :data:`SAMPLE_DB_PIXELS` in all; larger ones are PNG files written by FiftyOne's own
  ``export_mask`` / ``export_map`` (``mask_path`` / ``map_path``) into ``mask_dir``
  (default ``<feature store namespace>/_masks``), named ``<label id>.png``: never a user
  string. Why: a sample document holds at most 16 MB in MongoDB and every read of the
  sample carries its in-database masks, while files cost one file each and move with
  nothing; small masks (a typical object, a 512 x 512 image) read fastest from the database.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

import fiftyone as fo

from fiftyone_sdcorr.core.matching.dense import dense_match, warp_labels
from fiftyone_sdcorr.core.common.files import check_output_folder
from fiftyone_sdcorr.core.features.store import default_store_root
from fiftyone_sdcorr.dataset import label_attrs as attrs
from fiftyone_sdcorr.dataset.config import FEATURE_FIELDS, FEATURE_PARAMS, MaskPropagationConfig, flat_keywords, \
    merge_features
from fiftyone_sdcorr.dataset.engine import (
    ParameterError,
    Run,
    RunSummary,
    checks_done,
    declare_outputs,
    guard_outputs,
    image_collection,
    inputs_of as _inputs,
    reason,
    require_field,
)
from fiftyone_sdcorr.dataset.matching import (
    Propagator,
    Reference,
    feature_source,
    resolve_references,
    unit_vector,
    without_references,
)
from fiftyone_sdcorr.dataset.output_files import beside_store, export_label_png, package_files, remove_files
from fiftyone_sdcorr.dataset.pck import image_size_of
from fiftyone_sdcorr.dataset.progress import ProgressArg
from fiftyone_sdcorr.dataset.units import Unit, Units, by_sample, patches_field_of, sample_batches

FUNCTION = "propagate_masks"
#: the folder of mask files under the feature store namespace
MASKS_DIR = "_masks"
#: a mask (or heat map) of at most this many pixels may go into the database (256 KiB as uint8)
DB_MAX_PIXELS = 512 * 512
#: the pixels of one sample's masks in the database, all together (the rest go to files)
SAMPLE_DB_PIXELS = 4 * DB_MAX_PIXELS


@flat_keywords()
def propagate_masks(
    targets,
    references,
    source_field: str,
    output_field: str,
    *,
    patches_field: Optional[str] = None,
    resolution: Optional[int] = None,
    min_confidence: Optional[float] = None,
    confidence_field: Optional[str] = None,
    max_side: Optional[int] = None,
    mask_dir=None,
    target_region: Optional[str] = None,
    flip: Optional[bool] = None,
    same_label: Optional[bool] = None,
    overwrite: Optional[bool] = None,
    include_references: Optional[bool] = None,
    features=None,
    progress: ProgressArg = None,
) -> RunSummary:
    """Propagates masks from references to every target sample, or to every target object
    (``patches_field``, or a ``to_patches()`` view); see the module docstring.

    Every keyword defaults to ``None``: the default of
    :class:`~fiftyone_sdcorr.dataset.config.MaskPropagationConfig`.

    Args:
        targets: a dataset or view of the samples to label.
        references: a view, a list of sample ids, or a sample tag.
        source_field: images: the references' ``fo.Segmentation`` field; objects: a
            ``fo.Detections`` field whose detections with instance masks are the
            references (never written).
        output_field: the NEW field (``fo.Segmentation``, or ``fo.Detections`` for objects).
        patches_field: the target objects (a ``fo.Detections`` field).
        resolution: cells per side of the dense grid (``core.matching.dense.DEFAULT_RESOLUTION``).
        min_confidence: pixels matched with a lower confidence stay 0.
        confidence_field: a NEW ``fo.Heatmap`` field of the confidence (None: none).
        max_side: the longest side of an output mask, in pixels.
        mask_dir: the folder of mask files (default: ``<store namespace>/_masks``).
        target_region: objects: ``"mask"`` (a target detection's own mask when it has one,
            else its box) or ``"box"``.
        flip: also match the mirrored reference; the better mean similarity wins.
        same_label: objects: only reference objects of the target's label.
        overwrite: allow writing to existing output fields.
        include_references: also propagate onto the references (default: they are skipped,
            counted in ``references_skipped``).
        features: the stored dense features and global vectors (``features_field``,
            ``embedding_field``) and how missing ones are computed, as in
            :func:`fiftyone_sdcorr.propagate_keypoints` (each setting may also be given as
            its own keyword).
        progress: True/False/None or ``callable(fraction, label)``.

    Returns:
        a :class:`RunSummary`: ``targets``, ``propagated``, ``failed``, ``errors``,
        ``warnings``, ``references_used``, ``output_field``, ``error_field``,
        ``confidence_field``, ``mask_dir``, ``masks_in_database``, ``masks_in_files``.
    """
    # 1. check every parameter and field before anything loads or is written
    given = merge_features(features, {}, FEATURE_PARAMS + FEATURE_FIELDS)
    cfg = MaskPropagationConfig.build(
        source_field=source_field, output_field=output_field, features_field=given.get("features_field"),
        embedding_field=given.get("embedding_field"), resolution=resolution, min_confidence=min_confidence,
        confidence_field=confidence_field, max_side=max_side, mask_dir=mask_dir, target_region=target_region,
        flip=flip, same_label=same_label, batch_size=given.get("batch_size"), overwrite=overwrite,
        include_references=include_references,
        patches_field=patches_field_of(targets, patches_field) if hasattr(targets, "_root_dataset") else patches_field)
    ref_view = check_mask_propagation(targets, references, cfg)
    source = feature_source(targets, cfg, given)
    folder = _mask_dir(cfg, source, targets, Units(targets, cfg.patches_field).values(cfg.features_field))
    check_output_folder("mask_dir", folder)
    checks_done()
    return _propagate(targets, ref_view, cfg, source, folder, progress)


def check_mask_propagation(targets, references, cfg: MaskPropagationConfig):
    """Fields and views of a mask propagation, checked before anything is written; the
    references' view."""
    image_collection(targets, "targets")
    if cfg.patches_field:
        require_field(targets, "source_field", cfg.source_field, "detections")
        doc = getattr(targets._root_dataset.get_field(cfg.source_field), "document_type", None)
        if doc is not fo.Detections:
            raise ParameterError(f"parameter 'source_field': field {cfg.source_field!r} holds one fo.Detection, "
                                 "not fo.Detections (objects need a fo.Detections field of instance masks)")
    else:
        require_field(targets, "source_field", cfg.source_field, "segmentation")
    for param, kind in (("features_field", "string"), ("embedding_field", "vector")):
        name = getattr(cfg, param)
        if name and targets._root_dataset.has_sample_field(name):
            require_field(targets, param, name, kind)
    guard_outputs(targets, _outputs(cfg),
                  _inputs(cfg, "source_field", "features_field", "embedding_field", "patches_field"), cfg.overwrite)
    return resolve_references(targets, references)


def _outputs(cfg: MaskPropagationConfig) -> dict:
    out = {"output_field": (cfg.output_field, "detections" if cfg.patches_field else "segmentation"),
           "output_field (its error field)": (cfg.error_field, "string")}
    if cfg.confidence_field:
        out["confidence_field"] = (cfg.confidence_field, "heatmap")
    return out


# --------------------------------------------------------------------------- the run
@dataclass
class MaskReferences:
    """The usable references (for :class:`Propagator` ranking) and their label maps, each
    in its unit's frame (an image's mask as stored; an object's mask pasted into its crop)."""

    refs: List[Reference]
    labels: Dict[str, np.ndarray]
    problems: Dict[str, List[str]]


def _propagate(targets, ref_view, cfg: MaskPropagationConfig, source, folder: Path, progress) -> RunSummary:
    """The run after its checks: references, then batches of targets. A run that fails
    before its first batch is written leaves no new field behind."""
    # 2. references, their masks and features (the models load only if features must be computed)
    counts = ("targets", "propagated", "references_skipped", "masks_in_database", "masks_in_files",
              "masks_not_written")
    summary = RunSummary(FUNCTION, counts, output_field=cfg.output_field,
                         error_field=cfg.error_field, confidence_field=cfg.confidence_field,
                         resolution=cfg.resolution, files_removed=0)
    units = Units(targets, cfg.patches_field)
    stored, embs = units.values(cfg.features_field), units.values(cfg.embedding_field)
    refs = load_mask_references(ref_view, cfg, source, summary, stored)
    engine = Propagator(refs.refs, cfg.match)
    files = MaskFiles(folder, summary)
    # 3. match batch by batch (a sample's objects in one batch), write in bulk, record problems per sample
    rows = without_references(list(zip(units.units(), stored, embs)), refs.refs, summary, cfg.include_references)
    summary["targets"] = len(rows)
    created = [f for _, (f, _) in _outputs(cfg).items() if not targets._root_dataset.has_sample_field(f)]
    written = False
    try:
        with Run(targets, summary, len(rows), progress, "propagating masks", cfg.error_field) as run:
            _declare(targets, cfg)
            for batch in sample_batches(rows, cfg.batch_size):
                _propagate_batch(targets, cfg, engine, refs, source, files, batch, run)
                written = True
            for sid in set(refs.problems) - {u.sample_id for u, _, _ in rows}:  # references that are not targets
                run.note(sid, "; ".join(refs.problems[sid]))
    except BaseException:
        if not written:
            _drop_fields(targets._root_dataset, created)
        raise
    return summary


def _drop_fields(root, names) -> None:
    """Removes the output fields a run created before it failed (nothing was written)."""
    there = [n for n in names if root.has_sample_field(n)]
    if there:
        root.delete_sample_fields(there)


def _declare(targets, cfg: MaskPropagationConfig) -> None:
    """The output fields (a ``fo.Detections`` one by hand: the engine declares the
    others); an image output gets the source field's ``mask_targets``."""
    root = targets._root_dataset
    outs = _outputs(cfg)
    if cfg.patches_field and not root.has_sample_field(cfg.output_field):
        root.add_sample_field(cfg.output_field, fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    declare_outputs(targets, {k: v for k, v in outs.items() if v[1] != "detections"})
    targets_of = dict(root.mask_targets or {})
    if not cfg.patches_field and cfg.source_field in targets_of and cfg.output_field not in targets_of:
        root.mask_targets = {**targets_of, cfg.output_field: targets_of[cfg.source_field]}
        root.save()


def _propagate_batch(targets, cfg, engine, refs: MaskReferences, source, files, batch, run: Run) -> None:
    """One batch of ``(unit, stored path, embedding)``: features, dense matches, one write."""
    feats = source.get([(u.id, u, st) for u, st, _ in batch])
    own = _target_masks(targets, cfg, batch)
    results = []
    for unit, _, emb in batch:
        f = feats.get(unit.id)
        if f is None or isinstance(f, Exception):
            results.append((unit, f if f is not None else ValueError("no features")))
            continue
        try:
            results.append((unit, predict_mask(engine, refs, cfg, unit, f, emb, source.margin, own.get(unit.id))))
        except Exception as e:  # noqa: BLE001 -- this unit only
            results.append((unit, e))
    masks, heatmaps = {}, {}
    for sid, group in by_sample(results).items():
        masks[sid], heat = _record(cfg, sid, group, refs.problems, files, run)
        if heat is not None:
            heatmaps[sid] = heat
    old = files.replaced(targets._root_dataset, cfg, list(masks)) if cfg.overwrite else []
    run.write(cfg.output_field, masks)
    if cfg.confidence_field:
        run.write(cfg.confidence_field, heatmaps)
    run.flush_errors()
    files.remove(old)
    run.step(len(batch))


def _target_masks(targets, cfg, batch) -> Dict[str, np.ndarray]:
    """The target detections' own masks of a batch (``target_region="mask"``), by label id."""
    if not cfg.patches_field or cfg.target_region != "mask":
        return {}
    sids = list(dict.fromkeys(u.sample_id for u, _, _ in batch))
    dets = targets._root_dataset.select(sids).values(f"{cfg.patches_field}.detections")
    return {d.id: d.get_mask() for ds in dets for d in ds or [] if d.has_mask}


# --------------------------------------------------------------------------- references
def load_mask_references(ref_view, cfg: MaskPropagationConfig, source, summary, target_stored) -> MaskReferences:
    """Reads the references' masks and describes them: one reference per image with a mask,
    or per detection of ``source_field`` with an instance mask (objects)."""
    units = Units(ref_view, cfg.source_field if cfg.patches_field else None)
    labels, problems = _reference_masks(units, cfg, source.margin)
    source.locate(list(target_stored) + units.values(cfg.features_field))
    stored = dict(zip((u.id for u in units.units()), units.values(cfg.features_field)))
    embs = dict(zip((u.id for u in units.units()), units.values(cfg.embedding_field)))
    todo = [u for u in units.units() if u.id in labels]
    feats = source.get([(u.id, u, stored[u.id]) for u in todo])
    refs = []
    for u in todo:
        f = feats.get(u.id)
        what = "reference" if not u.is_object else f"reference object {u.id} ({u.label})"
        if f is None or isinstance(f, Exception):
            problems.setdefault(u.sample_id, []).append(f"{what} left out: {reason(f) if f else 'no features'}")
            continue
        flipped = None
        if cfg.flip:
            try:
                flipped = source.describe_flipped(u)
            except Exception as e:  # noqa: BLE001
                problems.setdefault(u.sample_id, []).append(f"{what}: no flip, the mirrored features failed "
                                                            f"({reason(e)})")
        refs.append(Reference(id=u.id, filepath=u.filepath, instances=[], features=f, flipped=flipped,
                              embedding=unit_vector(embs[u.id]), gvec=f.global_vector(), sample_id=u.sample_id,
                              label=u.label, unit=u))
    _summarise_references(units, refs, problems, cfg, source, summary)
    return MaskReferences(refs, {r.id: labels[r.id] for r in refs}, problems)


def _summarise_references(units: Units, refs, problems, cfg, source, summary) -> None:
    sample_ids = units.samples.values("id")
    if not refs:
        detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in list(problems.items())[:5])
        raise ParameterError(f"parameter 'references': no usable reference among {len(sample_ids)} reference "
                             f"sample(s) with masks in {cfg.source_field!r}: {detail or 'none has a mask'}")
    used = {r.sample_id for r in refs}
    if len(used) < len(sample_ids):
        summary.warn(f"{len(sample_ids) - len(used)} of {len(sample_ids)} reference(s) left out (no usable mask or "
                     f"features); see {cfg.error_field!r}")
    for note in source.notes:
        summary.warn(note)
    summary.update(references_used=sorted(used), references_left_out=sorted(set(sample_ids) - used))
    if units.objects:
        summary["reference_objects"] = len(refs)


def _reference_masks(units: Units, cfg, margin: float) -> Tuple[Dict[str, np.ndarray], Dict[str, List[str]]]:
    """``({unit id: label map}, {sample id: [problem]})`` of the references."""
    labels: Dict[str, np.ndarray] = {}
    problems: Dict[str, List[str]] = {}
    if not units.objects:
        for u, seg in zip(units.units(), units.samples.values(cfg.source_field)):
            try:
                labels[u.id] = _class_map(seg)
            except Exception as e:  # noqa: BLE001 -- this reference only
                problems.setdefault(u.id, []).append(f"reference: {e}")
        return labels, problems
    dets = {d.id: d for ds in units.samples.values(f"{cfg.source_field}.detections") for d in ds or []}
    for u in units.units():
        det = dets.get(u.id)
        if det is None or not det.has_mask:
            continue
        try:
            labels[u.id] = _object_labels(u, det.get_mask(), margin)
        except Exception as e:  # noqa: BLE001 -- this object only
            problems.setdefault(u.sample_id, []).append(f"reference object {u.id}: {reason(e)}")
    for sid in set(units.samples.values("id")) - {u.sample_id for u in units.units() if u.id in labels}:
        problems.setdefault(sid, []).append(f"reference: no detection with a mask in {cfg.source_field!r}")
    return labels, problems


def _class_map(seg) -> np.ndarray:
    """A reference ``fo.Segmentation``'s integer class map (0 = unlabelled)."""
    if seg is None or not seg.has_mask:
        raise ValueError("no mask (fo.Segmentation with mask or mask_path) in the source field")
    mask = np.asarray(seg.get_mask())
    if mask.ndim != 2 or not mask.size:
        raise ValueError(f"mask of shape {mask.shape}: only 2-D integer masks are supported (not RGB masks)")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise ValueError(f"mask of dtype {mask.dtype}: class masks hold integers")
    return mask


def _object_labels(unit: Unit, mask, margin: float) -> np.ndarray:
    """An object's instance mask (box coordinates) pasted into its crop frame (0 around it)."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or not mask.size:
        raise ValueError(f"instance mask of shape {mask.shape}, not 2-D")
    crop = unit.crop(margin)
    cw, ch = crop.size
    x0, y0, x1, y1 = _box_in_frame(unit, crop, cw, ch)
    out = np.zeros((ch, cw), dtype=mask.dtype)
    out[y0:y1, x0:x1] = resize_nearest(mask, x1 - x0, y1 - y0)
    return out


# --------------------------------------------------------------------------- one target
@dataclass
class MaskPrediction:
    """One target unit's propagated classes and confidence in its output frame (an image
    at its output size; an object's box), and what produced them."""

    labels: np.ndarray
    confidence: np.ndarray
    reference_id: str
    similarity: float
    flipped: bool


def predict_mask(engine: Propagator, refs: MaskReferences, cfg: MaskPropagationConfig, unit: Unit, features, emb,
                 margin: float, own_mask=None) -> MaskPrediction:
    """The most similar reference's mask carried onto ``unit`` by dense correspondence
    (the mirrored reference too with ``flip``; the better mean similarity wins)."""
    ranked = engine.rank(features.global_vector().cpu(), unit_vector(emb),
                         label=unit.label if unit.is_object else None)
    if not ranked:
        raise ValueError("no usable reference" if not unit.is_object else
                         f"no usable reference object labelled {unit.label!r}")
    ref = ranked[0][1]
    w, h, region, box = _target_frame(unit, features, cfg, margin, own_mask)
    best = None
    for flipped, src in ((False, ref.features), (True, ref.flipped if cfg.flip else None)):
        if src is None:
            continue
        m = dense_match(src, features, resolution=cfg.resolution, target_mask=region)
        sim = float(m.similarity[m.valid].mean()) if bool(m.valid.any()) else float("-inf")
        if best is None or sim > best[0]:
            best = (sim, m, flipped)
    sim, m, flipped = best
    field = m.sample(w, h)
    labels = refs.labels[ref.id]
    labels = warp_labels(field, np.fliplr(labels) if flipped else labels, cfg.min_confidence, 0)
    conf = np.where(field.valid, field.confidence, 0.0).astype(np.float32)
    if box is not None:
        x0, y0, x1, y1 = box
        labels, conf = labels[y0:y1, x0:x1], conf[y0:y1, x0:x1]
    return MaskPrediction(labels, conf, ref.id, sim, flipped)


def _target_frame(unit: Unit, features, cfg, margin: float, own_mask):
    """``(width, height, region, box)``: the output frame of a unit (its image or crop, the
    long side at most ``max_side``), its region there (None: all of it) and, for an
    object, its box there ``(x0, y0, x1, y1)``."""
    lb = features.letterbox
    w, h = output_size(lb.width, lb.height, cfg.max_side)
    if not unit.is_object:
        return w, h, None, None
    crop = unit.crop(margin)
    x0, y0, x1, y1 = _box_in_frame(unit, crop, w, h)
    region = np.zeros((h, w), dtype=bool)
    if own_mask is not None and cfg.target_region == "mask" and np.asarray(own_mask).ndim == 2:
        region[y0:y1, x0:x1] = resize_nearest(np.asarray(own_mask), x1 - x0, y1 - y0) != 0
    else:
        region[y0:y1, x0:x1] = True
    if not region.any():
        region[y0:y1, x0:x1] = True  # an empty own mask: its box
    return w, h, region, (x0, y0, x1, y1)


def output_size(width: int, height: int, max_side: int) -> Tuple[int, int]:
    """``(width, height)`` with the long side at most ``max_side`` (the aspect kept)."""
    s = min(1.0, max_side / max(width, height))
    return max(1, int(round(width * s))), max(1, int(round(height * s)))


def _box_in_frame(unit: Unit, crop, w: int, h: int) -> Tuple[int, int, int, int]:
    """An object's box in its crop drawn at ``w x h`` pixels (at least one pixel)."""
    x, y, bw, bh = unit.box
    cw, ch = crop.size
    sx, sy = w / cw, h / ch
    x0 = int(np.clip(round((x * crop.width - crop.left) * sx), 0, w - 1))
    y0 = int(np.clip(round((y * crop.height - crop.top) * sy), 0, h - 1))
    x1 = int(np.clip(round(((x + bw) * crop.width - crop.left) * sx), x0 + 1, w))
    y1 = int(np.clip(round(((y + bh) * crop.height - crop.top) * sy), y0 + 1, h))
    return x0, y0, x1, y1


def resize_nearest(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """``array`` (``H x W``) at ``width x height`` by nearest neighbour (pixel centres)."""
    array = np.asarray(array)
    rows = np.minimum(((np.arange(height) + 0.5) * array.shape[0] / height).astype(np.int64), array.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * array.shape[1] / width).astype(np.int64), array.shape[1] - 1)
    return array[rows[:, None], cols[None, :]]


# --------------------------------------------------------------------------- one sample's labels
def _record(cfg, sid, group, problems, files, run: Run):
    """One target sample's output label (and heat map) from its units'
    ``(unit, MaskPrediction or error)``, or ``(None, None)`` with the failure recorded. A
    mask whose file could not be written is a failure of its unit (never a label pointing
    at a missing file)."""
    msgs = list(problems.get(sid, []))
    good = []
    for unit, got in group:
        if isinstance(got, Exception):
            msgs.append(f"{_what(unit)}: {reason(got)}")
        else:
            good.append((unit, got))
    budget = [SAMPLE_DB_PIXELS]
    stored = []
    for unit, p in good:
        lab = fo.Segmentation(mask=p.labels, **_attributes(p)) if not unit.is_object else _detection(unit, p)
        if files.store(lab, "mask", budget, msgs, f"{_what(unit)}: its mask"):
            stored.append((unit, p, lab))
    run.summary.add("propagated", len(stored))
    if not stored:
        run.fail(sid, "; ".join(msgs))
        return None, None
    good = [(u, p) for u, p, _ in stored]
    heat = _heatmap(good, cfg, run) if cfg.confidence_field else None
    if heat is not None and not files.store(heat, "map", budget, msgs, "the confidence map"):
        heat = None
    if msgs:
        run.note(sid, "; ".join(msgs))
    else:
        run.ok(sid)
    if not good[0][0].is_object:
        return stored[0][2], heat
    return fo.Detections(detections=[lab for _, _, lab in stored]), heat


def _what(unit: Unit) -> str:
    return "target" if not unit.is_object else f"target object {unit.id} ({unit.label})"


def _attributes(p: MaskPrediction) -> dict:
    return {attrs.REFERENCE_ID: p.reference_id,
            attrs.SIMILARITY: p.similarity if np.isfinite(p.similarity) else None,
            attrs.FLIPPED: bool(p.flipped), "confidence": float(p.confidence.mean()) if p.confidence.size else 0.0}


def _detection(unit: Unit, p: MaskPrediction) -> fo.Detection:
    """A copy of the target detection's box, label and instance with the propagated mask
    (in the reference mask's dtype: bool stays bool)."""
    det = fo.Detection(label=unit.label, bounding_box=list(unit.box), mask=p.labels,
                       **{attrs.DETECTION_ID: unit.id}, **_attributes(p))
    if unit.instance is not None:
        det.instance = fo.Instance(id=unit.instance)
    return det


def _heatmap(good, cfg, run: Run) -> Optional[fo.Heatmap]:
    """The confidence of a sample as an 8-bit ``fo.Heatmap``: an image's own, or each
    object's pasted into its box (the highest where boxes overlap)."""
    unit, p = good[0]
    if not unit.is_object:
        conf = p.confidence
    else:
        W, H = image_size_of(unit.filepath, None)
        w, h = output_size(W, H, cfg.max_side)
        conf = np.zeros((h, w), dtype=np.float32)
        for u, q in good:
            x, y, bw, bh = u.box
            x0, y0 = int(np.clip(round(x * w), 0, w - 1)), int(np.clip(round(y * h), 0, h - 1))
            x1, y1 = max(x0 + 1, min(w, int(round((x + bw) * w)))), max(y0 + 1, min(h, int(round((y + bh) * h))))
            conf[y0:y1, x0:x1] = np.maximum(conf[y0:y1, x0:x1], resize_nearest(q.confidence, x1 - x0, y1 - y0))
    return fo.Heatmap(map=(np.clip(conf, 0.0, 1.0) * 255).round().astype(np.uint8), range=[0, 255])


# --------------------------------------------------------------------------- storage
class MaskFiles:
    """Where each mask goes (module docstring, "Storage"): the database while small, else
    a PNG named by its label's id in ``folder`` (made on the first file), written and
    verified (:func:`~fiftyone_sdcorr.dataset.output_files.export_label_png`)."""

    def __init__(self, folder: Path, summary: RunSummary):
        self.folder, self.summary = Path(folder), summary
        summary["mask_dir"] = str(folder)

    def store(self, label, attr: str, budget: list, problems: list, what: str) -> bool:
        """``label.<attr>`` (``mask`` or ``map``) stays in the database, or goes to a file
        (``<attr>_path``); False, with the reason in ``problems``, when the file could not
        be written (the label is then not to be kept)."""
        array = getattr(label, attr)
        if array is None:
            return True
        n = int(np.asarray(array).size)
        if n <= DB_MAX_PIXELS and n <= budget[0]:
            budget[0] -= n
            self.summary.add("masks_in_database")
            return True
        try:
            export_label_png(label, attr, self.folder / f"{label.id}.png")
        except Exception as e:  # noqa: BLE001 -- this label only
            problems.append(f"{what} was not written to {self.folder}: {reason(e)}")
            self.summary.add("masks_not_written")
            return False
        self.summary.add("masks_in_files")
        return True

    def replaced(self, root, cfg: MaskPropagationConfig, sample_ids) -> List[Path]:
        """The files of the labels about to be replaced in the output fields (only those
        this package wrote: ``<label id>.png`` in this folder or a ``_masks`` folder)."""
        view = root.select(sample_ids)
        labels = []
        for name in (cfg.output_field, cfg.confidence_field):
            if name and root.has_sample_field(name):
                for value in view.values(name):
                    labels += list(value.detections or []) if isinstance(value, fo.Detections) else \
                        [value] if value is not None else []
        return package_files(labels, [self.folder], MASKS_DIR)

    def remove(self, paths) -> None:
        problems = remove_files(paths)
        self.summary.add("files_removed", len(paths) - len(problems))
        if problems:
            self.summary.warn(f"{len(problems)} replaced mask file(s) could not be removed: {problems[0]}")


def _mask_dir(cfg: MaskPropagationConfig, source, targets, stored) -> Path:
    """``mask_dir``, or ``<store namespace>/_masks`` beside the stored features in use (the
    configured or default store root of the dataset when none is stored)."""
    if cfg.mask_dir:
        return Path(cfg.mask_dir)
    root = source.cfg.store_root(targets) if source.cfg is not None else \
        os.path.join(default_store_root(), str(targets._root_dataset._doc.id))
    return beside_store(stored, root) / MASKS_DIR


__all__ = ["propagate_masks", "check_mask_propagation", "load_mask_references", "predict_mask", "MaskPrediction",
           "MaskReferences", "MaskFiles", "output_size", "resize_nearest", "FUNCTION", "MASKS_DIR",
           "DB_MAX_PIXELS", "SAMPLE_DB_PIXELS"]
