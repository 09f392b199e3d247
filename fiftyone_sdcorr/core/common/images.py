"""Image loading: any path / PIL image / numpy array -> an RGB ``PIL.Image``.

The image you get is the image the FiftyOne App shows:

- **EXIF orientation** is applied (``PIL.ImageOps.exif_transpose``), as browsers do;
  :func:`image_size` reports the oriented size (orientations 5-8 swap width and height),
  as FiftyOne's ``ImageMetadata`` does.
- **Alpha** (``LA``, ``RGBA``, ``PA``, ``P`` with a transparent colour, 4-channel arrays) is
  composited over **black**: transparent pixels look like the zero padding of the
  letterbox, so they add no spurious texture to the features.
- **16-bit** data (``I;16*`` modes, ``uint16`` arrays, ``I`` images whose values fit in
  0..65535) is scaled to 8 bit (``round(v / 257)``), never clipped.
- **Float** data: arrays must lie in ``[0, 1]``; ``F``-mode files in ``[0, 1]`` are scaled
  by 255, other ranges are min-max normalised.
- ``CMYK`` uses Pillow's conversion; embedded ICC profiles are not applied.
- Multi-frame files (GIF, TIFF) give their first frame.

Files are fully decoded (``img.load()``) here, so a truncated or corrupt file fails with
:class:`ImageLoadError` naming the file, not later inside a model. Nothing is ever
unpickled (numpy arrays are taken as objects, never read with ``allow_pickle``).

Pure Python / numpy / Pillow; no FiftyOne import.
"""

from __future__ import annotations

import os
import struct
from typing import Tuple, Union

import numpy as np
from PIL import Image, ImageOps

from fiftyone_sdcorr.core.common.geometry import Crop

ImageLike = Union[str, "os.PathLike[str]", Image.Image, np.ndarray]

#: EXIF tag 0x0112
_ORIENTATION_TAG = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageLoadError(ValueError):
    """An image could not be loaded; the message names the file and the reason."""

    def __init__(self, source, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"Cannot load image {self.source!s}: {reason}")


# ---------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------
def load_image(image: ImageLike) -> Image.Image:
    """Load ``image`` as an 8-bit RGB ``PIL.Image`` oriented as the FiftyOne App shows it.

    Args:
        image: a file path (``str`` / ``os.PathLike``), a ``PIL.Image.Image`` or a numpy
            array (``HxW``, ``HxWx1``, ``HxWx2``, ``HxWx3``, ``HxWx4``; ``uint8``,
            ``uint16``, ``bool``, float in ``[0, 1]``, or other integers in ``0..255``).

    Returns:
        a new RGB image (never the object passed in).

    Raises:
        ImageLoadError: missing / empty / non-image / corrupt / truncated file, or an
            unsupported mode, shape or dtype. The message names the file.
        TypeError: ``image`` is none of the accepted types.
    """
    if isinstance(image, (str, os.PathLike)):
        return _load_path(image)
    if isinstance(image, Image.Image):
        name = getattr(image, "filename", None) or "<PIL.Image>"
        try:
            image.load()
        except Exception as e:  # lazy images opened from a file may fail only now
            raise ImageLoadError(name, f"corrupt or truncated image data ({e})") from e
        return _to_rgb(_exif_transpose(image), name)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise TypeError(
        "load_image expects a file path, a PIL.Image.Image or a numpy array, "
        f"got {type(image).__name__}"
    )


def load_crop(image: ImageLike, box, margin: float) -> Tuple[Image.Image, Crop]:
    """An object's crop of ``image`` (``box``: normalised ``[x, y, w, h]`` grown by ``margin``,
    :class:`~fiftyone_sdcorr.core.common.geometry.Crop`) and where it sits in the image. A box
    without area or outside the image is an :class:`ImageLoadError` naming the file."""
    img = load_image(image)
    try:
        crop = Crop.of_box(img.width, img.height, box, margin)
    except ValueError as e:
        raise ImageLoadError(image if isinstance(image, (str, os.PathLike)) else "<image>", str(e)) from None
    return img.crop(crop.box()), crop


