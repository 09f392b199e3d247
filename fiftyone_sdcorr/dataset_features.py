"""Dataset-level feature computation: fused SD + DINOv2 features for a FiftyOne collection.

:func:`compute_fused_features` writes, for each image sample,

- ``embedding_field`` (default ``sdcorr_embedding``): the pooled global fused vector
  (float32, unit norm) -- a plain vector field that ``fiftyone.brain.compute_similarity(
  ..., embeddings="sdcorr_embedding")`` and ``compute_visualization`` accept as is;
- ``features_field`` (default ``sdcorr_features``): the path of the sample's dense fused
  maps in the feature store (one safetensors file per sample, fp16 by default);
- ``sdcorr_error``: ``None`` on success, else the reason (naming the file) the sample
  failed. No other field is ever written.

Store layout (see :mod:`fiftyone_sdcorr.store`): ``<store>/<shard>/<sample id>.safetensors``,
the fixed projection in ``<store>/_tensors/projection.safetensors`` (with the extractor
config in its metadata), per-sample lock files in ``<store>/_locks/`` and one compute log
per worker run in ``<store>/_log/<worker>.jsonl`` (one JSON line per sample computed,
recovered or failed).

Several workers on one dataset (e.g. several delegated-operation executors, on one host
or several hosts sharing the store's filesystem) split the work without duplicates:

- **claims are per-sample exclusive, non-blocking ``flock`` locks** on
  ``<store>/_locks/<shard>/<id>.lock``. A worker that cannot take a sample's lock skips it
  (another worker is on it). The kernel releases the lock when the holder dies, so a
  killed worker leaves no stale claim: a rerun simply picks its samples up.
- **under the lock the state is re-read** (fresh database values + the store file): a
  sample done in the meantime is skipped; a store file without database values (a worker
  killed between the two writes) is *recovered* from the file, without running the
  models; a sample another worker failed since this run started (the lock file holds the
  reason) is not retried in this run.
- the lock is held until the sample's database values are written, and is removed on
  success.
- ``overwrite=True`` recomputes files older than the start of this run (judged by the
  store filesystem's clock), so concurrent overwriting workers still split the work.
- the fixed projection is fitted once per store, under an exclusive lock
  (``_tensors/projection.lock``); later runs and other workers load it, and a run whose
  extractor config differs from the stored one fails with a clear error unless
  ``overwrite``.

The store must be on a filesystem with working ``flock`` (local disks, NFSv4, most
cluster filesystems) and all workers must use the same ``store_dir``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import fiftyone as fo
import fiftyone.core.media as fom

from fiftyone_sdcorr.features import FixedProjection, FusedFeatures, fuse_raw
from fiftyone_sdcorr.images import ImageLoadError, load_image
from fiftyone_sdcorr.models import DEFAULT_DINO_MODEL, DEFAULT_SD_MODEL, resolve_dtype
from fiftyone_sdcorr.progress import Progress, ProgressArg
from fiftyone_sdcorr.store import FeatureStore, default_store_root

logger = logging.getLogger(__name__)

ERROR_FIELD = "sdcorr_error"
PROJECTION_NAME = "projection"
LOCKS_DIR = "_locks"
LOG_DIR = "_log"
#: at most this many reasons in the returned summary (all of them are in the sample field)
MAX_SUMMARY_ERRORS = 100



# --------------------------------------------------------------------------- helpers
def default_store_dir(samples) -> str:
    """``default_store_root()/<dataset id>`` (the id, not the name: survives renames)."""
    return os.path.join(default_store_root(), str(samples._root_dataset._doc.id))


def worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _fs_now(directory: Path) -> float:
    """The store filesystem's current time (mtime of a fresh file), for mtime comparisons."""
    directory.mkdir(parents=True, exist_ok=True)
    p = directory / f".now-{uuid.uuid4().hex}"
    with open(p, "w"):
        pass
    try:
        return p.stat().st_mtime
    finally:
        p.unlink()


