"""A simple deterministic local descriptor with known answers, for tests.

Same interface as the real extractor (``describe(images) -> list[FusedFeatures]``, the
``Describer`` protocol of ``fiftyone_sdcorr.core.features.fusion``), but no model: each token's
descriptor is built from the pixels around its centre, so it is translation-covariant
(a crop or translation of an image moves the descriptors with the content) and
resizing the whole image changes nothing once it is letterboxed to the same frame.

Recipe, per image:
1. letterbox to a ``size x size`` frame with :meth:`Letterbox.fit` (bilinear,
   antialiased resize; zero padding), pixels in ``[0, 1]``;
2. two "branches" that play the roles of the SD and DINO halves: the frame blurred with
   a Gaussian of ``sigma`` pixels, sampled on a ``(2r+1) x (2r+1)`` grid of offsets
   ``spacing`` pixels apart around each token centre ``stride * p + (stride - 1) / 2``
   (bilinear, pixel-index coordinates); fine (sigma 3, spacing 5) and coarse
   (sigma 7, spacing 12). Blurs this wide keep a token's descriptor close to its
   neighbours' when content moves by half a token;
3. per token and branch: subtract the mean of the sampled values (local contrast), then
   L2-normalise; concatenate [fine | coarse]. Each half is unit norm, as in the fused
   SD + DINO descriptor; ``sd_channels`` is the size of the first half. Tokens on the
   padding see the zero padding and whatever of the image their window reaches (like
   real features, they are not zero); matching masks them out.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fiftyone_sdcorr.core.features.fusion import FusedFeatures
from fiftyone_sdcorr.core.common.geometry import Letterbox


def to_tensor(image) -> torch.Tensor:
    """PIL image, path, ``H x W x 3`` / ``H x W`` array -> ``3 x H x W`` float in [0, 1]."""
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.array(image)  # a writable copy
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    arr = arr[..., :3]
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()
    if arr.dtype == np.uint8:
        t = t / 255.0
    return t


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    k = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(k**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), padding=(0, radius), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), padding=(radius, 0), groups=c)


class LocalDescriptor:
    """Deterministic local descriptor on a ``size / stride`` token grid (see module doc)."""

    def __init__(
        self,
        size: int = 224,
        stride: int = 14,
        radius: int = 2,
        fine=(3.0, 5.0),
        coarse=(7.0, 12.0),
    ):
        if size % stride:
            raise ValueError("size must be a multiple of stride")
        self.size, self.stride, self.radius = size, stride, radius
        self.branches = (tuple(fine), tuple(coarse))

    def config(self) -> dict:
        return {
            "name": "local-descriptor",
            "size": self.size,
            "stride": self.stride,
            "radius": self.radius,
            "branches": [list(b) for b in self.branches],
        }

    def frame(self, image):
        """The letterboxed ``3 x size x size`` frame and its :class:`Letterbox`."""
        img = to_tensor(image)
        _, h, w = img.shape
        lb = Letterbox.fit(w, h, self.size)
        resized = F.interpolate(
            img[None], size=(lb.resized_height, lb.resized_width), mode="bilinear",
            align_corners=False, antialias=True,
        )[0]
        frame = torch.zeros(3, self.size, self.size)
        top, left = lb.pad_top, lb.pad_left
        frame[:, top : top + lb.resized_height, left : left + lb.resized_width] = resized
        return frame, lb

    def _branch(self, frame: torch.Tensor, sigma: float, spacing: float) -> torch.Tensor:
        s, g = self.size, self.size // self.stride
        blurred = _gaussian_blur(frame[None], sigma)
        centres = torch.arange(g, dtype=torch.float32) * self.stride + (self.stride - 1) / 2.0
        offs = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32) * spacing
        n = offs.numel()
        # sample positions: (g_row, g_col, n_row, n_col)
        ys = (centres[:, None, None, None] + offs[None, None, :, None]).expand(g, g, n, n)
        xs = (centres[None, :, None, None] + offs[None, None, None, :]).expand(g, g, n, n)
        grid = torch.stack([xs, ys], dim=-1).reshape(1, g * g, n * n, 2) * (2.0 / (s - 1)) - 1.0
        samples = F.grid_sample(blurred, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        d = samples[0].permute(0, 2, 1).reshape(3 * n * n, g * g)  # channels = colour x offset
        d = d - d.mean(dim=0, keepdim=True)
        d = d / d.norm(dim=0, keepdim=True).clamp_min(1e-6)
        return d.reshape(-1, g, g)

    def describe_one(self, image) -> FusedFeatures:
        frame, lb = self.frame(image)
        halves = [self._branch(frame, sigma, spacing) for sigma, spacing in self.branches]
        desc = torch.cat(halves, dim=0)
        return FusedFeatures(
            descriptors=desc,
            letterbox=lb,
            stride=self.stride,
            sd_channels=int(halves[0].shape[0]),
            meta={"describer": self.config()},
        )

    def describe(self, images: Sequence, **kwargs) -> List[FusedFeatures]:
        return [self.describe_one(im) for im in images]


def textured_noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Deterministic ``H x W x 3`` uint8 texture: Gaussian noise blurred at 3, 8 and 20
    pixels and summed (structure at several scales, no repeats)."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.zeros(1, 3, height, width)
    for sigma in (3.0, 8.0, 20.0):
        noise = torch.randn(1, 3, height, width, generator=gen)
        img += _gaussian_blur(noise, sigma) * sigma
    img = (img - img.min()) / (img.max() - img.min())
    return (img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


__all__ = ["LocalDescriptor", "textured_noise", "to_tensor"]
