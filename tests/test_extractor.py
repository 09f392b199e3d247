"""The feature engine against the paper's recipe, with tiny random checkpoints loaded from disk."""

import io
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fiftyone_sdcorr import FeatureExtractor, FixedProjection, ImageLoadError, ModelLoadError, Recipe
from fiftyone_sdcorr.core.features.extractor import letterbox_image
from fiftyone_sdcorr.core.features.fusion import co_pca, fuse_pair, fuse_raw
from fiftyone_sdcorr.core.features.models import load_dino, tap_module
from fiftyone_sdcorr.core.features.tiny import build_tiny_dino, build_tiny_sd

SMALL = dict(sd_size=192, sd_tile=128, dino_size=112)  # tiles at offsets 0 and 64


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_sd(root / "sd"), build_tiny_dino(root / "dino"), build_tiny_dino(root / "dino_reg", registers=4)


@pytest.fixture(scope="session")
def small(tiny_dirs):
    return FeatureExtractor(tiny_dirs[0], tiny_dirs[1], device="cpu", **SMALL)


def _rand_image(w, h, seed=0):
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- recipe
def test_paper_defaults():
    r = Recipe()
    assert (r.sd_size, r.sd_mode, r.sd_tile, r.timestep, r.noise_seed, r.dino_size, r.pca_dim, r.alpha) == (
        960, "tiled", 512, 100, 42, 840, 256, 0.5)
    assert r.taps == ("s5", "s4", "s3") and r.prompt == "" and r.padding == "zero"
    assert r.tile_offsets() == [0, 448]
    with pytest.raises(ValueError, match="taps"):
        Recipe(taps=("s9",))
    with pytest.raises(ValueError, match="sd_mode"):
        Recipe(sd_mode="tiles")


def test_paper_preset_shapes_and_taps(tiny_dirs):
    fx = FeatureExtractor(tiny_dirs[0], tiny_dirs[1], device="cpu", taps=("s5", "s4", "s3", "s2"))
    (raw,) = fx.extract([_rand_image(400, 300)])
    unet = fx.unet
    chans = {"s5": unet.up_blocks[0].resnets[1].out_channels, "s4": unet.config.block_out_channels[-2],
             "s3": unet.config.block_out_channels[-3], "s2": unet.config.block_out_channels[-4]}
    grids = {"s5": 15, "s4": 30, "s3": 60, "s2": 120}
    for tap in ("s5", "s4", "s3", "s2"):
        assert tuple(raw.sd[tap].shape) == (chans[tap], grids[tap], grids[tap]), tap
    assert tuple(raw.dino.shape) == (32, 60, 60)
    assert (raw.sd_letterbox.size, raw.dino_letterbox.size) == (960, 840)
    assert (raw.dino_letterbox.pad_top, raw.dino_letterbox.resized_height) == (105, 630)
    assert fx.text_encoder is None  # freed after the fixed prompt was embedded


@pytest.mark.parametrize("w,h", [(200, 100), (100, 200), (150, 150), (1, 60), (61, 1), (97, 53)])
@pytest.mark.parametrize("mode", ["tiled", "whole"])
def test_grid_sizes_for_sizes_and_aspects(small, tiny_dirs, w, h, mode):
    fx = small if mode == "tiled" else FeatureExtractor(tiny_dirs[0], tiny_dirs[1], device="cpu", sd_mode="whole", **SMALL)
    (raw,) = fx.extract([_rand_image(w, h)])
    assert {k: tuple(v.shape[-2:]) for k, v in raw.sd.items()} == {"s5": (3, 3), "s4": (6, 6), "s3": (12, 12)}
    assert tuple(raw.dino.shape[-2:]) == (8, 8)
    assert all(torch.isfinite(v).all() for v in raw.sd.values())


