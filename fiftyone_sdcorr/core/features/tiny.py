"""Tiny random SD and DINOv2 checkpoints for offline pipeline checks and tests.

Built from configs with fixed seeds, saved with ``save_pretrained`` in the real layouts,
so that loading goes through exactly the code a Hub id or local directory goes through.
Their features are meaningless; they exist so the pipeline can run without weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def clip_tokenizer_files(path: Path):
    # byte-level BPE alphabet: printable bytes map to themselves, the rest to 256 + i
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16, 16, 32),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=4,
    )


def write_model_index(path) -> None:
    """The diffusers ``model_index.json`` of an SD 1.x checkpoint directory."""
    Path(path, "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "PNDMScheduler"],
            }
        )
    )


def build_tiny_sd(path, seed: int = 0) -> str:
    """A tiny SD 1.x-shaped checkpoint (4 UNet levels, same block types and taps)."""
    from diffusers import AutoencoderKL, PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    if (path / "model_index.json").exists():
        return str(path)
    torch.manual_seed(seed)
    unet = _tiny_unet()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=512,
    )
    vocab_size = clip_tokenizer_files(path / "tokenizer")
    tok = CLIPTokenizer(
        str(path / "tokenizer" / "vocab.json"), str(path / "tokenizer" / "merges.txt"), model_max_length=77
    )
    tok.save_pretrained(str(path / "tokenizer"))
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77,
            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        )
    )
    sched = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
    )
    unet.save_pretrained(str(path / "unet"), safe_serialization=True)
    vae.save_pretrained(str(path / "vae"), safe_serialization=True)
    text.save_pretrained(str(path / "text_encoder"), safe_serialization=True)
    sched.save_pretrained(str(path / "scheduler"))
    write_model_index(path)
    return str(path)


#: channels of the tiny DINOv2's tokens (a tiny adapter takes this many)
TINY_DINO_WIDTH = 32


def build_tiny_dino(path, seed: int = 0, registers: int = 0) -> str:
    """A tiny DINOv2 (patch 14), optionally with register tokens."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    path = Path(path)
    if (path / "config.json").exists():
        return str(path)
    torch.manual_seed(seed)
    kw = dict(hidden_size=TINY_DINO_WIDTH, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              patch_size=14, image_size=56)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
    else:
        model = Dinov2Model(Dinov2Config(**kw))
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def build_tiny_unet(path, seed: int = 1, layout: str = "dir") -> str:
    """A tiny replacement UNet with the architecture of :func:`build_tiny_sd`'s, other weights.

    ``layout="dir"``: a diffusers UNet directory (``config.json`` and
    ``diffusion_pytorch_model.safetensors``); ``"file"``: one ``.safetensors`` state dict
    with diffusers key names (how CleanDIFT ships its UNet). Returns the directory or file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    target = path / "unet.safetensors" if layout == "file" else path
    if (path / "config.json").exists() or (layout == "file" and target.exists()):
        return str(target)
    torch.manual_seed(seed)
    unet = _tiny_unet()
    if layout == "file":
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(target))
    else:
        unet.save_pretrained(str(path), safe_serialization=True)
    return str(target)


def build_tiny_dinov3(path, seed: int = 0, registers: int = 4) -> str:
    """A tiny DINOv3 ViT (transformers ``DINOv3ViTModel``, patch 16, RoPE, layer scale),
    with register tokens like the released checkpoints (4)."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    path = Path(path)
    if (path / "config.json").exists():
        return str(path)
    torch.manual_seed(seed)
    cfg = DINOv3ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=16,
        image_size=64, num_register_tokens=registers, layerscale_value=0.5,
    )
    model = DINOv3ViTModel(cfg)
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def tiny_models(root=None) -> tuple:
    """(sd_dir, dino_dir) of tiny models under ``root`` (default: a cache dir), built once."""
    root = Path(root or os.path.join(os.path.expanduser("~"), ".cache", "fiftyone_sdcorr", "tiny"))
    return build_tiny_sd(root / "sd"), build_tiny_dino(root / "dino")


def save_tiny_adapter(path, dim: int, seed: int = 0) -> str:
    """A tiny random DIY-SC-shaped adapter (:class:`~fiftyone_sdcorr.core.features.adapter.AggregationNetwork`,
    one ``dim``-channel slice to ``dim`` channels, ``dim // 4`` bottleneck), every tensor
    seeded random (GroupNorm affine too, so it is no near-identity), saved as safetensors
    with the shipped file's metadata. ``path``: a ``.safetensors`` file, else a folder that
    gets ``adapter.safetensors``. Returns the file's path. For the tiny DINOv2 of
    :func:`build_tiny_dino`, ``dim`` is its hidden size, 32."""
    from fiftyone_sdcorr.core.features.adapter import AggregationNetwork, default_norm_groups, save_adapter

    dim = int(dim)
    if dim < 4 or dim % 4:
        raise ValueError(f"dim: a multiple of 4 (the bottleneck is dim // 4), got {dim}")
    target = Path(path) if str(path).endswith(".safetensors") else Path(path) / "adapter.safetensors"
    groups = default_norm_groups(dim // 4, dim)
    module = AggregationNetwork(feature_dims=(dim,), projection_dim=dim, num_norm_groups=groups)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in module.state_dict().items():
        noise = torch.randn(t.shape, generator=gen)
        if t.ndim == 4:  # convolution: fan-in scaled
            tensors[name] = noise / (t.shape[1] * t.shape[2] * t.shape[3]) ** 0.5
        elif name.endswith("norm.weight"):
            tensors[name] = 1.0 + 0.5 * noise
        else:  # GroupNorm biases, mixing weights, the temperatures
            tensors[name] = 0.5 * noise
    return save_adapter(tensors, target, source=f"fiftyone_sdcorr save_tiny_adapter(dim={dim}, seed={seed})",
                        licence="Apache-2.0", num_norm_groups=groups)
