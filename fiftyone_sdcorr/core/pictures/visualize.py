"""Pictures of fused features and matches: the views behind the match panel.

- :func:`pca_rgb`: the first three principal components of the fused features of a pair,
  co-fitted on the valid tokens of both images (as in the paper's figures), as colours.
- :func:`kmeans_parts`: a k-means part clustering shared by both images (spherical
  k-means on unit descriptors, k-means++ seeding, deterministic for a seed).
- :func:`token_map_to_image`: a map on the token grid (values, RGB, labels) resampled to
  an image of any size, through the letterbox (so it lines up with the photo exactly).
- :func:`match_point` / :func:`similarity_map`: click-to-match, i.e. the best match of one
  point and the cosine similarity of that point to every token of the other image.
- :func:`colorize`, :func:`display_size`, :func:`downsample`, :func:`to_data_uri`,
  :func:`pixel_index_to_normalized`: heat-map colours, downsampled images for the App and
  the exact conversion of a clicked display pixel back to normalised coordinates.

Coordinates are FiftyOne's normalised ``[0, 1]`` image coordinates ``(x, y)`` unless a
name says otherwise; token positions are ``(col, row)`` as in :mod:`geometry`. Pure
numpy / torch / Pillow; no FiftyOne import.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fiftyone_sdcorr.core.matching import correspondence as corr
from fiftyone_sdcorr.core.features.fusion import FusedFeatures

#: a qualitative palette (Tableau 10 + 10 more), readable on light and dark backgrounds
PALETTE = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
    "#ff9da7", "#9c755f", "#bab0ac", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728",
    "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
)

# anchors of a perceptually ordered dark-to-bright map (close to matplotlib's "inferno")
_INFERNO = np.array(
    [
        [0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85],
        [227, 89, 51], [249, 140, 10], [249, 201, 50], [252, 255, 164],
    ],
    dtype=np.float64,
)


# --------------------------------------------------------------------------- colours
def palette_color(i: int) -> str:
    """``#rrggbb`` of the ``i``-th palette colour (cycles)."""
    return PALETTE[int(i) % len(PALETTE)]


def hex_to_rgb(color: str) -> Tuple[int, int, int]:
    c = color.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def rgba(color: str, alpha: float) -> str:
    """``#rrggbb`` + alpha -> ``rgba(r,g,b,a)`` (CSS / plotly)."""
    r, g, b = hex_to_rgb(color)
    return f"rgba({r},{g},{b},{max(0.0, min(1.0, float(alpha))):.3f})"