# ----------------------------------------------------------------------------- exactness
def _plain_tile_taps(fx, pixels, taps, prompt_emb):
    """An independent plain implementation of the paper's recipe for one batch of tiles:
    full UNet forward with hooks (no truncation)."""
    vae, unet, sched = fx.vae, fx.unet, fx.scheduler
    with torch.no_grad():
        lat = vae.encode(pixels).latent_dist.mean * 0.18215
        noise = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(42))
        if lat.shape[-1] != 64:
            noise = F.interpolate(noise, size=lat.shape[-2:], mode="bicubic", align_corners=False)
        t = torch.tensor([100] * lat.shape[0])
        ac = sched.alphas_cumprod[100]
        noisy = ac.sqrt() * lat + (1 - ac).sqrt() * noise
        got = {}
        hooks = [tap_module(unet, n).register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o[0] if isinstance(o, tuple) else o)) for n in taps]
        out = unet(noisy, t, encoder_hidden_states=prompt_emb.expand(lat.shape[0], -1, -1)).sample
        for h in hooks:
            h.remove()
    return got, out


def test_truncated_unet_equals_full_forward(small):
    g = torch.Generator().manual_seed(3)
    pix = torch.rand(2, 3, 128, 128, generator=g) * 2 - 1
    emb = small._prompt_embedding("")
    trunc = small.unet_taps(pix, emb.expand(2, -1, -1))
    full = small.unet_taps(pix, emb.expand(2, -1, -1), full_forward=True)
    plain, out = _plain_tile_taps(small, pix, ("s5", "s4", "s3"), emb)
    assert out.shape == (2, 4, 16, 16)  # the plain pass really ran to the end
    for tap in ("s5", "s4", "s3"):
        assert torch.equal(trunc[tap], full[tap])
        rel = (trunc[tap] - plain[tap]).norm() / plain[tap].norm()
        assert rel < 1e-5, (tap, rel)


def test_tiled_equals_hand_stitch(small):
    img = _rand_image(170, 192, seed=5)
    (raw,) = small.extract([img])
    arr, lb = letterbox_image(Image.fromarray(img), 192)
    x = torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 255 * 2 - 1
    emb = small._prompt_embedding("")
    tiles = {(oy, ox): _plain_tile_taps(small, x[:, :, oy:oy + 128, ox:ox + 128], ("s5", "s4", "s3"), emb)[0]
             for oy in (0, 64) for ox in (0, 64)}
    for tap, stride in (("s5", 64), ("s4", 32), ("s3", 16)):
        g = 192 // stride
        acc = torch.zeros_like(raw.sd[tap])
        cnt = torch.zeros(1, g, g)
        for (oy, ox), t in tiles.items():
            fm = t[tap][0]
            y0, x0 = oy // stride, ox // stride
            acc[:, y0:y0 + fm.shape[1], x0:x0 + fm.shape[2]] += fm
            cnt[:, y0:y0 + fm.shape[1], x0:x0 + fm.shape[2]] += 1
        assert cnt.min() >= 1 and cnt.max() == 4
        err = ((raw.sd[tap] - acc / cnt).abs().max() / raw.sd[tap].abs().max()).item()
        assert err < 1e-5, (tap, err)


def test_whole_mode_resizes_shared_noise(tiny_dirs):
    fx = FeatureExtractor(tiny_dirs[0], tiny_dirs[1], device="cpu", sd_mode="whole", sd_size=256, dino_size=112)
    img = _rand_image(256, 256, seed=9)
    (raw,) = fx.extract([img])
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255 * 2 - 1
    plain, _ = _plain_tile_taps(fx, x, ("s5", "s4", "s3"), fx._prompt_embedding(""))  # latent 32x32: noise resized
    for tap in ("s5", "s4", "s3"):
        assert (raw.sd[tap] - plain[tap][0]).norm() / plain[tap].norm() < 1e-5


