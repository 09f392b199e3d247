"""Optical-flow files: Middlebury ``.flo`` and numpy ``.npy`` (``H x W x 2``).

A flow field here is an ``H x W x 2`` float32 array on the grid of one image: at pixel
``(x, y)`` it holds ``(u, v)``, the displacement to the corresponding point ``(x + u, y + v)``
of the other image (TSS's ``flowN.flo`` lies on ``imageN``; see
:func:`fiftyone_sdcorr.core.benchmarks.formats.read_tss`).

- ``.flo`` (Middlebury, as TSS ships and as ``load_flo`` in ``utils/utils_tss.py`` of
  ``Junyi42/sd-dino`` reads it): the float32 magic ``202021.25``, int32 width, int32 height,
  then ``width * height`` float32 ``(u, v)`` pairs, row by row, little-endian. A file
  shorter or longer than its header says is an error here (``np.resize`` in sd-dino would
  silently repeat or cut the data).
- ``.npy``: an ``H x W x 2`` array of a real float or integer dtype, read with
  ``np.load(allow_pickle=False)``: a pickled (object) array is refused, never unpickled.

Every failure is a :class:`~fiftyone_sdcorr.core.benchmarks.formats.BenchmarkFormatError`
naming the file and what is wrong. No FiftyOne import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np

from fiftyone_sdcorr.core.benchmarks.errors import BenchmarkFormatError
from fiftyone_sdcorr.core.common.files import write_atomic

FLO_MAGIC = 202021.25
FLOW_SUFFIXES = (".flo", ".npy")
#: largest width or height accepted in a header (a guard against a garbage header)
MAX_SIDE = 1 << 16


def flo_size(path) -> Tuple[int, int]:
    """``(width, height)`` from a ``.flo`` header, checked (magic, positive sizes, file
    length), without reading the data."""
    path = Path(path)
    head = _read_bytes(path, 12)
    w, h = _flo_header(path, head)
    want = 12 + 8 * w * h
    got = path.stat().st_size
    if got != want:
        raise BenchmarkFormatError(f"{path}: a {w} x {h} .flo file must be {want} bytes, got {got} "
                                   "(truncated or not a Middlebury flow file)")
    return w, h


def _read_bytes(path: Path, n=None) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read() if n is None else f.read(n)
    except FileNotFoundError:
        raise BenchmarkFormatError(f"missing file {path}") from None
    except IsADirectoryError:
        raise BenchmarkFormatError(f"{path}: a folder, not a flow file") from None
    except OSError as e:
        raise BenchmarkFormatError(f"{path}: not readable ({e.strerror or e})") from None


def _flo_header(path: Path, head: bytes) -> Tuple[int, int]:
    if len(head) < 12:
        raise BenchmarkFormatError(f"{path}: {len(head)} bytes; a .flo file starts with a 12-byte header")
    magic = float(np.frombuffer(head[:4], "<f4")[0])
    if magic != FLO_MAGIC:
        raise BenchmarkFormatError(f"{path}: magic number {magic!r}, expected {FLO_MAGIC} "
                                   "(not a Middlebury .flo file)")
    w, h = (int(v) for v in np.frombuffer(head[4:12], "<i4"))
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
        raise BenchmarkFormatError(f"{path}: header size {w} x {h} is not a plausible image size")
    return w, h


def read_flo(path) -> np.ndarray:
    """A Middlebury ``.flo`` file -> ``H x W x 2`` float32 (module docstring)."""
    path = Path(path)
    data = _read_bytes(path)
    w, h = _flo_header(path, data[:12])
    want = 12 + 8 * w * h
    if len(data) != want:
        raise BenchmarkFormatError(f"{path}: a {w} x {h} .flo file must be {want} bytes, got {len(data)} "
                                   "(truncated or not a Middlebury flow file)")
    return np.frombuffer(data[12:], "<f4").reshape(h, w, 2).astype(np.float32)


def write_flo(path, flow) -> None:
    """Writes an ``H x W x 2`` flow as a Middlebury ``.flo`` file (whole or not at all:
    temporary file + rename)."""
    flow = _checked_array(np.asarray(flow), Path(path))
    h, w = flow.shape[:2]
    head = np.array([FLO_MAGIC], "<f4").tobytes() + np.array([w, h], "<i4").tobytes()
    write_atomic(path, head + np.ascontiguousarray(flow, dtype="<f4").tobytes(), fsync=False)


def read_npy_flow(path) -> np.ndarray:
    """An ``H x W x 2`` ``.npy`` array -> float32; never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFormatError(f"missing file {path}" if not path.exists() else f"{path}: not a file")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:  # an object array needs pickle: refused
        raise BenchmarkFormatError(f"{path}: not a plain numpy array ({e}); pickled arrays are refused") from None
    except (OSError, EOFError) as e:
        raise BenchmarkFormatError(f"{path}: not a readable .npy file ({e})") from None
    if not isinstance(arr, np.ndarray):
        raise BenchmarkFormatError(f"{path}: holds {type(arr).__name__}, expected one H x W x 2 array (.npy)")
    return _checked_array(arr, path).astype(np.float32)


def _checked_array(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim != 3 or arr.shape[2] != 2 or not arr.shape[0] or not arr.shape[1]:
        raise BenchmarkFormatError(f"{path}: a flow must be an H x W x 2 array, got shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "fiu":
        raise BenchmarkFormatError(f"{path}: a flow must hold real numbers, got dtype {arr.dtype}")
    return arr


def read_flow(path) -> np.ndarray:
    """A ``.flo`` or ``.npy`` flow file -> ``H x W x 2`` float32 (by suffix)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".flo":
        return read_flo(path)
    if suffix == ".npy":
        return read_npy_flow(path)
    raise BenchmarkFormatError(f"{path}: unknown flow file type {suffix!r}; use .flo or .npy")


__all__ = ["FLO_MAGIC", "FLOW_SUFFIXES", "flo_size", "read_flo", "write_flo", "read_npy_flow", "read_flow"]
