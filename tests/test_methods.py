"""Feature methods as data (issue 23): ``"sd-dino"`` (the paper) and ``"dino-diy"`` (DIY-SC's
adapter on DINOv2), the one featurizer under every path, CleanDIFT's timestep.

Answers known by construction: the adapter's descriptors are the adapter applied to the
DINO tokens of the same extractor; an image matched with itself finds every token-centre
point exactly; a store of one method is refused for the other by name; the UNet is called
at t = 261 on the clean latent for CleanDIFT settings (a hook on its forward); stores of
the paper's method keep the fingerprints they had (values computed before methods existed).
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

import fiftyone as fo

import fiftyone_sdcorr as sdc
from fiftyone_sdcorr.core.features.adapter import DEFAULT_ADAPTER, load_adapter
from fiftyone_sdcorr.core.features.extractor import CLEAN_TIMESTEP, FeatureExtractor
from fiftyone_sdcorr.core.features.featurizer import Featurizer
from fiftyone_sdcorr.core.features.methods import METHODS, fingerprint
from fiftyone_sdcorr.core.features.tiny import TINY_DINO_WIDTH, save_tiny_adapter, tiny_models
from fiftyone_sdcorr.dataset.config import FeatureConfig, MatchConfig
from fiftyone_sdcorr.dataset.engine import ParameterError


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    sd, dino = tiny_models(root / "models")
    return sd, dino, save_tiny_adapter(root / "adapter.safetensors", dim=TINY_DINO_WIDTH)


def _diy(models, **kw):
    _, dino, adapter = models
    return FeatureExtractor(sd_model="/no/such/sd", dino_model=dino, method="dino-diy", adapter=adapter,
                            device="cpu", preset="cpu", **kw)


def test_dino_diy_describe_is_the_adapter_on_the_dino_tokens_and_loads_no_sd(models, photo_paths):
    ext = _diy(models)  # the SD path does not exist: nothing of SD is loaded
    assert ext.unet is None and ext.vae is None and ext.text_encoder is None
    (f,) = ext.describe([photo_paths["chelsea"]])
    (raw,) = ext.extract([photo_paths["chelsea"]])
    assert raw.sd == {}
    adapter = load_adapter(models[2])
    with torch.no_grad():
        want = adapter(raw.dino[None].clone())[0]
    want = want / (want.norm(dim=0, keepdim=True) + 1e-8)
    torch.testing.assert_close(f.descriptors, want, rtol=0, atol=1e-5)
    assert f.sd_channels == 0 and f.stride == 14 and f.letterbox == raw.dino_letterbox
    torch.testing.assert_close(f.descriptors.norm(dim=0), torch.ones(f.grid, f.grid), rtol=0, atol=1e-5)
    assert f.meta["method"] == "dino-diy" and f.meta["adapter"] == ext.config()["adapter"]


def test_settings_and_fingerprints_per_method():
    # the paper's stores keep the fingerprints they had before methods existed
    assert FeatureConfig.build().fingerprint() == "657020b938ff76d0"
    assert FeatureConfig.build(preset="cpu").fingerprint() == "9c688a51c8c96923"
    assert FeatureConfig.build(objects=True).fingerprint() == "9c51c565387e2100"
    s = FeatureConfig.build().settings()
    assert s["method"] == "sd-dino" and fingerprint(s) == fingerprint({k: v for k, v in s.items() if k != "method"})
    diy = FeatureConfig.build(method="dino-diy").settings()
    assert diy["method"] == "dino-diy" and "sd_model" not in diy and "timestep" not in diy
    assert diy["adapter"] == FeatureConfig.build(method="dino-diy", adapter=DEFAULT_ADAPTER).settings()["adapter"]
    # what does not decide a dino-diy feature does not change its fingerprint; what does, does
    base = FeatureConfig.build(method="dino-diy").fingerprint()
    assert FeatureConfig.build(method="dino-diy", sd_model="x/y", recipe={"timestep": 5}).fingerprint() == base
    assert FeatureConfig.build(method="dino-diy", preset="cpu").fingerprint() != base
    with pytest.raises(ParameterError, match="'method'"):
        FeatureConfig.build(method="sd-diy")
    with pytest.raises(ParameterError, match="'adapter' is for method 'dino-diy'"):
        FeatureConfig.build(adapter=DEFAULT_ADAPTER)
    with pytest.raises(ParameterError, match="convert-adapter"):
        FeatureConfig.build(method="dino-diy", adapter=__file__)


def test_cleandift_settings_call_the_unet_at_261_on_the_clean_latent(models, photo_paths):
    sd, dino, _ = models
    seen = []
    for kw in ({"noise": False}, {"noise": False, "timestep": 7}, {}):
        ext = FeatureExtractor(sd, dino, device="cpu", preset="cpu", **kw)
        got = {}

        def hook(_m, args, kwargs):
            got["t"] = (args[1] if len(args) > 1 else kwargs["timestep"]).tolist()
            got["sample"] = args[0].clone()

        h = ext.unet.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            pixels = ext._sd_pixels(ext.prepare([photo_paths["chelsea"]])["sd"])
            ext.unet_taps(pixels, ext._prompt_embedding(""))
        finally:
            h.remove()
        clean = ext.vae.encode(pixels).latent_dist.mean * ext.vae.config.scaling_factor
        seen.append((got["t"], torch.allclose(got["sample"], clean)))
    assert seen[0] == ([CLEAN_TIMESTEP], True) and CLEAN_TIMESTEP == 261
    assert seen[1] == ([7], True)  # an explicit timestep is kept
    assert seen[2] == ([100], False)  # the paper: noise added at t = 100


def _dataset(photo_paths):
    ds = fo.Dataset()
    ds.add_samples([fo.Sample(filepath=photo_paths["chelsea"]), fo.Sample(filepath=photo_paths["chelsea"])])
    return ds


def test_identity_pairs_propagate_exactly_with_dino_diy(models, photo_paths, tmp_path):
    _, dino, adapter = models
    ds = _dataset(photo_paths)
    try:
        features = dict(method="dino-diy", adapter=adapter, dino_model=dino, preset="cpu", device="cpu",
                        store_dir=str(tmp_path))
        summary = sdc.compute_fused_features(ds, features=features, progress=False)
        assert summary["computed"] == 2
        rec = sdc.dataset.engine.find_record(ds, "compute_fused_features", "sdcorr_features")
        assert rec["settings"]["method"] == "dino-diy" and "sd_model" not in rec["settings"]
        # points at token centres of the 448 frame (32 x 32 tokens over 451 x 300 px)
        ref, tgt = ds.first(), ds.last()
        w, h = 451, 300
        s, oy = 448 / w, (448 - round(h * 448 / w)) // 2
        pts = [((14 * c + 6.5) / s / w, (14 * r + 6.5 - oy) / s / h) for c, r in ((5, 12), (20, 15), (28, 18))]
        ref["gt"] = fo.Keypoints(keypoints=[fo.Keypoint(label="cat", points=pts)])
        ref.save()
        sdc.propagate_keypoints(ds.select(tgt.id), [ref.id], "gt", "pred", soft_argmax=False,
                                visibility_threshold=0.0, progress=False)
        got = np.array(ds[tgt.id]["pred"].keypoints[0].points)
        np.testing.assert_allclose(got, np.array(pts), atol=1e-6)
    finally:
        ds.delete()


def test_a_store_of_one_method_is_refused_for_the_other_by_name(models, photo_paths, tmp_path):
    sd, dino, adapter = models
    ds = _dataset(photo_paths)
    try:
        sdc.compute_fused_features(ds, features=dict(sd_model=sd, dino_model=dino, preset="cpu", device="cpu",
                                                     store_dir=str(tmp_path)), progress=False)
        ref = ds.first()
        ref["gt"] = fo.Keypoints(keypoints=[fo.Keypoint(label="cat", points=[(0.5, 0.5)])])
        ref.save()
        before = ds.get_field_schema()
        diy = dict(method="dino-diy", adapter=adapter, dino_model=dino, preset="cpu")
        with pytest.raises(ParameterError, match=r"method 'sd-dino', not 'dino-diy'"):
            sdc.propagate_keypoints(ds, [ref.id], "gt", "pred", features=diy, progress=False)
        with pytest.raises(ParameterError, match=r"method: stored 'sd-dino' vs requested 'dino-diy'"):
            sdc.compute_fused_features(ds, features=dict(diy, store_dir=str(tmp_path)), progress=False)
        assert ds.get_field_schema() == before  # refused before anything was written
        # into another field, both live side by side, each in its own store namespace
        s2 = sdc.compute_fused_features(ds, features=dict(diy, store_dir=str(tmp_path), features_field="diy",
                                                         embedding_field="diy_emb"), progress=False)
        assert s2["computed"] == 2 and s2["fingerprint"] != FeatureConfig.build(sd_model=sd).fingerprint()
    finally:
        ds.delete()


def test_the_soft_argmax_window_follows_the_method():
    assert MatchConfig().soft_window is None  # None: the method's own
    assert (METHODS["sd-dino"].soft_window, METHODS["dino-diy"].soft_window) == (11, 15)
    assert METHODS["dino-diy"].temperature == 0.02


def test_featurizer_fits_the_projection_only_for_methods_with_sd(models, photo_paths):
    sd, dino, adapter = models
    paper = Featurizer(FeatureExtractor(sd, dino, device="cpu", preset="cpu"))
    paper.describe([photo_paths["chelsea"], photo_paths["coffee"]])
    assert paper.needs_projection and paper.projection is not None
    assert paper.file_fingerprint("x") == f"x:{paper.projection.digest()}"
    diy = Featurizer(_diy(models))
    out = diy.describe_each([photo_paths["chelsea"], "/no/such/image.jpg"])
    assert not diy.needs_projection and diy.projection is None and diy.file_fingerprint("x") == "x:-"
    assert out[0].descriptors.shape[0] == TINY_DINO_WIDTH and isinstance(out[1], Exception)


def test_the_cli_and_the_forms_offer_the_method():
    for cmd in ("evaluate-pairs", "demo"):
        out = subprocess.run([sys.executable, "-m", "fiftyone_sdcorr", cmd, "--help"], capture_output=True,
                             text=True, timeout=120).stdout
        assert "--method" in out and "dino-diy" in out and "sd-dino" in out, cmd
    import asyncio

    from fiftyone.operators.executor import resolve_type
    from fiftyone.operators.registry import OperatorRegistry

    ds = fo.Dataset()
    try:
        for op in ("compute_fused_features", "propagate_keypoints", "propagate_masks"):
            prop = asyncio.run(resolve_type(OperatorRegistry(), f"@sdcorr/sdcorr/{op}",
                                            {"dataset_name": ds.name, "params": {}}))
            method = prop.type.properties["method"]
            assert [c.value for c in method.view.choices] == list(METHODS), op
            assert all(c.description for c in method.view.choices)
    finally:
        ds.delete()


def test_evaluate_pairs_refuses_sd_ablations_for_a_method_without_sd(tmp_path):
    with pytest.raises(ParameterError, match="method 'dino-diy' has no SD"):
        sdc.evaluate_pairs("spair", tmp_path, method="dino-diy", features="sd", records=[])


def test_shipped_adapter_fits_dinov2_base_width():
    a = load_adapter()
    assert a.feature_dims == (768,) and a.projection_dim == 768


def test_public_dataset_functions_take_their_settings_in_groups():
    """No public dataset function takes more than about 15 parameters besides ``features=``;
    the flat keywords of earlier versions are merged into their groups by the one shim."""
    import inspect

    from fiftyone_sdcorr.dataset.config import MATCH_PARAMS, flat_keywords

    dataset_functions = [getattr(sdc, n) for n in sdc.__all__ if inspect.isfunction(getattr(sdc, n))
                         and getattr(sdc, n).__module__.startswith("fiftyone_sdcorr.dataset.")]
    assert len(dataset_functions) >= 12
    sizes = {f.__name__: len([p for p in inspect.signature(f).parameters if p != "features"])
             for f in dataset_functions}
    assert max(sizes.values()) <= 16, sizes
    for f in (sdc.propagate_keypoints, sdc.flag_keypoint_annotations, sdc.propagate_masks, sdc.swap_instances,
              sdc.compute_fused_features):
        params = inspect.signature(f).parameters
        assert "features" in params and not {"extractor", "preset", "device", "dtype", "features_field"} & set(params)
    # what the shim does, on a function that returns what it was given
    shim = flat_keywords(match=True, refine=True)(lambda **kw: kw)
    got = shim(sd_model="a/b", features={"preset": "cpu"}, flip=True, match={"top_k": 2}, refine="inpaint",
               refine_steps=50)
    assert got == {"features": {"preset": "cpu", "sd_model": "a/b"}, "match": {"top_k": 2, "flip": True},
                   "refine": {"mode": "inpaint", "steps": 50}}
    with pytest.raises(ParameterError, match="'flip' is given twice"):
        shim(flip=True, match={"flip": False})
    with pytest.raises(ParameterError, match="'match': unknown setting"):
        shim(flip=True, match={"flipp": False})
    assert set(MATCH_PARAMS) >= {"flip", "soft_argmax", "soft_window", "top_k", "combine", "same_label"}


def test_missing_features_of_a_dino_diy_store_are_computed_with_its_own_adapter(models, photo_paths, tmp_path):
    """Features a run must compute (a mirrored reference for flip alignment) use the adapter
    the stored ones were computed with (its path is recorded beside its digest)."""
    _, dino, adapter = models
    ds = _dataset(photo_paths)
    try:
        sdc.compute_fused_features(ds, features=dict(method="dino-diy", adapter=adapter, dino_model=dino,
                                                     preset="cpu", device="cpu", store_dir=str(tmp_path)),
                                   progress=False)
        ref = ds.first()
        ref["gt"] = fo.Keypoints(keypoints=[fo.Keypoint(label="cat", points=[(0.3, 0.4), (0.6, 0.5)])])
        ref.save()
        got = sdc.propagate_keypoints(ds, [ref.id], "gt", "pred", flip=True, progress=False)
        assert got["predicted"] == 1 and not [w for w in got["warnings"] if "unavailable" in w], got.text()
    finally:
        ds.delete()
