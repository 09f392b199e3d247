"""Dense features of samples for matching: stored ones first, else computed (not stored).

One source serves one run and hands out features of ONE fingerprint (the configuration
and the projection that produced them, :mod:`.compute_features`):

- the expected configuration is the one recorded on ``features_field`` by
  ``compute_fused_features``; models or a recipe given explicitly must match it (else
  :class:`ParameterError` naming the differing settings); given nothing, the recorded
  configuration is used to compute what is missing;
- a stored file is used when its header and size check out and its fingerprint is the
  run's; a file of another fingerprint is an error for that sample (never mixed);
- missing features are computed with that configuration and the projection of its store
  namespace, so they are comparable with the stored ones; with no stored projection, one
  is fitted on the first images described (the references);
- features are handed out on the matching device (``device``, else CUDA when available):
  the stored files of a batch are read concurrently into host memory and each moved to
  it once (float32 there), so propagation matches on the GPU.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

import fiftyone.core.media as fom

from fiftyone_sdcorr.core.features.featurizer import PROJECTION_NAME, Featurizer
from fiftyone_sdcorr.core.features.fusion import FusedFeatures
from fiftyone_sdcorr.core.features.methods import method_of
from fiftyone_sdcorr.core.features.models import default_device
from fiftyone_sdcorr.core.features.store import FeatureStore, FeatureStoreError, read_header
from fiftyone_sdcorr.dataset.config import FeatureConfig
from fiftyone_sdcorr.dataset.engine import ParameterError, find_record, recorded_fields, settings_difference
from fiftyone_sdcorr.dataset.units import Unit, Units

logger = logging.getLogger(__name__)

#: stored files of a batch read at once (safetensors reads release the GIL)
READ_THREADS = 8
#: keywords of the dataset functions that choose the features (device, dtype and batch size do not)
FEATURE_KEYWORDS = ("method", "adapter", "sd_model", "dino_model", "preset", "recipe", "pca_dim", "extractor")


class OtherSettingsError(FeatureStoreError):
    """Stored features of another fingerprint than the run's."""


def _check_not_a_typo(samples, features_field: Optional[str], units: Units) -> None:
    """A features field that does not exist, with no model given, on a dataset whose
    features are in other fields: most likely a typo, and computing would fetch the
    default models (about 5 GB) instead of using the stored features. Features stored per
    object (records named ``<objects field>__<attribute>``) are used by choosing that
    field as the objects (``patches_field``): naming the record as a features field
    would match whole images instead, so the advice never says so."""
    root = samples._root_dataset
    if not features_field or root.has_sample_field(units.path(features_field)):
        return
    stored = recorded_fields(root, "compute_fused_features")
    objects = sorted({name.split("__", 1)[0] for name in stored
                      if "__" in name and root.has_sample_field(name.split("__", 1)[0] + ".detections")})
    images = [name for name in stored if name.split("__", 1)[0] not in objects]
    hints = []
    if images:
        hints.append(f"this dataset's features are in {', '.join(repr(f) for f in images)} "
                     "(compute_fused_features): name that field")
    if objects and units.patches_field not in objects:
        hints.append(f"its object features are on the objects of {', '.join(repr(f) for f in objects)}: choose "
                     f"{objects[0]!r} as Objects (patches_field={objects[0]!r})")
    if hints:
        raise ParameterError(
            f"parameter 'features_field': field {features_field!r} does not exist; {'; '.join(hints)}; or give "
            f"sd_model / dino_model / preset to compute new features into {features_field!r}")


def _check_same_method(features_field: str, recorded: dict, cfg: FeatureConfig) -> None:
    """Features of one method are never matched with, or completed by, another's."""
    was, given = method_of(recorded), cfg.method
    if was != given:
        raise ParameterError(
            f"parameter 'method': the features in {features_field!r} were computed with method {was!r}, not "
            f"{given!r}; give method={was!r} (or nothing) to use them, or compute {given!r} features into another "
            "features_field")


def _recorded_config(features_field: str, record: dict, run_kw: dict) -> FeatureConfig:
    """The configuration that computed the stored features, to compute missing ones alike:
    the recorded settings, and the adapter file the run used (its path is recorded beside
    the settings, its digest in them). A configuration that no longer gives the recorded
    fingerprint (the adapter file changed or is gone) is refused naming the adapter."""
    settings = record.get("settings") or {}
    adapter = (record.get("run") or {}).get("adapter")
    adapter = adapter if adapter and os.path.isfile(adapter) else None
    cfg = FeatureConfig.from_settings(settings, adapter=adapter, **{k: v for k, v in run_kw.items() if k != "objects"})
    if cfg.adapter is None and settings.get("adapter") and cfg.fingerprint() != record.get("fingerprint"):
        raise ParameterError(
            f"parameter 'adapter': the features in {features_field!r} were computed with adapter "
            f"{settings.get('adapter')!r} ({(record.get('run') or {}).get('adapter') or 'the shipped one'}), which is "
            "not there any more; give that adapter file as adapter= to compute missing features")
    return cfg