def colorize(values, vmin: Optional[float] = None, vmax: Optional[float] = None) -> np.ndarray:
    """``H x W`` values -> ``H x W x 3`` uint8 through a dark-to-bright colour map.

    NaN values become black. ``vmin`` / ``vmax`` default to the finite min / max.
    """
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    if vmin is None:
        vmin = float(v[finite].min()) if finite.any() else 0.0
    if vmax is None:
        vmax = float(v[finite].max()) if finite.any() else 1.0
    t = np.clip((np.where(finite, v, vmin) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    pos = t * (len(_INFERNO) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_INFERNO) - 2)
    frac = (pos - lo)[..., None]
    rgb = _INFERNO[lo] * (1 - frac) + _INFERNO[lo + 1] * frac
    rgb[~finite] = 0
    return rgb.round().astype(np.uint8)


def labels_to_rgb(labels, palette: Sequence[str] = PALETTE) -> np.ndarray:
    """Integer label map (``-1`` = none, black) -> ``... x 3`` uint8 colours."""
    lab = np.asarray(labels)
    table = np.array([hex_to_rgb(c) for c in palette], dtype=np.uint8)
    out = table[np.mod(lab, len(table))]
    out[lab < 0] = 0
    return out


# --------------------------------------------------------------------------- geometry
def display_size(width: int, height: int, max_side: int = 512) -> Tuple[int, int]:
    """Size of an image shown with its long side at most ``max_side`` (never enlarged)."""
    width, height = int(width), int(height)
    scale = min(1.0, float(max_side) / max(width, height))
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def pixel_index_to_normalized(row: float, col: float, width: int, height: int) -> Tuple[float, float]:
    """Centre of pixel ``[row, col]`` of a ``width x height`` (display) image -> ``(x, y)``
    in ``[0, 1]``. Any downsampled copy covers the same extent as the original, so this is
    exact up to the display pixel (half a display pixel at most)."""
    return (float(col) + 0.5) / float(width), (float(row) + 0.5) / float(height)


def normalized_to_pixel_index(x: float, y: float, width: int, height: int) -> Tuple[int, int]:
    """``(x, y)`` in ``[0, 1]`` -> ``[row, col]`` of the display pixel that holds it."""
    col = min(max(int(np.floor(float(x) * width)), 0), int(width) - 1)
    row = min(max(int(np.floor(float(y) * height)), 0), int(height) - 1)
    return row, col


def downsample(image: Image.Image, max_side: int = 512) -> Image.Image:
    """An RGB copy of ``image`` with its long side at most ``max_side`` (LANCZOS)."""
    image = image.convert("RGB")
    size = display_size(image.width, image.height, max_side)
    if size == image.size:
        return image
    return image.resize(size, Image.LANCZOS)


def to_data_uri(image, fmt: str = "jpeg", quality: int = 85) -> str:
    """PIL image or ``H x W x 3`` uint8 array -> ``data:image/<fmt>;base64,...``."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if image.mode == "RGBA" and fmt.lower() in ("jpeg", "jpg"):
        fmt = "png"  # keep the transparency
    if image.mode not in ("RGB", "L") and fmt.lower() in ("jpeg", "jpg"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    fmt = "jpeg" if fmt.lower() in ("jpeg", "jpg") else fmt.lower()
    if fmt == "jpeg":
        image.save(buf, format="JPEG", quality=int(quality))
    else:
        image.save(buf, format=fmt.upper())
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_sample_grid(fused: FusedFeatures, width: int, height: int) -> torch.Tensor:
    """``1 x H x W x 2`` ``grid_sample`` coordinates (align_corners=True) that read the
    token map of ``fused`` at the centre of every pixel of a ``width x height`` picture of
    the image (any size: the original or a downsampled copy), never past the tokens that
    cover the image (the padding's tokens would bleed into its edges)."""
    lb, stride = fused.letterbox, fused.stride
    g = fused.grid
    nx = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    ny = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    # normalised -> original pixels -> frame -> fractional token index (token centre p)
    fx = nx * lb.width * lb.scale + lb.pad_left
    fy = ny * lb.height * lb.scale + lb.pad_top
    px = (fx - (stride - 1) / 2.0) / stride
    py = (fy - (stride - 1) / 2.0) / stride
    # read only tokens on the image: near the image's edge, repeat the last such token
    # rather than blend in the letterbox padding's tokens
    valid = fused.valid_mask().cpu()
    cols, rows = torch.nonzero(valid.any(dim=0)).flatten(), torch.nonzero(valid.any(dim=1)).flatten()
    if len(cols) and len(rows):
        px = px.clamp(float(cols.min()), float(cols.max()))
        py = py.clamp(float(rows.min()), float(rows.max()))
    gx = (px / max(g - 1, 1)) * 2 - 1
    gy = (py / max(g - 1, 1)) * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)
    return grid[None].float()


def token_map_to_image(values, fused: FusedFeatures, width: int, height: int,
                       mode: str = "bilinear") -> np.ndarray:
    """A map on the token grid of ``fused`` -> the same map over a ``width x height``
    picture of the image.

    ``values``: ``G x G`` (scalars or integer labels) or ``G x G x C`` (e.g. RGB).
    ``mode``: ``"bilinear"`` for continuous values, ``"nearest"`` for labels. Returns a
    float array ``height x width`` (or ``height x width x C``); labels come back exact.
    """
    v = torch.as_tensor(np.asarray(values), dtype=torch.float32)
    chan_last = v.dim() == 3
    x = v.permute(2, 0, 1)[None] if chan_last else v[None, None]
    grid = image_sample_grid(fused, width, height)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=True)[0]
    out = out.permute(1, 2, 0) if chan_last else out[0]
    return out.numpy()


