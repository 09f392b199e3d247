"""Raw per-layer maps -> fused SD + DINOv2 descriptors.

co-PCA per pair (the paper), a fixed projection fitted once on many images (our
extension, for cached dataset-wide features), per-branch L2 normalisation, weighting and
concatenation, and the pooled global vector. Pure torch; no FiftyOne import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import torch
import torch.nn.functional as F

from fiftyone_sdcorr.geometry import Letterbox

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
        """Tokens on the image (not on the letterbox padding)."""
        return self.letterbox.valid_token_mask(self.stride)

    def global_vector(self) -> torch.Tensor:
        """Mean of the unit-normalised tokens on the image, L2-normalised (1-D, float32)."""
        d = self.descriptors.float()
        d = d / d.norm(dim=0, keepdim=True).clamp_min(1e-12)
        v = d[:, self.valid_mask()].mean(dim=1)
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