@contextmanager
def _exclusive(path: Path):
    """Blocking exclusive flock on ``path`` (created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class _SampleLock:
    """Non-blocking per-sample claim (flock on a lock file in the store)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: Optional[int] = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return False
                raise
            # the file may have been unlinked (sample finished) between open and flock:
            # then this lock guards nothing; retry on the current file
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return True
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def failed_since(self, t0: float) -> Optional[str]:
        """The failure reason another worker recorded after ``t0``, if any."""
        st = os.fstat(self.fd)
        if st.st_size == 0 or st.st_mtime < t0:
            return None
        os.lseek(self.fd, 0, os.SEEK_SET)
        return os.read(self.fd, st.st_size).decode("utf-8", "replace") or None

    def record_failure(self, reason: str) -> None:
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, reason.encode("utf-8"))

    def release(self, remove: bool = False) -> None:
        if self.fd is None:
            return
        try:
            if remove:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None


# --------------------------------------------------------------------------- fields
def _ensure_fields(dataset, embedding_field: str, features_field: str) -> None:
    wanted = {
        embedding_field: fo.VectorField,
        features_field: fo.StringField,
        ERROR_FIELD: fo.StringField,
    }
    if len(set(wanted)) != 3:
        raise ValueError(
            f"embedding_field, features_field and {ERROR_FIELD!r} must differ, got "
            f"{embedding_field!r}, {features_field!r}"
        )
    schema = dataset.get_field_schema()
    for name, ftype in wanted.items():
        if "." in name or name.startswith("_") or name in ("id", "filepath", "tags", "metadata"):
            raise ValueError(f"invalid output field name {name!r}")
        if name in schema:
            have = schema[name]
            ok = isinstance(have, ftype) or (ftype is fo.VectorField and isinstance(have, fo.ArrayField))
            if not ok:
                raise ValueError(
                    f"field {name!r} already exists as {type(have).__name__}; "
                    f"choose another field name (it needs a {ftype.__name__})"
                )
            continue
        try:
            dataset.add_sample_field(name, ftype)
        except ValueError:
            # another worker added it at the same time
            dataset.reload()
            if name not in dataset.get_field_schema():
                raise


# --------------------------------------------------------------------------- projection
def _projection_config(describer, dim: int) -> dict:
    return {"extractor": describer.config(), "projection_dim": int(dim)}


def fit_or_load_projection(
    store: FeatureStore,
    extractor,
    images: Callable[[], Sequence[Tuple[str, Any]]],
    dim: int = 256,
    overwrite: bool = False,
) -> Tuple[FixedProjection, Path]:
    """The store's fixed projection: loaded if present (its config must match), else
    fitted on ``images()`` -- a list of ``(name, image)`` -- under an exclusive lock so
    concurrent workers fit it once."""
    want = _projection_config(extractor, dim)
    path = store.tensors_path(PROJECTION_NAME)
    with _exclusive(path.with_suffix(".lock")):
        if store.has_tensors(PROJECTION_NAME):
            tensors, meta = store.load_tensors(PROJECTION_NAME)
            have = {k: meta.get(k) for k in want}
            if have == want:
                return FixedProjection.from_state_dict(tensors), path
            if not overwrite:
                diff = _config_diff(have, want)
                raise ValueError(
                    f"the feature store {store.root} holds features computed with another "
                    f"configuration ({diff}); pass overwrite=True to recompute every sample, "
                    "or use another store_dir"
                )
            logger.warning("refitting the projection of %s (configuration changed)", store.root)
        pairs = list(images())
        if not pairs:
            raise ValueError("no loadable image to fit the fixed projection on")
        used = [name for name, _ in pairs]
        labels_of = getattr(images, "labels", None)  # prompt labels, when prompts are per sample
        labels = labels_of(used) if labels_of else None
        ims = [im for _, im in pairs]
        raws = extractor.extract(ims, labels=labels) if labels else extractor.extract(ims)
        sd_maps = [raw.sd for raw in raws]
        proj = FixedProjection.fit(sd_maps, dim=dim)
        # a tap keeps min(dim, channels, tokens) directions; only too few tokens is fixable
        short = {
            t: int(v.shape[1]) for t, v in proj.components.items()
            if v.shape[1] < min(dim, int(v.shape[0]))
        }
        if short:
            logger.warning(
                "fixed projection keeps fewer than %d channels for %s (too few tokens in %d "
                "fitting images); use more projection_samples or larger inputs", dim, short, len(used))
        store.save_tensors(
            PROJECTION_NAME, proj.state_dict(),
            metadata={**want, "fitted_on": used, "fitted_at": time.time()},
        )
        return proj, path