# --------------------------------------------------------------------------- PCA / k-means
def _unit_valid_tokens(fused: FusedFeatures) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(N_valid x C)`` unit token vectors and the ``G x G`` valid mask."""
    d = fused.descriptors.float()
    mask = fused.valid_mask()
    t = d[:, mask].T
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12), mask


def _top_directions(x: torch.Tensor, k: int, oversample: int = 10, power_iters: int = 6,
                    seed: int = 0) -> torch.Tensor:
    """Top ``k`` right singular vectors (``C x k``) of ``x`` (``N x C``, centred).

    Exact SVD for small matrices; otherwise a randomised range finder with power
    iterations from a seeded generator (deterministic; a 2 x 3600 x 1536 pair takes well
    under a second on a CPU, where the exact decomposition takes tens of seconds).
    """
    n, c = x.shape
    k = min(k, n, c)
    if min(n, c) <= 4 * (k + oversample):
        _, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
        return vh[:k].T.float()
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(c, k + oversample, generator=gen)
    q, _ = torch.linalg.qr(x @ omega)
    for _ in range(power_iters):
        q, _ = torch.linalg.qr(x.T @ q)
        q, _ = torch.linalg.qr(x @ q)
    _, _, vh = torch.linalg.svd((q.T @ x).double(), full_matrices=False)
    return vh[:k].T.float()


@dataclass
class PCAColors:
    """A 3-component PCA of unit fused tokens and the ranges that map it to colours."""

    mean: torch.Tensor  # (C,)
    components: torch.Tensor  # (C, 3)
    lo: torch.Tensor  # (3,)
    hi: torch.Tensor  # (3,)

    def apply(self, fused: FusedFeatures) -> np.ndarray:
        """``G x G x 3`` uint8 colours of ``fused`` (padding tokens black)."""
        t, mask = _unit_valid_tokens(fused)
        proj = (t - self.mean) @ self.components
        colours = ((proj - self.lo) / (self.hi - self.lo).clamp_min(1e-12)).clamp(0, 1)
        img = torch.zeros(*mask.shape, 3, dtype=torch.uint8)
        img[mask] = (colours * 255).round().to(torch.uint8)
        return img.numpy()


def fit_pca_colors(fused_list: Sequence[FusedFeatures], n_components: int = 3, clip: float = 0.01,
                   max_tokens: int = 50000, seed: int = 0) -> PCAColors:
    """Fits the first three principal components on the valid unit tokens of all of
    ``fused_list`` (at most ``max_tokens``, an evenly spaced subset), and the colour range
    of each component between its ``clip`` and ``1 - clip`` quantiles. Deterministic."""
    if not fused_list:
        raise ValueError("fit_pca_colors needs at least one FusedFeatures")
    tokens = torch.cat([_unit_valid_tokens(f)[0] for f in fused_list]).float()
    if tokens.shape[0] > max_tokens:
        idx = torch.linspace(0, tokens.shape[0] - 1, max_tokens).round().long()
        tokens = tokens[idx]
    mean = tokens.mean(0)
    centred = tokens - mean
    v = _top_directions(centred, n_components, seed=seed)
    idx = v.abs().argmax(dim=0)
    signs = torch.sign(v[idx, torch.arange(v.shape[1])])
    signs[signs == 0] = 1
    v = v * signs
    if v.shape[1] < 3:
        v = torch.cat([v, torch.zeros(v.shape[0], 3 - v.shape[1])], 1)
    proj = (centred @ v).double()
    lo = torch.quantile(proj, clip, dim=0).float()
    hi = torch.quantile(proj, 1 - clip, dim=0).float()
    return PCAColors(mean=mean, components=v, lo=lo, hi=hi)


def pca_rgb(feats_a: FusedFeatures, feats_b: FusedFeatures, n_components: int = 3,
            clip: float = 0.01) -> Tuple[np.ndarray, np.ndarray]:
    """First three principal components of the pair's fused features, as colours.

    PCA is fitted jointly on the valid (non-padding) unit tokens of both images, so the
    same part gets the same colour in both; each component is scaled to ``[0, 1]`` between
    its joint ``clip`` and ``1 - clip`` quantiles. Returns two ``G x G x 3`` uint8 token
    maps (padding tokens black). Deterministic (signs fixed, seeded range finder).
    """
    fit = fit_pca_colors([feats_a, feats_b], n_components=n_components, clip=clip)
    return fit.apply(feats_a), fit.apply(feats_b)


@dataclass
class Parts:
    """A k-means clustering of the tokens of two images (``-1`` on padding tokens)."""

    labels_a: np.ndarray
    labels_b: np.ndarray
    centers: np.ndarray
    k: int


def spherical_kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 50) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(assignment, unit centres)`` of unit rows ``x``: k-means with cosine distance,
    k-means++ seeding from ``torch.Generator().manual_seed(seed)``; clusters numbered by
    decreasing size, so the numbering does not depend on the seeding order."""
    n = x.shape[0]
    k = max(1, min(int(k), n))
    gen = torch.Generator().manual_seed(int(seed))
    centers = [x[int(torch.randint(n, (1,), generator=gen))]]
    dist = (1 - x @ centers[0]).clamp_min(0)
    for _ in range(1, k):
        p = dist / dist.sum() if float(dist.sum()) > 0 else torch.full((n,), 1.0 / n)
        i = int(torch.multinomial(p, 1, generator=gen))
        centers.append(x[i])
        dist = torch.minimum(dist, (1 - x @ x[i]).clamp_min(0))
    c = torch.stack(centers)
    assign = torch.zeros(n, dtype=torch.long)
    for it in range(int(iters)):
        new = (x @ c.T).argmax(dim=1)
        if it and torch.equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = x[assign == j]
            if members.numel():
                m = members.sum(0)
                c[j] = m / m.norm().clamp_min(1e-12)
    sizes = torch.bincount(assign, minlength=k)
    order = sorted(range(k), key=lambda j: (-int(sizes[j]), j))
    remap = torch.empty(k, dtype=torch.long)
    for new_j, old_j in enumerate(order):
        remap[old_j] = new_j
    return remap[assign], c[order]


