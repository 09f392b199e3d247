"""Feature views the App shows: colour pictures of the features, similarity heat maps.

- :func:`write_feature_pca`: the first three principal components of each sample's stored
  fused features as an RGB picture (or, ``mode="parts"``, a part clustering), fitted once
  on (a subset of) the collection so the same part has the same colour on every sample
  (the paper's PCA figures, dataset-wide); a PNG per sample whose path goes into a string
  field that the App can show as the sample's media (``app_config.media_fields``).
- :func:`write_similarity_heatmaps`: the cosine similarity of one point of a reference
  sample to every location of each sample, as an ``fo.Heatmap`` (8-bit PNG on disk,
  ``range=[0, 255]`` for cosine ``0..1``): where does "this part" appear in every image.
- :func:`write_dense_views`: the dense correspondence of a reference to each sample
  (:func:`~fiftyone_sdcorr.core.matching.dense.dense_match`) as a picture per sample: the
  reference's position colours carried onto it (the paper's colour map) or the reference
  warped onto it; a media field like the PCA pictures.

All read the dense features stored by ``compute_fused_features`` (a path in
``features_field``, all of one fingerprint); samples without features are skipped and
reported. The images go to ``output_dir``, by default beside the feature store in use:
``<store namespace>/_views/<output_field>/<sample id>.png`` (the field name is checked as
a FiftyOne field name first, so it never leads outside that folder). Pictures are written
at the downsampled size the panel uses (long side at most ``max_side``, the image's aspect);
the resampling goes through the letterbox, so they line up with the image and its labels.
Speaks FiftyOne (layer 4); the pictures come from :mod:`fiftyone_sdcorr.core.pictures.visualize` and
:mod:`fiftyone_sdcorr.core.matching.dense`.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

import fiftyone as fo

from fiftyone_sdcorr.core.pictures import visualize as vis
from fiftyone_sdcorr.core.matching.dense import dense_match, position_colors, warp_image
from fiftyone_sdcorr.core.common.files import check_output_folder, write_atomic
from fiftyone_sdcorr.core.common.params import check_choice, check_int
from fiftyone_sdcorr.dataset.config import VIEW_MODES, FeaturePCAConfig, HeatmapConfig, ViewConfig
from fiftyone_sdcorr.dataset.engine import (
    ParameterError,
    Run,
    RunSummary,
    check_float,
    checks_done,
    declare_outputs,
    guard_outputs,
    image_collection,
    require_field,
)
from fiftyone_sdcorr.dataset.feature_source import FeatureSource
from fiftyone_sdcorr.dataset.output_files import beside_store
from fiftyone_sdcorr.dataset.pck import image_size_of
from fiftyone_sdcorr.dataset.progress import ProgressArg
from fiftyone_sdcorr.dataset.skeletons import keypoint_skeleton
from fiftyone_sdcorr.dataset.units import Units, by_sample, link_to_objects

VIEWS_DIR = "_views"
FEATURE_VIEW_MODES = VIEW_MODES
DENSE_FIELD = "sdcorr_dense"
#: write_dense_views: the reference's position colours carried onto each sample, or the reference warped onto it
DENSE_MODES = ("colors", "warp")
#: cells per side of write_dense_views' dense grid: the default and the allowed range
DENSE_VIEW_RESOLUTION = 128
DENSE_RESOLUTION_RANGE = (8, 1024)


@dataclass(frozen=True)
class DenseViewConfig(ViewConfig):
    """``write_dense_views``: position colours or the warped reference into ``output_field``,
    matched on a ``resolution x resolution`` grid over each letterbox frame (the cost per
    sample grows with ``resolution ** 4``: 128 takes a few seconds for 1536-channel
    features on a CPU)."""

    output_field: str = DENSE_FIELD
    mode: str = "colors"
    resolution: int = DENSE_VIEW_RESOLUTION

    def __post_init__(self):
        super().__post_init__()
        check_choice("mode", self.mode, DENSE_MODES)
        lo, hi = DENSE_RESOLUTION_RANGE
        object.__setattr__(self, "resolution", int(check_int("resolution", self.resolution, lo=lo, hi=hi)))


def write_feature_pca(
    samples,
    output_field: Optional[str] = None,
    *,
    mode: Optional[str] = None,
    n_parts: Optional[int] = None,
    features_field: Optional[str] = None,
    output_dir: Optional[str] = None,
    fit_samples: Optional[int] = None,
    max_side: Optional[int] = None,
    overwrite: Optional[bool] = None,
    patches_field: Optional[str] = None,
    progress: ProgressArg = None,
) -> RunSummary:
    """Writes a colour picture of each sample's fused features as an extra media field.

    ``mode="pca"``: the first three principal components as RGB; ``mode="parts"``: a
    k-means clustering of the tokens into ``n_parts`` parts, one colour per part. Both are
    fitted once on ``fit_samples`` samples of the view, so a part has the same colour on
    every sample. ``output_field`` (a string field) holds each PNG's path and is added to
    the dataset's ``app_config.media_fields``: in the App, choose it as the media field (the
    grid's settings, or the modal's) to see the pictures in colour. With ``patches_field``
    (or a ``to_patches()`` view) the objects' features are fitted and drawn, each in its
    crop's place on a black picture of the sample. Keywords default to ``None``: the
    default of :class:`~fiftyone_sdcorr.dataset.config.FeaturePCAConfig`.

    Returns:
        a :class:`RunSummary`: ``written``, ``failed``, ``errors`` (sample id -> reason),
        ``output_field``, ``output_dir``.
    """
    # 1. check every parameter and field before anything is written
    cfg = FeaturePCAConfig.build(output_field=output_field, mode=mode, n_parts=n_parts, features_field=features_field,
                                 output_dir=output_dir, fit_samples=fit_samples, max_side=max_side, overwrite=overwrite)
    image_collection(samples)
    units = Units(samples, patches_field)
    items, source = _stored_features(samples, cfg, "string", units)
    out_dir = _views_dir(cfg, next(p for _, p in items if p))
    checks_done()
    # 2. one PCA (or one part clustering) for the whole view
    summary = RunSummary("write_feature_pca", ("written",), output_field=cfg.output_field, mode=cfg.mode)
    have = [(u.id, p) for u, p in items if p]
    fitted = _fit_features(have, cfg, source, summary)
    colors = _pca_colors(fitted) if cfg.mode == "pca" else _part_colors(fitted, cfg.n_parts)
    # 3. one colour image per sample, shown as a media field
    _output_dir(out_dir, summary)
    _pictures(samples, items, source, colors, cfg, out_dir, summary, progress, cfg.mode, lambda path, sid: path)
    _add_media_field(samples._root_dataset, cfg.output_field)
    return summary


def _fit_features(have, cfg: ViewConfig, source, summary) -> list:
    step = max(1, len(have) // cfg.fit_samples)
    fitted = []
    for sid, p in have[::step][:cfg.fit_samples]:
        try:
            fitted.append(source.load_stored(p))
        except Exception as e:  # noqa: BLE001 (recorded per sample later)
            summary.warn(f"{sid}: cannot read features for the fit: {e}")
    if not fitted:
        raise ParameterError(f"parameter 'features_field': no readable stored features in {cfg.features_field!r}")
    return fitted


def _pca_colors(fitted):
    pca = vis.fit_pca_colors(fitted)
    return lambda fused, w, h: vis.token_map_to_image(pca.apply(fused).astype(np.float32), fused, w, h).round().clip(0, 255)


def _part_colors(fitted, n_parts: int):
    centers = vis.fit_part_centers(fitted, k=n_parts)

    def colors(fused, w, h):
        up = vis.token_map_to_image(vis.assign_parts(fused, centers).astype(np.float32), fused, w, h, mode="nearest")
        return vis.labels_to_rgb(up.round().astype(int))

    return colors


def _add_media_field(dataset, field: str) -> None:
    """Lets the App show ``field`` (image paths) as the samples' media."""
    fields = list(dataset.app_config.media_fields or ["filepath"])
    if field not in fields:
        dataset.app_config.media_fields = fields + [field]
        dataset.save()


