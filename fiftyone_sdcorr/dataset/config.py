"""Config objects: one frozen dataclass per concern, built once at a public function's
edge from its flat keywords, checked there (before any model loads or anything is
written), and passed down whole. Every default is written here once; the operators'
forms and the documents in docs/ read them from here.

- :class:`FeatureConfig`: models, device, dtype, the :class:`~fiftyone_sdcorr.Recipe`
  (``pca_dim`` is the one name of the channels kept per SD tap, by co-PCA or by the
  fixed projection), the feature store, and the fields features are written to;
  :meth:`FeatureConfig.fingerprint` names what produced stored features.
- :class:`MatchConfig`: how references are matched to a target (shared by propagation
  and review).
- :class:`PropagationConfig`, :class:`EvaluationConfig`, :class:`ReviewConfig`,
  :class:`ViewConfig`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional, Tuple

import torch

from fiftyone_sdcorr.core.correspondence import DEFAULT_SOFT_WINDOW, DEFAULT_TEMPERATURE
from fiftyone_sdcorr.core.extractor import PRESETS, Recipe
from fiftyone_sdcorr.core.models import DEFAULT_DINO_MODEL, DEFAULT_SD_MODEL
from fiftyone_sdcorr.core.params import (
    ParameterError,
    check_bool,
    check_choice,
    check_float,
    check_floats,
    check_int,
    check_str,
)
from fiftyone_sdcorr.core.store import STORE_DTYPES as STORE_DTYPE_MAP
from fiftyone_sdcorr.core.store import default_store_root
from fiftyone_sdcorr.dataset.engine import check_field_name

STORE_DTYPES = tuple(STORE_DTYPE_MAP)  # float16, bfloat16, float32, int8 (a scale per channel)
DTYPES = ("float32", "float16", "bfloat16")
COMBINE_RULES = ("best", "per_point")
THRESHOLDS = ("bbox", "image")
N_PARTS = 6  # part clusters of the feature views (pictures, the panel)
N_PARTS_RANGE = (2, 64)
#: default field names, written once: the stored features and their global vectors
#: (``compute_fused_features`` writes them, the other functions read them), and the
#: first names offered for new output fields (forms offer the next free one:
#: ``<name>_2``, ``<name>_3``, ...)
FEATURES_FIELD = "sdcorr_features"
EMBEDDING_FIELD = "sdcorr_embedding"
KEYPOINTS_FIELD = "sdcorr_keypoints"
PCA_FIELD = "sdcorr_pca"
HEATMAP_FIELD = "sdcorr_heatmap"
#: keys of an extractor's ``config()`` that do not change which features it computes
#: beyond numerical precision (a GPU run in bf16 and a CPU run in fp32 share a store)
_PRECISION_KEYS = ("dtype", "device", "batch_size")


def _defaults(cls) -> dict:
    return {f.name: f.default for f in fields(cls)}


def _build(cls, given: dict):
    """``cls`` from keywords where ``None`` means "the default"."""
    return cls(**{k: v for k, v in given.items() if v is not None})


def _field_or_none(param: str, name: Any) -> Optional[str]:
    return None if name is None else check_field_name(param, name)


def _model_name(param: str, value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    check_str(param, value)
    return os.path.abspath(os.path.expanduser(value)) if os.path.isdir(os.path.expanduser(value)) else value


def _folder(param: str, value: Any) -> Optional[str]:
    """A folder path (absolute); an existing file is refused."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ParameterError(f"parameter {param!r} must be a folder path, got {value!r}")
    path = os.path.abspath(os.path.expanduser(os.fspath(value)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ParameterError(f"parameter {param!r}: {path} exists and is not a folder")
    return path


def _device(value: Any) -> Optional[str]:
    if value is None or value == "auto":
        return None
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ParameterError(f"parameter 'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"parameter 'device' is {value!r} but no CUDA device is available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ParameterError(f"parameter 'device' is {value!r} but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ParameterError(f"parameter 'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
    return str(dev)


# --------------------------------------------------------------------------- features
@dataclass(frozen=True)
class FeatureConfig:
    """What ``compute_fused_features`` computes, with which models, and where it goes."""

    sd_model: str = DEFAULT_SD_MODEL
    dino_model: str = DEFAULT_DINO_MODEL
    preset: str = "paper"
    recipe: Recipe = PRESETS["paper"]
    device: Optional[str] = None  # None: CUDA when available
    dtype: Optional[str] = None  # None: bf16 on CUDA, fp32 on CPU
    batch_size: Optional[int] = None  # None: the extractor's choice
    store_dir: Optional[str] = None  # None: default_store_root()/<dataset id>
    store_dtype: str = "float16"
    projection_samples: int = 16
    embedding_field: str = EMBEDDING_FIELD
    features_field: str = FEATURES_FIELD
    prompt_field: Optional[str] = None
    #: features of objects (``patches_field``): the recipe's context margin decides them too
    objects: bool = False
    extractor: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "sd_model", _model_name("sd_model", self.sd_model))
        object.__setattr__(self, "dino_model", _model_name("dino_model", self.dino_model))
        check_choice("preset", self.preset, tuple(PRESETS))
        if not isinstance(self.recipe, Recipe):
            raise ParameterError(f"parameter 'recipe' must be a Recipe, got {type(self.recipe).__name__}")
        object.__setattr__(self, "device", _device(self.device))
        if self.dtype is not None:
            object.__setattr__(self, "dtype", check_choice("dtype", str(self.dtype).replace("torch.", ""),
                                                           DTYPES + ("auto",)))
            if self.dtype == "auto":
                object.__setattr__(self, "dtype", None)
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, lo=1, hi=4096)
        object.__setattr__(self, "store_dir", _folder("store_dir", self.store_dir))
        check_choice("store_dtype", self.store_dtype, STORE_DTYPES)
        check_int("projection_samples", self.projection_samples, lo=1, hi=100_000)
        check_field_name("embedding_field", self.embedding_field)
        check_field_name("features_field", self.features_field)
        _field_or_none("prompt_field", self.prompt_field)
        check_bool("objects", self.objects)
        if self.prompt_field is not None and "{label}" not in self.recipe.prompt:
            raise ParameterError(
                f"parameter 'prompt_field' ({self.prompt_field!r}) needs a prompt template with '{{label}}', "
                "e.g. recipe={'prompt': 'a photo of a {label}'}"
            )
        ext = self.extractor
        if ext is not None and not (callable(getattr(ext, "describe", None)) and callable(getattr(ext, "config", None))):
            raise ParameterError("parameter 'extractor' must have describe(images) and config() "
                                 f"(a FeatureExtractor or a Describer), got {type(ext).__name__}")

    @classmethod
    def build(cls, *, preset=None, recipe=None, pca_dim=None, **kw) -> "FeatureConfig":
        """From flat keywords (``None`` = default). ``recipe``: a dict of recipe fields or a
        :class:`Recipe`; ``pca_dim`` overrides the recipe's."""
        preset = "paper" if preset is None else preset
        check_choice("preset", preset, tuple(PRESETS))
        if isinstance(recipe, Recipe):
            rec = recipe
        elif recipe is None or isinstance(recipe, dict):
            rec = Recipe.build(preset, **(recipe or {}))
        else:
            raise ParameterError(f"parameter 'recipe' must be a dict of recipe fields, got {recipe!r}")
        if pca_dim is not None:
            rec = replace(rec, pca_dim=check_int("pca_dim", pca_dim, lo=1, hi=4096))
        return _build(cls, dict(preset=preset, recipe=rec, **kw))

    # ---- identity
    def settings(self) -> dict:
        """What decides the stored numbers: models and recipe (or the given extractor's
        config), not the precision or the device."""
        if self.extractor is not None:
            cfg = dict(self.extractor.config())
        else:
            cfg = {"extractor": "sd+dinov2", "sd_model": self.sd_model, "dino_model": self.dino_model,
                   **self.recipe.to_dict()}
        if self.objects:
            cfg.update(unit="object", context_margin=self.recipe.context_margin)
        return {k: v for k, v in cfg.items() if k not in _PRECISION_KEYS}

    def fingerprint(self) -> str:
        blob = json.dumps(self.settings(), sort_keys=True, default=str).encode()
        return hashlib.sha1(blob).hexdigest()[:16]

    def store_root(self, samples) -> str:
        """The configured store folder (``store_dir``) or the dataset's default one."""
        if self.store_dir is not None:
            return self.store_dir
        return os.path.join(default_store_root(), str(samples._root_dataset._doc.id))

    @property
    def error_field(self) -> str:
        return f"{self.features_field}_error"

    def make_extractor(self):
        """The given extractor, or a :class:`FeatureExtractor` (models load here)."""
        if self.extractor is not None:
            return self.extractor
        from fiftyone_sdcorr.core.extractor import FeatureExtractor

        rec = {f.name: getattr(self.recipe, f.name) for f in fields(Recipe)}
        return FeatureExtractor(self.sd_model, self.dino_model, device=self.device, dtype=self.dtype,
                                batch_size=self.batch_size, **rec)

    @classmethod
    def from_settings(cls, settings: dict, **kw) -> "FeatureConfig":
        """The config that produced ``settings`` (a record's), for computing more of the same."""
        rec = {k: v for k, v in settings.items() if k in Recipe.__dataclass_fields__}
        return cls.build(sd_model=settings.get("sd_model"), dino_model=settings.get("dino_model"),
                         recipe=rec, objects=settings.get("unit") == "object", **kw)


# --------------------------------------------------------------------------- matching
@dataclass(frozen=True)
class MatchConfig:
    """How references are matched to a target (propagation and review)."""

    combine: str = "best"
    top_k: int = 3
    soft_argmax: bool = True
    soft_window: int = DEFAULT_SOFT_WINDOW
    temperature: float = DEFAULT_TEMPERATURE
    flip: bool = False
    flip_pairs: Optional[Tuple[Tuple[Any, Any], ...]] = None
    #: objects: a target object is matched only to reference objects of its label
    same_label: bool = True

    def __post_init__(self):
        check_choice("combine", self.combine, COMBINE_RULES)
        check_int("top_k", self.top_k, lo=1, hi=1000)
        check_bool("soft_argmax", self.soft_argmax)
        check_int("soft_window", self.soft_window, lo=1, hi=99)
        if self.soft_window % 2 == 0:
            raise ParameterError(f"parameter 'soft_window' must be odd, got {self.soft_window}")
        check_float("temperature", self.temperature, lo=0.0, hi=100.0, lo_open=True)
        check_bool("flip", self.flip)
        check_bool("same_label", self.same_label)
        if self.flip_pairs is not None:
            try:
                pairs = tuple((a, b) for a, b in self.flip_pairs)
            except (TypeError, ValueError):
                raise ParameterError(f"parameter 'flip_pairs' must be a list of (a, b) pairs, got {self.flip_pairs!r}")
            for a, b in pairs:
                for v in (a, b):
                    if not isinstance(v, str) and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                        raise ParameterError("parameter 'flip_pairs' must pair point indices (>= 0) or "
                                             f"skeleton labels, got {self.flip_pairs!r}")
            object.__setattr__(self, "flip_pairs", pairs)


def _check_matching_run(cfg) -> None:
    """What propagation and review share: stored features, batch, overwrite, objects."""
    _field_or_none("patches_field", cfg.patches_field)
    _field_or_none("features_field", cfg.features_field)
    _field_or_none("embedding_field", cfg.embedding_field)
    check_int("batch_size", cfg.batch_size, lo=1, hi=4096)
    check_bool("overwrite", cfg.overwrite)


@dataclass(frozen=True)
class PropagationConfig:
    """``propagate_keypoints``: where from, where to, and the output rule."""

    source_field: str
    output_field: str
    features_field: Optional[str] = FEATURES_FIELD
    embedding_field: Optional[str] = EMBEDDING_FIELD
    visibility_threshold: float = 0.2
    batch_size: int = 8
    overwrite: bool = False
    match: MatchConfig = MatchConfig()
    #: a fo.Detections field: per object (None: per image)
    patches_field: Optional[str] = None
    #: objects: add a new fo.Instance to target detections that have none
    link_instances: bool = False

    def __post_init__(self):
        check_field_name("source_field", self.source_field)
        check_field_name("output_field", self.output_field)
        check_float("visibility_threshold", self.visibility_threshold, lo=0.0, hi=1.0)
        check_bool("link_instances", self.link_instances)
        _check_matching_run(self)

    @property
    def error_field(self) -> str:
        return f"{self.output_field}_error"


# --------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class EvaluationConfig:
    """``evaluate_keypoints``: PCK of a predicted field against ground truth."""

    pred_field: str
    gt_field: str
    eval_key: Optional[str] = "sdcorr_pck"
    alphas: Tuple[float, ...] = (0.10, 0.05, 0.01)
    bbox_field: Optional[str] = None
    threshold: str = "bbox"
    overwrite: bool = True

    def __post_init__(self):
        check_field_name("pred_field", self.pred_field)
        check_field_name("gt_field", self.gt_field)
        if self.pred_field == self.gt_field:
            raise ParameterError(f"parameters 'pred_field' and 'gt_field' must differ, both are {self.pred_field!r}")
        _field_or_none("eval_key", self.eval_key)
        object.__setattr__(self, "alphas", check_floats("alphas", self.alphas, lo=0.0, hi=1.0))
        _field_or_none("bbox_field", self.bbox_field)
        check_choice("threshold", self.threshold, THRESHOLDS)
        check_bool("overwrite", self.overwrite)


# --------------------------------------------------------------------------- review
@dataclass(frozen=True)
class ReviewConfig:
    """``flag_keypoint_annotations``: the flagging rule and where the review goes."""

    gt_field: str
    review_field: str = "sdcorr_review"
    tag: Optional[str] = "sdcorr:suspicious"
    alpha: float = 0.1
    min_confidence: float = 0.5
    bbox_field: Optional[str] = None
    threshold: str = "bbox"
    features_field: Optional[str] = FEATURES_FIELD
    embedding_field: Optional[str] = EMBEDDING_FIELD
    batch_size: int = 8
    overwrite: bool = False
    match: MatchConfig = MatchConfig(combine="per_point")
    patches_field: Optional[str] = None

    def __post_init__(self):
        check_field_name("gt_field", self.gt_field)
        check_field_name("review_field", self.review_field)
        if self.tag is not None:
            check_str("tag", self.tag)
        check_float("alpha", self.alpha, lo=0.0, hi=1.0, lo_open=True)
        check_float("min_confidence", self.min_confidence, lo=0.0, hi=1.0)
        _field_or_none("bbox_field", self.bbox_field)
        check_choice("threshold", self.threshold, THRESHOLDS)
        _check_matching_run(self)

    @property
    def error_field(self) -> str:
        return f"{self.review_field}_error"


# --------------------------------------------------------------------------- feature views
@dataclass(frozen=True)
class ViewConfig:
    """``write_feature_pca`` / ``write_similarity_heatmaps``: output field and images."""

    output_field: str
    features_field: str = FEATURES_FIELD
    output_dir: Optional[str] = None  # None: beside the feature store in use
    fit_samples: int = 32
    max_side: int = 512
    overwrite: bool = False

    def __post_init__(self):
        check_field_name("output_field", self.output_field)
        check_field_name("features_field", self.features_field)
        object.__setattr__(self, "output_dir", _folder("output_dir", self.output_dir))
        check_int("fit_samples", self.fit_samples, lo=1, hi=100_000)
        check_int("max_side", self.max_side, lo=16, hi=8192)
        check_bool("overwrite", self.overwrite)


def defaults(cls) -> dict:
    """The defaults of a config class (for forms and docs)."""
    return _defaults(cls)


__all__ = [
    "FeatureConfig", "MatchConfig", "PropagationConfig", "EvaluationConfig", "ReviewConfig", "ViewConfig",
    "defaults", "STORE_DTYPES", "DTYPES", "COMBINE_RULES", "THRESHOLDS",
]