def kmeans_parts(feats_a: FusedFeatures, feats_b: FusedFeatures, k: int = 6, seed: int = 0,
                 iters: int = 50) -> Parts:
    """Part clustering shared by both images (:func:`spherical_kmeans` on the unit valid
    tokens of both): the same part gets the same cluster (colour) in both images."""
    ta, ma = _unit_valid_tokens(feats_a)
    tb, mb = _unit_valid_tokens(feats_b)
    assign, c = spherical_kmeans(torch.cat([ta, tb]), k, seed, iters)
    out = []
    for mask, part in ((ma, assign[: ta.shape[0]]), (mb, assign[ta.shape[0]:])):
        lab = torch.full(mask.shape, -1, dtype=torch.long)
        lab[mask] = part
        out.append(lab.numpy())
    return Parts(labels_a=out[0], labels_b=out[1], centers=c.numpy(), k=int(c.shape[0]))


def fit_part_centers(fused_list: Sequence[FusedFeatures], k: int = 6, seed: int = 0,
                     max_tokens: int = 200_000) -> torch.Tensor:
    """Part centres fitted once on several images (a dataset-wide part clustering)."""
    x = torch.cat([_unit_valid_tokens(f)[0] for f in fused_list])
    if x.shape[0] > max_tokens:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_tokens]]
    return spherical_kmeans(x, k, seed)[1]


def assign_parts(fused: FusedFeatures, centers: torch.Tensor) -> np.ndarray:
    """The part (nearest centre by cosine) of each token; ``-1`` on padding tokens."""
    tokens, mask = _unit_valid_tokens(fused)
    lab = torch.full(mask.shape, -1, dtype=torch.long)
    lab[mask] = (tokens @ centers.T).argmax(dim=1)
    return lab.numpy()


