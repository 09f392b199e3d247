"""``compute_fused_features``: fused SD + DINOv2 features for a FiftyOne collection.

For each image sample it writes

- ``embedding_field`` (default ``sdcorr_embedding``): the pooled global fused vector
  (float32, unit norm), usable as is by ``fiftyone.brain.compute_similarity`` and
  ``compute_visualization``;
- ``features_field`` (default ``sdcorr_features``): the path of the sample's dense fused
  maps in the feature store;
- ``<features_field>_error``: ``None`` on success, else why the sample failed.

**Store namespaces.** Without ``store_dir`` a rerun into fields computed before uses the
folder recorded for them (so it resumes there, computing nothing twice, or overwrites
there); otherwise the default folder. Features of one configuration (models and recipe: its
*fingerprint*, :meth:`FeatureConfig.fingerprint`) live in
``<store_dir>/<fingerprint>/``: ``<shard>/<sample id>.safetensors``, the fixed projection
in ``_tensors/projection.safetensors``, claims in ``_locks/``, one log per worker run in
``_log/``. Runs with other settings compute into their own namespace, so both coexist on
disk; the dataset's fields hold one configuration at a time (a record, a FiftyOne custom
run, says which), and writing another configuration into them needs ``overwrite=True``.

**Done** means: the fields hold this sample's path in this namespace, and the file's
header parses, its size matches the header (not truncated) and its fingerprint (the
configuration and the projection's digest) is this run's.

**Several workers** (delegated operations on one or many hosts sharing the database and
the store) split the work with per-sample ``flock`` claims (:mod:`.claims`). Under the
claim the state is re-read: a sample done meanwhile is skipped; a valid store file
without database values (a worker killed between the two writes) is *recovered* without
running the models; a sample another worker failed during this run is not retried.

**The fixed projection** is fitted once per namespace, under an exclusive lock, on the
first ``projection_samples`` pending images; their raw maps are fused and stored right
away (no second extraction).
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

import fiftyone.core.media as fom

from fiftyone_sdcorr.core.features.extractor import PREP_THREADS
from fiftyone_sdcorr.core.features.featurizer import PROJECTION_NAME, Featurizer
from fiftyone_sdcorr.core.features.fusion import FusedFeatures
from fiftyone_sdcorr.core.features.store import STORE_DTYPES, FeatureStore, encode, stored_embedding
from fiftyone_sdcorr.core.features.pipeline import pipelined
from fiftyone_sdcorr.core.features.transfer import EncodedFeatures
from fiftyone_sdcorr.dataset.claims import SampleLock, exclusive, fs_now, worker_id
from fiftyone_sdcorr.dataset.config import COMPUTE_FEATURE_PARAMS, FeatureConfig, flat_keywords, \
    merge_features
from fiftyone_sdcorr.dataset.engine import (
    Record,
    Run,
    RunSummary,
    ParameterError,
    check_bool,
    check_field_name,
    checks_done,
    declare_outputs,
    guard_outputs,
    image_collection,
    reason,
    require_field,
)
from fiftyone_sdcorr.dataset.progress import ProgressArg
from fiftyone_sdcorr.dataset.units import Unit, Units, patches_field_of

logger = logging.getLogger(__name__)

FUNCTION = "compute_fused_features"
LOCKS_DIR = "_locks"
LOG_DIR = "_log"
COUNTS = ("total", "computed", "recovered", "skipped", "busy")


@flat_keywords(COMPUTE_FEATURE_PARAMS)
def compute_fused_features(
    samples,
    sd_model: Optional[str] = None,
    dino_model: Optional[str] = None,
    *,
    features=None,
    patches_field: Optional[str] = None,
    overwrite: Optional[bool] = None,
    brain_key: Optional[str] = None,
    progress: ProgressArg = None,
) -> RunSummary:
    """Computes dense features of a method for the image samples of ``samples``, or for
    their objects (``patches_field``, or a ``to_patches()`` view).

    Args (``None`` = the default of :class:`~fiftyone_sdcorr.dataset.config.FeatureConfig`):
        samples: a FiftyOne dataset or view of images
        sd_model, dino_model: Hub ids or local directories (also accepted in ``features``)
        features: a :class:`FeatureConfig` or a dict of its build keywords:

            - ``method``: ``"sd-dino"`` (the paper, default) or ``"dino-diy"`` (DIY-SC's
              adapter on DINOv2, no SD); ``adapter``: its weights (default: shipped)
            - ``extractor``: any Describer (``.describe(images)``, ``.config()``); a
              ``FeatureExtractor`` gets the store's fixed projection
            - ``preset``, ``recipe``, ``pca_dim``: the recipe (:class:`fiftyone_sdcorr.Recipe`
              fields; ``pca_dim``: channels kept per SD tap)
            - ``batch_size``, ``device``, ``dtype``: how the models run
            - ``store_dir`` (default ``default_store_root()/<dataset id>``), ``store_dtype``
              (``"float16"``, ``"bfloat16"``, ``"float32"``, ``"int8"``),
              ``projection_samples`` (images the fixed projection is fitted on, once per
              namespace)
            - ``embedding_field``, ``features_field``: the output fields
              (``<features_field>_error`` too)
            - ``prompt_field``: a field naming each sample's object for a ``{label}``
              prompt template (objects: their own label when no field is given)

            Each may also be given as its own keyword (one documented shim,
            :func:`~fiftyone_sdcorr.dataset.config.flat_keywords`).
        patches_field: a ``fo.Detections`` field: features per object (its box grown by the
            recipe's ``context_margin``), stored per label id, the embedding, path and error
            as attributes of each detection (:mod:`fiftyone_sdcorr.dataset.units`)
        overwrite: recompute samples that have features, and allow output fields that
            hold something else (another configuration's features, a user's field)
        brain_key: also register the embeddings as a FiftyOne similarity index (a brain
            run, sklearn backend) under this key: the App's similarity search,
            ``sort_by_similarity`` and the match panel's reference ranking use it; a
            similarity run of this key over the same embeddings is rebuilt
        progress: ``True``/``False``/``None`` (None: FiftyOne's setting) or a callable
            ``progress(fraction, label)``

    Returns:
        a :class:`RunSummary`: ``total``, ``computed``, ``recovered``, ``skipped``,
        ``busy``, ``failed``, ``errors``, ``warnings``, ``store_dir`` (the namespace),
        ``fingerprint``, ``projection``, ``worker``
    """
    # 1. check every parameter and field before anything loads or is written
    given = merge_features(features, dict(sd_model=sd_model, dino_model=dino_model), COMPUTE_FEATURE_PARAMS)
    cfg = FeatureConfig.build(**given, objects=patches_field_of(samples, patches_field) is not None)
    image_collection(samples)
    job = FeatureJob(samples, cfg, check_bool("overwrite", False if overwrite is None else overwrite),
                     Units(samples, patches_field))
    job.check()
    check_brain_key(samples, brain_key, job.units, cfg.embedding_field)
    checks_done()
    return _compute(job, brain_key, progress)


def _compute(job: "FeatureJob", brain_key: Optional[str], progress) -> RunSummary:
    """The run after its checks: store, plan, claimed batches, the similarity index."""
    samples, cfg = job.samples, job.cfg
    # 2. the store namespace of this configuration and its projection, if fitted
    job.open_store()
    # 3. what is done, what is not an image, what is pending
    pending = job.plan()
    # 4. compute the pending samples in claimed batches (the models load only if needed)
    with Run(samples, job.summary, len(job.ids), progress, job.units.what, cfg.error_field, job.units) as run:
        job.start(run)
        if pending:
            job.compute(pending, run)
    if brain_key is not None:
        job.summary["brain_key"] = similarity_index(samples, brain_key, job.units, cfg.embedding_field)
    return job.summary


class FeatureJob:
    """The steps of one ``compute_fused_features`` run (see the module docstring)."""

    def __init__(self, samples, cfg: FeatureConfig, overwrite: bool, units: Units):
        self.samples, self.dataset, self.cfg, self.overwrite = samples, samples._root_dataset, cfg, overwrite
        self.units = units
        self.fingerprint = cfg.fingerprint()
        self.record = Record(samples, FUNCTION, units.record_name(cfg.features_field), cfg.settings(), self.fingerprint,
                             options={"store_dtype": cfg.store_dtype})
        self.outputs = {
            "embedding_field": (cfg.embedding_field, "vector"),
            "features_field": (cfg.features_field, "string"),
            "features_field (its error field)": (cfg.error_field, "string"),
        }
        self.st_dtype = STORE_DTYPES[cfg.store_dtype]
        #: images -> descriptors of the configured method (models attached in :meth:`compute`)
        self.featurizer = Featurizer(cfg.extractor, settings=cfg.settings())
        self.summary = RunSummary(FUNCTION, COUNTS, fingerprint=self.fingerprint, projection=None,
                                  worker=worker_id())

    # ---- 1. checks
    def check(self) -> None:
        if self.cfg.prompt_field is not None:
            require_field(self.samples, "prompt_field", self.cfg.prompt_field, "label")
        guard_outputs(self.samples, self.outputs, {"prompt_field": self.cfg.prompt_field}, self.overwrite, self.record,
                      self.units)

    # ---- 2. store
    def open_store(self) -> None:
        self.store_dir = self.cfg.store_dir or self.recorded_store_dir()
        root = self.store_dir if self.store_dir is not None else self.cfg.store_root(self.samples)
        self.store = FeatureStore(Path(root) / self.fingerprint)
        self.store.root.mkdir(parents=True, exist_ok=True)
        self.run_start = fs_now(self.store.root / LOCKS_DIR)
        self.summary["store_dir"] = str(self.store.root)
        self.load_projection()

    def recorded_store_dir(self) -> Optional[str]:
        """Without ``store_dir``: the folder the fields' features were stored in (a rerun
        resumes there instead of computing everything again into the default folder; an
        overwrite with other settings stays in the folder the user chose for these fields,
        in its own configuration's subfolder); None for the default."""
        run = (self.record.stored or {}).get("run") or {}
        recorded = run.get("store_dir")
        if recorded and os.path.isdir(recorded):
            return str(recorded)
        return None

    def load_projection(self):
        """The namespace's fixed projection into the featurizer, when it was fitted."""
        if self.featurizer.needs_projection and self.store.has_tensors(PROJECTION_NAME):
            self.featurizer.load_projection(self.store.load_tensors(PROJECTION_NAME)[0])
            self.summary["projection"] = str(self.store.tensors_path(PROJECTION_NAME))
        return self.featurizer.projection

    @property
    def file_fingerprint(self) -> str:
        """What each stored file carries (:meth:`Featurizer.file_fingerprint
        <fiftyone_sdcorr.core.features.featurizer.Featurizer.file_fingerprint>`)."""
        return self.featurizer.file_fingerprint(self.fingerprint)

    def is_done(self, sid: str, emb, fpath) -> bool:
        return self._recorded(sid, emb, fpath) and self.store.check(fpath, self.file_fingerprint) is None

    def _recorded(self, sid: str, emb, fpath) -> bool:
        """The database values point at this sample's file in this namespace."""
        return emb is not None and fpath is not None and str(fpath) == str(self.store.path_for(sid))

    # ---- 3. plan
    def plan(self) -> List[Tuple[str, Unit]]:
        """``[(unit id, unit)]`` still to compute (:mod:`.units`: samples or objects)."""
        cfg, units = self.cfg, self.units.units()
        self.ids = [u.id for u in units]
        embs = self.units.values(cfg.embedding_field)
        feats = self.units.values(cfg.features_field)
        self.summary["total"] = len(self.ids)
        self.not_images: Dict[str, str] = {}
        pending = []
        for u, emb, fpath in zip(units, embs, feats):
            if not self.overwrite and self.is_done(u.id, emb, fpath):
                self.summary.add("skipped")
            elif (why := _not_an_image(u.filepath)) is not None:
                self.not_images[u.id] = why
            else:
                pending.append((u.id, u))
        self.prompt_labels = self._prompt_labels(units)
        return pending

    def _prompt_labels(self, units) -> Optional[Dict[str, Optional[str]]]:
        if self.cfg.prompt_field is not None:
            by_sample = dict(zip(self.units.samples.values("id"),
                                 map(label_of, self.units.samples.values(self.cfg.prompt_field))))
            return {u.id: by_sample.get(u.sample_id) for u in units}
        if self.units.objects and "{label}" in self.cfg.recipe.prompt:
            return {u.id: u.label for u in units}
        return None

    # ---- 4. compute
    def start(self, run: Run) -> None:
        """Records this configuration on the outputs, then declares them (in this order,
        so a worker starting at the same time sees a resume, not a clash); records
        non-images."""
        cfg = self.cfg
        self.record.write([cfg.embedding_field, cfg.features_field, cfg.error_field], run={
            "preset": cfg.preset, "device": cfg.device, "dtype": cfg.dtype, "batch_size": cfg.batch_size,
            "store_dir": self.store_dir, "store_dtype": cfg.store_dtype, "features_field": cfg.features_field,
            "embedding_field": cfg.embedding_field, "adapter": cfg.adapter})
        declare_outputs(self.samples, self.outputs, self.units)
        if self.summary["skipped"]:
            run.step(self.summary["skipped"], f"{self.summary['skipped']} already done")
        for sid, why in self.not_images.items():
            run.fail(sid, why)
        if self.not_images:
            run.step(len(self.not_images), f"{len(self.not_images)} non-image samples")

    def compute(self, pending: List[Tuple[str, str]], run: Run) -> None:
        """Claimed batches through :func:`fiftyone_sdcorr.core.features.pipeline.pipelined`: batch
        k+1 is claimed, loaded and queued on the GPU before batch k is stored and written
        (:meth:`end_batch`), so host work overlaps the models. Extractors without
        ``prepare``/``run_prepared`` run batch by batch (:meth:`describe`)."""
        self.extractor = self.cfg.make_extractor()
        self.featurizer.attach(self.extractor)
        self.pipelined = self.featurizer.pipelined
        if callable(getattr(self.extractor, "plan_run", None)):
            self.summary["compiled"] = bool(self.extractor.plan_run(len(pending)))
        log_path = self.store.root / LOG_DIR / f"{self.summary['worker']}.jsonl"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as self.log, \
                ThreadPoolExecutor(PREP_THREADS, thread_name_prefix="sdcorr-load") as self.loader:
            queue = list(pending)
            if self.featurizer.needs_projection and self.featurizer.projection is None:
                queue = self.fit_projection(queue, run)
            started: List[dict] = []  # batches whose claims are held
            try:
                batches = self.batches(queue, run, started)
                done = pipelined(self.featurizer, batches, self.st_dtype) if self.pipelined \
                    else ((b, None) for b, _, _ in batches)
                for batch, got in done:
                    self.end_batch(batch, got, run)
                    started.remove(batch)
            finally:
                for batch in started:  # stopped by an error: no claim stays held
                    for _, _, lock in batch["claimed"]:
                        lock.release()

    def batches(self, queue, run: Run, started: List[dict]):
        """Claimed batches as ``(batch, images, labels)`` (see :meth:`start_batch`)."""
        while queue:
            claimed, queue = self.claim(queue, self.batch_size(), run)
            if claimed:
                batch = self.start_batch(claimed, run)
                started.append(batch)
                loaded = batch["loaded"]
                yield batch, [im for _, _, im in loaded], self._labels([sid for sid, _, _ in loaded])

    def batch_size(self) -> int:
        """Images per claimed batch: the extractor's (it halves on CUDA out-of-memory)."""
        return int(getattr(self.extractor, "batch_size", None) or self.cfg.batch_size or 1)

    def claim(self, queue, size: int, run: Run):
        """Up to ``size`` samples this worker could lock, and the rest of the queue."""
        claimed, i = [], 0
        while i < len(queue) and len(claimed) < size:
            sid, fp = queue[i]
            i += 1
            lock = SampleLock(self.store.root / LOCKS_DIR / self.store.path_for(sid).parent.name / f"{sid}.lock")
            if lock.try_acquire():
                claimed.append((sid, fp, lock))
            else:
                self.summary.add("busy")
                run.step(1, f"{sid}: claimed by another worker")
        return claimed, queue[i:]

    def fit_projection(self, queue, run: Run):
        """Fits the namespace's projection on the first loadable pending images (once, under
        a lock), then fuses and stores those images from the same raw maps."""
        with exclusive(self.store.tensors_path(PROJECTION_NAME).with_suffix(".lock")):
            if self.load_projection() is not None:  # another worker fitted it meanwhile
                return queue
            run.step(0, "fixed projection (fitted once per store namespace)")
            claimed, loaded = [], []
            while not loaded and queue:  # the first claimed batch with a loadable image
                more, queue = self.claim(queue, self.cfg.projection_samples, run)
                claimed += more
                loaded = self.load_images(more, run)
            try:
                if loaded:
                    sids = [sid for sid, _, _ in loaded]
                    raws = self.featurizer.extract([im for _, _, im in loaded], self._labels(sids))
                    self.store.save_tensors(PROJECTION_NAME, self.featurizer.fit(raws).state_dict(), metadata={
                        "settings": self.cfg.settings(), "fingerprint": self.fingerprint,
                        "fitted_on": sids, "fitted_at": time.time()})
                    self.summary["projection"] = str(self.store.tensors_path(PROJECTION_NAME))
                    self.finish(claimed, dict(zip(sids, self.featurizer.fuse(raws))), run)
            finally:
                for _, _, lock in claimed:
                    lock.release()
        return queue

    def start_batch(self, claimed, run: Run) -> dict:
        """Re-checks each claimed sample under its lock and loads the rest (computed here
        for extractors outside the pipeline)."""
        fresh = self._db_state([sid for sid, _, _ in claimed])
        todo, results = [], {}
        for sid, fp, lock in claimed:
            emb, fpath = fresh.get(sid, (None, None))
            path = self.store.path_for(sid)
            fresh_file = path.exists() and (not self.overwrite or path.stat().st_mtime >= self.run_start)
            if fresh_file and self.store.check(path, self.file_fingerprint) is None:
                if self._recorded(sid, emb, fpath):  # the file was just checked: done
                    self.summary.add("skipped")
                    run.step(1, f"{sid}: done by another worker")
                else:  # a store file without database values: recovered, no model run
                    results[sid] = self.store.load(path)
                    self.summary.add("recovered")
                    self._log(sid, "recovered")
            elif lock.failed_since(self.run_start) is not None:
                self.summary.add("busy")
                run.step(1, f"{sid}: failed in another worker")
            else:
                todo.append((sid, fp, lock))
        batch = {"claimed": claimed, "results": results, "recovered": set(results)}
        batch["loaded"] = self.load_images(todo, run)
        if not self.pipelined:
            results.update(self.describe(batch["loaded"], run))
        return batch

    def end_batch(self, batch: dict, got, run: Run) -> None:
        """Stores and writes a started batch, releases its claims. ``got``: the pipeline's
        encoded features of the loaded images, or the exception that stopped them (then
        they are computed here, image by image where needed); ``None`` when
        :meth:`start_batch` computed them."""
        try:
            results = batch["results"]
            if isinstance(got, Exception):
                logger.warning("batch failed on the device (%s); computing it image by image", reason(got))
                results.update(self.describe(batch["loaded"], run))
            elif got is not None:
                results.update(zip([sid for sid, _, _ in batch["loaded"]], got))
            self.finish(batch["claimed"], results, run, batch["recovered"])
        finally:
            for _, _, lock in batch["claimed"]:
                lock.release()

    def load_images(self, claimed, run: Run):
        """Decodes the claimed images on the loader threads; one that cannot be read fails alone."""
        loaded = []
        margin = self.cfg.recipe.context_margin
        for (sid, u, lock), got in zip(claimed, self.loader.map(lambda c: _try_load(c[1], margin), claimed)):
            if isinstance(got, Exception):  # ImageLoadError names the file
                why = str(got) if u.filepath in str(got) else f"cannot load image {u.filepath}: {reason(got)}"
                self._failed(sid, lock, why if not u.is_object else f"object {u.id} ({u.label}): {why}", run)
            else:
                loaded.append((sid, u, got))
        return loaded

    def describe(self, loaded, run: Run) -> Dict[str, FusedFeatures]:
        """Fused features of loaded images; a failing batch is retried image by image so
        that one bad sample fails alone (:meth:`Featurizer.describe_each
        <fiftyone_sdcorr.core.features.featurizer.Featurizer.describe_each>`)."""
        if not loaded:
            return {}
        sids = [sid for sid, _, _ in loaded]
        got = self.featurizer.describe_each([im for _, _, im in loaded], self._labels(sids))
        out = {}
        for (sid, fp, _), f in zip(loaded, got):
            if isinstance(f, Exception):
                run.fail(sid, f"feature computation failed for {_where(fp)}: {reason(f)}")
                run.step(1)
                self._log(sid, "failed", reason=reason(f))
            else:
                out[sid] = f
        return out

    def _labels(self, sids) -> Optional[List[Optional[str]]]:
        return None if self.prompt_labels is None else [self.prompt_labels.get(s) for s in sids]

    def finish(self, claimed, results: Dict[str, FusedFeatures], run: Run, recovered=frozenset()) -> None:
        """Stores new features, writes the fields in bulk, marks the samples ok."""
        embs, paths = {}, {}
        by_id = {sid: (fp, lock) for sid, fp, lock in claimed}
        for sid, fused in results.items():
            fp, lock = by_id[sid]
            path = self.store.path_for(sid)
            try:
                encoded = fused if isinstance(fused, EncodedFeatures) else None
                if sid not in recovered:
                    self.store.save(sid, fused if encoded is None else encoded.fused, dtype=self.st_dtype,
                                    fingerprint=self.file_fingerprint,
                                    encoded=None if encoded is None else encoded.tensors)
                    self.summary.add("computed")
                    self._log(sid, "computed")
                embs[sid] = self._embedding(fused) if encoded is None else encoded.embedding.numpy()
                paths[sid] = str(path)
            except Exception as e:  # noqa: BLE001
                self._failed(sid, lock, f"could not store the features of {_where(fp)}: {reason(e)}", run)
        run.write(self.cfg.embedding_field, embs)
        run.write(self.cfg.features_field, paths)
        for sid in embs:
            run.ok(sid)
            by_id[sid][1].release(remove=True)
        run.flush_errors()
        if embs:
            run.step(len(embs))

    def _failed(self, sid: str, lock: SampleLock, why: str, run: Run) -> None:
        try:
            lock.record_failure(why)
        except OSError:
            pass
        run.fail(sid, why)
        run.step(1)
        self._log(sid, "failed", reason=why)

    def _db_state(self, sids: List[str]) -> Dict[str, Tuple[Any, Any]]:
        return self.units.fresh(sids, [self.cfg.embedding_field, self.cfg.features_field])

    def _embedding(self, fused: FusedFeatures) -> np.ndarray:
        """The embedding of the stored (dtype-rounded) values, as the pipeline makes it."""
        tensors = encode(fused.descriptors.detach().cpu(), self.st_dtype)
        return stored_embedding(fused, tensors).numpy().astype(np.float32)

    def _log(self, sid: str, event: str, **kw) -> None:
        self.log.write(json.dumps({"id": sid, "event": event, "worker": self.summary["worker"],
                                   "t": time.time(), **kw}) + "\n")
        self.log.flush()


def check_brain_key(samples, brain_key: Optional[str], units: Units, embedding_field: str) -> None:
    """A brain key that is free, or a similarity run over the same embeddings (rebuilt)."""
    if brain_key is None:
        return
    check_field_name("brain_key", brain_key)
    root = samples._root_dataset
    if brain_key in root.list_brain_runs():
        cfg = root.get_brain_info(brain_key).config
        same = getattr(cfg, "embeddings_field", None) == embedding_field and \
            getattr(cfg, "patches_field", None) == units.patches_field
        if not same:
            raise ParameterError(f"parameter 'brain_key': {brain_key!r} is another brain run of this dataset; "
                                 "choose another key")
    elif brain_key in root.list_evaluations() + root.list_runs():
        raise ParameterError(f"parameter 'brain_key': {brain_key!r} is the key of another run")


def similarity_index(samples, brain_key: str, units: Units, embedding_field: str) -> str:
    """The embeddings as a FiftyOne similarity index (``fiftyone.brain.compute_similarity``)."""
    import fiftyone.brain as fob

    root = samples._root_dataset
    if brain_key in root.list_brain_runs():
        root.delete_brain_run(brain_key)
    fob.compute_similarity(units.samples, patches_field=units.patches_field, embeddings=embedding_field,
                           brain_key=brain_key, backend="sklearn", progress=False)
    return brain_key


def label_of(value) -> Optional[str]:
    """The object name a prompt field holds: a string, ``label.label`` or the most common
    label of a label list (Detections, Keypoints, Classifications, ...)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if getattr(value, "label", None):
        return str(value.label)
    items = getattr(value, getattr(value, "_LABEL_LIST_FIELD", "") or "", None)
    names = [str(x.label) for x in (items or []) if getattr(x, "label", None)]
    return max(set(names), key=names.count) if names else None


def _try_load(unit: Unit, margin: float):
    try:
        return unit.load(margin)
    except Exception as e:  # noqa: BLE001 -- reported per sample by the caller
        return e


def _where(unit: Unit) -> str:
    """A unit in messages: its image, or which object of which image."""
    return f"object {unit.id} ({unit.label}) of {unit.filepath}" if unit.is_object else unit.filepath


def _not_an_image(filepath: str) -> Optional[str]:
    # unknown extensions go to the image loader, which says what is wrong with the file
    media = fom.get_media_type(filepath)
    if media not in (fom.IMAGE, getattr(fom, "UNKNOWN", "unknown")):
        return f"not an image: {filepath} has media type {media!r} (only images are supported)"
    return None


__all__ = ["compute_fused_features", "FeatureJob", "label_of", "check_brain_key", "similarity_index", "FUNCTION",
           "PROJECTION_NAME"]
