"""Load Stable Diffusion (diffusers layout) and DINOv2 (transformers layout).

From a Hugging Face Hub id or a local directory; safetensors only, never remote code;
``HF_HUB_OFFLINE`` is respected by huggingface_hub itself. When weights are neither cached
nor reachable the caller gets one :class:`ModelLoadError` naming the model and how to get
it, not a stack trace from deep inside huggingface_hub. No FiftyOne import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

DEFAULT_SD_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_DINO_MODEL = "facebook/dinov2-base"

#: Feature taps: paper layer name -> (up block index, sub-module kind, index).
#: ODISE records the hidden state entering decoder block k (RECIPE.md): for SD 1.x/2.x in
#: diffusers that is the output of these modules, before any upsampler.
SD_TAPS = {
    "s5": (0, "resnets", 1),  # paper layer 2, stride 64
    "s4": (1, "attentions", 1),  # paper layer 5, stride 32
    "s3": (2, "attentions", 1),  # paper layer 8, stride 16
    "s2": (3, "attentions", 1),  # paper layer 11, stride 8
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which and what to do."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device) -> torch.dtype:
    """bf16 on CUDA (fp16 where bf16 is unsupported), fp32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": torch.float32, "float32": torch.float32,
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    }
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}") from None


def _explain(kind: str, name: str, err: Exception) -> ModelLoadError:
    local = os.path.isdir(str(name))
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if local:
        how = (
            f"the directory exists but is not a complete {kind} in the expected layout with "
            ".safetensors weights"
        )
    else:
        how = (
            "its weights are neither in the local Hugging Face cache nor reachable"
            + (" (HF_HUB_OFFLINE is set)" if offline else "")
            + f". Download them on a connected machine with `hf download {name}` (safetensors) "
            "or pass a local directory"
        )
    return ModelLoadError(f"could not load {kind} {name!r}: {how}. Cause: {type(err).__name__}: {err}")


def _hub_kwargs(dtype=None, library="diffusers"):
    kw = {"use_safetensors": True}
    if dtype is not None:
        kw["torch_dtype" if library == "diffusers" else "dtype"] = dtype
    return kw


@dataclass
class StableDiffusionParts:
    """The pieces of an SD checkpoint the feature recipe needs."""

    unet: "torch.nn.Module"
    vae: "torch.nn.Module"
    scheduler: object
    tokenizer: object
    text_encoder: Optional["torch.nn.Module"]
    name: str


def load_stable_diffusion(name: str = DEFAULT_SD_MODEL, device=None, dtype=None) -> StableDiffusionParts:
    """Load unet, vae, scheduler, tokenizer and text encoder of an SD 1.x/2.x checkpoint."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype) or default_dtype(device)
    name = str(name)
    try:
        unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", **_hub_kwargs(dtype))
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", **_hub_kwargs(dtype))
        # add_noise only needs the beta schedule, identical across DDPM/DDIM/PNDM configs
        scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler")
        tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(
            name, subfolder="text_encoder", **_hub_kwargs(dtype, "transformers")
        )
    except ModelLoadError:
        raise
    except (OSError, ValueError, EnvironmentError) as e:
        raise _explain("Stable Diffusion model", name, e) from e
    except Exception as e:  # huggingface_hub errors derive from several bases
        if type(e).__module__.startswith(("huggingface_hub", "requests", "httpx")):
            raise _explain("Stable Diffusion model", name, e) from e
        raise
    for m in (unet, vae, text_encoder):
        m.to(device).eval().requires_grad_(False)
    check_unet_taps(unet, name)
    return StableDiffusionParts(unet, vae, scheduler, tokenizer, text_encoder, name)


def check_unet_taps(unet, name="unet"):
    ups = unet.up_blocks
    for tap, (b, kind, i) in SD_TAPS.items():
        if b >= len(ups) or len(getattr(ups[b], kind, []) or []) <= i:
            raise ModelLoadError(
                f"UNet of {name!r} has no module up_blocks[{b}].{kind}[{i}] for tap {tap}: "
                "expected an SD 1.x/2.x UNet (UpBlock2D then three CrossAttnUpBlock2D, "
                "at least 2 layers per block)"
            )


def tap_module(unet, tap: str):
    try:
        b, kind, i = SD_TAPS[tap]
    except KeyError:
        raise ValueError(f"unknown SD tap {tap!r}; choose from {list(SD_TAPS)}") from None
    return getattr(unet.up_blocks[b], kind)[i]


def load_dino(name: str = DEFAULT_DINO_MODEL, device=None, dtype=None):
    """Load a DINOv2 backbone (ViT-S/B/L/G, with or without registers)."""
    from transformers import AutoConfig, AutoModel

    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype) or default_dtype(device)
    name = str(name)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=False)
        if config.model_type not in ("dinov2", "dinov2_with_registers"):
            raise ModelLoadError(
                f"{name!r} is a {config.model_type!r} model, not DINOv2 (dinov2 or dinov2_with_registers)"
            )
        model = AutoModel.from_pretrained(
            name, trust_remote_code=False, attn_implementation="sdpa", **_hub_kwargs(dtype, "transformers")
        )
    except ModelLoadError:
        raise
    except (OSError, ValueError, EnvironmentError) as e:
        raise _explain("DINOv2 model", name, e) from e
    except Exception as e:
        if type(e).__module__.startswith(("huggingface_hub", "requests", "httpx")):
            raise _explain("DINOv2 model", name, e) from e
        raise
    model.to(device).eval().requires_grad_(False)
    return model


def dino_num_prefix_tokens(model) -> int:
    """CLS plus register tokens that precede the patch tokens."""
    return 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