def image_size(image_or_path: ImageLike) -> Tuple[int, int]:
    """``(width, height)`` of the image as displayed, i.e. after EXIF orientation.

    For paths only the header is read (plus, for PNG, a scan of the chunk headers for an
    ``eXIf`` chunk), so this is cheap; it does not detect truncated pixel data.
    """
    if isinstance(image_or_path, (str, os.PathLike)):
        path = _check_path(image_or_path)
        try:
            with Image.open(path) as img:
                w, h = img.size
                orientation = _file_orientation(img, path)
        except ImageLoadError:
            raise
        except Image.DecompressionBombError as e:
            raise ImageLoadError(path, f"image too large ({e})") from e
        except Exception as e:
            raise ImageLoadError(path, f"not an image or unsupported format ({e})") from e
        return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    if isinstance(image_or_path, Image.Image):
        w, h = image_or_path.size
        try:
            orientation = image_or_path.getexif().get(_ORIENTATION_TAG, 1)
        except Exception:
            orientation = 1
        return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    if isinstance(image_or_path, np.ndarray):
        _check_array_shape(image_or_path)
        return int(image_or_path.shape[1]), int(image_or_path.shape[0])
    raise TypeError(
        "image_size expects a file path, a PIL.Image.Image or a numpy array, "
        f"got {type(image_or_path).__name__}"
    )


# ---------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------
def _check_path(path) -> str:
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not os.path.exists(path):
        raise ImageLoadError(path, "file not found")
    if os.path.isdir(path):
        raise ImageLoadError(path, "is a directory, not an image file")
    if os.path.getsize(path) == 0:
        raise ImageLoadError(path, "file is empty (zero bytes)")
    return path


