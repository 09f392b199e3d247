"""Dense correspondence: every pixel of a target region matched to a source region.

Pure tensors in, tensors out; no FiftyOne import (docs/architecture.md, "Layout").

As the paper's dense results and its swapping demo do, the token descriptors of both
images are upsampled bilinearly (``align_corners=False``) from the token grid to a
``resolution x resolution`` grid over the letterbox frame (:data:`DEFAULT_RESOLUTION`;
the demo used the image size, 256 or 512 for its figures), each upsampled vector is
L2-normalised, and every target cell inside the target region takes its nearest
neighbour (highest cosine) among the source cells inside the source region. The cosine
products run on the features' device in chunks of :data:`DEFAULT_CHUNK` target cells
(never a Python loop over pixels), so memory is bounded by ``chunk x source cells``.

Confidence per target cell follows the keypoint rule of
:mod:`fiftyone_sdcorr.core.matching.correspondence`: ``clamp(similarity, 0, 1) *
exp(-(cycle_error / 2) ** 2)``, the cycle error measured in tokens between the target cell
and the back-match (into the target region) of its source match.

Regions are boolean masks in each image's own pixels, of any size (resampled to the
grid by nearest neighbour); ``None`` is the whole image. Cells on the letterbox padding
are never in a region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fiftyone_sdcorr.core.matching.correspondence import confidence_from
from fiftyone_sdcorr.core.features.fusion import FusedFeatures
from fiftyone_sdcorr.core.common.geometry import Letterbox

#: cells per side of the dense grid over the letterbox frame
DEFAULT_RESOLUTION = 256
#: target cells matched per step (memory: chunk x source cells similarities)
DEFAULT_CHUNK = 4096


@dataclass
class DenseMatch:
    """The dense correspondence of a target region to a source region, on the target's
    ``resolution x resolution`` grid over its letterbox frame.

    Attributes:
        source_xy: ``(R, R, 2)`` float32, the matched point in the source image
            (normalised ``[0, 1]`` x, y) of each target cell; NaN outside the region.
        similarity: ``(R, R)`` cosine at the match (NaN outside the region).
        cycle_error: ``(R, R)`` tokens between the cell and its back-match (NaN outside
            the region or without the cycle check).
        confidence: ``(R, R)`` in ``[0, 1]`` (0 outside the region).
        valid: ``(R, R)`` bool, the target region on the grid.
        source_letterbox, target_letterbox: the two images' frames.
    """

    source_xy: torch.Tensor
    similarity: torch.Tensor
    cycle_error: torch.Tensor
    confidence: torch.Tensor
    valid: torch.Tensor
    source_letterbox: Letterbox
    target_letterbox: Letterbox

    @property
    def resolution(self) -> int:
        return int(self.valid.shape[0])

    def sample(self, width: Optional[int] = None, height: Optional[int] = None) -> "DenseField":
        """The match at every pixel of the target image (at ``width x height``, default
        its own size): the grid cell under each pixel's centre."""
        lb, src = self.target_letterbox, self.source_letterbox
        width, height = int(width or lb.width), int(height or lb.height)
        dev = self.valid.device
        rows, cols = _cells_of_pixels(lb, width, height, self.resolution, dev)
        # a pixel keeps its offset from its cell's centre (in frame units): an identical
        # pair maps every pixel onto itself, not onto the centre of its cell
        xs = (torch.arange(width, dtype=torch.float64, device=dev) + 0.5) / width
        ys = (torch.arange(height, dtype=torch.float64, device=dev) + 0.5) / height
        centre = cell_centers(lb, self.resolution, dev)[rows, cols]
        off_x = (xs[None, :] - centre[..., 0]) * (lb.width * lb.scale / (src.width * src.scale))
        off_y = (ys[:, None] - centre[..., 1]) * (lb.height * lb.scale / (src.height * src.scale))
        matched = self.source_xy[rows, cols].double() + torch.stack([off_x, off_y], -1)
        return DenseField(
            source_xy=matched.float().cpu().numpy(),
            confidence=self.confidence[rows, cols].cpu().numpy(),
            similarity=self.similarity[rows, cols].cpu().numpy(),
            valid=self.valid[rows, cols].cpu().numpy(),
        )


