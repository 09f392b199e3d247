"""Benchmark pairs matched the paper's way: features per image, co-PCA per pair, nearest
neighbour per source keypoint.

For each :class:`~fiftyone_sdcorr.core.benchmarks.formats.PairRecord`:

1. **Raw features** of both images from a :class:`~fiftyone_sdcorr.FeatureExtractor`
   (SD tap maps + DINOv2 tokens), kept in a small per-image cache (benchmark images recur
   in many pairs).
2. **Descriptors**: ``pca="co"``, the paper: co-PCA of the pair's SD maps
   (:func:`~fiftyone_sdcorr.core.features.fusion.fuse_pair`); ``pca="fixed"``: one
   :class:`~fiftyone_sdcorr.core.features.fusion.FixedProjection` for every image (the cached
   dataset path). ``features``: ``"fused"`` (SD and DINO halves weighted by the recipe's
   ``alpha``), ``"sd"`` (alpha 1: the DINO half is zero) or ``"dino"`` (alpha 0).
3. **Matching**: nearest neighbour by cosine similarity over the target's image tokens
   (:func:`~fiftyone_sdcorr.core.matching.correspondence.match_keypoints`), optionally refined by
   the window soft-argmax; the token centre is mapped back to target pixels.
4. **Flip alignment** (``flip=True``, GeoAware-SC's training-free pose alignment): the
   mirrored source is matched too, with left/right keypoint ids swapped (``flip_pairs``),
   and kept when its matched features are closer (higher mean similarity). With co-PCA the
   three images (source, mirrored source, target) share one joint PCA so both branches are
   compared in the same space. A label whose mirror partner is not annotated keeps the
   unflipped branch's match.

The co-PCA (an exact SVD per pair and tap) runs on the extractor's device (``pca_device``
to choose another); the fixed projection is applied where the raw maps are (CPU).

Keypoints are normalised by the image sizes the annotation gives (``PairRecord.src_size``
/ ``trg_size``), which are the image files' sizes in every benchmark read here. No
FiftyOne import.
"""

from __future__ import annotations

import hashlib
import json
import os

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import ImageOps

from fiftyone_sdcorr.core.benchmarks.formats import PairRecord
from fiftyone_sdcorr.core.features.featurizer import Featurizer
from fiftyone_sdcorr.core.matching.correspondence import DEFAULT_SOFT_WINDOW, DEFAULT_TEMPERATURE, match_keypoints, \
    match_keypoints_with_flip
from fiftyone_sdcorr.core.features.fusion import (
    FixedProjection,
    FusedFeatures,
    RawFeatures,
    co_pca,
    fuse,
    fuse_pair,
    sd_descriptor,
)
from fiftyone_sdcorr.core.common.images import ImageLoadError, load_image
from fiftyone_sdcorr.core.common.params import ParameterError, check_bool, check_choice, check_float, check_int

FEATURES = ("fused", "sd", "dino")
PCA_MODES = ("co", "fixed")


@dataclass(frozen=True)
class PairMatchOptions:
    """How benchmark pairs are matched; the defaults are the paper's."""

    features: str = "fused"
    pca: str = "co"
    soft_argmax: bool = False
    soft_window: int = DEFAULT_SOFT_WINDOW
    temperature: float = DEFAULT_TEMPERATURE
    flip: bool = False
    cache_images: int = 64  # raw features of this many images are kept (about 26 MB each at the paper recipe)
    pca_device: Optional[str] = None  # None: the extractor's device

    def __post_init__(self):
        check_choice("features", self.features, FEATURES)
        check_choice("pca", self.pca, PCA_MODES)
        check_bool("soft_argmax", self.soft_argmax)
        check_int("soft_window", self.soft_window, lo=1, hi=99)
        check_float("temperature", self.temperature, lo=0.0, hi=100.0, lo_open=True)
        check_bool("flip", self.flip)
        check_int("cache_images", self.cache_images, lo=0, hi=100000)
        if self.pca_device is not None:
            try:
                torch.device(self.pca_device)
            except (RuntimeError, TypeError):
                raise ParameterError(f"parameter 'pca_device' must name a torch device, got {self.pca_device!r}")


@dataclass
class PairPrediction:
    """Predicted target pixels ``(K, 2)`` (NaN where a source point could not be matched)
    and whether the mirrored source was kept."""

    trg_kps: np.ndarray
    flipped: bool = False