def _config_diff(have: dict, want: dict) -> str:
    h = {**(have.get("extractor") or {}), "projection_dim": have.get("projection_dim")}
    w = {**(want.get("extractor") or {}), "projection_dim": want.get("projection_dim")}
    keys = sorted(k for k in set(h) | set(w) if h.get(k) != w.get(k))
    return ", ".join(f"{k}: stored {h.get(k)!r} vs requested {w.get(k)!r}" for k in keys) or "unknown"


# --------------------------------------------------------------------------- main
def compute_fused_features(
    samples,
    sd_model: str = DEFAULT_SD_MODEL,
    dino_model: str = DEFAULT_DINO_MODEL,
    *,
    extractor=None,
    embedding_field: str = "sdcorr_embedding",
    features_field: str = "sdcorr_features",
    store_dir=None,
    store_dtype="float16",
    projection_dim: int = 256,
    projection_samples: int = 16,
    preset: str = "paper",
    recipe: Optional[dict] = None,
    batch_size: Optional[int] = None,
    device=None,
    dtype=None,
    overwrite: bool = False,
    prompt_field: Optional[str] = None,
    progress: ProgressArg = True,
) -> Dict[str, Any]:
    """Computes fused SD + DINOv2 features for the image samples of ``samples``.

    Args:
        samples: a FiftyOne dataset or view of images
        sd_model, dino_model: Hub ids or local directories (ignored with ``extractor``)
        extractor: any Describer-like object (``.describe(images)`` and ``.config()``);
            a :class:`fiftyone_sdcorr.FeatureExtractor` (anything with ``.extract``) gets
            the store's fixed projection. Default: a ``FeatureExtractor`` built from the
            model arguments, ``preset``, ``recipe``, ``batch_size``, ``device``, ``dtype``
        embedding_field: vector field for the pooled global vector
        features_field: string field for the path of the dense maps in the store
        store_dir: feature store folder (default ``default_store_root()/<dataset id>``)
        store_dtype: dtype of the stored maps (``"float16"``, ``"bfloat16"``, ``"float32"``)
        projection_dim: channels kept per SD tap by the fixed projection (smaller = a
            smaller store); for a ``FeatureExtractor`` built here it is also the recipe's
            ``pca_dim``
        projection_samples: number of images the projection is fitted on (once per store)
        preset, recipe: the feature recipe (see :class:`fiftyone_sdcorr.Recipe`)
        batch_size: images per forward pass (CUDA out-of-memory halves it)
        overwrite: recompute samples that already have features
        prompt_field: a field naming each sample's object for a prompt template with
            ``{label}`` (e.g. ``recipe={"prompt": "a photo of a {label}"}``): a string
            field, a label with ``.label`` (``fo.Classification``), or a label list
            (``fo.Detections``, ``fo.Keypoints``, ...: its most common label). Samples with
            no label get the empty prompt. The fixed projection is fitted with the same
            prompts.
        progress: ``True``/``False``/``None`` for a FiftyOne progress bar, or a callable
            ``progress(fraction, label)``

    Returns:
        a dict: ``computed``, ``recovered`` (DB values restored from an existing store
        file), ``skipped`` (already done), ``busy`` (claimed by another worker),
        ``failed``, ``errors`` (sample id -> reason, the first 100; every reason is in the
        ``sdcorr_error`` field), ``total``, ``store_dir``,
        ``projection`` (path or ``None``), ``worker``
    """
    dataset = samples._root_dataset
    if samples.media_type == fom.GROUP:
        raise ValueError("grouped collections are not supported: select a slice first "
                         "(e.g. samples.select_group_slices('left'))")
    st_dtype = resolve_dtype(store_dtype) or torch.float16
    root = store_dir if store_dir is not None else default_store_dir(samples)
    store = FeatureStore(os.path.abspath(os.path.expanduser(str(root))))
    store.root.mkdir(parents=True, exist_ok=True)
    _ensure_fields(dataset, embedding_field, features_field)
    run_start = _fs_now(store.root / LOCKS_DIR)
    wid = worker_id()

    ids, paths, embs, feats = samples.values(["id", "filepath", embedding_field, features_field])
    prompt_labels = _prompt_labels(samples, ids, prompt_field, extractor, recipe)
    total = len(ids)
    pending, skipped, not_images = [], 0, {}
    for sid, fp, emb, fpath in zip(ids, paths, embs, feats):
        if not overwrite and _is_done(store, sid, emb, fpath):
            skipped += 1
            continue
        reason = _precheck(fp)
        if reason is not None:  # deterministic: recorded without a claim or a model
            not_images[sid] = reason
        else:
            pending.append((sid, fp))

    summary = dict(total=total, computed=0, recovered=0, skipped=skipped, busy=0, failed=0,
                   errors={}, store_dir=str(store.root), projection=None, worker=wid)
    pbar = Progress(progress, total, "samples")
    try:
        if skipped:
            pbar.update(skipped, f"{skipped} already done")
        if not_images:
            dataset.set_values(ERROR_FIELD, not_images, key_field="id")
            summary["failed"] += len(not_images)
            summary["errors"].update(list(not_images.items())[:MAX_SUMMARY_ERRORS])
            pbar.update(len(not_images), f"{len(not_images)} non-image samples")
        if not pending:
            return summary

        owns_extractor = extractor is None
        if owns_extractor:
            from fiftyone_sdcorr.extractor import FeatureExtractor

            rec = dict(recipe or {})
            rec.setdefault("pca_dim", int(projection_dim))
            extractor = FeatureExtractor(sd_model, dino_model, device=device, dtype=dtype,
                                         batch_size=batch_size, preset=preset, **rec)
        has_extract = callable(getattr(extractor, "extract", None))
        projection = None
        if has_extract:
            def fit_images():
                out = []
                for sid, fp in zip(ids, paths):
                    if len(out) >= max(1, int(projection_samples)):
                        break
                    if _precheck(fp) is not None:
                        continue
                    try:
                        out.append((sid, load_image(fp)))
                    except ImageLoadError:
                        continue
                return out

            if prompt_labels is not None:  # the projection sees the prompts the features use
                fit_images.labels = lambda names: [prompt_labels.get(n) for n in names]

            pbar.update(0, "fixed projection (fitted once per store)")
            projection, ppath = fit_or_load_projection(
                store, extractor, fit_images, dim=int(projection_dim), overwrite=overwrite)
            summary["projection"] = str(ppath)
        config = extractor.config()

        chunk = int(batch_size or getattr(extractor, "batch_size", None) or 1)
        log_path = store.root / LOG_DIR / f"{wid}.jsonl"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as log:
            runner = _Runner(samples, dataset, store, extractor, projection, config, st_dtype,
                             embedding_field, features_field, overwrite, run_start, log,
                             summary, pbar, prompt_labels)
            i = 0
            while i < len(pending):
                claimed = []
                while i < len(pending) and len(claimed) < chunk:
                    sid, fp = pending[i]
                    i += 1
                    lock = _SampleLock(_lock_path(store, sid))
                    if lock.try_acquire():
                        claimed.append((sid, fp, lock))
                    else:
                        summary["busy"] += 1
                        pbar.update(1, f"{sid}: claimed by another worker")
                if claimed:
                    runner.run_batch(claimed)
        return summary
    finally:
        pbar.close()


