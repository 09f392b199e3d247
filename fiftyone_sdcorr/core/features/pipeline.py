"""Batches of images to store-ready features, with one batch of lookahead.

``pipelined`` pulls batch k+1 from the caller's iterator (the caller's CPU work for it:
claims, decoding), queues it on the extractor's device (letterboxing on threads, uint8
upload, the models, the fixed projection, the fusion, the store encoding, the copy back;
see :func:`queue_batch`), and only then hands batch k back, so that storing and writing
batch k overlaps the GPU's work on batch k+1. ``compute_fused_features`` runs on it, and
so does the bench's stage without a database. No FiftyOne import.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from fiftyone_sdcorr.core.features.fusion import FixedProjection, fuse_raw
from fiftyone_sdcorr.core.features.transfer import EncodedFeatures, PendingEncoded, encode_batch

Batch = Tuple[Any, Sequence, Optional[Sequence[Optional[str]]]]  # (tag, images, labels)


def queue_batch(extractor, images: Sequence, labels, projection: FixedProjection, alpha: float,
                store_dtype: torch.dtype, meta: Optional[dict] = None) -> PendingEncoded:
    """Queues one batch on ``extractor``'s device (``prepare`` + ``run_prepared``), the
    projection, fusion and store encoding there, and starts the copy to the host."""
    raws = extractor.run_prepared(extractor.prepare(list(images), labels))
    fused = [fuse_raw(r, projection, alpha=alpha, meta=meta) for r in raws]
    return encode_batch(fused, store_dtype)


def pipelined(extractor, batches: Iterable[Batch], projection: FixedProjection, alpha: float,
              store_dtype: torch.dtype, meta: Optional[dict] = None,
              ) -> Iterator[Tuple[Any, Union[List[EncodedFeatures], Exception]]]:
    """``(tag, encoded features per image)`` for each batch, in order, batch k after
    batch k+1 was pulled and queued. A batch that could not be queued, or whose queued
    work failed, comes back as ``(tag, the exception)``: the caller decides (for example,
    image by image); the pipeline goes on."""
    inflight = None
    for tag, images, labels in batches:
        try:
            queued = queue_batch(extractor, images, labels, projection, alpha, store_dtype, meta) if len(images) else []
        except Exception as e:  # noqa: BLE001 -- e.g. CUDA out of memory: handed to the caller
            queued = e
        if inflight is not None:
            yield _collect(*inflight)
        inflight = (tag, queued)
    if inflight is not None:
        yield _collect(*inflight)


def _collect(tag, queued):
    if isinstance(queued, PendingEncoded):
        try:
            return tag, queued.result()
        except Exception as e:  # noqa: BLE001 -- an error raised by the queued work
            return tag, e
    return tag, queued


__all__ = ["pipelined", "queue_batch"]
