"""Load Stable Diffusion (diffusers layout) and DINOv2 / DINOv3 (transformers layout).

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

#: transformers ``model_type`` of the DINO backbones we load: DINOv2 (patch 14), DINOv2 with
#: registers (patch 14) and DINOv3 ViT (patch 16, CLS + register tokens, RoPE)
DINO_MODEL_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit")

#: Feature taps: paper layer name -> (up block index, sub-module kind, index).
#: ODISE records the hidden state entering decoder block k: for SD 1.x/2.x in
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


def _diffusers_errors(kind: str, name: str, fn):
    """Run ``fn``; missing or unreachable weights become one :class:`ModelLoadError`."""
    try:
        return fn()
    except ModelLoadError:
        raise
    except (OSError, ValueError, EnvironmentError) as e:
        raise _explain(kind, name, e) from e
    except Exception as e:  # huggingface_hub errors derive from several bases
        if type(e).__module__.startswith(("huggingface_hub", "requests", "httpx")):
            raise _explain(kind, name, e) from e
        raise


def load_stable_diffusion(
    name: str = DEFAULT_SD_MODEL, device=None, dtype=None, unet_model: Optional[str] = None
) -> StableDiffusionParts:
    """Load unet, vae, scheduler, tokenizer and text encoder of an SD 1.x/2.x checkpoint.

    ``unet_model`` replaces the checkpoint's UNet (e.g. CleanDIFT's SD 1.5 UNet); see
    :func:`load_unet` for the forms it takes. VAE, text encoder, tokenizer and scheduler
    still come from ``name``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype) or default_dtype(device)
    name = str(name)

    def parts():
        unet = None
        if unet_model is None or _is_state_dict_file(unet_model):
            unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", **_hub_kwargs(dtype))
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", **_hub_kwargs(dtype))
        # add_noise only needs the beta schedule, identical across DDPM/DDIM/PNDM configs
        scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler")
        tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(
            name, subfolder="text_encoder", **_hub_kwargs(dtype, "transformers")
        )
        return unet, vae, scheduler, tokenizer, text_encoder

    unet, vae, scheduler, tokenizer, text_encoder = _diffusers_errors("Stable Diffusion model", name, parts)
    if unet_model is not None:
        unet = load_unet(unet_model, dtype=dtype, base_unet=unet)
        _check_unet_fits(unet, vae, text_encoder, str(unet_model), name)
    for m in (unet, vae, text_encoder):
        m.to(device).eval().requires_grad_(False)
    check_unet_taps(unet, str(unet_model) if unet_model is not None else name)
    return StableDiffusionParts(unet, vae, scheduler, tokenizer, text_encoder, name)


def _is_state_dict_file(name) -> bool:
    return str(name).endswith(".safetensors")


def _unet_subfolder(name: str) -> Optional[str]:
    """``None`` when the UNet config sits at the root of a local directory, ``"unet"``
    when it sits in a ``unet/`` subfolder (a full SD checkpoint)."""
    if os.path.isfile(os.path.join(name, "config.json")):
        return None
    if os.path.isfile(os.path.join(name, "unet", "config.json")):
        return "unet"
    return None