def write_similarity_heatmaps(
    samples,
    reference_id: str,
    point: Optional[Sequence[float]] = None,
    *,
    keypoints_field: Optional[str] = None,
    keypoint: Union[int, str, None] = None,
    output_field: Optional[str] = None,
    features_field: Optional[str] = None,
    output_dir: Optional[str] = None,
    max_side: Optional[int] = None,
    overwrite: Optional[bool] = None,
    patches_field: Optional[str] = None,
    progress: ProgressArg = None,
) -> RunSummary:
    """Writes, for each sample, the similarity of one reference point to every location.

    The point is ``point`` (normalised ``(x, y)`` in the reference image) or keypoint
    ``keypoint`` (an index, or a label of the dataset's skeleton for ``keypoints_field``) of
    the first ``fo.Keypoint`` in the reference's ``keypoints_field``. Each sample gets an
    ``fo.Heatmap`` (8-bit PNG, ``range=[0, 255]``: cosine similarity ``0..1``; negative
    values are 0). With ``patches_field`` (or a ``to_patches()`` view), ``reference_id`` is
    the id of the reference OBJECT (a detection) and the point is in its image; every
    object is compared with it, drawn in its crop's place (0 elsewhere). Keywords default
    to ``None``: the default of :class:`~fiftyone_sdcorr.dataset.config.HeatmapConfig`.

    Returns:
        a :class:`RunSummary`: ``written``, ``failed``, ``errors``, ``point``,
        ``output_field``, ``output_dir``.
    """
    # 1. check every parameter and field before anything is written
    cfg = HeatmapConfig.build(output_field=output_field, features_field=features_field, output_dir=output_dir,
                              max_side=max_side, overwrite=overwrite)
    image_collection(samples)
    units = Units(samples, patches_field)
    items, source = _stored_features(samples, cfg, "heatmap", units)
    ref_unit, ref_path = _reference(units, reference_id, items, cfg.features_field)
    x, y = _reference_point(units.samples, units.dataset[ref_unit.sample_id], point, keypoints_field, keypoint,
                            ref_unit)
    out_dir = _views_dir(cfg, ref_path)
    checks_done()
    src = source.load_stored(ref_path)
    if ref_unit.is_object:  # the point in the reference object's crop
        x, y = (float(v) for v in ref_unit.crop(source.margin).to_crop([x, y]))
    # 2. one heat map per sample
    summary = RunSummary("write_similarity_heatmaps", ("written",), output_field=cfg.output_field, point=[x, y])
    _output_dir(out_dir, summary)

    def heat(tgt, w, h):
        up = vis.token_map_to_image(np.nan_to_num(vis.similarity_map(src, tgt, (x, y)), nan=0.0), tgt, w, h)
        return np.clip(up, 0.0, 1.0) * 255

    _pictures(samples, items, source, heat, cfg, out_dir, summary, progress, "Heat maps",
              lambda path, sid: fo.Heatmap(map_path=path, range=[0, 255]))
    return summary


