"""core/features/pipeline.py: batches through a real (tiny) extractor with one batch of lookahead."""

import numpy as np
import pytest
import torch

from fiftyone_sdcorr.core.features.extractor import FeatureExtractor
from fiftyone_sdcorr.core.features.featurizer import Featurizer
from fiftyone_sdcorr.core.features.fusion import FixedProjection, fuse_raw
from fiftyone_sdcorr.core.common.images import ImageLoadError
from fiftyone_sdcorr.core.features.pipeline import pipelined
from fiftyone_sdcorr.core.features.store import encode
from fiftyone_sdcorr.core.features.tiny import build_tiny_dino, build_tiny_sd

SMALL = dict(sd_size=192, sd_tile=128, dino_size=112)


class Recording(FeatureExtractor):
    """The real extractor, recording when its models are queued."""

    events: list = []

    def run_prepared(self, prep):
        Recording.events.append(("queued", len(prep["sources"])))
        return super().run_prepared(prep)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-pipeline")
    return Recording(build_tiny_sd(root / "sd"), build_tiny_dino(root / "dino"), device="cpu", batch_size=2, **SMALL)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (60 + 10 * i, 90, 3), dtype=np.uint8) for i in range(n)]


def test_lookahead_order_results_and_a_failing_batch(fx, tmp_path):
    imgs = _images(5)
    proj = FixedProjection.fit([r.sd for r in fx.extract(imgs[:2])], dim=4)
    missing = str(tmp_path / "missing.jpg")
    plan = [("a", imgs[0:2]), ("b", [imgs[2], missing]), ("c", imgs[3:5]), ("d", [])]
    Recording.events = []

    def batches():
        for tag, ims in plan:
            Recording.events.append(("pulled", tag))
            yield tag, ims, None

    out = []
    for tag, got in pipelined(Featurizer(fx, proj), batches(), torch.float16):
        Recording.events.append(("yielded", tag))
        out.append((tag, got))
    # batch k comes back only after batch k+1 was pulled and queued
    assert Recording.events == [
        ("pulled", "a"), ("queued", 2), ("pulled", "b"), ("yielded", "a"),  # b failed before its models ran
        ("pulled", "c"), ("queued", 2), ("yielded", "b"), ("pulled", "d"), ("yielded", "c"), ("yielded", "d")]
    got = dict(out)
    assert isinstance(got["b"], ImageLoadError) and "missing.jpg" in str(got["b"])  # that batch alone
    assert got["d"] == []
    # what comes back is what the host path stores: the same encoded descriptors and embedding
    for enc, img in zip(got["a"] + got["c"], imgs[0:2] + imgs[3:5]):
        (raw,) = fx.extract([img])
        ref = fuse_raw(raw, proj, alpha=0.5)
        assert torch.equal(enc.tensors["descriptors"], encode(ref.descriptors, torch.float16)["descriptors"])
        assert enc.fused.letterbox == ref.letterbox and enc.fused.sd_channels == ref.sd_channels
        stored = ref.descriptors.to(torch.float16).float()
        torch.testing.assert_close(enc.embedding, type(ref)(stored, ref.letterbox, ref.stride, ref.sd_channels)
                                   .global_vector(), rtol=0, atol=1e-6)
