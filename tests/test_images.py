"""fiftyone_sdcorr.core.common.images: every input kind -> RGB as the App shows it, clear errors."""

import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from fiftyone_sdcorr.core.common.images import ImageLoadError, image_size, load_image


@pytest.fixture(autouse=True)
def _strict_truncation(monkeypatch):
    # someone else's code may have relaxed this globally; our guarantee must not rely on it
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


def _rgb(img):
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    return np.asarray(img)


def _blocks(w=48, h=32, seed=0):
    """A non-symmetric image of solid 16x16 blocks (JPEG-friendly, orientation-revealing)."""
    rng = np.random.default_rng(seed)
    colors = rng.integers(0, 256, size=(h // 16, w // 16, 3), dtype=np.uint8)
    a = np.kron(colors, np.ones((16, 16, 1), dtype=np.uint8))
    a[:16, :16] = (255, 0, 0)  # stored top-left block is red
    return a


# --------------------------------------------------------------------------- modes
def test_rgb_path_and_pathlike(tmp_path):
    a = _blocks()
    p = tmp_path / "rgb.png"
    Image.fromarray(a).save(p)
    np.testing.assert_array_equal(_rgb(load_image(str(p))), a)
    np.testing.assert_array_equal(_rgb(load_image(p)), a)
    assert image_size(p) == (48, 32)


def test_mode_L(tmp_path):
    g = np.arange(256, dtype=np.uint8).reshape(16, 16)
    p = tmp_path / "l.png"
    Image.fromarray(g, "L").save(p)
    out = _rgb(load_image(p))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_mode_LA_composited_over_black(tmp_path):
    la = np.zeros((2, 3, 2), dtype=np.uint8)
    la[..., 0] = 200
    la[..., 1] = [[255, 128, 0], [64, 255, 0]]
    p = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(p)
    assert Image.open(p).mode == "LA"
    out = _rgb(load_image(p))
    expected = np.rint(200 * la[..., 1].astype(float) / 255).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


def test_mode_RGBA_composited_over_black(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: unchanged
    rgba[0, 1] = (255, 255, 255, 0)  # transparent white -> black
    rgba[1, 0] = (200, 100, 50, 128)
    rgba[1, 1] = (255, 0, 255, 1)
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(p)
    out = _rgb(load_image(p))
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[0, 1]) == (0, 0, 0)
    assert tuple(out[1, 0]) == (100, 50, 25)  # round(x * 128 / 255)
    assert tuple(out[1, 1]) == (1, 0, 1)


def test_mode_P(tmp_path):
    idx = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    p = tmp_path / "p.png"
    img.save(p)
    assert Image.open(p).mode == "P"
    out = _rgb(load_image(p))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (0, 255, 0)
    assert tuple(out[1, 0]) == (0, 0, 255)


@pytest.mark.parametrize("ext", ["png", "gif"])
def test_mode_P_with_transparency(tmp_path, ext):
    idx = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette([255, 255, 255, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    p = tmp_path / f"pt.{ext}"
    img.save(p, transparency=0)  # index 0 (white) is transparent
    with Image.open(p) as check:
        assert check.mode == "P" and "transparency" in check.info
    out = _rgb(load_image(p))
    assert tuple(out[0, 0]) == (0, 0, 0)  # transparent white composited over black
    assert tuple(out[0, 1]) == (0, 255, 0)
    assert tuple(out[1, 0]) == (0, 0, 255)


def test_mode_CMYK_jpeg(tmp_path):
    cmyk = np.zeros((16, 32, 4), dtype=np.uint8)
    cmyk[:, :16, 0] = 255  # cyan
    cmyk[:, 16:, 1] = 255  # magenta
    p = tmp_path / "cmyk.jpg"
    Image.fromarray(cmyk, "CMYK").save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    out = _rgb(load_image(p)).astype(int)
    assert np.abs(out[8, 4] - (0, 255, 255)).max() <= 8
    assert np.abs(out[8, 28] - (255, 0, 255)).max() <= 8


def test_mode_I16_png_scaled_not_clipped(tmp_path):
    v = np.array([[0, 257 * 100, 65535], [256, 32768, 1000]], dtype=np.uint16)
    p = tmp_path / "i16.png"
    Image.fromarray(v).save(p)
    with Image.open(p) as check:
        assert check.mode in ("I;16", "I")
    out = _rgb(load_image(p))
    expected = np.rint(v / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out[0, 1, 0] == 100 and out[0, 2, 0] == 255 and out[1, 1, 0] == 128
    assert out.std() > 0 and (out < 255).sum() > 1  # not clipped to 0/255


def test_modes_I16B_I_F_as_pil_images():
    v = np.array([[0, 25700, 65535, 12345]], dtype=np.uint16)
    big = Image.frombytes("I;16B", (4, 1), v.astype(">u2").tobytes())
    np.testing.assert_array_equal(_rgb(load_image(big))[..., 1], np.rint(v / 257).astype(np.uint8))
    i32 = Image.fromarray(v.astype(np.int32), "I")
    np.testing.assert_array_equal(_rgb(load_image(i32))[..., 2], np.rint(v / 257).astype(np.uint8))
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert _rgb(load_image(f))[0, :, 0].tolist() == [0, 128, 255]
    # F outside [0, 1]: min-max normalised, not clipped
    f2 = Image.fromarray(np.array([[-2.0, 0.0, 2.0]], dtype=np.float32), "F")
    assert _rgb(load_image(f2))[0, :, 0].tolist() == [0, 128, 255]


def test_mode_1bit(tmp_path):
    b = np.array([[True, False, True], [False, True, False]])
    p = tmp_path / "one.png"
    Image.fromarray(b).save(p)
    assert Image.open(p).mode == "1"
    out = _rgb(load_image(p))
    np.testing.assert_array_equal(out[..., 0], b.astype(np.uint8) * 255)


def test_pil_input_not_mutated_and_new_object():
    src = Image.fromarray(_blocks())
    before = np.asarray(src).copy()
    out = load_image(src)
    assert out is not src
    out.paste((0, 0, 0), (0, 0, 10, 10))
    np.testing.assert_array_equal(np.asarray(src), before)


# --------------------------------------------------------------------------- EXIF
def _displayed(stored: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF 2.3 semantics, written independently of Pillow's table."""
    return {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],  # mirror horizontally
        3: lambda a: a[::-1, ::-1],  # rotate 180
        4: lambda a: a[::-1, :],  # mirror vertically
        5: lambda a: a.transpose(1, 0, 2),  # row 0 -> left column, col 0 -> top row
        6: lambda a: np.rot90(a, -1),  # rotate 90 clockwise
        7: lambda a: np.rot90(a, -1)[::-1, :],  # row 0 -> right column, col 0 -> bottom
        8: lambda a: np.rot90(a, 1),  # rotate 90 counter-clockwise
    }[orientation](stored)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_jpeg(tmp_path, orientation):
    p = tmp_path / f"o{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(_blocks(48, 32)).save(p, exif=exif, quality=95)
    with Image.open(p) as raw:  # the stored pixels, no orientation applied
        assert raw.getexif()[0x0112] == orientation
        stored = np.asarray(raw.convert("RGB"))
    out = _rgb(load_image(p))
    expected = _displayed(stored, orientation)
    swapped = orientation >= 5
    assert out.shape[:2] == ((48, 32) if swapped else (32, 48))
    np.testing.assert_array_equal(out, expected)
    assert image_size(p) == ((32, 48) if swapped else (48, 32))
    # the red stored top-left block lands on the corner the EXIF spec says
    corner = {1: "tl", 2: "tr", 3: "br", 4: "bl", 5: "tl", 6: "tr", 7: "br", 8: "bl"}[orientation]
    h, w = out.shape[:2]
    r = 4 if corner[0] == "t" else h - 5
    c = 4 if corner[1] == "l" else w - 5
    assert out[r, c, 0] > 200 and out[r, c, 1] < 50
    # loading is idempotent: the returned image carries no orientation any more
    np.testing.assert_array_equal(_rgb(load_image(load_image(p))), expected)
    # a lazily opened PIL image is oriented too, and image_size agrees on PIL input
    with Image.open(p) as lazy:
        assert image_size(lazy) == image_size(p)
        np.testing.assert_array_equal(_rgb(load_image(lazy)), expected)


def _png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


@pytest.mark.parametrize("after_idat", [False, True])
def test_exif_orientation_png(tmp_path, after_idat):
    a = _blocks(48, 32)
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "o6.png"
    if not after_idat:
        Image.fromarray(a).save(p, exif=exif)
    else:  # eXIf after the pixel data (allowed by some writers)
        Image.fromarray(a).save(p)
        raw = p.read_bytes()
        assert raw[-12:-8] == b"\x00\x00\x00\x00" and raw[-8:-4] == b"IEND"
        p.write_bytes(raw[:-12] + _png_chunk(b"eXIf", exif.tobytes()) + raw[-12:])
    out = _rgb(load_image(p))
    np.testing.assert_array_equal(out, np.rot90(a, -1))
    assert image_size(p) == (32, 48)


def test_broken_exif_is_ignored_not_fatal(tmp_path):
    a = _blocks()
    p = tmp_path / "badexif.jpg"
    Image.fromarray(a).save(p, exif=b"Exif\x00\x00garbage-not-tiff", quality=95)
    out = load_image(p)
    assert out.size == (48, 32)
    assert image_size(p) == (48, 32)


# --------------------------------------------------------------------------- arrays
@pytest.mark.parametrize(
    "array, expected_first",
    [
        (np.full((4, 5), 7, np.uint8), (7, 7, 7)),
        (np.full((4, 5, 1), 9, np.uint8), (9, 9, 9)),
        (np.tile(np.array([1, 2, 3], np.uint8), (4, 5, 1)), (1, 2, 3)),
        (np.tile(np.array([200, 100, 50, 128], np.uint8), (4, 5, 1)), (100, 50, 25)),
        (np.tile(np.array([100, 255], np.uint8), (4, 5, 1)), (100, 100, 100)),  # gray+alpha
        (np.full((4, 5, 3), 257 * 100, np.uint16), (100, 100, 100)),
        (np.full((4, 5), 65535, np.uint16), (255, 255, 255)),
        (np.full((4, 5, 3), 0.5, np.float32), (128, 128, 128)),
        (np.full((4, 5, 3), 1.0, np.float64), (255, 255, 255)),
        (np.full((4, 5), 0.25, np.float16), (64, 64, 64)),
        (np.ones((4, 5), bool), (255, 255, 255)),
        (np.zeros((4, 5, 3), bool), (0, 0, 0)),
        (np.full((4, 5, 3), 42, np.int64), (42, 42, 42)),
    ],
    ids=lambda x: f"{x.dtype}-{x.shape}" if isinstance(x, np.ndarray) else str(x),
)
def test_arrays(array, expected_first):
    out = _rgb(load_image(array))
    assert out.shape == (4, 5, 3)
    assert tuple(out[0, 0]) == expected_first
    assert image_size(array) == (5, 4)


def test_array_not_aliased_and_noncontiguous():
    a = _blocks()
    out = load_image(a[:, ::-1])  # negative strides
    np.testing.assert_array_equal(_rgb(out), a[:, ::-1])
    arr = np.asarray(out).copy()
    a[:] = 0
    np.testing.assert_array_equal(np.asarray(out), arr)


@pytest.mark.parametrize(
    "array, words",
    [
        (np.full((4, 5, 3), 2.0, np.float32), "[0, 1]"),
        (np.full((4, 5, 3), np.nan, np.float32), "NaN"),
        (np.full((4, 5, 3), 300, np.int32), "values"),
        (np.zeros((4, 5, 5), np.uint8), "shape"),
        (np.zeros((3, 8, 9), np.uint8), "channels must come last"),
        (np.zeros((1, 4, 5, 3), np.uint8), "shape"),
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (np.zeros((4, 5, 3), np.complex64), "dtype"),
        (np.zeros((4, 5), object), "dtype"),
    ],
)
def test_bad_arrays(array, words):
    with pytest.raises(ImageLoadError) as e:
        load_image(array)
    msg = str(e.value)
    assert words in msg and "<array shape=" in msg


def test_bad_type():
    with pytest.raises(TypeError):
        load_image(123)
    with pytest.raises(TypeError):
        image_size([1, 2])


# --------------------------------------------------------------------------- bad files
def _assert_names(excinfo, path, word):
    msg = str(excinfo.value)
    assert str(path) in msg, msg
    assert word in msg.lower(), msg
    assert isinstance(excinfo.value, ValueError)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError) as e:
        load_image(p)
    _assert_names(e, p, "not found")
    with pytest.raises(ImageLoadError) as e:
        image_size(str(p))
    _assert_names(e, p, "not found")


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.touch()
    with pytest.raises(ImageLoadError) as e:
        load_image(p)
    _assert_names(e, p, "zero bytes")
    with pytest.raises(ImageLoadError) as e:
        image_size(p)
    _assert_names(e, p, "zero bytes")


def test_directory(tmp_path):
    with pytest.raises(ImageLoadError) as e:
        load_image(tmp_path)
    _assert_names(e, tmp_path, "directory")


def test_text_file_with_jpg_extension(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not a JPEG\n" * 20)
    with pytest.raises(ImageLoadError) as e:
        load_image(p)
    _assert_names(e, p, "not an image")
    with pytest.raises(ImageLoadError) as e:
        image_size(p)
    _assert_names(e, p, "not an image")


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(1)
    full = tmp_path / "full.jpg"
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(full, quality=90)
    p = tmp_path / "truncated.jpg"
    data = full.read_bytes()
    p.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(ImageLoadError) as e:
        load_image(p)
    _assert_names(e, p, "truncated")
    # the header is intact, so the cheap size query still answers
    assert image_size(p) == (256, 256)
    # a lazily opened PIL image of the same file fails in load_image too, naming it
    with Image.open(p) as lazy:
        with pytest.raises(ImageLoadError) as e:
            load_image(lazy)
        _assert_names(e, p, "truncated")


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(2)
    full = tmp_path / "full.png"
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(full)
    p = tmp_path / "truncated.png"
    data = full.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as e:
        load_image(p)
    _assert_names(e, p, "truncated")


class _Boom:
    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (Path.touch, (Path(self.flag),))


def test_pickle_file_is_never_unpickled(tmp_path):
    flag = tmp_path / "unpickled.flag"
    for name in ("evil.jpg", "evil.npy", "evil.pkl"):
        p = tmp_path / name
        p.write_bytes(pickle.dumps(_Boom(str(flag))))
        with pytest.raises(ImageLoadError) as e:
            load_image(p)
        _assert_names(e, p, "not an image")
    assert not flag.exists()


def test_real_photo_roundtrip(tmp_path):
    skdata = pytest.importorskip("skimage.data")
    a = skdata.chelsea()
    p = tmp_path / "chelsea.jpg"
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(a).save(p, exif=exif, quality=95)
    out = _rgb(load_image(p))
    assert image_size(p) == (a.shape[0], a.shape[1])
    assert out.shape == (a.shape[1], a.shape[0], 3)
    assert np.abs(out.astype(int) - np.rot90(a, 1).astype(int)).mean() < 3