@dataclass
class DenseField:
    """A :class:`DenseMatch` at the target's pixels: ``source_xy (H, W, 2)`` normalised
    source points (NaN where not valid), ``confidence``, ``similarity`` and ``valid``
    ``(H, W)`` numpy arrays."""

    source_xy: np.ndarray
    confidence: np.ndarray
    similarity: np.ndarray
    valid: np.ndarray

    def source_pixels(self, width: int, height: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(rows, cols)`` int arrays: the source pixel (of a ``width x height`` source)
        each target pixel matched (clipped onto the image; meaningless where not valid)."""
        xy = np.nan_to_num(self.source_xy, nan=0.0)
        cols = np.clip((xy[..., 0] * width).astype(np.int64), 0, width - 1)
        rows = np.clip((xy[..., 1] * height).astype(np.int64), 0, height - 1)
        return rows, cols

    def flow(self, source_width: int, source_height: int) -> np.ndarray:
        """``(H, W, 2)`` float32: the matched source point minus the target pixel, in
        pixels (target pixel centres; source coordinates scaled to the source's size);
        NaN where not valid."""
        h, w = self.valid.shape
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        sx = self.source_xy[..., 0] * source_width - 0.5
        sy = self.source_xy[..., 1] * source_height - 0.5
        out = np.stack([sx - xs, sy - ys], axis=-1).astype(np.float32)
        out[~self.valid] = np.nan
        return out


# --------------------------------------------------------------------------- grids
def _cells_of_pixels(lb: Letterbox, width: int, height: int, resolution: int, device):
    """``(rows, cols)`` long tensors ``(height, width)``: the grid cell under the centre
    of each pixel of the image drawn at ``width x height``."""
    xs = (torch.arange(width, dtype=torch.float64, device=device) + 0.5) * (lb.width / width)
    ys = (torch.arange(height, dtype=torch.float64, device=device) + 0.5) * (lb.height / height)
    cell = lb.size / resolution
    cols = ((xs * lb.scale + lb.pad_left) / cell).floor().long().clamp(0, resolution - 1)
    rows = ((ys * lb.scale + lb.pad_top) / cell).floor().long().clamp(0, resolution - 1)
    return rows[:, None].expand(height, width), cols[None, :].expand(height, width)


def cell_centers(lb: Letterbox, resolution: int, device=None) -> torch.Tensor:
    """``(R, R, 2)`` float64: each grid cell's centre in normalised image coordinates
    (outside ``[0, 1]`` on the padding)."""
    c = (torch.arange(resolution, dtype=torch.float64, device=device) + 0.5) * (lb.size / resolution)
    x = (c - lb.pad_left) / lb.scale / lb.width
    y = (c - lb.pad_top) / lb.scale / lb.height
    return torch.stack([x[None, :].expand(resolution, resolution), y[:, None].expand(resolution, resolution)], -1)


def region_on_grid(lb: Letterbox, resolution: int, mask=None, device=None) -> torch.Tensor:
    """``(R, R)`` bool: the cells whose centre lies on the image and, with ``mask`` (a
    boolean ``H x W`` array of any size over the image), inside the mask."""
    centers = cell_centers(lb, resolution, device)
    on = ((centers >= 0) & (centers < 1)).all(-1)
    if mask is None:
        return on
    m = torch.as_tensor(np.asarray(mask), device=device).bool()
    if m.ndim != 2 or not m.numel():
        raise ValueError(f"a region mask must be a non-empty 2-D array, got shape {tuple(m.shape)}")
    h, w = m.shape
    cols = (centers[..., 0] * w).floor().long().clamp(0, w - 1)
    rows = (centers[..., 1] * h).floor().long().clamp(0, h - 1)
    return on & m[rows, cols]


def upsample(features: FusedFeatures, resolution: int) -> torch.Tensor:
    """``(R, R, C)`` float32 unit vectors: the descriptors upsampled bilinearly
    (``align_corners=False``) from the token grid to the dense grid, then normalised."""
    d = features.descriptors.float()[None]
    up = F.interpolate(d, size=(resolution, resolution), mode="bilinear", align_corners=False)[0]
    up = up.permute(1, 2, 0)
    return up / up.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# --------------------------------------------------------------------------- matching
def nearest(queries: torch.Tensor, keys: torch.Tensor, chunk: int = DEFAULT_CHUNK):
    """``(index, similarity)`` of each query row's most similar key row (unit vectors),
    ``chunk`` queries at a time."""
    idx = torch.empty(queries.shape[0], dtype=torch.long, device=queries.device)
    sim = torch.empty(queries.shape[0], dtype=torch.float32, device=queries.device)
    keys_t = keys.t().contiguous()
    for start in range(0, queries.shape[0], chunk):
        s, i = (queries[start:start + chunk] @ keys_t).max(dim=1)
        idx[start:start + chunk], sim[start:start + chunk] = i, s
    return idx, sim


def dense_match(source: FusedFeatures, target: FusedFeatures, *, resolution: int = DEFAULT_RESOLUTION,
                source_mask=None, target_mask=None, cycle: bool = True,
                chunk: int = DEFAULT_CHUNK) -> DenseMatch:
    """Matches every cell of the target region to the source region (module docstring).

    Args:
        source, target: fused features of the two images (any :class:`Describer`'s),
            on the same device.
        resolution: cells per side of the dense grid over each letterbox frame.
        source_mask, target_mask: boolean ``H x W`` arrays over each image (any size),
            or None for the whole image.
        cycle: also match back (the cycle error in the confidence).
        chunk: target (and, for the cycle, source) cells per step.
    """
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 2:
        raise ValueError(f"resolution must be an integer >= 2, got {resolution!r}")
    dev = target.descriptors.device
    src_on = region_on_grid(source.letterbox, resolution, source_mask, dev).reshape(-1)
    tgt_on = region_on_grid(target.letterbox, resolution, target_mask, dev).reshape(-1)
    n = resolution * resolution
    out_xy = torch.full((n, 2), float("nan"), device=dev)
    out_sim = torch.full((n,), float("nan"), device=dev)
    out_cyc = torch.full((n,), float("nan"), device=dev)
    if src_on.any() and tgt_on.any():
        src_idx, tgt_idx = src_on.nonzero()[:, 0], tgt_on.nonzero()[:, 0]
        src_vec = upsample(source, resolution).reshape(n, -1)[src_idx]
        tgt_vec = upsample(target, resolution).reshape(n, -1)[tgt_idx]
        fwd, sim = nearest(tgt_vec, src_vec, chunk)
        centers = cell_centers(source.letterbox, resolution, dev).reshape(n, 2)
        out_xy[tgt_idx] = centers[src_idx[fwd]].float()
        out_sim[tgt_idx] = sim
        if cycle:
            out_cyc[tgt_idx] = _cycle_error(src_vec, tgt_vec, fwd, tgt_idx, resolution, target, chunk)
    conf = confidence_from(out_sim, out_cyc).masked_fill(~tgt_on, 0.0)
    r = resolution
    return DenseMatch(out_xy.reshape(r, r, 2), out_sim.reshape(r, r), out_cyc.reshape(r, r), conf.reshape(r, r),
                      tgt_on.reshape(r, r), source.letterbox, target.letterbox)


def _cycle_error(src_vec, tgt_vec, fwd, tgt_idx, resolution: int, target: FusedFeatures, chunk: int):
    """Tokens between each target cell and the back-match of its source match (only the
    source cells that some target cell matched are matched back)."""
    used, inverse = torch.unique(fwd, return_inverse=True)
    back, _ = nearest(src_vec[used], tgt_vec, chunk)
    back_cell = tgt_idx[back][inverse]
    r = resolution
    dr = (back_cell // r - tgt_idx // r).float()
    dc = (back_cell % r - tgt_idx % r).float()
    tokens_per_cell = (target.letterbox.size / r) / target.stride
    return torch.sqrt(dr * dr + dc * dc) * tokens_per_cell


# --------------------------------------------------------------------------- what a match carries
def warp_labels(field: DenseField, labels: np.ndarray, min_confidence: float = 0.0, fill: int = 0) -> np.ndarray:
    """A label map of the target: each valid target pixel with confidence at least
    ``min_confidence`` takes the label of its matched source pixel in ``labels`` (the
    source's ``H x W`` integer map, any size); the others get ``fill``."""
    labels = np.asarray(labels)
    rows, cols = field.source_pixels(labels.shape[1], labels.shape[0])
    out = labels[rows, cols]
    keep = field.valid & (field.confidence >= min_confidence)
    return np.where(keep, out, np.asarray(fill, dtype=out.dtype)).astype(labels.dtype)


def warp_image(field: DenseField, image: np.ndarray, fill=0) -> np.ndarray:
    """The source ``image`` (``H x W [x 3]`` array, any size) carried onto the target:
    each valid target pixel takes its matched source pixel's value; the others ``fill``."""
    image = np.asarray(image)
    rows, cols = field.source_pixels(image.shape[1], image.shape[0])
    out = image[rows, cols]
    mask = field.valid if image.ndim == 2 else field.valid[..., None]
    return np.where(mask, out, np.asarray(fill, dtype=image.dtype)).astype(image.dtype)


def position_colors(width: int, height: int) -> np.ndarray:
    """The paper's colour map of a source: ``H x W x 3`` uint8, x to red, y to green,
    blue from the position along the diagonal (every pixel a different colour)."""
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :].repeat(height, 0)
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None].repeat(width, 1)
    rgb = np.stack([xs, ys, 1.0 - 0.5 * (xs + ys)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


__all__ = ["DEFAULT_RESOLUTION", "DEFAULT_CHUNK", "DenseMatch", "DenseField", "dense_match", "upsample",
           "region_on_grid", "cell_centers", "nearest", "warp_labels", "warp_image", "position_colors"]