def write_dense_views(
    samples,
    reference_id: str,
    output_field: Optional[str] = None,
    *,
    mode: Optional[str] = None,
    resolution: Optional[int] = None,
    features_field: Optional[str] = None,
    output_dir: Optional[str] = None,
    max_side: Optional[int] = None,
    overwrite: Optional[bool] = None,
    patches_field: Optional[str] = None,
    progress: ProgressArg = None,
) -> RunSummary:
    """Writes, for each sample, a picture of the reference's dense correspondence to it.

    Every pixel of a sample is matched to the reference
    (:func:`~fiftyone_sdcorr.core.matching.dense.dense_match` of the stored features on a
    ``resolution`` grid) and takes, ``mode="colors"``, the colour of its match in the
    reference's position colours (the paper's colour map,
    :func:`~fiftyone_sdcorr.core.matching.dense.position_colors`: x to red, y to green), or,
    ``mode="warp"``, its match's pixel of the reference photo (the reference warped onto the
    sample). ``output_field`` (a string field) holds each PNG's path and is added to the
    dataset's ``app_config.media_fields``, as :func:`write_feature_pca` does. With
    ``patches_field`` (or a ``to_patches()`` view), ``reference_id`` is the id of the
    reference OBJECT (a detection): each object is matched with its crop, drawn in its
    crop's place on a black picture of the sample. Keywords default to ``None``: the
    default of :class:`DenseViewConfig`.

    Returns:
        a :class:`RunSummary`: ``written``, ``failed``, ``errors``, ``mode``,
        ``reference_id``, ``output_field``, ``output_dir``.
    """
    # 1. check every parameter and field before anything is written
    cfg = DenseViewConfig.build(output_field=output_field, mode=mode, resolution=resolution,
                                features_field=features_field, output_dir=output_dir, max_side=max_side,
                                overwrite=overwrite)
    image_collection(samples)
    units = Units(samples, patches_field)
    items, source = _stored_features(samples, cfg, "string", units)
    ref_unit, ref_path = _reference(units, reference_id, items, cfg.features_field)
    out_dir = _views_dir(cfg, ref_path)
    checks_done()
    # 2. the reference: its features and what its matches carry
    src = source.load_stored(ref_path)
    carried = _carried(cfg.mode, ref_unit, src, source.margin, cfg.max_side)
    summary = RunSummary("write_dense_views", ("written",), output_field=cfg.output_field, mode=cfg.mode,
                         reference_id=ref_unit.id)
    _output_dir(out_dir, summary)

    def picture(tgt, w, h):
        return warp_image(dense_match(src, tgt, resolution=cfg.resolution, chunk=1024).sample(w, h), carried)

    # 3. one picture per sample, shown as a media field
    _pictures(samples, items, source, picture, cfg, out_dir, summary, progress, "Dense views", lambda path, sid: path)
    _add_media_field(samples._root_dataset, cfg.output_field)
    return summary


