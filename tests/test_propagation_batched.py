"""Batched propagation (issue 10): ``Propagator.predict_many`` gives, target by target,
exactly what ``Propagator.predict`` gives; a batch of stored features is read
concurrently; a broken target fails alone.

The matcher is built from a real FiftyOne dataset in MongoDB by ``prepare_matching``
(the path of ``propagate_keypoints``), with the deterministic local descriptor
(tests/local_descriptor.py) on real photos.
"""

import uuid

import numpy as np
import pytest
import torch
from PIL import Image

import fiftyone as fo

from fiftyone_sdcorr.core.matching.correspondence import Prepared, PreparedBatch, match_prepared, match_prepared_many
from fiftyone_sdcorr.core.features.fusion import FusedFeatures
from fiftyone_sdcorr.core.common.geometry import Letterbox
from fiftyone_sdcorr.core.features.store import FeatureStore
from fiftyone_sdcorr.dataset.config import MatchConfig, PropagationConfig
from fiftyone_sdcorr.dataset.engine import RunSummary
from fiftyone_sdcorr.dataset.matching import feature_source, prepare_matching
from fiftyone_sdcorr.dataset.propagate import propagate_keypoints
from local_descriptor import LocalDescriptor

SKELETON_LABELS = ["nose", "left_eye", "right_eye", "l_ear", "r_ear", "chin"]
CAT_POINTS = [[0.52, 0.55], [0.42, 0.40], [0.62, 0.40], [0.30, 0.20], [0.75, 0.18], [0.53, 0.75]]
COFFEE_POINTS = [[0.3, 0.3], [0.5, 0.5], [0.7, 0.6], [0.4, 0.8], [0.6, 0.2], [0.2, 0.6]]
NAN = float("nan")


