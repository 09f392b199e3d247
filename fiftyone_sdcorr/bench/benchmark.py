"""Benchmarks: extraction, matching and feature-store speed, against the plain recipe.

``python -m fiftyone_sdcorr bench`` runs everything in one process, on one device, and
writes one JSON file (schema ``sdcorr-bench/1``, see ``results/README.md``):

- **extraction** at the paper recipe with the *full-size* architectures (SD 1.5 UNet and
  VAE, DINOv2-B) built from the configs in ``fiftyone_sdcorr/configs`` with random
  weights (speed does not depend on weight values), saved with ``save_pretrained`` and
  loaded through :class:`~fiftyone_sdcorr.core.extractor.FeatureExtractor`, i.e. the real
  loading path:

  (a) *plain*: fp32, one tile per UNet call, the full UNet forward with hooks
      (``unet_taps(..., full_forward=True)``), classic (non-SDPA) attention, batch 1;
  (b) *optimised*: bf16 (or fp16), the tiles of several images in one call, the UNet
      stopped after the last tap, SDPA attention, channels-last, optionally
      ``torch.compile``; one entry per batch size asked for.

  Both in the same run, with the ratio (b)/(a), peak memory, FLOPs per image per stage
  (``torch.utils.flop_counter.FlopCounterMode`` on meta tensors of the same
  architectures: exact shapes, no compute), achieved TFLOP/s against a measured matrix
  multiply of the same device, and the agreement of (b) with (a): cosine similarity of
  the fused descriptors per token and the percentage of equal nearest neighbours.
- **matching**: targets/s and keypoints/s with features read back from a
  :class:`~fiftyone_sdcorr.core.store.FeatureStore`, vectorised
  :func:`~fiftyone_sdcorr.core.correspondence.match_points` against the per-token loop
  :func:`~fiftyone_sdcorr.bench.reference.match_points_loop`, same run, with the ratio.
- **store**: bytes per sample, write and read rates.

``--tiny`` runs the same code with tiny random models (:mod:`fiftyone_sdcorr.core.tiny`) and a
small recipe on the CPU in seconds; it proves the command and its JSON, it is not a speed
claim. ``--cpu-preset`` measures the cost per image of the paper recipe and of
``PRESETS["cpu"]`` on the CPU with the full-size models (batch 1, fp32).

No FiftyOne import.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

SCHEMA = "sdcorr-bench/1"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: Issue-5 targets (one H100, paper recipe).
TARGETS = {
    "images_per_s": 30.0,
    "end_to_end_images_per_s": 30.0,
    "end_to_end_peak_mem_bytes": 8e9,
    "end_to_end_speedup_vs_plain": 8.0,
    "speedup_vs_plain": 8.0,
    "peak_mem_bytes": 8e9,
    "bf16_nn_equal_pct": 99.0,
    "matching_speedup_cpu": 100.0,
    "propagation_targets_per_s": 500.0,
}
#: The small recipe of ``--tiny`` (tiled, 4 overlapping tiles, 8x8 DINO grid).
TINY_RECIPE = dict(sd_size=192, sd_mode="tiled", sd_tile=128, dino_size=112)


# ====================================================================== small helpers
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Wall-clock seconds with a device sync at both ends."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.seconds = 0.0

    def __enter__(self):
        _sync(self.device)
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.seconds += time.perf_counter() - self._t
        return False


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def _rss_peak_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _rate(count: float, seconds: float) -> Optional[float]:
    return float(count / seconds) if seconds > 0 else None


# ====================================================================== configs & models
def load_config(name: str) -> dict:
    """A bundled architecture config (``configs/<name>.json``) without ``_``-keys."""
    path = CONFIG_DIR / (name if name.endswith(".json") else f"{name}.json")
    d = json.loads(path.read_text())
    return {k: v for k, v in d.items() if not k.startswith("_")}


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
    :mod:`fiftyone_sdcorr.core.tiny` (the real CLIP vocabulary is not shipped); the text
    encoder runs once per prompt and is never timed.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, Dinov2Config, Dinov2Model

    from fiftyone_sdcorr.core.tiny import clip_tokenizer_files, write_model_index

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
    marker.write_text(_now())
    if init_device.type == "cuda":
        torch.cuda.empty_cache()
    _log(f"built full-size random models in {root} ({time.perf_counter() - t0:.1f} s)", quiet)
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


# ====================================================================== environment
def environment(device: torch.device) -> dict:
    import diffusers
    import transformers

    env = {
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    env["cpu_name"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.type == "cpu":
        env["device_name"] = f"CPU {env.get('cpu_name', env['device_name'])} ({os.cpu_count()} cores)"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=torch.cuda.get_device_name(device),
            gpu_memory_bytes=int(props.total_memory),
            gpu_multiprocessors=int(props.multi_processor_count),
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=bool(torch.cuda.is_bf16_supported()),
            allow_tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32),
            allow_tf32_cudnn=bool(torch.backends.cudnn.allow_tf32),
            cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
        )
    return env


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

    from fiftyone_sdcorr.core import models as _models

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
        with _Clock(device) as c:
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
    from fiftyone_sdcorr.core.extractor import FeatureExtractor

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
    from fiftyone_sdcorr.core.features import RawFeatures

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
    from fiftyone_sdcorr.core.extractor import to_host
    from fiftyone_sdcorr.core.features import RawFeatures

    dev = ext.device
    times = {}
    with _Clock(dev) as c:
        prep = ext.prepare(images)
    times["preprocess"] = c.seconds
    with _Clock(dev) as c:
        sd_maps = ext._sd_features(prep["sd"], prep["prompts"])
    times["sd"] = c.seconds
    with _Clock(dev) as c:
        dino = ext.dino_tokens(prep["dino"])
    times["dino"] = c.seconds
    with _Clock(dev) as c:
        raws = [
            to_host(RawFeatures(sd=sd_maps[i], dino=dino[i], sd_letterbox=prep["sd_letterboxes"][i],
                                dino_letterbox=prep["dino_letterboxes"][i], dino_stride=ext.dino_stride))
            for i in range(len(images))
        ]
    times["to_host"] = c.seconds
    return raws, times


def _timed(device, fn) -> tuple:
    _reset_peak(device)
    with _Clock(device) as c:
        out = fn()
    return out, c.seconds, _peak(device)


def _figures(n_images, seconds, peak, flops_per_image, ceiling_tflops) -> dict:
    ips = _rate(n_images, seconds)
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
    from fiftyone_sdcorr.core.correspondence import match_points
    from fiftyone_sdcorr.core.features import FixedProjection, fuse_raw

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


# ====================================================================== matching & store
class _Scaled:
    """A duration derived from a measured one (see the loop baseline)."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)


def _compact_store_options(store, fused: list) -> dict:
    """Bytes per sample of each store dtype, and how many nearest neighbours (every image
    token of one image matched into the next, cosine) equal those of the float32 maps."""
    from fiftyone_sdcorr.core.correspondence import Prepared
    from fiftyone_sdcorr.core.features import FusedFeatures
    from fiftyone_sdcorr.core.store import STORE_DTYPES, stored_values

    def nn(x, y):
        px, py = Prepared.of(x), Prepared.of(y)
        return (px.unit.T[px.mask] @ py.unit).masked_fill(~py.mask[None], float("-inf")).argmax(dim=1)

    pairs = [(fused[i], fused[(i + 1) % len(fused)]) for i in range(min(4, len(fused)))] if len(fused) > 1 else []
    out = {}
    for name, dt in STORE_DTYPES.items():
        nbytes = store.bytes_per_sample(store.save(f"compact-{name}", fused[0], dtype=dt))
        q = lambda f: FusedFeatures(stored_values(f.descriptors, dt), f.letterbox, f.stride, f.sd_channels)  # noqa: E731
        same = [float((nn(a, b) == nn(q(a), q(b))).float().mean()) for a, b in pairs]
        out[name] = {"bytes_per_sample": int(nbytes),
                     "nn_equal_to_float32": (sum(same) / len(same)) if same else None}
    return out


