"""Config objects: one frozen dataclass per concern, built once at a public function's
edge from its flat keywords by ``XConfig.build(**keywords)`` (``None`` = the default
written here; see :class:`Buildable`), checked there (before any model loads or anything
is written), and passed down whole. Every default is written here once, every allowed
range once in :data:`RANGES`; the functions, the operators' forms, the panel and the
documents in docs/ read them from here. ``features=`` of the functions that may compute
features: :func:`merge_features`.

- :class:`FeatureConfig`: models, device, dtype, the :class:`~fiftyone_sdcorr.Recipe`
  (``pca_dim`` is the one name of the channels kept per SD tap, by co-PCA or by the
  fixed projection), the feature store, and the fields features are written to;
  :meth:`FeatureConfig.fingerprint` names what produced stored features.
- :class:`MatchConfig`: how references are matched to a target (shared by propagation
  and review).
- :class:`PropagationConfig`, :class:`EvaluationConfig`, :class:`ReviewConfig`,
  :class:`ViewConfig` (:class:`FeaturePCAConfig`, :class:`HeatmapConfig`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Dict, Optional, Tuple

import torch

from fiftyone_sdcorr.core.matching.correspondence import DEFAULT_TEMPERATURE
from fiftyone_sdcorr.core.matching.dense import DEFAULT_RESOLUTION
from fiftyone_sdcorr.core.features.extractor import PRESETS, Recipe
from fiftyone_sdcorr.core.features.methods import DEFAULT_METHOD, PRECISION_KEYS, fingerprint, get_method, method_of, \
    method_settings
from fiftyone_sdcorr.core.features.models import DEFAULT_DINO_MODEL, DEFAULT_SD_MODEL
from fiftyone_sdcorr.core.common.params import (
    ParameterError,
    check_bool,
    check_choice,
    check_float,
    check_floats,
    check_int,
    check_str,
)
from fiftyone_sdcorr.core.features.store import STORE_DTYPES as STORE_DTYPE_MAP
from fiftyone_sdcorr.core.features.store import default_store_root
from fiftyone_sdcorr.dataset.engine import check_field_name

STORE_DTYPES = tuple(STORE_DTYPE_MAP)  # float16, bfloat16, float32, int8 (a scale per channel)
DTYPES = ("float32", "float16", "bfloat16")
COMBINE_RULES = ("best", "per_point")
THRESHOLDS = ("bbox", "image")
VIEW_MODES = ("pca", "parts")  # write_feature_pca: PCA colours or part clusters
N_PARTS = 6  # part clusters of the feature views (pictures, the panel)
N_PARTS_RANGE = (2, 64)
#: the allowed range of every numeric setting, written once: the configs check with it,
#: the forms read their min / max from it (``RANGES[name]``)
RANGES: Dict[str, tuple] = {
    "batch_size": (1, 4096), "projection_samples": (1, 100_000), "pca_dim": (1, 4096),
    "top_k": (1, 1000), "soft_window": (1, 99), "temperature": (0.0, 100.0),
    "visibility_threshold": (0.0, 1.0), "alpha": (0.0, 1.0), "min_confidence": (0.0, 1.0),
    "alphas": (0.0, 1.0), "fit_samples": (1, 100_000), "max_side": (16, 8192), "n_parts": N_PARTS_RANGE,
    "mask_resolution": (8, 512),  # propagate_masks: cells per side of the dense grid
}
#: default field names, written once: the stored features and their global vectors
#: (``compute_fused_features`` writes them, the other functions read them), and the
#: first names offered for new output fields (forms offer the next free one:
#: ``<name>_2``, ``<name>_3``, ...)
FEATURES_FIELD = "sdcorr_features"
EMBEDDING_FIELD = "sdcorr_embedding"
KEYPOINTS_FIELD = "sdcorr_keypoints"
PCA_FIELD = "sdcorr_pca"
HEATMAP_FIELD = "sdcorr_heatmap"


def _in_range(name: str, value: Any, **kw):
    """``value`` checked against ``RANGES[name]`` (an int range for int bounds)."""
    lo, hi = RANGES[name]
    check = check_int if isinstance(lo, int) else check_float
    return check(name, value, lo=lo, hi=hi, **kw)


def _build(cls, given: Dict[str, Any]):
    """``cls`` from flat keywords: ``None`` means "the default" (except the fields of
    ``cls.NONE_IS_A_VALUE``), a nested config (``cls.NESTED``: ``match``) is built from the
    same flat keywords (or given whole), and an unknown keyword is a ParameterError."""
    own = {f.name for f in fields(cls) if f.init}
    kw, rest = {}, dict(given)
    for name, sub in cls.NESTED.items():
        whole = rest.pop(name, None)
        if isinstance(whole, dict):  # ``match={"flip": True}``: its settings, as if given flat
            rest.update(_known(name, whole, [f.name for f in fields(sub)]))
            whole = None
        flat = {k: rest.pop(k) for k in [f.name for f in fields(sub)] if k in rest}
        if whole is not None and not isinstance(whole, sub):
            raise ParameterError(f"parameter {name!r} must be a {sub.__name__}, got {type(whole).__name__}")
        base = whole if whole is not None else getattr(cls, name)
        kw[name] = replace(base, **{k: v for k, v in flat.items() if v is not None or k in sub.NONE_IS_A_VALUE})
    unknown = sorted(set(rest) - own)
    if unknown:
        raise ParameterError(f"unknown parameter(s) {unknown} for {cls.__name__}")
    kw.update({k: v for k, v in rest.items() if v is not None or k in cls.NONE_IS_A_VALUE})
    return cls(**kw)


def _known(param: str, settings: Dict[str, Any], allowed) -> Dict[str, Any]:
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ParameterError(f"parameter {param!r}: unknown setting(s) {unknown}; allowed: {list(allowed)}")
    return dict(settings)


class Buildable:
    """One way to make a config: :meth:`build` from flat keywords at a public function's
    edge (``None`` = the default written in the class)."""

    #: fields where ``None`` is a value of its own, not "the default" (review's ``tag=None``:
    #: no tag; evaluation's ``eval_key=None``: compute only, as FiftyOne's evaluate_* functions)
    NONE_IS_A_VALUE: ClassVar[Tuple[str, ...]] = ()
    #: nested configs built from the same flat keywords: field name -> config class
    NESTED: ClassVar[Dict[str, type]] = {}

    @classmethod
    def build(cls, **kwargs):
        """The config from flat keywords; ``None`` = the class default; checked."""
        return _build(cls, kwargs)


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


def _adapter_file(method: str, value: Any) -> Optional[str]:
    """``adapter``: an existing safetensors file, for a method with an adapter only."""
    if value is None:
        return None
    if get_method(method).uses_sd:
        raise ParameterError(f"parameter 'adapter' is for method 'dino-diy', not {method!r}")
    if not isinstance(value, (str, os.PathLike)) or not os.path.isfile(os.path.expanduser(os.fspath(value))):
        raise ParameterError(f"parameter 'adapter' must be a DIY-SC adapter file (.safetensors), got {value!r}")
    path = os.path.abspath(os.path.expanduser(os.fspath(value)))
    if not path.endswith(".safetensors"):
        raise ParameterError(f"parameter 'adapter': {path} is not a .safetensors file; convert a .pth with "
                             "`python -m fiftyone_sdcorr convert-adapter IN.pth OUT.safetensors`")
    return path


@functools.lru_cache(maxsize=8)
def _digest_of_file(path: str, mtime: float) -> str:
    from fiftyone_sdcorr.core.features.adapter import adapter_digest

    return adapter_digest(path)


def _adapter_digest(path: Optional[str]) -> str:
    """The adapter's digest (the shipped one's when None), read once per file version."""
    from fiftyone_sdcorr.core.features.adapter import DEFAULT_ADAPTER

    path = str(path or DEFAULT_ADAPTER)
    return _digest_of_file(path, os.path.getmtime(path))


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
class FeatureConfig(Buildable):
    """What ``compute_fused_features`` computes, with which models, and where it goes."""

    #: the feature method (:data:`~fiftyone_sdcorr.core.features.methods.METHODS`):
    #: ``"sd-dino"`` (the paper) or ``"dino-diy"`` (DIY-SC's adapter on DINOv2, no SD)
    method: str = DEFAULT_METHOD
    #: ``"dino-diy"``: a DIY-SC adapter (safetensors); None: the one shipped with the package
    adapter: Optional[str] = None
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
        get_method(self.method)
        object.__setattr__(self, "adapter", _adapter_file(self.method, self.adapter))
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
            _in_range("batch_size", self.batch_size)
        object.__setattr__(self, "store_dir", _folder("store_dir", self.store_dir))
        check_choice("store_dtype", self.store_dtype, STORE_DTYPES)
        _in_range("projection_samples", self.projection_samples)
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
            rec = replace(rec, pca_dim=_in_range("pca_dim", pca_dim))
        return _build(cls, dict(preset=preset, recipe=rec, **kw))

    # ---- identity
    def settings(self) -> dict:
        """What decides the stored numbers: models and recipe (or the given extractor's
        config), not the precision or the device."""
        if self.extractor is not None:
            cfg = dict(self.extractor.config())
        else:
            digest = None if get_method(self.method).uses_sd else _adapter_digest(self.adapter)
            cfg = method_settings(self.method, self.recipe, sd_model=self.sd_model, dino_model=self.dino_model,
                                  adapter_digest=digest)
        if self.objects:
            cfg.update(unit="object", context_margin=self.recipe.context_margin)
        return {k: v for k, v in cfg.items() if k not in PRECISION_KEYS}

    def fingerprint(self) -> str:
        """:func:`~fiftyone_sdcorr.core.features.methods.fingerprint` of :meth:`settings`."""
        return fingerprint(self.settings())

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
        from fiftyone_sdcorr.core.features.extractor import FeatureExtractor

        rec = {f.name: getattr(self.recipe, f.name) for f in fields(Recipe)}
        return FeatureExtractor(self.sd_model, self.dino_model, device=self.device, dtype=self.dtype,
                                batch_size=self.batch_size, method=self.method, adapter=self.adapter, **rec)

    @classmethod
    def from_settings(cls, settings: dict, **kw) -> "FeatureConfig":
        """The config that produced ``settings`` (a record's), for computing more of the same."""
        rec = {k: v for k, v in settings.items() if k in Recipe.__dataclass_fields__}
        return cls.build(method=method_of(settings), sd_model=settings.get("sd_model"),
                         dino_model=settings.get("dino_model"), recipe=rec, objects=settings.get("unit") == "object",
                         **kw)


#: the feature settings of the functions that may compute features (propagation, review:
#: only where stored features are missing); given flat or as one ``features=``
FEATURE_PARAMS = ("method", "adapter", "extractor", "sd_model", "dino_model", "preset", "recipe", "pca_dim",
                  "device", "dtype", "batch_size", "store_dir")


def _same(a, b) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 -- values that do not compare (tensors, ...) differ
        return False


def merge_features(features, flat: Dict[str, Any], allowed: Tuple[str, ...] = FEATURE_PARAMS) -> Dict[str, Any]:
    """The feature settings of a call: ``features=`` (None, a :class:`FeatureConfig` or a
    dict of its build keywords) merged with the flat keywords ``flat`` (``None`` = not
    given). A setting given both ways with different values is a ParameterError naming it."""
    if features is not None and not isinstance(features, (dict, FeatureConfig)):
        raise ParameterError("parameter 'features' must be a FeatureConfig or a dict of its settings, got "
                             f"{type(features).__name__}")
    return _merge_group("features", features, flat, allowed)


#: the fields features are read from (every function that reads stored features takes them in ``features=``)
FEATURE_FIELDS = ("features_field", "embedding_field")
#: what ``compute_fused_features`` takes in ``features=``: the settings above, and where
#: its results go
COMPUTE_FEATURE_PARAMS = FEATURE_PARAMS + FEATURE_FIELDS + ("store_dtype", "projection_samples", "prompt_field")


# --------------------------------------------------------------------------- matching
@dataclass(frozen=True)
class MatchConfig(Buildable):
    """How references are matched to a target (propagation and review)."""

    combine: str = "best"
    top_k: int = 3
    soft_argmax: bool = True
    #: window side in tokens; None: the window the features' method is evaluated with by
    #: its authors (:data:`~fiftyone_sdcorr.core.features.methods.METHODS`: sd-dino 11 as
    #: GeoAware-SC, dino-diy 15 as DIY-SC)
    soft_window: Optional[int] = None
    temperature: float = DEFAULT_TEMPERATURE
    flip: bool = False
    flip_pairs: Optional[Tuple[Tuple[Any, Any], ...]] = None
    #: objects: a target object is matched only to reference objects of its label
    same_label: bool = True

    def __post_init__(self):
        check_choice("combine", self.combine, COMBINE_RULES)
        _in_range("top_k", self.top_k)
        check_bool("soft_argmax", self.soft_argmax)
        if self.soft_window is not None:
            _in_range("soft_window", self.soft_window)
        if self.soft_window is not None and self.soft_window % 2 == 0:
            raise ParameterError(f"parameter 'soft_window' must be odd, got {self.soft_window}")
        _in_range("temperature", self.temperature, lo_open=True)
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
    _in_range("batch_size", cfg.batch_size)
    check_bool("overwrite", cfg.overwrite)


#: the settings ``match=`` holds (each also a keyword of its own, :func:`flat_keywords`)
MATCH_PARAMS = tuple(f.name for f in fields(MatchConfig))
#: ``swap_instances``' ``refine=`` settings as flat keywords -> their names in ``refine=``
REFINE_PARAMS = {"refine_strength": "strength", "refine_steps": "steps", "refine_guidance": "guidance",
                 "refine_prompt": "prompt", "refine_size": "size"}


def flat_keywords(features: Tuple[str, ...] = FEATURE_PARAMS + FEATURE_FIELDS, match: bool = False,
                  refine: bool = False):
    """The one shim for the flat keywords of earlier versions. A dataset function takes
    its settings in groups: ``features=`` (models, recipe, device, store, the features'
    fields), ``match=`` (:class:`MatchConfig`: ``flip``, ``soft_argmax``, ...) and, for
    ``swap_instances``, ``refine=`` (``{"mode", "strength", "steps", "guidance", "prompt",
    "size"}``). Decorated with this, it also takes each setting as its own keyword
    (``propagate_keypoints(..., sd_model=..., flip=True)``, ``refine_steps=50``); they are
    merged into their group before the function runs (a setting given both ways with
    different values is a ParameterError naming it). The function itself, its signature
    and its documentation know only the groups; new code passes those.
    ``fn.flat_keywords``: flat name -> group (the operators' forms route their params with it)."""
    routes = {**{k: "features" for k in features}, **({k: "match" for k in MATCH_PARAMS} if match else {}),
              **({k: "refine" for k in REFINE_PARAMS} if refine else {})}

    def decorate(fn):
        @functools.wraps(fn)
        def with_flat_keywords(*args, **kwargs):
            flat: Dict[str, Dict[str, Any]] = {}
            for k in [k for k in kwargs if k in routes]:
                flat.setdefault(routes[k], {})[k] = kwargs.pop(k)
            if "features" in flat:
                kwargs["features"] = merge_features(kwargs.get("features"), flat["features"], features)
            if "match" in flat:
                kwargs["match"] = _merge_group("match", kwargs.get("match"), flat["match"], MATCH_PARAMS)
            if "refine" in flat:
                given = {REFINE_PARAMS[k]: v for k, v in flat["refine"].items()}
                kwargs["refine"] = _merge_group("refine", refine_settings(kwargs.get("refine")), given, REFINE_KEYS)
            return fn(*args, **kwargs)

        with_flat_keywords.flat_keywords = dict(routes)
        return with_flat_keywords
    return decorate


def _merge_group(param: str, whole, flat: Dict[str, Any], allowed) -> Dict[str, Any]:
    """A group given whole (None, a dict, or a config object) merged with its flat keywords."""
    if whole is None:
        whole = {}
    elif not isinstance(whole, dict):
        whole = {k: getattr(whole, k) for k in allowed if hasattr(whole, k)}
    out = dict(_known(param, whole, allowed))
    for k, v in flat.items():
        if v is None:
            continue
        if out.get(k) is not None and not _same(out[k], v):
            raise ParameterError(f"parameter {k!r} is given twice with different values: {v!r} and {out[k]!r} in "
                                 f"{param!r}; give it once")
        out[k] = v
    return out


#: the settings ``refine=`` holds
REFINE_KEYS = ("mode",) + tuple(REFINE_PARAMS.values())


def refine_settings(refine) -> Dict[str, Any]:
    """``swap_instances``' ``refine=``: ``None``, ``False``, ``True`` / ``"img2img"``,
    ``"inpaint"`` (the mode alone) or a dict of :data:`REFINE_KEYS` -> that dict."""
    if refine is None:
        return {}
    if isinstance(refine, dict):
        return _known("refine", refine, REFINE_KEYS)
    return {"mode": refine}


@dataclass(frozen=True)
class PropagationConfig(Buildable):
    """``propagate_keypoints``: where from, where to, and the output rule."""

    NESTED: ClassVar[Dict[str, type]] = {"match": MatchConfig}

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
    #: also predict onto the references themselves (default: they are skipped and counted)
    include_references: bool = False

    def __post_init__(self):
        check_field_name("source_field", self.source_field)
        check_field_name("output_field", self.output_field)
        _in_range("visibility_threshold", self.visibility_threshold)
        check_bool("link_instances", self.link_instances)
        check_bool("include_references", self.include_references)
        _check_matching_run(self)

    @property
    def error_field(self) -> str:
        return f"{self.output_field}_error"


# --------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class EvaluationConfig(Buildable):
    """``evaluate_keypoints``: PCK of a predicted field against ground truth."""

    NONE_IS_A_VALUE: ClassVar[Tuple[str, ...]] = ("eval_key",)  # None: compute only, write nothing

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
        lo, hi = RANGES["alphas"]
        object.__setattr__(self, "alphas", check_floats("alphas", self.alphas, lo=lo, hi=hi))
        _field_or_none("bbox_field", self.bbox_field)
        check_choice("threshold", self.threshold, THRESHOLDS)
        check_bool("overwrite", self.overwrite)


# --------------------------------------------------------------------------- review
@dataclass(frozen=True)
class ReviewConfig(Buildable):
    """``flag_keypoint_annotations``: the flagging rule and where the review goes."""

    NONE_IS_A_VALUE: ClassVar[Tuple[str, ...]] = ("tag",)  # None: no tag
    NESTED: ClassVar[Dict[str, type]] = {"match": MatchConfig}

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
        _in_range("alpha", self.alpha, lo_open=True)
        _in_range("min_confidence", self.min_confidence)
        _field_or_none("bbox_field", self.bbox_field)
        check_choice("threshold", self.threshold, THRESHOLDS)
        _check_matching_run(self)

    @property
    def error_field(self) -> str:
        return f"{self.review_field}_error"


# --------------------------------------------------------------------------- masks
MASKS_FIELD = "sdcorr_masks"
MASK_REGIONS = ("mask", "box")  # objects: a target's region is its own mask (if any), or its box


@dataclass(frozen=True)
class MaskPropagationConfig(Buildable):
    """``propagate_masks``: where from, where to, the dense grid and the output rule."""

    source_field: str
    output_field: str
    features_field: Optional[str] = FEATURES_FIELD
    embedding_field: Optional[str] = EMBEDDING_FIELD
    #: cells per side of the dense grid over each letterbox frame
    resolution: int = DEFAULT_RESOLUTION
    #: pixels whose match has a lower confidence stay unlabelled (0)
    min_confidence: float = 0.2
    #: a new fo.Heatmap field of the per-pixel confidence (None: none)
    confidence_field: Optional[str] = None
    #: the long side of an image's output mask is at most this many pixels
    max_side: int = 2048
    #: where masks too large for the database go (None: beside the feature store)
    mask_dir: Optional[str] = None
    target_region: str = "mask"
    flip: bool = False
    same_label: bool = True
    batch_size: int = 8
    overwrite: bool = False
    #: also propagate onto the references themselves (default: they are skipped and counted)
    include_references: bool = False
    patches_field: Optional[str] = None

    def __post_init__(self):
        check_field_name("source_field", self.source_field)
        check_field_name("output_field", self.output_field)
        _in_range("mask_resolution", self.resolution)
        _in_range("min_confidence", self.min_confidence)
        _field_or_none("confidence_field", self.confidence_field)
        _in_range("max_side", self.max_side)
        object.__setattr__(self, "mask_dir", _folder("mask_dir", self.mask_dir))
        check_choice("target_region", self.target_region, MASK_REGIONS)
        check_bool("flip", self.flip)
        check_bool("include_references", self.include_references)
        check_bool("same_label", self.same_label)
        _check_matching_run(self)

    @property
    def error_field(self) -> str:
        return f"{self.output_field}_error"

    @property
    def match(self) -> MatchConfig:
        """The reference choice (the most similar by the global embedding; flip; label)."""
        return MatchConfig(flip=self.flip, same_label=self.same_label)


@dataclass(frozen=True)
class MaskEvaluationConfig(Buildable):
    """``evaluate_masks``: IoU of predicted masks against ground truth."""

    NONE_IS_A_VALUE: ClassVar[Tuple[str, ...]] = ("eval_key",)  # None: compute only, write nothing

    pred_field: str
    gt_field: str
    eval_key: Optional[str] = "sdcorr_masks_eval"
    mask_targets: Optional[Dict[Any, str]] = field(default=None, hash=False, compare=False)
    overwrite: bool = True

    def __post_init__(self):
        check_field_name("pred_field", self.pred_field)
        check_field_name("gt_field", self.gt_field)
        if self.pred_field == self.gt_field:
            raise ParameterError(f"parameters 'pred_field' and 'gt_field' must differ, both are {self.pred_field!r}")
        _field_or_none("eval_key", self.eval_key)
        if self.mask_targets is not None and not isinstance(self.mask_targets, dict):
            raise ParameterError(f"parameter 'mask_targets' must be a dict of pixel value -> class name, got "
                                 f"{type(self.mask_targets).__name__}")
        check_bool("overwrite", self.overwrite)


# --------------------------------------------------------------------------- feature views
@dataclass(frozen=True)
class ViewConfig(Buildable):
    """What ``write_feature_pca`` / ``write_similarity_heatmaps`` share: output field and images."""

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
        _in_range("fit_samples", self.fit_samples)
        _in_range("max_side", self.max_side)
        check_bool("overwrite", self.overwrite)


@dataclass(frozen=True)
class FeaturePCAConfig(ViewConfig):
    """``write_feature_pca``: PCA colours or part clusters into ``output_field``."""

    output_field: str = PCA_FIELD
    mode: str = "pca"
    n_parts: int = N_PARTS

    def __post_init__(self):
        super().__post_init__()
        check_choice("mode", self.mode, VIEW_MODES)
        _in_range("n_parts", self.n_parts)


@dataclass(frozen=True)
class HeatmapConfig(ViewConfig):
    """``write_similarity_heatmaps``: heat maps into ``output_field``."""

    output_field: str = HEATMAP_FIELD


__all__ = [
    "Buildable", "FeatureConfig", "MatchConfig", "PropagationConfig", "EvaluationConfig", "ReviewConfig",
    "ViewConfig", "FeaturePCAConfig", "HeatmapConfig", "RANGES", "FEATURE_PARAMS", "merge_features",
    "COMPUTE_FEATURE_PARAMS", "FEATURE_FIELDS", "MATCH_PARAMS", "flat_keywords", "refine_settings",
    "STORE_DTYPES", "DTYPES", "COMBINE_RULES", "THRESHOLDS", "VIEW_MODES",
    "MaskPropagationConfig", "MaskEvaluationConfig", "MASKS_FIELD", "MASK_REGIONS",
]


# --------------------------------------------------------------------------- instance swapping
from fiftyone_sdcorr.core.matching.dense import DEFAULT_RESOLUTION as DENSE_RESOLUTION  # noqa: E402
from fiftyone_sdcorr.core.pictures.swap import REFINE_MODES as SWAP_REFINE_MODES  # noqa: E402

#: swap_instances' ranges (added to RANGES: the forms read them from there)
RANGES.update({
    "swap_resolution": (8, 1024), "refine_strength": (0.0, 1.0), "refine_steps": (1, 1000),
    "refine_guidance": (0.0, 50.0), "refine_size": (64, 2048), "seed": (0, 2 ** 32 - 1),
    "animation_frames": (2, 240), "swap_batch_size": (1, 256),
})


@dataclass(frozen=True)
class SwapConfig(Buildable):
    """``swap_instances``: where the new samples go (a dataset, or a group slice of the
    samples' grouped dataset: exactly one), the dense grid, the optional refinement (the
    paper's SD pass) and animation."""

    output_dataset: Optional[str] = None
    #: a grouped dataset: the group slice the new samples join, in their target's group
    output_slice: Optional[str] = None
    #: a fo.Detections field: pairs of objects (None: pairs of whole images)
    patches_field: Optional[str] = None
    #: whole-image pairs: a fo.Segmentation field whose non-zero pixels are the region (None: the whole image)
    mask_field: Optional[str] = None
    features_field: Optional[str] = FEATURES_FIELD
    #: automatic pairing: the global embedding each target's most similar source is ranked by
    #: (when every unit has one; else the mean dense descriptor)
    embedding_field: Optional[str] = EMBEDDING_FIELD
    #: cells per side of the dense grid over each letterbox frame
    resolution: int = DENSE_RESOLUTION
    #: target pixels whose match has a lower confidence keep their own colour
    min_confidence: float = 0.0
    #: False, "img2img" (True: the same) or "inpaint"
    refine: Any = False
    refine_strength: float = 0.3
    refine_steps: int = 30
    refine_guidance: float = 7.5
    refine_prompt: str = "a photo of a {label}"
    #: long side of the region in the SD pass (rounded to multiples of 64)
    refine_size: int = 512
    seed: int = 0
    animation: bool = False
    animation_frames: int = 16
    #: where the new images go (None: <feature store>/_swaps/<output dataset id>)
    output_dir: Optional[str] = None
    #: pairs whose features are fetched at once
    batch_size: int = 4
    overwrite: bool = False

    def __post_init__(self):
        if (self.output_dataset is None) == (self.output_slice is None):
            raise ParameterError("give one of parameters 'output_dataset' (a dataset name) and 'output_slice' "
                                 "(a group slice of the samples' grouped dataset)")
        if self.output_dataset is not None:
            check_str("output_dataset", self.output_dataset)
        _field_or_none("output_slice", self.output_slice)
        _field_or_none("patches_field", self.patches_field)
        _field_or_none("mask_field", self.mask_field)
        _field_or_none("features_field", self.features_field)
        _field_or_none("embedding_field", self.embedding_field)
        _in_range("swap_resolution", self.resolution)
        _in_range("min_confidence", self.min_confidence)
        refine = "img2img" if self.refine is True else self.refine
        object.__setattr__(self, "refine", check_choice("refine", refine, (False,) + SWAP_REFINE_MODES))
        _in_range("refine_strength", self.refine_strength)
        _in_range("refine_steps", self.refine_steps)
        _in_range("refine_guidance", self.refine_guidance)
        if not isinstance(self.refine_prompt, str):
            raise ParameterError(f"parameter 'refine_prompt' must be a string, got {self.refine_prompt!r}")
        _in_range("refine_size", self.refine_size)
        _in_range("seed", self.seed)
        check_bool("animation", self.animation)
        _in_range("animation_frames", self.animation_frames)
        object.__setattr__(self, "output_dir", _folder("output_dir", self.output_dir))
        _in_range("swap_batch_size", self.batch_size)
        check_bool("overwrite", self.overwrite)

    def settings(self) -> dict:
        """What decides a new sample's pixels (its provenance; a rerun with the same
        settings skips the pairs already swapped)."""
        out = {"patches_field": self.patches_field, "mask_field": self.mask_field, "resolution": self.resolution,
               "min_confidence": self.min_confidence, "animation": self.animation,
               # True for img2img: the settings (and so the keys) of swaps made before inpainting existed
               "refine": True if self.refine == "img2img" else self.refine}
        if self.refine:
            out.update(refine_strength=self.refine_strength, refine_steps=self.refine_steps,
                       refine_guidance=self.refine_guidance, refine_prompt=self.refine_prompt,
                       refine_size=self.refine_size, seed=self.seed)
        if self.animation:
            out["animation_frames"] = self.animation_frames
        return out


__all__ += ["SwapConfig"]