@pytest.fixture(scope="module")
def world(photo_paths, tmp_path_factory):
    """Two annotated references (chelsea with two instances and a NaN point, coffee),
    targets derived from them, embeddings on the references; deleted afterwards."""
    out = tmp_path_factory.mktemp("batched")
    cat = Image.open(photo_paths["chelsea"]).convert("RGB")
    coffee = Image.open(photo_paths["coffee"]).convert("RGB")
    paths = {"crop": str(out / "crop.png"), "flip": str(out / "flip.png"), "small": str(out / "small.png")}
    cat.crop((90, 20, 400, 260)).save(paths["crop"])
    cat.transpose(Image.FLIP_LEFT_RIGHT).save(paths["flip"])
    coffee.resize((coffee.width // 2, coffee.height // 2), Image.BICUBIC).save(paths["small"])
    ds = fo.Dataset(f"sdcorr-batched-{uuid.uuid4().hex[:10]}")
    ds.add_samples([fo.Sample(filepath=p) for p in
                    (photo_paths["chelsea"], photo_paths["coffee"], paths["crop"], paths["flip"], paths["small"],
                     photo_paths["astronaut"])])
    ds.skeletons = {"gt": fo.KeypointSkeleton(labels=SKELETON_LABELS, edges=[[0, 1], [0, 2]])}
    ds.save()
    a, b = ds.first(), ds.skip(1).first()
    a["gt"] = fo.Keypoints(keypoints=[
        fo.Keypoint(label="cat", points=CAT_POINTS),
        fo.Keypoint(label="cat", points=CAT_POINTS[:3] + [[NAN, NAN]] + CAT_POINTS[4:])])
    b["gt"] = fo.Keypoints(keypoints=[fo.Keypoint(label="cat", points=COFFEE_POINTS)])
    rng = np.random.default_rng(0)
    for s in (a, b):
        s["emb"] = rng.normal(size=16).tolist()
        s.save()
    try:
        yield ds
    finally:
        ds.delete()


def _engine(ds, match: MatchConfig, device="cpu", embedding_field="emb"):
    cfg = PropagationConfig("gt", "pred", None, embedding_field, 0.0, 8, False, match)
    summary = RunSummary("test", ("targets",))
    refs = ds.exists("gt")
    source = feature_source(ds, cfg, {"extractor": LocalDescriptor(448), "device": device})
    engine, _, problems = prepare_matching(ds, refs, "gt", cfg, source, summary, [])
    assert not problems and len(engine.references) == 2
    return engine


def _items(ds):
    """A mixed batch: two descriptor grids (32 x 32 and 24 x 24), a target that is a
    reference (excluded), one ranked by its embedding, and three broken targets."""
    big, small = LocalDescriptor(448), LocalDescriptor(336)
    s = list(ds)
    f = {x.id: big.describe([x.filepath])[0] for x in s}
    coarse = [small.describe([x.filepath])[0] for x in (s[4], s[5], s[2])]
    emb_b = torch.tensor(s[1]["emb"], dtype=torch.float32)
    good = f[s[2].id]
    items = [
        (f[s[2].id], None, None),  # chelsea crop
        (coarse[0], None, None),  # small coffee on the 24 x 24 grid
        (f[s[0].id], None, s[0].id),  # a reference as target: never its own evidence
        (FusedFeatures(good.descriptors[:10], good.letterbox, good.stride, 5), None, None),  # channels
        (f[s[3].id], None, None),  # mirrored chelsea
        (coarse[1], None, None),  # astronaut, 24 x 24
        (FusedFeatures(good.descriptors, Letterbox.fit(451, 300, 336), 14, good.sd_channels), None, None),  # grid
        (f[s[4].id], emb_b / emb_b.norm(), None),  # ranked by its embedding
        (FusedFeatures(good.descriptors[0], good.letterbox, good.stride, 5), None, None),  # not C x H x W
        (f[s[1].id], None, s[1].id),
        (coarse[2], None, None),
        (f[s[5].id], None, None),
    ]
    return items, {3: "channel mismatch", 6: "mask must be 32x32", 8: "C x H x W"}


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.label, x.instance, x.reference_ids, x.reference_id, x.flipped) == \
               (y.label, y.instance, y.reference_ids, y.reference_id, y.flipped)
        np.testing.assert_allclose(x.points, y.points, atol=1e-5)
        np.testing.assert_allclose(x.confidence, y.confidence, atol=1e-5)
        assert x.similarity == pytest.approx(y.similarity, abs=1e-5)


@pytest.mark.parametrize("combine", ["best", "per_point"])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("soft", [False, True])
def test_predict_many_equals_predict(world, combine, flip, soft):
    engine = _engine(world, MatchConfig(combine=combine, top_k=2, soft_argmax=soft, flip=flip))
    items, broken = _items(world)
    many = engine.predict_many(items)
    assert len(many) == len(items)
    ids = world.values("id")
    flipped = 0
    for i, (item, got) in enumerate(zip(items, many)):
        if i in broken:  # fails alone, with what predict raises
            assert isinstance(got, Exception) and broken[i] in str(got), (i, got)
            with pytest.raises(type(got), match=broken[i]):
                engine.predict(*item)
            continue
        assert not isinstance(got, Exception), (i, got)
        _same(got, engine.predict(*item))
        exclude = item[2]
        assert all(p.reference_id != exclude for p in got)
        assert all(r in ids[:2] for p in got for r in p.reference_ids if r is not None)
        flipped += sum(p.flipped for p in got)
        if combine == "best":
            assert len({p.reference_id for p in got}) == 1
    assert (flipped > 0) == flip  # the mirrored chelsea picks the mirrored reference
    # known answers: "best" gives the chelsea crop chelsea's two instances, the coffee the coffee
    assert [p.reference_id for p in many[0]] == [ids[0], ids[0]]
    assert many[7][0].reference_id == ids[1] and many[1][0].reference_id == ids[1]
    # order and size of a batch change nothing
    again = engine.predict_many(items[::-1])[::-1]
    for i, (x, y) in enumerate(zip(many, again)):
        if i not in broken:
            _same(x, y)


def test_match_prepared_many_equals_one_by_one():
    """The core batch: same tokens, similarities, cycle errors and confidences as
    match_prepared target by target (masks differ per target)."""
    g = torch.Generator().manual_seed(1)
    src = Prepared.of(FusedFeatures(torch.randn(24, 16, 16, generator=g), Letterbox.fit(300, 200, 224), 14, 12))
    tgts = [FusedFeatures(torch.randn(24, 16, 16, generator=g), Letterbox.fit(w, h, 224), 14, 12)
            for w, h in ((300, 200), (200, 300), (224, 224))]
    tok = torch.tensor([[3, 4], [10, 8], [0, 0], [15, 11]])
    val = torch.tensor([True, True, False, True])
    for window in (None, 5):
        for cycle in (False, True):
            batch = match_prepared_many(PreparedBatch.of(tgts), [(src, tok, val), (src, tok[:2], val[:2])],
                                        soft_window=window, cycle=cycle, out_device="cpu")
            for t, got in zip(tgts, batch):
                want = match_prepared(Prepared.of(t), [(src, tok, val), (src, tok[:2], val[:2])],
                                      soft_window=window, cycle=cycle)
                for a, b in zip(want, got):
                    for name in ("tokens", "similarity", "cycle_error", "confidence"):
                        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5, equal_nan=True), name
                    assert torch.equal(a.valid, b.valid)
    gv = PreparedBatch.of(tgts).global_vectors()
    for t, v in zip(tgts, gv):
        assert torch.allclose(Prepared.of(t).global_vector(), v, atol=1e-6)