class PairMatcher:
    """Predicts a benchmark pair's target keypoints with an extractor's features.

    Args:
        extractor: a :class:`~fiftyone_sdcorr.FeatureExtractor` (anything with
            ``extract(images, labels=None) -> [RawFeatures]`` and a ``recipe``).
        options: :class:`PairMatchOptions`.
        projection: the fixed projection for ``pca="fixed"`` (else fitted with
            :meth:`fit_projection` before the first pair).
    """

    def __init__(self, extractor, options: PairMatchOptions = PairMatchOptions(),
                 projection: Optional[FixedProjection] = None, raw_store=None):
        self.extractor, self.options = extractor, options
        #: raw maps, the fixed projection, the adapter of a method without SD
        self.featurizer = Featurizer(extractor, projection)
        # raw maps on disk, keyed by image, mirror, label and the extractor's settings: what
        # every ablation (sd / dino / fused, co-PCA / fixed, soft-argmax, flip) shares
        self.raw_store, self.raw_fingerprint = raw_store, self.featurizer.config_fingerprint()
        recipe = extractor.recipe
        self.pca_dim = int(recipe.pca_dim)
        self.alpha = {"fused": float(recipe.alpha), "sd": 1.0, "dino": 0.0}[options.features]
        self._cache: "OrderedDict[Tuple[str, bool], RawFeatures]" = OrderedDict()
        self._content_ids: Dict[tuple, str] = {}

    # ------------------------------------------------------------------ features
    def raw(self, paths: Sequence[str], labels: Sequence[Optional[str]], flipped: bool = False) -> List[RawFeatures]:
        """Raw features of images (mirrored with ``flipped``), through the cache."""
        keys = [(str(p), flipped) for p in paths]
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        got: Dict[Tuple[str, bool], RawFeatures] = {}
        if todo:
            uniq = list(dict.fromkeys(keys[i] for i in todo))
            label_of = {keys[i]: labels[i] for i in todo}
            for k in uniq:
                cached = self.raw_store.load_raw(self._disk_key(k, label_of[k]), self.raw_fingerprint) \
                    if self.raw_store is not None else None
                if cached is not None:
                    got[k] = cached
                    self._remember(k, cached)
            uniq = [k for k in uniq if k not in got]
            images = [ImageOps.mirror(load_image(p)) if f else p for p, f in uniq]
            for k, r in zip(uniq, self.featurizer.extract(images, [label_of[k] for k in uniq]) if uniq else []):
                got[k] = r
                self._remember(k, r)
                if self.raw_store is not None:
                    self.raw_store.save_raw(self._disk_key(k, label_of[k]), r, self.raw_fingerprint)
        out = []
        for k in keys:
            if k in self._cache:
                self._cache.move_to_end(k)
            out.append(got.get(k) or self._cache[k])
        return out

    def _disk_key(self, key, label) -> str:
        """The on-disk key: the image's content (not its path: a file replaced under the
        same name is another image), mirror, label and the extractor's settings."""
        path, flipped = key
        blob = json.dumps([self._content_id(path), bool(flipped), label, self.raw_fingerprint])
        return hashlib.sha1(blob.encode()).hexdigest()

    def _content_id(self, path: str) -> str:
        """sha256 of the file's bytes, memoised by (path, size, mtime) for this matcher."""
        try:
            st = os.stat(path)
        except OSError as e:
            raise ImageLoadError(path, f"cannot read it ({e.strerror or e})") from None
        memo = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
        if memo not in self._content_ids:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            self._content_ids[memo] = digest.hexdigest()
        return self._content_ids[memo]

    def _remember(self, key, raw: RawFeatures) -> None:
        if self.options.cache_images <= 0:
            return
        self._cache[key] = raw
        while len(self._cache) > self.options.cache_images:
            self._cache.popitem(last=False)

    def fit_projection(self, paths: Sequence[str], labels: Optional[Sequence[Optional[str]]] = None) -> FixedProjection:
        """Fits the fixed projection (``pca="fixed"``) on these images' SD maps."""
        labels = list(labels) if labels is not None else [None] * len(paths)
        self.featurizer.projection = None
        return self.featurizer.fit(self.raw(list(paths), labels))

    @property
    def projection(self) -> Optional[FixedProjection]:
        return self.featurizer.projection

    def describe(self, raws: Sequence[RawFeatures]) -> List[FusedFeatures]:
        """Fused descriptors of a pair (``[src, trg]``) or, for flip alignment, of
        ``[src, mirrored src, trg]`` (co-PCA: one joint PCA over all their tokens); a
        method without SD: its own descriptors (the adapter's)."""
        if not self.featurizer.method.uses_sd:
            return self.featurizer.fuse(raws)
        if self.options.pca == "fixed":
            if self.projection is None:
                raise RuntimeError("pca='fixed' needs a projection: call fit_projection() or pass one")
            return self.featurizer.fuse(raws, alpha=self.alpha)
        raws = [self._on_device(r) for r in raws]
        if len(raws) == 2:
            return list(fuse_pair(raws[0], raws[1], dim=self.pca_dim, alpha=self.alpha))
        *firsts, last = raws
        # co-PCA of several images: the first ones side by side as one map, the last as the other
        side = {t: torch.cat([r.sd[t] for r in firsts], dim=-1) for t in last.sd}
        pa, pb = co_pca(side, last.sd, self.pca_dim)
        out = []
        for i, r in enumerate(firsts):
            own = {t: m.chunk(len(firsts), dim=-1)[i] for t, m in pa.items()}
            out.append(self._fused(r, own))
        return out + [self._fused(last, pb)]

    def _fused(self, raw: RawFeatures, projected) -> FusedFeatures:
        sd = sd_descriptor(projected)
        return FusedFeatures(fuse(sd, raw.dino, self.alpha), raw.dino_letterbox, raw.dino_stride, int(sd.shape[0]))

    def _on_device(self, raw: RawFeatures) -> RawFeatures:
        """Raw maps on the co-PCA device (``pca_device``; default the extractor's)."""
        dev = torch.device(self.options.pca_device or getattr(self.extractor, "device", "cpu"))
        if raw.dino.device == dev:
            return raw
        return replace(raw, sd={t: m.to(dev) for t, m in raw.sd.items()}, dino=raw.dino.to(dev))

    # ------------------------------------------------------------------ matching
    def _match_kwargs(self) -> dict:
        o = self.options
        return {"soft_window": o.soft_window if o.soft_argmax else None, "temperature": o.temperature,
                "cycle": False}

    def predict(self, record: PairRecord, flip_pairs: Sequence[Tuple[int, int]] = ()) -> PairPrediction:
        """Target pixels for every source keypoint of ``record`` (in its order)."""
        label = record.category or None
        src, trg = self.raw([record.src, record.trg], [label, label])
        sw, sh = record.src_size
        pts = np.clip(record.src_kps / np.array([sw, sh], dtype=np.float64), 0.0, 1.0)  # NaN stays NaN
        if not self.options.flip:
            fs, ft = self.describe([src, trg])
            m = match_keypoints(fs, ft, torch.from_numpy(pts), **self._match_kwargs())
            return PairPrediction(self._pixels(m.normalized(ft), record))
        (src_f,) = self.raw([record.src], [label], flipped=True)
        fs, fsf, ft = self.describe([src, src_f, trg])
        return self._predict_flip(record, pts, fs, fsf, ft, flip_pairs)

    def _predict_flip(self, record, pts, fs, fsf, ft, flip_pairs) -> PairPrediction:
        """Flip alignment in the category's keypoint-id space, back to the pair's order."""
        n = max(int(record.num_keypoints), max(record.kp_ids, default=-1) + 1)
        full = np.full((n, 2), np.nan)
        full[list(record.kp_ids)] = pts
        pairs = [(a, b) for a, b in flip_pairs if a < n and b < n]
        kw = self._match_kwargs()
        best = match_keypoints_with_flip(fs, fsf, ft, torch.from_numpy(full), pairs, **kw)
        out = best.normalized(ft).cpu().numpy()
        if best.flipped:  # labels whose mirror partner is not annotated keep the plain match
            plain = match_keypoints(fs, ft, torch.from_numpy(full), **kw).normalized(ft).cpu().numpy()
            lost = ~np.isfinite(out).all(axis=1)
            out[lost] = plain[lost]
        return PairPrediction(self._pixels(out[list(record.kp_ids)], record), bool(best.flipped))

    @staticmethod
    def _pixels(normalized, record: PairRecord) -> np.ndarray:
        xy = np.asarray(torch.as_tensor(normalized).detach().cpu().numpy(), dtype=np.float64).reshape(-1, 2)
        tw, th = record.trg_size
        return xy * np.array([tw, th], dtype=np.float64)


__all__ = ["FEATURES", "PCA_MODES", "PairMatchOptions", "PairPrediction", "PairMatcher"]
