"""Raw per-layer maps -> fused SD + DINOv2 descriptors.

co-PCA per pair (the paper), a fixed projection fitted once on many images (our
extension, for cached dataset-wide features), per-branch L2 normalisation, weighting and
concatenation, and the pooled global vector. Pure torch; no FiftyOne import.
"""

from __future__ import annotations

import hashlib

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F

from fiftyone_sdcorr.core.common.geometry import Letterbox

#: SD taps from coarse to fine, as the descriptor concatenates them ([s3 | s4 | s5]).
DEFAULT_TAPS = ("s5", "s4", "s3")


@dataclass
class RawFeatures:
    """What the models produce for one image, before any PCA.

    ``sd`` maps tap name (``"s5"``, ``"s4"``, ``"s3"``, ``"s2"``) to a ``C x H x W``
    float tensor over the SD letterbox frame; ``dino`` is ``C x G x G`` over the DINO
    letterbox frame (patch tokens of the last block, before the final norm).
    """

    sd: Dict[str, torch.Tensor]
    dino: torch.Tensor
    sd_letterbox: Letterbox
    dino_letterbox: Letterbox
    dino_stride: int = 14
    source: Optional[str] = None

    @property
    def grid(self) -> int:
        return int(self.dino.shape[-1])


@dataclass
class FusedFeatures:
    """Fused dense descriptors of one image: ``C x G x G`` on the DINO token grid.

    The first ``sd_channels`` channels are the (weighted, unit-norm) SD half, the rest the
    DINO half. ``letterbox`` and ``stride`` place tokens in the image (geometry.py).
    """

    descriptors: torch.Tensor
    letterbox: Letterbox
    stride: int
    sd_channels: int
    meta: dict = field(default_factory=dict)

    @property
    def grid(self) -> int:
        return int(self.descriptors.shape[-1])

    def valid_mask(self) -> torch.Tensor:
        """Tokens on the image (not on the letterbox padding), made on the descriptors' device."""
        return self.letterbox.valid_token_mask(self.stride, device=self.descriptors.device)

    def global_vector(self) -> torch.Tensor:
        """Mean of the unit-normalised tokens on the image, L2-normalised (1-D, float32).
        A masked sum, not a boolean index: on CUDA it queues without waiting for the GPU."""
        d = self.descriptors.float()
        d = d / d.norm(dim=0, keepdim=True).clamp_min(1e-12)
        m = self.valid_mask().to(d.dtype)
        v = (d * m).sum(dim=(1, 2)) / m.sum().clamp_min(1.0)
        return v / v.norm().clamp_min(1e-12)


class Describer(Protocol):
    """Anything that turns images into :class:`FusedFeatures`.

    :class:`fiftyone_sdcorr.FeatureExtractor` is one; tests use simple deterministic local
    descriptors with known answers. Correspondence, propagation and the plugin accept any.
    """

    def describe(self, images: Sequence, **kwargs) -> List[FusedFeatures]:  # pragma: no cover
        ...

    def config(self) -> dict:  # pragma: no cover
        ...


# ---------------------------------------------------------------------------- PCA
def _tokens(fmap: torch.Tensor) -> torch.Tensor:
    """C x H x W -> (H*W) x C, float64 for stable PCA."""
    return fmap.reshape(fmap.shape[0], -1).T.double()


def _principal_directions(centered: torch.Tensor, dim: int) -> torch.Tensor:
    """Top ``dim`` right singular vectors (C x dim) of a centred N x C matrix, sign-fixed.

    Exact (``torch.linalg.svd``) rather than the reference's randomised
    ``torch.pca_lowrank``: the same subspace, but deterministic. Each direction's sign is
    chosen so that its largest-magnitude entry is positive.
    """
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    v = vh[: min(dim, vh.shape[0])].T
    return _fix_signs(v)


def _fix_signs(v: torch.Tensor) -> torch.Tensor:
    idx = v.abs().argmax(dim=0)
    signs = torch.sign(v[idx, torch.arange(v.shape[1])])
    signs[signs == 0] = 1
    return v * signs


def co_pca(maps_a: Dict[str, torch.Tensor], maps_b: Dict[str, torch.Tensor], dim: int = 256):
    """The paper's co-PCA: per tap, PCA over the tokens of BOTH images, split back.

    Returns two dicts tap -> ``dim x H x W`` float32 maps.
    """
    out_a, out_b = {}, {}
    for tap in maps_a:
        a, b = maps_a[tap], maps_b[tap]
        ta, tb = _tokens(a), _tokens(b)
        joint = torch.cat([ta, tb])
        mean = joint.mean(dim=0, keepdim=True)
        v = _principal_directions(joint - mean, dim)
        out_a[tap] = ((ta - mean) @ v).T.reshape(-1, *a.shape[-2:]).float()
        out_b[tap] = ((tb - mean) @ v).T.reshape(-1, *b.shape[-2:]).float()
    return out_a, out_b