def _carried(mode: str, ref_unit, fused, margin: float, max_side: int) -> np.ndarray:
    """What each match carries from the reference (its image, or its object's crop, at
    the pictures' size): its position colours, or its pixels."""
    if mode == "colors":
        return position_colors(*vis.display_size(fused.letterbox.width, fused.letterbox.height, max_side))
    return np.asarray(vis.downsample(ref_unit.load(margin), max_side))


# --------------------------------------------------------------------------- steps
def _stored_features(samples, cfg: ViewConfig, kind: str, units: Units):
    """Checks the fields; ``[(unit, stored path or None)]`` and a source that accepts one
    fingerprint."""
    image_collection(samples)
    require_field(samples, "features_field", units.path(cfg.features_field), "string")
    guard_outputs(samples, {"output_field": (cfg.output_field, kind)}, {"features_field": cfg.features_field}, cfg.overwrite)
    paths = units.values(cfg.features_field)
    if not any(paths):
        raise ParameterError(f"parameter 'features_field': no {units.what[:-1]} has stored features in "
                             f"{cfg.features_field!r}; run compute_fused_features first")
    source = FeatureSource(samples, cfg.features_field, {"device": "cpu"}, units=units)  # pictures: CPU
    return list(zip(units.units(), paths)), source


def _pictures(samples, items, source, render, cfg: ViewConfig, out_dir: Path, summary, progress, label,
              value) -> None:
    """One PNG per sample into ``cfg.output_field`` (``value(path, sample id)``): its unit's
    ``render(features, w, h)``, or each object's pasted at its crop's place."""
    groups = by_sample(items)
    with Run(samples, summary, len(groups), progress, label) as run:
        declare_outputs(samples, {"output_field": (cfg.output_field, "string" if value(None, None) is None else
                                                   "heatmap")})
        out = {}
        for sid, group in groups.items():
            try:
                out[sid] = value(_save_png(out_dir, sid, _picture(group, source, render, cfg.max_side, run)), sid)
                summary.add("written")
            except Exception as e:  # noqa: BLE001
                run.fail(sid, str(e))
            run.step(1)
        run.write(cfg.output_field, out)


def _picture(group, source, render, max_side: int, run) -> np.ndarray:
    """The picture of one sample from its ``[(unit, stored path)]``."""
    unit, path = group[0]
    if not unit.is_object:
        fused = _load(source, path)
        return render(fused, *vis.display_size(fused.letterbox.width, fused.letterbox.height, max_side))
    W, H = image_size_of(unit.filepath, None)
    w, h = vis.display_size(W, H, max_side)
    canvas, problems = None, []
    for u, p in group:
        try:
            crop = u.crop(source.margin)
            left, top = int(round(crop.left * w / W)), int(round(crop.top * h / H))
            cw, ch = max(1, int(round(crop.right * w / W)) - left), max(1, int(round(crop.bottom * h / H)) - top)
            pic = np.asarray(render(_load(source, p), cw, ch), dtype=np.float64)
        except Exception as e:  # noqa: BLE001 -- this object only
            problems.append(f"object {u.id}: {e}")
            continue
        canvas = np.zeros((h, w) + pic.shape[2:]) if canvas is None else canvas
        canvas[top:top + ch, left:left + cw] = pic[:h - top, :w - left]
    if canvas is None:
        raise ValueError("; ".join(problems) or "no object")
    return canvas


def _load(source: FeatureSource, path):
    if not path:
        raise ValueError("no stored features (run compute_fused_features on this sample)")
    return source.load_stored(path)