@pytest.mark.parametrize("which", [1, 2])
def test_dino_tokens_last_block_before_norm(tiny_dirs, which):
    fx = FeatureExtractor(tiny_dirs[0], tiny_dirs[which], device="cpu", **SMALL)
    img = _rand_image(90, 112, seed=2)
    (raw,) = fx.extract([img])
    model = load_dino(tiny_dirs[which], "cpu")
    arr, _ = letterbox_image(Image.fromarray(img), 112)
    x = torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        h = model.embeddings(x)
        for layer in model.encoder.layer:
            h = layer(h)
            h = h[0] if isinstance(h, tuple) else h
    prefix = 1 + (4 if which == 2 else 0)
    ref = h[0, prefix:].reshape(8, 8, -1).permute(2, 0, 1)
    assert (raw.dino - ref).norm() / ref.norm() < 1e-5
    # the final LayerNorm is NOT applied
    normed = model.layernorm(h)[0, prefix:].reshape(8, 8, -1).permute(2, 0, 1)
    assert (raw.dino - normed).norm() / normed.norm() > 1e-2


# ----------------------------------------------------------------------------- determinism
def test_deterministic_across_calls_and_batches(tiny_dirs):
    a, b, c = _rand_image(120, 90, 1), _rand_image(64, 128, 2), _rand_image(100, 100, 3)
    fx1 = FeatureExtractor(tiny_dirs[0], tiny_dirs[1], device="cpu", batch_size=1, **SMALL)
    fx3 = FeatureExtractor(tiny_dirs[0], tiny_dirs[1], device="cpu", batch_size=3, **SMALL)
    r1 = fx1.extract([a, b, c])
    r1b = fx1.extract([a])
    r3 = fx3.extract([c, a, b])  # other composition, other order, other batch size
    for x, y in ((r1[0], r1b[0]), (r1[0], r3[1]), (r1[1], r3[2]), (r1[2], r3[0])):
        for tap in x.sd:
            assert torch.allclose(x.sd[tap], y.sd[tap], rtol=1e-4, atol=1e-5)
        assert torch.allclose(x.dino, y.dino, rtol=1e-4, atol=1e-5)


def test_prompt_template_changes_features(tiny_dirs):
    fx = FeatureExtractor(tiny_dirs[0], tiny_dirs[1], device="cpu", prompt="a photo of a {label}", **SMALL)
    img = _rand_image(128, 128, 4)
    cat, dog, none = fx.extract([img, img, img], labels=["cat", "dog", None])
    assert not torch.allclose(cat.sd["s3"], dog.sd["s3"])
    assert fx.text_encoder is not None
    plain = FeatureExtractor(tiny_dirs[0], tiny_dirs[1], device="cpu", **SMALL).extract([img])[0]
    assert torch.allclose(none.sd["s3"], plain.sd["s3"], atol=1e-6)  # no label -> empty prompt


def test_edge_padding_differs_only_by_padding(tiny_dirs):
    img = Image.fromarray(_rand_image(60, 30, 7))
    zero, lb = letterbox_image(img, 112, "zero")
    edge, _ = letterbox_image(img, 112, "edge")
    inside = np.s_[lb.pad_top:lb.pad_top + lb.resized_height, lb.pad_left:lb.pad_left + lb.resized_width]
    assert np.array_equal(zero[inside], edge[inside])
    assert zero[0].max() == 0 and edge[0].max() > 0
    assert np.array_equal(edge[0], edge[lb.pad_top])


# ----------------------------------------------------------------------------- fusion
def test_fused_halves_unit_norm_and_co_pca_matches_svd(small):
    ra, rb = small.extract([_rand_image(150, 100, 11), _rand_image(100, 150, 12)])
    fa, fb = fuse_pair(ra, rb, dim=8)
    for f in (fa, fb):
        sd, dn = f.descriptors[: f.sd_channels], f.descriptors[f.sd_channels:]
        assert torch.allclose(sd.norm(dim=0), torch.ones(8, 8), atol=1e-5)
        assert torch.allclose(dn.norm(dim=0), torch.ones(8, 8), atol=1e-5)
        assert f.sd_channels == 24 and f.descriptors.shape == (24 + 32, 8, 8)
    pa, pb = co_pca(ra.sd, rb.sd, dim=8)
    for tap in ra.sd:
        X = torch.cat([ra.sd[tap].flatten(1).T, rb.sd[tap].flatten(1).T]).double()
        Xc = X - X.mean(0)
        U, S, Vh = torch.linalg.svd(Xc, full_matrices=False)  # dense reference
        ref = (Xc @ Vh[:8].T).float()
        got = torch.cat([pa[tap].flatten(1).T, pb[tap].flatten(1).T])
        for k in range(8):
            if S[k] - S[k + 1] > 1e-6 * S[0]:  # well-separated component: equal up to sign
                assert min((got[:, k] - ref[:, k]).norm(), (got[:, k] + ref[:, k]).norm()) < 1e-3 * ref[:, k].norm() + 1e-5


