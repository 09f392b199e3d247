"""Extraction stage of the benchmark: the full-size random models, the FLOP counts, the
matrix-multiply ceiling, the plain (a) and optimised (b) extraction paths, and their
agreement.

No FiftyOne import.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from fiftyone_sdcorr.bench.common import (Clock, fmt_bytes, free_memory, load_config, log, now, peak_mem, rate,
                                          reset_peak)


# ====================================================================== models, images
def default_models_dir() -> Path:
    env = os.environ.get("SDCORR_BENCH_MODELS")
    if env:
        return Path(env)
    return Path(os.path.expanduser("~")) / ".cache" / "fiftyone_sdcorr" / "full-random"


def build_full_models(root=None, init_device=None, seed: int = 0, quiet: bool = False) -> tuple:
    """Full-size SD 1.5 and DINOv2-B checkpoints with random weights, from the bundled
    configs, saved with ``save_pretrained`` (safetensors, fp32) under ``root``.

    Returns ``(sd_dir, dino_dir)``; built once (a ``.complete`` marker guards reuse).
    ``init_device="cuda"`` builds the weights on the GPU (fast random init); they are
    saved to disk either way. The tokenizer is the byte-level stand-in of
    :mod:`fiftyone_sdcorr.core.features.tiny` (the real CLIP vocabulary is not shipped); the text
    encoder runs once per prompt and is never timed.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, Dinov2Config, Dinov2Model

    from fiftyone_sdcorr.core.features.tiny import clip_tokenizer_files, write_model_index

    root = Path(root) if root is not None else default_models_dir()
    sd_dir, dino_dir = root / "sd15", root / "dinov2-base"
    marker = root / ".complete"
    if marker.exists():
        return str(sd_dir), str(dino_dir)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    init_device = torch.device(init_device or "cpu")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(init_device):
        unet = UNet2DConditionModel.from_config(load_config("sd15_unet"))
        unet.save_pretrained(str(sd_dir / "unet"), safe_serialization=True)
        del unet
        vae = AutoencoderKL.from_config(load_config("sd15_vae"))
        vae.save_pretrained(str(sd_dir / "vae"), safe_serialization=True)
        del vae
        vocab = clip_tokenizer_files(sd_dir / "tokenizer")
        tok = CLIPTokenizer(
            str(sd_dir / "tokenizer" / "vocab.json"), str(sd_dir / "tokenizer" / "merges.txt"), model_max_length=77
        )
        tok.save_pretrained(str(sd_dir / "tokenizer"))
        tcfg = load_config("sd15_text_encoder")
        tcfg.pop("architectures", None)
        tcfg.pop("model_type", None)
        tcfg.update(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
        text = CLIPTextModel(CLIPTextConfig(**tcfg))
        text.save_pretrained(str(sd_dir / "text_encoder"), safe_serialization=True)
        del text
        PNDMScheduler.from_config(load_config("sd15_scheduler")).save_pretrained(str(sd_dir / "scheduler"))
        dcfg = load_config("dinov2_base")
        dcfg.pop("architectures", None)
        dcfg.pop("model_type", None)
        dino = Dinov2Model(Dinov2Config(**dcfg))
        dino.save_pretrained(str(dino_dir), safe_serialization=True)
        del dino
    write_model_index(sd_dir)
    marker.write_text(now())
    if init_device.type == "cuda":
        torch.cuda.empty_cache()
    log(f"built full-size random models in {root} ({time.perf_counter() - t0:.1f} s)", quiet)
    return str(sd_dir), str(dino_dir)


def bench_images(n: int, seed: int = 0) -> list:
    """``n`` RGB photos of varied sizes (scikit-image's sample photos where installed,
    else smooth synthetic images), deterministic."""
    from PIL import Image

    photos = []
    try:
        from skimage import data as skd

        for name in ("chelsea", "coffee", "astronaut", "rocket", "cat", "immunohistochemistry"):
            try:
                arr = getattr(skd, name)()
            except Exception:  # noqa: BLE001 - a missing photo is fine
                continue
            if arr.ndim == 3 and arr.shape[2] == 3:
                photos.append(Image.fromarray(arr))
    except Exception:  # noqa: BLE001 - scikit-image is optional here
        photos = []
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if photos:
            im = photos[i % len(photos)]
            if (i // len(photos)) % 2:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            w, h = [(640, 480), (480, 640), (512, 512), (800, 450)][i % 4]
            yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
            f = rng.uniform(2, 9, size=(3, 2))
            arr = np.stack([np.sin(f[c, 0] * xx * 6.3 + f[c, 1] * yy * 6.3) for c in range(3)], -1)
            arr = ((arr + 1) * 127.5).astype(np.uint8)
            im = Image.fromarray(arr)
        out.append(im)
    return out


# ====================================================================== FLOPs
class _Stop(Exception):
    pass


def _count(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        try:
            fn()
        except _Stop:
            pass
    return int(fc.get_total_flops())


def count_flops(unet_config, vae_config, dino_model, recipe) -> dict:
    """FLOPs per image and per stage of a recipe, counted with FlopCounterMode on meta
    tensors of the same architectures (exact shapes, nothing computed).

    A multiply-add counts 2 FLOPs. Attention (SDPA) is counted.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from fiftyone_sdcorr.core.features import models as _models

    offs = recipe.tile_offsets()
    tiled = recipe.sd_mode == "tiled" and len(offs) > 1
    tile = recipe.sd_tile if tiled else recipe.sd_size
    n_tiles = len(offs) ** 2 if tiled else 1
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
        vae = AutoencoderKL.from_config(dict(vae_config))
        dino = type(dino_model)(dino_model.config)
    unet.eval()
    vae.eval()
    dino.eval()
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    lat = tile // f
    x = torch.empty(1, 3, tile, tile, device="meta")
    z = torch.empty(1, int(unet.config.in_channels), lat, lat, device="meta")
    t = torch.full((1,), recipe.timestep, dtype=torch.long, device="meta")
    emb = torch.empty(1, 77, int(unet.config.cross_attention_dim), device="meta")
    px = torch.empty(1, 3, recipe.dino_size, recipe.dino_size, device="meta")
    with torch.no_grad():
        vae_f = _count(lambda: vae.encode(x).latent_dist.mean)
        unet_full = _count(lambda: unet(z, t, encoder_hidden_states=emb))
        taps = [k for k in _models.SD_TAPS if k in recipe.taps]

        def stop(*_):
            raise _Stop

        h = _models.tap_module(unet, taps[-1]).register_forward_hook(stop)
        try:
            unet_trunc = _count(lambda: unet(z, t, encoder_hidden_states=emb))
        finally:
            h.remove()
        dino_f = _count(lambda: dino(pixel_values=px, output_hidden_states=True))
    return {
        "method": "torch.utils.flop_counter.FlopCounterMode on meta tensors; multiply-add = 2 FLOPs",
        "tile": tile,
        "tiles_per_image": n_tiles,
        "vae_encoder_per_tile": vae_f,
        "unet_to_last_tap_per_tile": unet_trunc,
        "unet_full_per_tile": unet_full,
        "dino_per_image": dino_f,
        "sd_per_image_optimised": n_tiles * (vae_f + unet_trunc),
        "sd_per_image_plain": n_tiles * (vae_f + unet_full),
        "optimised_per_image": n_tiles * (vae_f + unet_trunc) + dino_f,
        "plain_per_image": n_tiles * (vae_f + unet_full) + dino_f,
    }


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, reps: int = 10, tf32: bool = False) -> dict:
    """Measured dense matrix-multiply rate of the device: ``n x n @ n x n`` in ``dtype``."""
    old = torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None
    try:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        with Clock(device) as c:
            for _ in range(reps):
                a @ b
        flops = 2.0 * n**3 * reps
        return {"n": n, "reps": reps, "dtype": str(dtype).replace("torch.", "") + ("+tf32" if tf32 else ""),
                "tflops": flops / c.seconds / 1e12}
    finally:
        if old is not None:
            torch.backends.cuda.matmul.allow_tf32 = old


# ====================================================================== extractor set-ups
def make_extractor(sd_dir, dino_dir, device, dtype, batch_size, recipe_kw: dict, channels_last: bool = False):
    from fiftyone_sdcorr.core.features.extractor import FeatureExtractor

    return FeatureExtractor(sd_dir, dino_dir, device=device, dtype=dtype, batch_size=batch_size,
                            channels_last=channels_last, **recipe_kw)


def set_plain_attention(ext) -> dict:
    """Classic attention everywhere (the reference code's era, before SDPA)."""
    used = {}
    try:
        from diffusers.models.attention_processor import AttnProcessor

        ext.unet.set_attn_processor(AttnProcessor())
        ext.vae.set_attn_processor(AttnProcessor())
        used["sd"] = "AttnProcessor (classic, bmm + softmax)"
    except Exception as e:  # noqa: BLE001 - record what could be set
        used["sd"] = f"default ({type(e).__name__}: {e})"
    try:
        ext.dino.set_attn_implementation("eager")
        used["dino"] = "eager"
    except Exception as e:  # noqa: BLE001
        used["dino"] = f"{getattr(ext.dino.config, '_attn_implementation', '?')} ({type(e).__name__})"
    return used


def attention_in_use(ext) -> dict:
    procs = {type(p).__name__ for p in ext.unet.attn_processors.values()}
    return {"sd": sorted(procs), "dino": getattr(ext.dino.config, "_attn_implementation", None)}


def compile_extractor(ext, mode: Optional[str] = None) -> dict:
    """``FeatureExtractor.compile_models``: the product's compiled path, not a bench copy."""
    return {"compiled": True, **ext.compile_models(mode)}


def _weights_bytes(*modules) -> int:
    return int(sum(p.numel() * p.element_size() for m in modules for p in m.parameters()))


# ====================================================================== extraction paths
def plain_extract(ext, images) -> list:
    """The plain recipe: per image, per tile one VAE + full UNet forward (hooks record the
    taps), overlaps averaged, maps copied to the host; DINO one image at a time."""
    from fiftyone_sdcorr.core.features.fusion import RawFeatures

    out = []
    for im in images:
        prep = ext.prepare([im])
        sd = ext._sd_features(prep["sd"], prep["prompts"], tiles_per_pass=1, full_forward=True)[0]
        dino = ext.dino_tokens(prep["dino"])[0]
        out.append(RawFeatures(sd={k: v.cpu() for k, v in sd.items()}, dino=dino.cpu(),
                               sd_letterbox=prep["sd_letterboxes"][0], dino_letterbox=prep["dino_letterboxes"][0],
                               dino_stride=ext.dino_stride))
    return out


def staged_extract(ext, images) -> tuple:
    """What ``FeatureExtractor.extract`` does for one batch (``prepare``, the models, the
    copy to the host), with a synced clock per stage:
    ``(raws, {"preprocess": s, "sd": s, "dino": s, "to_host": s})``."""
    from fiftyone_sdcorr.core.features.extractor import to_host
    from fiftyone_sdcorr.core.features.fusion import RawFeatures

    dev = ext.device
    times = {}
    with Clock(dev) as c:
        prep = ext.prepare(images)
    times["preprocess"] = c.seconds
    with Clock(dev) as c:  # a method without SD: none
        sd_maps = ext._sd_features(prep["sd"], prep["prompts"]) if ext.uses_sd else [{} for _ in images]
    times["sd"] = c.seconds
    with Clock(dev) as c:
        dino = ext.dino_tokens(prep["dino"])
    times["dino"] = c.seconds
    with Clock(dev) as c:
        raws = [
            to_host(RawFeatures(sd=sd_maps[i], dino=dino[i], sd_letterbox=prep["sd_letterboxes"][i],
                                dino_letterbox=prep["dino_letterboxes"][i], dino_stride=ext.dino_stride))
            for i in range(len(images))
        ]
    times["to_host"] = c.seconds
    return raws, times


def _timed(device, fn) -> tuple:
    reset_peak(device)
    with Clock(device) as c:
        out = fn()
    return out, c.seconds, peak_mem(device)


def _figures(n_images, seconds, peak, flops_per_image, ceiling_tflops) -> dict:
    ips = rate(n_images, seconds)
    d = {
        "images": int(n_images),
        "seconds": float(seconds),
        "images_per_s": ips,
        "s_per_image": float(seconds / n_images) if n_images else None,
        "peak_mem_bytes": peak,
        "flops_per_image": int(flops_per_image),
    }
    d["achieved_tflops"] = ips * flops_per_image / 1e12 if ips else None
    d["matmul_ceiling_tflops"] = ceiling_tflops
    d["fraction_of_matmul"] = (
        d["achieved_tflops"] / ceiling_tflops if d["achieved_tflops"] and ceiling_tflops else None
    )
    return d


# ====================================================================== agreement
def agreement(raws_ref, raws_test, pca_dim: int, alpha: float) -> dict:
    """Fused descriptors of the same images from two paths (one projection, fitted on the
    reference): per-token cosine over tokens on the image, and the percentage of equal
    nearest neighbours for every on-image token of image i matched into image i+1."""
    from fiftyone_sdcorr.core.matching.correspondence import match_points
    from fiftyone_sdcorr.core.features.fusion import FixedProjection, fuse_raw

    n = len(raws_ref)
    proj = FixedProjection.fit([r.sd for r in raws_ref], dim=pca_dim)
    fa = [fuse_raw(r, proj, alpha=alpha) for r in raws_ref]
    fb = [fuse_raw(r, proj, alpha=alpha) for r in raws_test]
    cos_all = []
    for a, b in zip(fa, fb):
        m = a.valid_mask().reshape(-1)
        da = a.descriptors.reshape(a.descriptors.shape[0], -1)[:, m].float()
        db = b.descriptors.reshape(b.descriptors.shape[0], -1)[:, m].float()
        cos_all.append(torch.nn.functional.cosine_similarity(da, db, dim=0))
    cos = torch.cat(cos_all)
    equal = total = 0
    pairs = 0
    if n >= 2:
        for i in range(n):
            j = (i + 1) % n
            if j == i:
                continue
            src_mask = fa[i].valid_mask()
            rows, cols = torch.nonzero(src_mask, as_tuple=True)
            tokens = torch.stack([cols, rows], dim=1)
            ma = match_points(fa[i], fa[j], tokens, cycle=False)
            mb = match_points(fb[i], fb[j], tokens, cycle=False)
            equal += int((ma.tokens == mb.tokens).all(dim=1).sum())
            total += int(tokens.shape[0])
            pairs += 1
    branch = {}
    for tap in raws_ref[0].sd:
        c = [torch.nn.functional.cosine_similarity(a.sd[tap].flatten(1).float(), b.sd[tap].flatten(1).float(), dim=0)
             for a, b in zip(raws_ref, raws_test)]
        branch[f"sd_{tap}"] = float(torch.cat(c).mean())
    c = [torch.nn.functional.cosine_similarity(a.dino.flatten(1).float(), b.dino.flatten(1).float(), dim=0)
         for a, b in zip(raws_ref, raws_test)]
    branch["dino"] = float(torch.cat(c).mean())
    return {
        "images": n,
        "raw_cosine_mean": branch,
        "tokens": int(cos.numel()),
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "cosine_p01": float(torch.quantile(cos.double(), 0.01)),
        "pairs": pairs,
        "nn_points": total,
        "nn_equal_pct": 100.0 * equal / total if total else None,
        "note": "random weights: agreement of the optimised path with the plain fp32 path on the same images",
    }


def fused_for_store(raws, recipe) -> list:
    from fiftyone_sdcorr.core.features.fusion import FixedProjection, fuse_raw

    proj = FixedProjection.fit([r.sd for r in raws], dim=recipe.pca_dim)
    return [fuse_raw(r, proj, alpha=recipe.alpha) for r in raws]

# ====================================================================== the extraction steps of run_bench
def measure_ceilings(device: torch.device, tiny: bool) -> dict:
    """The matmul rates that achieved TFLOP/s are compared with (bf16, fp32; on CUDA also
    fp16 and tf32)."""
    big = device.type == "cuda"
    ceil = {
        "bf16": matmul_rate(device, torch.bfloat16, 8192 if big else (256 if tiny else 1024), reps=10 if big else 3),
        "fp32": matmul_rate(device, torch.float32, 8192 if big else (256 if tiny else 1024), reps=10 if big else 3),
    }
    if big:
        ceil["fp16"] = matmul_rate(device, torch.float16, 8192)
        ceil["tf32"] = matmul_rate(device, torch.float32, 8192, tf32=True)
    return ceil


def bench_plain(result: dict, models: tuple, device, rkw: dict, images: list, n_plain: int, args,
                quiet: bool) -> tuple:
    """(a) the plain recipe: fp32, batch 1, one tile per call, full UNet, classic attention.

    Also counts the FLOPs and measures the matmul ceilings (``result["settings"]["recipe"]``,
    ``result["flops"]``, ``result["matmul"]`` are set). Returns ``(plain figures, raws)``."""
    sd_dir, dino_dir = models
    log(f"plain recipe: loading fp32 models on {device}", quiet)
    ext = make_extractor(sd_dir, dino_dir, device, torch.float32, 1, rkw)
    result["settings"]["recipe"] = ext.recipe.to_dict()
    flops = count_flops(ext.unet.config, ext.vae.config, ext.dino, ext.recipe)
    result["flops"] = flops
    log(f"FLOPs/image: optimised {flops['optimised_per_image'] / 1e12:.3f} T, plain {flops['plain_per_image'] / 1e12:.3f} T", quiet)
    ceil = measure_ceilings(device, args.tiny)
    result["matmul"] = ceil
    plain_attn = set_plain_attention(ext)
    weights_fp32 = _weights_bytes(ext.unet, ext.vae, ext.dino)
    log(f"plain recipe: warm-up, then {n_plain} images, one tile per call, full UNet", quiet)
    if args.warmup:
        plain_extract(ext, images[:1])
    raws_plain, secs, peak = _timed(device, lambda: plain_extract(ext, images[:n_plain]))
    plain = _figures(n_plain, secs, peak, flops["plain_per_image"], ceil["fp32"]["tflops"])
    plain.update(dtype="float32", batch=1, tiles_per_call=1, full_forward=True, attention=plain_attn,
                 channels_last=False, compiled=False, weights_bytes=weights_fp32,
                 ceiling_dtype="fp32 (TF32 convolutions follow torch defaults; see environment)")
    log(f"plain: {plain['images_per_s']:.4g} images/s", quiet)
    ext = None  # drop the last reference before freeing: (b) must not see (a)'s weights
    free_memory()
    return plain, raws_plain


def _time_batch(ext, device, b: int, images: list, flops: dict, ceiling: float, common: dict, args,
                quiet: bool) -> dict:
    """One batch size of the optimised path: warm-up, whole batches timed, one batch
    staged; ``{"batch", "error"}`` when CUDA runs out of memory."""
    ext.batch_size = b
    n = max(args.images, b)
    n = int(math.ceil(n / b) * b)  # whole batches only: no odd-sized (recompiled) tail
    imgs = [images[i % len(images)] for i in range(n)]
    log(f"optimised: batch {b} ({b * flops['tiles_per_image']} tiles per UNet call), warm-up x{max(1, args.warmup)}, then {n} images", quiet)
    try:
        with Clock(device) as cw:
            for _ in range(max(1, args.warmup)):
                ext.extract(imgs[:b])
        _, secs, peak = _timed(device, lambda: ext.extract(imgs))
    except torch.cuda.OutOfMemoryError as e:
        free_memory()
        return {"batch": b, "error": f"CUDA out of memory: {e}"[:300]}
    fig = _figures(n, secs, peak, flops["optimised_per_image"], ceiling)
    reset_peak(device)
    _, stages = staged_extract(ext, imgs[:b])
    fig.update(batch=b, tiles_per_call=b * flops["tiles_per_image"], dtype=common["dtype"],
               full_forward=False, attention=common["attention"], channels_last=args.channels_last,
               compiled=common["compiled"], weights_bytes=common["weights_bytes"], warmup_seconds=cw.seconds,
               stages_one_batch_s=stages, effective_batch_size=ext.batch_size,
               # the models alone (SD + DINO stages, no image decoding / letterboxing):
               # what overlapping the CPU preprocessing with the device would approach
               models_only_images_per_s=rate(b, stages["sd"] + stages["dino"]),
               preprocess_ms_per_image=1e3 * stages["preprocess"] / b)
    log(f"optimised batch {b}: {fig['images_per_s']:.4g} images/s, peak {fmt_bytes(peak)}", quiet)
    return fig


def bench_optimised(models: tuple, device, opt_dtype, rkw: dict, images: list, batches: List[int], flops: dict,
                    ceil: dict, n_agree: int, args, quiet: bool) -> tuple:
    """(b) the optimised path, one entry per batch size; then the agreement images
    extracted at the smallest batch that ran. Returns ``(runs, raws, fused maps for the
    store benchmark, recipe)``."""
    sd_dir, dino_dir = models
    log(f"optimised path: loading {opt_dtype} models", quiet)
    ext = make_extractor(sd_dir, dino_dir, device, opt_dtype, batches[0], rkw,
                         channels_last=args.channels_last)
    comp = compile_extractor(ext, args.compile_mode) if args.compile else {"compiled": False}
    common = {"dtype": str(opt_dtype).replace("torch.", ""), "attention": attention_in_use(ext), "compiled": comp,
              "weights_bytes": _weights_bytes(ext.unet, ext.vae, ext.dino)}
    ceil_key = "bf16" if opt_dtype == torch.bfloat16 else ("fp16" if opt_dtype == torch.float16 else "fp32")
    ceiling = ceil.get(ceil_key, ceil["bf16"])["tflops"]
    runs = [_time_batch(ext, device, b, images, flops, ceiling, common, args, quiet) for b in batches]
    # agreement on the plain images, from the optimised path (smallest batch that ran)
    ext.batch_size = min(r["batch"] for r in runs if "error" not in r) if any("error" not in r for r in runs) else 1
    raws_opt = ext.extract(images[:n_agree])
    recipe = ext.recipe
    store_fused = fused_for_store(raws_opt, recipe)
    ext = None
    free_memory()
    return runs, raws_opt, store_fused, recipe


def summarise_extraction(plain: dict, runs: list, raws_plain: list, raws_opt: list, n_agree: int, recipe,
                         mem_cap_gb: float) -> dict:
    """The ``extraction`` entry: both paths, the chosen batch (fastest within the memory
    cap), the speedup (b)/(a) and the agreement of (b) with (a)."""
    # a batch that FeatureExtractor halved after running out of memory is not chosen
    ok = [r for r in runs if "error" not in r and r["effective_batch_size"] == r["batch"]]
    cap = mem_cap_gb * 1e9
    within = [r for r in ok if r["peak_mem_bytes"] is None or r["peak_mem_bytes"] <= cap]
    best = max(within or ok, key=lambda r: r["images_per_s"]) if ok else None
    for r in runs:
        r["within_mem_cap"] = any(r is w for w in within)
    return {
        "plain": plain,
        "optimised": runs,
        "chosen_batch": best["batch"] if best else None,
        "chosen_rule": f"fastest batch with peak memory <= {mem_cap_gb:g} GB (fastest overall when none fits)",
        "speedup": (best["images_per_s"] / plain["images_per_s"]) if best and plain["images_per_s"] else None,
        "agreement": agreement(raws_plain[:n_agree], raws_opt, recipe.pca_dim, recipe.alpha),
    }
