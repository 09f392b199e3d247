"""Known-answer tests for fiftyone_sdcorr.core.matching.correspondence (no mocks, no models).

Images are generated (seeded textured noise) or scikit-image photos; descriptors come
from the deterministic LocalDescriptor in tests/local_descriptor.py, or are built by hand
where a test needs an exact similarity landscape.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from fiftyone_sdcorr.core.matching.correspondence import (
    Matches,
    confidence_from,
    keypoints_to_tokens,
    match_keypoints,
    match_keypoints_with_flip,
    match_points,
    match_points_with_flip,
    mirror_tokens,
    mutual_nn,
    similarity_maps,
    tokens_to_normalized,
    window_soft_argmax,
)
from fiftyone_sdcorr.bench.reference import match_points_loop
from fiftyone_sdcorr.core.features.fusion import FusedFeatures
from fiftyone_sdcorr.core.common.geometry import Letterbox

try:
    from local_descriptor import LocalDescriptor, textured_noise
except ImportError:  # tests/ imported as a package
    from tests.local_descriptor import LocalDescriptor, textured_noise


STRIDE = 14


@pytest.fixture(scope="module")
def describer():
    return LocalDescriptor(size=224, stride=STRIDE)


@pytest.fixture(scope="module")
def chelsea():
    return data.chelsea()  # 451 x 300 RGB


def _square_features(desc: torch.Tensor, sd_channels=None) -> FusedFeatures:
    """Hand-made descriptors on a full square frame (every token valid)."""
    g = desc.shape[-1]
    return FusedFeatures(
        descriptors=desc,
        letterbox=Letterbox.fit(g * STRIDE, g * STRIDE, g * STRIDE),
        stride=STRIDE,
        sd_channels=sd_channels or desc.shape[0] // 2,
    )


def _grid_tokens(fused: FusedFeatures, margin: int = 0) -> torch.Tensor:
    """All valid tokens of ``fused`` at least ``margin`` tokens inside the valid area."""
    mask = fused.valid_mask().clone()
    if margin:
        eroded = -F.max_pool2d(-mask.float()[None, None], 2 * margin + 1, 1, margin)[0, 0]
        mask = eroded > 0.5
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return torch.stack([cols, rows], dim=1)


# ---------------------------------------------------------------------------------------
# the local descriptor itself
# ---------------------------------------------------------------------------------------
def test_local_descriptor_is_a_fused_features_describer(describer, chelsea):
    (f,) = describer.describe([chelsea])
    assert isinstance(f, FusedFeatures)
    c, h, w = f.descriptors.shape
    assert (h, w) == (16, 16) and f.grid == 16 and f.stride == STRIDE
    assert f.sd_channels * 2 == c
    norms_sd = f.descriptors[: f.sd_channels].norm(dim=0)
    norms_dino = f.descriptors[f.sd_channels :].norm(dim=0)
    valid = f.valid_mask()
    assert torch.allclose(norms_sd[valid], torch.ones(()), atol=1e-4)
    assert torch.allclose(norms_dino[valid], torch.ones(()), atol=1e-4)
    # like real features, padding tokens are not zero (windows reach into the image)
    assert f.letterbox.pad_top > STRIDE and (~valid).any()
    # deterministic; PIL input gives the same features as the array
    (again,) = describer.describe([Image.fromarray(chelsea)])
    assert torch.equal(again.descriptors, f.descriptors)
    assert describer.config()["size"] == 224


# ---------------------------------------------------------------------------------------
# geometry helpers
# ---------------------------------------------------------------------------------------
def test_keypoints_to_tokens_round_trip_and_nan(describer, chelsea):
    (f,) = describer.describe([chelsea])
    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 1, (40, 2))
    pts[5] = [np.nan, 0.5]
    pts[6] = [0.2, np.inf]
    pts[7] = [1.2, 0.5]
    tokens, valid = keypoints_to_tokens(pts, f)
    assert tokens.dtype == torch.long and tokens.shape == (40, 2)
    assert valid.tolist() == [i not in (5, 6, 7) for i in range(40)]
    assert (tokens[~valid] == 0).all()
    back = tokens_to_normalized(tokens, f)
    # the token centre is within half a token of the keypoint (in frame pixels)
    err_frame = (back[valid] - torch.as_tensor(pts)[valid]).abs() * torch.tensor(
        [f.letterbox.resized_width, f.letterbox.resized_height], dtype=torch.float64
    )
    # (7.5 at the right / bottom edge, where x = width falls on the last token's border)
    assert err_frame.max() <= STRIDE / 2 + 0.5 + 1e-6
    # NaN passes through tokens_to_normalized
    nan_back = tokens_to_normalized(torch.tensor([[float("nan"), 1.0]]), f)
    assert torch.isnan(nan_back[0, 0]) and not torch.isnan(nan_back[0, 1])


def test_mirror_tokens_symmetric_letterbox(describer, chelsea):
    (f,) = describer.describe([chelsea])  # landscape: no horizontal padding
    tokens = _grid_tokens(f)
    mirrored = mirror_tokens(tokens, f)
    assert torch.equal(mirrored[:, 0], f.grid - 1 - tokens[:, 0])
    assert torch.equal(mirrored[:, 1], tokens[:, 1])


# ---------------------------------------------------------------------------------------
# similarity maps and the loop reference
# ---------------------------------------------------------------------------------------
def test_similarity_maps_are_cosines():
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(32, 8, 9, generator=gen) * 3.0
    tgt = torch.randn(32, 10, 11, generator=gen) * 0.5
    tokens = torch.tensor([[0, 0], [8, 7], [3, 5]])
    maps = similarity_maps(src, tgt, tokens)
    assert maps.shape == (3, 10, 11)
    for k, (c, r) in enumerate(tokens.tolist()):
        expected = F.cosine_similarity(src[:, r, c][:, None, None], tgt, dim=0)
        assert torch.allclose(maps[k], expected, atol=1e-5)
    with pytest.raises(ValueError):
        similarity_maps(src, tgt, torch.tensor([[9, 0]]))  # col off the grid


def test_loop_equals_vectorised():
    """The reference per-token loop (the benchmark baseline) and the vectorised matcher
    agree exactly; speed is measured by ``python -m fiftyone_sdcorr bench``, not here."""
    gen = torch.Generator().manual_seed(1)
    c, g, k = 96, 16, 32
    src = _square_features(torch.randn(c, g, g, generator=gen))
    tgt = _square_features(torch.randn(c, g, g, generator=gen))
    # make the answers meaningful: targets are noisy copies of shifted source tokens
    tgt.descriptors[:, 5:, 3:] = src.descriptors[:, :-5, :-3] + 0.7 * tgt.descriptors[:, 5:, 3:]
    tokens = torch.randint(0, g - 5, (k, 2), generator=gen)
    loop_tokens, loop_sims = match_points_loop(src.descriptors, tgt.descriptors, tokens)
    m = match_points(src, tgt, tokens)
    assert torch.equal(m.tokens.long(), loop_tokens)
    assert torch.allclose(m.similarity, loop_sims, atol=1e-5)
    assert torch.equal(loop_tokens, tokens + torch.tensor([3, 5]))


def test_loop_honours_mask():
    gen = torch.Generator().manual_seed(2)
    src = torch.randn(16, 6, 6, generator=gen)
    tgt = src.clone()
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[:, :2] = False
    tokens = _grid_tokens(_square_features(src))
    loop_tokens, _ = match_points_loop(src, tgt, tokens, tgt_mask=mask)
    m = match_points(_square_features(src), _square_features(tgt), tokens, tgt_mask=mask, cycle=False)
    assert (loop_tokens[:, 0] >= 2).all()
    assert torch.equal(m.tokens.long(), loop_tokens)


# ---------------------------------------------------------------------------------------
# known answers with real images
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["noise", "chelsea"])
def test_identity_recovers_every_point(describer, chelsea, which):
    image = textured_noise(200, 260, seed=4) if which == "noise" else chelsea
    (f,) = describer.describe([image])
    rng = np.random.default_rng(5)
    pts = rng.uniform(0.0, 1.0, (200, 2))
    tokens, _ = keypoints_to_tokens(pts, f)
    # every point on the image maps to a valid (match-candidate) token
    assert f.valid_mask()[tokens[:, 1], tokens[:, 0]].all()
    # soft-argmax statistics are taken away from the border, where the window is one-sided
    interior = torch.nn.functional.max_pool2d((~f.valid_mask())[None, None].float(), 3, 1, 1)[0, 0] == 0
    inner = interior[tokens[:, 1], tokens[:, 0]]
    assert inner.sum() >= 100
    for soft in (None, 11):
        m = match_keypoints(f, f, pts, soft_window=soft)
        if soft is None:  # exactly the source token: within half a token of the point
            assert torch.equal(m.tokens.long(), tokens)
        else:
            # Neighbours of smooth descriptors are nearly as similar (> 0.98) and pull the
            # expectation; on flat fur more than on texture. Most points stay within half
            # a token, none goes further than a token and a half.
            off = (m.tokens - tokens.float()).abs().max(dim=1).values[inner]
            assert off.median() < 0.1
            assert (off <= 0.5).float().mean() >= 0.9
            assert off.max() <= 1.5
        assert torch.allclose(m.similarity, torch.ones(()), atol=1e-4)
        assert (m.cycle_error == 0).all()
        assert (m.confidence > 0.999).all() and (m.confidence <= 1).all()
        if soft is None:  # normalised output = the source token centres
            assert torch.allclose(m.normalized(f), tokens_to_normalized(tokens, f), atol=1e-9)


@pytest.mark.parametrize("shift", [(28, 14), (-42, 56), (21, 35), (7, 7), (-35, 42), (3, 10)])
def test_translation_recovers_shifted_point(describer, shift):
    """Two 224 x 224 crops of one larger texture, offset by ``shift`` pixels. Shifts that
    are whole tokens give identical interior descriptors: every point lands exactly.
    Other shifts put the true position between tokens: the toy descriptor then recovers
    nearly every point within one token (a few ambiguous spots of the texture may not)."""
    dx, dy = shift
    big = textured_noise(448, 448, seed=0)
    x0 = y0 = 112
    src_img = big[y0 : y0 + 224, x0 : x0 + 224]
    tgt_img = big[y0 + dy : y0 + dy + 224, x0 + dx : x0 + dx + 224]
    fs, ft = describer.describe([src_img, tgt_img])
    tokens = _grid_tokens(fs)
    # the known answer: the source token centre, moved by the shift, in target tokens
    centre = fs.letterbox.token_to_pixel(tokens, STRIDE)
    expected = (centre - torch.tensor([dx, dy], dtype=torch.float64) - (STRIDE - 1) / 2) / STRIDE
    # keep points at least 2 tokens inside both images (descriptor windows see the edge)
    inside = ((tokens >= 2) & (tokens <= 13)).all(1) & ((expected >= 2) & (expected <= 13)).all(1)
    tokens, expected = tokens[inside], expected[inside]
    assert len(tokens) >= 50
    whole_tokens = dx % STRIDE == 0 and dy % STRIDE == 0
    for soft in (None, 11):
        m = match_points(fs, ft, tokens, soft_window=soft)
        err = (m.tokens.double() - expected).abs().max(dim=1).values
        assert (m.confidence >= 0).all() and (m.confidence <= 1).all()
        if whole_tokens and soft is None:
            assert err.max() == 0
            assert (m.similarity > 0.95).all()
        elif whole_tokens:
            assert err.max() <= 1.0
        else:
            assert (err <= 1.0).float().mean() >= 0.95, (soft, err.max())
            assert err.median() <= 0.5 + 1e-6
        # cycle-consistent points are trusted more than the rest
        if not whole_tokens and (m.cycle_error > 1).any():
            assert m.confidence[m.cycle_error > 1].mean() < m.confidence[m.cycle_error == 0].mean()


def test_whole_image_2x_scaling_recovers_points(describer, chelsea):
    """A 2x larger copy letterboxes to the same frame: same tokens, same normalised points."""
    big = np.asarray(Image.fromarray(chelsea).resize((902, 600), Image.LANCZOS))
    fs, ft = describer.describe([chelsea, big])
    assert ft.letterbox.scale == pytest.approx(fs.letterbox.scale / 2)
    rng = np.random.default_rng(7)
    pts = rng.uniform(0.05, 0.95, (50, 2))
    m = match_keypoints(fs, ft, pts)
    tokens, _ = keypoints_to_tokens(pts, fs)
    assert (m.tokens - tokens.float()).abs().max() <= 1.0
    # normalised predictions within one token (in normalised units) of the keypoints
    tol = torch.tensor([STRIDE / ft.letterbox.resized_width, STRIDE / ft.letterbox.resized_height])
    assert ((m.normalized(ft) - torch.as_tensor(pts)).abs() <= tol).all()


def test_2x_zoom_with_scale_matched_descriptor():
    """The target is the central half of the source enlarged 2x. The local descriptor is
    not scale-invariant, so the target is described with blurs and spacings doubled (the
    covariant descriptor); then points land within one source token (two target tokens)."""
    src_d = LocalDescriptor(size=448)
    tgt_d = LocalDescriptor(size=448, fine=(6.0, 10.0), coarse=(14.0, 24.0))
    img = data.astronaut()  # 512 x 512
    h, w = img.shape[:2]
    x0, y0 = w // 4, h // 4
    crop = img[y0 : y0 + h // 2, x0 : x0 + w // 2]
    zoom = np.asarray(Image.fromarray(crop).resize((w, h), Image.BILINEAR))
    (fs,) = src_d.describe([img])
    (ft,) = tgt_d.describe([zoom])
    rng = np.random.default_rng(8)
    pts = rng.uniform(0.33, 0.67, (50, 2))
    tokens, _ = keypoints_to_tokens(pts, fs)
    centre = fs.letterbox.token_to_pixel(tokens, STRIDE)
    expected_pix = (centre - torch.tensor([x0, y0], dtype=torch.float64)) * 2
    m = match_points(fs, ft, tokens, soft_window=11)
    pred_pix = ft.letterbox.token_to_pixel(m.tokens, STRIDE)
    err_tgt_tokens = (pred_pix - expected_pix).norm(dim=1) * ft.letterbox.scale / STRIDE
    assert err_tgt_tokens.median() <= 1.0
    assert (err_tgt_tokens <= 2.0).float().mean() >= 0.9


# ---------------------------------------------------------------------------------------
# flip alignment
# ---------------------------------------------------------------------------------------
def test_flip_alignment_swaps_labels(describer, chelsea):
    """Source = mirror image of the target. Label 0 ("left") sits at p in the target and
    label 1 ("right") at q; in the mirrored source the object's left part is at mirror(q)
    and its right part at mirror(p). Flip alignment must bring label 0 to p and label 1 to
    q; label 2 (unpaired, "nose") to c."""
    w, h = chelsea.shape[1], chelsea.shape[0]
    target_pix = np.array([[150.0, 100.0], [300.0, 160.0], [220.0, 220.0], [90.0, 60.0]])
    p, q, c, e = target_pix / [w, h]
    mirror = lambda a: np.array([1.0 - a[0], a[1]])  # noqa: E731
    # labels: 0 left eye, 1 right eye, 2 nose, 3 left ear, 4 right ear.
    # The target's left ear (label 3) is at e; mirrored into the source it looks like a
    # right ear, so the source has label 4 at mirror(e) and no label 3 (NaN). The flipped
    # branch predicts label 3 from mirror(source label 4) = e; label 4 (partner absent)
    # cannot be predicted.
    src_pts = np.array([mirror(q), mirror(p), mirror(c), [np.nan, np.nan], mirror(e)])
    expected = np.array([p, q, c, e, [np.nan, np.nan]])
    flip_pairs = [(0, 1), (3, 4)]
    src_img = chelsea[:, ::-1]
    fs, ft = describer.describe([src_img, chelsea])
    (fs_flipped,) = describer.describe([src_img[:, ::-1]])
    m = match_keypoints_with_flip(fs, fs_flipped, ft, src_pts, flip_pairs)
    assert isinstance(m, Matches) and m.flipped
    assert m.valid.tolist() == [True, True, True, True, False]
    pred = m.normalized(ft).numpy()
    tol = np.array([STRIDE / ft.letterbox.resized_width, STRIDE / ft.letterbox.resized_height])
    ok = np.abs(pred - expected) <= tol
    assert ok[:4].all(), pred - expected
    assert np.isnan(pred[4]).all() and m.confidence[4] == 0
    assert torch.allclose(m.similarity[:4], torch.ones(()), atol=1e-4)

    # without flip alignment the labels would be wrong (or weakly matched)
    plain = match_keypoints(fs, ft, src_pts)
    assert plain.mean_similarity() < m.mean_similarity()
    plain_pred = plain.normalized(ft).numpy()
    assert not (np.abs(plain_pred[:3] - expected[:3]) <= tol).all()


def test_flip_alignment_keeps_original_when_not_mirrored(describer, chelsea):
    fs, ft = describer.describe([chelsea, chelsea])
    (fs_flipped,) = describer.describe([chelsea[:, ::-1]])
    rng = np.random.default_rng(9)
    pts = rng.uniform(0.1, 0.9, (6, 2))
    m = match_keypoints_with_flip(fs, fs_flipped, ft, pts, [(0, 1), (2, 3)])
    assert not m.flipped
    plain = match_keypoints(fs, ft, pts)
    assert torch.equal(m.tokens, plain.tokens)


def test_flip_argument_checks(describer, chelsea):
    fs, ft = describer.describe([chelsea, chelsea])
    (other,) = describer.describe([textured_noise(100, 100)])
    tokens = torch.tensor([[3, 5], [10, 7]])
    with pytest.raises(ValueError):
        match_points_with_flip(fs, other, ft, tokens, [(0, 1)])  # not the mirrored source
    with pytest.raises(ValueError):
        match_points_with_flip(fs, fs, ft, tokens, [(0, 2)])  # out of range
    with pytest.raises(ValueError):
        match_points_with_flip(fs, fs, ft, torch.tensor([[1, 5], [2, 7], [3, 8]]), [(0, 1), (1, 2)])


# ---------------------------------------------------------------------------------------
# soft-argmax
# ---------------------------------------------------------------------------------------
def test_soft_argmax_recovers_fractional_peak():
    """Target descriptors whose cosine to the query is a Gaussian bump centred at a known
    fractional token (10.3, 7.6): cos = a = exp(-d^2 / (2 * 7^2)). Softmax(a / 0.02) is
    then close to a Gaussian of std 1 token around the centre, whose expectation over the
    11 x 11 window is the centre."""
    g, c = 16, 8
    centre = torch.tensor([10.3, 7.6], dtype=torch.float64)
    q = torch.zeros(c, dtype=torch.float64)
    q[0] = 1.0
    p = torch.zeros(c, dtype=torch.float64)
    p[1] = 1.0
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    d2 = (cols - centre[0]) ** 2 + (rows - centre[1]) ** 2
    a = torch.exp(-d2 / (2 * 7.0**2))
    tgt = q[:, None, None] * a + p[:, None, None] * torch.sqrt(1 - a**2)
    src = torch.zeros(c, g, g, dtype=torch.float64)
    src[:, 0, 0] = q
    fs, ft = _square_features(src.float()), _square_features(tgt.float())
    hard = match_points(fs, ft, torch.tensor([[0, 0]]), cycle=False)
    soft = match_points(fs, ft, torch.tensor([[0, 0]]), soft_window=11, temperature=0.02, cycle=False)
    assert hard.tokens[0].tolist() == [10.0, 8.0]
    assert (soft.tokens[0].double() - centre).abs().max() < 0.05
    assert soft.similarity[0] == hard.similarity[0]  # similarity stays the argmax cosine
    # window 1 is the plain argmax; even windows are refused
    one = window_soft_argmax(a[None].float(), torch.tensor([[10, 8]]), window=1)
    assert one[0].tolist() == [10.0, 8.0]
    with pytest.raises(ValueError):
        window_soft_argmax(a[None].float(), torch.tensor([[10, 8]]), window=4)


# ---------------------------------------------------------------------------------------
# masks, NaN, confidence
# ---------------------------------------------------------------------------------------
def test_padding_tokens_never_chosen(describer, chelsea):
    """Plant exact copies of the query descriptors on the target's padding tokens: with
    the default mask they are never matched (hard or soft); without a mask they are."""
    (fs,) = describer.describe([chelsea])
    (ft,) = describer.describe([textured_noise(300, 451, seed=11)])  # same letterbox
    valid = ft.valid_mask()
    assert (~valid).any()
    tokens = _grid_tokens(fs)[::7]
    pad_rc = torch.nonzero(~valid)  # (row, col)
    planted = ft.descriptors.clone()
    for i, (c, r) in enumerate(tokens.tolist()):
        pr, pc = pad_rc[i % len(pad_rc)].tolist()
        planted[:, pr, pc] = fs.descriptors[:, r, c]
    ft_planted = FusedFeatures(planted, ft.letterbox, ft.stride, ft.sd_channels)
    everything = torch.ones_like(valid)
    lured = match_points(fs, ft_planted, tokens, tgt_mask=everything)
    lured_rc = lured.tokens.long()
    assert (~valid[lured_rc[:, 1], lured_rc[:, 0]]).all()
    for soft in (None, 11):
        m = match_points(fs, ft_planted, tokens, soft_window=soft)
        rc = m.tokens.round().long()
        assert valid[rc[:, 1], rc[:, 0]].all()
        first_row = int(torch.nonzero(valid.any(dim=1))[0])
        last_row = int(torch.nonzero(valid.any(dim=1))[-1])
        assert (m.tokens[:, 1] >= first_row - 1e-4).all() and (m.tokens[:, 1] <= last_row + 1e-4).all()
    with pytest.raises(ValueError):
        match_points(fs, ft, tokens, tgt_mask=torch.zeros_like(valid))


def test_nan_keypoints_are_skipped(describer, chelsea):
    fs, ft = describer.describe([chelsea, chelsea[10:, 5:]])
    rng = np.random.default_rng(12)
    pts = rng.uniform(0.1, 0.9, (8, 2))
    with_nan = pts.copy()
    with_nan[[2, 5]] = np.nan
    m = match_keypoints(fs, ft, with_nan, soft_window=11)
    ref = match_keypoints(fs, ft, pts, soft_window=11)
    keep = [i for i in range(8) if i not in (2, 5)]
    assert m.valid.tolist() == [i in keep for i in range(8)]
    assert torch.isnan(m.tokens[[2, 5]]).all() and torch.isnan(m.normalized(ft)[[2, 5]]).all()
    assert torch.isnan(m.similarity[[2, 5]]).all() and torch.isnan(m.cycle_error[[2, 5]]).all()
    assert (m.confidence[[2, 5]] == 0).all()
    assert torch.equal(m.tokens[keep], ref.tokens[keep])
    assert torch.equal(m.confidence[keep], ref.confidence[keep])
    # all absent: nothing to match, nothing breaks
    none = match_keypoints(fs, ft, np.full((3, 2), np.nan))
    assert not none.valid.any() and (none.confidence == 0).all()
    assert none.mean_similarity() == float("-inf")
    empty = match_keypoints(fs, ft, np.zeros((0, 2)))
    assert len(empty) == 0


def test_confidence_in_unit_interval_and_lower_when_cycle_breaks():
    """Source token a matches target token t, but t matches back to source token b far
    from a: a's cycle error is |a - b| and its confidence drops; b is consistent."""
    gen = torch.Generator().manual_seed(13)
    c, g = 64, 16
    src = F.normalize(torch.randn(c, g, g, generator=gen), dim=0)
    tgt = F.normalize(torch.randn(c, g, g, generator=gen), dim=0)
    v = F.normalize(torch.randn(c, generator=gen), dim=0)
    w = F.normalize(torch.randn(c, generator=gen), dim=0)
    a, b, t = (2, 3), (12, 10), (7, 9)  # (col, row)
    tgt[:, t[1], t[0]] = v
    src[:, b[1], b[0]] = v
    src[:, a[1], a[0]] = F.normalize(v + 0.6 * w, dim=0)
    fs, ft = _square_features(src), _square_features(tgt)
    tokens = torch.tensor([a, b, (5, 5), (0, 15)])
    m = match_points(fs, ft, tokens)
    assert m.tokens[0].tolist() == list(map(float, t)) and m.tokens[1].tolist() == list(map(float, t))
    assert m.cycle_error[0] == pytest.approx(math.dist(a, b))
    assert m.cycle_error[1] == 0
    assert (m.confidence >= 0).all() and (m.confidence <= 1).all()
    assert m.confidence[0] < 0.01 < 0.99 < m.confidence[1]
    # the documented rule
    expected = m.similarity.clamp(0, 1) * torch.exp(-((m.cycle_error / 2) ** 2))
    assert torch.allclose(m.confidence, expected)
    # without the cycle check: no cycle error, confidence = clamped similarity
    nc = match_points(fs, ft, tokens, cycle=False)
    assert torch.isnan(nc.cycle_error).all()
    assert torch.allclose(nc.confidence, nc.similarity.clamp(0, 1))
    # negative similarities clamp to 0
    assert confidence_from(torch.tensor([-0.5, 1.2]), torch.tensor([0.0, 0.0])).tolist() == [0.0, 1.0]