def _reference(units: Units, reference_id, items, features_field: str):
    """The reference unit (a sample, or an object of ``units``; in the view or not) and its
    stored path."""
    what = "object (detection)" if units.objects else "sample"
    if not isinstance(reference_id, str) or not re.fullmatch(r"[0-9a-f]{24}", reference_id):
        raise ParameterError(f"parameter 'reference_id' must be the id of a {what}, got {reference_id!r}")
    found = [(u, p) for u, p in items if u.id == reference_id]
    if not found:  # a reference outside the view
        root = units.dataset
        view = root.select_labels(ids=[reference_id], fields=units.patches_field) if units.objects else \
            root.select([reference_id])
        ref = Units(view, units.patches_field)
        found = list(zip(ref.units(), ref.values(features_field)))
    if not found:
        raise ParameterError(f"parameter 'reference_id': no {what} {reference_id!r} in the dataset")
    unit, path = found[0]
    if not path:
        raise ParameterError(f"parameter 'reference_id': {what} {reference_id} has no stored features in "
                             f"{features_field!r}")
    if not os.path.isfile(str(path)):
        raise ParameterError(f"parameter 'features_field': field {features_field!r} holds {path!r} for the "
                             "reference, not a stored feature file (run compute_fused_features)")
    return unit, path


def _reference_point(samples, ref, point, keypoints_field, keypoint, unit=None):
    root = samples._root_dataset
    if point is None:
        if not keypoints_field or keypoint is None:
            raise ParameterError("parameter 'keypoint': no point given; give a keypoint (index or skeleton "
                                 "label) of keypoints_field, or point=(x, y)")
        require_field(samples, "keypoints_field", keypoints_field, "keypoints")
        kps = ref[keypoints_field]
        if kps is None or not kps.keypoints:
            raise ParameterError(f"parameter 'keypoints_field': the reference has no keypoints in {keypoints_field!r}")
        index = keypoint
        if isinstance(keypoint, str):
            sk = keypoint_skeleton(root, keypoints_field, kps.keypoints[0].label)
            labels = list(getattr(sk, "labels", None) or [])
            if keypoint not in labels:
                raise ParameterError(f"parameter 'keypoint': {keypoint!r} is not a skeleton label ({labels})")
            index = labels.index(keypoint)
        linked = dict((o.id, k) for k, o in link_to_objects(kps.keypoints, [unit])) if unit.is_object else {}
        if unit.is_object and unit.id not in linked:
            raise ParameterError(f"parameter 'keypoints_field': no keypoint instance of the reference lies in "
                                 f"object {unit.id}")
        pts = kps.keypoints[linked.get(unit.id, 0)].points
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(pts):
            raise ParameterError(f"parameter 'keypoint': index {index!r} outside 0..{len(pts) - 1}")
        point = pts[index]
    try:
        x, y = point
    except (TypeError, ValueError):
        raise ParameterError(f"parameter 'point' must be (x, y), got {point!r}") from None
    return (check_float("point x", x, lo=0.0, hi=1.0), check_float("point y", y, lo=0.0, hi=1.0))


def _views_dir(cfg: ViewConfig, stored_path: str) -> Path:
    """``output_dir``, or ``<store namespace>/_views/<output_field>`` beside the store in
    use; checked (a folder that exists or can be made, writable): part of the checks."""
    base = Path(os.path.expanduser(cfg.output_dir)) if cfg.output_dir else \
        beside_store([stored_path], stored_path) / VIEWS_DIR / cfg.output_field
    return check_output_folder("output_dir", base)


def _output_dir(base: Path, summary) -> Path:
    """Makes the checked folder of the pictures (after the checks)."""
    base.mkdir(parents=True, exist_ok=True)
    summary["output_dir"] = str(base)
    return base


def _save_png(out_dir: Path, sid: str, array: np.ndarray) -> str:
    """Writes the picture whole (a temporary file, then renamed): a failed write raises."""
    path = out_dir / f"{sid}.png"
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array).round().astype(np.uint8)).save(buf, format="PNG")
    write_atomic(path, buf.getvalue(), fsync=False)
    return str(path)


__all__ = ["write_feature_pca", "write_similarity_heatmaps", "write_dense_views", "DenseViewConfig", "VIEWS_DIR",
           "FEATURE_VIEW_MODES", "DENSE_MODES", "DENSE_FIELD"]
