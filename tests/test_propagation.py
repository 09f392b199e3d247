"""propagate_keypoints through real FiftyOne + MongoDB.

Known answers with the deterministic local descriptor (tests/local_descriptor.py) on real
photos (skimage.data) and crops / translations / scalings / flips of them made with PIL;
operator plumbing (immediate and delegated) with the tiny real models.
"""

import math
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

import fiftyone as fo
import fiftyone.operators as foo
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionRunState

from fiftyone_sdcorr.core.matching import correspondence as corr
from fiftyone_sdcorr.core.features.fusion import FusedFeatures
from fiftyone_sdcorr.core.common.geometry import Letterbox
from fiftyone_sdcorr.core.matching.correspondence import Prepared, match_prepared
from fiftyone_sdcorr.dataset.matching import flip_pairs_from_labels
from fiftyone_sdcorr.dataset.propagate import propagate_keypoints
from fiftyone_sdcorr.core.features.store import FeatureStore
from local_descriptor import LocalDescriptor
from snapshots import field_snapshot

URI = "@sdcorr/sdcorr/propagate_keypoints"
NAN = float("nan")
SIZE, STRIDE = 448, 14  # local descriptor: 32 x 32 tokens
SKELETON_LABELS = ["nose", "left_eye", "right_eye", "l_ear", "r_ear", "chin"]
# chelsea (451 x 300): textured points on the cat (nose, eyes, ears, chin)
CAT_POINTS = [[0.52, 0.55], [0.42, 0.40], [0.62, 0.40], [0.30, 0.20], [0.75, 0.18], [0.53, 0.75]]


def desc():
    return LocalDescriptor(size=SIZE, stride=STRIDE)


def _name():
    return f"sdcorr-prop-{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def variants(photo_paths, tmp_path_factory):
    """Chelsea and geometric variants with the transform of normalised points."""
    out = tmp_path_factory.mktemp("variants")
    img = Image.open(photo_paths["chelsea"]).convert("RGB")
    w, h = img.size
    made = {"orig": (photo_paths["chelsea"], lambda p: p)}

    def save(name, im, fn):
        path = str(out / f"{name}.png")
        im.save(path)
        made[name] = (path, fn)

    # crop: a box around the cat's head
    x0, y0, x1, y1 = 90, 20, 400, 260
    save("crop", img.crop((x0, y0, x1, y1)),
         lambda p: [(p[0] * w - x0) / (x1 - x0), (p[1] * h - y0) / (y1 - y0)])
    # translation: the same content shifted inside a same-size canvas (black border)
    dx, dy = 40, 25
    canvas = Image.new("RGB", (w, h))
    canvas.paste(img.crop((0, 0, w - dx, h - dy)), (dx, dy))
    save("shift", canvas, lambda p: [(p[0] * w + dx) / w, (p[1] * h + dy) / h])
    # scaling: the whole image at 60 %
    save("small", img.resize((int(w * 0.6), int(h * 0.6)), Image.BICUBIC), lambda p: list(p))
    # horizontal flip
    save("flip", img.transpose(Image.FLIP_LEFT_RIGHT), lambda p: [1.0 - p[0], p[1]])
    return made


def _dataset(paths, ref_points=None, ref_index=0, field="gt"):
    ds = fo.Dataset(_name())
    ds.add_samples([fo.Sample(filepath=p, note=f"n{i}") for i, p in enumerate(paths)])
    if ref_points is not None:
        s = ds.skip(ref_index).first()
        s[field] = fo.Keypoints(keypoints=[fo.Keypoint(label="cat", points=[list(p) for p in ref_points])])
        s.save()
    return ds




def _token_px(w, h):
    """Size of one token in original pixels for a w x h image."""
    return STRIDE / Letterbox.fit(w, h, SIZE).scale


def _err_px(pred, want, w, h):
    return np.abs((np.asarray(pred, float) - np.asarray(want, float)) * [w, h])