# --------------------------------------------------------------------------- click-to-match
@dataclass
class PointMatch:
    """The best match of one source point in the target.

    ``source_xy`` / ``target_xy``: normalised coordinates (the source point is snapped to
    nothing: it is what was clicked; the match is the centre of the best target token);
    ``source_token`` / ``target_token``: ``(col, row)``; ``similarity``: cosine at the
    match; ``heatmap``: ``G_t x G_t`` cosine similarity of the source token to every target
    token (NaN on padding).
    """

    source_xy: Tuple[float, float]
    target_xy: Tuple[float, float]
    source_token: Tuple[int, int]
    target_token: Tuple[int, int]
    similarity: float
    heatmap: np.ndarray


def similarity_map(src: FusedFeatures, tgt: FusedFeatures, xy) -> np.ndarray:
    """Cosine similarity of the source token under normalised point ``xy`` to every
    target token: ``G_t x G_t`` float32, NaN on the target's padding tokens."""
    tokens, valid = corr.keypoints_to_tokens([xy], src)
    if not bool(valid.all()):
        raise ValueError(f"point {tuple(xy)} is not inside the image")
    sim = corr.similarity_maps(src, tgt, tokens)[0].numpy().astype(np.float32)
    sim[~tgt.valid_mask().numpy()] = np.nan
    return sim


def match_point(src: FusedFeatures, tgt: FusedFeatures, xy) -> PointMatch:
    """Best match in ``tgt`` of the source point at normalised ``xy`` (nearest neighbour
    by cosine over the target's image tokens) with the similarity heat map."""
    x, y = float(xy[0]), float(xy[1])
    tokens, valid = corr.keypoints_to_tokens([(x, y)], src)
    if not bool(valid.all()):
        raise ValueError(f"point {(x, y)} is not inside the image")
    m = corr.match_points(src, tgt, tokens, cycle=False)
    heat = similarity_map(src, tgt, (x, y))
    txy = m.normalized(tgt)[0].tolist()
    return PointMatch(
        source_xy=(x, y),
        target_xy=(float(txy[0]), float(txy[1])),
        source_token=tuple(int(v) for v in tokens[0].tolist()),
        target_token=tuple(int(round(v)) for v in m.tokens[0].tolist()),
        similarity=float(m.similarity[0]),
        heatmap=heat,
    )


def heatmap_image(heat: np.ndarray, tgt: FusedFeatures, width: int, height: int,
                  vmin: Optional[float] = None, vmax: Optional[float] = None,
                  alpha: Optional[float] = 0.8, gamma: float = 1.0) -> np.ndarray:
    """A ``G x G`` similarity map (NaN on padding) -> colours over a ``width x height``
    picture of the target image (bilinear between tokens).

    Values are scaled between ``vmin`` (default: the median, so that only the better half
    shows) and ``vmax`` (default: the maximum). With ``alpha`` (default) the result is
    ``height x width x 4`` RGBA whose opacity grows with the value (``alpha * t ** gamma``):
    low similarity leaves the photo visible. ``alpha=None`` gives opaque RGB.
    """
    h = np.asarray(heat, dtype=np.float32)
    finite = np.isfinite(h)
    if vmin is None:
        vmin = float(np.median(h[finite])) if finite.any() else 0.0
    if vmax is None:
        vmax = float(h[finite].max()) if finite.any() else 1.0
    if vmax <= vmin:
        vmax = vmin + 1e-6
    filled = np.where(finite, h, vmin)
    up = token_map_to_image(filled, tgt, width, height, mode="bilinear")
    rgb = colorize(up, vmin=vmin, vmax=vmax)
    if alpha is None:
        return rgb
    t = np.clip((up - vmin) / (vmax - vmin), 0.0, 1.0)
    a = (255 * float(alpha) * t ** float(gamma)).round().astype(np.uint8)
    return np.concatenate([rgb, a[..., None]], axis=-1)


__all__ = [
    "PALETTE",
    "palette_color",
    "rgba",
    "colorize",
    "labels_to_rgb",
    "display_size",
    "pixel_index_to_normalized",
    "normalized_to_pixel_index",
    "downsample",
    "to_data_uri",
    "image_sample_grid",
    "token_map_to_image",
    "PCAColors",
    "fit_pca_colors",
    "pca_rgb",
    "Parts",
    "kmeans_parts",
    "PointMatch",
    "similarity_map",
    "match_point",
    "heatmap_image",
]