class FixedProjection:
    """One PCA per SD tap fitted once on many images, applied to each image alone.

    Our extension for cached, dataset-wide features (co-PCA needs both images of a pair).
    Fitted exactly from the streamed token covariance; saved and loaded as safetensors.
    """

    def __init__(self, means: Dict[str, torch.Tensor], components: Dict[str, torch.Tensor]):
        self.means = {k: v.double() for k, v in means.items()}
        self.components = {k: v.double() for k, v in components.items()}

    @property
    def taps(self):
        return list(self.components)

    def out_channels(self) -> int:
        return sum(int(v.shape[1]) for v in self.components.values())

    @classmethod
    def fit(cls, sd_maps: Sequence[Dict[str, torch.Tensor]], dim: int = 256) -> "FixedProjection":
        if not sd_maps:
            raise ValueError("FixedProjection.fit needs at least one image's SD maps")
        means, comps = {}, {}
        for tap in sd_maps[0]:
            c = sd_maps[0][tap].shape[0]
            n, s, ss = 0, torch.zeros(c, dtype=torch.float64), torch.zeros(c, c, dtype=torch.float64)
            for m in sd_maps:
                t = _tokens(m[tap])
                n += t.shape[0]
                s += t.sum(0)
                ss += t.T @ t
            mean = s / n
            cov = ss / n - torch.outer(mean, mean)
            evals, evecs = torch.linalg.eigh(cov)
            k = min(dim, c, n)
            v = evecs[:, torch.argsort(evals, descending=True)[:k]]
            means[tap], comps[tap] = mean, _fix_signs(v)
        return cls(means, comps)

    def apply(self, maps: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Projected maps, computed on the maps' device (float64, as the fit)."""
        out = {}
        for tap in self.components:
            if tap not in maps:
                raise KeyError(f"projection was fitted on tap {tap!r}, which these features lack")
            m = maps[tap]
            mean, v = self._on(m.device, tap)
            out[tap] = ((_tokens(m) - mean) @ v).T.reshape(-1, *m.shape[-2:]).float()
        return out

    def _on(self, device: torch.device, tap: str):
        """Mean and components of ``tap`` on ``device`` (copied there once)."""
        if device.type == "cpu":
            return self.means[tap], self.components[tap]
        cache = self.__dict__.setdefault("_device_copies", {})
        key = (str(device), tap)
        if key not in cache:
            cache[key] = (self.means[tap].to(device), self.components[tap].to(device))
        return cache[key]

    def state_dict(self) -> Dict[str, torch.Tensor]:
        d = {}
        for tap in self.components:
            d[f"{tap}.mean"] = self.means[tap].float().contiguous()
            d[f"{tap}.components"] = self.components[tap].float().contiguous()
        return d

    def digest(self) -> str:
        """A short hash of the projection's numbers: which projection produced a stored file
        (computed once: callers ask for it per sample)."""
        if getattr(self, "_digest", None) is None:
            h = hashlib.sha1()
            for k, v in sorted(self.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            self._digest = h.hexdigest()[:12]
        return self._digest

    @classmethod
    def from_state_dict(cls, d: Dict[str, torch.Tensor]) -> "FixedProjection":
        taps = sorted({k.split(".")[0] for k in d})
        return cls({t: d[f"{t}.mean"] for t in taps}, {t: d[f"{t}.components"] for t in taps})

    def save(self, path) -> None:
        from safetensors.torch import save_file

        save_file(self.state_dict(), str(path), metadata={"kind": "sdcorr.FixedProjection", "version": "1"})

    @classmethod
    def load(cls, path) -> "FixedProjection":
        from safetensors.torch import load_file

        return cls.from_state_dict(load_file(str(path)))


# ---------------------------------------------------------------------------- fusion
def _tap_order(maps: Dict[str, torch.Tensor]) -> List[str]:
    """Coarse to fine by grid size."""
    return sorted(maps, key=lambda k: maps[k].shape[-1])


def sd_descriptor(projected: Dict[str, torch.Tensor]) -> torch.Tensor:
    """[s3 | s4 | s5] as in the paper: upsample the coarser stack to the next grid, concat.

    s5 is upsampled (bilinear, align_corners=False) to s4's grid and [s4, s5] concatenated;
    that is upsampled to s3's grid and [s3, s4, s5] concatenated.
    """
    order = _tap_order(projected)
    desc = projected[order[0]]
    for tap in order[1:]:
        fine = projected[tap]
        up = F.interpolate(desc[None], size=fine.shape[-2:], mode="bilinear", align_corners=False)[0]
        desc = torch.cat([fine, up])
    return desc


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=0, keepdim=True).clamp_min(1e-12)


def fuse(sd_desc: torch.Tensor, dino: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """L2-normalise each branch per token, weight and concatenate on the DINO grid.

    The paper writes F = (alpha * F_SD, (1 - alpha) * F_DINO) with alpha = 0.5; we scale
    both weights by 2 (2 alpha, 2 (1 - alpha)) so that each half is unit norm at the
    default. A global scale changes no nearest neighbour.
    """
    if sd_desc.shape[-2:] != dino.shape[-2:]:
        sd_desc = F.interpolate(sd_desc[None], size=dino.shape[-2:], mode="bilinear", align_corners=False)[0]
    return torch.cat([2.0 * alpha * _unit(sd_desc.float()), 2.0 * (1.0 - alpha) * _unit(dino.float())])


def fuse_raw(raw: RawFeatures, projection: FixedProjection, alpha: float = 0.5, meta=None) -> FusedFeatures:
    sd = sd_descriptor(projection.apply(raw.sd))
    return FusedFeatures(
        fuse(sd, raw.dino, alpha), raw.dino_letterbox, raw.dino_stride, int(sd.shape[0]), dict(meta or {})
    )


def fuse_pair(raw_a: RawFeatures, raw_b: RawFeatures, dim: int = 256, alpha: float = 0.5, meta=None):
    """The paper's pair path: co-PCA of the SD maps, then fusion, for both images."""
    pa, pb = co_pca(raw_a.sd, raw_b.sd, dim)
    out = []
    for raw, p in ((raw_a, pa), (raw_b, pb)):
        sd = sd_descriptor(p)
        out.append(FusedFeatures(fuse(sd, raw.dino, alpha), raw.dino_letterbox, raw.dino_stride, int(sd.shape[0]), dict(meta or {})))
    return tuple(out)
