"""Letterbox geometry: original pixels <-> square model frame <-> token grid.

Conventions (the paper's code, ``preprocess_kps_pad``):

- An image of ``width x height`` is resized so that its long side becomes ``size``
  (``scale = size / max(width, height)``); the short side becomes
  ``round(size * short / long)`` (at least 1 pixel) and is centred with an integer
  offset ``(size - short) // 2``.
- A point in original pixel coordinates ``(x, y)`` maps into the frame as
  ``(x * scale + pad_left, y * scale + pad_top)``.
- Token index of a frame coordinate: ``floor(frame / stride)``; the centre of token
  ``p`` is ``stride * p + (stride - 1) / 2`` (``14 p + 6.5`` for DINOv2).
- FiftyOne stores points normalised to ``[0, 1]``: ``x = nx * width``.

Pure Python / torch; no FiftyOne import.
"""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass

import numpy as np
import torch


def _pair(a, b, like: torch.Tensor) -> torch.Tensor:
    """``[a, b]`` as float64 on the device of ``like`` (the geometry works on any device)."""
    return torch.tensor([a, b], dtype=torch.float64, device=like.device)


@dataclass(frozen=True)
class Letterbox:
    """Where an original image sits inside a ``size x size`` square model frame."""

    width: int
    height: int
    size: int
    scale: float
    resized_width: int
    resized_height: int
    pad_left: int
    pad_top: int

    @classmethod
    def fit(cls, width: int, height: int, size: int) -> "Letterbox":
        width, height, size = int(width), int(height), int(size)
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        if size < 1:
            raise ValueError(f"frame size must be positive, got {size}")
        long_side = max(width, height)
        scale = size / long_side
        if width >= height:
            rw = size
            rh = min(size, max(1, int(round(size * height / width))))
        else:
            rh = size
            rw = min(size, max(1, int(round(size * width / height))))
        return cls(
            width=width,
            height=height,
            size=size,
            scale=scale,
            resized_width=rw,
            resized_height=rh,
            pad_left=(size - rw) // 2,
            pad_top=(size - rh) // 2,
        )

    # ---- points -------------------------------------------------------------
    def pixel_to_frame(self, xy):
        """Original pixel coordinates (..., 2) -> frame coordinates (..., 2)."""
        xy = torch.as_tensor(xy, dtype=torch.float64)
        return xy * self.scale + _pair(self.pad_left, self.pad_top, xy)

    def frame_to_pixel(self, xy):
        xy = torch.as_tensor(xy, dtype=torch.float64)
        return (xy - _pair(self.pad_left, self.pad_top, xy)) / self.scale

    def normalized_to_pixel(self, nxy):
        nxy = torch.as_tensor(nxy, dtype=torch.float64)
        return nxy * _pair(self.width, self.height, nxy)

    def pixel_to_normalized(self, xy):
        xy = torch.as_tensor(xy, dtype=torch.float64)
        return xy / _pair(self.width, self.height, xy)

    def frame_to_token(self, xy, stride: int):
        """Frame coordinates -> integer token indices (col, row).

        Points are first clamped onto the image (a point on the far edge, x = width,
        belongs to the last pixel), then ``floor(frame / stride)``.
        """
        xy = torch.as_tensor(xy, dtype=torch.float64)
        lo = _pair(self.pad_left, self.pad_top, xy)
        hi = lo + _pair(self.resized_width, self.resized_height, xy) - 1e-6
        xy = torch.minimum(torch.maximum(xy, lo), hi)
        grid = self.size // stride
        return torch.clamp(torch.floor(xy / stride), 0, grid - 1).long()

    @staticmethod
    def token_center(p, stride: int):
        """Frame coordinate of the centre of token index ``p`` (e.g. 14 p + 6.5)."""
        return torch.as_tensor(p, dtype=torch.float64) * stride + (stride - 1) / 2.0

    def normalized_to_token(self, nxy, stride: int):
        return self.frame_to_token(self.pixel_to_frame(self.normalized_to_pixel(nxy)), stride)

    def token_to_normalized(self, cr, stride: int):
        """Token indices (col, row), or fractional ones, -> normalised [0, 1] coordinates."""
        cr = torch.as_tensor(cr, dtype=torch.float64)
        return self.pixel_to_normalized(self.frame_to_pixel(self.token_center(cr, stride)))

    def pixel_to_token(self, xy, stride: int):
        return self.frame_to_token(self.pixel_to_frame(xy), stride)

    def token_to_pixel(self, cr, stride: int):
        return self.frame_to_pixel(self.token_center(cr, stride))

    # ---- masks --------------------------------------------------------------
    def valid_token_mask(self, stride: int, device=None) -> torch.Tensor:
        """(grid, grid) bool mask of tokens that cover any part of the image, made on
        ``device`` (default CPU; no host-to-device copy).

        A token spans frame pixels ``[stride p, stride (p + 1))``; it is valid when that
        span overlaps the resized image on both axes, so every point on the image maps to
        a valid token and letterbox-only tokens are excluded.
        """
        grid = self.size // stride
        lo = torch.arange(grid, dtype=torch.float64, device=device) * stride
        hi = lo + stride
        cols = (hi > self.pad_left) & (lo < self.pad_left + self.resized_width)
        rows = (hi > self.pad_top) & (lo < self.pad_top + self.resized_height)
        return rows[:, None] & cols[None, :]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Letterbox":
        return cls(**{k: (float(v) if k == "scale" else int(v)) for k, v in d.items()})


