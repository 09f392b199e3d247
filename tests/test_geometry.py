"""Letterbox geometry: round trips and the recipe's token formulas."""

import math

import pytest
import torch

from fiftyone_sdcorr.core.common.geometry import Letterbox

SHAPES = [(1, 37), (37, 1), (1, 1), (300, 400), (400, 300), (500, 500), (333, 777), (641, 479), (2, 3)]


@pytest.mark.parametrize("w,h", SHAPES)
@pytest.mark.parametrize("size", [840, 960, 112])
def test_letterbox_is_centred_and_scaled_by_long_side(w, h, size):
    lb = Letterbox.fit(w, h, size)
    assert lb.scale == pytest.approx(size / max(w, h))
    assert max(lb.resized_width, lb.resized_height) == size
    short = min(w, h)
    assert min(lb.resized_width, lb.resized_height) == max(1, round(size * short / max(w, h)))
    assert lb.pad_left == (size - lb.resized_width) // 2
    assert lb.pad_top == (size - lb.resized_height) // 2
    assert lb.pad_left + lb.resized_width <= size and lb.pad_top + lb.resized_height <= size


@pytest.mark.parametrize("w,h", SHAPES)
def test_pixel_frame_normalized_round_trip(w, h):
    lb = Letterbox.fit(w, h, 840)
    g = torch.Generator().manual_seed(0)
    n = torch.rand(50, 2, generator=g, dtype=torch.float64)
    px = lb.normalized_to_pixel(n)
    assert torch.allclose(lb.pixel_to_normalized(px), n, atol=1e-12)
    assert torch.allclose(lb.frame_to_pixel(lb.pixel_to_frame(px)), px, atol=1e-9)


@pytest.mark.parametrize("w,h", SHAPES)
@pytest.mark.parametrize("stride,size", [(14, 840), (16, 960)])
def test_point_to_token_and_back_within_half_a_token(w, h, stride, size):
    lb = Letterbox.fit(w, h, size)
    g = torch.Generator().manual_seed(1)
    n = torch.rand(200, 2, generator=g, dtype=torch.float64)
    tok = lb.normalized_to_token(n, stride)
    back = lb.token_to_normalized(tok, stride)
    # The recipe's centre 14 p + 6.5 is the centre of pixel indices 14p..14p+13: a point at
    # an integer frame pixel lands within half a token (<= 6.5 px); an arbitrary real point
    # within half a token plus the half pixel of that convention (< 7.5 px).
    err_frame = (lb.pixel_to_frame(lb.normalized_to_pixel(back)) - lb.pixel_to_frame(lb.normalized_to_pixel(n))).abs()
    assert (err_frame < stride / 2 + 0.5).all()
    lo = torch.tensor([lb.pad_left, lb.pad_top])
    span = torch.tensor([lb.resized_width, lb.resized_height])
    frame_int = (lo + (torch.rand(200, 2, generator=g) * span).floor()).double()  # pixels on the image
    tok = lb.frame_to_token(frame_int, stride)
    assert ((lb.token_center(tok, stride) - frame_int).abs() <= (stride - 1) / 2).all()


def test_recipe_token_formulas():
    # 840 frame, stride 14: token = floor(x / 14), centre = 14 p + 6.5
    lb = Letterbox.fit(840, 840, 840)
    assert lb.pixel_to_token([[0.0, 13.9]], 14).tolist() == [[0, 0]]
    assert lb.pixel_to_token([[14.0, 839.0]], 14).tolist() == [[1, 59]]
    assert lb.token_to_pixel([[0, 59]], 14).tolist() == [[6.5, 14 * 59 + 6.5]]
    # a 400x300 landscape image: scale 2.1, offset (0, (840-630)//2 = 105)
    lb = Letterbox.fit(400, 300, 840)
    assert (lb.scale, lb.pad_left, lb.pad_top) == (2.1, 0, 105)
    assert lb.pixel_to_frame([[100.0, 100.0]]).tolist() == [[210.0, 315.0]]
    assert lb.pixel_to_token([[100.0, 100.0]], 14).tolist() == [[15, 22]]


@pytest.mark.parametrize("w,h", SHAPES)
def test_valid_token_mask_covers_image_only(w, h):
    lb = Letterbox.fit(w, h, 840)
    m = lb.valid_token_mask(14)
    assert m.shape == (60, 60) and m.any()
    if w == h:
        assert m.all()
    elif w > h and h > 20:
        assert m[:, 0].sum() == m[:, 30].sum() < 60 and m[30].all()


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="positive"):
        Letterbox.fit(0, 10, 840)
    lb = Letterbox.fit(7, 5, 840)
    assert Letterbox.from_dict(lb.to_dict()) == lb
    assert not math.isnan(lb.scale)


@pytest.mark.parametrize("w,h", SHAPES)
def test_every_point_on_the_image_maps_to_a_valid_token(w, h):
    lb = Letterbox.fit(w, h, 840)
    m = lb.valid_token_mask(14)
    g = torch.Generator().manual_seed(2)
    n = torch.cat([torch.rand(300, 2, generator=g, dtype=torch.float64),
                   torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.999, 0.001]], dtype=torch.float64)])
    tok = lb.normalized_to_token(n, 14)
    assert m[tok[:, 1], tok[:, 0]].all()
    # and the mask has no token entirely on the padding
    cover = torch.zeros(840, 840, dtype=torch.bool)
    cover[lb.pad_top:lb.pad_top + lb.resized_height, lb.pad_left:lb.pad_left + lb.resized_width] = True
    per_token = cover.reshape(60, 14, 60, 14).any(dim=3).any(dim=1)
    assert torch.equal(per_token, m)
