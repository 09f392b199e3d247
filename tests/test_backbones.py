"""Backbones beyond the paper (issue 11): DINOv2 with registers, DINOv3 ViT (patch 16) and a
replacement SD UNet used without noise (CleanDIFT-style). Tiny random checkpoints saved with
``save_pretrained`` / safetensors and loaded back through the code users take."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fiftyone_sdcorr import FeatureExtractor, ModelLoadError, Recipe
from fiftyone_sdcorr.core.features.fusion import FixedProjection, fuse_raw
from fiftyone_sdcorr.core.features.models import dino_num_prefix_tokens, dino_patch_size, tap_module
from fiftyone_sdcorr.core.features.tiny import build_tiny_dino, build_tiny_dinov3, build_tiny_sd, build_tiny_unet

SMALL = dict(sd_size=192, sd_tile=128, dino_size=112)  # tiles at offsets 0 and 64; DINOv2 grid 8


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return {
        "sd": build_tiny_sd(root / "sd"),
        "dino": build_tiny_dino(root / "dino"),
        "dino_reg": build_tiny_dino(root / "dino_reg", registers=4),
        "dinov3": build_tiny_dinov3(root / "dinov3", registers=4),
        "unet_dir": build_tiny_unet(root / "unet_dir", seed=7),
        "unet_file": build_tiny_unet(root / "unet_file", seed=8, layout="file"),
    }


def _image(w=120, h=90, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def _dino_by_hand(model, pixels, encoder_layers):
    """Embeddings, then each transformer block by hand: the last block's output, no final norm."""
    with torch.no_grad():
        h = model.embeddings(pixels)
        kw = {}
        if hasattr(model, "rope_embeddings"):  # DINOv3: rotary position embeddings per block
            kw["position_embeddings"] = model.rope_embeddings(pixels)
        for layer in encoder_layers:
            h = layer(h, **kw)
            h = h[0] if isinstance(h, (tuple, list)) else h
    return h


def _grid(tokens, g):
    return tokens.reshape(g, g, -1).permute(2, 0, 1)


# ----------------------------------------------------------------------------- DINOv2 + registers
def test_dinov2_with_registers_drops_cls_and_registers(dirs):
    fx = FeatureExtractor(dirs["sd"], dirs["dino_reg"], device="cpu", **SMALL)
    assert type(fx.dino).__name__ == "Dinov2WithRegistersModel"
    assert fx.dino.config.model_type == "dinov2_with_registers"
    assert dino_num_prefix_tokens(fx.dino) == 1 + 4 and fx.dino_stride == 14

    img = _image()
    (raw,) = fx.extract([img])
    assert tuple(raw.dino.shape) == (32, 8, 8)  # 112 / 14

    pixels = fx._dino_input(img)[0][None]
    with torch.no_grad():
        out = fx.dino(pixel_values=pixels, output_hidden_states=True)
    assert out.hidden_states[-1].shape[1] == 1 + 4 + 64
    expected = _grid(out.hidden_states[-1][0, 5:], 8)
    assert torch.equal(raw.dino, expected)
    # hidden_states[-1] is the last block's output before the final LayerNorm ...
    by_hand = _dino_by_hand(fx.dino, pixels, fx.dino.encoder.layer)
    torch.testing.assert_close(out.hidden_states[-1], by_hand)
    assert not torch.allclose(out.hidden_states[-1], out.last_hidden_state)
    # ... and the register tokens really are dropped: a grid that kept them would be shifted
    assert not torch.allclose(raw.dino, _grid(out.hidden_states[-1][0, 1:65], 8))