def test_mutual_nn_identity_and_shift():
    gen = torch.Generator().manual_seed(14)
    desc = torch.randn(32, 10, 10, generator=gen)
    f = _square_features(desc)
    s, t, sim = mutual_nn(f, f)
    assert len(s) == 100 and torch.equal(s, t) and torch.allclose(sim, torch.ones(()), atol=1e-5)
    shifted = torch.randn(32, 10, 10, generator=gen)
    shifted[:, :, 2:] = desc[:, :, :-2]
    s, t, _ = mutual_nn(f, _square_features(shifted))
    copied = s[:, 0] <= 7  # source columns 0..7 reappear 2 columns to the right
    assert int(copied.sum()) == 80
    assert torch.equal(t[copied] - s[copied], torch.tensor([2, 0]).expand(80, 2))
    # with masks: nothing outside them
    mask = torch.ones(10, 10, dtype=torch.bool)
    mask[:, :5] = False
    s, t, _ = mutual_nn(f, _square_features(shifted), tgt_mask=mask)
    assert (t[:, 0] >= 5).all()


# --------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_matching_on_cuda_equals_cpu():
    """Every matching function takes its inputs on one device, CPU or CUDA, and agrees."""
    g = torch.Generator().manual_seed(0)
    lb = Letterbox.fit(300, 200, 224)
    src = FusedFeatures(torch.randn(64, 16, 16, generator=g), lb, 14, 32)
    tgt = FusedFeatures(torch.randn(64, 16, 16, generator=g), lb, 14, 32)
    pts = [[0.2, 0.3], [0.5, 0.5], [float("nan"), float("nan")], [0.9, 0.8]]
    on = lambda f, d: FusedFeatures(f.descriptors.to(d), f.letterbox, f.stride, f.sd_channels)  # noqa: E731
    for kw in ({}, {"soft_window": 5}):
        cpu = match_keypoints(src, tgt, pts, **kw)
        gpu = match_keypoints(on(src, "cuda"), on(tgt, "cuda"), pts, **kw)
        assert gpu.confidence.is_cuda
        torch.testing.assert_close(gpu.tokens.cpu(), cpu.tokens, equal_nan=True, atol=1e-4, rtol=0)
        torch.testing.assert_close(gpu.confidence.cpu(), cpu.confidence, atol=1e-4, rtol=0)
        torch.testing.assert_close(gpu.normalized(on(tgt, "cuda")).cpu(), cpu.normalized(tgt),
                                   equal_nan=True, atol=1e-6, rtol=0)
    flipped = FusedFeatures(torch.flip(src.descriptors, dims=[2]), lb, 14, 32)
    a = match_keypoints_with_flip(src, flipped, tgt, pts, [(0, 3)])
    b = match_keypoints_with_flip(on(src, "cuda"), on(flipped, "cuda"), on(tgt, "cuda"), pts, [(0, 3)])
    assert a.flipped == b.flipped
    torch.testing.assert_close(b.tokens.cpu(), a.tokens, equal_nan=True)
    assert torch.equal(on(src, "cuda").valid_mask().cpu(), src.valid_mask())
    torch.testing.assert_close(on(src, "cuda").global_vector().cpu(), src.global_vector(), atol=1e-5, rtol=0)
