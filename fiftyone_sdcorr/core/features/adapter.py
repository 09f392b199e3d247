"""DIY-SC's adapter on DINOv2 tokens: the module with the authors' state-dict keys, safetensors loading, conversion.

DIY-SC (Dünkel et al., ICCV 2025, https://github.com/odunkel/DIY-SC, CC0 1.0) refines raw
DINOv2-B/14 tokens (the last block's output before the final norm, CLS dropped, as
``(B, 768, H, W)``) with one detectron2-style bottleneck block per input slice and a
softmax-weighted sum of the slices. This is our own implementation of that architecture;
it keeps the authors' parameter names so their checkpoint loads strictly:

``bottleneck_layers.<i>.0.conv{1,2,3}.weight`` (1x1 in->b, 3x3 b->b, 1x1 b->out, no bias),
``bottleneck_layers.<i>.0.conv{1,2,3}.norm.{weight,bias}`` (GroupNorm),
``bottleneck_layers.<i>.0.shortcut.{weight,norm.weight,norm.bias}`` (only when in != out),
``mixing_weights`` (one per slice) and ``logit_scale`` / ``self_logit_scale`` (used in
training only, kept so that loading is strict).

Weights are read from safetensors only; a ``.pth`` is converted once with
:func:`convert_checkpoint` (``python -m fiftyone_sdcorr convert-adapter PTH OUT.safetensors``),
which unpickles with ``torch.load(weights_only=True)`` and nothing else.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
import uuid
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_ADAPTER = str(Path(__file__).resolve().parents[2] / "weights" / "diy_sc_dino_spair.safetensors")

ADAPTER_PROVENANCE = {
    "repository": "odunkel/DIY-SC",
    "url": "https://github.com/odunkel/DIY-SC",
    "file": "ckpts/0300_dino_spair/best.pth",
    "commit": "e1121c072b022adcccaf1b938dcc053fb9eed930",
    "licence": "CC0-1.0",
    "sha256": "42e9c8a4d27041af7bb8dc5240ea3e83d47e013b72541dc8c5829368f247e705",
}

ADAPTER_FORMAT = "sdcorr.adapter"
CONVERT_COMMAND = "python -m fiftyone_sdcorr convert-adapter CHECKPOINT.pth OUT.safetensors"
EPS = 1e-8  # added to the descriptor norm, as the authors' demo does


def default_norm_groups(bottleneck_channels: int, projection_dim: int, most: int = 32) -> int:
    """GroupNorm groups when a file does not record them: the largest count <= ``most`` that
    divides both widths (32 for the authors' 192 / 768)."""
    return math.gcd(most, int(bottleneck_channels), int(projection_dim))


class ConvNorm(nn.Conv2d):
    """A bias-free convolution ("same" padding) followed by GroupNorm (``weight``, ``norm.*``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_norm_groups: int):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(num_norm_groups, out_channels)
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class Bottleneck(nn.Module):
    """relu(conv3(relu(conv2(relu(conv1(x))))) + shortcut(x)); the shortcut is a 1x1
    ConvNorm when the widths differ, else the identity."""

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int, num_norm_groups: int):
        super().__init__()
        self.conv1 = ConvNorm(in_channels, bottleneck_channels, 1, num_norm_groups)
        self.conv2 = ConvNorm(bottleneck_channels, bottleneck_channels, 3, num_norm_groups)
        self.conv3 = ConvNorm(bottleneck_channels, out_channels, 1, num_norm_groups)
        self.shortcut = ConvNorm(in_channels, out_channels, 1, num_norm_groups) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class AggregationNetwork(nn.Module):
    """DIY-SC's adapter: input channels split into ``feature_dims`` slices, one bottleneck
    block per slice to ``projection_dim`` channels, summed with ``softmax(mixing_weights)``."""

    def __init__(self, feature_dims: Sequence[int] = (768,), projection_dim: int = 768, num_norm_groups: int = 32,
                 bottleneck_channels: Optional[int] = None):
        super().__init__()
        self.feature_dims = tuple(int(d) for d in feature_dims)
        if not self.feature_dims:
            raise ValueError("feature_dims: at least one input slice")
        self.projection_dim = int(projection_dim)
        self.bottleneck_channels = int(bottleneck_channels or self.projection_dim // 4)
        self.num_norm_groups = int(num_norm_groups)
        self.bottleneck_layers = nn.ModuleList(
            nn.Sequential(Bottleneck(d, self.projection_dim, self.bottleneck_channels, self.num_norm_groups))
            for d in self.feature_dims
        )
        self.mixing_weights = nn.Parameter(torch.ones(len(self.feature_dims)))
        # the authors' contrastive temperatures: training only, kept for strict loading
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.self_logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, sum(feature_dims), H, W)`` -> ``(B, projection_dim, H, W)``."""
        if x.ndim != 4 or x.shape[1] != sum(self.feature_dims):
            raise ValueError(f"adapter input: expected (B, {sum(self.feature_dims)}, H, W), got {tuple(x.shape)}")
        weights = torch.softmax(self.mixing_weights, dim=0)
        slices = torch.split(x, self.feature_dims, dim=1)
        out = None
        for w, layer, part in zip(weights, self.bottleneck_layers, slices):
            y = w * layer(part)
            out = y if out is None else out + y
        return out

    def unit_descriptors(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's output divided by its norm over channels plus 1e-8 (the authors' demo)."""
        y = self(x)
        return y / (torch.linalg.vector_norm(y, dim=1, keepdim=True) + EPS)


# ---------------------------------------------------------------------------- reading


def _safetensors_path(path) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path}: adapter weights are read from .safetensors files only; convert a PyTorch "
            f"checkpoint once with: {CONVERT_COMMAND}"
        )
    if not path.is_file():
        raise FileNotFoundError(2, "adapter weights not found", str(path))
    return path


def read_adapter_file(path) -> tuple:
    """``(tensors, metadata)`` of a safetensors adapter file (CPU tensors)."""
    from safetensors import SafetensorError, safe_open

    path = _safetensors_path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); convert with: {CONVERT_COMMAND}") from e
    return tensors, metadata


def _architecture(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str], path) -> dict:
    """The constructor keywords the tensors' shapes call for (groups from the metadata)."""
    n = 0
    while f"bottleneck_layers.{n}.0.conv1.weight" in tensors:
        n += 1
    if n == 0:
        raise ValueError(f"{path}: not a DIY-SC adapter: no tensor bottleneck_layers.0.0.conv1.weight")
    conv3 = "bottleneck_layers.0.0.conv3.weight"
    if conv3 not in tensors:
        raise ValueError(f"{path}: adapter tensor missing: {conv3}")
    conv1 = [tensors[f"bottleneck_layers.{i}.0.conv1.weight"] for i in range(n)]
    if any(w.ndim != 4 for w in conv1) or tensors[conv3].ndim != 4:
        raise ValueError(f"{path}: adapter convolution weights must be 4-d")
    bottleneck, projection = int(conv1[0].shape[0]), int(tensors[conv3].shape[0])
    groups = metadata.get("num_norm_groups")
    try:
        groups = int(groups) if groups is not None else default_norm_groups(bottleneck, projection)
    except ValueError:
        raise ValueError(f"{path}: metadata num_norm_groups is not an integer: {groups!r}") from None
    if groups < 1 or bottleneck % groups or projection % groups:
        raise ValueError(f"{path}: num_norm_groups={groups} does not divide {bottleneck} and {projection}")
    return dict(feature_dims=tuple(int(w.shape[1]) for w in conv1), projection_dim=projection,
                num_norm_groups=groups, bottleneck_channels=bottleneck)


def check_state_dict(module: nn.Module, tensors: Dict[str, torch.Tensor], path) -> None:
    """One ValueError naming every missing and unexpected key and every shape mismatch."""
    expected = module.state_dict()
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    problems += [
        f"shape of {k}: file {tuple(tensors[k].shape)}, module {tuple(v.shape)}"
        for k, v in expected.items() if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if problems:
        raise ValueError(f"{path}: adapter weights do not fit the DIY-SC adapter: " + "; ".join(problems))


def adapter_for(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str], label) -> AggregationNetwork:
    """A module sized by the tensors' shapes, in their dtype, holding them (strictly loaded;
    errors name ``label``)."""
    module = AggregationNetwork(**_architecture(tensors, metadata, label))
    check_state_dict(module, tensors, label)
    first = tensors["bottleneck_layers.0.0.conv1.weight"]
    if first.is_floating_point():
        module.to(first.dtype)
    module.load_state_dict(tensors, strict=True)
    return module


def load_adapter(path=None, device=None, dtype: Optional[torch.dtype] = None) -> AggregationNetwork:
    """The adapter of a safetensors file (None: the shipped DIY-SC weights,
    :data:`DEFAULT_ADAPTER`), its sizes read from the tensors' shapes, loaded strictly, in
    eval mode, on ``device`` in ``dtype`` (default: CPU, the file's dtype)."""
    path = _safetensors_path(DEFAULT_ADAPTER if path is None else path)
    tensors, metadata = read_adapter_file(path)
    return adapter_for(tensors, metadata, path).to(device=device, dtype=dtype).eval()


def adapter_digest(module_or_path: Union[nn.Module, str, os.PathLike]) -> str:
    """sha1 (16 hex digits) of an adapter's tensors: names, dtypes, shapes and bytes in name
    order. A file and the module loaded from it (same dtype) have the same digest."""
    if isinstance(module_or_path, nn.Module):
        tensors = module_or_path.state_dict()
    else:
        tensors, _ = read_adapter_file(module_or_path)
    h = hashlib.sha1()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- writing


def save_adapter(tensors: Dict[str, torch.Tensor], out_path, *, source: str, licence: str,
                 num_norm_groups: Optional[int] = None) -> str:
    """Checked write of adapter tensors as safetensors: to a temporary name in the target's
    folder, loaded back strictly and compared, then renamed. Returns the path."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    out = Path(out_path)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the output must be a .safetensors file")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {"format": ADAPTER_FORMAT, "source": str(source), "licence": str(licence)}
    if num_norm_groups is not None:
        metadata["num_norm_groups"] = str(int(num_norm_groups))
    adapter_for(tensors, metadata, out)  # refuse what would not load, before writing anything
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(out.with_name(f".{out.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.safetensors"))
    try:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:  # an I/O failure (a full disk) surfaces as this
            raise OSError(f"{out}: could not write the adapter: {e}") from e
        os.chmod(tmp, 0o644)  # safetensors creates 0600; weights are not secrets
        back = load_adapter(tmp).state_dict()
        changed = [k for k, v in tensors.items() if not torch.equal(back[k], v)]
        if changed:
            raise ValueError(f"{out}: written tensors read back differently: {changed}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(out)


def _unpickling_reason(e: Exception) -> str:
    """The useful part of torch.load's error: the refused global, not its advice to unpickle fully."""
    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it holds {found.group(1)}, which is not a tensor"
    if isinstance(e, pickle.UnpicklingError) or "WeightsUnpickler" in text:
        found = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
        return found.group(1).strip() if found else "an object other than tensors"
    return f"{type(e).__name__}: {' '.join(text.split())[:200]}"


def _load_plain_tensors(pth: Path) -> Dict[str, torch.Tensor]:
    """The state dict of a ``.pth``, unpickled with ``weights_only=True`` only; a dict nested
    under "state_dict" or "model" is accepted; every value must be a tensor."""
    try:
        obj = torch.load(str(pth), map_location="cpu", weights_only=True)
    except Exception as e:  # any failure: not a plain state dict (pickle, zip or key errors alike)
        raise ValueError(
            f"{pth}: refused by torch.load(weights_only=True): only plain tensors are converted, "
            f"nothing else is unpickled ({_unpickling_reason(e)})"
        ) from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{pth}: expected a state dict (a dict of tensors), got {type(obj).__name__}")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(f"{pth}: not tensors (or not string keys): {', '.join(bad)}")
    return dict(obj)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_checkpoint(pth_path, out_path, *, source: Optional[str] = None, licence: Optional[str] = None) -> str:
    """A DIY-SC-style ``.pth`` state dict -> a checked safetensors adapter file.

    Metadata: ``format`` (sdcorr.adapter), ``source`` (default: the file's name and sha256;
    for the authors' SPair checkpoint, its repository, commit and path), ``licence``
    (default: CC0-1.0 for the authors' checkpoint, else "unknown"), ``num_norm_groups``.
    Returns the written path; on any failure nothing is written (no file, no temporary).
    """
    pth = Path(pth_path)
    if Path(out_path).suffix != ".safetensors":
        raise ValueError(f"{out_path}: the output must be a .safetensors file")
    if not pth.is_file():
        raise FileNotFoundError(2, "checkpoint not found", str(pth))
    sha = _sha256(pth)
    tensors = _load_plain_tensors(pth)
    known = sha == ADAPTER_PROVENANCE["sha256"]
    p = ADAPTER_PROVENANCE
    default_source = (f"github.com/{p['repository']}@{p['commit']}:{p['file']} (sha256 {sha})" if known
                      else f"{pth.name} (sha256 {sha})")
    arch = _architecture(tensors, {}, pth)
    adapter_for(tensors, {}, pth)
    return save_adapter(tensors, out_path, source=source or default_source,
                        licence=licence or (p["licence"] if known else "unknown"),
                        num_norm_groups=arch["num_norm_groups"])