# ----------------------------------------------------------------------------- DINOv3
def test_dinov3_loads_with_patch16_and_matches_sd_grid(dirs):
    # at sd_size 192 SD's s3 tap is 12x12 (stride 16); DINOv3 at 192 is 12x12 too
    fx = FeatureExtractor(dirs["sd"], dirs["dinov3"], device="cpu", sd_size=192, sd_tile=128, dino_size=192)
    assert type(fx.dino).__name__ == "DINOv3ViTModel"
    assert fx.dino_stride == dino_patch_size(fx.dino) == 16
    assert dino_num_prefix_tokens(fx.dino) == 1 + 4

    img = _image(90, 130, seed=1)
    (raw,) = fx.extract([img])
    assert tuple(raw.dino.shape) == (32, 12, 12)
    assert tuple(raw.sd["s3"].shape[-2:]) == (12, 12)
    assert raw.dino_stride == 16 and raw.dino_letterbox.size == 192

    pixels = fx._dino_input(img)[0][None]
    with torch.no_grad():
        out = fx.dino(pixel_values=pixels, output_hidden_states=True)
    assert out.hidden_states[-1].shape[1] == 5 + 144
    assert torch.equal(raw.dino, _grid(out.hidden_states[-1][0, 5:], 12))
    by_hand = _dino_by_hand(fx.dino, pixels, fx.dino.model.layer)
    torch.testing.assert_close(out.hidden_states[-1], by_hand)
    assert not torch.allclose(out.hidden_states[-1], out.last_hidden_state)  # before the final norm

    proj = FixedProjection.fit([raw.sd], dim=4)
    fused = fuse_raw(raw, proj)
    assert fused.grid == 12 and fused.stride == 16 and torch.isfinite(fused.descriptors).all()
    a, b = fx.describe_pair(img, _image(seed=2))
    assert a.grid == b.grid == 12


def test_dinov3_grid_other_than_sd_is_resized_by_fusion(dirs):
    fx = FeatureExtractor(dirs["sd"], dirs["dinov3"], device="cpu", sd_size=192, sd_tile=128, dino_size=160)
    (raw,) = fx.extract([_image()])
    assert tuple(raw.dino.shape[-2:]) == (10, 10) and tuple(raw.sd["s3"].shape[-2:]) == (12, 12)
    fused = fuse_raw(raw, FixedProjection.fit([raw.sd], dim=4))
    assert fused.grid == 10  # the SD descriptor is resized bilinearly onto the DINO grid


def test_dinov3_refuses_dinov2_size_and_says_which_to_use(dirs):
    with pytest.raises(ValueError, match=r"dino_size 840 is not a multiple of the patch size 16.*dino_size=960"):
        FeatureExtractor(dirs["sd"], dirs["dinov3"], device="cpu")


# ----------------------------------------------------------------------------- replacement UNet
def _manual_taps(fx, pixels, prompt_emb, t, noisy_input):
    """Plain recipe for one batch: full UNet forward (no truncation), taps captured by hooks."""
    vae, unet = fx.vae, fx.unet
    caught, handles = {}, []
    for tap in fx.recipe.taps:
        def hook(_m, _i, out, tap=tap):
            out = out[0] if isinstance(out, (tuple, list)) else out
            caught[tap] = getattr(out, "sample", out).float()
        handles.append(tap_module(unet, tap).register_forward_hook(hook))
    with torch.no_grad():
        lat = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        x = noisy_input(lat)
        unet(x, torch.full((pixels.shape[0],), t, dtype=torch.long), encoder_hidden_states=prompt_emb)
    for h in handles:
        h.remove()
    return lat, caught


def _unet_inputs(fx, run):
    seen = []
    handle = fx.unet.register_forward_pre_hook(lambda _m, args: seen.append((args[0].clone(), args[1].clone())))
    try:
        out = run()
    finally:
        handle.remove()
    return seen, out


def test_replacement_unet_directory_without_noise(dirs):
    fx = FeatureExtractor(dirs["sd"], dirs["dino"], device="cpu", unet_model=dirs["unet_dir"], noise=False,
                          sd_mode="whole", **SMALL)
    assert fx.recipe.noise is False and fx.recipe.timestep == 261  # CleanDIFT's own timestep
    assert fx.config()["unet_model"] == dirs["unet_dir"] and fx.config()["noise"] is False
    # the weights are the replacement's, not the base checkpoint's
    base = FeatureExtractor(dirs["sd"], dirs["dino"], device="cpu", sd_mode="whole", **SMALL)
    w = "conv_in.weight"
    assert not torch.equal(fx.unet.state_dict()[w], base.unet.state_dict()[w])
    assert torch.equal(fx.unet.state_dict()[w], load_file(f"{dirs['unet_dir']}/diffusion_pytorch_model.safetensors")[w])

    img = _image()
    pixels = fx._sd_input(img)[0][None]
    emb = fx._prompt_embedding("")
    seen, taps = _unet_inputs(fx, lambda: fx.unet_taps(pixels, emb))
    lat, manual = _manual_taps(fx, pixels, emb, 261, lambda lat: lat)
    (x, t), = seen
    assert torch.equal(x, lat)  # the clean latent, no noise added
    assert t.tolist() == [261]
    for tap in fx.recipe.taps:
        torch.testing.assert_close(taps[tap], manual[tap])
    (raw,) = fx.extract([img])
    for tap in fx.recipe.taps:
        torch.testing.assert_close(raw.sd[tap], manual[tap][0])


