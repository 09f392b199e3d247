"""Feature views as FiftyOne labels the App can overlay on the samples.

- :func:`write_feature_pca`: the first three principal components of each sample's stored
  fused features as an RGB colour mask (``fo.Segmentation`` with an RGB PNG on disk). The
  PCA is fitted once on the tokens of (a subset of) the collection, so the same part has
  the same colour on every sample (the paper's PCA figures, dataset-wide).
- :func:`write_similarity_heatmaps`: the cosine similarity of one point of a reference
  sample to every location of each sample, as an ``fo.Heatmap`` (8-bit PNG on disk,
  ``range=[0, 255]`` for cosine ``0..1``): where does "this part" appear in every image.

Both read the dense features stored by ``compute_fused_features`` (a path in
``features_field``); samples without features are skipped and reported. Masks are written
at the downsampled size the panel uses (long side at most ``max_side``); FiftyOne stretches
them over the image, and the resampling goes through the letterbox, so they line up.
Speaks FiftyOne (layer 4); the pictures come from :mod:`fiftyone_sdcorr.visualize`.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Union

import numpy as np
from PIL import Image

import fiftyone as fo

from fiftyone_sdcorr import visualize as vis
from fiftyone_sdcorr.progress import Progress, ProgressArg
from fiftyone_sdcorr.store import FeatureStore, default_store_root



def default_views_dir(samples, output_field: str) -> str:
    """``<feature store root>/<dataset id>_views/<output_field>``."""
    root = samples._root_dataset
    return os.path.join(default_store_root(), f"{root._doc.id}_views", output_field)


def _check_output(samples, output_field, ftype, overwrite, protected=()):
    root = samples._root_dataset
    if output_field in protected:
        raise ValueError(f"output_field {output_field!r} would overwrite an input field")
    if root.has_sample_field(output_field):
        field = root.get_field(output_field)
        doc_type = getattr(field, "document_type", None)
        if doc_type is not ftype:
            raise ValueError(f"field {output_field!r} exists and does not hold {ftype.__name__} labels")
        if not overwrite:
            raise ValueError(f"field {output_field!r} exists; pass overwrite=True to replace it")


def _features_of(samples, features_field: str):
    """``[(id, filepath, path or None)]`` of the image samples."""
    if not samples._root_dataset.has_sample_field(features_field):
        raise ValueError(
            f"no field {features_field!r}: run compute_fused_features first"
        )
    ids, paths, feats = samples.values(["id", "filepath", features_field])
    return list(zip(ids, paths, feats))


def write_feature_pca(
    samples,
    output_field: str = "sdcorr_pca",
    *,
    features_field: str = "sdcorr_features",
    output_dir: Optional[str] = None,
    fit_samples: int = 32,
    max_side: int = 512,
    overwrite: bool = False,
    progress: ProgressArg = True,
) -> Dict:
    """Writes the PCA colours of each sample's fused features as an RGB ``fo.Segmentation``.

    Args:
        samples: a dataset or view.
        output_field: the ``fo.Segmentation`` field to write (``mask_path`` to an RGB PNG).
        features_field: the field holding each sample's stored dense features.
        output_dir: where the PNGs go (default :func:`default_views_dir`).
        fit_samples: the PCA is fitted on at most this many samples (evenly spaced).
        max_side: long side of the written masks.
        overwrite: replace an existing ``output_field``.
        progress: True/False (progress bar) or ``callable(fraction, label)``.

    Returns:
        ``{"written": n, "skipped": {sample_id: reason}, "output_field", "output_dir"}``.
    """
    _check_output(samples, output_field, fo.Segmentation, overwrite, protected=(features_field,))
    items = _features_of(samples, features_field)
    store = FeatureStore()
    out_dir = output_dir or default_views_dir(samples, output_field)
    os.makedirs(out_dir, exist_ok=True)
    skipped = {sid: "no stored features" for sid, _, p in items if not p}
    have = [(sid, fp, p) for sid, fp, p in items if p]
    if not have:
        return {"written": 0, "skipped": skipped, "output_field": output_field, "output_dir": out_dir}
    step = max(1, len(have) // max(1, int(fit_samples)))
    fit_items = have[::step][: max(1, int(fit_samples))]
    fitted = []
    for sid, _, p in fit_items:
        try:
            fitted.append(store.load(p))
        except Exception as e:  # noqa: BLE001 (recorded per sample)
            skipped[sid] = f"cannot read features: {e}"
    if not fitted:
        return {"written": 0, "skipped": skipped, "output_field": output_field, "output_dir": out_dir}
    pca = vis.fit_pca_colors(fitted)

    labels, written = {}, 0
    bar = Progress(progress, len(have), "PCA")
    try:
        for sid, filepath, p in have:
            try:
                fused = store.load(p)
                w, h = vis.display_size(fused.letterbox.width, fused.letterbox.height, max_side)
                rgb = vis.token_map_to_image(pca.apply(fused).astype(np.float32), fused, w, h)
                path = os.path.join(out_dir, f"{sid}.png")
                Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8)).save(path)
                labels[sid] = fo.Segmentation(mask_path=path)
                written += 1
            except Exception as e:  # noqa: BLE001
                skipped[sid] = str(e)
            bar.update()
    finally:
        bar.close()
    if labels:
        _set_values(samples, output_field, labels)
    return {"written": written, "skipped": skipped, "output_field": output_field, "output_dir": out_dir}


def _set_values(samples, field: str, by_id: Dict[str, object]) -> None:
    root = samples._root_dataset
    view = root.select(list(by_id))
    view.set_values(field, by_id, key_field="id")


def write_similarity_heatmaps(
    samples,
    reference_id: str,
    point: Optional[Sequence[float]] = None,
    *,
    keypoints_field: Optional[str] = None,
    keypoint: Union[int, str, None] = None,
    output_field: str = "sdcorr_heatmap",
    features_field: str = "sdcorr_features",
    output_dir: Optional[str] = None,
    max_side: int = 512,
    overwrite: bool = False,
    progress: ProgressArg = True,
) -> Dict:
    """Writes, for each sample, the similarity of one reference point to every location.

    The point is ``point`` (normalised ``(x, y)`` in the reference image) or keypoint
    ``keypoint`` (an index, or a label of the dataset's skeleton for ``keypoints_field``) of
    the first ``fo.Keypoint`` in the reference's ``keypoints_field``. Each sample gets an
    ``fo.Heatmap`` (8-bit PNG, ``range=[0, 255]``: cosine similarity ``0..1``; negative
    values are 0).

    Returns:
        ``{"written", "skipped", "point", "output_field", "output_dir"}``.
    """
    _check_output(samples, output_field, fo.Heatmap, overwrite, protected=(features_field,))
    root = samples._root_dataset
    ref = root[reference_id]
    if point is None:
        if not keypoints_field or keypoint is None:
            raise ValueError("give point=(x, y) or keypoints_field and keypoint")
        kps = ref[keypoints_field] if ref.has_field(keypoints_field) else None
        if kps is None or not kps.keypoints:
            raise ValueError(f"reference {reference_id} has no keypoints in {keypoints_field!r}")
        index = keypoint
        if isinstance(keypoint, str):
            sk = (root.skeletons or {}).get(keypoints_field) or root.default_skeleton
            labels = list(getattr(sk, "labels", None) or [])
            if keypoint not in labels:
                raise ValueError(f"keypoint {keypoint!r} is not a skeleton label ({labels})")
            index = labels.index(keypoint)
        pts = kps.keypoints[0].points
        if not 0 <= int(index) < len(pts):
            raise ValueError(f"keypoint index {index} outside 0..{len(pts) - 1}")
        point = pts[int(index)]
    x, y = float(point[0]), float(point[1])
    if not (np.isfinite(x) and np.isfinite(y) and 0 <= x <= 1 and 0 <= y <= 1):
        raise ValueError(f"point {(x, y)} is not a visible point in [0, 1]")
    ref_path = ref[features_field] if ref.has_field(features_field) else None
    if not ref_path:
        raise ValueError(f"reference {reference_id} has no stored features in {features_field!r}")
    store = FeatureStore()
    src = store.load(ref_path)
    items = _features_of(samples, features_field)
    out_dir = output_dir or default_views_dir(samples, output_field)
    os.makedirs(out_dir, exist_ok=True)
    skipped, labels = {}, {}
    bar = Progress(progress, len(items), "Heat maps")
    try:
        for sid, filepath, p in items:
            if not p:
                skipped[sid] = "no stored features"
                bar.update()
                continue
            try:
                tgt = store.load(p)
                heat = vis.similarity_map(src, tgt, (x, y))
                w, h = vis.display_size(tgt.letterbox.width, tgt.letterbox.height, max_side)
                up = vis.token_map_to_image(np.nan_to_num(heat, nan=0.0), tgt, w, h)
                img = (np.clip(up, 0.0, 1.0) * 255).round().astype(np.uint8)
                path = os.path.join(out_dir, f"{sid}.png")
                Image.fromarray(img).save(path)
                labels[sid] = fo.Heatmap(map_path=path, range=[0, 255])
            except Exception as e:  # noqa: BLE001
                skipped[sid] = str(e)
            bar.update()
    finally:
        bar.close()
    if labels:
        _set_values(samples, output_field, labels)
    return {"written": len(labels), "skipped": skipped, "point": [x, y],
            "output_field": output_field, "output_dir": out_dir}


__all__ = ["write_feature_pca", "write_similarity_heatmaps", "default_views_dir"]
