"""End-to-end stage of the benchmark: the public API on JPEG files of mixed sizes.

``compute_fused_features`` on a FiftyOne dataset (needs FiftyOne's database) and, for
machines without one, its pipeline without database writes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import torch

from fiftyone_sdcorr.bench.common import Clock, fmt_bytes, fmt_num, log, peak_mem, rate, reset_peak
from fiftyone_sdcorr.bench.extraction import make_extractor


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
        with Clock(device) as cw:
            compute_fused_features(ds.select(ids[:2]), extractor=ext, store_dir=str(tmp / "warmup"), progress=False)
        target = ds.select(ids[2:])
        reset_peak(device)
        with Clock(device) as c:
            summary = compute_fused_features(target, extractor=ext, store_dir=str(tmp / "store"),
                                             embedding_field="e2e_embedding", features_field="e2e_features",
                                             progress=False)
        peak = peak_mem(device)
        out = {"images": n, "seconds": c.seconds, "images_per_s": rate(summary["computed"], c.seconds),
               "batch": ext.batch_size, "peak_mem_bytes": peak, "computed": summary["computed"],
               "failed": summary["failed"], "projection_fitted_in_run": True, "compiled": compiled,
               "warmup_seconds": cw.seconds, "channels_last": ext.channels_last,
               "store_bytes_per_sample": _first_file_bytes(summary["store_dir"])}
        log(f"end to end: {fmt_num(out['images_per_s'])} images/s at batch {ext.batch_size}, peak {fmt_bytes(peak)}", quiet)
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
    """``compute_fused_features``' own pipeline (:func:`fiftyone_sdcorr.core.features.pipeline.pipelined`)
    on JPEG files of mixed sizes without FiftyOne: decoding on loader threads, the models,
    projection, fusion and store encoding on the device, files written, embeddings made;
    no database writes, no claims. For machines where FiftyOne's database cannot run (the
    lent GPU machines: no MongoDB). The projection is fitted on two other files first."""
    from concurrent.futures import ThreadPoolExecutor

    from fiftyone_sdcorr.core.features.extractor import PREP_THREADS
    from fiftyone_sdcorr.core.features.featurizer import Featurizer
    from fiftyone_sdcorr.core.common.images import load_image
    from fiftyone_sdcorr.core.features.pipeline import pipelined
    from fiftyone_sdcorr.core.features.store import FeatureStore

    tmp = Path(tempfile.mkdtemp(prefix="sdcorr-bench-pipe."))
    n = max(args.images, 8)
    try:
        paths = _jpeg_files(images, n + 2, tmp / "jpg")
        ext = make_extractor(sd_dir, dino_dir, device, dtype, None, rkw, channels_last=args.channels_last)
        if compiled:
            ext.compile_models(args.compile_mode)
        with Clock(device) as cw:
            fz = Featurizer(ext)
            fz.fit(fz.extract(paths[:2]))
        store = FeatureStore(tmp / "store")
        b, todo = ext.batch_size, paths[2:]
        reset_peak(device)
        with Clock(device) as c, ThreadPoolExecutor(PREP_THREADS) as pool:
            batches = ((todo[i:i + b], list(pool.map(load_image, todo[i:i + b])), None) for i in range(0, n, b))
            done = 0
            for keys, got in pipelined(fz, batches, torch.float16):
                if isinstance(got, Exception):
                    raise got
                for key, enc in zip(keys, got):
                    store.save(Path(key).stem, enc.fused, dtype=torch.float16, encoded=enc.tensors)
                    enc.embedding.numpy()
                    done += 1
        peak = peak_mem(device)
        out = {"images": n, "seconds": c.seconds, "images_per_s": rate(done, c.seconds), "batch": b,
               "peak_mem_bytes": peak, "computed": done, "compiled": compiled, "warmup_seconds": cw.seconds,
               "channels_last": ext.channels_last, "call": "core.features.pipeline.pipelined + FeatureStore.save (no database)"}
        log(f"pipeline (no database): {fmt_num(out['images_per_s'])} images/s at batch {b}, peak {fmt_bytes(peak)}", quiet)
        return out
    except Exception as e:  # noqa: BLE001 -- report, do not lose the rest of the bench
        return {"error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _first_file_bytes(root) -> Optional[int]:
    """Size of one sample file of a store namespace."""
    files = [f for f in sorted(Path(root).rglob("*.safetensors")) if f.parent.name != "_tensors"]
    return files[0].stat().st_size if files else None


def run_end_to_end(result: dict, models: tuple, device, opt_dtype, rkw: dict, images: list, plain: dict, args,
                   quiet: bool) -> None:
    """The end-to-end entries of ``result`` (``end_to_end``, ``pipeline``; with ``--compile``
    also their compiled variants), each with its speedup over the plain recipe."""
    sd_dir, dino_dir = models
    log("end to end: compute_fused_features on a FiftyOne dataset of JPEG files", quiet)
    result["end_to_end"] = bench_end_to_end(sd_dir, dino_dir, device, opt_dtype, rkw, images, args, quiet)
    if args.compile:
        log("end to end, compiled (what runs of COMPILE_MIN_IMAGES images or more do by default)", quiet)
        result["end_to_end_compiled"] = bench_end_to_end(sd_dir, dino_dir, device, opt_dtype, rkw, images, args,
                                                         quiet, compiled=True)
    log("pipeline without a database: compute_fused_features' pipeline on the same JPEG files", quiet)
    result["pipeline"] = bench_pipeline(sd_dir, dino_dir, device, opt_dtype, rkw, images, args, quiet)
    if args.compile:
        result["pipeline_compiled"] = bench_pipeline(sd_dir, dino_dir, device, opt_dtype, rkw, images, args,
                                                     quiet, compiled=True)
    for key in ("end_to_end", "end_to_end_compiled", "pipeline", "pipeline_compiled"):
        e2e = result.get(key) or {}
        if e2e.get("images_per_s") and plain["images_per_s"]:
            e2e["speedup_vs_plain"] = e2e["images_per_s"] / plain["images_per_s"]