def load_unet(name: str, device=None, dtype=None, base_unet=None):
    """A replacement SD UNet (``UNet2DConditionModel``, diffusers layout, safetensors only).

    ``name`` is one of:

    - a local directory or Hub id holding ``config.json`` and
      ``diffusion_pytorch_model.safetensors`` at its root, or in a ``unet/`` subfolder
      (a full SD checkpoint whose UNet is borrowed);
    - a ``.safetensors`` file with a diffusers-named UNet state dict for the base
      checkpoint's architecture (``base_unet``), given as a local path or as
      ``owner/repo/path/in/repo.safetensors`` on the Hub; this is how CleanDIFT ships its
      SD 1.5 UNet (``CompVis/cleandift/cleandift_sd15_unet.safetensors``). The state dict
      must match the base UNet key for key (strict load).
    """
    from diffusers import UNet2DConditionModel

    name = str(name)
    dtype = resolve_dtype(dtype)
    if _is_state_dict_file(name):
        if base_unet is None:
            raise ValueError(f"a UNet state dict file ({name!r}) needs the base checkpoint's UNet (base_unet)")

        def state_dict():
            from safetensors.torch import load_file

            path = name
            if not os.path.isfile(path):
                parts = name.split("/")
                if len(parts) < 3:
                    raise FileNotFoundError(f"no such file {name!r} (a Hub file is owner/repo/file.safetensors)")
                from huggingface_hub import hf_hub_download

                path = hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))
            return load_file(path)

        sd = _diffusers_errors("replacement UNet", name, state_dict)
        try:
            base_unet.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ModelLoadError(
                f"UNet weights {name!r} do not fit the base checkpoint's UNet architecture: {e}"
            ) from e
        unet = base_unet
    else:
        def from_dir_or_hub():
            kw = _hub_kwargs(dtype)
            if os.path.isdir(name):
                return UNet2DConditionModel.from_pretrained(name, subfolder=_unet_subfolder(name), **kw)
            try:
                return UNet2DConditionModel.from_pretrained(name, **kw)
            except (OSError, EnvironmentError):
                return UNet2DConditionModel.from_pretrained(name, subfolder="unet", **kw)

        unet = _diffusers_errors("replacement UNet", name, from_dir_or_hub)
    if dtype is not None:
        unet.to(dtype)
    if device is not None:
        unet.to(torch.device(device))
    return unet.eval().requires_grad_(False)


def _check_unet_fits(unet, vae, text_encoder, unet_name: str, sd_name: str):
    lat = int(vae.config.latent_channels)
    ctx = int(text_encoder.config.hidden_size)
    if int(unet.config.in_channels) != lat:
        raise ModelLoadError(
            f"UNet {unet_name!r} takes {unet.config.in_channels} input channels but the VAE of "
            f"{sd_name!r} makes {lat}-channel latents"
        )
    cross = unet.config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    if int(cross) != ctx:
        raise ModelLoadError(
            f"UNet {unet_name!r} expects {cross}-dim text embeddings but the text encoder of "
            f"{sd_name!r} makes {ctx}-dim ones"
        )


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
    """Load a DINO backbone: DINOv2 (ViT-S/B/L/G, with or without registers) or DINOv3 ViT
    (``DINOv3ViTModel``, patch 16), transformers layout."""
    from transformers import AutoConfig, AutoModel

    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype) or default_dtype(device)
    name = str(name)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=False)
        if config.model_type not in DINO_MODEL_TYPES:
            raise ModelLoadError(
                f"{name!r} is a {config.model_type!r} model, not DINOv2 or DINOv3 ViT "
                f"({', '.join(DINO_MODEL_TYPES)})"
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
    """CLS plus register tokens that precede the patch tokens (DINOv2, DINOv2 with
    registers and DINOv3 ViT all order them CLS, registers, patches)."""
    return 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)


def dino_patch_size(model) -> int:
    """The patch size (token stride) of a DINO backbone: 14 for DINOv2, 16 for DINOv3."""
    ps = model.config.patch_size
    if isinstance(ps, (list, tuple)):
        if len(set(int(p) for p in ps)) != 1:
            raise ModelLoadError(f"non-square patches {tuple(ps)} are not supported")
        ps = ps[0]
    return int(ps)


def dino_layers(model):
    """The transformer layers (an ``nn.ModuleList``) of a DINOv2 (``encoder.layer``) or
    DINOv3 ViT (``layer``) backbone."""
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layer", None) if encoder is not None else getattr(model, "layer", None)
    if layers is None:
        raise ModelLoadError(f"cannot find the transformer layers of {type(model).__name__}")
    return layers