class FeatureSource:
    """Features by sample id; see the module docstring."""

    def __init__(self, samples, features_field: Optional[str], given: Dict[str, Any], batch_size: int = 8,
                 units: Optional[Units] = None):
        """``given``: the feature keywords of the call (``None`` = not given), plus
        ``device``, ``dtype``, ``batch_size``, ``store_dir``; ``units``: images (default) or
        the objects of a ``patches_field`` (:mod:`.units`)."""
        self.samples, self.batch_size = samples, max(1, int(batch_size))
        units = units if units is not None else Units(samples)
        run_kw = {k: given.get(k) for k in ("device", "dtype", "batch_size", "store_dir")}
        run_kw["objects"] = units.objects
        explicit = any(given.get(k) is not None for k in FEATURE_KEYWORDS)
        checked = FeatureConfig.build(**{k: given.get(k) for k in FEATURE_KEYWORDS}, **run_kw)  # every keyword
        self.cfg: Optional[FeatureConfig] = checked if explicit else None
        record = find_record(samples, "compute_fused_features", units.record_name(features_field)) \
            if features_field else None
        self.config_fp: Optional[str] = None
        if record is not None:
            self.config_fp = record.get("fingerprint")
            settings = record.get("settings") or {}
            if self.cfg is not None and self.cfg.fingerprint() != self.config_fp:
                _check_same_method(features_field, settings, self.cfg)
                raise ParameterError(
                    f"parameter 'features_field': the features in {features_field!r} were computed with other "
                    f"settings ({settings_difference(settings, self.cfg.settings(), 'given')}); give the same "
                    "models and recipe, or none "
                    "to use the stored ones, or compute features with these settings into another "
                    "features_field")
            if self.cfg is None and settings.get("extractor") in ("sd+dinov2", "dinov2+adapter"):
                self.cfg = _recorded_config(features_field, record, run_kw)
            self.margin = float(settings.get("context_margin", checked.recipe.context_margin))
        elif self.cfg is None:
            _check_not_a_typo(samples, features_field, units)
            self.cfg = FeatureConfig.build(**run_kw)
        if record is None:  # the context margin of object crops computed here
            self.margin = float(self.cfg.recipe.context_margin)
        self.file_fp: Optional[str] = None  # the one fingerprint this source hands out
        self._extractor = None
        self._store: Optional[FeatureStore] = None
        self._featurizer: Optional[Featurizer] = None
        self.notes: List[str] = []  # what changes the result, for the run's warnings
        # features are handed out on the matching device: the given one, else CUDA when available
        self.device = torch.device(checked.device) if checked.device else default_device()

    def locate(self, stored_paths) -> None:
        """The store namespace (and so the projection) of the stored features, found from
        any stored path, before anything is described."""
        first = next((p for p in stored_paths if p), None)
        if first and self._store is None:
            self._store = FeatureStore(Path(first).parent.parent)

    # ---- stored features
    def check_stored(self, path: str) -> None:
        """A stored file's header, size and fingerprint (the first one accepted is the
        run's; :class:`OtherSettingsError` for another); reads the header only."""
        md, size_ok = read_header(Path(path))
        if not size_ok:
            raise FeatureStoreError(f"truncated feature file {path} (its size differs from its header)")
        self._accept(md.get("fingerprint", ""), f"stored features {path}")
        if self._store is None:  # the namespace of the stored files holds their projection
            self._store = FeatureStore(Path(path).parent.parent)

    def load_stored(self, path: str) -> FusedFeatures:
        self.check_stored(path)
        return self._to_device(self._read_host(path))

    def _read_host(self, path: str) -> FusedFeatures:
        """The file as stored (its dtype), in host memory; safetensors reads release the GIL."""
        return self._store.load(path, device="cpu", dtype=None)

    def _to_device(self, f: FusedFeatures) -> FusedFeatures:
        """Stored features on the matching device as float32, converted there (a float16
        file moves as float16)."""
        return FusedFeatures(f.descriptors.to(self.device).float(), f.letterbox, f.stride, f.sd_channels, f.meta)

    def read_stored(self, items: List[Tuple[str, str]]) -> Dict[str, Union[FusedFeatures, Exception]]:
        """``(id, stored path)`` -> id -> features on the matching device, or the error:
        headers checked in order (the first fingerprint is the run's), then the files read
        concurrently (:data:`READ_THREADS`) and moved to the device, each once."""
        found: Dict[str, Union[FusedFeatures, Exception]] = {}
        paths: Dict[str, str] = {}
        for sid, path in items:
            try:
                self.check_stored(path)
                paths[sid] = path
            except FeatureStoreError as e:
                found[sid] = e
        if len(paths) > 1:
            with ThreadPoolExecutor(min(READ_THREADS, len(paths))) as pool:
                hosts = list(pool.map(self._try_read_host, paths.values()))
        else:
            hosts = [self._try_read_host(p) for p in paths.values()]
        for sid, f in zip(paths, hosts):
            try:
                found[sid] = f if isinstance(f, Exception) else self._to_device(f)
            except Exception as e:  # noqa: BLE001 -- e.g. out of device memory: this sample only
                found[sid] = e
        return found

    def _try_read_host(self, path: str) -> Union[FusedFeatures, Exception]:
        try:
            return self._read_host(path)
        except Exception as e:  # noqa: BLE001 -- reported per sample
            return e

    def _accept(self, fp: str, what: str) -> None:
        if self.file_fp is None:
            if self.config_fp is not None and fp.split(":")[0] != self.config_fp:
                raise OtherSettingsError(f"{what} were computed with other settings (fingerprint {fp or 'none'}, "
                                        f"expected {self.config_fp})")
            self.file_fp = fp
        elif fp != self.file_fp:
            raise OtherSettingsError(f"{what} were computed with other settings (fingerprint {fp or 'none'}) than "
                                    f"the other samples' ({self.file_fp}); recompute them with compute_fused_features")

    # ---- computed features
    @property
    def extractor(self):
        if self._extractor is None:
            if self.cfg is None:
                raise ParameterError("no stored features for this sample, and the extractor that computed the "
                                     "stored ones is not known here: pass extractor=")
            self._extractor = self.cfg.make_extractor()
        return self._extractor

    @property
    def featurizer(self) -> Featurizer:
        """Computes missing features with the source's configuration (models load here),
        with the projection of the stored features' namespace once it is known."""
        if self._featurizer is None:
            self._featurizer = Featurizer(self.extractor, settings=self.cfg.settings())
        fz = self._featurizer
        if fz.needs_projection and fz.projection is None and self._store is not None \
                and self._store.has_tensors(PROJECTION_NAME):
            fz.load_projection(self._store.load_tensors(PROJECTION_NAME)[0])
        return fz

    def describe(self, images: List[Any]) -> List[FusedFeatures]:
        """Features of loaded images, with the source's configuration."""
        if not images:
            return []
        fz = self.featurizer
        if fz.needs_projection and fz.projection is None:
            self.notes.append("no stored projection: features were computed with a projection fitted on the "
                              "references (run compute_fused_features first for dataset-wide features)")
        feats = fz.describe(images)
        self._accept(fz.file_fingerprint(self.cfg.fingerprint()), "computed features")
        return [self._on_device(f) for f in feats]

    def _on_device(self, f: FusedFeatures) -> FusedFeatures:
        return FusedFeatures(f.descriptors.to(self.device), f.letterbox, f.stride, f.sd_channels, f.meta)

    def describe_flipped(self, unit: Unit) -> FusedFeatures:
        from PIL import ImageOps

        return self.describe([ImageOps.mirror(unit.load(self.margin))])[0]

    def get(self, items: List[Tuple[str, Unit, Optional[str]]]) -> Dict[str, Union[FusedFeatures, Exception]]:
        """``(id, unit, stored path or None)`` -> id -> features, or the error. Stored
        files are read concurrently (:meth:`read_stored`); a file of another fingerprint
        is that sample's error; an unusable one (missing, truncated, corrupt) is
        recomputed, like a sample without stored features."""
        out: Dict[str, Union[FusedFeatures, Exception]] = {}
        stored = self.read_stored([(sid, st) for sid, _, st in items if st])
        todo = []
        for sid, fp, _ in items:
            got = stored.get(sid)
            if isinstance(got, FeatureStoreError) and not isinstance(got, OtherSettingsError):
                logger.warning("stored features of %s unusable (%s); recomputing", sid, got)
                got = None
            if got is None:
                todo.append((sid, fp))
            else:
                out[sid] = got
        images = []
        for sid, unit in todo:
            try:
                fp = unit.filepath
                if fom.get_media_type(fp) != fom.IMAGE:
                    raise ValueError(f"{fp} is not an image (media type {fom.get_media_type(fp)!r})")
                images.append((sid, unit.load(self.margin)))
            except Exception as e:  # noqa: BLE001
                out[sid] = e
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            try:
                out.update(zip([sid for sid, _ in chunk], self.describe([im for _, im in chunk])))
            except Exception:  # noqa: BLE001 -- isolate the failing image
                for sid, im in chunk:
                    try:
                        out[sid] = self.describe([im])[0]
                    except Exception as e:  # noqa: BLE001
                        out[sid] = e
        return out


__all__ = ["FeatureSource", "OtherSettingsError", "FEATURE_KEYWORDS", "READ_THREADS"]
