"""Instance swapping (the paper's last result): the pure array and tensor parts.

Pure numpy / torch / Pillow (and diffusers for the refinement); no FiftyOne import
(docs/architecture.md, "Layout"). The dataset function
:func:`fiftyone_sdcorr.dataset.swap.swap_instances` reads samples, calls these, writes.

- :func:`swap_region`: every pixel of the target mask takes the colour of its dense match
  (:class:`~fiftyone_sdcorr.core.matching.dense.DenseField`) in the source; every other pixel is
  the target's, exactly.
- :func:`paste`: a region put back into its image at its place.
- :func:`refine_region`: the paper's refinement, an optional Stable Diffusion
  image-to-image pass (or inpainting inside the mask) at a low strength over the swapped
  region, built from already
  loaded components (:class:`~fiftyone_sdcorr.core.features.models.StableDiffusionParts`: no
  second download), seeded (a rerun gives the same pixels), blended back only inside the mask.
- :func:`warp_frames` / :func:`encode_gif`: the warp animation (the paper's GIFs): each
  swapped pixel moves from its place in the source to its place in the target.
"""

from __future__ import annotations

import io
from typing import List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from fiftyone_sdcorr.core.matching.dense import DenseField, warp_image

#: the latent grid of SD's VAE and UNet: a refined region is resized to a multiple of this
REFINE_MULTIPLE = 64


# --------------------------------------------------------------------------- compositing
def as_rgb(image) -> np.ndarray:
    """A PIL image or an array as ``H x W x 3`` uint8."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] < 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 image, got {arr.dtype} {arr.shape}")
    return arr[..., :3]


def swap_region(target, source, field: DenseField, mask, min_confidence: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
    """``(swapped, filled)``: ``target`` (``H x W x 3``) whose pixels inside ``mask``
    (``H x W`` bool) that have a match (valid, confidence at least ``min_confidence``)
    take the colour of their matched pixel in ``source`` (any size); ``filled`` is the
    mask of the pixels that changed source. Every pixel outside ``filled`` is the
    target's, exactly."""
    target, source = as_rgb(target), as_rgb(source)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != target.shape[:2] or field.valid.shape != target.shape[:2]:
        raise ValueError(f"mask {mask.shape} and field {field.valid.shape} must be the target's size "
                         f"{target.shape[:2]}")
    filled = mask & field.valid & (field.confidence >= min_confidence)
    warped = warp_image(field, source)
    return np.where(filled[..., None], warped, target).astype(np.uint8), filled


def paste(image, region, left: int, top: int) -> np.ndarray:
    """A copy of ``image`` with ``region`` at ``(left, top)`` (it must fit)."""
    out = as_rgb(image).copy()
    region = as_rgb(region)
    h, w = region.shape[:2]
    if top < 0 or left < 0 or top + h > out.shape[0] or left + w > out.shape[1]:
        raise ValueError(f"a {w}x{h} region at ({left}, {top}) does not fit a {out.shape[1]}x{out.shape[0]} image")
    out[top:top + h, left:left + w] = region
    return out


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(as_rgb(image)).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- refinement
def refine_shape(width: int, height: int, size: int) -> Tuple[int, int]:
    """The region's size for the SD pass: long side ``size``, both sides multiples of
    :data:`REFINE_MULTIPLE` (at least one)."""
    scale = size / max(width, height)
    return tuple(max(REFINE_MULTIPLE, int(round(v * scale / REFINE_MULTIPLE)) * REFINE_MULTIPLE)
                 for v in (width, height))


#: the refinement passes: an image-to-image pass over the whole region (the paper's), or
#: inpainting inside the mask
REFINE_MODES = ("img2img", "inpaint")


