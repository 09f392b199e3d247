"""FeatureExtractor: images -> raw SD tap maps + DINO patch tokens.

Every number of the recipe is a field of :class:`Recipe` with the paper's value as the
default. No FiftyOne import.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fiftyone_sdcorr.core.features import models as _models
from fiftyone_sdcorr.core.features.fusion import DEFAULT_TAPS, FixedProjection, FusedFeatures, RawFeatures
from fiftyone_sdcorr.core.features.featurizer import Featurizer
from fiftyone_sdcorr.core.features.methods import DEFAULT_METHOD, get_method, method_settings
from fiftyone_sdcorr.core.common.geometry import DEFAULT_CONTEXT_MARGIN, Letterbox
from fiftyone_sdcorr.core.common.images import load_image
from fiftyone_sdcorr.core.common.params import ParameterError, check_bool, check_choice, check_float, check_int, check_str

logger = logging.getLogger(__name__)

#: GPU memory measured on an H100 (profile of 2026-11-27): base and per image of a batch, bf16 paper recipe
MEASURED_BASE_BYTES = 2.1e9
MEASURED_BYTES_PER_IMAGE = 1.35e9
#: the default batch stays within this much GPU memory
MEMORY_TARGET_BYTES = 8e9
#: threads that decode and letterbox images (PIL releases the GIL while resizing)
PREP_THREADS = min(8, os.cpu_count() or 1)
#: ``torch.compile`` of the VAE encoder, the UNet blocks and DINOv2, measured on an H100
#: (the H100 profile of 2026-11-27, paper recipe, batch 4): a 131 s first compilation, then 70.5 -> 31.6 ms
#: per image. ``compile=None`` (auto) compiles on CUDA for runs long enough to earn it back.
MEASURED_COMPILE_SECONDS = 131.0
MEASURED_COMPILE_SAVING_S_PER_IMAGE = 0.0705 - 0.0316
COMPILE_MIN_IMAGES = int(MEASURED_COMPILE_SECONDS / MEASURED_COMPILE_SAVING_S_PER_IMAGE) + 1

#: the timestep a clean-latent UNet is called at (``noise=False``): CleanDIFT's
#: ``src/sd_feature_extraction.py`` passes its ``self.timestep`` (``t_init=261``) with the
#: clean latent for every image in ``get_features``; its ``geoaware-sc-eval`` branch does the same
CLEAN_TIMESTEP = 261
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Recipe:
    """The paper's feature recipe; every default is the paper's value."""

    sd_size: int = 960  # letterbox square for the SD branch
    sd_mode: str = "tiled"  # "tiled": overlapping tiles, overlaps averaged; "whole": one pass
    sd_tile: int = 512  # tile side in tiled mode (offsets 0 and 448 at 960)
    padding: str = "zero"  # letterbox padding: "zero" or "edge"
    timestep: int = 100
    noise_seed: int = 42
    noise_size: int = 64  # the shared noise tensor is (1, 4, 64, 64)
    taps: Tuple[str, ...] = DEFAULT_TAPS
    prompt: str = ""  # "" = empty prompt; may contain "{label}", e.g. "a photo of a {label}"
    dino_size: int = 840
    pca_dim: int = 256  # per SD tap (co-PCA or fixed projection)
    alpha: float = 0.5  # SD share of the fused descriptor (paper: alpha = 0.5)
    #: add the shared noise at ``timestep`` (the paper). False: the clean latent goes into the
    #: UNet as it is, for UNets fine-tuned on clean images (CleanDIFT); ``Recipe.build`` then
    #: sets ``timestep`` to :data:`CLEAN_TIMESTEP` (261, as CleanDIFT's own feature
    #: extraction calls its UNet) unless it is given.
    noise: bool = True
    #: objects only (``patches_field``): context around each object's box on each side, as a
    #: fraction of the box's side, before the crop is letterboxed like an image
    context_margin: float = DEFAULT_CONTEXT_MARGIN

    def __post_init__(self):
        check_int("sd_size", self.sd_size, lo=64, hi=4096)
        check_choice("sd_mode", self.sd_mode, ("tiled", "whole"))
        check_int("sd_tile", self.sd_tile, lo=64, hi=4096)
        check_choice("padding", self.padding, ("zero", "edge"))
        check_int("timestep", self.timestep, lo=0, hi=999)
        check_int("noise_seed", self.noise_seed)
        check_int("noise_size", self.noise_size, lo=1, hi=1024)
        check_str("prompt", self.prompt, empty=True)
        check_int("dino_size", self.dino_size, lo=14, hi=4096)
        check_int("pca_dim", self.pca_dim, lo=1, hi=4096)
        check_float("alpha", self.alpha, lo=0.0, hi=1.0)
        check_bool("noise", self.noise)
        check_float("context_margin", self.context_margin, lo=0.0, hi=2.0)
        if isinstance(self.taps, str) or not isinstance(self.taps, (list, tuple)):
            raise ParameterError(f"parameter 'taps' must be a list of tap names, got {self.taps!r}")
        bad = [t for t in self.taps if t not in _models.SD_TAPS]
        if bad or not self.taps:
            raise ParameterError(f"parameter 'taps' must be a non-empty subset of {list(_models.SD_TAPS)}, "
                                 f"got {self.taps!r}")
        if self.sd_size % 64:
            raise ParameterError(f"parameter 'sd_size' must be a multiple of 64, got {self.sd_size}")
        if self.sd_mode == "tiled" and (self.sd_tile % 64 or self.sd_tile > self.sd_size):
            raise ParameterError(f"parameter 'sd_tile' must be a multiple of 64 and <= sd_size, got {self.sd_tile}")
        object.__setattr__(self, "taps", tuple(self.taps))
        object.__setattr__(self, "alpha", float(self.alpha))

    @classmethod
    def build(cls, preset: str = "paper", **overrides) -> "Recipe":
        """A preset with overrides; unknown names are refused with the list of fields."""
        check_choice("preset", preset, tuple(PRESETS))
        unknown = sorted(set(overrides) - set(cls.__dataclass_fields__))
        if unknown:
            raise ParameterError(f"unknown recipe field(s) {unknown}; fields: {sorted(cls.__dataclass_fields__)}")
        if overrides.get("noise") is False and "timestep" not in overrides:
            overrides["timestep"] = CLEAN_TIMESTEP  # clean-latent UNets, as CleanDIFT runs its own
        return replace(PRESETS[preset], **overrides)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["taps"] = list(self.taps)
        if d["noise"]:
            # the paper's noising is left out so that settings, and the fingerprints of
            # features stored before the field existed, stay as they were
            del d["noise"]
        # the margin decides the values of object features only: FeatureConfig.settings adds
        # it back for them (image features keep the fingerprints they had)
        del d["context_margin"]
        return d

    def tile_offsets(self) -> List[int]:
        """Tile offsets along one axis: evenly spread, multiples of 64 (0 and 448 at 960/512)."""
        if self.sd_mode == "whole" or self.sd_tile >= self.sd_size:
            return [0]
        span = self.sd_size - self.sd_tile
        n = -(-span // self.sd_tile) + 1
        offs = [int(round(span * i / (n - 1) / 64.0)) * 64 for i in range(n)]
        return sorted(set(offs))


#: Named presets. "paper" is the paper's recipe; "cpu" trades accuracy for speed.
PRESETS = {
    "paper": Recipe(),
    "whole": Recipe(sd_mode="whole"),
    "cpu": Recipe(sd_size=512, sd_mode="whole", dino_size=448),
}


def letterbox_image(img: Image.Image, size: int, padding: str = "zero") -> Tuple[np.ndarray, Letterbox]:
    """Resize the long side to ``size`` (LANCZOS) and centre on a square; uint8 HxWx3."""
    lb = Letterbox.fit(img.width, img.height, size)
    resized = np.asarray(img.resize((lb.resized_width, lb.resized_height), Image.Resampling.LANCZOS))
    pads = (
        (lb.pad_top, size - lb.resized_height - lb.pad_top),
        (lb.pad_left, size - lb.resized_width - lb.pad_left),
        (0, 0),
    )
    if padding == "edge":
        canvas = np.pad(resized, pads, mode="edge")
    else:
        canvas = np.pad(resized, pads, mode="constant", constant_values=0)
    return canvas, lb


def _chw_uint8(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


class _StopForward(Exception):
    pass


def to_host(raw: RawFeatures) -> RawFeatures:
    """``raw`` with its maps on the CPU (float32)."""
    return replace(raw, sd={k: v.cpu() for k, v in raw.sd.items()}, dino=raw.dino.cpu())


class FeatureExtractor:
    """Features of a method (:mod:`~fiftyone_sdcorr.core.features.methods`): by default
    fused SD + DINOv2 features, exactly as the paper's code computes them (docs/recipe.md,
    "The recipe"); ``method="dino-diy"``: DINOv2 tokens through DIY-SC's adapter, no SD.

    Args:
        method: ``"sd-dino"`` (the paper, default) or ``"dino-diy"`` (``sd_model`` and
            ``unet_model`` are not loaded)
        adapter: ``"dino-diy"``: a DIY-SC adapter as safetensors (default: the one shipped,
            DIY-SC's ``0300_dino_spair``); ``python -m fiftyone_sdcorr convert-adapter``
            converts the authors' ``.pth``
        sd_model: Hub id or local directory of an SD 1.x/2.x checkpoint (diffusers layout)
        dino_model: Hub id or local directory of a DINOv2 (with or without registers) or
            DINOv3 ViT checkpoint (transformers layout). DINOv3 has patch 16: ``dino_size``
            must be a multiple of 16 (960 gives the 60x60 grid of SD's s3 tap at 960)
        unet_model: replaces ``sd_model``'s UNet (diffusers layout: a directory or Hub id,
            or a ``.safetensors`` UNet state dict such as
            ``CompVis/cleandift/cleandift_sd15_unet.safetensors``); pair a UNet trained on
            clean latents with ``noise=False`` (timestep 0, no noise added)
        device: ``"cuda"``, ``"cpu"``, ... (default: CUDA when available)
        dtype: default bf16 (fp16 where bf16 is unsupported) on CUDA, fp32 on CPU
        batch_size: images per forward pass (default: 1 on CPU, chosen from free memory on CUDA)
        channels_last: NHWC convolutions for the VAE and UNet (default: off; on an H100
            NCHW was faster for the VAE, 24 vs 34 ms per image, and no slower for the UNet:
            channels-last converts back and forth around every GroupNorm)
        compile: ``torch.compile`` the models (fixed shapes: batches are padded to
            ``batch_size``, so one compilation serves a whole run). ``None`` (auto): on CUDA,
            for runs of at least :data:`COMPILE_MIN_IMAGES` images (see :meth:`plan_run`);
            ``True``: on the first batch; ``False``: never
        **recipe: fields of :class:`Recipe` (``sd_size``, ``sd_mode``, ``taps``, ...) or
            ``preset="paper" | "whole" | "cpu"``
    """

    def __init__(
        self,
        sd_model: str = _models.DEFAULT_SD_MODEL,
        dino_model: str = _models.DEFAULT_DINO_MODEL,
        device=None,
        dtype=None,
        batch_size: Optional[int] = None,
        preset: str = "paper",
        channels_last: Optional[bool] = None,
        unet_model: Optional[str] = None,
        compile: Optional[bool] = None,
        method: str = DEFAULT_METHOD,
        adapter: Optional[str] = None,
        **recipe,
    ):
        # 1. settings
        if compile is not None and not isinstance(compile, bool):
            raise ParameterError(f"parameter 'compile' must be True, False or None (auto), got {compile!r}")
        self.method = get_method(method).name
        self.uses_sd = get_method(method).uses_sd
        if not self.uses_sd and unet_model is not None:
            raise ParameterError(f"parameter 'unet_model' needs Stable Diffusion: method {self.method!r} loads none")
        if self.uses_sd and adapter is not None:
            raise ParameterError(f"parameter 'adapter' is for method 'dino-diy', not {self.method!r}")
        self.recipe = Recipe.build(preset, **recipe)
        self.device = torch.device(device) if device is not None else _models.default_device()
        self.dtype = _models.resolve_dtype(dtype) or _models.default_dtype(self.device)
        self.sd_model_name, self.dino_model_name = str(sd_model), str(dino_model)
        self.unet_model_name = None if unet_model is None else str(unet_model)
        self.channels_last = bool(channels_last)
        self.compile_policy = compile
        self.compiled: Optional[dict] = None
        # 2. models
        self.adapter, self.adapter_name = None, None if adapter is None else str(adapter)
        self.adapter_digest: Optional[str] = None  # dino-diy: the loaded adapter's
        self.unet = self.vae = self.scheduler = self.tokenizer = self.text_encoder = None
        self._prompt_cache: Dict[str, torch.Tensor] = {}
        self._prep_pool: Optional[ThreadPoolExecutor] = None
        if self.uses_sd:
            self._load_models(sd_model, dino_model)
        else:
            self._load_dino_and_adapter(dino_model)
        self._check_dino_size()
        # 3. batch and the shared noise
        self.batch_size = batch_size or self._auto_batch_size()
        self._noise = None if not self.uses_sd else torch.randn(
            1, int(self.vae.config.latent_channels), self.recipe.noise_size, self.recipe.noise_size,
            generator=torch.Generator().manual_seed(self.recipe.noise_seed),
        )
        self._noise_on_device: Dict[Tuple[int, int, torch.dtype], torch.Tensor] = {}
        self._imagenet: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._taps_in_order = [t for t in _models.SD_TAPS if t in self.recipe.taps]

    def _load_models(self, sd_model, dino_model) -> None:
        """SD's components and DINO on the device (channels-last when asked), then the
        prompt embedding (the text encoder goes, unless prompts vary per image)."""
        sd = _models.load_stable_diffusion(sd_model, self.device, self.dtype, unet_model=self.unet_model_name)
        self.unet, self.vae, self.scheduler, self.tokenizer = sd.unet, sd.vae, sd.scheduler, sd.tokenizer
        self.dino = _models.load_dino(dino_model, self.device, self.dtype)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed tile shapes: let cuDNN pick its kernels
        if self.channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        self.dino_stride = _models.dino_patch_size(self.dino)
        self.text_encoder = sd.text_encoder
        self._max_tokens = min(
            int(self.tokenizer.model_max_length), int(self.text_encoder.config.max_position_embeddings)
        )
        self._embed_fixed_prompt()

    def _load_dino_and_adapter(self, dino_model) -> None:
        """DINO on the device and the adapter beside it (float32: it is small, and its
        GroupNorms are its authors' float32 numbers)."""
        from fiftyone_sdcorr.core.features.adapter import DEFAULT_ADAPTER, adapter_digest, load_adapter

        self.dino = _models.load_dino(dino_model, self.device, self.dtype)
        self.dino_stride = _models.dino_patch_size(self.dino)
        self.adapter_name = self.adapter_name or str(DEFAULT_ADAPTER)
        self.adapter = load_adapter(self.adapter_name, device=self.device)
        self.adapter_digest = adapter_digest(self.adapter)
        width = int(self.adapter.feature_dims[0]) if hasattr(self.adapter, "feature_dims") else None
        hidden = int(getattr(self.dino.config, "hidden_size", 0) or 0)
        if width is not None and hidden and width != hidden:
            raise ParameterError(f"parameter 'adapter': {self.adapter_name} takes {width}-channel tokens but "
                                 f"{self.dino_model_name!r} gives {hidden}; DIY-SC's adapter is for DINOv2-B/14")

    def _check_dino_size(self) -> None:
        if self.recipe.dino_size % self.dino_stride:
            # e.g. DINOv3 (patch 16) with the DINOv2 default 840: the size with the same token
            # grid as SD's s3 tap (stride 16) is the SD size itself
            same_grid = self.recipe.sd_size // 16 * self.dino_stride
            raise ValueError(
                f"dino_size {self.recipe.dino_size} is not a multiple of the patch size {self.dino_stride} of "
                f"{self.dino_model_name!r}; pass dino_size={same_grid} for a "
                f"{same_grid // self.dino_stride}x{same_grid // self.dino_stride} token grid (SD's s3 grid at "
                f"sd_size {self.recipe.sd_size})"
            )

    def _embed_fixed_prompt(self) -> None:
        if "{label}" in self.recipe.prompt:
            self._prompt_embedding("")  # samples without a label get the empty prompt
            return
        self._prompt_embedding(self.recipe.prompt)
        # the text encoder is needed only for the prompt embedding: keep it, free the encoder
        self.text_encoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ config
    def config(self) -> dict:
        """What decides this extractor's numbers (and its precision): the settings a
        store's fingerprint is made of (:func:`~fiftyone_sdcorr.core.features.methods.fingerprint`)."""
        cfg = method_settings(self.method, self.recipe, sd_model=self.sd_model_name, dino_model=self.dino_model_name,
                              adapter_digest=self.adapter_digest)
        cfg["dtype"] = str(self.dtype).replace("torch.", "")
        if self.uses_sd and self.unet_model_name is not None:  # absent by default: settings stay as they were
            cfg["unet_model"] = self.unet_model_name
        return cfg

    def _auto_batch_size(self) -> int:
        """Images per pass from measured memory (profile of 2026-11-27, one H100, SD 1.5 +
        DINOv2-B, paper recipe, bf16: peak = 2.1 GB + 1.35 GB per image of the batch),
        scaled by the recipe's SD pixels per image and the dtype, within
        :data:`MEMORY_TARGET_BYTES` and 80 % of the free memory. CUDA out-of-memory halves
        the batch anyway."""
        if self.device.type != "cuda":
            return 1
        if not self.uses_sd:
            return 16  # DINO alone: not measured yet; CUDA out-of-memory halves it
        free, _ = torch.cuda.mem_get_info(self.device)
        r = self.recipe
        tile = r.sd_tile if r.sd_mode == "tiled" and len(r.tile_offsets()) > 1 else r.sd_size
        work = len(r.tile_offsets()) ** 2 * tile ** 2 / (4 * 512 ** 2)
        per_image = MEASURED_BYTES_PER_IMAGE * work * (2 if self.dtype == torch.float32 else 1)
        budget = min(free * 0.8, MEMORY_TARGET_BYTES) - MEASURED_BASE_BYTES
        return int(max(1, min(16, budget // per_image)))

    # ------------------------------------------------------------------ prompts
    def _prompt_embedding(self, text: str) -> torch.Tensor:
        if text not in self._prompt_cache:
            if self.text_encoder is None:
                raise RuntimeError(
                    "the text encoder was freed after computing the fixed prompt; "
                    "use a prompt with '{label}' to embed per-image prompts"
                )
            ids = self.tokenizer(
                text, padding="max_length", max_length=self._max_tokens,
                truncation=True, return_tensors="pt",
            ).input_ids.to(self.device)
            with torch.inference_mode():
                emb = self.text_encoder(ids)[0]
            self._prompt_cache[text] = emb.to(self.dtype)
        return self._prompt_cache[text]

    def prompt_for(self, label: Optional[str]) -> str:
        if "{label}" in self.recipe.prompt:
            return self.recipe.prompt.format(label=label or "object") if label else ""
        return self.recipe.prompt

    # ------------------------------------------------------------------ inputs
    def _sd_input(self, img: Image.Image) -> Tuple[torch.Tensor, Letterbox]:
        """The SD letterbox of ``img``, (3, S, S) float32 in [-1, 1]."""
        arr, lb = letterbox_image(img, self.recipe.sd_size, self.recipe.padding)
        return self._sd_pixels(_chw_uint8(arr)), lb

    def _dino_input(self, img: Image.Image) -> Tuple[torch.Tensor, Letterbox]:
        """The DINO letterbox of ``img``, (3, S, S) float32, ImageNet-normalised."""
        arr, lb = letterbox_image(img, self.recipe.dino_size, self.recipe.padding)
        return self._dino_pixels(_chw_uint8(arr)), lb

    @staticmethod
    def _sd_pixels(x: torch.Tensor) -> torch.Tensor:
        """uint8 letterbox pixels (on any device) -> [-1, 1] float32; float input is taken
        as already scaled. Batches travel to the GPU as uint8 (4x fewer bytes) and are
        scaled there, with the same operations as on the CPU."""
        return x.float() / 255.0 * 2.0 - 1.0 if x.dtype == torch.uint8 else x

    def _dino_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 letterbox pixels -> ImageNet-normalised float32 on ``x``'s device."""
        if x.dtype != torch.uint8:
            return x
        key = str(x.device)
        if key not in self._imagenet:  # made once per device
            self._imagenet[key] = tuple(torch.tensor(v).view(3, 1, 1).to(x.device) for v in (IMAGENET_MEAN, IMAGENET_STD))
        mean, std = self._imagenet[key]
        return (x.float() / 255.0 - mean) / std

    def _upload(self, x: torch.Tensor) -> torch.Tensor:
        """To the device without waiting for the work queued there (pinned or pageable
        source, ``non_blocking``: a blocking copy would synchronise with the GPU)."""
        return x.to(self.device, non_blocking=True).to(self.dtype)

    # ------------------------------------------------------------------ SD
    def _noise_for(self, h: int, w: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The shared noise at the latent size, on the device (made once per size and dtype)."""
        key = (h, w, dtype or self.dtype)
        if key not in self._noise_on_device:
            n = self._noise
            if (h, w) != tuple(n.shape[-2:]):
                n = F.interpolate(n, size=(h, w), mode="bicubic", align_corners=False)
            self._noise_on_device[key] = n.to(self.device, key[2])
        return self._noise_on_device[key]

    @torch.inference_mode()
    def unet_taps(self, pixels: torch.Tensor, prompt_embeds: torch.Tensor, full_forward: bool = False):
        """VAE mean latent x scale, shared noise at t, UNet to the last requested tap.
        With ``recipe.noise`` False the clean latent goes into the UNet (still at ``timestep``).

        ``pixels``: (B, 3, H, W) in [-1, 1]. Returns {tap: (B, C, h, w) float32 on the device}.
        With ``full_forward`` the UNet runs to the end (used to prove truncation changes nothing).
        """
        x = self._upload(pixels)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        latent = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor
        t = torch.full((latent.shape[0],), self.recipe.timestep, dtype=torch.long, device=latent.device)
        if self.recipe.noise:
            noise = self._noise_for(*latent.shape[-2:], latent.dtype).expand_as(latent)
            noisy = self.scheduler.add_noise(latent, noise, t)
        else:
            noisy = latent
        captured: Dict[str, torch.Tensor] = {}
        last = self._taps_in_order[-1]
        handles = []

        def make_hook(name):
            def hook(_module, _inp, out):
                out = out[0] if isinstance(out, (tuple, list)) else out
                out = getattr(out, "sample", out)
                captured[name] = out.float()
                if name == last and not full_forward:
                    raise _StopForward

            return hook

        for tap in self._taps_in_order:
            handles.append(_models.tap_module(self.unet, tap).register_forward_hook(make_hook(tap)))
        try:
            self.unet(noisy, t, encoder_hidden_states=prompt_embeds.to(latent.device, latent.dtype))
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return captured

    def _sd_features(
        self, sd_pixels, prompts: List[str], tiles_per_pass: Optional[int] = None,
        full_forward: bool = False,
    ) -> List[Dict[str, torch.Tensor]]:
        """Tiled or whole SD pass for several images (``sd_pixels``: (B, 3, S, S) or a list
        of (3, S, S)); tiles of all images share batches (``tiles_per_pass`` of them,
        default all tiles of ``batch_size`` images), cut on the device. Maps stay on the
        device. ``tiles_per_pass=1, full_forward=True`` is the plain recipe the benchmark
        compares to. Compiled, every pass is padded to the same number of tiles."""
        r = self.recipe
        if isinstance(sd_pixels, (list, tuple)):
            sd_pixels = torch.stack(list(sd_pixels))
        pixels = self._sd_pixels(sd_pixels.to(self.device, non_blocking=True))
        offs = r.tile_offsets()
        tile = r.sd_tile if r.sd_mode == "tiled" and len(offs) > 1 else r.sd_size
        jobs = [(i, oy, ox) for i in range(pixels.shape[0]) for oy in offs for ox in offs]
        sums: List[Dict[str, torch.Tensor]] = [dict() for _ in range(pixels.shape[0])]
        counts: List[Dict[str, torch.Tensor]] = [dict() for _ in range(pixels.shape[0])]
        per_pass = tiles_per_pass or max(1, self.batch_size * len(offs) ** 2)
        for start in range(0, len(jobs), per_pass):
            chunk = jobs[start : start + per_pass]
            pix = torch.stack([pixels[i, :, oy : oy + tile, ox : ox + tile] for i, oy, ox in chunk])
            emb = torch.cat([self._prompt_embedding(prompts[i]) for i, _, _ in chunk])
            taps = self.unet_taps(*self._padded(pix, emb, per_pass), full_forward=full_forward)
            for k, (i, oy, ox) in enumerate(chunk):
                for name, fmap in taps.items():
                    stride = tile // fmap.shape[-1]
                    g = r.sd_size // stride
                    if name not in sums[i]:
                        sums[i][name] = torch.zeros(fmap.shape[1], g, g, device=fmap.device)
                        counts[i][name] = torch.zeros(1, g, g, device=fmap.device)
                    y0, x0 = oy // stride, ox // stride
                    h, w = fmap.shape[-2:]
                    sums[i][name][:, y0 : y0 + h, x0 : x0 + w] += fmap[k]
                    counts[i][name][:, y0 : y0 + h, x0 : x0 + w] += 1
        return [{n: s[n] / c[n] for n in s} for s, c in zip(sums, counts)]

    def _padded(self, *tensors_and_size):
        """Compiled models see one batch shape: pad the batch (first dim) to ``size`` by
        repeating the first row (its outputs are dropped); eager runs are left as they are."""
        *tensors, size = tensors_and_size
        if self.compiled is None or tensors[0].shape[0] >= size:
            return tensors
        n = size - tensors[0].shape[0]
        return [torch.cat([t, t[:1].expand(n, *t.shape[1:])]) for t in tensors]

    # ------------------------------------------------------------------ DINO
    @torch.inference_mode()
    def dino_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> (B, C, S/p, S/p) float32 on the device (p = patch size:
        14 for DINOv2, 16 for DINOv3): the last block's output, before the final norm, CLS
        and registers dropped."""
        b = pixels.shape[0]
        x = self._dino_pixels(pixels.to(self.device, non_blocking=True)).to(self.dtype)
        (x,) = self._padded(x, self.batch_size)
        out = self.dino(pixel_values=x, output_hidden_states=True)
        tokens = out.hidden_states[-1][:b, _models.dino_num_prefix_tokens(self.dino) :]
        g = pixels.shape[-1] // self.dino_stride
        return tokens.float().reshape(b, g, g, -1).permute(0, 3, 1, 2).contiguous()

    # ------------------------------------------------------------------ compiled path
    def plan_run(self, n_images: int) -> bool:
        """Called with the length of a run before it starts: with ``compile=None`` (auto)
        compiles on CUDA when the run has at least :data:`COMPILE_MIN_IMAGES` images (the
        measured compile time is then earned back). Returns whether the models are compiled."""
        if self.compiled is None and (
            self.compile_policy is True
            or (self.compile_policy is None and self.device.type == "cuda" and n_images >= COMPILE_MIN_IMAGES)
        ):
            self.compile_models()
        return self.compiled is not None

    def compile_models(self, mode: Optional[str] = None, backend: Optional[str] = None) -> dict:
        """``torch.compile`` the heavy blocks in place (fixed shapes), keeping the tap modules
        hookable: the VAE encoder whole; the UNet's down and mid blocks whole and, in the up
        blocks, each resnet, attention and upsampler (a forward hook on a compiled wrapper
        runs eagerly, so the early stop still works); DINO's transformer layers. Compilation
        happens on the first batch of each shape; batches are padded to ``batch_size``.
        ``backend``: torch.compile's (default inductor)."""
        if self.compiled is not None:
            return self.compiled
        kw = dict(dynamic=False)
        if mode and mode != "default":
            kw["mode"] = mode
        if backend is not None:
            kw["backend"] = backend

        def each(modules):
            for i, m in enumerate(modules):
                modules[i] = torch.compile(m, **kw)

        if self.uses_sd:
            self.vae.encoder = torch.compile(self.vae.encoder, **kw)
            each(self.unet.down_blocks)
            self.unet.mid_block = torch.compile(self.unet.mid_block, **kw)
            for blk in self.unet.up_blocks:
                for name in ("resnets", "attentions", "upsamplers"):
                    if getattr(blk, name, None) is not None:
                        each(getattr(blk, name))
        each(_models.dino_layers(self.dino))
        self.compiled = {"mode": mode or "default", "dynamic": False, "batch_size": self.batch_size,
                         "backend": backend or "inductor"}
        return self.compiled

    # ------------------------------------------------------------------ public
    def extract(self, images: Sequence, labels: Optional[Sequence[Optional[str]]] = None) -> List[RawFeatures]:
        """Raw features of each image (PIL images, arrays or file paths), float32 on the CPU.

        ``labels`` fill the prompt template when the recipe's prompt contains ``{label}``.
        A file that cannot be read raises :class:`fiftyone_sdcorr.core.common.images.ImageLoadError`
        naming it. On CUDA out-of-memory the batch is halved and retried.
        """
        if isinstance(images, (str, Image.Image, np.ndarray)) or hasattr(images, "__fspath__"):
            images = [images]
        images = list(images)
        labels = list(labels) if labels is not None else [None] * len(images)
        if len(labels) != len(images):
            raise ValueError(f"got {len(labels)} labels for {len(images)} images")
        self.plan_run(len(images))
        results: List[RawFeatures] = []
        start = 0
        with ThreadPoolExecutor(max_workers=1) as pool:
            # decoding and LANCZOS letterboxing of the next batch overlap the models' work
            pending = None
            while start < len(images):
                n = self.batch_size
                chunk = images[start : start + n]
                prepared = pending.result() if pending is not None and pending.n == len(chunk) else None
                prepared = prepared or self.prepare(chunk, labels[start : start + n])
                nxt = images[start + n : start + 2 * n]
                pending = None
                if nxt:
                    pending = pool.submit(self.prepare, nxt, labels[start + n : start + 2 * n])
                    pending.n = len(nxt)
                try:
                    results.extend(to_host(r) for r in self.run_prepared(prepared))
                except torch.cuda.OutOfMemoryError:
                    if self.batch_size == 1:
                        raise
                    torch.cuda.empty_cache()
                    self.batch_size = max(1, self.batch_size // 2)
                    logger.warning("CUDA out of memory; batch size reduced to %d", self.batch_size)
                    if pending is not None:
                        pending.cancel()
                        pending = None
                    continue
                start += len(chunk)
        return results

    def prepare(self, images, labels=None) -> dict:
        """Decode and letterbox a batch: CPU work, image by image on :data:`PREP_THREADS`
        threads (PIL releases the GIL). The pixels come stacked as uint8, in pinned memory
        on CUDA (uploaded without waiting for the GPU, scaled there). Thread-safe: runs
        ahead of the models."""
        labels = [None] * len(images) if labels is None else list(labels)
        if self._prep_pool is None:
            self._prep_pool = ThreadPoolExecutor(max_workers=PREP_THREADS, thread_name_prefix="sdcorr-prep")
        prepared = list(self._prep_pool.map(self._prepare_one, images))
        sd = torch.stack([p[0][0] for p in prepared]) if self.uses_sd else None
        dino = torch.stack([p[1][0] for p in prepared])
        if self.device.type == "cuda":
            sd, dino = None if sd is None else sd.pin_memory(), dino.pin_memory()
        return {
            "sources": [str(im) if isinstance(im, str) or hasattr(im, "__fspath__") else None for im in images],
            "sd": sd, "sd_letterboxes": [p[0][1] for p in prepared],
            "dino": dino, "dino_letterboxes": [p[1][1] for p in prepared],
            "prompts": [self.prompt_for(lbl) for lbl in labels] if self.uses_sd else [],
        }

    def _prepare_one(self, image):
        """Both letterboxes of one image as uint8 (3, S, S) tensors (scaled on the device)."""
        pil = load_image(image)
        r = self.recipe
        dino, dino_lb = letterbox_image(pil, r.dino_size, r.padding)
        if not self.uses_sd:  # DINO alone: its letterbox stands for both
            return (None, dino_lb), (_chw_uint8(dino), dino_lb)
        sd, sd_lb = letterbox_image(pil, r.sd_size, r.padding)
        return (_chw_uint8(sd), sd_lb), (_chw_uint8(dino), dino_lb)

    def run_prepared(self, prep: dict) -> List[RawFeatures]:
        """The models on a :meth:`prepare`\\ d batch; the maps stay on the device (float32).
        Nothing here waits for the GPU: the work is queued and the call returns."""
        dino = self.dino_tokens(prep["dino"])
        sd_maps = self._sd_features(prep["sd"], prep["prompts"]) if self.uses_sd else [{} for _ in range(len(dino))]
        return [
            RawFeatures(
                sd=sd_maps[i], dino=dino[i], sd_letterbox=prep["sd_letterboxes"][i],
                dino_letterbox=prep["dino_letterboxes"][i], dino_stride=self.dino_stride,
                source=prep["sources"][i],
            )
            for i in range(len(sd_maps))
        ]

    def describe(self, images: Sequence, projection: Optional[FixedProjection] = None, labels=None) -> List[FusedFeatures]:
        """Unit descriptors of the method (:class:`~fiftyone_sdcorr.core.features.featurizer.Featurizer`):
        ``"sd-dino"``: fused, with a fixed projection (fitted on these images when None);
        ``"dino-diy"``: the adapter's. For two images, :meth:`describe_pair` is the paper's co-PCA.
        """
        return Featurizer(self, projection).describe(images, labels)

    def describe_pair(self, image_a, image_b, labels=None) -> Tuple[FusedFeatures, FusedFeatures]:
        """The paper's per-pair path: co-PCA of the two images' SD maps, then fusion
        (``"dino-diy"``: each image's adapter descriptors)."""
        return Featurizer(self).describe_pair(image_a, image_b, labels)