def _lock_path(store: FeatureStore, sid: str) -> Path:
    p = store.path_for(sid)
    return store.root / LOCKS_DIR / p.parent.name / f"{sid}.lock"


def _is_done(store: FeatureStore, sid: str, emb, fpath) -> bool:
    return (
        emb is not None
        and fpath is not None
        and str(fpath) == str(store.path_for(sid))
        and os.path.isfile(fpath)
    )


class _Runner:
    """Processes claimed batches: re-check under the lock, compute, write, release."""

    def __init__(self, samples, dataset, store, extractor, projection, config, st_dtype,
                 embedding_field, features_field, overwrite, run_start, log, summary, pbar,
                 prompt_labels=None):
        self.samples, self.dataset, self.store = samples, dataset, store
        self.extractor, self.projection, self.config = extractor, projection, config
        self.st_dtype = st_dtype
        self.emb_field, self.feat_field = embedding_field, features_field
        self.overwrite, self.run_start = overwrite, run_start
        self.log, self.summary, self.pbar = log, summary, pbar
        self.alpha = float(getattr(getattr(extractor, "recipe", None), "alpha", 0.5))
        self.prompt_labels = prompt_labels  # sample id -> label for the prompt, or None

    # ---- bookkeeping
    def _log(self, sid: str, event: str, **kw):
        self.log.write(json.dumps({"id": sid, "event": event, "worker": self.summary["worker"],
                                   "t": time.time(), **kw}) + "\n")
        self.log.flush()

    def _fresh_file(self, path: Path) -> bool:
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        return (not self.overwrite) or st.st_mtime >= self.run_start

    def run_batch(self, claimed: List[Tuple[str, str, _SampleLock]]) -> None:
        ok: Dict[str, Tuple[np.ndarray, str]] = {}
        errors: Dict[str, str] = {}
        done_ids: set = set()
        try:
            fresh = self._db_state([sid for sid, _, _ in claimed])
            todo = []
            for sid, fp, lock in claimed:
                path = self.store.path_for(sid)
                emb, fpath = fresh.get(sid, (None, None))
                if self._fresh_file(path):
                    if _is_done(self.store, sid, emb, fpath):
                        done_ids.add(sid)
                        self.summary["skipped"] += 1
                        self.pbar.update(1, f"{sid}: done by another worker")
                        continue
                    # store file without DB values: recover from the file (no model run)
                    try:
                        ok[sid] = (self._embedding(self.store.load(path)), str(path))
                        self.summary["recovered"] += 1
                        self._log(sid, "recovered")
                        continue
                    except Exception as e:  # corrupt file: recompute
                        logger.warning("recomputing %s: %s", sid, e)
                other = lock.failed_since(self.run_start)
                if other is not None:
                    done_ids.add(sid)
                    self.summary["busy"] += 1
                    self.pbar.update(1, f"{sid}: failed in another worker")
                    continue
                todo.append((sid, fp))
            self._compute(todo, ok, errors)
            self._write(ok, errors)
        finally:
            for sid, _, lock in claimed:
                if sid in errors:
                    try:
                        lock.record_failure(errors[sid])
                    except OSError:
                        pass
                lock.release(remove=sid in ok or sid in done_ids)
        for sid, reason in errors.items():
            self.summary["failed"] += 1
            if len(self.summary["errors"]) < MAX_SUMMARY_ERRORS:
                self.summary["errors"][sid] = reason
            self._log(sid, "failed", reason=reason)
        n_ok = len(ok)
        if n_ok or errors:
            self.pbar.update(n_ok + len(errors))

    def _db_state(self, sids: List[str]) -> Dict[str, Tuple[Any, Any]]:
        view = self.dataset.select(sids)
        ids, embs, feats = view.values(["id", self.emb_field, self.feat_field])
        return {i: (e, f) for i, e, f in zip(ids, embs, feats)}

    def _embedding(self, fused: FusedFeatures) -> np.ndarray:
        # computed from the stored (dtype-rounded) maps, so that it is the same whether a
        # sample was computed here or recovered from its file
        d = fused.descriptors.detach().to("cpu", self.st_dtype).float()
        ff = FusedFeatures(d, fused.letterbox, fused.stride, fused.sd_channels, fused.meta)
        return ff.global_vector().numpy().astype(np.float32)

    def _describe(self, images: List[Any], labels=None) -> List[FusedFeatures]:
        if self.projection is not None:
            raws = self.extractor.extract(images, labels=labels) if labels else self.extractor.extract(images)
            return [fuse_raw(r, self.projection, alpha=self.alpha, meta=self.config) for r in raws]
        return list(self.extractor.describe(images))

    def _compute(self, todo, ok, errors) -> None:
        images, keep = [], []
        for sid, fp in todo:
            try:
                images.append(load_image(fp))
                keep.append((sid, fp))
            except ImageLoadError as e:
                errors[sid] = str(e)
            except Exception as e:  # anything else the loader raises
                errors[sid] = f"Cannot load image {fp}: {e}"
        if not keep:
            return
        labels = None if self.prompt_labels is None else [self.prompt_labels.get(sid) for sid, _ in keep]
        try:
            results = self._describe_with_oom_split(images, labels)
        except Exception as e:
            if len(keep) == 1:
                errors[keep[0][0]] = f"feature computation failed for {keep[0][1]}: {_reason(e)}"
                return
            # isolate the failing sample(s)
            for k, ((sid, fp), im) in enumerate(zip(keep, images)):
                try:
                    one = None if labels is None else [labels[k]]
                    self._save_one(sid, self._describe_with_oom_split([im], one)[0], ok)
                except Exception as e1:
                    errors[sid] = f"feature computation failed for {fp}: {_reason(e1)}"
            return
        for (sid, fp), fused in zip(keep, results):
            try:
                self._save_one(sid, fused, ok)
            except Exception as e:
                errors[sid] = f"could not store the features of {fp}: {_reason(e)}"

    def _describe_with_oom_split(self, images, labels=None):
        try:
            return self._describe(images, labels)
        except torch.cuda.OutOfMemoryError:
            if len(images) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(images) // 2
            logger.warning("CUDA out of memory on %d images; splitting the batch", len(images))
            lo, hi = (None, None) if labels is None else (labels[:half], labels[half:])
            return self._describe_with_oom_split(images[:half], lo) + self._describe_with_oom_split(images[half:], hi)

    def _save_one(self, sid: str, fused: FusedFeatures, ok) -> None:
        path = self.store.save(sid, fused, dtype=self.st_dtype)
        ok[sid] = (self._embedding(fused), str(path))
        self.summary["computed"] += 1
        self._log(sid, "computed")

    def _write(self, ok: Dict[str, Tuple[np.ndarray, str]], errors: Dict[str, str]) -> None:
        if ok:
            self.dataset.set_values(self.emb_field, {s: v[0] for s, v in ok.items()}, key_field="id")
            self.dataset.set_values(self.feat_field, {s: v[1] for s, v in ok.items()}, key_field="id")
        err = {**{s: None for s in ok}, **errors}
        if err:
            self.dataset.set_values(ERROR_FIELD, err, key_field="id")