# --------------------------------------------------------------------------- pure helpers
def test_flip_pairs_from_labels():
    labels = ["nose", "left_eye", "right_eye", "l_ear", "r_ear", "tail", "Left Paw", "right paw",
              "wing_l", "wing_r", "hip_left", "hip_right", "left_only"]
    assert flip_pairs_from_labels(labels) == [(1, 2), (3, 4), (6, 7), (8, 9), (10, 11)]
    assert flip_pairs_from_labels(["a", "b"]) == []


def test_match_prepared_equals_match_points():
    """The batched matcher gives exactly correspondence.match_points' answers."""
    g = torch.Generator().manual_seed(0)
    lb_s, lb_t = Letterbox.fit(300, 200, 224), Letterbox.fit(200, 300, 224)
    src = FusedFeatures(torch.randn(32, 16, 16, generator=g), lb_s, 14, 16)
    src2 = FusedFeatures(torch.randn(32, 16, 16, generator=g), lb_s, 14, 16)
    tgt = FusedFeatures(torch.randn(32, 16, 16, generator=g), lb_t, 14, 16)
    pts = torch.tensor([[0.1, 0.2], [0.5, 0.5], [NAN, NAN], [0.9, 0.8]])
    tok, val = corr.keypoints_to_tokens(pts, src)
    for window in (None, 5):
        ref = [corr.match_points(s, tgt, tok, valid=val, soft_window=window) for s in (src, src2)]
        got = match_prepared(Prepared.of(tgt), [(Prepared.of(src), tok, val), (Prepared.of(src2), tok, val)],
                             soft_window=window)
        for a, b in zip(ref, got):
            for name in ("tokens", "similarity", "cycle_error", "confidence"):
                x, y = getattr(a, name), getattr(b, name)
                assert torch.allclose(x, y, atol=1e-5, equal_nan=True), (name, x, y)
            assert torch.equal(a.valid, b.valid)


# --------------------------------------------------------------------------- known answers
@pytest.mark.parametrize("soft", [False, True])
def test_identity_recovers_every_point_within_half_a_token(photo_paths, soft):
    paths = [photo_paths["chelsea"], photo_paths["coffee"]]
    ds = _dataset(paths)
    rng = np.random.default_rng(0)
    try:
        refs = []
        for s in ds:
            pts = rng.uniform(0.05, 0.95, size=(12, 2)).tolist()
            s["gt"] = fo.Keypoints(keypoints=[fo.Keypoint(label="obj", points=pts),
                                              fo.Keypoint(label="obj", points=pts[:3])])
            s.save()
            refs.append(s.id)
        # references are not targets unless asked: skipped and counted, nothing written
        skipped = propagate_keypoints(ds, refs, "gt", "none", extractor=desc(), progress=False)
        assert (skipped["targets"], skipped["references_skipped"], ds.count("none")) == (0, 2, 0)
        summary = propagate_keypoints(ds, refs, "gt", "pred", extractor=desc(), soft_argmax=soft,
                                      include_references=True, visibility_threshold=0.0, progress=False)
        assert summary["predicted"] == 2 and summary["failed"] == 0 and summary["references_skipped"] == 0
        for s in ds:
            w, h = Image.open(s.filepath).size
            half = 0.5 * _token_px(w, h)
            assert len(s.pred.keypoints) == 2  # each reference instance -> its own instance
            for gt, pr in zip(s.gt.keypoints, s.pred.keypoints):
                assert pr.label == gt.label and pr.sdcorr_reference_id == s.id
                err = _err_px(pr.points, gt.points, w, h)
                if not soft:  # argmax: the token's centre, within half a token per axis
                    assert err.max() <= half + 1e-6, (err.max(), half)
                else:
                    # the soft-argmax averages over neighbours, which this deliberately smooth
                    # descriptor keeps nearly alike in flat regions (the tiny-model operator
                    # test checks half a token with the soft-argmax on)
                    assert np.median(err) <= half and err.max() <= 4 * half, (err.max(), half)
                assert min(pr.confidence) > 0.99
    finally:
        ds.delete()