def test_fixed_projection_round_trip_and_alpha(small, tmp_path):
    raws = small.extract([_rand_image(100, 80, s) for s in range(3)])
    proj = FixedProjection.fit([r.sd for r in raws], dim=6)
    proj.save(tmp_path / "p.safetensors")
    proj2 = FixedProjection.load(tmp_path / "p.safetensors")
    f1 = fuse_raw(raws[0], proj, alpha=0.5)
    f2 = fuse_raw(raws[0], proj2, alpha=0.5)
    assert torch.allclose(f1.descriptors, f2.descriptors, atol=1e-5)
    f3 = fuse_raw(raws[0], proj, alpha=0.75)
    assert torch.allclose(f3.descriptors[: f3.sd_channels].norm(dim=0), torch.full((8, 8), 1.5), atol=1e-5)
    assert torch.allclose(f3.descriptors[f3.sd_channels:].norm(dim=0), torch.full((8, 8), 0.5), atol=1e-5)
    v = f1.global_vector()
    assert v.shape == (f1.descriptors.shape[0],) and abs(float(v.norm()) - 1) < 1e-5
    # projection agrees with PCA on the pooled tokens of the fitting set (up to sign)
    X = torch.cat([r.sd["s3"].flatten(1).T for r in raws]).double()
    _, _, Vh = torch.linalg.svd(X - X.mean(0), full_matrices=False)
    cos = (proj.components["s3"][:, 0] @ Vh[0]).abs()
    assert cos > 0.999


def test_describe_pair_identity_is_nearest_neighbour(small):
    img = _rand_image(112, 112, 21)
    fa, fb = small.describe_pair(img, img)
    assert torch.allclose(fa.descriptors, fb.descriptors, atol=1e-5)


# ----------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16"])
def test_image_modes_extract(small, tmp_path, mode):
    rgb = Image.fromarray(_rand_image(80, 60, 13))
    if mode == "I;16":
        im = Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257))
        path = tmp_path / "x.png"
    else:
        im = rgb.convert(mode)
        path = tmp_path / ("x.jpg" if mode in ("L", "CMYK") else "x.png")
    im.save(path)
    (raw,) = small.extract([str(path)])
    assert raw.dino_letterbox.width == 80 and raw.dino_letterbox.height == 60
    assert torch.isfinite(raw.dino).all()


def test_exif_orientation_applied(small, tmp_path):
    im = Image.fromarray(_rand_image(80, 40, 14))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(tmp_path / "r.jpg", exif=exif)
    (raw,) = small.extract([str(tmp_path / "r.jpg")])
    assert (raw.dino_letterbox.width, raw.dino_letterbox.height) == (40, 80)


