"""What every stage of the benchmark shares: the schema and targets, the synced clock,
memory peaks, progress lines, rates, number formats, the bundled configs and the
environment record.

No FiftyOne import.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import re
import resource
import sys
import time
from pathlib import Path
from typing import Optional

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


# ====================================================================== time, memory, logging
def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall-clock seconds with a device sync at both ends."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.seconds = 0.0

    def __enter__(self):
        sync(self.device)
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds += time.perf_counter() - self._t
        return False


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mem(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def rss_peak_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def rate(count: float, seconds: float) -> Optional[float]:
    return float(count / seconds) if seconds > 0 else None


# ====================================================================== number formats
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


def fmt_num(x, spec=".4g") -> str:
    """``x`` formatted with ``spec``, ``"n/a"`` for None."""
    return "n/a" if x is None else format(x, spec)


# ====================================================================== configs, environment
def load_config(name: str) -> dict:
    """A bundled architecture config (``configs/<name>.json``) without ``_``-keys."""
    path = CONFIG_DIR / (name if name.endswith(".json") else f"{name}.json")
    d = json.loads(path.read_text())
    return {k: v for k, v in d.items() if not k.startswith("_")}


def _cpu_name() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


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
    cpu_name = _cpu_name()
    if cpu_name is not None:
        env["cpu_name"] = cpu_name
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