@pytest.mark.parametrize("name", ["crop", "shift", "small"])
def test_geometric_known_answers(variants, name):
    """Crop / translation / scaling: every point lands within 1.5 tokens of its
    transformed position, with the soft-argmax on and off."""
    path, fn = variants[name]
    ds = _dataset([variants["orig"][0], path], ref_points=CAT_POINTS)
    try:
        ref_id = ds.first().id
        for soft in (False, True):
            field = f"pred_{int(soft)}"
            propagate_keypoints(ds, [ref_id], "gt", field, extractor=desc(), soft_argmax=soft,
                                visibility_threshold=0.0, progress=False)
            tgt = ds.last()
            w, h = Image.open(path).size
            want = [fn(p) for p in CAT_POINTS]
            err = _err_px(tgt[field].keypoints[0].points, want, w, h)
            tol = 1.5 * _token_px(w, h)
            assert err.max() <= tol, (name, soft, err.max(), tol)
    finally:
        ds.delete()


def test_flip_alignment_with_skeleton_pairs(variants):
    """A mirrored target: without flip alignment the local (not mirror-invariant)
    descriptor fails; with it, label i lands on the mirror of its skeleton partner."""
    ds = _dataset([variants["orig"][0], variants["flip"][0]], ref_points=CAT_POINTS)
    ds.skeletons = {"gt": fo.KeypointSkeleton(labels=SKELETON_LABELS, edges=[[0, 1], [0, 2]])}
    ds.save()
    try:
        ref_id = ds.first().id
        tgt_view = ds.skip(1)
        summary = propagate_keypoints(tgt_view, [ref_id], "gt", "pred_flip", extractor=desc(), flip=True,
                                      soft_argmax=False, visibility_threshold=0.0, progress=False)
        assert summary["flip_pairs"] == [[1, 2], [3, 4]] and summary["flip_pairs_origin"] == "skeleton"
        propagate_keypoints(tgt_view, [ref_id], "gt", "pred_plain", extractor=desc(), soft_argmax=False,
                            visibility_threshold=0.0, progress=False)
        tgt = ds.last()
        w, h = Image.open(tgt.filepath).size
        swap = {1: 2, 2: 1, 3: 4, 4: 3}
        want = [[1.0 - CAT_POINTS[swap.get(i, i)][0], CAT_POINTS[swap.get(i, i)][1]] for i in range(6)]
        kp = tgt.pred_flip.keypoints[0]
        assert kp.sdcorr_flipped is True
        err = _err_px(kp.points, want, w, h)
        # the mirrored query goes through token centres: two quantisations, within a token
        assert err.max() <= 1.0 * _token_px(w, h) + 1e-6, err
        # explicit pairs by name give the same; without flip the mean confidence is far lower
        assert np.mean(tgt.pred_plain.keypoints[0].confidence) < np.mean(kp.confidence) - 0.3
        propagate_keypoints(tgt_view, [ref_id], "gt", "pred_named", extractor=desc(), flip=True,
                            flip_pairs=[("left_eye", "right_eye"), ("l_ear", "r_ear")], soft_argmax=False,
                            visibility_threshold=0.0, progress=False)
        np.testing.assert_allclose(ds.last().pred_named.keypoints[0].points, kp.points)
    finally:
        ds.delete()