def test_bad_files_name_the_file(small, tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    buf = io.BytesIO()
    Image.fromarray(_rand_image(64, 64)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    for name in ("missing.jpg", "empty.jpg", "junk.jpg", "cut.jpg"):
        with pytest.raises(ImageLoadError, match=name):
            small.extract([str(tmp_path / name)])


# ----------------------------------------------------------------------------- loading
def test_unreachable_hub_id_gives_one_clear_error(monkeypatch, tiny_dirs):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"sdcorr-test/not-a-model.*hf download"):
        FeatureExtractor("sdcorr-test/not-a-model", tiny_dirs[1], device="cpu")
    with pytest.raises(ModelLoadError, match=r"DINOv2 model 'sdcorr-test/nope'"):
        FeatureExtractor(tiny_dirs[0], "sdcorr-test/nope", device="cpu")


def test_pickle_weights_are_refused(tmp_path, tiny_dirs):
    from transformers import Dinov2Model

    m = Dinov2Model.from_pretrained(tiny_dirs[1])
    (tmp_path / "bin_only").mkdir()
    m.config.save_pretrained(str(tmp_path / "bin_only"))
    torch.save(m.state_dict(), tmp_path / "bin_only" / "pytorch_model.bin")  # a pickle checkpoint
    assert not any(p.endswith(".safetensors") for p in os.listdir(tmp_path / "bin_only"))
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_dino(str(tmp_path / "bin_only"), "cpu")


def test_non_dino_model_refused(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)).save_pretrained(str(tmp_path / "vit"))
    with pytest.raises(ModelLoadError, match="not DINOv2"):
        load_dino(str(tmp_path / "vit"), "cpu")


def test_default_dtypes():
    from fiftyone_sdcorr.core.features.models import default_dtype, resolve_dtype

    assert default_dtype("cpu") == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError):
        resolve_dtype("int3")


# ----------------------------------------------------------------------------- compiled path
def test_compile_policy(tiny_dirs):
    from fiftyone_sdcorr.core.features.extractor import COMPILE_MIN_IMAGES, MEASURED_COMPILE_SECONDS

    # auto: never on a CPU, however long the run; the threshold earns back the measured cost
    auto = FeatureExtractor(tiny_dirs[0], tiny_dirs[1], device="cpu", **SMALL)
    assert auto.compile_policy is None and auto.plan_run(10 ** 6) is False and auto.compiled is None
    assert 1000 < COMPILE_MIN_IMAGES < 10000 and MEASURED_COMPILE_SECONDS > 0
    off = FeatureExtractor(tiny_dirs[0], tiny_dirs[1], device="cpu", compile=False, **SMALL)
    assert off.plan_run(10 ** 6) is False
    with pytest.raises(ValueError, match="'compile'"):
        FeatureExtractor(tiny_dirs[0], tiny_dirs[1], device="cpu", compile="yes", **SMALL)
    # channels-last is off unless asked for (measured slower on an H100, profile of 2026-11-27)
    assert auto.channels_last is False


@pytest.mark.parametrize("device, backend", [
    ("cpu", "aot_eager"),  # dynamo's graphs and guards; inductor's C++ build takes minutes on a CPU
    pytest.param("cuda", None, marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                            reason="needs a CUDA device")]),
])
def test_compiled_path_equals_eager_and_compiles_once_for_every_batch(tiny_dirs, device, backend):
    """torch.compile of the real blocks (inductor on CUDA): the same maps as the eager
    path, and a short last batch is padded to the compiled shape, not recompiled."""
    imgs = [_rand_image(w, h, s) for s, (w, h) in enumerate([(150, 100), (90, 120), (80, 80)])]
    opts = dict(device=device, batch_size=2, dtype="float32", **SMALL)
    eager = FeatureExtractor(tiny_dirs[0], tiny_dirs[1], **opts).extract(imgs)
    fx = FeatureExtractor(tiny_dirs[0], tiny_dirs[1], compile=True, **opts)
    fx.compile_models(backend=backend)
    first = fx.extract(imgs[:2])  # compiles on the first batch (plan_run keeps these graphs)
    assert fx.compiled is not None and fx.compiled["dynamic"] is False
    with torch._dynamo.config.patch(error_on_recompile=True):
        rest = fx.extract(imgs[2:])  # 1 image: padded to the batch of 2, the same graphs
    assert len(rest) == 1
    for e, c in zip(eager, first + rest):
        assert c.sd.keys() == e.sd.keys()
        for tap in e.sd:
            assert c.sd[tap].shape == e.sd[tap].shape
            torch.testing.assert_close(c.sd[tap], e.sd[tap], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(c.dino, e.dino, rtol=1e-4, atol=1e-4)