def test_propagation_batches_change_nothing_and_broken_stored_features_fail_alone(world, tmp_path):
    """Stored features read concurrently: batch size 1 and 8 give the same keypoints
    ("best" and "per_point"); a target whose stored features do not fit the references
    fails alone, with its reason."""
    ds = world
    store = FeatureStore(tmp_path / "store")
    d = LocalDescriptor(448)
    bad = ds.skip(5).first().id
    for s in ds:
        f = d.describe([s.filepath])[0]
        if s.id == bad:  # fewer channels than the references: matching it raises
            f = FusedFeatures(f.descriptors[:10].contiguous(), f.letterbox, f.stride, 5)
        s["feats"] = str(store.save(s.id, f, dtype=torch.float32))
        s.save()
    refs = ds.exists("gt").values("id")
    try:
        kw = dict(features_field="feats", embedding_field=None, visibility_threshold=0.0, include_references=True,
                  progress=False)
        one = propagate_keypoints(ds, refs, "gt", "p1", batch_size=1, **kw)
        many = propagate_keypoints(ds, refs, "gt", "p8", batch_size=8, combine="per_point", top_k=2, **kw)
        per_point = propagate_keypoints(ds, refs, "gt", "p8b", batch_size=1, combine="per_point", top_k=2, **kw)
        for summary in (one, many, per_point):
            assert summary["predicted"] == 5 and summary["failed"] == 1, summary
            assert "target: ValueError: channel mismatch" in summary["errors"][bad]
        ds.reload()
        a = ds.exists("p1")
        many_b = propagate_keypoints(ds, refs, "gt", "p8c", batch_size=8, **kw)
        assert many_b["predicted"] == 5
        for x, y in (("p1", "p8c"), ("p8", "p8b")):
            for pa, pb in zip(a.values(f"{x}.keypoints.points"), a.values(f"{y}.keypoints.points")):
                np.testing.assert_allclose(np.array(pa, dtype=float), np.array(pb, dtype=float), atol=1e-6)
            assert a.values(f"{x}.keypoints.sdcorr_reference_ids") == a.values(f"{y}.keypoints.sdcorr_reference_ids")
        assert ds.values("p8_error") == ds.values("p8b_error")
    finally:
        for f in ("feats", "p1", "p1_error", "p8", "p8_error", "p8b", "p8b_error", "p8c", "p8c_error"):
            if ds.has_sample_field(f):
                ds.delete_sample_field(f)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("combine", ["best", "per_point"])
def test_predict_many_on_cuda_equals_cpu(world, combine):
    match = MatchConfig(combine=combine, top_k=2, soft_argmax=True, flip=True)
    cpu, gpu = _engine(world, match, "cpu"), _engine(world, match, "cuda")
    assert gpu.references[0].features.descriptors.device.type == "cuda"
    items, broken = _items(world)
    on_gpu = [(FusedFeatures(f.descriptors.cuda(), f.letterbox, f.stride, f.sd_channels), e, x)
              for f, e, x in items]
    a, b = cpu.predict_many(items), gpu.predict_many(on_gpu)
    for i, (x, y) in enumerate(zip(a, b)):
        if i in broken:
            assert isinstance(x, Exception) and isinstance(y, Exception) and broken[i] in str(y)
        else:
            _same(x, y)
