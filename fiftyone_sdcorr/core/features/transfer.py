"""Fused features encoded for the store on their device, copied to the host once.

On CUDA the copy goes through pinned host memory on a side stream, so it overlaps the
next batch's work on the GPU; :meth:`PendingEncoded.result` waits for it. Nothing before
that waits for the GPU. On the CPU everything is immediate. No FiftyOne import.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List

import torch

from fiftyone_sdcorr.core.features.fusion import FusedFeatures
from fiftyone_sdcorr.core.features.store import encode, stored_embedding

_COPY_STREAMS: Dict[str, "torch.cuda.Stream"] = {}


@dataclass
class EncodedFeatures:
    """One image's features as a store file holds them, on the host.

    ``tensors``: what :func:`fiftyone_sdcorr.core.features.store.encode` made (``descriptors`` in
    the store dtype, ``scale`` for int8); ``fused``: the geometry and metadata (its
    ``descriptors`` are the stored tensor); ``embedding``: the global vector of the stored
    values (float32, unit norm), as a recovered sample's would be computed.
    """

    fused: FusedFeatures
    tensors: Dict[str, torch.Tensor]
    embedding: torch.Tensor


class HostCopy:
    """Tensors on one device copied to the host: on CUDA into pinned memory on a side
    stream, after the work that produces them; :meth:`wait` returns the host tensors."""

    def __init__(self, tensors: Dict[str, torch.Tensor]):
        devices = {t.device for t in tensors.values()}
        if len(devices) > 1:
            raise ValueError(f"HostCopy needs tensors on one device, got {sorted(map(str, devices))}")
        dev = devices.pop() if devices else torch.device("cpu")
        self._event = None
        if dev.type != "cuda":
            self._host = {k: v.to("cpu") for k, v in tensors.items()}
            return
        stream = _COPY_STREAMS.get(str(dev))
        if stream is None:
            stream = _COPY_STREAMS[str(dev)] = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            self._host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                          for k, v in tensors.items()}
        for v in tensors.values():
            v.record_stream(stream)  # the allocator keeps them until the copy is done
        self._event = torch.cuda.Event()
        self._event.record(stream)

    def wait(self) -> Dict[str, torch.Tensor]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host


class PendingEncoded:
    """:func:`encode_batch`'s result: the host copies, ready after :meth:`result`."""

    def __init__(self, fused: List[FusedFeatures], copies: List[HostCopy]):
        self._fused, self._copies = fused, copies

    def result(self) -> List[EncodedFeatures]:
        out = []
        for f, c in zip(self._fused, self._copies):
            host = c.wait()
            emb = host.pop("embedding")
            out.append(EncodedFeatures(replace(f, descriptors=host["descriptors"]), host, emb))
        return out


def encode_batch(fused: List[FusedFeatures], dtype: torch.dtype) -> PendingEncoded:
    """Encodes each image's descriptors for the store in ``dtype`` and computes the global
    vector of the stored values, on the descriptors' device, then starts the copies to the
    host (the descriptors once, in the store dtype: fp16 at the defaults)."""
    copies = []
    for f in fused:
        tensors = encode(f.descriptors, dtype)
        copies.append(HostCopy({**tensors, "embedding": stored_embedding(f, tensors)}))
    return PendingEncoded([replace(f, descriptors=None) for f in fused], copies)


__all__ = ["EncodedFeatures", "HostCopy", "PendingEncoded", "encode_batch"]
