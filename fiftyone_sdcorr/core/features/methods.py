"""Feature methods as data: what a method loads, what decides its numbers, how it matches.

A method is a name and a few facts, not a code path of its own
(:class:`~fiftyone_sdcorr.core.features.featurizer.Featurizer` runs every method):

- ``"sd-dino"``: *A Tale of Two Features* (Zhang et al., NeurIPS 2023; ``Junyi42/sd-dino``):
  Stable Diffusion decoder taps (co-PCA per pair, or a fixed projection for stored
  features) and DINOv2 tokens, each L2-normalised, weighted and concatenated. The default.
- ``"dino-diy"``: DIY-SC (Dünkel et al., ICCV 2025; ``odunkel/DIY-SC``, code and weights
  CC0 1.0): the same DINOv2-B/14 tokens through DIY-SC's ``AggregationNetwork`` adapter
  (:mod:`~fiftyone_sdcorr.core.features.adapter`), L2-normalised per token; matched with
  the window soft-argmax DIY-SC evaluates with (``SOFT_EVAL_WINDOW`` 7: a 15 x 15 window,
  temperature 0.02). No Stable Diffusion is loaded.

:func:`fingerprint` is the one function that names what produced stored numbers (the
feature store's folders, each stored file, the FiftyOne run records, the benchmark
raw-map cache). No FiftyOne import.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Dict, Tuple

from fiftyone_sdcorr.core.common.params import check_choice

#: settings that change how features are computed, not which numbers come out (beyond
#: numerical precision): a GPU run in bf16 and a CPU run in fp32 share a store
PRECISION_KEYS = ("dtype", "device", "batch_size")


@dataclass(frozen=True)
class Method:
    """One feature method (see the module docstring)."""

    name: str
    #: one line for forms and ``--help``
    summary: str
    #: loads Stable Diffusion (and so the SD recipe fields decide its numbers)
    uses_sd: bool
    #: the recipe fields that decide this method's numbers (besides the models)
    recipe_fields: Tuple[str, ...]
    #: what a first run downloads
    weights: str
    #: the window soft-argmax its authors match with (window side in tokens, temperature)
    soft_window: int
    temperature: float


SD_RECIPE_FIELDS = ("sd_size", "sd_mode", "sd_tile", "padding", "timestep", "noise_seed", "noise_size", "taps",
                    "prompt", "dino_size", "pca_dim", "alpha", "noise")

METHODS: Dict[str, Method] = {
    "sd-dino": Method(
        "sd-dino", "the paper's fused Stable Diffusion 1.5 + DINOv2-B features (about 5 GB of weights)",
        uses_sd=True, recipe_fields=SD_RECIPE_FIELDS,
        weights="Stable Diffusion 1.5 (about 4.3 GB) + DINOv2-B/14 (0.35 GB)", soft_window=11, temperature=0.02),
    "dino-diy": Method(
        "dino-diy", "DIY-SC's adapter on DINOv2-B tokens: no Stable Diffusion, about a sixth of the cost",
        uses_sd=False, recipe_fields=("dino_size", "padding"),
        weights="DINOv2-B/14 (0.35 GB); the adapter (2.5 MB) ships with the package", soft_window=15,
        temperature=0.02),
}
DEFAULT_METHOD = "sd-dino"


def get_method(name) -> Method:
    """The method called ``name`` (a ParameterError lists the methods)."""
    return METHODS[check_choice("method", name, tuple(METHODS))]


def fingerprint(settings: dict) -> str:
    """The short hash of what decides stored numbers: ``settings`` without the precision
    keys. ``method: "sd-dino"`` is left out, so the stores written before methods existed
    keep their fingerprints."""
    kept = {k: v for k, v in settings.items() if k not in PRECISION_KEYS
            and not (k == "method" and v == DEFAULT_METHOD)}
    return hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def method_settings(method: str, recipe, *, sd_model, dino_model, adapter_digest=None) -> dict:
    """What decides the numbers of ``method``'s features (models, adapter, the recipe fields
    it reads): the settings ``FeatureExtractor.config`` and ``FeatureConfig.settings`` both
    report, and :func:`fingerprint` hashes."""
    m = get_method(method)
    if m.uses_sd:
        return {"method": m.name, "extractor": "sd+dinov2", "sd_model": str(sd_model), "dino_model": str(dino_model),
                **recipe.to_dict()}
    return {"method": m.name, "extractor": "dinov2+adapter", "dino_model": str(dino_model), "adapter": adapter_digest,
            **{f: getattr(recipe, f) for f in m.recipe_fields}}


def method_of(settings: dict) -> str:
    """The method recorded in ``settings`` (records written before methods existed: the paper's)."""
    return str((settings or {}).get("method") or DEFAULT_METHOD)