def bench_store_and_matching(fused: list, device: torch.device, keypoints: int, targets: int,
                             seed: int = 0, quiet: bool = False) -> tuple:
    """Save ``targets`` feature files (copies of ``fused`` under distinct keys), read
    them back, and match ``keypoints`` source tokens into every target."""
    from fiftyone_sdcorr.core.correspondence import match_points
    from fiftyone_sdcorr.bench.reference import match_points_loop
    from fiftyone_sdcorr.core.store import FeatureStore

    tmp = Path(tempfile.mkdtemp(prefix="sdcorr-bench-store."))
    try:
        store = FeatureStore(tmp)
        keys = [f"bench{i:05d}" for i in range(targets)]
        with _Clock("cpu") as cw:
            for i, k in enumerate(keys):
                store.save(k, fused[i % len(fused)])
        nbytes = store.bytes_per_sample(keys[0])
        with _Clock("cpu") as cr:
            loaded = [store.load(k) for k in keys]
        g = fused[0].descriptors.shape
        store_res = {
            "compact": _compact_store_options(store, fused),
            "samples": targets,
            "dtype": "float16",
            "channels": int(g[0]),
            "grid": [int(g[1]), int(g[2])],
            "bytes_per_sample": int(nbytes),
            "write_samples_per_s": _rate(targets, cw.seconds),
            "read_samples_per_s": _rate(targets, cr.seconds),
            "read_mb_per_s": _rate(targets * nbytes / 1e6, cr.seconds),
            "note": "FeatureStore.save (fsync on) / load to float32 on CPU; reads from a warm page cache",
        }

        src = loaded[0]
        rng = np.random.default_rng(seed)
        rows, cols = torch.nonzero(src.valid_mask(), as_tuple=True)
        pick = rng.choice(rows.numel(), size=min(keypoints, rows.numel()), replace=False)
        tokens = torch.stack([cols[pick], rows[pick]], dim=1)
        k = int(tokens.shape[0])
        tgts = loaded[1:] + loaded[:1]

        def propagate_batched(s, ts, batch: int = 64) -> dict:
            """The package API: a Propagator with one reference of the K keypoints,
            predict_many over the targets in batches (default MatchConfig: soft-argmax +
            cycle check), against predict one target at a time; same device."""
            from fiftyone_sdcorr.core.correspondence import tokens_to_normalized

            try:  # the dataset layer needs FiftyOne (absent on the lent GPU machines)
                from fiftyone_sdcorr.dataset.config import MatchConfig
                from fiftyone_sdcorr.dataset.matching import (BATCH_BYTES_CPU, BATCH_BYTES_GPU, Propagator, Reference,
                                                              RefInstance)
            except ImportError as e:
                return propagate_batched_core(s, ts, batch, f"{type(e).__name__}: {e}")
            dev = s.descriptors.device
            points = tokens_to_normalized(tokens, s).clamp(0, 1).numpy()  # token centres (on the image): the K tokens
            ref = Reference(id="bench-reference", filepath="", features=s,
                            instances=[RefInstance(index=0, label="kp", ordinal=0, points=points)])
            prop = Propagator([ref], MatchConfig())
            items = [(t, None, None) for t in ts]
            prop.predict_many(items[:batch])  # warm-up
            prop.predict(ts[0])
            with _Clock(dev) as cm:
                got = [p for i in range(0, len(items), batch) for p in prop.predict_many(items[i:i + batch])]
            with _Clock(dev) as c1:
                one = [prop.predict(t) for t in ts]
            same = sum(int(np.allclose(a[0].points, b[0].points, atol=1e-5, equal_nan=True))
                       for a, b in zip(got, one) if not isinstance(a, Exception))
            n = len(ts)
            return {"targets_per_s": _rate(n, cm.seconds), "keypoints_per_s": _rate(n * k, cm.seconds),
                    "keypoints": k, "batch": batch, "targets": n,
                    # predict_many matches at most BATCH_BYTES_* of stacked maps at once (CPU: one paper-size map)
                    "matched_at_once": min(batch, len(ts), max(1, (BATCH_BYTES_GPU if dev.type == "cuda" else BATCH_BYTES_CPU)
                                                      // (4 * s.descriptors.numel()))),
                    "failed": sum(isinstance(p, Exception) for p in got),
                    "equal_to_per_target_pct": 100.0 * same / n if n else None,
                    "per_target_targets_per_s": _rate(n, c1.seconds),
                    "speedup_vs_per_target": (c1.seconds / cm.seconds) if cm.seconds > 0 else None,
                    "call": f"Propagator([one reference, {k} keypoints], MatchConfig()).predict_many(targets in "
                            f"batches of {batch}) (soft-argmax 11 + cycle check); per target: .predict(target)"}

        def propagate_batched_core(s, ts, batch: int, why: str) -> dict:
            """Without FiftyOne: the Propagator's product itself, core
            ``match_prepared_many`` (soft-argmax 11 + cycle check) in batches, results on the
            host; the Propagator adds the ranking and the conversion to fo.Keypoints."""
            from fiftyone_sdcorr.core.correspondence import Prepared, PreparedBatch, match_prepared_many

            dev = s.descriptors.device
            q = [(Prepared.of(s), tokens.to(dev), torch.ones(k, dtype=torch.bool, device=dev))]
            run = lambda part: match_prepared_many(PreparedBatch.of(part), q, soft_window=11, out_device="cpu")  # noqa: E731
            run(ts[:batch])  # warm-up
            with _Clock(dev) as cm:
                got = [m for i in range(0, len(ts), batch) for m in run(ts[i:i + batch])]
            n = len(ts)
            return {"targets_per_s": _rate(n, cm.seconds), "keypoints_per_s": _rate(n * k, cm.seconds),
                    "keypoints": k, "batch": batch, "targets": n, "failed": 0, "matched": len(got),
                    "call": f"core.correspondence.match_prepared_many(PreparedBatch of up to {batch} targets, one "
                            f"reference of {k} keypoints, soft-argmax 11 + cycle check), results to the host",
                    "note": f"the dataset layer (Propagator) could not load: {why}"}

        def run_on(dev: torch.device) -> dict:
            s = src if dev.type == "cpu" else _to_device(src, dev)
            ts = tgts if dev.type == "cpu" else [_to_device(t, dev) for t in tgts]
            masks = [t.valid_mask().to(dev) for t in ts]
            # warm-up
            match_points(s, ts[0], tokens, cycle=False)
            match_points_loop(s, ts[0], tokens, tgt_mask=masks[0], all_tokens=False)
            with _Clock(dev) as cv:
                vec = [match_points(s, t, tokens, cycle=False) for t in ts]
            # The reference computes the nearest neighbour of all N_s source tokens, one
            # nn.CosineSimilarity call per token. Every call does the same work, so we time
            # the K keypoint rows per target and scale by N_s / K (a full loop is minutes
            # per target on a CPU).
            n_src = int(s.descriptors.shape[-1] * s.descriptors.shape[-2])
            with _Clock(dev) as cl_k:
                loop = [match_points_loop(s, t, tokens, tgt_mask=m, all_tokens=False) for t, m in zip(ts, masks)]
            cl = _Scaled(cl_k.seconds * n_src / max(1, k))
            with _Clock(dev) as cp:
                for t in ts:
                    match_points(s, t, tokens, soft_window=11, cycle=True)
            equal = sum(int((v.tokens.cpu().long() == lt).all(dim=1).sum()) for v, (lt, _) in zip(vec, loop))
            n = len(ts)
            # headroom (not a package API): targets unit-normalised once (as a store could
            # keep them) and all targets matched in one batched product
            tu = torch.stack([_unit_cols(t.descriptors) for t in ts])  # T x C x N
            mflat = torch.stack([m.reshape(-1) for m in masks])  # T x N
            q = _unit_cols(s.descriptors)[:, (tokens[:, 1] * s.descriptors.shape[-1] + tokens[:, 0]).to(dev)]
            with _Clock(dev) as cb:
                sim = torch.matmul(q.T.contiguous(), tu).masked_fill_(~mflat[:, None, :], float("-inf"))  # T x K x N
                best = sim.argmax(dim=-1)  # T x K
            wt = s.descriptors.shape[-1]
            bt = torch.stack([best % wt, best // wt], dim=-1).cpu()
            equal_b = sum(int((bt[i] == lt).all(dim=1).sum()) for i, (lt, _) in enumerate(loop))
            res = {
                "device": str(dev),
                "keypoints": k,
                "targets": n,
                "vectorised": {"targets_per_s": _rate(n, cv.seconds), "keypoints_per_s": _rate(n * k, cv.seconds),
                               "call": "match_points(src, tgt, tokens, cycle=False)"},
                "loop": {"targets_per_s": _rate(n, cl.seconds), "keypoints_per_s": _rate(n * k, cl.seconds),
                         "call": "match_points_loop(src, tgt, tokens, tgt_mask): the reference's per-token "
                                 "cosine loop over all source tokens",
                         "measured_rows_per_target": k, "source_tokens": n_src,
                         "timing": "K rows timed per target, scaled by N_s / K (identical iterations)"},
                "loop_keypoint_rows_only": {
                    "targets_per_s": _rate(n, cl_k.seconds), "keypoints_per_s": _rate(n * k, cl_k.seconds),
                    "speedup_of_vectorised": (cl_k.seconds / cv.seconds) if cv.seconds > 0 else None,
                    "note": "the same per-token cosine loop over the K keypoint rows only (what a careful user of "
                            "the reference code could do); the vectorised path against this is the fairer ratio",
                },
                "propagation": {"targets_per_s": _rate(n, cp.seconds), "keypoints_per_s": _rate(n * k, cp.seconds),
                                "call": "match_points(..., soft_window=11, cycle=True)"},
                "nn_equal_pct": 100.0 * equal / (n * k),
                "batched_prenormalised": {
                    "targets_per_s": _rate(n, cb.seconds), "keypoints_per_s": _rate(n * k, cb.seconds),
                    "speedup_vs_loop": (cl.seconds / cb.seconds) if cb.seconds > 0 else None,
                    "nn_equal_pct_vs_loop": 100.0 * equal_b / (n * k),
                    "note": "headroom, not a package API: unit-normalised targets stacked once, one batched matmul + argmax for all targets",
                },
            }
            res["speedup"] = (cl.seconds / cv.seconds) if cv.seconds > 0 else None
            res["propagation_batched"] = propagate_batched(s, ts)
            return res

        matching = run_on(torch.device("cpu"))
        # end to end from the store: read each target file, then match with soft-argmax + cycle
        with _Clock("cpu") as ce:
            for key in keys[1:] + keys[:1]:
                match_points(src, store.load(key), tokens, soft_window=11, cycle=True)
        matching["from_store"] = {
            "targets_per_s": _rate(targets, ce.seconds),
            "keypoints_per_s": _rate(targets * k, ce.seconds),
            "call": "FeatureStore.load + match_points(..., soft_window=11, cycle=True)",
        }
        matching_dev = run_on(device) if device.type != "cpu" else None
        return store_res, matching, matching_dev
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unit_cols(desc: torch.Tensor) -> torch.Tensor:
    d = desc.reshape(desc.shape[0], -1).float()
    return d / d.norm(dim=0, keepdim=True).clamp_min(1e-12)


def _to_device(f, dev):
    from fiftyone_sdcorr.core.features import FusedFeatures

    return FusedFeatures(f.descriptors.to(dev), f.letterbox, f.stride, f.sd_channels, f.meta)


# ====================================================================== the runs
def _recipe_kw(args) -> dict:
    kw = {"preset": args.preset}
    if args.tiny:
        kw.update(TINY_RECIPE)
    return kw


def _parse_batches(text: str) -> List[int]:
    out = sorted({int(x) for x in str(text).split(",") if x.strip()})
    if not out or min(out) < 1:
        raise ValueError(f"--batch must list positive integers, got {text!r}")
    return out


def _models_for(args, device, quiet):
    if args.tiny:
        from fiftyone_sdcorr.core.tiny import tiny_models

        root = Path(args.models_dir) if args.models_dir else None
        return tiny_models(root)
    init = device if device.type == "cuda" else "cpu"
    return build_full_models(args.models_dir, init_device=init, quiet=quiet)


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_bench(args) -> dict:
    """Run the benchmark described by parsed CLI ``args``; returns the JSON dict."""
    quiet = args.quiet
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.cpu_preset:
        device = torch.device("cpu")
    if args.matching_only:
        return finish(run_matching_only(args, device, quiet), args)
    from fiftyone_sdcorr.core.models import resolve_dtype

    if device.type == "cuda":
        # fixed shapes throughout: let cuDNN pick its fastest kernels (both paths; the
        # reference code sets this too)
        torch.backends.cudnn.benchmark = True
    opt_dtype = resolve_dtype(args.dtype)
    if device.type == "cuda" and opt_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        opt_dtype = torch.float16
    result: Dict = {
        "schema": SCHEMA,
        "created_utc": _now(),
        "mode": "cpu-preset" if args.cpu_preset else ("tiny" if args.tiny else "full"),
        "speed_claim": not args.tiny,
        "environment": environment(device),
    }
    sd_dir, dino_dir = _models_for(args, device, quiet)
    result["models"] = {
        "sd": "tiny random (fiftyone_sdcorr.core.tiny)" if args.tiny else "SD 1.5 architecture, random weights (configs/sd15_*.json)",
        "dino": "tiny random (fiftyone_sdcorr.core.tiny)" if args.tiny else "DINOv2-B architecture, random weights (configs/dinov2_base.json)",
        "loaded_with": "FeatureExtractor(sd_dir, dino_dir) from save_pretrained directories",
    }
    if args.cpu_preset:
        result.update(run_cpu_preset(args, sd_dir, dino_dir, quiet))
        return finish(result, args)

    batches = _parse_batches(args.batch)
    rkw = _recipe_kw(args)
    n_plain = max(2, min(args.plain_images, args.images))
    n_agree = max(2, min(args.agree_images, n_plain))
    images = bench_images(max(args.images, n_plain))
    result["settings"] = {
        "preset": args.preset,
        "recipe_overrides": {k: v for k, v in rkw.items() if k != "preset"},
        "images": args.images,
        "plain_images": n_plain,
        "agreement_images": n_agree,
        "batches": batches,
        "dtype": str(opt_dtype).replace("torch.", ""),
        "channels_last": args.channels_last,
        "compile": bool(args.compile),
        "compile_mode": args.compile_mode if args.compile else None,
        "warmup_batches": args.warmup,
        "keypoints": args.keypoints,
        "targets": args.targets,
        "mem_cap_bytes": args.mem_cap_gb * 1e9,
    }

    # -------------------------------------------------- (a) plain
    _log(f"plain recipe: loading fp32 models on {device}", quiet)
    ext = make_extractor(sd_dir, dino_dir, device, torch.float32, 1, rkw)
    result["settings"]["recipe"] = ext.recipe.to_dict()
    flops = count_flops(ext.unet.config, ext.vae.config, ext.dino, ext.recipe)
    result["flops"] = flops
    _log(f"FLOPs/image: optimised {flops['optimised_per_image'] / 1e12:.3f} T, plain {flops['plain_per_image'] / 1e12:.3f} T", quiet)
    big = device.type == "cuda"
    ceil = {
        "bf16": matmul_rate(device, torch.bfloat16, 8192 if big else (256 if args.tiny else 1024), reps=10 if big else 3),
        "fp32": matmul_rate(device, torch.float32, 8192 if big else (256 if args.tiny else 1024), reps=10 if big else 3),
    }
    if big:
        ceil["fp16"] = matmul_rate(device, torch.float16, 8192)
        ceil["tf32"] = matmul_rate(device, torch.float32, 8192, tf32=True)
    result["matmul"] = ceil
    plain_attn = set_plain_attention(ext)
    weights_fp32 = _weights_bytes(ext.unet, ext.vae, ext.dino)
    _log(f"plain recipe: warm-up, then {n_plain} images, one tile per call, full UNet", quiet)
    if args.warmup:
        plain_extract(ext, images[:1])
    raws_plain, secs, peak = _timed(device, lambda: plain_extract(ext, images[:n_plain]))
    plain = _figures(n_plain, secs, peak, flops["plain_per_image"], ceil["fp32"]["tflops"])
    plain.update(dtype="float32", batch=1, tiles_per_call=1, full_forward=True, attention=plain_attn,
                 channels_last=False, compiled=False, weights_bytes=weights_fp32,
                 ceiling_dtype="fp32 (TF32 convolutions follow torch defaults; see environment)")
    _log(f"plain: {plain['images_per_s']:.4g} images/s", quiet)
    ext = None  # drop the last reference before freeing: (b) must not see (a)'s weights
    _free()

    # -------------------------------------------------- (b) optimised
    _log(f"optimised path: loading {opt_dtype} models", quiet)
    ext = make_extractor(sd_dir, dino_dir, device, opt_dtype, batches[0], rkw,
                         channels_last=args.channels_last)
    comp = compile_extractor(ext, args.compile_mode) if args.compile else {"compiled": False}
    opt_attn = attention_in_use(ext)
    weights_opt = _weights_bytes(ext.unet, ext.vae, ext.dino)
    ceil_key = "bf16" if opt_dtype == torch.bfloat16 else ("fp16" if opt_dtype == torch.float16 else "fp32")
    ceiling = ceil.get(ceil_key, ceil["bf16"])["tflops"]
    runs = []
    raws_opt = None
    for b in batches:
        ext.batch_size = b
        n = max(args.images, b)
        n = int(math.ceil(n / b) * b)  # whole batches only: no odd-sized (recompiled) tail
        imgs = [images[i % len(images)] for i in range(n)]
        _log(f"optimised: batch {b} ({b * flops['tiles_per_image']} tiles per UNet call), warm-up x{max(1, args.warmup)}, then {n} images", quiet)
        try:
            with _Clock(device) as cw:
                for _ in range(max(1, args.warmup)):
                    ext.extract(imgs[:b])
            _, secs, peak = _timed(device, lambda: ext.extract(imgs))
        except torch.cuda.OutOfMemoryError as e:
            runs.append({"batch": b, "error": f"CUDA out of memory: {e}"[:300]})
            _free()
            continue
        fig = _figures(n, secs, peak, flops["optimised_per_image"], ceiling)
        _reset_peak(device)
        _, stages = staged_extract(ext, imgs[:b])
        fig.update(batch=b, tiles_per_call=b * flops["tiles_per_image"], dtype=str(opt_dtype).replace("torch.", ""),
                   full_forward=False, attention=opt_attn, channels_last=args.channels_last,
                   compiled=comp, weights_bytes=weights_opt, warmup_seconds=cw.seconds,
                   stages_one_batch_s=stages, effective_batch_size=ext.batch_size,
                   # the models alone (SD + DINO stages, no image decoding / letterboxing):
                   # what overlapping the CPU preprocessing with the device would approach
                   models_only_images_per_s=_rate(b, stages["sd"] + stages["dino"]),
                   preprocess_ms_per_image=1e3 * stages["preprocess"] / b)
        runs.append(fig)
        _log(f"optimised batch {b}: {fig['images_per_s']:.4g} images/s, peak {fmt_bytes(peak)}", quiet)
    # agreement on the plain images, from the optimised path (smallest batch that ran)
    ext.batch_size = min(r["batch"] for r in runs if "error" not in r) if any("error" not in r for r in runs) else 1
    raws_opt = ext.extract(images[:n_agree])
    recipe = ext.recipe
    store_fused = _fused_for_store(raws_opt, recipe)
    ext = None
    _free()

    # a batch that FeatureExtractor halved after running out of memory is not chosen
    ok = [r for r in runs if "error" not in r and r["effective_batch_size"] == r["batch"]]
    cap = args.mem_cap_gb * 1e9
    within = [r for r in ok if r["peak_mem_bytes"] is None or r["peak_mem_bytes"] <= cap]
    best = max(within or ok, key=lambda r: r["images_per_s"]) if ok else None
    for r in runs:
        r["within_mem_cap"] = any(r is w for w in within)
    extraction = {
        "plain": plain,
        "optimised": runs,
        "chosen_batch": best["batch"] if best else None,
        "chosen_rule": f"fastest batch with peak memory <= {args.mem_cap_gb:g} GB (fastest overall when none fits)",
        "speedup": (best["images_per_s"] / plain["images_per_s"]) if best and plain["images_per_s"] else None,
        "agreement": agreement(raws_plain[:n_agree], raws_opt, recipe.pca_dim, recipe.alpha),
    }
    result["extraction"] = extraction
    _log(f"agreement: cosine mean {extraction['agreement']['cosine_mean']:.4f}, NN equal {extraction['agreement']['nn_equal_pct']}", quiet)

    # -------------------------------------------------- end to end: the public API on JPEG files
    if not args.no_end_to_end:
        _log("end to end: compute_fused_features on a FiftyOne dataset of JPEG files", quiet)
        result["end_to_end"] = bench_end_to_end(sd_dir, dino_dir, device, opt_dtype, rkw, images, args, quiet)
        if args.compile:
            _log("end to end, compiled (what runs of COMPILE_MIN_IMAGES images or more do by default)", quiet)
            result["end_to_end_compiled"] = bench_end_to_end(sd_dir, dino_dir, device, opt_dtype, rkw, images, args,
                                                             quiet, compiled=True)
        _log("pipeline without a database: compute_fused_features' pipeline on the same JPEG files", quiet)
        result["pipeline"] = bench_pipeline(sd_dir, dino_dir, device, opt_dtype, rkw, images, args, quiet)
        if args.compile:
            result["pipeline_compiled"] = bench_pipeline(sd_dir, dino_dir, device, opt_dtype, rkw, images, args,
                                                         quiet, compiled=True)
        for key in ("end_to_end", "end_to_end_compiled", "pipeline", "pipeline_compiled"):
            e2e = result.get(key) or {}
            if e2e.get("images_per_s") and plain["images_per_s"]:
                e2e["speedup_vs_plain"] = e2e["images_per_s"] / plain["images_per_s"]

    # -------------------------------------------------- matching & store
    _log("feature store and matching", quiet)
    store_res, matching, matching_dev = bench_store_and_matching(store_fused, device, args.keypoints, args.targets)
    result["store"] = store_res
    result["matching"] = matching
    if matching_dev is not None:
        result["matching_device"] = matching_dev
    result["targets"] = evaluate_targets(result)
    return finish(result, args)


def bench_end_to_end(sd_dir, dino_dir, device, dtype, rkw, images, args, quiet, compiled: bool = False) -> dict:
    """The headline: ``compute_fused_features`` on a FiftyOne dataset of JPEG files of
    mixed sizes, store written, embedding field set, the batch the extractor picks by
    default. Models are loaded before the clock starts; a warm-up run on two other files
    goes to another store (with ``compiled``, it includes the compilation: reported as
    ``warmup_seconds``). Needs FiftyOne's database; skipped with the reason otherwise."""
    try:
        import fiftyone as fo

        from fiftyone_sdcorr.dataset.compute_features import compute_fused_features
    except Exception as e:  # noqa: BLE001
        return {"skipped": f"FiftyOne unavailable: {e}"}
    tmp = Path(tempfile.mkdtemp(prefix="sdcorr-bench-e2e."))
    n = max(args.images, 8)
    paths = _jpeg_files(images, n + 2, tmp)
    ds = None
    try:
        ds = fo.Dataset(f"sdcorr-bench-e2e-{os.getpid()}-{int(time.time())}")
        ds.add_samples([fo.Sample(filepath=p) for p in paths])
        ext = make_extractor(sd_dir, dino_dir, device, dtype, None, rkw,
                             channels_last=args.channels_last)
        if compiled:
            ext.compile_models(args.compile_mode)
        ids = ds.values("id")
        with _Clock(device) as cw:
            compute_fused_features(ds.select(ids[:2]), extractor=ext, store_dir=str(tmp / "warmup"), progress=False)
        target = ds.select(ids[2:])
        _reset_peak(device)
        with _Clock(device) as c:
            summary = compute_fused_features(target, extractor=ext, store_dir=str(tmp / "store"),
                                             embedding_field="e2e_embedding", features_field="e2e_features",
                                             progress=False)
        peak = _peak(device)
        out = {"images": n, "seconds": c.seconds, "images_per_s": _rate(summary["computed"], c.seconds),
               "batch": ext.batch_size, "peak_mem_bytes": peak, "computed": summary["computed"],
               "failed": summary["failed"], "projection_fitted_in_run": True, "compiled": compiled,
               "warmup_seconds": cw.seconds, "channels_last": ext.channels_last,
               "store_bytes_per_sample": _first_file_bytes(summary["store_dir"])}
        _log(f"end to end: {_f(out['images_per_s'])} images/s at batch {ext.batch_size}, peak {fmt_bytes(peak)}", quiet)
        return out
    except Exception as e:  # noqa: BLE001 -- report, do not lose the rest of the bench
        return {"error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        if ds is not None:
            ds.delete()
        shutil.rmtree(tmp, ignore_errors=True)


def _jpeg_files(images, n: int, folder: Path) -> List[str]:
    """``n`` JPEG files of mixed sizes made from the bench images (the end-to-end input)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        im = images[i % len(images)]
        scale = (1.0, 0.75, 1.5, 0.6)[i % 4]  # mixed sizes
        im = im.resize((max(32, int(im.width * scale)), max(32, int(im.height * scale))))
        paths.append(str(folder / f"img{i:04d}.jpg"))
        im.convert("RGB").save(paths[-1], quality=90)
    return paths


def bench_pipeline(sd_dir, dino_dir, device, dtype, rkw, images, args, quiet, compiled: bool = False) -> dict:
    """``compute_fused_features``' own pipeline (:func:`fiftyone_sdcorr.core.pipeline.pipelined`)
    on JPEG files of mixed sizes without FiftyOne: decoding on loader threads, the models,
    projection, fusion and store encoding on the device, files written, embeddings made;
    no database writes, no claims. For machines where FiftyOne's database cannot run (the
    lent GPU machines: no MongoDB). The projection is fitted on two other files first."""
    from concurrent.futures import ThreadPoolExecutor

    from fiftyone_sdcorr.core.extractor import PREP_THREADS
    from fiftyone_sdcorr.core.features import FixedProjection
    from fiftyone_sdcorr.core.images import load_image
    from fiftyone_sdcorr.core.pipeline import pipelined
    from fiftyone_sdcorr.core.store import FeatureStore

    tmp = Path(tempfile.mkdtemp(prefix="sdcorr-bench-pipe."))
    n = max(args.images, 8)
    try:
        paths = _jpeg_files(images, n + 2, tmp / "jpg")
        ext = make_extractor(sd_dir, dino_dir, device, dtype, None, rkw, channels_last=args.channels_last)
        if compiled:
            ext.compile_models(args.compile_mode)
        with _Clock(device) as cw:
            proj = FixedProjection.fit([r.sd for r in ext.extract(paths[:2])], dim=ext.recipe.pca_dim)
        store = FeatureStore(tmp / "store")
        b, todo = ext.batch_size, paths[2:]
        _reset_peak(device)
        with _Clock(device) as c, ThreadPoolExecutor(PREP_THREADS) as pool:
            batches = ((todo[i:i + b], list(pool.map(load_image, todo[i:i + b])), None) for i in range(0, n, b))
            done = 0
            for keys, got in pipelined(ext, batches, proj, ext.recipe.alpha, torch.float16):
                if isinstance(got, Exception):
                    raise got
                for key, enc in zip(keys, got):
                    store.save(Path(key).stem, enc.fused, dtype=torch.float16, encoded=enc.tensors)
                    enc.embedding.numpy()
                    done += 1
        peak = _peak(device)
        out = {"images": n, "seconds": c.seconds, "images_per_s": _rate(done, c.seconds), "batch": b,
               "peak_mem_bytes": peak, "computed": done, "compiled": compiled, "warmup_seconds": cw.seconds,
               "channels_last": ext.channels_last, "call": "core.pipeline.pipelined + FeatureStore.save (no database)"}
        _log(f"pipeline (no database): {_f(out['images_per_s'])} images/s at batch {b}, peak {fmt_bytes(peak)}", quiet)
        return out
    except Exception as e:  # noqa: BLE001 -- report, do not lose the rest of the bench
        return {"error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _first_file_bytes(root) -> Optional[int]:
    """Size of one sample file of a store namespace."""
    files = [f for f in sorted(Path(root).rglob("*.safetensors")) if f.parent.name != "_tensors"]
    return files[0].stat().st_size if files else None


def _fused_for_store(raws, recipe) -> list:
    from fiftyone_sdcorr.core.features import FixedProjection, fuse_raw

    proj = FixedProjection.fit([r.sd for r in raws], dim=recipe.pca_dim)
    return [fuse_raw(r, proj, alpha=recipe.alpha) for r in raws]


def run_cpu_preset(args, sd_dir, dino_dir, quiet) -> dict:
    """Cost per image on this CPU, full-size random models, batch 1, fp32: the paper
    recipe and ``PRESETS["cpu"]``; plus matching / store on the paper features."""
    device = torch.device("cpu")
    n = max(1, args.images)
    images = bench_images(max(n, 2))
    out = {"settings": {"images_per_recipe": n, "batch": 1, "dtype": "float32", "warmup_images": args.warmup,
                        "keypoints": args.keypoints, "targets": args.targets}}
    out["matmul"] = {"fp32": matmul_rate(device, torch.float32, 2048, reps=3)}
    recipes = {}
    fused_paper = None
    for name in ("paper", "cpu"):
        _log(f"cpu-preset: recipe {name!r}: loading fp32 models", quiet)
        with _Clock(device) as cl:
            ext = make_extractor(sd_dir, dino_dir, device, torch.float32, 1, {"preset": name})
        flops = count_flops(ext.unet.config, ext.vae.config, ext.dino, ext.recipe)
        for _ in range(args.warmup):
            staged_extract(ext, images[:1])
        per, stages_sum, raws = [], {"preprocess": 0.0, "sd": 0.0, "dino": 0.0}, []
        cpu_per = []
        for i in range(n):
            c0 = time.process_time()
            with _Clock(device) as c:
                r, st = staged_extract(ext, [images[i % len(images)]])
            cpu_per.append(time.process_time() - c0)
            per.append(c.seconds)
            raws += r
            for k_ in st:
                stages_sum[k_] += st[k_]
            _log(f"cpu-preset: {name} image {i + 1}/{n}: {c.seconds:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in st.items())})", quiet)
        mean = float(np.mean(per))
        rec = ext.recipe
        recipes[name] = {
            "recipe": rec.to_dict(),
            "load_seconds": cl.seconds,
            "s_per_image": mean,
            "s_per_image_each": per,
            "images_per_hour": 3600.0 / mean,
            # CPU time of this process (all threads): on a shared machine the wall time
            # also counts other processes; cpu_s / threads estimates an idle machine
            "cpu_s_per_image": float(np.mean(cpu_per)),
            "cpu_s_per_image_each": cpu_per,
            "torch_threads": torch.get_num_threads(),
            "est_idle_s_per_image": float(np.mean(cpu_per)) / max(1, torch.get_num_threads()),
            "stages_mean_s": {k: v / n for k, v in stages_sum.items()},
            "flops": flops,
            "achieved_gflops": flops["optimised_per_image"] / mean / 1e9,
            "grid": int(rec.dino_size // ext.dino_stride),
            "sd_tiles_per_image": flops["tiles_per_image"],
        }
        if name == "paper":
            if len(raws) < 2:
                with _Clock(device):
                    r, _ = staged_extract(ext, [images[1]])
                raws += r
            fused_paper = _fused_for_store(raws, rec)
        ext = None
        _free()
    p, c = recipes["paper"], recipes["cpu"]
    out["cpu_preset"] = {
        "recipes": recipes,
        "speedup_cpu_vs_paper": p["s_per_image"] / c["s_per_image"],
        "gives_up": (
            f"SD sees the image at {c['recipe']['sd_size']} px in one pass instead of {p['recipe']['sd_size']} px in "
            f"{p['sd_tiles_per_image']} overlapping {p['recipe']['sd_tile']} px tiles; DINOv2 at {c['recipe']['dino_size']} px: "
            f"a {c['grid']}x{c['grid']} token grid instead of {p['grid']}x{p['grid']} (each token covers "
            f"{(p['grid'] / c['grid']) ** 2:.1f}x the area), so keypoints land on a coarser grid; accuracy (PCK) "
            "with real weights is not measured here (no weights available)"
        ),
    }
    _log("cpu-preset: feature store and matching on the paper-recipe features", quiet)
    store_res, matching, _ = bench_store_and_matching(fused_paper, device, args.keypoints, args.targets)
    out["store"] = store_res
    out["matching"] = matching
    out["targets"] = {"matching_speedup_cpu": _target(matching["speedup"], TARGETS["matching_speedup_cpu"], ">=", True)}
    return out


def run_matching_only(args, device, quiet) -> dict:
    """Store + matching on fused maps of the paper's shape built from random values.

    Matching cost does not depend on the values (one K x N product, an argmax, a window
    soft-argmax); the maps are real :class:`FusedFeatures` (two unit-norm 768-channel
    halves, letterboxes of landscape/portrait/square images) so masks and geometry are the
    real ones.
    """
    from fiftyone_sdcorr.core.features import FusedFeatures, fuse
    from fiftyone_sdcorr.core.geometry import Letterbox

    g = torch.Generator().manual_seed(0)
    sizes = [(640, 480), (480, 640), (500, 500), (800, 450)]
    fused = []
    for w, h in sizes:
        sd = torch.randn(768, 60, 60, generator=g)
        dino = torch.randn(768, 60, 60, generator=g)
        fused.append(FusedFeatures(fuse(sd, dino), Letterbox.fit(w, h, 840), 14, 768))
    out = {
        "schema": SCHEMA,
        "created_utc": _now(),
        "mode": "matching",
        "speed_claim": True,
        "environment": environment(device),
        "models": {"note": "no models: fused maps of the paper's shape from random values"},
        "settings": {"keypoints": args.keypoints, "targets": args.targets, "channels": 1536, "grid": [60, 60]},
    }
    _log(f"matching-only: {args.targets} targets, {args.keypoints} keypoints", quiet)
    store_res, matching, matching_dev = bench_store_and_matching(fused, device, args.keypoints, args.targets)
    out["store"], out["matching"] = store_res, matching
    if matching_dev is not None:
        out["matching_device"] = matching_dev
    out["targets"] = {"matching_speedup_cpu": _target(matching["speedup"], TARGETS["matching_speedup_cpu"], ">=", True)}
    return out


# ====================================================================== targets, output
def _target(value, threshold, op, applicable, note=None) -> dict:
    met = None
    if value is not None:
        met = bool(value >= threshold) if op == ">=" else bool(value <= threshold)
    d = {"value": value, "threshold": threshold, "op": op, "met": met, "applicable": bool(applicable)}
    if note:
        d["note"] = note
    return d


def evaluate_targets(result: dict) -> dict:
    """Issue 5 and 10 targets; ``applicable`` only for a full-size run on CUDA at the paper recipe."""
    ex = result["extraction"]
    full_gpu = result["mode"] == "full" and result["environment"]["device"].startswith("cuda") and \
        result["settings"]["preset"] == "paper"
    best = next((r for r in ex["optimised"] if r.get("batch") == ex["chosen_batch"]), None) or {}
    why = None if full_gpu else "only a full-size CUDA run at the paper recipe counts (issue 5: one H100)"
    # issue 10's headline: compute_fused_features end to end, at the default batch; the
    # compiled run is what runs of COMPILE_MIN_IMAGES images or more get by default
    runs = [(k, result.get(k) or {}) for k in ("end_to_end", "end_to_end_compiled")]
    if not any(r.get("images_per_s") for _, r in runs):  # no FiftyOne database here (lent GPU machines)
        runs = [(k, result.get(k) or {}) for k in ("pipeline", "pipeline_compiled")]
    key, e2e = max(runs, key=lambda kv: kv[1].get("images_per_s") or 0.0)
    which = f"{key}; " + ("compute_fused_features' pipeline without database writes (no FiftyOne database "
                          "on this machine); " if key.startswith("pipeline") else "") + (why or "")
    prop = (result.get("matching_device") or result["matching"]).get("propagation_batched") or {}
    return {
        "end_to_end_images_per_s": _target(e2e.get("images_per_s"), TARGETS["end_to_end_images_per_s"], ">=",
                                           full_gpu, which),
        "end_to_end_peak_mem_bytes": _target(e2e.get("peak_mem_bytes"), TARGETS["end_to_end_peak_mem_bytes"], "<=",
                                             full_gpu, which),
        "end_to_end_speedup_vs_plain": _target(e2e.get("speedup_vs_plain"), TARGETS["end_to_end_speedup_vs_plain"],
                                               ">=", full_gpu, which),
        "images_per_s": _target(best.get("images_per_s"), TARGETS["images_per_s"], ">=", full_gpu, why),
        "speedup_vs_plain": _target(ex["speedup"], TARGETS["speedup_vs_plain"], ">=", full_gpu, why),
        "peak_mem_bytes": _target(best.get("peak_mem_bytes"), TARGETS["peak_mem_bytes"], "<=", full_gpu, why),
        "bf16_nn_equal_pct": _target(ex["agreement"]["nn_equal_pct"], TARGETS["bf16_nn_equal_pct"], ">=", full_gpu,
                                     "random weights; " + (why or "")),
        "matching_speedup_cpu": _target(result["matching"]["speedup"], TARGETS["matching_speedup_cpu"], ">=",
                                        result["mode"] != "tiny"),
        # issue 10: Propagator.predict_many, 20 keypoints, on the GPU result when there is one
        "propagation_targets_per_s": _target(
            prop.get("targets_per_s"), TARGETS["propagation_targets_per_s"], ">=",
            full_gpu and prop.get("keypoints") == 20,
            None if full_gpu and prop.get("keypoints") == 20 else
            "only a CUDA run of the full bench (paper-recipe 60x60 maps) with 20 keypoints counts (issue 10: one H100)"),
    }


def default_out(result: dict) -> Path:
    env = result["environment"]
    day = result["created_utc"][:10]
    name = _slug(env["device_name"]) if env["device"].startswith("cuda") else f"cpu{env['cpu_count']}"
    mode = result["mode"]
    prefix = {"full": "bench", "tiny": "bench-tiny", "cpu-preset": "cpu-preset", "matching": "matching"}[mode]
    return Path("results") / f"{prefix}-{name}-{day}.json"


def finish(result: dict, args) -> dict:
    result["environment"]["peak_rss_bytes"] = _rss_peak_bytes()
    if hasattr(os, "getloadavg"):
        result["environment"]["load_average_end"] = list(os.getloadavg())
    result["wall_seconds"] = time.perf_counter() - args._t0
    out = Path(args.out) if args.out else default_out(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    result["_path"] = str(out)
    return result


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return str(n)


def fmt_flops(n) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g} FLOP"


def _f(x, spec=".4g") -> str:
    return "n/a" if x is None else format(x, spec)


def format_table(result: dict) -> str:
    """A plain-text table of the headline figures of one result."""
    rows = []
    env = result["environment"]
    rows.append(("device", env["device_name"]))
    rows.append(("mode", result["mode"] + ("" if result.get("speed_claim") else " (not a speed claim)")))
    rows.append(("torch / CUDA", f"{env['torch']} / {env['cuda']}"))
    if "extraction" in result:
        ex, fl = result["extraction"], result["flops"]
        p = ex["plain"]
        rows.append(("FLOPs/image plain | optimised", f"{fmt_flops(fl['plain_per_image'])} | {fmt_flops(fl['optimised_per_image'])}"))
        rows.append(("  per tile: VAE enc | UNet to tap | UNet full", f"{fmt_flops(fl['vae_encoder_per_tile'])} | {fmt_flops(fl['unet_to_last_tap_per_tile'])} | {fmt_flops(fl['unet_full_per_tile'])}  (x{fl['tiles_per_image']} tiles of {fl['tile']} px)"))
        rows.append(("  DINOv2 per image", fmt_flops(fl["dino_per_image"])))
        mm = result["matmul"]
        rows.append(("matmul ceiling", ", ".join(f"{k} {v['tflops']:.3g} TFLOP/s" for k, v in mm.items())))
        rows.append(("(a) plain fp32 b1", f"{_f(p['images_per_s'])} img/s, peak {fmt_bytes(p['peak_mem_bytes'])}, {_f(p['achieved_tflops'], '.3g')} TFLOP/s ({_f((p['fraction_of_matmul'] or 0) * 100, '.1f')}% of fp32 matmul)"))
        for r in ex["optimised"]:
            if "error" in r:
                rows.append((f"(b) optimised b{r['batch']}", r["error"][:60]))
                continue
            st = r["stages_one_batch_s"]
            rows.append((f"(b) optimised {r['dtype']} b{r['batch']}", f"{_f(r['images_per_s'])} img/s, peak {fmt_bytes(r['peak_mem_bytes'])}, {_f(r['achieved_tflops'], '.3g')} TFLOP/s ({_f((r['fraction_of_matmul'] or 0) * 100, '.1f')}% of matmul)"))
            rows.append(("    one batch: prep | SD | DINO | to host", f"{st['preprocess']:.3g} s | {st['sd']:.3g} s | {st['dino']:.3g} s | {st.get('to_host', 0):.3g} s  (models alone {_f(r.get('models_only_images_per_s'))} img/s)"))
        rows.append(("speedup (b)/(a)", f"{_f(ex['speedup'], '.3g')}x at batch {ex['chosen_batch']}"))
        for key, name in (("end_to_end", "end to end: compute_fused_features"),
                          ("end_to_end_compiled", "end to end, compiled"),
                          ("pipeline", "its pipeline, no database"),
                          ("pipeline_compiled", "its pipeline, no database, compiled")):
            e2e = result.get(key) or {}
            if "images_per_s" in e2e:
                rows.append((name, f"{_f(e2e['images_per_s'])} img/s ({_f(e2e.get('speedup_vs_plain'), '.3g')}x plain), default batch {e2e['batch']}, peak {fmt_bytes(e2e['peak_mem_bytes'])}, {e2e['images']} JPEG files, warm-up {_f(e2e.get('warmup_seconds'), '.3g')} s"))
            elif e2e:
                rows.append((name, str(e2e.get("skipped") or e2e.get("error"))[:90]))
        ag = ex["agreement"]
        rows.append(("agreement (b) vs (a)", f"cosine mean {ag['cosine_mean']:.4f} (p01 {ag['cosine_p01']:.4f}), NN equal {_f(ag['nn_equal_pct'], '.2f')}% of {ag['nn_points']} points"))
    if "cpu_preset" in result:
        for name, r in result["cpu_preset"]["recipes"].items():
            st = r["stages_mean_s"]
            rows.append((f"recipe {name!r} (grid {r['grid']})", f"{r['s_per_image']:.2f} s/image wall ({r['images_per_hour']:.0f}/h), {r['flops']['optimised_per_image'] / 1e12:.2f} TFLOP, {r['achieved_gflops']:.0f} GFLOP/s"))
            if "cpu_s_per_image" in r:
                rows.append(("    process CPU time", f"{r['cpu_s_per_image']:.1f} CPU-s/image over {r['torch_threads']} threads (idle-machine estimate {r['est_idle_s_per_image']:.1f} s/image)"))
            rows.append(("    prep | SD | DINO", f"{st['preprocess']:.2f} s | {st['sd']:.2f} s | {st['dino']:.2f} s"))
        rows.append(("cpu preset speedup vs paper", f"{result['cpu_preset']['speedup_cpu_vs_paper']:.2f}x"))
    if "store" in result:
        s = result["store"]
        rows.append(("store", f"{fmt_bytes(s['bytes_per_sample'])}/sample ({s['channels']}x{s['grid'][0]}x{s['grid'][1]} fp16), write {_f(s['write_samples_per_s'], '.4g')}/s, read {_f(s['read_samples_per_s'], '.4g')}/s ({_f(s['read_mb_per_s'], '.4g')} MB/s)"))
    for key in ("matching", "matching_device"):
        if key in result:
            m = result[key]
            rows.append((f"{key} ({m['device']}, {m['keypoints']} kp)", f"vectorised {_f(m['vectorised']['targets_per_s'])} targets/s ({_f(m['vectorised']['keypoints_per_s'])} kp/s), loop {_f(m['loop']['targets_per_s'])} targets/s: {_f(m['speedup'], '.3g')}x; NN equal {m['nn_equal_pct']:.1f}%"))
            kr = m.get("loop_keypoint_rows_only")
            if kr:
                rows.append(("    vs the loop over keypoint rows only", f"{_f(kr['targets_per_s'])} targets/s: vectorised is {_f(kr['speedup_of_vectorised'], '.3g')}x"))
            bp = m.get("batched_prenormalised")
            if bp:
                rows.append(("    headroom: batched, pre-normalised", f"{_f(bp['targets_per_s'])} targets/s: {_f(bp['speedup_vs_loop'], '.3g')}x the loop"))
            rows.append(("    with soft-argmax + cycle", f"{_f(m['propagation']['targets_per_s'])} targets/s" + (f"; from store {_f(m['from_store']['targets_per_s'])} targets/s" if "from_store" in m else "")))
            pb = m.get("propagation_batched")
            if pb:
                how = ("Propagator.predict_many" if "per_target_targets_per_s" in pb else
                       "core match_prepared_many: no FiftyOne here")
                one = (f"; one by one {_f(pb['per_target_targets_per_s'])} targets/s: "
                       f"{_f(pb['speedup_vs_per_target'], '.3g')}x" if "per_target_targets_per_s" in pb else "")
                rows.append((f"    propagation, batches of {pb['batch']}", f"{_f(pb['targets_per_s'])} targets/s ({how}){one}"))
    if "targets" in result:
        for name, t in result["targets"].items():
            state = "n/a" if t["met"] is None else ("MET" if t["met"] else "not met")
            if not t["applicable"]:
                state += " (not applicable here)"
            v = t["value"]
            rows.append((f"target {name} {t['op']} {t['threshold']:g}", f"{_f(v, '.4g')}: {state}"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


# ====================================================================== report
def load_results(paths: Sequence) -> List[dict]:
    out = []
    for p in paths:
        p = Path(p)
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        for f in files:
            try:
                d = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if d.get("schema") == SCHEMA:
                d["_file"] = f.name
                out.append(d)
    return out


def _run_label(r: dict) -> str:
    s = r.get("settings", {})
    extra = [s["dtype"]] if s.get("dtype") else []
    if s.get("compile"):
        extra.append("torch.compile")
    if s.get("preset", "paper") != "paper":
        extra.append(f"preset {s['preset']}")
    return r["environment"]["device_name"] + (f" ({', '.join(extra)})" if extra else "")


def report_markdown(results: List[dict]) -> str:
    """The benchmark tables of docs/performance.md (and results/BENCHMARKS.md), from result files."""
    lines = []
    full = [r for r in results if r["mode"] == "full"]
    if full:  # issue 10's headline: the public API end to end, and the targets met
        lines += [
            "| device | date | end to end img/s (default batch) | compiled (warm-up s) | x plain | peak mem | propagation targets/s | targets met | file |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in full:
            e2e, comp = r.get("end_to_end") or {}, r.get("end_to_end_compiled") or {}
            prop = (r.get("matching_device") or r.get("matching") or {}).get("propagation_batched") or {}
            t = [v for v in (r.get("targets") or {}).values() if v.get("applicable")]
            lines.append(
                f"| {_run_label(r)} | {r['created_utc'][:10]} | {_f(e2e.get('images_per_s'), '.3g')} ({e2e.get('batch')}) | "
                f"{_f(comp.get('images_per_s'), '.3g')} ({_f(comp.get('warmup_seconds'), '.3g')}) | "
                f"{_f(max(e2e.get('speedup_vs_plain') or 0, comp.get('speedup_vs_plain') or 0) or None, '.3g')}x | "
                f"{fmt_bytes(e2e.get('peak_mem_bytes'))} | {_f(prop.get('targets_per_s'), '.3g')} | "
                f"{sum(bool(v['met']) for v in t)} of {len(t)} | `{r['_file']}` |"
            )
        lines += [
            "",
            "| device | date | plain fp32 img/s | optimised img/s (batch) | speedup | peak mem | TFLOP/s (% of matmul) | bf16 NN equal | matching vs loop (CPU) | file |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in full:
            ex = r["extraction"]
            best = next((o for o in ex["optimised"] if o.get("batch") == ex["chosen_batch"]), {})
            lines.append(
                f"| {_run_label(r)} | {r['created_utc'][:10]} | {_f(ex['plain']['images_per_s'], '.3g')} | "
                f"{_f(best.get('images_per_s'), '.3g')} ({best.get('batch')}) | {_f(ex['speedup'], '.3g')}x | "
                f"{fmt_bytes(best.get('peak_mem_bytes'))} | {_f(best.get('achieved_tflops'), '.3g')} "
                f"({_f((best.get('fraction_of_matmul') or 0) * 100, '.0f')}%) | {_f(ex['agreement']['nn_equal_pct'], '.1f')}% | "
                f"{_f(r['matching']['speedup'], '.3g')}x | `{r['_file']}` |"
            )
    cpu = [r for r in results if r["mode"] == "cpu-preset"]
    if cpu:
        if lines:
            lines.append("")
        lines += [
            "| CPU | date | recipe | s/image (wall) | CPU-s/image (threads) | images/hour | TFLOP/image | token grid | load avg (1 min) | file |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in cpu:
            la = r["environment"].get("load_average_start") or [None]
            for name, rec in r["cpu_preset"]["recipes"].items():
                cpu_s = f"{rec['cpu_s_per_image']:.1f} ({rec['torch_threads']})" if "cpu_s_per_image" in rec else "n/a"
                lines.append(
                    f"| {r['environment']['device_name']} | {r['created_utc'][:10]} | {name} | {rec['s_per_image']:.1f} | "
                    f"{cpu_s} | {rec['images_per_hour']:.0f} | {rec['flops']['optimised_per_image'] / 1e12:.2f} | "
                    f"{rec['grid']}x{rec['grid']} | {_f(la[0], '.1f')} | `{r['_file']}` |"
                )
    # only runs against the reference baseline (all source tokens); earlier files timed a
    # per-keypoint loop under the same name
    match = [r for r in results if r.get("speed_claim") and "matching" in r
             and r["matching"]["loop"].get("source_tokens")]
    if match:
        if lines:
            lines.append("")
        lines += [
            "| matching on | date | keypoints | vectorised targets/s | with soft-argmax + cycle | reference per-token loop targets/s | ratio | ratio vs a loop over keypoint rows only | NN equal | store MB/sample | file |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in match:
            m = r["matching"]
            kr = m.get("loop_keypoint_rows_only") or {}
            lines.append(
                f"| {r['environment']['device_name']} | {r['created_utc'][:10]} | {m['keypoints']} | "
                f"{_f(m['vectorised']['targets_per_s'], '.3g')} | {_f(m['propagation']['targets_per_s'], '.3g')} | "
                f"{_f(m['loop']['targets_per_s'], '.3g')} | {_f(m['speedup'], '.3g')}x | "
                f"{_f(kr.get('speedup_of_vectorised'), '.3g')}x | {m['nn_equal_pct']:.1f}% | "
                f"{r['store']['bytes_per_sample'] / 1e6:.1f} | `{r['_file']}` |"
            )
    if not lines:
        lines.append("No benchmark results yet (only `--tiny` runs, which are not speed claims).")
    return "\n".join(lines) + "\n"


def report_plot(results: List[dict], path) -> Optional[str]:
    """A bar chart of images/s (plain vs optimised per device, log scale) as PNG."""
    full = [r for r in results if r["mode"] == "full"]
    cpu = [r for r in results if r["mode"] == "cpu-preset"]
    if not full and not cpu:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, plain, opt, e2e = [], [], [], []
    for r in full:
        ex = r["extraction"]
        best = next((o for o in ex["optimised"] if o.get("batch") == ex["chosen_batch"]), {})
        labels.append(f"{_run_label(r)}\n{r['created_utc'][:10]}")
        plain.append(ex["plain"]["images_per_s"] or 0)
        opt.append(best.get("images_per_s") or 0)
        e2e.append(max((r.get(k) or {}).get("images_per_s") or 0 for k in ("end_to_end", "end_to_end_compiled")))
    for r in cpu:
        recs = r["cpu_preset"]["recipes"]
        labels.append(f"{r['environment']['device_name'][:40]}\n(paper | cpu preset, fp32)")
        plain.append(1.0 / recs["paper"]["s_per_image"])
        opt.append(1.0 / recs["cpu"]["s_per_image"])
        e2e.append(0)
    fig, ax = plt.subplots(figsize=(max(6, 2.6 * len(labels)), 4.8))
    x = np.arange(len(labels))
    w = 0.27
    ax.bar(x - w, plain, w, label="plain recipe fp32, batch 1 / CPU: paper recipe")
    ax.bar(x, opt, w, label="optimised extract (bf16, batched, early stop) / CPU: cpu preset")
    ax.bar(x + w, e2e, w, label="end to end: compute_fused_features on JPEG files (faster of eager / compiled)")
    for xi, vals in enumerate(zip(plain, opt, e2e)):
        for dx, v in zip((-w, 0, w), vals):
            if v:
                ax.text(xi + dx, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("images / s (paper recipe unless noted)")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.axhline(TARGETS["images_per_s"], ls="--", lw=0.8, color="gray")
    ax.text(len(labels) - 0.5, TARGETS["images_per_s"], " target 30/s (H100)", va="bottom", ha="right", fontsize=7, color="gray")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, frameon=False)
    ax.set_title("SD + DINOv2 feature extraction (random weights, real architectures)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# ====================================================================== CLI
def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiny", action="store_true", help="tiny random models and a small recipe (seconds on a CPU; not a speed claim)")
    p.add_argument("--matching-only", action="store_true", help="only the feature store and matching benchmarks, on fused maps of the paper's size (1536 x 60 x 60) from random values (no models)")
    p.add_argument("--cpu-preset", action="store_true", help="cost per image on this CPU, full-size models, paper recipe vs PRESETS['cpu'] (batch 1, fp32)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="JSON path (default: results/bench-<device>-<date>.json)")
    p.add_argument("--images", type=int, default=None, help="images timed per optimised batch size (default 32 on CUDA, 4 on CPU; --cpu-preset: per recipe, default 2)")
    p.add_argument("--plain-images", type=int, default=None, help="images timed on the plain path (default 8 on CUDA, 2 on CPU)")
    p.add_argument("--agree-images", type=int, default=4, help="images for the bf16 vs fp32 agreement (<= plain images)")
    p.add_argument("--batch", default=None, help="images per pass of the optimised path; a comma list sweeps (default '1,2,4,8,16' on CUDA, '1,2' on CPU)")
    p.add_argument("--dtype", default="bf16", help="optimised path dtype: bf16 (fp16 where unsupported) or fp16 / fp32")
    p.add_argument("--preset", default="paper", help="recipe preset for the extraction runs (paper, whole, cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks of the optimised path")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (default, reduce-overhead = CUDA graphs, max-autotune)")
    p.add_argument("--channels-last", action="store_true",
                   help="NHWC convolutions on the optimised path (off by default, as in FeatureExtractor: slower on an H100)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up batches before timing (default 1; --cpu-preset: 0)")
    p.add_argument("--keypoints", type=int, default=20, help="keypoints per source in the matching benchmark")
    p.add_argument("--targets", type=int, default=None, help="target images in the matching / store benchmark (default 64, tiny 16)")
    p.add_argument("--mem-cap-gb", type=float, default=8.0, help="memory cap (GB, 1e9 bytes) for choosing the batch")
    p.add_argument("--models-dir", default=None, help="where the random full-size (or tiny) checkpoints are built (default ~/.cache/fiftyone_sdcorr/full-random or $SDCORR_BENCH_MODELS)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--no-end-to-end", action="store_true",
                   help="skip the end-to-end compute_fused_features stage (it needs FiftyOne's database)")


def _fill_defaults(args) -> None:
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") and not args.cpu_preset
    if args.images is None:
        args.images = 2 if (args.cpu_preset or args.tiny) else (32 if cuda else 4)
    if args.plain_images is None:
        args.plain_images = 8 if cuda else 2
    if args.batch is None:
        args.batch = "1,2,4,8,16" if cuda else ("1,2" if args.tiny else "1")
    if args.warmup is None:
        args.warmup = 0 if (args.cpu_preset or args.tiny) else 1
    if args.targets is None:
        args.targets = 8 if args.tiny else 64


def main_bench(args) -> int:
    args._t0 = time.perf_counter()
    _fill_defaults(args)
    if args.tiny and args.cpu_preset:
        raise SystemExit("--tiny and --cpu-preset exclude each other")
    result = run_bench(args)
    print(format_table(result))
    print(f"\nwrote {result['_path']}")
    return 0


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", default=["results"], help="result files or folders (default: results/)")
    p.add_argument("--md", default="results/BENCHMARKS.md", help="markdown table to write")
    p.add_argument("--png", default="results/benchmarks.png", help="plot to write (needs matplotlib)")
    p.add_argument("--readme", default=None,
                   help="also put the table (and the plot's link) into this file, between the lines "
                        f"{README_START!r} and {README_END!r}, or in place of a line 'BENCH_TABLE'")


README_START = "<!-- bench-report:start -->"
README_END = "<!-- bench-report:end -->"


def update_readme(path, md: str, png: Optional[str]) -> bool:
    """Replace the marked benchmark block of a README (or its ``BENCH_TABLE`` line)."""
    path = Path(path)
    text = path.read_text()
    body = md.rstrip("\n")
    if png:
        try:
            rel = os.path.relpath(Path(png).resolve(), path.resolve().parent)
        except ValueError:
            rel = str(png)
        body += f"\n\n![benchmark plot]({rel})"
    block = f"{README_START}\n{body}\n{README_END}"
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        _, tail = rest.split(README_END, 1)
        new = head + block + tail
    elif re.search(r"(?m)^BENCH_TABLE[ \t]*$", text):
        new = re.sub(r"(?m)^BENCH_TABLE[ \t]*$", lambda _m: block, text, count=1)
    else:
        return False
    path.write_text(new)
    return True


def main_report(args) -> int:
    results = load_results(args.inputs or ["results"])
    md = report_markdown(results)
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(md)
    print(md)
    png = None
    try:
        png = report_plot(results, args.png)
    except ImportError as e:
        print(f"no plot: {e}", file=sys.stderr)
    print(f"wrote {args.md}" + (f" and {png}" if png else ""))
    if args.readme:
        if not update_readme(args.readme, md, png):
            print(f"{args.readme} has neither the {README_START} / {README_END} markers nor a BENCH_TABLE line",
                  file=sys.stderr)
            return 1
        print(f"updated {args.readme}")
    return 0
