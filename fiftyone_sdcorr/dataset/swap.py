"""``swap_instances``: each target object painted with its source object (the paper's
instance swapping), into NEW samples of another dataset, or of a new group slice.

- **Pairs**: ``(source id, target id)``: label ids of ``patches_field``'s detections
  (objects, same label), or sample ids (whole images). **Automatic pairing**
  (``sources=`` instead of ``pairs``): each target unit of ``samples`` with the most
  similar unit of ``sources`` (of the same label for objects; never itself), ranked by
  :meth:`Propagator.rank <fiftyone_sdcorr.dataset.matching.Propagator.rank>` as
  propagation picks its reference. For each pair, the two units'
  dense features (stored by ``compute_fused_features``, else computed through the same
  :class:`~fiftyone_sdcorr.dataset.feature_source.FeatureSource` as propagation) are
  matched densely inside both regions (:func:`~fiftyone_sdcorr.core.matching.dense.dense_match`),
  and every pixel of the target region takes the colour of its match in the source; every
  other pixel is the target's, exactly.
- **Regions**: an object's region is its instance mask (``fo.Detection.mask`` /
  ``mask_path``, over its box) when it has one, else its box; a whole image's, the
  non-zero pixels of ``mask_field`` (a ``fo.Segmentation``) when given, else the image.
  Object features and pixels are the object's crop (the box grown by the context margin
  of the features).
- **Output**: one new sample per pair in ``output_dataset`` (created if missing,
  persistent), or (a grouped dataset, ``output_slice``) in the target's own group as a
  sample of the slice ``output_slice``; its image written ONLY under ``output_dir`` (default
  ``<feature store>/_swaps/<output dataset id>[-<slice>]``; the file name is a hash of the
  pair's ids and settings, never a user string); no media or label of ``samples`` is ever
  written. The new
  sample carries copies of the target sample's label fields (same image geometry, so its
  keypoints, detections and masks stay valid) and provenance fields
  (:data:`PROVENANCE_FIELDS`). Optional: the paper's Stable Diffusion refinement
  (``refine``: image-to-image, or inpainting inside the mask) and a warp animation GIF
  beside the image (``animation``).
- **Resumable**: a pair already in ``output_dataset`` with the same settings (its
  ``sdcorr_swap_key``) is skipped, so a rerun after a crash completes the dataset without
  duplicates; ``overwrite=True`` redoes them (their samples replaced).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

import fiftyone as fo
import fiftyone.core.media as fom

from fiftyone_sdcorr.core.matching.dense import dense_match
from fiftyone_sdcorr.core.common.files import check_output_folder, write_atomic
from fiftyone_sdcorr.core.common.geometry import Crop
from fiftyone_sdcorr.core.common.images import load_image
from fiftyone_sdcorr.core.pictures.swap import (
    encode_gif,
    img2img_pipeline,
    match_positions,
    paste,
    png_bytes,
    refine_region,
    sd_parts_of,
    swap_region,
    warp_frames,
)
from fiftyone_sdcorr.dataset.config import FEATURE_FIELDS, FEATURE_PARAMS, FeatureConfig, SwapConfig, flat_keywords, \
    merge_features, refine_settings
from fiftyone_sdcorr.dataset.engine import (
    ParameterError,
    Run,
    RunSummary,
    checks_done,
    image_collection,
    reason,
    require_field,
)
from fiftyone_sdcorr.dataset.feature_source import FeatureSource
from fiftyone_sdcorr.dataset.matching import rank_candidates, resolve_references, unit_vector
from fiftyone_sdcorr.dataset.output_files import beside_store
from fiftyone_sdcorr.dataset.progress import ProgressArg
from fiftyone_sdcorr.dataset.units import Unit, Units, patches_field_of

FUNCTION = "swap_instances"
PREFIX = "sdcorr_swap_"
#: the provenance of every new sample: field -> what it holds
PROVENANCE_FIELDS = {
    f"{PREFIX}source_sample_id": "the source sample's id",
    f"{PREFIX}source_label_id": "the source detection's id (None for a whole-image pair)",
    f"{PREFIX}target_sample_id": "the target sample's id (its image is the background)",
    f"{PREFIX}target_label_id": "the target detection's id (None for a whole-image pair)",
    f"{PREFIX}settings": "the settings (SwapConfig.settings() and the features' fingerprint)",
    f"{PREFIX}key": "a hash of the ids and settings: what a rerun skips",
    f"{PREFIX}coverage": "the share of the target region that took a source colour",
    f"{PREFIX}confidence": "the mean match confidence over the target region",
    f"{PREFIX}animation": "the warp animation GIF (None without animation)",
}
KEY_FIELD = f"{PREFIX}key"
SWAPS_DIR = "_swaps"


@dataclass(frozen=True)
class Pair:
    source: Unit
    target: Unit

    @property
    def name(self) -> str:
        return f"{self.source.id}->{self.target.id}"


@flat_keywords(refine=True)
def swap_instances(
    samples,
    pairs=None,
    output_dataset: Optional[str] = None,
    *,
    sources=None, output_slice: Optional[str] = None,
    patches_field: Optional[str] = None, mask_field: Optional[str] = None,
    resolution: Optional[int] = None, min_confidence: Optional[float] = None,
    refine: Optional[Union[bool, str, dict]] = None,
    seed: Optional[int] = None, animation: Optional[bool] = None, animation_frames: Optional[int] = None,
    output_dir=None,
    features=None,
    overwrite: Optional[bool] = None,
    progress: ProgressArg = None,
) -> RunSummary:
    """Swaps instances: for each ``(source, target)`` pair, a NEW sample in
    ``output_dataset`` (or in the group slice ``output_slice``) whose image is the target's
    with the target region painted by its dense match in the source (module docstring).
    Every keyword defaults to ``None``: the default of
    :class:`~fiftyone_sdcorr.dataset.config.SwapConfig`.

    Args:
        samples: the dataset or view holding the targets (and, for explicit pairs, the
            sources); never written (a grouped dataset: pass a slice,
            ``samples.select_group_slices("left")``).
        pairs: ``[(source id, target id), ...]``: detection ids of ``patches_field`` (same
            label), or sample ids for whole images. Give ``pairs`` or ``sources``.
        output_dataset: the name of the dataset the new samples go to (created if
            missing, persistent; never ``samples``' own dataset). Give it or ``output_slice``.
        sources: automatic pairing instead of ``pairs``: a tag, a view of the same
            dataset, or a list of ids (sample ids; with ``patches_field`` also detection
            ids): each unit of ``samples`` is paired with its most similar source unit by
            the global embedding (``embedding_field`` when every unit has one, else the mean
            dense descriptor), of the same label for objects, never itself.
        output_slice: a grouped dataset: the new samples join their target's group as
            this slice (new, or holding only swaps).
        patches_field: a ``fo.Detections`` field: the pairs are its objects.
        mask_field: whole-image pairs: a ``fo.Segmentation`` field (non-zero = region).
        resolution: cells per side of the dense grid; min_confidence: target pixels whose
            match is less confident keep their colour.
        refine: the optional SD pass over the swapped region with the features' SD weights
            (image-to-image over the crop, or inpainting inside the mask), blended in only
            inside the region: False, ``"img2img"`` (or True), ``"inpaint"``, or a dict of
            ``mode`` (one of those), ``strength``, ``steps``, ``guidance``, ``prompt``
            (``{label}`` is the target's label), ``size`` (each also a flat keyword
            ``refine_strength=``, ...: the one shim,
            :func:`~fiftyone_sdcorr.dataset.config.flat_keywords`); seed: its seed.
        animation, animation_frames: a warp animation GIF beside each new image.
        output_dir: where new images go (default ``<feature store>/_swaps/<dataset id>``).
        features: as in :func:`~fiftyone_sdcorr.dataset.propagate.propagate_keypoints`
            (``features_field``; ``embedding_field``: automatic pairing ranks by these
            global embeddings; ``batch_size`` is also the number of pairs whose features
            are fetched at once).
        overwrite: redo pairs already swapped with these settings (their samples replaced).
        progress: True/False/None or ``callable(fraction, label)``.

    Returns:
        a :class:`RunSummary`: ``pairs``, ``swapped``, ``skipped`` (already there),
        ``failed``, ``errors`` (by pair ``"source id->target id"``; automatic pairing: by
        target id for a target without a source), ``warnings``, ``output_dataset``,
        ``output_slice``, ``output_dir``.
    """
    # 1. check every parameter, pair and field before anything loads or is written
    given = merge_features(features, {}, FEATURE_PARAMS + FEATURE_FIELDS)
    rf = refine_settings(refine)
    cfg = SwapConfig.build(
        output_dataset=output_dataset, output_slice=output_slice, mask_field=mask_field,
        features_field=given.get("features_field"),
        patches_field=patches_field_of(samples, patches_field) if hasattr(samples, "_root_dataset") else patches_field,
        embedding_field=given.get("embedding_field"), resolution=resolution, min_confidence=min_confidence,
        **{f"refine_{k}" if k != "mode" else "refine": v for k, v in rf.items()}, seed=seed,
        animation=animation, animation_frames=animation_frames, output_dir=output_dir,
        batch_size=given.get("batch_size"), overwrite=overwrite)
    units, plan = check_swap(samples, pairs, cfg, sources)
    source = FeatureSource(samples, cfg.features_field, given, cfg.batch_size, units)
    base = swaps_folder(cfg, units, plan, FeatureConfig.build(store_dir=given.get("store_dir")).store_root(samples))
    checks_done()
    return _swap(samples, units, plan, cfg, source, base, progress)


# --------------------------------------------------------------------------- checks
@dataclass
class Automatic:
    """Automatic pairing: the target units (of ``samples``) and the source units."""

    targets: Units
    sources: Units


def check_swap(samples, pairs, cfg: SwapConfig, sources=None) -> Tuple[Units, Union[List[Pair], Automatic]]:
    """The units and the resolved pairs (or, with ``sources``, the units to pair
    automatically); every refusal a :class:`ParameterError`."""
    image_collection(samples, "samples")
    units = Units(samples, cfg.patches_field)
    if cfg.mask_field is not None:
        if units.objects:
            raise ParameterError("parameter 'mask_field': objects use their detection's instance mask (or box); "
                                 "mask_field is for whole-image pairs")
        require_field(samples, "mask_field", cfg.mask_field, "segmentation")
    if cfg.features_field and samples._root_dataset.has_sample_field(units.path(cfg.features_field)):
        if not units.objects:
            require_field(samples, "features_field", cfg.features_field, "string")
    if (pairs is None) == (sources is None):
        raise ParameterError("give one of parameters 'pairs' (a list of (source id, target id)) and 'sources' "
                             "(a tag, view or ids: each target paired with its most similar source)")
    plan = resolve_pairs(units, pairs) if sources is None else \
        Automatic(units, resolve_sources(samples, sources, cfg.patches_field))
    _check_output(samples, cfg)
    check_refine_steps(cfg)
    return units, plan


def check_refine_steps(cfg: SwapConfig) -> None:
    """A refinement of at least one denoising step: diffusers' image-to-image and
    inpainting pipelines run ``min(int(refine_steps * refine_strength), refine_steps)``
    steps, and none at all is a failure of every pair after the SD model loaded."""
    if cfg.refine and min(int(cfg.refine_steps * cfg.refine_strength), cfg.refine_steps) < 1:
        strength = math.ceil(1000.0 / cfg.refine_steps) / 1000.0
        steps = math.ceil(1.0 / cfg.refine_strength) if cfg.refine_strength > 0 else None
        raise ParameterError(
            f"parameters 'refine_strength' and 'refine_steps': refine_strength {cfg.refine_strength} x refine_steps "
            f"{cfg.refine_steps} gives no denoising step (diffusers runs int(strength x steps) of them); raise "
            f"refine_strength to at least {strength}" + (f" or refine_steps to at least {steps}" if steps else "")
            + ", or turn refine off")


def swaps_folder(cfg: SwapConfig, units: Units, plan, store_root: str) -> Path:
    """``output_dir``, or ``<feature store namespace>/_swaps`` beside the stored features in
    use (the configured or default store root when none is stored), checked: a folder that
    exists or can be made, writable. The images go to ``<it>/<output dataset id>`` unless
    ``output_dir`` was given."""
    if cfg.output_dir is not None:
        return check_output_folder("output_dir", cfg.output_dir)
    sides = [units] + ([plan.sources] if isinstance(plan, Automatic) else [])
    stored = (p for us in sides for p in us.values(cfg.features_field))
    return check_output_folder("output_dir", beside_store(stored, store_root) / SWAPS_DIR)


def resolve_pairs(units: Units, pairs) -> List[Pair]:
    """``[(source id, target id)]`` -> :class:`Pair` of units of ``units`` (objects of the
    same label)."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not len(pairs):
        raise ParameterError(f"parameter 'pairs' must be a non-empty list of (source id, target id), got {pairs!r}")
    by_id = {u.id: u for u in units.units()}
    what = "object of field " + repr(units.patches_field) if units.objects else "sample"
    out, seen = [], set()
    for i, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ParameterError(f"parameter 'pairs': item {i} must be (source id, target id), got {pair!r}")
        src, tgt = (by_id.get(str(x)) for x in pair)
        for side, got, want in (("source", src, pair[0]), ("target", tgt, pair[1])):
            if got is None:
                raise ParameterError(f"parameter 'pairs': item {i}: {side} {want!r} is no {what} of these samples")
        if units.objects and src.label != tgt.label:
            raise ParameterError(f"parameter 'pairs': item {i}: source {src.id} is a {src.label!r}, target "
                                 f"{tgt.id} a {tgt.label!r}; swap objects of the same label")
        if (src.id, tgt.id) not in seen:
            seen.add((src.id, tgt.id))
            out.append(Pair(src, tgt))
    return out


def resolve_sources(samples, sources, patches_field: Optional[str]) -> Units:
    """``sources`` -> their units: a tag, a view of the samples' dataset, or a list of ids
    (sample ids: all their objects; with ``patches_field`` also detection ids: those
    objects). A view is resolved as propagation resolves its ``references``."""
    root = samples._root_dataset
    if patches_field and isinstance(sources, (list, tuple, set)) and sources:
        ids = [str(i) for i in sources]
        if all(re.fullmatch(r"[0-9a-f]{24}", i) for i in ids):
            view = root.select_labels(ids=ids, fields=patches_field)
            found = set(view.values(f"{patches_field}.detections.id", unwind=True))
            if found and set(ids) - found:
                raise ParameterError(f"parameter 'sources': {sorted(set(ids) - found)[:3]} are no objects of field "
                                     f"{patches_field!r}")
            if found:
                return Units(view, patches_field)
    try:
        view = resolve_references(samples, sources)
    except ParameterError as e:
        raise ParameterError(str(e).replace("'references'", "'sources'")) from None
    units = Units(view, patches_field)
    if not units.units():
        raise ParameterError(f"parameter 'sources': its samples hold no object of field {patches_field!r}")
    return units


def _check_output(samples, cfg: SwapConfig) -> None:
    """``output_dataset``: not the samples' own, new or holding swaps only; ``output_slice``:
    a slice of the samples' grouped dataset, new or holding swaps only."""
    root = samples._root_dataset
    if cfg.output_slice is None:
        return _check_output_dataset(samples, cfg)
    name = cfg.output_slice
    if root.media_type != fom.GROUP:
        raise ParameterError(f"parameter 'output_slice': dataset {root.name!r} is not grouped; give output_dataset")
    if name in (root.group_slices or []):
        there = root.select_group_slices(name)
        if not root.has_sample_field(KEY_FIELD) or len(there.exists(KEY_FIELD, False)):
            raise ParameterError(f"parameter 'output_slice': slice {name!r} holds other samples (not swaps); name a "
                                 "new slice")
    return None


def _check_output_dataset(samples, cfg: SwapConfig) -> None:
    name = cfg.output_dataset
    if not name.strip():
        raise ParameterError("parameter 'output_dataset' must name a dataset")
    if name == samples._root_dataset.name:
        raise ParameterError(f"parameter 'output_dataset': {name!r} is the dataset of the samples; the swaps go "
                             "to another dataset (its media is never written), or to a new group slice "
                             "(output_slice) of a grouped dataset")
    if fo.dataset_exists(name):
        out = fo.load_dataset(name)
        if len(out) and not out.has_sample_field(KEY_FIELD):
            raise ParameterError(f"parameter 'output_dataset': {name!r} holds other samples (not swaps); name a "
                                 "new dataset")


# --------------------------------------------------------------------------- the run
@dataclass
class Output:
    """Where the new samples go: a dataset, or (``slice``) a group slice of the samples'
    grouped dataset."""

    dataset: Any
    slice: Optional[str] = None

    def swaps(self):
        """The samples already there (None: none)."""
        if self.slice is None:
            return self.dataset if len(self.dataset) else None
        if self.slice not in (self.dataset.group_slices or []):
            return None
        return self.dataset.select_group_slices(self.slice)

    @property
    def folder(self) -> str:
        """The default image folder's name: the dataset's id (and the slice)."""
        return str(self.dataset._doc.id) + (f"-{self.slice}" if self.slice else "")


def _swap(samples, units: Units, plan, cfg: SwapConfig, source, base: Path, progress):
    """The run after its checks: the output, the pairs (ranked now if automatic), what is
    done already, then batches."""
    summary = RunSummary(FUNCTION, ("pairs", "swapped", "skipped", "sources_skipped"),
                         output_dataset=cfg.output_dataset, output_slice=cfg.output_slice, skipped_sources=[])
    out = _open_output(samples, cfg)
    summary["output_dataset"] = out.dataset.name
    out_dir = base if cfg.output_dir else base / out.folder
    summary["output_dir"] = str(out_dir)
    sides = [units] + ([plan.sources] if isinstance(plan, Automatic) else [])
    stored = {u.id: v for us in sides for u, v in zip(us.units(), us.values(cfg.features_field))}
    source.locate(stored.values())
    if isinstance(plan, Automatic):
        plan = pair_automatically(plan, cfg, source, stored, summary)
    summary["pairs"] = len(plan)
    settings = {**cfg.settings(), "features": _features_id(source)}
    keyed = [(swap_key(p, settings), p) for p in plan]
    todo = _not_done(out, keyed, cfg.overwrite, summary)
    ctx = {"cfg": cfg, "settings": settings, "out_dir": out_dir, "margin": source.margin, "samples": samples,
           "pipe": _refiner(source, cfg.refine) if cfg.refine and todo else None, "slice": out.slice}
    with Run(samples, summary, len(todo), progress, "swapping") as run:
        for batch in run.batches(todo, cfg.batch_size):
            want = {u.id: u for _, p in batch for u in (p.source, p.target)}
            feats = source.get([(uid, u, stored.get(uid)) for uid, u in want.items()])
            for key, pair in batch:
                _one_pair(out, key, pair, feats, ctx, run)
            run.step(len(batch))
    summary["warnings"] += [n for n in source.notes if n not in summary["warnings"]]
    return summary


def _one_pair(out: Output, key: str, pair: Pair, feats: dict, ctx: dict, run: Run) -> None:
    try:
        sample = swap_pair(key, pair, feats.get(pair.source.id), feats.get(pair.target.id), ctx)
    except Exception as e:  # noqa: BLE001 -- this pair only
        run.fail(pair.name, reason(e))
        return
    out.dataset.add_sample(sample)
    run.summary.add("swapped")


def _open_output(samples, cfg: SwapConfig) -> Output:
    """The output (a dataset created persistent if missing, or the samples' grouped
    dataset and the slice), its provenance fields declared."""
    if cfg.output_slice is not None:
        out = Output(samples._root_dataset, cfg.output_slice)
    else:
        name = cfg.output_dataset
        out = Output(fo.load_dataset(name) if fo.dataset_exists(name) else fo.Dataset(name, persistent=True))
    for field in PROVENANCE_FIELDS:
        if not out.dataset.has_sample_field(field):
            ftype = {f"{PREFIX}settings": fo.DictField, f"{PREFIX}coverage": fo.FloatField,
                     f"{PREFIX}confidence": fo.FloatField}.get(field, fo.StringField)
            out.dataset.add_sample_field(field, ftype)
    return out


# --------------------------------------------------------------------------- automatic pairing
def pair_automatically(auto: Automatic, cfg: SwapConfig, source: FeatureSource, stored: dict,
                       summary: RunSummary) -> List[Pair]:
    """Each target unit with its most similar source unit: :meth:`Propagator.rank` (how
    propagation picks its reference) over the global embeddings (``embedding_field``) when
    every unit has one, else the mean dense descriptors; objects: only sources of the
    target's label; never the target itself. A target that is itself a source and has no
    other source is skipped (``sources_skipped``, ``skipped_sources``), not failed; any
    other target without a candidate, or a unit whose features fail, is a failure of its
    own (by unit id)."""
    src, tgt = auto.sources.units(), auto.targets.units()
    embs = {}
    for us in (auto.sources, auto.targets):
        embs.update((u.id, unit_vector(v)) for u, v in zip(us.units(), us.values(cfg.embedding_field)))
    everyone = list({u.id: u for u in src + tgt}.values())
    vecs = _global_vectors(everyone, embs, source, stored, cfg.batch_size, summary)
    cands = [u for u in src if u.id in vecs]
    source_ids = {u.id for u in src}
    plan = []
    for t in tgt:
        if t.id not in vecs:
            continue  # its features failed: recorded
        same = [u for u in cands if u.id != t.id and u.label == t.label]
        ranked = rank_candidates(same, vecs[t.id], embs.get(t.id), lambda u: embs.get(u.id), lambda u: vecs[u.id])
        best = next((u for sim, u in ranked if math.isfinite(sim)), None)
        if best is None and t.id in source_ids:  # a source, not a target that failed
            summary.add("sources_skipped")
            summary["skipped_sources"].append(t.id)
        elif best is None:
            summary.fail(t.id, "no source " + (f"object labelled {t.label!r}" if t.is_object else "image")
                         + " other than itself")
        else:
            plan.append(Pair(best, t))
    return plan


def _global_vectors(units: List[Unit], embs: Dict[str, Optional[torch.Tensor]], source: FeatureSource,
                    stored: dict, batch_size: int, summary: RunSummary) -> Dict[str, torch.Tensor]:
    """``{unit id: global vector}``: the embeddings when every unit has one (of one size),
    else the mean dense descriptor of each unit's features (read or computed in batches;
    only the vectors are kept)."""
    if all(embs.get(u.id) is not None for u in units) and len({embs[u.id].numel() for u in units}) == 1:
        return {u.id: embs[u.id] for u in units}
    vecs = {}
    for start in range(0, len(units), batch_size):
        chunk = units[start:start + batch_size]
        got = source.get([(u.id, u, stored.get(u.id)) for u in chunk])
        for u in chunk:
            f = got.get(u.id)
            if f is None or isinstance(f, Exception):
                summary.fail(u.id, f"its features: {reason(f) if f is not None else 'none'}")
            else:
                vecs[u.id] = f.global_vector().float().cpu()
    return vecs


def _features_id(source: FeatureSource) -> str:
    """The fingerprint of the features a pair is matched with (part of its settings)."""
    if source.config_fp is not None:
        return source.config_fp
    return source.cfg.fingerprint() if source.cfg is not None else "unknown"


def swap_key(pair: Pair, settings: dict) -> str:
    """A pair's identity in the output dataset: its ids and settings, hashed."""
    blob = json.dumps([pair.source.sample_id, pair.source.label_id, pair.target.sample_id, pair.target.label_id,
                       settings], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:24]


def _not_done(out: Output, keyed, overwrite: bool, summary) -> list:
    """The pairs still to swap: those without a sample of their key (with ``overwrite``,
    every pair, their old samples deleted)."""
    keys = [k for k, _ in keyed]
    there = out.swaps()
    done = there.match(fo.ViewField(KEY_FIELD).is_in(keys)) if there is not None else None
    have = set(done.values(KEY_FIELD)) if done is not None else set()
    if overwrite and have:
        out.dataset.delete_samples(done.values("id"))
        have = set()
    todo = [(k, p) for k, p in keyed if k not in have]
    summary["skipped"] = len(keyed) - len(todo)
    return todo


def _refiner(source: FeatureSource, mode: str):
    """The refinement pipeline (``mode``: img2img or inpaint) over the SD components the
    features use (loaded once)."""
    ext = source.extractor
    parts = sd_parts_of(ext)
    if parts is None:
        if source.cfg is None or source.cfg.extractor is not None:
            raise ParameterError("parameter 'refine': the features' extractor has no Stable Diffusion components; "
                                 "pass a FeatureExtractor as extractor= (or sd_model=) to refine")
        from fiftyone_sdcorr.core.features.models import load_stable_diffusion

        parts = load_stable_diffusion(source.cfg.sd_model, source.device, source.cfg.dtype)
    return img2img_pipeline(parts, mode)


# --------------------------------------------------------------------------- one pair
def swap_pair(key: str, pair: Pair, fs, ft, ctx: dict) -> fo.Sample:
    """The new sample of one pair (its image written under ``ctx["out_dir"]``)."""
    cfg: SwapConfig = ctx["cfg"]
    for side, f in (("source", fs), ("target", ft)):
        if f is None or isinstance(f, Exception):
            raise RuntimeError(f"{side} {getattr(pair, side).id}: {reason(f) if f is not None else 'no features'}")
    src, tgt = _side(pair.source, ctx), _side(pair.target, ctx)
    match = dense_match(fs, ft, resolution=cfg.resolution, source_mask=src["mask"], target_mask=tgt["mask"])
    th, tw = tgt["mask"].shape
    field = match.sample(tw, th)
    region, filled = swap_region(tgt["region"], src["region"], field, tgt["mask"], cfg.min_confidence)
    if ctx["pipe"] is not None:
        prompt = cfg.refine_prompt.format(label=pair.target.label or "object") if "{label}" in cfg.refine_prompt \
            else cfg.refine_prompt
        region = refine_region(ctx["pipe"], region, tgt["mask"], strength=cfg.refine_strength, seed=cfg.seed,
                               steps=cfg.refine_steps, guidance=cfg.refine_guidance, prompt=prompt,
                               size=cfg.refine_size)
    image = paste(tgt["image"], region, tgt["crop"].left, tgt["crop"].top)
    path = ctx["out_dir"] / f"{key}.png"
    write_atomic(path, png_bytes(image))
    gif = _animation(ctx, key, field, filled, region, src, tgt) if cfg.animation else None
    area = max(1, int(tgt["mask"].sum()))
    conf = field.confidence[tgt["mask"]]
    prov = {"coverage": float(filled.sum()) / area, "confidence": float(conf.mean()) if conf.size else 0.0,
            "animation": gif}
    return _new_sample(path, key, pair, ctx, prov)


def _side(unit: Unit, ctx: dict) -> dict:
    """A unit's image, its crop (the whole image for an image unit), the region's pixels
    and its mask over the region."""
    image = np.asarray(load_image(unit.filepath))
    h, w = image.shape[:2]
    crop = Crop.of_box(w, h, unit.box, ctx["margin"]) if unit.is_object else Crop(w, h, 0, 0, w, h)
    cfg = ctx["cfg"]
    mask = region_mask(ctx["samples"], unit, cfg.patches_field if unit.is_object else cfg.mask_field, w, h)
    mask = mask[crop.top:crop.bottom, crop.left:crop.right]
    if not mask.any():
        raise ValueError(f"{'object' if unit.is_object else 'sample'} {unit.id}: its region is empty")
    return {"image": image, "crop": crop, "mask": mask,
            "region": image[crop.top:crop.bottom, crop.left:crop.right]}


def region_mask(samples, unit: Unit, field: Optional[str], width: int, height: int) -> np.ndarray:
    """A unit's region over its ``width x height`` image (bool): an object's instance mask
    (over its box) or its box (``field``: its ``fo.Detections`` field); an image's
    non-zero pixels of ``field`` (a ``fo.Segmentation``), or all of it (``field`` None)."""
    sample = samples._root_dataset[unit.sample_id]
    if not unit.is_object:
        seg = sample[field] if field else None
        m = seg.get_mask() if seg is not None else None
        if m is None:
            return np.ones((height, width), bool)
        m = np.asarray(m)
        m = m.any(-1) if m.ndim == 3 else m != 0
        return np.array(Image.fromarray(m).resize((width, height), Image.NEAREST), dtype=bool)
    x, y, bw, bh = unit.box
    left, top = int(round(x * width)), int(round(y * height))
    right, bottom = max(left + 1, int(round((x + bw) * width))), max(top + 1, int(round((y + bh) * height)))
    right, bottom = min(right, width), min(bottom, height)
    out = np.zeros((height, width), bool)
    det = next(d for d in sample[field].detections if d.id == unit.label_id)
    inst = det.get_mask() if det.has_mask else None
    if inst is None:
        out[top:bottom, left:right] = True
    else:
        small = Image.fromarray(np.asarray(inst) != 0).resize((right - left, bottom - top), Image.NEAREST)
        out[top:bottom, left:right] = np.asarray(small, dtype=bool)
    return out


def _animation(ctx, key: str, field, filled, region, src: dict, tgt: dict) -> Optional[str]:
    """The warp animation GIF beside the new image: the swapped pixels moving from their
    place in the source image to their place in the target image."""
    th, tw = tgt["image"].shape[:2]
    sc, tc = src["crop"], tgt["crop"]
    start, end = match_positions(field, filled, sc.size, sc.to_image, tc.to_image)
    frames = warp_frames(tgt["image"], start * (tw, th) - 0.5, end * (tw, th) - 0.5, region[filled],
                         ctx["cfg"].animation_frames)
    path = ctx["out_dir"] / f"{key}.gif"
    write_atomic(path, encode_gif(frames))
    return str(path)


def _new_sample(path: Path, key: str, pair: Pair, ctx: dict, prov: dict) -> fo.Sample:
    """The new sample: the image, copies of the target's labels, the provenance."""
    root = ctx["samples"]._root_dataset
    target = root[pair.target.sample_id]
    labels = {name: target[name].copy() for name, f in root.get_field_schema().items()
              if isinstance(f, fo.EmbeddedDocumentField) and issubclass(f.document_type, fo.Label)
              and target[name] is not None}
    if ctx["slice"] is not None:  # the target's group, as a sample of the output slice
        labels[root.group_field] = target[root.group_field].element(ctx["slice"])
    p = PREFIX
    return fo.Sample(filepath=str(path), tags=["sdcorr:swap"], **labels, **{
        f"{p}source_sample_id": pair.source.sample_id, f"{p}source_label_id": pair.source.label_id,
        f"{p}target_sample_id": pair.target.sample_id, f"{p}target_label_id": pair.target.label_id,
        f"{p}settings": dict(ctx["settings"]), KEY_FIELD: key, f"{p}coverage": prov["coverage"],
        f"{p}confidence": prov["confidence"], f"{p}animation": prov["animation"]})


__all__ = ["swap_instances", "check_swap", "resolve_pairs", "resolve_sources", "pair_automatically", "swap_key",
           "swap_pair", "region_mask", "check_refine_steps", "swaps_folder", "PROVENANCE_FIELDS", "KEY_FIELD", "SWAPS_DIR", "FUNCTION", "Pair", "Automatic", "Output"]
