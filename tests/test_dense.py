"""Dense correspondence in the core layer (fiftyone_sdcorr/core/matching/dense.py), with answers
known by construction: the deterministic local descriptor (tests/local_descriptor.py) on
a textured image and its known warps (identity, shift, scale)."""

import numpy as np
import pytest
import torch

from fiftyone_sdcorr.core.matching.dense import (
    dense_match, position_colors, region_on_grid, warp_image, warp_labels,
)
from local_descriptor import LocalDescriptor, textured_noise

SIZE = 200


@pytest.fixture(scope="module")
def desc():
    return LocalDescriptor(size=224, stride=14)


@pytest.fixture(scope="module")
def image():
    return textured_noise(SIZE, SIZE, seed=1)


def _labels():
    lab = np.zeros((SIZE, SIZE), np.int64)
    lab[50:150, 60:140] = 1
    lab[80:120, 90:110] = 2
    return lab


def _iou(a, b, c):
    return ((a == c) & (b == c)).sum() / ((a == c) | (b == c)).sum()


def test_an_identical_target_gets_the_source_labels_back(desc, image):
    fa = desc.describe([image])[0]
    field = dense_match(fa, fa, resolution=64).sample()
    assert field.valid.all() and np.median(field.confidence) > 0.99 and field.confidence.min() > 0.95
    got = warp_labels(field, _labels())
    assert _iou(got, _labels(), 1) >= 0.98 and _iou(got, _labels(), 2) >= 0.98
    same = (warp_image(field, image) == image).all(-1)
    assert same[8:-8, 8:-8].all()  # the outer half token: cells clamped to one vector (ties)


@pytest.mark.parametrize("shift", [28, 42])
def test_a_shifted_target_gives_the_known_flow(desc, image, shift):
    target = np.full_like(image, 128)
    target[:, shift:] = image[:, :-shift]
    fa, fb = desc.describe([image, target])
    field = dense_match(fa, fb, resolution=64).sample()
    flow = field.flow(SIZE, SIZE)
    inner = np.zeros((SIZE, SIZE), bool)
    inner[20:180, shift + 20:180] = True  # away from the borders the descriptor sees
    err = np.hypot(flow[inner][:, 0] + shift, flow[inner][:, 1])
    assert np.median(err) < 2.0 and (err < 8).mean() > 0.95  # 8 px: half a token
    # the labels move with the content
    lab = _labels()
    moved = np.zeros_like(lab)
    moved[:, shift:] = lab[:, :-shift]
    got = warp_labels(field, lab)
    assert _iou(got, moved, 1) > 0.9


def test_a_half_size_target_maps_to_the_same_content(desc, image):
    from PIL import Image

    small = np.asarray(Image.fromarray(image).resize((SIZE // 2, SIZE // 2), Image.BILINEAR))
    fa, fb = desc.describe([image, small])
    field = dense_match(fa, fb, resolution=64).sample()
    ys, xs = np.mgrid[0:SIZE // 2, 0:SIZE // 2]
    want = np.stack([(xs + 0.5) / (SIZE // 2), (ys + 0.5) / (SIZE // 2)], -1)
    err = np.abs(field.source_xy - want)[10:90, 10:90]
    assert np.median(err) < 0.02


def test_regions_restrict_both_sides_and_chunks_change_nothing(desc, image):
    fa = desc.describe([image])[0]
    src_mask = np.zeros((SIZE, SIZE), bool)
    src_mask[:, :100] = True  # only the left half may be matched
    tgt_mask = np.zeros((50, 50), bool)  # a mask of another size: resampled
    tgt_mask[10:40, 10:40] = True
    a = dense_match(fa, fa, resolution=48, source_mask=src_mask, target_mask=tgt_mask)
    b = dense_match(fa, fa, resolution=48, source_mask=src_mask, target_mask=tgt_mask, chunk=7)
    assert torch.equal(a.valid, b.valid) and torch.allclose(a.source_xy, b.source_xy, equal_nan=True)
    assert a.valid.sum() == region_on_grid(fa.letterbox, 48, tgt_mask).sum()
    xy = a.source_xy[a.valid]
    assert (xy[:, 0] < 0.5).all()  # every match inside the source region
    assert (a.confidence[~a.valid] == 0).all() and torch.isnan(a.source_xy[~a.valid]).all()
    with pytest.raises(ValueError, match="resolution"):
        dense_match(fa, fa, resolution=1)


def test_the_cycle_lowers_the_confidence_of_content_that_is_not_there(desc, image):
    target = np.full_like(image, 128)
    target[:, :100] = image[:, :100]  # the right half is gone
    fa, fb = desc.describe([image, target])
    m = dense_match(fb, fa, resolution=64)  # every source pixel looks for its place in the target
    field = m.sample()
    kept, gone = field.confidence[30:170, 20:80], field.confidence[30:170, 130:180]
    assert kept.mean() > gone.mean() + 0.2


def test_position_colors_are_distinct():
    c = position_colors(40, 30)
    assert c.shape == (30, 40, 3) and c.dtype == np.uint8
    assert len({tuple(v) for v in c.reshape(-1, 3)}) > 0.9 * 40 * 30


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_device_path_equals_the_cpu_path(desc, image):
    target = np.full_like(image, 128)
    target[:, 28:] = image[:, :-28]
    fa, fb = desc.describe([image, target])
    cpu = dense_match(fa, fb, resolution=64)
    on = [type(f)(f.descriptors.cuda(), f.letterbox, f.stride, f.sd_channels) for f in (fa, fb)]
    gpu = dense_match(on[0], on[1], resolution=64, chunk=512)
    assert gpu.source_xy.is_cuda
    same = (gpu.source_xy.cpu() - cpu.source_xy).abs().nan_to_num(0).amax(-1) < 1e-6
    assert same.float().mean() > 0.99  # ties between equal cosines may break either way
    torch.testing.assert_close(gpu.confidence.cpu(), cpu.confidence, atol=1e-3, rtol=0)
