"""Featurizer: the one owner of turning images into unit descriptors for a method.

Every path that makes features goes through it: ``FeatureExtractor.describe``, the
dataset runs (``compute_fused_features`` and the feature source of every other dataset
function), the pipelined store writer and benchmark pairs. It holds:

1. **raw extraction** (:meth:`Featurizer.extract`): the extractor's raw maps (SD taps and
   DINO tokens, or DINO tokens alone for a method without SD), a batch that runs out of
   CUDA memory split in halves;
2. **the fixed projection** of methods with SD (:meth:`fit`, :meth:`load_projection`,
   :data:`PROJECTION_NAME`): fitted once on the first images, saved beside the stored
   features, its digest part of every stored file's fingerprint (:meth:`file_fingerprint`);
3. **fusion or adapter** (:meth:`fuse`): ``"sd-dino"``: projection + per-branch
   normalisation + concatenation; ``"dino-diy"``: DIY-SC's adapter, then L2 per token;
4. **per-image failure isolation** (:meth:`describe_each`): a failing batch is retried
   image by image, so one bad image fails alone.

Anything with ``describe(images)`` and ``config()`` (a Describer: tests' deterministic
descriptors) is run as it is: no projection, no adapter. No FiftyOne import.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Union

import torch

from fiftyone_sdcorr.core.features.fusion import FixedProjection, FusedFeatures, RawFeatures, fuse_pair, fuse_raw
from fiftyone_sdcorr.core.features.methods import fingerprint, get_method, method_of
from fiftyone_sdcorr.core.features.transfer import PendingEncoded, encode_batch

logger = logging.getLogger(__name__)

#: the fixed projection's name in a store namespace (``<namespace>/projection.safetensors``)
PROJECTION_NAME = "projection"


class Featurizer:
    """Images -> :class:`FusedFeatures` for one method (see the module docstring).

    Args:
        extractor: a :class:`~fiftyone_sdcorr.FeatureExtractor` (raw maps: ``extract``,
            ``prepare`` / ``run_prepared``, ``recipe``, ``method``, ``adapter``) or any
            Describer (``describe``, ``config``); None until :meth:`attach` (the models
            load only when something must be computed; ``settings`` is then required)
        projection: the fixed projection (methods with SD); None: fitted on the first
            images described (:meth:`fit`) or loaded (:meth:`load_projection`)
        settings: what decides the numbers (default: the extractor's ``config()``); the
            ``meta`` of every descriptor and the source of :meth:`config_fingerprint`
    """

    def __init__(self, extractor=None, projection: Optional[FixedProjection] = None,
                 settings: Optional[dict] = None):
        self.extractor, self.projection = None, projection
        self.settings = dict(settings if settings is not None else extractor.config())
        self.method = get_method(method_of(self.settings) if extractor is None
                                 else getattr(extractor, "method", None) or method_of(self.settings))
        if extractor is not None:
            self.attach(extractor)

    def attach(self, extractor) -> "Featurizer":
        """The extractor that computes (once its models are loaded)."""
        self.extractor = extractor
        return self

    @property
    def raw(self) -> bool:
        """Raw maps, projection and adapter are ours (a FeatureExtractor, or none attached
        yet); a plain Describer describes itself."""
        ext = self.extractor
        return ext is None or (callable(getattr(ext, "extract", None)) and hasattr(ext, "recipe"))

    # ---- identity
    @property
    def needs_projection(self) -> bool:
        return self.raw and self.method.uses_sd

    def config_fingerprint(self) -> str:
        return fingerprint(self.settings)

    def file_fingerprint(self, config_fp: Optional[str] = None) -> str:
        """What each stored file carries: the configuration's fingerprint and the
        projection's digest (``-`` for methods without one)."""
        digest = self.projection.digest() if self.needs_projection and self.projection is not None else "-"
        return f"{config_fp or self.config_fingerprint()}:{digest}"

    # ---- 1. raw maps
    def extract(self, images: Sequence, labels: Optional[Sequence] = None) -> List[RawFeatures]:
        """Raw maps on the CPU; a batch that runs out of CUDA memory is split in halves."""
        images = list(images)
        try:
            return self.extractor.extract(images, labels=labels) if labels else self.extractor.extract(images)
        except torch.cuda.OutOfMemoryError:
            if len(images) == 1:
                raise
            torch.cuda.empty_cache()
            h = len(images) // 2
            logger.warning("CUDA out of memory on %d images; splitting the batch", len(images))
            lo, hi = (None, None) if labels is None else (labels[:h], labels[h:])
            return self.extract(images[:h], lo) + self.extract(images[h:], hi)

    # ---- 2. the fixed projection
    def load_projection(self, tensors: Optional[Dict[str, torch.Tensor]]) -> Optional[FixedProjection]:
        """The stored projection (its tensors), unless one is set already."""
        if self.projection is None and tensors is not None and self.needs_projection:
            self.projection = FixedProjection.from_state_dict(tensors)
        return self.projection

    def fit(self, raws: Sequence[RawFeatures]) -> Optional[FixedProjection]:
        """Fits the projection on ``raws`` when the method needs one and none is set."""
        if self.needs_projection and self.projection is None:
            logger.info("fitting a fixed projection on %d image(s)", len(raws))
            self.projection = FixedProjection.fit([r.sd for r in raws], dim=self.extractor.recipe.pca_dim)
        return self.projection

    # ---- 3. fusion or adapter
    def fuse(self, raws: Sequence[RawFeatures], alpha: Optional[float] = None) -> List[FusedFeatures]:
        """Unit descriptors of raw maps, where the maps are (the device, in the pipeline).
        ``alpha``: the SD share of fused features (default the recipe's; 1 or 0 for the
        benchmarks' SD-only and DINO-only ablations)."""
        if not self.method.uses_sd:
            adapter = self.extractor.adapter
            p = next(adapter.parameters())
            with torch.inference_mode():
                descs = [adapter.unit_descriptors(r.dino[None].to(p.device, p.dtype))[0].float() for r in raws]
            return [FusedFeatures(d, r.dino_letterbox, r.dino_stride, 0, dict(self.settings)) for d, r in zip(descs, raws)]
        if self.projection is None:
            raise RuntimeError("no fixed projection: fit() or load_projection() first")
        alpha = self.extractor.recipe.alpha if alpha is None else alpha
        return [fuse_raw(r, self.projection, alpha=alpha, meta=self.settings) for r in raws]

    def describe(self, images: Sequence, labels: Optional[Sequence] = None) -> List[FusedFeatures]:
        """Raw maps, the projection (fitted on these images when none is set), fusion."""
        images = list(images)
        if not images:
            return []
        if not self.raw:
            return list(self.extractor.describe(images))
        raws = self.extract(images, labels)
        self.fit(raws)
        return self.fuse(raws)

    def describe_pair(self, image_a, image_b, labels=None):
        """The paper's per-pair path for methods with SD (co-PCA of the pair's SD maps);
        the same as :meth:`describe` for the others."""
        if not self.needs_projection:
            return tuple(self.describe([image_a, image_b], labels))
        a, b = self.extract([image_a, image_b], labels)
        r = self.extractor.recipe
        return fuse_pair(a, b, dim=r.pca_dim, alpha=r.alpha, meta=self.settings)

    # ---- 4. failures image by image
    def describe_each(self, images: Sequence, labels: Optional[Sequence] = None
                      ) -> List[Union[FusedFeatures, Exception]]:
        """:meth:`describe`, with a failing batch retried image by image: each entry is
        the image's features or the exception that stopped it."""
        images = list(images)
        try:
            return list(self.describe(images, labels))
        except Exception as e:  # noqa: BLE001 -- isolate the failing image
            if len(images) == 1:
                return [e]
            out: List[Union[FusedFeatures, Exception]] = []
            for i, im in enumerate(images):
                out += self.describe_each([im], None if labels is None else [labels[i]])
            return out

    # ---- the pipelined store writer
    def queue(self, images: Sequence, labels, store_dtype: torch.dtype) -> PendingEncoded:
        """Queues one batch on the extractor's device (``prepare`` + ``run_prepared``),
        the fusion or adapter and the store encoding there, and starts the copy to the host."""
        raws = self.extractor.run_prepared(self.extractor.prepare(list(images), labels))
        return encode_batch(self.fuse(raws), store_dtype)

    @property
    def pipelined(self) -> bool:
        """Whether batches can be queued ahead (:meth:`queue`)."""
        return self.raw and callable(getattr(self.extractor, "run_prepared", None))


__all__ = ["Featurizer", "PROJECTION_NAME"]