def grid_size(size: int, stride: int) -> int:
    if size % stride:
        raise ValueError(f"frame size {size} is not a multiple of the stride {stride}")
    return size // stride


__all__ = ["Letterbox", "grid_size", "points_array"]


def points_array(rows) -> np.ndarray:
    """``[[x, y] | None, ...]`` -> ``(K, 2)`` float64 with NaN for missing / non-finite."""
    rows = list(rows or [])
    out = np.full((len(rows), 2), np.nan)
    for i, xy in enumerate(rows):
        if xy is None:
            continue
        try:
            x, y = float(xy[0]), float(xy[1])
        except (TypeError, ValueError, IndexError):
            continue
        if math.isfinite(x) and math.isfinite(y):
            out[i] = (x, y)
    return out


# --------------------------------------------------------------------------- object crops
#: context added around an object's box on each side, as a fraction of the box's side
#: (the crop is 1.25x the box, as top-down pose estimators crop COCO persons: points on
#: the box's edge, hands and feet, stay inside with some surrounding for the descriptors)
DEFAULT_CONTEXT_MARGIN = 0.125


@dataclass(frozen=True)
class Crop:
    """An object's crop: its box (normalised ``[x, y, w, h]``, FiftyOne's convention) grown
    by ``margin`` of its side on each side, clipped to the image and rounded outwards to
    whole pixels. Points convert between the crop's normalised frame (what the features
    of the crop see) and the image's."""

    width: int  # of the image
    height: int
    left: int  # the crop, in image pixels: [left, right) x [top, bottom)
    top: int
    right: int
    bottom: int

    @classmethod
    def of_box(cls, width: int, height: int, box, margin: float = DEFAULT_CONTEXT_MARGIN) -> "Crop":
        if box is None or len(box) != 4:
            raise ValueError(f"object box {box!r} is not [x, y, width, height]")
        x, y, w, h = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            raise ValueError(f"object box {list(box)} has no area")
        mx, my = w * margin, h * margin
        eps = 1e-6  # a box given in whole pixels stays whole after the float round trip
        left = max(0, int(math.floor((x - mx) * width + eps)))
        top = max(0, int(math.floor((y - my) * height + eps)))
        right = min(int(width), int(math.ceil((x + w + mx) * width - eps)))
        bottom = min(int(height), int(math.ceil((y + h + my) * height - eps)))
        if right - left < 1 or bottom - top < 1:
            raise ValueError(f"object box {list(box)} lies outside the {width}x{height} image")
        return cls(int(width), int(height), left, top, right, bottom)

    @property
    def size(self):
        return self.right - self.left, self.bottom - self.top

    def to_crop(self, nxy) -> np.ndarray:
        """Image-normalised points ``(..., 2)`` -> crop-normalised (NaN stays NaN)."""
        nxy = np.asarray(nxy, dtype=np.float64)
        cw, ch = self.size
        return (nxy * (self.width, self.height) - (self.left, self.top)) / (cw, ch)

    def to_image(self, cxy) -> np.ndarray:
        """Crop-normalised points ``(..., 2)`` -> image-normalised."""
        cxy = np.asarray(cxy, dtype=np.float64)
        cw, ch = self.size
        return (cxy * (cw, ch) + (self.left, self.top)) / (self.width, self.height)

    def box(self):
        """``(left, top, right, bottom)`` for ``PIL.Image.crop``."""
        return self.left, self.top, self.right, self.bottom


__all__ += ["Crop", "DEFAULT_CONTEXT_MARGIN"]
