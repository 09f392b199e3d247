"""Batches of images to store-ready features, with one batch of lookahead.

``pipelined`` pulls batch k+1 from the caller's iterator (the caller's CPU work for it:
claims, decoding), queues it on the extractor's device (letterboxing on threads, uint8
upload, the models, the fixed projection and fusion or the adapter, the store encoding,
the copy back), and only then hands batch k back, so that storing and writing
batch k overlaps the GPU's work on batch k+1. ``compute_fused_features`` runs on it, and
so does the bench's stage without a database. No FiftyOne import.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from fiftyone_sdcorr.core.features.transfer import EncodedFeatures, PendingEncoded

Batch = Tuple[Any, Sequence, Optional[Sequence[Optional[str]]]]  # (tag, images, labels)


def pipelined(featurizer, batches: Iterable[Batch], store_dtype: torch.dtype,
              ) -> Iterator[Tuple[Any, Union[List[EncodedFeatures], Exception]]]:
    """``(tag, encoded features per image)`` for each batch, in order, batch k after
    batch k+1 was pulled and queued (:meth:`Featurizer.queue
    <fiftyone_sdcorr.core.features.featurizer.Featurizer.queue>`). A batch that could not
    be queued, or whose queued work failed, comes back as ``(tag, the exception)``: the
    caller decides (for example, image by image); the pipeline goes on."""
    inflight = None
    for tag, images, labels in batches:
        try:
            queued = featurizer.queue(images, labels, store_dtype) if len(images) else []
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


__all__ = ["pipelined"]
