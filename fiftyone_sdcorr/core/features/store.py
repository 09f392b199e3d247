"""On-disk store of dense fused feature maps: one safetensors file per sample.

Layout under ``root``::

    root/
      3f/65a1b2c3d4e5f60718293a4b.safetensors   one file per key (a sample id)
      _tensors/projection.safetensors           named tensors for the whole store

Keys are sharded into 256 subfolders by the first two hex digits of ``sha1(key)``.
(Sharding by the key's own first characters would put nearly every FiftyOne sample id in
one folder: an ObjectId starts with its creation time.)

Each sample file holds one tensor, ``"descriptors"`` (``C x G x G``, float16 by default),
and safetensors string metadata: ``format``, ``format_version``, ``key``, ``letterbox``
(JSON), ``stride``, ``sd_channels`` and ``meta`` (JSON). Writes are atomic (a temporary
file in the same folder, then ``os.replace``), so readers and concurrent writers never see
half a file. Only safetensors is read or written: nothing is ever unpickled.

Pure torch / safetensors; no FiftyOne import.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save as _st_save

from fiftyone_sdcorr.core.features.fusion import FusedFeatures, RawFeatures
from fiftyone_sdcorr.core.common.files import TMP_PREFIX, write_atomic
from fiftyone_sdcorr.core.common.geometry import Letterbox

FORMAT = "fiftyone-sdcorr/dense"
TENSORS_FORMAT = "fiftyone-sdcorr/tensors"
RAW_FORMAT = "fiftyone-sdcorr/raw"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"
TENSORS_DIR = "_tensors"
_TMP_PREFIX = TMP_PREFIX

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")

PathOrKey = Union[str, "os.PathLike[str]"]


class FeatureStoreError(Exception):
    """A stored file is missing, corrupt, or not a feature file; the message names it."""


class FeatureNotFoundError(FeatureStoreError, FileNotFoundError):
    """No stored file at that path / for that key."""


def default_store_root() -> str:
    """``$SDCORR_STORE_DIR`` if set, else ``~/fiftyone/sdcorr_features``.

    (``~/fiftyone`` is FiftyOne's own default directory; FiftyOne is not imported here.)
    """
    env = os.environ.get("SDCORR_STORE_DIR")
    if env:
        return env
    return os.path.join(os.path.expanduser("~"), "fiftyone", "sdcorr_features")


def _check_name(name: str, what: str = "key") -> str:
    if not isinstance(name, str) or not _KEY_RE.match(name) or name.endswith(SUFFIX):
        raise ValueError(
            f"invalid {what} {name!r}: use 1-200 characters from A-Z a-z 0-9 _ . - "
            f"starting with a letter or digit, not ending in {SUFFIX!r}"
        )
    return name


def _write_atomic(path: Path, data: bytes, fsync: bool) -> None:
    """Write ``data`` to a temporary file next to ``path``, then ``os.replace`` it."""
    write_atomic(path, data, fsync)


def _read(path: Path, device) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """All tensors and the metadata of a safetensors file, with errors naming the file."""
    if not path.is_file():
        raise FeatureNotFoundError(f"feature file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FeatureStoreError:
        raise
    except Exception as e:  # SafetensorError, OSError, ...
        raise FeatureStoreError(
            f"corrupt, truncated or non-safetensors feature file {path}: {e}"
        ) from e
    return tensors, metadata


#: dtypes a store can hold: floats as they are, int8 with one float32 scale per channel
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "int8": torch.int8}


def encode(descriptors: torch.Tensor, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """The tensors a file holds for ``descriptors`` (``C x G x G``) in ``dtype``: the cast,
    or for int8 the rounded ``descriptors / scale`` and the per-channel ``scale``
    (max |value| / 127) that :meth:`FeatureStore.load` multiplies back."""
    if dtype == torch.int8:
        scale = descriptors.float().abs().amax(dim=(1, 2)).clamp_min(1e-12) / 127.0
        q = torch.round(descriptors.float() / scale[:, None, None]).clamp(-127, 127).to(torch.int8)
        return {"descriptors": q.contiguous(), "scale": scale.contiguous()}
    return {"descriptors": descriptors.to(dtype).contiguous()}


def stored_values(descriptors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What :meth:`FeatureStore.load` returns (float32) for ``descriptors`` saved in ``dtype``
    (computed on ``descriptors``' device)."""
    return decode(encode(descriptors.detach(), dtype))


def stored_embedding(fused: FusedFeatures, tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The global vector of the values a file holds (``tensors`` made by :func:`encode` from
    ``fused``), on their device: the same for a computed, a recovered or a copied sample."""
    return replace(fused, descriptors=decode(tensors)).global_vector()


def decode(tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 descriptors from what :func:`encode` made (on the tensors' device)."""
    d = tensors["descriptors"].float()
    return d * tensors["scale"].float()[:, None, None] if "scale" in tensors else d


def read_header(path: Path) -> Tuple[Dict[str, str], bool]:
    """``(metadata, size_ok)`` of a safetensors file from its header alone; ``size_ok`` is
    False when the file is shorter or longer than the header declares."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FeatureStoreError(f"corrupt, truncated or non-safetensors feature file {path}: too short")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > min(size - 8, 100 << 20):
                raise FeatureStoreError(f"corrupt, truncated or non-safetensors feature file {path}: bad header")
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise FeatureNotFoundError(f"feature file not found: {path}") from None
    except FeatureStoreError:
        raise
    except (OSError, ValueError) as e:
        raise FeatureStoreError(f"corrupt, truncated or non-safetensors feature file {path}: {e}") from e
    if not isinstance(header, dict):
        raise FeatureStoreError(f"corrupt, truncated or non-safetensors feature file {path}: bad header")
    md = header.pop("__metadata__", None) or {}
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise FeatureStoreError(f"corrupt feature file {path}: bad tensor table ({e})") from e
    return {str(k): str(v) for k, v in md.items()}, size == 8 + n + end


def _check_format(path: Path, metadata: Dict[str, str], expected: str) -> None:
    fmt = metadata.get("format")
    if fmt != expected:
        raise FeatureStoreError(f"{path} is not a {expected} file (format={fmt!r})")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise FeatureStoreError(f"{path}: bad format_version {metadata.get('format_version')!r}")
    if version > FORMAT_VERSION:
        raise FeatureStoreError(
            f"{path} has format version {version}; this fiftyone-sdcorr reads up to "
            f"{FORMAT_VERSION}: upgrade the package or recompute the features"
        )


class FeatureStore:
    """Dense fused feature maps on disk, one safetensors file per key (sample id).

    Args:
        root: folder of the store (created on first save); default
            :func:`default_store_root`.
        fsync: flush each file to disk before renaming it into place (durable across a
            crash; turn off for speed on scratch stores).
    """

    def __init__(self, root: Optional[PathOrKey] = None, fsync: bool = True):
        self.root = Path(root if root is not None else default_store_root()).expanduser()
        self.fsync = bool(fsync)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r})"

    # ---- paths --------------------------------------------------------------------
    def path_for(self, key: str) -> Path:
        """Where the features of ``key`` live (whether or not they exist)."""
        _check_name(key)
        shard = hashlib.sha1(key.encode("utf-8")).hexdigest()[:2]
        return self.root / shard / f"{key}{SUFFIX}"

    def _resolve(self, path_or_key: PathOrKey) -> Path:
        """A ``PathLike``, or a ``str`` with a separator or the ``.safetensors`` suffix, is
        a path; any other ``str`` is a key."""
        if isinstance(path_or_key, os.PathLike):
            return Path(path_or_key)
        if isinstance(path_or_key, str):
            if path_or_key.endswith(SUFFIX) or "/" in path_or_key or os.sep in path_or_key:
                return Path(path_or_key)
            return self.path_for(path_or_key)
        raise TypeError(f"expected a key or a path, got {type(path_or_key).__name__}")

    # ---- dense maps ---------------------------------------------------------------
    def save(self, key: str, fused: FusedFeatures, dtype: torch.dtype = torch.float16,
             fingerprint: str = "", encoded: Optional[Dict[str, torch.Tensor]] = None) -> Path:
        """Write ``fused`` for ``key`` atomically; returns the file's path. ``fingerprint``
        (what produced the features: models, recipe, projection) goes into the header;
        :meth:`check` compares it. ``encoded``: the file's tensors already made by
        :func:`encode` in ``dtype`` (on the GPU, copied to the host), used as they are."""
        path = self.path_for(key)
        d = fused.descriptors
        if not isinstance(d, torch.Tensor) or d.dim() != 3:
            raise ValueError(
                f"descriptors must be a C x G x G tensor, got {getattr(d, 'shape', type(d))}"
            )
        if not (0 <= int(fused.sd_channels) <= d.shape[0]):
            raise ValueError(f"sd_channels={fused.sd_channels} outside 0..{d.shape[0]}")
        tensors = encode(d.detach().to("cpu"), dtype) if encoded is None else {
            k: v.to("cpu").contiguous() for k, v in encoded.items()}
        t = tensors["descriptors"]
        if dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            src_finite = encoded is None and bool(torch.isfinite(d.detach()).all())
            raise ValueError(
                f"descriptors for {key!r} "
                + (f"overflow {dtype}; save with a wider dtype" if src_finite else "contain NaN/inf")
            )
        try:
            meta_json = json.dumps(fused.meta or {}, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise ValueError(f"FusedFeatures.meta must be JSON-serialisable: {e}") from e
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "key": key,
            "letterbox": json.dumps(fused.letterbox.to_dict(), sort_keys=True),
            "stride": str(int(fused.stride)),
            "sd_channels": str(int(fused.sd_channels)),
            "meta": meta_json,
            "fingerprint": str(fingerprint),
        }
        _write_atomic(path, _st_save(tensors, metadata=metadata), self.fsync)
        return path

    def load(
        self,
        path_or_key: PathOrKey,
        device: Union[str, torch.device] = "cpu",
        dtype: Optional[torch.dtype] = torch.float32,
    ) -> FusedFeatures:
        """Read features saved by :meth:`save` (``dtype=None`` keeps the stored dtype)."""
        path = self._resolve(path_or_key)
        tensors, md = _read(path, device)
        _check_format(path, md, FORMAT)
        if "descriptors" not in tensors:
            raise FeatureStoreError(f"{path} has no 'descriptors' tensor")
        d = tensors["descriptors"]
        try:
            letterbox = Letterbox.from_dict(json.loads(md["letterbox"]))
            stride = int(md["stride"])
            sd_channels = int(md["sd_channels"])
            meta = json.loads(md.get("meta") or "{}")
        except Exception as e:
            raise FeatureStoreError(f"{path} has bad or missing metadata: {e!r}") from e
        if d.dim() != 3 or not (0 <= sd_channels <= d.shape[0]):
            raise FeatureStoreError(
                f"{path}: descriptors of shape {tuple(d.shape)} do not match sd_channels={sd_channels}"
            )
        if "scale" in tensors:  # int8 with a scale per channel
            d = d.float() * tensors["scale"].float()[:, None, None]
        if dtype is not None and d.dtype != dtype:
            d = d.to(dtype)
        return FusedFeatures(
            descriptors=d, letterbox=letterbox, stride=stride, sd_channels=sd_channels, meta=meta
        )

    def check(self, path_or_key: PathOrKey, fingerprint: Optional[str] = None) -> Optional[str]:
        """Why the stored file is not usable, or ``None`` when it is: it exists, its header
        parses, its size is what the header declares (not truncated), it is a feature file,
        and (when given) its fingerprint is ``fingerprint``. Reads the header only."""
        path = self._resolve(path_or_key)
        try:
            md, size_ok = read_header(path)
        except FeatureStoreError as e:
            return str(e)
        if not size_ok:
            return f"truncated feature file {path} (its size differs from its header)"
        if md.get("format") != FORMAT:
            return f"{path} is not a {FORMAT} file"
        if fingerprint is not None and md.get("fingerprint") != fingerprint:
            return (f"{path} was computed with other settings (fingerprint {md.get('fingerprint') or 'none'!r}, "
                    f"expected {fingerprint!r})")
        return None

    # ---- raw maps (before any PCA: what evaluate-pairs' ablations share) ------------
    def save_raw(self, key: str, raw: RawFeatures, fingerprint: str = "") -> Path:
        """Write the raw SD tap maps and DINO tokens of one image (float16) for ``key``."""
        tensors = {f"sd_{tap}": m.detach().to("cpu", torch.float16).contiguous() for tap, m in raw.sd.items()}
        tensors["dino"] = raw.dino.detach().to("cpu", torch.float16).contiguous()
        metadata = {
            "format": RAW_FORMAT, "format_version": str(FORMAT_VERSION), "key": key,
            "sd_letterbox": json.dumps(raw.sd_letterbox.to_dict(), sort_keys=True),
            "dino_letterbox": json.dumps(raw.dino_letterbox.to_dict(), sort_keys=True),
            "dino_stride": str(int(raw.dino_stride)), "source": raw.source or "", "fingerprint": str(fingerprint),
        }
        path = self.path_for(key)
        _write_atomic(path, _st_save(tensors, metadata=metadata), self.fsync)
        return path

    def load_raw(self, key: str, fingerprint: Optional[str] = None) -> Optional[RawFeatures]:
        """The raw features saved for ``key`` (float32), or None when there is no usable
        file: missing, truncated, not raw maps, or of another ``fingerprint``."""
        path = self.path_for(key)
        try:
            md, size_ok = read_header(path)
        except FeatureStoreError:
            return None
        if not size_ok or md.get("format") != RAW_FORMAT or (fingerprint is not None and md.get("fingerprint") != fingerprint):
            return None
        try:  # a damaged file is a cache miss: recomputed and replaced, never a crash
            tensors, md = _read(path, "cpu")
            return RawFeatures(
                sd={k[3:]: v.float() for k, v in tensors.items() if k.startswith("sd_")},
                dino=tensors["dino"].float(),
                sd_letterbox=Letterbox.from_dict(json.loads(md["sd_letterbox"])),
                dino_letterbox=Letterbox.from_dict(json.loads(md["dino_letterbox"])),
                dino_stride=int(md["dino_stride"]), source=md.get("source") or None)
        except (FeatureStoreError, KeyError, TypeError, ValueError):
            return None

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    __contains__ = exists

    def delete(self, key: str) -> bool:
        """Remove the features of ``key``; ``False`` if there were none."""
        try:
            self.path_for(key).unlink()
            return True
        except FileNotFoundError:
            return False

    def keys(self) -> Iterator[str]:
        """Keys with stored features (unordered; temporary files are skipped)."""
        if not self.root.is_dir():
            return
        for shard in self.root.iterdir():
            if not shard.is_dir() or len(shard.name) != 2:
                continue
            for p in shard.iterdir():
                if p.name.endswith(SUFFIX) and not p.name.startswith(_TMP_PREFIX):
                    yield p.name[: -len(SUFFIX)]

    def bytes_per_sample(self, path_or_key: PathOrKey) -> int:
        """Size on disk of one stored file, in bytes."""
        path = self._resolve(path_or_key)
        try:
            return path.stat().st_size
        except FileNotFoundError:
            raise FeatureNotFoundError(f"feature file not found: {path}") from None

    # ---- store-wide named tensors (e.g. a fitted projection) ------------------------
    def tensors_path(self, name: str) -> Path:
        return self.root / TENSORS_DIR / f"{_check_name(name, 'name')}{SUFFIX}"

    def save_tensors(
        self, name: str, tensors: Dict[str, torch.Tensor], metadata: Optional[dict] = None
    ) -> Path:
        """Write small named tensors for the whole store, with JSON-serialisable metadata."""
        path = self.tensors_path(name)
        if not tensors:
            raise ValueError("save_tensors needs at least one tensor")
        out = {}
        for k, v in tensors.items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise TypeError(f"tensors must map str to torch.Tensor, got {k!r}: {type(v).__name__}")
            out[k] = v.detach().to("cpu").contiguous().clone()
        try:
            meta_json = json.dumps(metadata or {}, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata must be JSON-serialisable: {e}") from e
        md = {"format": TENSORS_FORMAT, "format_version": str(FORMAT_VERSION), "meta": meta_json}
        _write_atomic(path, _st_save(out, metadata=md), self.fsync)
        return path

    def load_tensors(
        self, name: str, device: Union[str, torch.device] = "cpu"
    ) -> Tuple[Dict[str, torch.Tensor], dict]:
        """``(tensors, metadata)`` as given to :meth:`save_tensors`."""
        path = self.tensors_path(name)
        tensors, md = _read(path, device)
        _check_format(path, md, TENSORS_FORMAT)
        try:
            meta = json.loads(md.get("meta") or "{}")
        except ValueError as e:
            raise FeatureStoreError(f"{path} has bad metadata: {e}") from e
        return tensors, meta

    def has_tensors(self, name: str) -> bool:
        return self.tensors_path(name).is_file()


__all__ = [
    "FeatureStore",
    "FeatureStoreError",
    "FeatureNotFoundError",
    "default_store_root",
    "FORMAT_VERSION",
    "read_header",
    "encode",
    "stored_values",
    "STORE_DTYPES",
]