def _load_path(path) -> Image.Image:
    path = _check_path(path)
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ImageLoadError(path, f"image too large ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise ImageLoadError(path, "not an image, or a format Pillow cannot read") from e
    except Exception as e:
        raise ImageLoadError(path, f"not an image or corrupt header ({e})") from e
    with img:
        try:
            img.load()  # full decode: truncated / corrupt data fails here
        except Image.DecompressionBombError as e:
            raise ImageLoadError(path, f"image too large ({e})") from e
        except Exception as e:
            raise ImageLoadError(path, f"corrupt or truncated image data ({e})") from e
        return _to_rgb(_exif_transpose(img), path)


def _file_orientation(img: Image.Image, path: str) -> int:
    """EXIF orientation of an opened (not decoded) file, reading headers only."""
    if img.format == "PNG" and "exif" not in img.info:
        # Pillow decodes the whole PNG to look for an eXIf chunk after the pixel data;
        # scan the chunk headers instead (seek over the data).
        data = _png_exif_chunk(path)
        if data is None:
            return 1
        exif = Image.Exif()
        try:
            exif.load(data)
        except Exception:
            return 1
        return _as_orientation(exif.get(_ORIENTATION_TAG, 1))
    try:
        return _as_orientation(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:
        return 1


def _as_orientation(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 1


def _png_exif_chunk(path: str):
    try:
        with open(path, "rb") as f:
            if f.read(8) != _PNG_SIGNATURE:
                return None
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return None
                length, ctype = struct.unpack(">I4s", head)
                if ctype == b"eXIf":
                    data = f.read(length)
                    return data if len(data) == length else None
                if ctype == b"IEND":
                    return None
                f.seek(length + 4, os.SEEK_CUR)  # data + CRC
    except OSError:
        return None


def _exif_transpose(img: Image.Image) -> Image.Image:
    """Orientation as displayed; a broken EXIF block leaves the image as stored."""
    try:
        out = ImageOps.exif_transpose(img)
    except Exception:
        return img
    return img if out is None else out


# ---------------------------------------------------------------------------------------
# modes -> RGB
# ---------------------------------------------------------------------------------------
def _to_rgb(img: Image.Image, name) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in ("L", "1", "RGBX", "YCbCr", "CMYK", "HSV"):
        return img.convert("RGB")
    if mode == "P":
        if "transparency" in img.info:
            return _composite(np.asarray(img.convert("RGBA")))
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA"):
        return _composite(np.asarray(img.convert("RGBA")))
    if mode == "RGBa":  # premultiplied = already composited over black
        return Image.fromarray(np.ascontiguousarray(np.asarray(img)[..., :3]), "RGB")
    if mode == "La":
        return _gray_to_rgb(np.asarray(img)[..., 0])
    if mode.startswith("I;16"):
        return _gray_to_rgb(_scale_16bit(np.asarray(img)))
    if mode == "I":
        a = np.asarray(img)
        if a.size and a.min() >= 0 and a.max() <= 65535:
            return _gray_to_rgb(_scale_16bit(a))
        return _gray_to_rgb(_minmax(a))
    if mode == "F":
        a = np.asarray(img).astype(np.float64)
        if not np.isfinite(a).all():
            raise ImageLoadError(name, "unsupported: float image with NaN or infinite values")
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            return _gray_to_rgb(_scale_unit_float(a))
        return _gray_to_rgb(_minmax(a))
    try:
        return img.convert("RGB")
    except Exception as e:
        raise ImageLoadError(name, f"unsupported image mode {mode!r} ({e})") from e


def _gray_to_rgb(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(np.repeat(a[..., None], 3, axis=-1)), "RGB")


def _scale_16bit(a: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 by ``round(v * 255 / 65535)`` (exact integer arithmetic)."""
    v = a.astype(np.uint32)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def _scale_unit_float(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def _minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return _scale_unit_float((a - lo) / (hi - lo))


def _composite(rgba: np.ndarray) -> Image.Image:
    """Composite ``H x W x 4`` uint8 over black: ``rgb * alpha / 255``, rounded."""
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:4].astype(np.uint32)
    out = ((rgb * alpha + 127) // 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(out), "RGB")


# ---------------------------------------------------------------------------------------
# arrays
# ---------------------------------------------------------------------------------------
def _describe(a: np.ndarray) -> str:
    return f"<array shape={tuple(a.shape)} dtype={a.dtype}>"


def _check_array_shape(a: np.ndarray) -> None:
    name = _describe(a)
    if a.ndim == 3 and a.shape[-1] in (1, 2, 3, 4):
        pass
    elif a.ndim != 2:
        hint = ""
        if a.ndim == 3 and a.shape[0] in (1, 3, 4):
            hint = "; channels must come last (H x W x C), transpose a C x H x W array"
        raise ImageLoadError(
            name, f"unsupported shape: expected H x W or H x W x C with C in 1..4{hint}"
        )
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ImageLoadError(name, "unsupported: empty array")


def _array_to_rgb(a: np.ndarray) -> Image.Image:
    name = _describe(a)
    _check_array_shape(a)
    a8 = _array_to_uint8(a, name)
    if a8.ndim == 2:
        return _gray_to_rgb(a8)
    c = a8.shape[-1]
    if c == 1:
        return _gray_to_rgb(a8[..., 0])
    if c == 2:  # gray + alpha
        g = a8[..., 0:1]
        return _composite(np.concatenate([g, g, g, a8[..., 1:2]], axis=-1))
    if c == 3:
        return Image.fromarray(np.ascontiguousarray(a8), "RGB")
    return _composite(a8)


def _array_to_uint8(a: np.ndarray, name: str) -> np.ndarray:
    dt = a.dtype
    if dt == np.uint8:
        return a
    if dt == np.bool_:
        return a.astype(np.uint8) * np.uint8(255)
    if dt == np.uint16:
        return _scale_16bit(a)
    if np.issubdtype(dt, np.floating):
        f = a.astype(np.float64)
        if not np.isfinite(f).all():
            raise ImageLoadError(name, "unsupported: float array with NaN or infinite values")
        lo, hi = float(f.min()), float(f.max())
        eps = 1e-6
        if lo < -eps or hi > 1.0 + eps:
            raise ImageLoadError(
                name,
                f"unsupported: float arrays must lie in [0, 1], got [{lo:g}, {hi:g}] "
                "(pass uint8 for 0..255 data)",
            )
        return _scale_unit_float(f)
    if np.issubdtype(dt, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise ImageLoadError(
                name,
                f"unsupported: {dt} array with values in [{lo}, {hi}]; pass uint8 (0..255) "
                "or uint16 (0..65535)",
            )
        return a.astype(np.uint8)
    raise ImageLoadError(name, f"unsupported dtype {dt}")


__all__ = ["ImageLoadError", "load_image", "load_crop", "image_size"]
