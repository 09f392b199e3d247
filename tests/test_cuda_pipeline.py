"""The extraction pipeline on CUDA (skipped without a GPU): maps kept on the device,
projection, fusion and store encoding there, pinned copies back, and out-of-memory
halving under a memory cap. No FiftyOne needed (run by scripts/gpu_bench.sh)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from fiftyone_sdcorr.core.features.extractor import FeatureExtractor, to_host
from fiftyone_sdcorr.core.features.fusion import FixedProjection, fuse_raw
from fiftyone_sdcorr.core.features.store import encode, stored_values
from fiftyone_sdcorr.core.features.tiny import build_tiny_dino, build_tiny_sd
from fiftyone_sdcorr.core.features.transfer import encode_batch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SMALL = dict(sd_size=192, sd_tile=128, dino_size=112)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-cuda")
    return build_tiny_sd(root / "sd"), build_tiny_dino(root / "dino")


def _images(n=3):
    rng = np.random.default_rng(0)
    sizes = [(150, 100), (90, 120), (80, 80), (200, 60)]
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for w, h in sizes[:n]]


def test_extract_on_cuda_equals_cpu_fp32(tiny_dirs):
    imgs = _images()
    cpu = FeatureExtractor(*tiny_dirs, device="cpu", batch_size=2, **SMALL).extract(imgs)
    gpu = FeatureExtractor(*tiny_dirs, device="cuda", dtype="fp32", batch_size=2, **SMALL)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        out = gpu.extract(imgs)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    for a, b in zip(cpu, out):
        assert b.dino.device.type == "cpu"  # extract returns host maps
        for tap in a.sd:
            torch.testing.assert_close(b.sd[tap], a.sd[tap], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(b.dino, a.dino, rtol=1e-3, atol=1e-4)


def test_device_fusion_and_pinned_copies_equal_host_fusion(tiny_dirs):
    fx = FeatureExtractor(*tiny_dirs, device="cuda", dtype="fp32", batch_size=3, **SMALL)
    raws = fx.run_prepared(fx.prepare(_images()))
    assert all(r.dino.is_cuda and all(m.is_cuda for m in r.sd.values()) for r in raws)  # maps stay on the GPU
    host_raws = [to_host(r) for r in raws]
    proj = FixedProjection.fit([r.sd for r in host_raws], dim=8)
    fused_dev = [fuse_raw(r, proj, alpha=0.5) for r in raws]
    assert fused_dev[0].descriptors.is_cuda
    for dtype in (torch.float16, torch.int8):
        got = encode_batch(fused_dev, dtype).result()
        for g, r in zip(got, host_raws):
            ref = fuse_raw(r, proj, alpha=0.5)
            want = encode(ref.descriptors, dtype)
            assert g.tensors["descriptors"].device.type == "cpu" and g.tensors["descriptors"].dtype == dtype
            assert g.tensors["descriptors"].is_pinned()
            diff = (g.tensors["descriptors"].float() - want["descriptors"].float()).abs().max()
            assert diff <= (1.0 if dtype == torch.int8 else 1e-3)  # one int8 step at most
            # the embedding of the stored (rounded) values, as a recovered sample's would be
            stored = replace(ref, descriptors=stored_values(ref.descriptors, dtype))
            torch.testing.assert_close(g.embedding, stored.global_vector(), rtol=1e-3, atol=1e-4)


def test_out_of_memory_halves_the_batch_and_results_stay_the_same(tiny_dirs):
    imgs = _images(4)
    fx = FeatureExtractor(*tiny_dirs, device="cuda", dtype="fp32", batch_size=1, sd_size=960, sd_tile=512,
                          dino_size=448)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    one = fx.extract(imgs[:1])
    per_image = torch.cuda.max_memory_allocated() - base
    total = torch.cuda.get_device_properties(0).total_memory
    fx.batch_size = 16
    try:
        # room for about two images' work: a batch of 16 cannot fit, the extractor halves it
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + 2.5 * per_image) / total))
        out = fx.extract(imgs)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert 1 <= fx.batch_size <= 4 and len(out) == 4
    for tap in one[0].sd:
        torch.testing.assert_close(out[0].sd[tap], one[0].sd[tap], rtol=1e-3, atol=1e-4)
