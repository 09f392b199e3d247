"""Dense stage of the benchmark (issue 17, item 7): :func:`fiftyone_sdcorr.core.matching.dense.dense_match`
(every target cell's nearest source cell, with the cycle check) and
:meth:`~fiftyone_sdcorr.core.matching.dense.DenseMatch.sample` (the match at every target pixel) on
consecutive pairs of the run's fused maps.

Reported per grid resolution: target cells matched per second, target pixels per second
(matching and sampling together), seconds per pair, the peak device memory (CUDA) and the
bytes the method needs by construction (the two upsampled descriptor grids plus one chunk
of similarities), which is what bounds it on the CPU; and the plain reference: the paper's
swapping notebook matches one target pixel at a time in a Python loop, timed here on
:data:`LOOP_CELLS` cells of the same upsampled grids (the forward match only) and reported
as cells per second and the ratio of the chunked match to it.

No FiftyOne import.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fiftyone_sdcorr.bench.common import Clock, peak_mem, rate, reset_peak
from fiftyone_sdcorr.bench.store_matching import to_device

#: grid resolutions timed (60: the token grid at the paper recipe, TSS's default; 120: twice as fine)
DENSE_RESOLUTIONS = (60, 120)
#: target cells the plain per-pixel loop is timed on (its rate does not depend on how many)
LOOP_CELLS = 200


def loop_cells_per_s(source, target, resolution: int, device) -> float:
    """The plain reference: one target cell at a time, its cosine with every source cell
    and the argmax (forward only, no cycle: the loop's cost is a lower bound)."""
    from fiftyone_sdcorr.core.matching.dense import region_on_grid, upsample

    n = resolution * resolution
    src = upsample(source, resolution).reshape(n, -1)[region_on_grid(source.letterbox, resolution,
                                                                     device=device).reshape(-1)]
    tgt = upsample(target, resolution).reshape(n, -1)[:LOOP_CELLS]
    with Clock(device) as c:
        for i in range(tgt.shape[0]):
            int((src @ tgt[i]).argmax())
    return rate(tgt.shape[0], c.seconds)


def _pairs(fused: list, n: int) -> list:
    return [(fused[i], fused[(i + 1) % len(fused)]) for i in range(min(n, len(fused)))]


def dense_entry(pairs: list, device: torch.device, resolution: int) -> dict:
    """One resolution: warm-up on the first pair, then every pair matched and sampled."""
    from fiftyone_sdcorr.core.matching.dense import DEFAULT_CHUNK, dense_match

    dense_match(*pairs[0], resolution=resolution)  # warm-up (kernels, allocator)
    reset_peak(device)
    with Clock(device) as cm:
        matches = [dense_match(a, b, resolution=resolution) for a, b in pairs]
    with Clock(device) as cs:
        pixels = sum(int(m.sample().valid.size) for m in matches)
    cells = sum(int(m.valid.sum()) for m in matches)
    channels = int(pairs[0][0].descriptors.shape[0])
    grid = resolution * resolution
    loop = loop_cells_per_s(*pairs[0], resolution, device)
    return {
        "resolution": resolution,
        "target_cells": cells,
        "cells_per_s": rate(cells, cm.seconds),
        "pixels": pixels,
        "pixels_per_s": rate(pixels, cm.seconds + cs.seconds),
        "match_s_per_pair": cm.seconds / len(pairs),
        "sample_s_per_pair": cs.seconds / len(pairs),
        "peak_bytes": peak_mem(device),
        "working_bytes": int(2 * grid * channels * 4 + min(DEFAULT_CHUNK, grid) * grid * 4),
        "loop_cells_per_s": loop,
        "speedup_vs_loop": rate(cells, cm.seconds) / loop if loop else None,
    }


def bench_dense(fused: list, device, resolutions: Sequence[int] = DENSE_RESOLUTIONS, pairs: int = 2) -> dict:
    """The dense stage on ``pairs`` consecutive pairs of ``fused`` (module docstring)."""
    dev = torch.device(device)
    maps = [to_device(f, dev) for f in fused[: max(2, pairs + 1)]]
    if len(maps) < 2:
        return {"device": str(dev), "skipped": "needs two images"}
    chosen = _pairs(maps, pairs)
    return {
        "device": str(dev),
        "pairs": len(chosen),
        "cycle": True,
        "channels": int(maps[0].descriptors.shape[0]),
        "resolutions": {str(r): dense_entry(chosen, dev, int(r)) for r in resolutions},
    }


__all__ = ["DENSE_RESOLUTIONS", "LOOP_CELLS", "bench_dense", "dense_entry", "loop_cells_per_s"]