def test_several_references_best_and_per_point(photo_paths, variants):
    """Two annotated references (chelsea, coffee); targets: a chelsea crop and a scaled
    coffee. "best" picks the matching photo; "per_point" records a reference per point."""
    coffee = Image.open(photo_paths["coffee"])
    cw, ch = coffee.size
    small_coffee = variants["crop"][0].replace("crop.png", "coffee_small.png")
    coffee.resize((cw // 2, ch // 2), Image.BICUBIC).save(small_coffee)
    coffee_pts = [[0.3, 0.3], [0.5, 0.5], [0.7, 0.6], [0.4, 0.8], [0.6, 0.2], [0.2, 0.6]]
    ds = _dataset([variants["orig"][0], photo_paths["coffee"], variants["crop"][0], small_coffee])
    a, b, t1, t2 = list(ds)
    a["gt"] = fo.Keypoints(keypoints=[fo.Keypoint(label="thing", points=CAT_POINTS)])
    b["gt"] = fo.Keypoints(keypoints=[fo.Keypoint(label="thing", points=coffee_pts)])
    a.save()
    b.save()
    targets = ds.select([t1.id, t2.id])
    try:
        propagate_keypoints(targets, [a.id, b.id], "gt", "best", extractor=desc(), combine="best",
                            visibility_threshold=0.0, progress=False)
        propagate_keypoints(targets, [a.id, b.id], "gt", "pp", extractor=desc(), combine="per_point",
                            top_k=2, visibility_threshold=0.0, progress=False)
        t1.reload()
        t2.reload()
        assert t1.best.keypoints[0].sdcorr_reference_id == a.id
        assert t2.best.keypoints[0].sdcorr_reference_id == b.id
        assert -1.0 <= t1.best.keypoints[0].sdcorr_similarity <= 1.0
        # per point: the ids are among the references; the structure is the best reference's
        for t, best in ((t1, a), (t2, b)):
            kp = t.pp.keypoints[0]
            assert len(kp.points) == 6 and set(kp.sdcorr_reference_ids) <= {a.id, b.id}
            assert kp.sdcorr_reference_id == best.id
            # per-point confidence is the best of both references: never below "best"
            assert all(c1 >= c0 - 1e-5 for c1, c0 in zip(kp.confidence, t.best.keypoints[0].confidence))
        # known answer for the scaled coffee (same normalised coordinates)
        err = _err_px(t2.best.keypoints[0].points, coffee_pts, cw // 2, ch // 2)
        assert err.max() <= 1.5 * _token_px(cw // 2, ch // 2)
    finally:
        ds.delete()


def test_visibility_threshold_nan_points(variants):
    ds = _dataset([variants["orig"][0], variants["flip"][0]], ref_points=CAT_POINTS)
    try:
        propagate_keypoints(ds, [ds.first().id], "gt", "pred", extractor=desc(), visibility_threshold=0.9,
                            include_references=True,
                            progress=False)
        for s in ds:
            kp = s.pred.keypoints[0]
            for (x, y), c in zip(kp.points, kp.confidence):
                assert (math.isnan(x) and math.isnan(y)) == (c < 0.9)
        # mirrored target without flip alignment: most points judged not visible
        assert sum(math.isnan(x) for x, _ in ds.last().pred.keypoints[0].points) >= 4
        assert not any(math.isnan(x) for x, _ in ds.first().pred.keypoints[0].points)  # identity
    finally:
        ds.delete()


# --------------------------------------------------------------------------- stored features
class _NoCompute:
    """A Describer that must not be called (features come from the store)."""

    def describe(self, images, **kw):
        raise AssertionError("features were recomputed although they are stored")

    def config(self):
        return {"name": "no-compute"}


def test_uses_stored_features(variants, tmp_path):
    ds = _dataset([variants["orig"][0], variants["crop"][0]], ref_points=CAT_POINTS)
    try:
        store = FeatureStore(tmp_path / "store")
        d = desc()
        for s in ds:
            s["sdcorr_features"] = str(store.save(s.id, d.describe([s.filepath])[0]))
            s.save()
        summary = propagate_keypoints(ds, [ds.first().id], "gt", "pred", extractor=_NoCompute(),
                                      visibility_threshold=0.0, include_references=True, progress=False)
        assert summary["predicted"] == 2, summary
        w, h = Image.open(variants["crop"][0]).size
        want = [variants["crop"][1](p) for p in CAT_POINTS]
        assert _err_px(ds.last().pred.keypoints[0].points, want, w, h).max() <= 1.5 * _token_px(w, h)
    finally:
        ds.delete()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_propagation_on_cuda_equals_cpu(variants, tmp_path):
    """Stored features read onto the GPU and matched there give the CPU's answer."""
    ds = _dataset([variants["orig"][0], variants["crop"][0], variants["small"][0]], ref_points=CAT_POINTS)
    try:
        store = FeatureStore(tmp_path / "store")
        d = desc()
        for s in ds:
            s["sdcorr_features"] = str(store.save(s.id, d.describe([s.filepath])[0], dtype=torch.float32))
            s.save()
        ref = [ds.first().id]
        kw = dict(extractor=_NoCompute(), visibility_threshold=0.0, flip=False, include_references=True, progress=False)
        assert propagate_keypoints(ds, ref, "gt", "on_cpu", device="cpu", **kw)["predicted"] == 3
        assert propagate_keypoints(ds, ref, "gt", "on_gpu", device="cuda", **kw)["predicted"] == 3
        a = np.array(ds.values("on_cpu.keypoints.points"), dtype=float)
        b = np.array(ds.values("on_gpu.keypoints.points"), dtype=float)
        np.testing.assert_allclose(b, a, atol=1e-4)
    finally:
        ds.delete()


# --------------------------------------------------------------------------- bad data, safety
def test_bad_samples_recorded_rest_completes(variants, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    zero = tmp_path / "zero.png"
    zero.write_bytes(b"")
    missing = tmp_path / "missing.jpg"
    good = [variants["orig"][0], variants["crop"][0], variants["small"][0]]
    ds = _dataset(good + [str(corrupt), str(zero), str(missing)])
    ds.skeletons = {}
    s = list(ds)
    # references: one good (with a NaN point and two points outside [0, 1]), one without
    # keypoints, one with an empty Keypoints, one whose image is missing
    s[0]["gt"] = fo.Keypoints(keypoints=[fo.Keypoint(
        label="cat", points=CAT_POINTS[:4] + [[NAN, NAN], [1.5, 0.2], [-0.1, 0.3]])])
    s[1]["gt"] = None
    s[2]["gt"] = fo.Keypoints(keypoints=[])
    s[5]["gt"] = fo.Keypoints(keypoints=[fo.Keypoint(label="cat", points=CAT_POINTS)])
    for x in s:
        x.save()
    before = field_snapshot(ds)
    try:
        refs = [s[0].id, s[1].id, s[2].id, s[5].id]
        summary = propagate_keypoints(ds, refs, "gt", "pred", extractor=desc(), visibility_threshold=0.0,
                                      include_references=True, progress=False)
        assert summary["predicted"] == 3 and summary["failed"] == 3, summary
        assert summary["references_used"] == [s[0].id]
        assert sorted(summary["references_left_out"]) == sorted([s[1].id, s[2].id, s[5].id])
        ds.reload()
        errs = dict(zip(ds.values("id"), ds.values("pred_error")))
        assert "outside [0, 1]" in errs[s[0].id] and "[5, 6]" in errs[s[0].id]
        assert "no keypoints" in errs[s[1].id] and "no keypoints" in errs[s[2].id]
        assert "corrupt.jpg" in errs[s[3].id]
        assert "zero.png" in errs[s[4].id] and "empty" in errs[s[4].id]
        assert "missing.jpg" in errs[s[5].id] and "not found" in errs[s[5].id]
        preds = dict(zip(ds.values("id"), ds.values("pred")))
        for x in s[3:]:
            assert preds[x.id] is None
        kp = preds[s[1].id].keypoints[0]
        assert len(kp.points) == 7
        for q in (4, 5, 6):  # NaN and out-of-range reference points -> NaN, confidence 0
            assert math.isnan(kp.points[q][0]) and kp.confidence[q] == 0.0
        assert not math.isnan(kp.points[0][0])
        # nothing that existed before changed
        assert field_snapshot(ds, exclude=("pred", "pred_error")) == before
    finally:
        ds.delete()


def test_refuses_existing_fields_and_empty_views(variants):
    ds = _dataset([variants["orig"][0], variants["crop"][0]], ref_points=CAT_POINTS)
    ds.add_sample_field("taken", fo.StringField)
    ref = ds.first().id
    try:
        before = field_snapshot(ds)
        with pytest.raises(ValueError, match="source_field"):
            propagate_keypoints(ds, [ref], "gt", "gt", extractor=desc(), overwrite=True, progress=False)
        with pytest.raises(ValueError, match="already exists"):
            propagate_keypoints(ds, [ref], "gt", "taken", extractor=desc(), progress=False)
        with pytest.raises(ValueError, match="targets.*empty"):
            propagate_keypoints(ds.limit(0), [ref], "gt", "p", extractor=desc(), progress=False)
        with pytest.raises(ValueError, match="references.*selects no sample"):
            propagate_keypoints(ds, ds.limit(0), "gt", "p", extractor=desc(), progress=False)
        with pytest.raises(ValueError, match="no usable reference"):
            propagate_keypoints(ds, [ds.last().id], "gt", "p", extractor=desc(), progress=False)
        with pytest.raises(ValueError, match="does not exist"):
            propagate_keypoints(ds, [ref], "nope", "p", extractor=desc(), progress=False)
        assert field_snapshot(ds) == before
        # overwrite=True is the only way to rewrite a field; a second run then works
        propagate_keypoints(ds, [ref], "gt", "p", extractor=desc(), progress=False)
        with pytest.raises(ValueError, match="already exists"):
            propagate_keypoints(ds, [ref], "gt", "p", extractor=desc(), progress=False)
        calls = []
        propagate_keypoints(ds, [ref], "gt", "p", extractor=desc(), overwrite=True,
                            progress=lambda f, label: calls.append((f, label)))
        assert calls[-1][0] == 1.0 and calls[0][0] == 0.0
    finally:
        ds.delete()


# --------------------------------------------------------------------------- operator
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from fiftyone_sdcorr.core.features.tiny import tiny_models

    return tiny_models(tmp_path_factory.mktemp("tiny-models"))


TINY_RECIPE = dict(sd_size=128, sd_mode="whole", dino_size=56, pca_dim=8)


def test_operator_immediate_and_delegated(variants, models):
    sd, dino = models
    ds = _dataset([variants["orig"][0], variants["crop"][0], variants["small"][0]], ref_points=CAT_POINTS)
    try:
        before = field_snapshot(ds)
        params = dict(sd_model=sd, dino_model=dino, device="cpu", recipe=TINY_RECIPE, source_field="gt", include_references=True,
                      output_field="op_pred", references="selected", visibility_threshold=0.0, batch_size=2)
        res = foo.execute_operator(URI, ctx={"dataset": ds, "view": ds.view(), "params": params,
                                             "selected": [ds.first().id]})
        res.raise_exceptions()
        ds.reload()
        assert ds.count("op_pred") == 3 and ds.count("op_pred_error") == 0
        kp = ds.first().op_pred.keypoints[0]
        assert kp.label == "cat" and len(kp.points) == 6 and kp.sdcorr_reference_id == ds.first().id
        # identity target: every point within half a token (tiny DINO grid 56/14 = 4)
        w, h = Image.open(ds.first().filepath).size
        half = 0.5 * 14 / Letterbox.fit(w, h, 56).scale
        assert _err_px(kp.points, CAT_POINTS, w, h).max() <= half + 1e-6

        # delegated, through the programmatic __call__ (references by id, a second field)
        op = foo.get_operator(URI)
        res = op(ds, "gt", "op_pred2", references=[ds.first().id], sd_model=sd, dino_model=dino,
                 device="cpu", recipe=TINY_RECIPE, combine="per_point", include_references=True, delegate=True)
        res.raise_exceptions()
        assert res.delegated
        svc = DelegatedOperationService()
        svc.execute_queued_operations(operator=URI, dataset_name=ds.name)
        doc = svc.get(res.result["id"])
        assert doc.run_state == ExecutionRunState.COMPLETED, doc.result
        assert doc.result.result["predicted"] == 3
        ds.reload()
        assert ds.count("op_pred2") == 3
        assert field_snapshot(ds, exclude=("op_pred", "op_pred_error", "op_pred2", "op_pred2_error")) == before
        # the operator refuses an existing output field (no overwrite)
        with pytest.raises(Exception, match="already exists"):
            foo.execute_operator(URI, ctx={"dataset": ds, "view": ds.view(), "params": params,
                                           "selected": [ds.first().id]}).raise_exceptions()
        # references from a tag
        s0 = ds.first()
        s0.tags.append("ref")
        s0.save()
        res = foo.execute_operator(URI, ctx={"dataset": ds, "view": ds.skip(1), "params": dict(
            params, output_field="op_pred3", references="tag", reference_tag="ref")})
        res.raise_exceptions()
        ds.reload()
        assert ds.count("op_pred3") == 2
    finally:
        ds.delete()


def test_stored_and_computed_features_mix(variants, models, tmp_path, caplog):
    """Features stored by compute_fused_features for the references only; the targets'
    are computed on the fly with the store's fixed projection (same channels), and not
    stored."""
    from fiftyone_sdcorr.dataset.compute_features import compute_fused_features

    import logging

    caplog.set_level(logging.INFO, logger="fiftyone_sdcorr.dataset.propagate")
    sd, dino = models
    ds = _dataset([variants["orig"][0], variants["crop"][0], variants["small"][0]], ref_points=CAT_POINTS)
    try:
        ref = ds.first()
        store_dir = tmp_path / "store"
        compute_fused_features(ds.select([ref.id]), sd, dino, device="cpu",
                               recipe=dict(sd_size=128, sd_mode="whole", dino_size=56), pca_dim=8,
                               projection_samples=1, store_dir=str(store_dir), batch_size=1, progress=False)
        ds.reload()
        assert ds.count("sdcorr_features") == 1
        files_before = sorted(p.name for p in store_dir.rglob("*.safetensors"))
        caplog.clear()  # only what propagation logs counts below
        before = field_snapshot(ds)
        with pytest.raises(ValueError, match="pca_dim: stored 8 vs given 256"):  # another recipe: refused
            propagate_keypoints(ds, [ref.id], "gt", "pred", sd_model=sd, dino_model=dino, device="cpu",
                                recipe=dict(sd_size=128, sd_mode="whole", dino_size=56), progress=False)
        assert field_snapshot(ds) == before and not ds.has_sample_field("pred")
        # the same settings given explicitly, or none (the recorded ones): the same answer
        summary = propagate_keypoints(ds, [ref.id], "gt", "pred", sd_model=sd, dino_model=dino, device="cpu",
                                      recipe=dict(sd_size=128, sd_mode="whole", dino_size=56), pca_dim=8,
                                      visibility_threshold=0.0, include_references=True, progress=False)
        again = propagate_keypoints(ds, [ref.id], "gt", "pred2", device="cpu", visibility_threshold=0.0,
                                    include_references=True, progress=False)
        assert again["predicted"] == 3
        assert ds.values("pred2.keypoints.points") == ds.values("pred.keypoints.points")
        assert summary["predicted"] == 3 and summary["failed"] == 0, summary["errors"]
        assert "projection" not in caplog.text  # the store's projection was used as is
        assert sorted(p.name for p in store_dir.rglob("*.safetensors")) == files_before
        ds.reload()
        assert ds.count("sdcorr_features") == 1
    finally:
        ds.delete()