def _label_of(value) -> Optional[str]:
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


def _prompt_labels(samples, ids, prompt_field, extractor, recipe) -> Optional[Dict[str, Optional[str]]]:
    if prompt_field is None:
        return None
    template = (recipe or {}).get("prompt") if extractor is None else getattr(
        getattr(extractor, "recipe", None), "prompt", None)
    if not template or "{label}" not in template:
        raise ValueError(
            f"prompt_field={prompt_field!r} needs a prompt template with '{{label}}', e.g. "
            "recipe={'prompt': 'a photo of a {label}'}"
        )
    if not samples._root_dataset.has_sample_field(prompt_field.split(".")[0]):
        raise ValueError(f"prompt_field {prompt_field!r} is not a field of the dataset")
    return {sid: _label_of(v) for sid, v in zip(ids, samples.values(prompt_field))}


def _precheck(filepath: str) -> Optional[str]:
    # unknown extensions go to the image loader, which says what is wrong with the file
    media = fom.get_media_type(filepath)
    if media not in (fom.IMAGE, getattr(fom, "UNKNOWN", "unknown")):
        return f"not an image: {filepath} has media type {media!r} (only images are supported)"
    return None


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


__all__ = ["compute_fused_features", "default_store_dir", "fit_or_load_projection", "ERROR_FIELD"]
