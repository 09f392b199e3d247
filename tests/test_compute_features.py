"""compute_fused_features: Python API and the operator, through real FiftyOne + MongoDB
and tiny real models (no mocks).

Covers: immediate and delegated operator runs, progress (App messages and callbacks),
resumability, existing fields untouched, brain similarity / visualization on the field,
bad samples, two concurrent delegated workers on one queue, a worker killed mid-run.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import fiftyone as fo
import fiftyone.operators as foo
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionRunState

from fiftyone_sdcorr.dataset.compute_features import compute_fused_features

ERROR_FIELD = "sdcorr_features_error"
from fiftyone_sdcorr.core.features.extractor import FeatureExtractor
from fiftyone_sdcorr.core.features.store import FeatureStore
from fiftyone_sdcorr.core.features.tiny import tiny_models
from snapshots import field_snapshot

URI = "@sdcorr/sdcorr/compute_fused_features"
RECIPE = dict(sd_size=128, sd_mode="whole", dino_size=56)
PDIM = 8  # channels per SD tap
N_TAPS = 3


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("tiny-models"))


def _params(models, store_dir, **kw):
    sd, dino = models
    p = dict(
        sd_model=sd, dino_model=dino, device="cpu", preset="paper", recipe=dict(RECIPE),
        pca_dim=PDIM, projection_samples=2, store_dir=str(store_dir), batch_size=1,
    )
    p.update(kw)
    return p


def _api_kwargs(models, store_dir, **kw):
    sd, dino = models
    out = dict(device="cpu", recipe=dict(RECIPE), pca_dim=PDIM, projection_samples=2,
               store_dir=str(store_dir), batch_size=1, progress=False)
    out.update(kw)
    return sd, dino, out


def _dataset(paths, name_prefix="sdcorr-cf"):
    ds = fo.Dataset(f"{name_prefix}-{uuid.uuid4().hex[:10]}")
    samples = []
    for i, p in enumerate(paths):
        s = fo.Sample(filepath=str(p), note=f"n{i}", ground_truth=fo.Classification(label=f"c{i}"))
        samples.append(s)
    ds.add_samples(samples)
    return ds


@pytest.fixture
def photo_ds(photo_paths):
    names = ["chelsea", "coffee", "astronaut", "portrait"]
    ds = _dataset([photo_paths[n] for n in names])
    yield ds
    ds.delete()


def _snapshot(ds, exclude=("sdcorr_embedding", "sdcorr_features", ERROR_FIELD)):
    """Every field of every sample except ours, plus the schema of the other fields."""
    return field_snapshot(ds, exclude)


def namespace(store_dir):
    """The store namespace of the one configuration a test computes with (None before
    the run made it)."""
    spaces = [d for d in Path(store_dir).iterdir() if d.is_dir()] if Path(store_dir).is_dir() else []
    assert len(spaces) <= 1, spaces
    return spaces[0] if spaces else None


def _log_events(store_dir):
    events = []
    for f in (namespace(store_dir) / "_log").glob("*.jsonl") if namespace(store_dir) else []:
        for line in f.read_text().splitlines():
            if line.strip():
                events.append(json.loads(line))
    return events


def _check_done(ds, store_dir, expect_channels=None):
    store = FeatureStore(namespace(store_dir))
    for s in ds.iter_samples():
        assert s[ERROR_FIELD] is None, s[ERROR_FIELD]
        emb = s["sdcorr_embedding"]
        assert isinstance(emb, np.ndarray) and emb.dtype == np.float32 and emb.ndim == 1
        assert abs(float(np.linalg.norm(emb)) - 1.0) < 1e-4
        path = s["sdcorr_features"]
        assert path == str(store.path_for(s.id)) and os.path.isfile(path)
        f = store.load(path)
        if expect_channels is not None:
            assert f.descriptors.shape[0] == expect_channels
        assert f.sd_channels == N_TAPS * PDIM
        # the field is the pooled vector of the stored maps
        np.testing.assert_allclose(f.global_vector().numpy(), emb, atol=1e-5)


# --------------------------------------------------------------------------- tests
def test_operator_registered():
    op = foo.get_operator(URI)
    assert op.config.allow_delegated_execution and op.config.allow_immediate_execution
    assert op.config.default_choice_to_delegated


def test_immediate_operator_resumable_fields_untouched_and_brain(photo_ds, models, tmp_path):
    import fiftyone.brain as fob

    ds = photo_ds
    store_dir = tmp_path / "store"
    before = _snapshot(ds)
    res = foo.execute_operator(URI, ctx={"dataset": ds, "view": ds.view(),
                                         "params": _params(models, store_dir)})
    res.raise_exceptions()
    ds.reload()
    assert _snapshot(ds) == before
    _check_done(ds, store_dir)
    assert isinstance(ds.get_field("sdcorr_embedding"), fo.VectorField)
    events = _log_events(store_dir)
    assert Counter(e["event"] for e in events) == {"computed": len(ds)}
    mtimes = {p: os.stat(p).st_mtime_ns for p in ds.values("sdcorr_features")}

    # resumable: a second run computes nothing and rewrites no file
    seen = []
    sd, dino, kw = _api_kwargs(models, store_dir, progress=lambda f, label: seen.append((f, label)))
    summary = compute_fused_features(ds, sd, dino, **kw)
    assert summary["computed"] == 0 and summary["skipped"] == len(ds), summary
    assert {p: os.stat(p).st_mtime_ns for p in ds.values("sdcorr_features")} == mtimes
    assert seen and seen[-1][0] == 1.0
    assert len(_log_events(store_dir)) == len(ds)

    # the field works as is with FiftyOne Brain
    sim = fob.compute_similarity(ds, embeddings="sdcorr_embedding", brain_key="sdcorr_sim",
                                 backend="sklearn")
    query = ds.first().id
    top = ds.sort_by_similarity(query, k=2, brain_key="sdcorr_sim")
    assert top.first().id == query  # a sample is its own nearest neighbour
    assert sim.total_index_size == len(ds)
    fob.compute_visualization(ds, embeddings="sdcorr_embedding", method="pca",
                              brain_key="sdcorr_viz")
    assert set(ds.list_brain_runs()) == {"sdcorr_sim", "sdcorr_viz"}


def test_immediate_operator_yields_progress_and_reload(photo_ds, models, tmp_path):
    """What the App receives from an immediate run: set_progress messages while the work
    runs, then reload_dataset, then the run's summary: a notification and the operator's
    output (the server's path: the generator is not exhausted)."""
    from fiftyone.operators.executor import _parse_ctx, execute_or_delegate_operator

    ds = photo_ds
    view = ds.limit(2)
    req = _parse_ctx(ctx={"view": view, "params": _params(models, tmp_path / "store")})

    async def run():
        result = await execute_or_delegate_operator(URI, req, exhaust=False)
        result.raise_exceptions()
        return [m.to_json() for m in result.result]

    msgs = asyncio.run(run())
    triggered = [(m["body"]["operator_uri"] if m["body"] else None, m["body"]) for m in msgs]
    uris = [u for u, _ in triggered]
    assert any(u and u.endswith("set_progress") for u in uris), uris
    assert [u.rsplit("/", 1)[-1] for u in uris[-3:]] == ["reload_dataset", "notify", "show_output"], uris
    shown = triggered[-1][1]["params"]["results"]["summary"]  # a Markdown code block
    assert shown.startswith("```\ncompute_fused_features: total 2, computed 2"), shown
    assert triggered[-2][1]["params"]["variant"] == "success"
    progress = [b["params"].get("progress") for u, b in triggered if u.endswith("set_progress")]
    assert progress[-1] == 1.0
    assert progress == sorted(progress)
    # only the targeted view was computed
    done = ds.exists("sdcorr_embedding")
    assert set(done.values("id")) == set(view.values("id"))


def test_delegated_operator(photo_ds, models, tmp_path):
    ds = photo_ds
    store_dir = tmp_path / "store"
    svc = DelegatedOperationService()
    res = foo.execute_operator(URI, ctx={"dataset": ds, "view": ds.view(),
                                         "params": _params(models, store_dir)},
                               request_delegation=True)
    res.raise_exceptions()
    assert res.delegated
    op_id = res.result["id"]
    ds.reload()
    assert len(ds.exists("sdcorr_embedding")) == 0  # queued, not run
    svc.execute_queued_operations(operator=URI, dataset_name=ds.name)
    doc = svc.get(op_id)
    assert doc.run_state == ExecutionRunState.COMPLETED, doc.result
    summary = doc.result.result
    assert summary["computed"] == len(ds) and summary["failed"] == 0
    assert doc.status is not None and doc.status.progress == 1.0
    ds.reload()
    _check_done(ds, store_dir)


def test_programmatic_call(photo_ds, models, tmp_path):
    op = foo.get_operator(URI)
    sd, dino = models
    view = photo_ds.limit(1)
    op(view, sd, dino, device="cpu", recipe=RECIPE, pca_dim=PDIM, projection_samples=1,
       store_dir=str(tmp_path / "s"), embedding_field="emb2", features_field="feat2")
    assert set(photo_ds.exists("emb2").values("id")) == set(view.values("id"))
    res = op(photo_ds, sd, dino, device="cpu", recipe=RECIPE, pca_dim=PDIM,
             store_dir=str(tmp_path / "s"), embedding_field="emb2", features_field="feat2",
             delegate=True)
    assert res.delegated
    svc = DelegatedOperationService()
    assert svc.get(res.result["id"]).run_state == ExecutionRunState.QUEUED
    svc.delete_operation(res.result["id"])  # leave no queued work for other tests' workers


@pytest.mark.parametrize("batch_size", [1, 3])  # 3: bad files inside pipelined batches with good ones
def test_bad_samples_recorded_rest_completes(photo_paths, models, tmp_path, batch_size):
    bad = tmp_path / "bad"
    bad.mkdir()
    zero = bad / "zero.jpg"
    zero.write_bytes(b"")
    corrupt = bad / "corrupt.jpg"
    corrupt.write_bytes(Path(photo_paths["chelsea"]).read_bytes()[:600])  # truncated JPEG
    garbage = bad / "garbage.png"
    garbage.write_bytes(os.urandom(2048))
    missing = bad / "missing.jpg"
    good = [photo_paths["coffee"], photo_paths["tiny"]]
    ds = _dataset([*good, zero, corrupt, garbage, missing])
    vds = fo.Dataset(f"sdcorr-video-{uuid.uuid4().hex[:8]}")
    try:
        before = _snapshot(ds)
        store_dir = tmp_path / "store"
        res = foo.execute_operator(URI, ctx={"dataset": ds, "params": _params(models, store_dir,
                                                                              batch_size=batch_size)})
        res.raise_exceptions()
        ds.reload()
        assert _snapshot(ds) == before
        errors = dict(zip(ds.values("filepath"), ds.values(ERROR_FIELD)))
        for p in good:
            assert errors[p] is None
        for p in (zero, corrupt, garbage, missing):
            assert errors[str(p)] and str(p) in errors[str(p)], (p, errors[str(p)])
        assert "empty" in errors[str(zero)] and "not found" in errors[str(missing)]
        assert len(ds.exists("sdcorr_embedding")) == len(good)
        assert ds.exists("sdcorr_embedding").values("filepath") == good

        # a video sample: an error record, no model run
        vds.add_sample(fo.Sample(filepath=str(bad / "clip.mp4"), note="v"))
        sd, dino, kw = _api_kwargs(models, tmp_path / "vstore")
        summary = compute_fused_features(vds, sd, dino, **kw)
        assert summary["failed"] == 1 and summary["computed"] == 0
        assert "clip.mp4" in vds.first()[ERROR_FIELD] and "video" in vds.first()[ERROR_FIELD]
        assert vds.first()["note"] == "v"
    finally:
        ds.delete()
        vds.delete()


def test_projection_config_mismatch_is_a_clear_error(photo_ds, models, tmp_path):
    sd, dino, kw = _api_kwargs(models, tmp_path / "store")
    compute_fused_features(photo_ds.limit(1), sd, dino, **kw)
    kw["recipe"] = dict(RECIPE, alpha=0.3)
    with pytest.raises(ValueError, match="alpha"):
        compute_fused_features(photo_ds, sd, dino, **kw)
    kw["overwrite"] = True
    summary = compute_fused_features(photo_ds, sd, dino, **kw)
    assert summary["computed"] == len(photo_ds)


def test_existing_field_of_another_type_is_refused(photo_ds, models, tmp_path):
    sd, dino, kw = _api_kwargs(models, tmp_path / "store")
    with pytest.raises(ValueError, match="note"):
        compute_fused_features(photo_ds, sd, dino, embedding_field="note", **kw)
    assert photo_ds.values("note") == [f"n{i}" for i in range(len(photo_ds))]


class CountingExtractor(FeatureExtractor):
    """The real extractor, counting the images its models run on (not a stand-in): every
    path (``extract`` and the pipelined one of compute_fused_features) goes through
    ``run_prepared``."""

    extracted = 0

    def run_prepared(self, prep):
        CountingExtractor.extracted += len(prep["sources"])
        return super().run_prepared(prep)


def test_projection_fitted_from_the_first_pass_each_image_extracted_once(photo_ds, models, tmp_path):
    sd, dino, kw = _api_kwargs(models, tmp_path / "store", projection_samples=3)
    rec = kw.pop("recipe")
    ext = CountingExtractor(sd, dino, device="cpu", batch_size=1, pca_dim=kw.pop("pca_dim"), **rec)
    CountingExtractor.extracted = 0
    summary = compute_fused_features(photo_ds, extractor=ext, **kw)
    assert summary["computed"] == len(photo_ds) and summary["projection"]
    assert CountingExtractor.extracted == len(photo_ds)  # the 3 fitting images were not extracted again
    _, meta = FeatureStore(namespace(tmp_path / "store")).load_tensors("projection")
    assert len(meta["fitted_on"]) == 3


def test_truncated_file_is_not_done_and_is_recomputed(photo_ds, models, tmp_path):
    sd, dino, kw = _api_kwargs(models, tmp_path / "store")
    compute_fused_features(photo_ds, sd, dino, **kw)
    victim = photo_ds.first()
    path = Path(victim["sdcorr_features"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    summary = compute_fused_features(photo_ds, sd, dino, **kw)
    assert summary["computed"] == 1 and summary["skipped"] == len(photo_ds) - 1, summary
    assert path.stat().st_size == len(data)
    photo_ds.reload()
    _check_done(photo_ds, tmp_path / "store")


def test_int8_store_end_to_end(photo_ds, models, tmp_path):
    sd, dino, kw = _api_kwargs(models, tmp_path / "store", store_dtype="int8")
    summary = compute_fused_features(photo_ds, sd, dino, **kw)
    assert summary["computed"] == len(photo_ds)
    photo_ds.reload()
    _check_done(photo_ds, tmp_path / "store")  # the embedding is that of the stored (int8) maps
    assert compute_fused_features(photo_ds, sd, dino, **kw)["skipped"] == len(photo_ds)


def test_another_recipe_coexists_in_its_own_namespace(photo_ds, models, tmp_path):
    sd, dino, kw = _api_kwargs(models, tmp_path / "store")
    first = compute_fused_features(photo_ds, sd, dino, **kw)
    before = field_snapshot(photo_ds)
    kw["recipe"] = dict(RECIPE, sd_mode="tiled", sd_tile=64)
    with pytest.raises(ValueError, match=r"sd_mode: stored 'whole' vs requested 'tiled'"):
        compute_fused_features(photo_ds, sd, dino, **kw)
    assert field_snapshot(photo_ds) == before  # refused before anything was written
    second = compute_fused_features(photo_ds, sd, dino, embedding_field="tiled_embedding",
                                    features_field="tiled_features", **kw)
    assert second["computed"] == len(photo_ds) and second["fingerprint"] != first["fingerprint"]
    assert second["store_dir"] != first["store_dir"]
    photo_ds.reload()
    # both coexist: the first fields and files are untouched
    assert field_snapshot(photo_ds, ("tiled_embedding", "tiled_features", "tiled_features_error")) == before
    assert all(Path(p).is_file() for p in photo_ds.values("sdcorr_features"))
    assert {str(Path(p).parent.parent) for p in photo_ds.values("tiled_features")} == {second["store_dir"]}
    # a rerun of each configuration skips everything
    assert compute_fused_features(photo_ds, sd, dino, **_api_kwargs(models, tmp_path / "store")[2])["skipped"] == 4


# --------------------------------------------------------------------------- workers
WORKER = textwrap.dedent(
    """
    import os, sys, time
    ready, me, n, dataset_name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    import fiftyone as fo
    from fiftyone.operators.delegated import DelegatedOperationService
    svc = DelegatedOperationService()
    fo.load_dataset(dataset_name)  # connected
    open(os.path.join(ready, me), "w").close()
    while len(os.listdir(ready)) < n:  # start together
        time.sleep(0.05)
    t0 = time.time()
    svc.execute_queued_operations(dataset_name=dataset_name)
    print(f"{me}: executed in {time.time() - t0:.1f}s", flush=True)
    """
)


def _two_workers_complete(svc, tmp_path, ds_name, op_ids):
    """Two worker processes run the queued operations; both completed; their documents."""
    ready = tmp_path / "ready"
    ready.mkdir()
    procs = [_spawn_worker(tmp_path, ready, f"w{i}", 2, ds_name) for i in range(2)]
    for i, proc in enumerate(procs):
        assert proc.wait(timeout=240) == 0, _worker_output(tmp_path, f"w{i}")
    docs = [svc.get(i) for i in op_ids]
    assert [d.run_state for d in docs] == [ExecutionRunState.COMPLETED] * len(op_ids), \
        [(d.result.error, d.result.error_message) if d.result else None for d in docs]
    return docs


def _spawn_worker(tmp_path, ready, me, n, ds_name):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    log = open(tmp_path / f"{me}.log", "w")
    return subprocess.Popen([sys.executable, str(script), str(ready), me, str(n), ds_name],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _worker_output(tmp_path, me):
    return (tmp_path / f"{me}.log").read_text()[-3000:]


def _queue(ds, view, models, store_dir, **kw):
    res = foo.execute_operator(URI, ctx={"dataset": ds, "view": view,
                                         "params": _params(models, store_dir, **kw)},
                               request_delegation=True)
    res.raise_exceptions()
    return res.result["id"]


def _many_paths(photo_paths, n):
    names = ["chelsea", "coffee", "astronaut", "rocket", "portrait", "tiny"]
    return [photo_paths[names[i % len(names)]] for i in range(n)]


@pytest.mark.workers
def test_two_workers_one_queue_no_duplicates(photo_paths, models, tmp_path):
    ds = _dataset(_many_paths(photo_paths, 16))
    store_dir = tmp_path / "store"
    svc = DelegatedOperationService()
    # larger inputs than elsewhere: the computing must outlast the workers' start-up jitter
    recipe = dict(RECIPE, sd_size=256, dino_size=112)
    try:
        ids = ds.values("id")
        # fit the store's projection first, so that neither worker waits for the other's fit
        sd, dino, kw = _api_kwargs(models, store_dir, recipe=recipe)
        first = compute_fused_features(ds.select(ids[:2]), sd, dino, **kw)
        # two overlapping targets: the whole dataset, and the last 12 samples
        op_ids = [_queue(ds, ds.view(), models, store_dir, recipe=recipe),
                  _queue(ds, ds.select(ids[4:]), models, store_dir, recipe=recipe)]
        docs = _two_workers_complete(svc, tmp_path, ds.name, op_ids)
        summaries = [d.result.result for d in docs]
        # they ran at the same time, and both did part of the work
        assert docs[0].started_at < docs[1].completed_at and docs[1].started_at < docs[0].completed_at
        assert all(s["computed"] > 0 for s in summaries), summaries
        assert sum(s["computed"] for s in summaries) == len(ds) - 2, summaries
        events = _log_events(store_dir)
        computed = Counter(e["id"] for e in events if e["event"] == "computed")
        assert set(computed) == set(ids) and max(computed.values()) == 1, computed
        assert {e["worker"] for e in events} == {first["worker"], *(s["worker"] for s in summaries)}
        ds.reload()
        _check_done(ds, store_dir)
    finally:
        ds.delete()


@pytest.mark.workers
def test_shards_are_delegated_operations_that_two_workers_run_at_once(photo_paths, models, tmp_path):
    """Beyond one GPU: op(view, shards=N, delegate=True) queues N operations; N workers
    (here two processes on this CPU; in production N machines) run them in parallel."""
    ds = _dataset(_many_paths(photo_paths, 8))
    store_dir = tmp_path / "store"
    svc = DelegatedOperationService()
    try:
        sd, dino = models
        op = foo.get_operator(URI)
        p = _params(models, store_dir, recipe=dict(RECIPE, sd_size=256, dino_size=112))
        p.pop("sd_model"), p.pop("dino_model")
        results = op(ds, sd, dino, shards=2, delegate=True, **p)
        op_ids = [r.result["id"] for r in results]
        assert len(op_ids) == 2
        docs = _two_workers_complete(svc, tmp_path, ds.name, op_ids)
        summaries = [d.result.result for d in docs]
        assert [s["computed"] for s in summaries] == [4, 4], summaries
        assert docs[0].started_at < docs[1].completed_at and docs[1].started_at < docs[0].completed_at
        computed = Counter(e["id"] for e in _log_events(store_dir) if e["event"] == "computed")
        assert set(computed) == set(ds.values("id")) and max(computed.values()) == 1
        ds.reload()
        _check_done(ds, store_dir)
        with pytest.raises(ValueError, match="shards"):
            op(ds, sd, dino, shards=2, **p)  # shards need delegation
    finally:
        ds.delete()


@pytest.mark.workers
def test_killed_worker_then_rerun_completes_without_duplicates(photo_paths, models, tmp_path):
    ds = _dataset(_many_paths(photo_paths, 10))
    store_dir = tmp_path / "store"
    svc = DelegatedOperationService()
    recipe = dict(RECIPE, sd_size=256, dino_size=112)  # slow enough to be killed mid-run
    try:
        ids = ds.values("id")
        op_id = _queue(ds, ds.view(), models, store_dir, recipe=recipe)
        ready = tmp_path / "ready"
        ready.mkdir()
        proc = _spawn_worker(tmp_path, ready, "victim", 1, ds.name)
        deadline = time.time() + 180
        while time.time() < deadline:
            if sum(e["event"] == "computed" for e in _log_events(store_dir)) >= 3:
                break
            assert proc.poll() is None, _worker_output(tmp_path, "victim")
            time.sleep(0.01)
        else:
            pytest.fail("the worker did not get going: " + _worker_output(tmp_path, "victim"))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        done_before = [e["id"] for e in _log_events(store_dir) if e["event"] == "computed"]
        assert 3 <= len(done_before) < len(ids)
        assert svc.get(op_id).run_state == ExecutionRunState.RUNNING  # died mid-run

        # rerun: a new queued operation executed by a worker
        op2 = _queue(ds, ds.view(), models, store_dir, recipe=recipe)
        svc.execute_queued_operations(operator=URI, dataset_name=ds.name)
        doc = svc.get(op2)
        assert doc.run_state == ExecutionRunState.COMPLETED, doc.result
        summary = doc.result.result
        assert summary["computed"] + summary["recovered"] == len(ids) - summary["skipped"]
        events = _log_events(store_dir)
        computed = Counter(e["id"] for e in events if e["event"] == "computed")
        assert max(computed.values()) == 1, computed  # nothing computed twice
        recovered = {e["id"] for e in events if e["event"] == "recovered"}
        assert set(computed) | recovered == set(ids)
        ds.reload()
        _check_done(ds, store_dir)
        # no claim left held (an empty lock file may remain if the kill came between a
        # sample's database write and the lock file's removal)
        import fcntl

        for lock in (namespace(store_dir) / "_locks").rglob("*.lock"):
            with open(lock, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if held
    finally:
        ds.delete()


def test_selected_samples_target(photo_ds, models, tmp_path):
    ds = photo_ds
    chosen = ds.values("id")[1:2]
    params = _params(models, tmp_path / "store", view_target="SELECTED_SAMPLES",
                     projection_samples=1)
    foo.execute_operator(URI, ctx={"dataset": ds, "selected": chosen, "params": params}
                         ).raise_exceptions()
    assert ds.exists("sdcorr_embedding").values("id") == chosen


def test_prompt_field_gives_each_sample_its_prompt(photo_paths, models, tmp_path):
    """With a '{label}' template and prompt_field, each sample's features are computed with
    its own label's prompt: exactly what FeatureExtractor.extract(..., labels=...) gives."""
    from fiftyone_sdcorr.core.features.extractor import FeatureExtractor
    from fiftyone_sdcorr.core.features.fusion import FixedProjection, fuse_raw
    from fiftyone_sdcorr.core.features.store import FeatureStore

    same = photo_paths["chelsea"]
    ds = fo.Dataset(f"sdcorr-prompt-{uuid.uuid4().hex[:8]}")
    ds.add_samples([
        fo.Sample(filepath=str(same), animal=fo.Classification(label="cat")),
        fo.Sample(filepath=str(same), animal=fo.Classification(label="dog")),
        fo.Sample(filepath=str(same)),  # no label: the empty prompt
    ])
    try:
        sd, dino, kw = _api_kwargs(models, tmp_path / "store")
        kw["recipe"] = dict(RECIPE, prompt="a photo of a {label}")
        with pytest.raises(ValueError, match="needs a prompt template"):
            compute_fused_features(ds, sd, dino, prompt_field="animal", **_api_kwargs(models, tmp_path / "s0")[2])
        summary = compute_fused_features(ds, sd, dino, prompt_field="animal", **kw)
        assert summary["computed"] == 3 and summary["failed"] == 0, summary
        store = FeatureStore(namespace(tmp_path / "store"))
        cat, dog, none = (store.load(s.sdcorr_features).descriptors for s in ds)
        assert not torch.allclose(cat, dog, atol=1e-2)  # same pixels, different prompts

        ext = FeatureExtractor(sd, dino, device="cpu", batch_size=1, pca_dim=PDIM, **kw["recipe"])
        tensors, _ = store.load_tensors("projection")
        proj = FixedProjection.from_state_dict(tensors)
        raws = ext.extract([str(same)] * 3, labels=["cat", "dog", None])
        for stored, raw in zip((cat, dog, none), raws):
            expect = fuse_raw(raw, proj, alpha=ext.recipe.alpha).descriptors
            assert torch.allclose(stored, expect, atol=2e-2), (stored - expect).abs().max()
    finally:
        ds.delete()


class WithoutPipeline:
    """The real extractor behind its public ``extract`` / ``describe`` only: what any
    extractor without ``prepare``/``run_prepared`` gets (one batch at a time, on the host)."""

    def __init__(self, ext):
        self._ext, self.recipe, self.batch_size = ext, ext.recipe, ext.batch_size

    def extract(self, images, labels=None):
        return self._ext.extract(images, labels=labels)

    def describe(self, images, **kw):
        return self._ext.describe(images, **kw)

    def config(self):
        return self._ext.config()


@pytest.mark.parametrize("store_dtype", ["float16", "int8"])
def test_pipelined_path_stores_what_the_one_batch_path_stores(photo_ds, models, tmp_path, store_dtype, caplog):
    """Batches queued on the device, fused and encoded there, copied back while the next
    batch runs: the same files and embeddings as extracting and fusing on the host."""
    caplog.set_level("WARNING", logger="fiftyone_sdcorr")
    sd, dino, kw = _api_kwargs(models, tmp_path / "piped", projection_samples=1, store_dtype=store_dtype)
    rec, pdim = kw.pop("recipe"), kw.pop("pca_dim")
    ext = FeatureExtractor(sd, dino, device="cpu", batch_size=2, pca_dim=pdim, **rec)
    piped = compute_fused_features(photo_ds, extractor=ext, **kw)
    kw["store_dir"] = str(tmp_path / "plain")
    plain = compute_fused_features(photo_ds, extractor=WithoutPipeline(ext), embedding_field="e2",
                                   features_field="f2", **kw)
    assert piped["computed"] == plain["computed"] == len(photo_ds) and not piped["failed"]
    assert not [r for r in caplog.records if "image by image" in r.getMessage()]  # no fallback ran
    a_store, b_store = FeatureStore(namespace(tmp_path / "piped")), FeatureStore(namespace(tmp_path / "plain"))
    for sid, ea, eb in zip(photo_ds.values("id"), photo_ds.values("sdcorr_embedding"), photo_ds.values("e2")):
        fa, fb = a_store.load(sid), b_store.load(sid)
        assert torch.equal(fa.descriptors, fb.descriptors) and fa.letterbox == fb.letterbox
        np.testing.assert_allclose(ea, eb, rtol=0, atol=1e-6)
        np.testing.assert_allclose(ea, fa.global_vector().numpy(), rtol=0, atol=1e-6)


def test_rerun_without_store_dir_resumes_where_the_fields_were_stored(photo_ds, models, tmp_path, monkeypatch):
    """A user reruns with the same settings but leaves out store_dir (as the demo's user
    does): the samples are done, nothing is computed again into the default folder."""
    monkeypatch.setenv("SDCORR_STORE_DIR", str(tmp_path / "default"))
    sd, dino, kw = _api_kwargs(models, tmp_path / "chosen")
    first = compute_fused_features(photo_ds, sd, dino, **kw)
    assert first["computed"] == len(photo_ds)
    paths = photo_ds.values("sdcorr_features")
    kw.pop("store_dir")
    again = compute_fused_features(photo_ds, sd, dino, **kw)
    assert again["computed"] == 0 and again["skipped"] == len(photo_ds) and not again["failed"]
    assert photo_ds.values("sdcorr_features") == paths and again["store_dir"] == first["store_dir"]
    assert not (tmp_path / "default").exists()
    # other settings into other fields, no store_dir: the default folder, as documented
    other = compute_fused_features(photo_ds, sd, dino, embedding_field="e3", features_field="f3",
                                   **{**kw, "pca_dim": kw["pca_dim"] + 1})
    assert other["computed"] == len(photo_ds) and other["store_dir"].startswith(str(tmp_path / "default"))


def test_rerun_with_another_store_dtype_is_refused_then_overwrites_where_it_stored(photo_ds, models, tmp_path,
                                                                                  monkeypatch):
    """A user reruns with ``store_dtype="int8"`` to save disk, into the fields computed in
    float16 and without store_dir: the run is refused with the difference instead of
    skipping every sample (the fingerprint, which names the store folder, leaves the dtype
    out); with overwrite=True every sample is recomputed into int8 files, in the folder
    recorded for these fields."""
    monkeypatch.setenv("SDCORR_STORE_DIR", str(tmp_path / "default"))
    sd, dino, kw = _api_kwargs(models, tmp_path / "chosen")
    first = compute_fused_features(photo_ds, sd, dino, **kw)
    assert first["computed"] == len(photo_ds)
    kw.pop("store_dir")
    before = field_snapshot(photo_ds)
    with pytest.raises(ValueError, match=r"store_dtype: stored 'float16' vs requested 'int8'"):
        compute_fused_features(photo_ds, sd, dino, store_dtype="int8", **kw)
    photo_ds.reload()
    assert field_snapshot(photo_ds) == before
    again = compute_fused_features(photo_ds, sd, dino, store_dtype="int8", overwrite=True, **kw)
    assert again["computed"] == len(photo_ds) and not again["failed"]
    assert again["store_dir"] == first["store_dir"] and not (tmp_path / "default").exists()
    from safetensors.torch import load_file

    for path in photo_ds.values("sdcorr_features"):
        tensors = load_file(path)
        assert any(t.dtype == torch.int8 for t in tensors.values()), {k: t.dtype for k, t in tensors.items()}
    # and the int8 run resumes: same settings, same dtype
    third = compute_fused_features(photo_ds, sd, dino, store_dtype="int8", **kw)
    assert third["computed"] == 0 and third["skipped"] == len(photo_ds)