def test_replacement_unet_state_dict_file_tiled(dirs):
    fx = FeatureExtractor(dirs["sd"], dirs["dino"], device="cpu", unet_model=dirs["unet_file"], noise=False, **SMALL)
    sd = load_file(dirs["unet_file"])
    assert all(torch.equal(v, sd[k]) for k, v in fx.unet.state_dict().items())
    seen, raws = _unet_inputs(fx, lambda: fx.extract([_image()]))
    assert len(seen) == 1 and seen[0][0].shape[0] == 4  # the 2x2 tiles in one pass
    assert seen[0][1].tolist() == [261] * 4
    assert tuple(raws[0].sd["s3"].shape[-2:]) == (12, 12)


def test_noise_on_is_the_paper_recipe(dirs):
    # a replacement UNet with the default recipe: noise at t = 100, exactly as before
    fx = FeatureExtractor(dirs["sd"], dirs["dino"], device="cpu", unet_model=dirs["unet_dir"], sd_mode="whole", **SMALL)
    assert fx.recipe.noise is True and fx.recipe.timestep == 100
    pixels = fx._sd_input(_image())[0][None]
    emb = fx._prompt_embedding("")
    seen, taps = _unet_inputs(fx, lambda: fx.unet_taps(pixels, emb))
    t100 = torch.tensor([100])

    def noisy(lat):
        return fx.scheduler.add_noise(lat, fx._noise_for(*lat.shape[-2:]).expand_as(lat), t100)

    lat, manual = _manual_taps(fx, pixels, emb, 100, noisy)
    assert torch.equal(seen[0][0], noisy(lat)) and not torch.equal(seen[0][0], lat)
    for tap in fx.recipe.taps:
        torch.testing.assert_close(taps[tap], manual[tap])


def test_defaults_unchanged():
    r = Recipe()
    assert r.noise is True and "noise" not in r.to_dict()  # settings / fingerprints as before
    assert Recipe.build(noise=False).timestep == 261
    assert Recipe.build(noise=False, timestep=50).timestep == 50
    assert Recipe.build(noise=False).to_dict()["noise"] is False
    with pytest.raises(ValueError, match="noise"):
        Recipe(noise="no")


def test_default_extractor_config_has_no_unet_model(dirs):
    fx = FeatureExtractor(dirs["sd"], dirs["dino"], device="cpu", **SMALL)
    assert "unet_model" not in fx.config() and "noise" not in fx.config()


def test_bad_replacement_unets(dirs, tmp_path):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    wrong = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16, 16, 32), layers_per_block=2, norm_num_groups=8,
        cross_attention_dim=24, attention_head_dim=4,
    )
    wrong.save_pretrained(str(tmp_path / "wrong"), safe_serialization=True)
    with pytest.raises(ModelLoadError, match="24-dim text embeddings"):
        FeatureExtractor(dirs["sd"], dirs["dino"], device="cpu", unet_model=str(tmp_path / "wrong"), **SMALL)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in wrong.state_dict().items()}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ModelLoadError, match="do not fit"):
        FeatureExtractor(dirs["sd"], dirs["dino"], device="cpu", unet_model=str(tmp_path / "wrong.safetensors"), **SMALL)
    with pytest.raises(ModelLoadError, match="replacement UNet"):
        FeatureExtractor(dirs["sd"], dirs["dino"], device="cpu", unet_model=str(tmp_path / "missing"), **SMALL)
