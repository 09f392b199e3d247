"""fiftyone-sdcorr: zero-shot semantic correspondence for FiftyOne datasets.

Fused Stable Diffusion + DINOv2 features (Zhang et al., "A Tale of Two Features",
NeurIPS 2023). This file is both the Python package and the FiftyOne plugin's
``py_entry`` (``fiftyone.yml``): FiftyOne calls :func:`register`.

Layers (data flows one way): models -> extractor/features -> correspondence ->
dataset functions (FiftyOne) -> plugin (operators, panels). The tensor layers import
no FiftyOne; the dataset-level functions below are imported lazily.
"""

from fiftyone_sdcorr.core.features.extractor import PRESETS, FeatureExtractor, Recipe
from fiftyone_sdcorr.core.features.fusion import (
    FixedProjection,
    FusedFeatures,
    RawFeatures,
    co_pca,
    fuse,
    fuse_pair,
    fuse_raw,
    sd_descriptor,
)
from fiftyone_sdcorr.core.common.geometry import Letterbox
from fiftyone_sdcorr.core.common.images import ImageLoadError, load_image
from fiftyone_sdcorr.core.features.models import DEFAULT_DINO_MODEL, DEFAULT_SD_MODEL, ModelLoadError

__version__ = "0.1.0"

# dataset-level API (speaks FiftyOne): name -> module
_LAZY = {
    "compute_fused_features": "fiftyone_sdcorr.dataset.compute_features",
    "propagate_keypoints": "fiftyone_sdcorr.dataset.propagate",
    "evaluate_keypoints": "fiftyone_sdcorr.dataset.evaluate",
    "flag_keypoint_annotations": "fiftyone_sdcorr.dataset.review",
    "write_feature_pca": "fiftyone_sdcorr.dataset.feature_views",
    "write_similarity_heatmaps": "fiftyone_sdcorr.dataset.feature_views",
    "write_dense_views": "fiftyone_sdcorr.dataset.feature_views",
    "propagate_masks": "fiftyone_sdcorr.dataset.propagate_masks",
    "evaluate_masks": "fiftyone_sdcorr.dataset.evaluate_masks",
    "swap_instances": "fiftyone_sdcorr.dataset.swap",
    "import_benchmark": "fiftyone_sdcorr.dataset.benchmarks",
    "benchmark_pairs": "fiftyone_sdcorr.dataset.benchmarks",
    "keypoint_skeleton": "fiftyone_sdcorr.dataset.skeletons",
    "write_skeletons": "fiftyone_sdcorr.dataset.skeletons",
    "evaluate_pairs": "fiftyone_sdcorr.pair_eval",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fiftyone_sdcorr' has no attribute {name!r}")


def register(p):
    """FiftyOne plugin entry point: registers every operator and panel."""
    from fiftyone_sdcorr.plugin import register as _register

    _register(p)


__all__ = [
    "FeatureExtractor",
    "Recipe",
    "PRESETS",
    "FixedProjection",
    "FusedFeatures",
    "RawFeatures",
    "Letterbox",
    "co_pca",
    "fuse",
    "fuse_pair",
    "fuse_raw",
    "sd_descriptor",
    "load_image",
    "ImageLoadError",
    "ModelLoadError",
    "DEFAULT_SD_MODEL",
    "DEFAULT_DINO_MODEL",
    *_LAZY,
]