def img2img_pipeline(parts, mode: str = "img2img"):
    """A diffusers ``StableDiffusionImg2ImgPipeline`` (``mode="inpaint"``:
    ``StableDiffusionInpaintPipeline``) from loaded SD components
    (:class:`~fiftyone_sdcorr.core.features.models.StableDiffusionParts`): the same weights, no
    download; a DDIM sampler made from the checkpoint's scheduler config; no safety checker
    (nothing is generated from scratch, a low-strength pass over an existing image). The
    inpainting pipeline works with SD's ordinary 4-channel UNet: at every step diffusers
    puts the (noised) latents of the image back outside the mask, so only the masked part
    is denoised, in the context of the rest."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    if mode not in REFINE_MODES:
        raise ValueError(f"refinement mode must be one of {list(REFINE_MODES)}, got {mode!r}")
    if parts.text_encoder is None:
        raise ValueError("the refinement needs the SD text encoder (it was not loaded)")
    cls = StableDiffusionInpaintPipeline if mode == "inpaint" else StableDiffusionImg2ImgPipeline
    pipe = cls(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=DDIMScheduler.from_config(parts.scheduler.config, clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_inpainting(pipe) -> bool:
    """Whether ``pipe`` takes a mask (an inpainting pipeline)."""
    return type(pipe).__name__.endswith("InpaintPipeline")


def refine_region(pipe, region, mask, *, strength: float, seed: int, steps: int, guidance: float,
                  prompt: str = "", size: int = 512) -> np.ndarray:
    """The paper's refinement of a swapped ``region`` (``H x W x 3`` uint8): an SD
    image-to-image pass at ``strength`` (``steps`` x ``strength`` denoising steps) on the
    region resized to :func:`refine_shape`, resized back, and blended in only inside
    ``mask`` (every other pixel is the region's, exactly). With an inpainting ``pipe``
    (:func:`img2img_pipeline` ``mode="inpaint"``) the SD pass itself denoises only inside
    ``mask`` (given to it at the same size). A CPU generator seeded with ``seed``: a rerun
    on the same device gives the same pixels."""
    region = as_rgb(region)
    mask = np.asarray(mask, dtype=bool)
    h, w = region.shape[:2]
    if not mask.any() or strength <= 0:
        return region.copy()
    rw, rh = refine_shape(w, h, size)
    small = Image.fromarray(region).resize((rw, rh), Image.LANCZOS)
    extra = {}
    if is_inpainting(pipe):
        extra = {"mask_image": Image.fromarray(mask.astype(np.uint8) * 255).resize((rw, rh), Image.NEAREST),
                 "width": rw, "height": rh}
    with torch.inference_mode():
        out = pipe(prompt=prompt, image=small, strength=float(strength), num_inference_steps=int(steps),
                   guidance_scale=float(guidance), generator=torch.Generator("cpu").manual_seed(int(seed)),
                   output_type="np", **extra).images[0]
    refined = (np.clip(np.nan_to_num(out), 0.0, 1.0) * 255).round().astype(np.uint8)
    back = np.asarray(Image.fromarray(refined).resize((w, h), Image.LANCZOS))
    return np.where(mask[..., None], back, region).astype(np.uint8)


# --------------------------------------------------------------------------- animation
def warp_frames(background, start_xy, end_xy, colors, n_frames: int = 16, hold: int = 4) -> List[np.ndarray]:
    """The warp animation on ``background`` (``H x W x 3``, the target image): ``N`` points
    of colour ``colors`` (``N x 3``) move on straight lines from ``start_xy`` to ``end_xy``
    (``N x 2`` pixel positions on the background, x then y) in ``n_frames`` frames (the
    first at the start, the last at the end), the last one shown ``hold`` more times. Each
    point covers a 2x2 pixel square, so a moving object has no pin holes."""
    if n_frames < 2:
        raise ValueError(f"n_frames must be at least 2, got {n_frames}")
    background = as_rgb(background)
    start = np.asarray(start_xy, dtype=np.float64).reshape(-1, 2)
    end = np.asarray(end_xy, dtype=np.float64).reshape(-1, 2)
    colors = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    frames = []
    for i in range(n_frames):
        t = i / (n_frames - 1)
        frames.append(_splat(background, (1 - t) * start + t * end, colors))
    return frames + [frames[-1]] * int(hold)


def _splat(background: np.ndarray, xy: np.ndarray, colors: np.ndarray) -> np.ndarray:
    out = background.copy()
    h, w = out.shape[:2]
    for dx in (0, 1):
        for dy in (0, 1):
            x = np.floor(xy[:, 0]).astype(np.int64) + dx
            y = np.floor(xy[:, 1]).astype(np.int64) + dy
            ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
            out[y[ok], x[ok]] = colors[ok]
    return out


def encode_gif(frames: Sequence[np.ndarray], duration_ms: int = 80) -> bytes:
    """Frames as an endlessly looping GIF (Pillow)."""
    if not frames:
        raise ValueError("no frame to encode")
    images = [Image.fromarray(as_rgb(f)) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(duration_ms), loop=0)
    return buf.getvalue()


def match_positions(field: DenseField, filled, source_size: Tuple[int, int],
                    to_source_image=None, to_target_image=None) -> Tuple[np.ndarray, np.ndarray]:
    """``(start, end)`` normalised image positions of the swapped pixels (those of
    ``filled``, row-major): where each came from in the source (its matched point of a
    ``source_size`` region) and where it lands (its pixel centre in the target region).
    ``to_source_image`` / ``to_target_image`` map region-normalised points into their
    images (an object's crop into its image; default: the region is the image)."""
    ys, xs = np.nonzero(np.asarray(filled, dtype=bool))
    h, w = field.valid.shape
    end = np.stack([(xs + 0.5) / w, (ys + 0.5) / h], axis=-1)
    start = field.source_xy[ys, xs].astype(np.float64)
    start = np.clip(start, 0.0, 1.0 - 0.5 / max(source_size))
    if to_source_image is not None:
        start = to_source_image(start)
    if to_target_image is not None:
        end = to_target_image(end)
    return start, end


__all__ = ["swap_region", "paste", "png_bytes", "as_rgb", "refine_shape", "img2img_pipeline", "refine_region",
           "is_inpainting", "REFINE_MODES",
           "warp_frames", "encode_gif", "match_positions", "REFINE_MULTIPLE"]


def sd_parts_of(extractor):
    """The SD components an extractor computes its features with
    (:class:`~fiftyone_sdcorr.core.features.models.StableDiffusionParts`), or None for a describer
    without them. A :class:`~fiftyone_sdcorr.core.features.extractor.FeatureExtractor` frees its text
    encoder once the fixed prompt is embedded: it is loaded again from the same checkpoint
    (local directory or the Hugging Face cache the extractor loaded from; safetensors only)."""
    from fiftyone_sdcorr.core.features.models import StableDiffusionParts

    if not all(getattr(extractor, a, None) is not None for a in ("unet", "vae", "scheduler", "tokenizer")):
        return None
    name = str(getattr(extractor, "sd_model_name", ""))
    text_encoder = getattr(extractor, "text_encoder", None)
    if text_encoder is None:
        text_encoder = load_text_encoder(name, extractor.vae.device, extractor.vae.dtype)
    return StableDiffusionParts(extractor.unet, extractor.vae, extractor.scheduler, extractor.tokenizer,
                                text_encoder, name)


def load_text_encoder(name: str, device, dtype):
    """The CLIP text encoder of an SD checkpoint (Hub id or directory; safetensors only)."""
    from transformers import CLIPTextModel

    from fiftyone_sdcorr.core.features.models import ModelLoadError

    try:
        model = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", use_safetensors=True, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the text encoder of {name!r} for the refinement: {e}") from e
    return model.to(device).eval().requires_grad_(False)


__all__ += ["sd_parts_of", "load_text_encoder"]
