"""Matching fused dense descriptors: nearest neighbour, soft-argmax, confidence, flip.

Pure tensors in, tensors out; no FiftyOne import (docs/architecture.md, "Layout").

Conventions
-----------
- Descriptors are ``C x H x W`` tensors on a token grid (``FusedFeatures.descriptors``).
  They are compared by **cosine similarity**: every token vector is L2-normalised first
  (the fused vectors are two unit-norm halves, so their overall norm is ``sqrt(2)``, not
  1; for such vectors argmax cosine equals argmin L2, the recipe's nearest neighbour).
- Token positions are ``(col, row)`` pairs, i.e. ``(x, y)`` order, like
  :mod:`fiftyone_sdcorr.core.common.geometry`. Source positions are integer (long) tokens; matched
  target positions are float, fractional when the window soft-argmax is used.
- Keypoints are normalised image coordinates in ``[0, 1]`` (FiftyOne's convention);
  :func:`keypoints_to_tokens` and :func:`tokens_to_normalized` convert through the
  letterbox of a :class:`~fiftyone_sdcorr.core.features.fusion.FusedFeatures`.

Confidence rule
---------------
``confidence = clamp(similarity, 0, 1) * exp(-(cycle_error / 2) ** 2)``

where ``similarity`` is the cosine similarity at the matched (argmax) target token and
``cycle_error`` is the distance, in tokens, between the source token and the source token
found by matching the target token back (cycle consistency). A point that comes back
to itself keeps its similarity; one that comes back 2 tokens away loses a factor ``e``;
4 tokens away, a factor ``e**4``. Without the cycle check (``cycle=False``) the
cycle error is NaN and the confidence is ``clamp(similarity, 0, 1)``. Invalid points
(NaN keypoints, off the grid) get NaN positions and confidence 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from fiftyone_sdcorr.core.features.fusion import FusedFeatures

#: GeoAware-SC window soft-argmax defaults.
DEFAULT_SOFT_WINDOW = 11
DEFAULT_TEMPERATURE = 0.02
#: Cycle errors are scaled by this many tokens in the confidence rule.
CYCLE_SCALE = 2.0


# --------------------------------------------------------------------------------------
# Result type
# --------------------------------------------------------------------------------------
@dataclass
class Matches:
    """Matches of ``K`` source points in one target.

    Attributes:
        tokens: ``(K, 2)`` float ``(col, row)`` positions on the target token grid
            (fractional with soft-argmax; NaN where ``valid`` is False).
        similarity: ``(K,)`` cosine similarity at the matched (argmax) target token.
        cycle_error: ``(K,)`` distance in tokens between each source token and the
            back-match of its target token (NaN when not computed or invalid).
        confidence: ``(K,)`` in ``[0, 1]``; see the module docstring for the rule.
        valid: ``(K,)`` bool, False for points that could not be matched (NaN keypoints).
        flipped: True when :func:`match_points_with_flip` kept the flipped source.
    """

    tokens: torch.Tensor
    similarity: torch.Tensor
    cycle_error: torch.Tensor
    confidence: torch.Tensor
    valid: torch.Tensor
    flipped: bool = False

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def normalized(self, tgt: FusedFeatures) -> torch.Tensor:
        """Matched positions as normalised ``[0, 1]`` target image coordinates (float64)."""
        return tokens_to_normalized(self.tokens, tgt)

    def mean_similarity(self) -> float:
        """Mean similarity over the valid points (``-inf`` when there are none)."""
        if not bool(self.valid.any()):
            return float("-inf")
        return float(self.similarity[self.valid].mean())


# --------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------
def keypoints_to_tokens(
    points_normalized, fused: FusedFeatures
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Normalised keypoints ``(K, 2)`` -> integer tokens ``(K, 2)`` (col, row) and a mask.

    Uses the letterbox of ``fused`` (RECIPE: scale, add the offset, ``floor(x / stride)``).
    Points with a NaN / infinite coordinate, or outside ``[0, 1]``, are invalid: their
    returned token is ``(0, 0)`` and their entry in the returned ``(K,)`` bool mask is
    False.
    """
    pts = torch.as_tensor(points_normalized, dtype=torch.float64).reshape(-1, 2)
    valid = torch.isfinite(pts).all(dim=1) & (pts >= 0).all(dim=1) & (pts <= 1).all(dim=1)
    safe = torch.where(valid[:, None], pts, torch.zeros_like(pts))
    tokens = fused.letterbox.normalized_to_token(safe, fused.stride)
    tokens = torch.where(valid[:, None], tokens, torch.zeros_like(tokens))
    return tokens.long(), valid


def tokens_to_normalized(tokens, fused: FusedFeatures) -> torch.Tensor:
    """Token positions ``(K, 2)`` (col, row; integer or fractional) -> normalised ``[0, 1]``
    image coordinates of the token centres (float64). NaN stays NaN."""
    cr = torch.as_tensor(tokens, dtype=torch.float64).reshape(-1, 2)
    return fused.letterbox.token_to_normalized(cr, fused.stride)


def mirror_tokens(tokens, fused: FusedFeatures) -> torch.Tensor:
    """Integer tokens ``(K, 2)`` of an image -> tokens of the same points in the
    horizontally flipped image (same size, hence same letterbox).

    Goes through pixels: token centre -> pixel ``x`` -> ``width - x`` -> token. For a
    symmetric letterbox this is exactly ``col -> grid - 1 - col``.
    """
    cr = torch.as_tensor(tokens, dtype=torch.float64).reshape(-1, 2)
    lb = fused.letterbox
    xy = lb.token_to_pixel(cr, fused.stride)
    xy = torch.stack([lb.width - xy[:, 0], xy[:, 1]], dim=1)
    return lb.pixel_to_token(xy, fused.stride).long()


# --------------------------------------------------------------------------------------
# Similarities
# --------------------------------------------------------------------------------------
def descriptors_of(x) -> torch.Tensor:
    return x.descriptors if isinstance(x, FusedFeatures) else torch.as_tensor(x)


def _unit_tokens(desc: torch.Tensor) -> torch.Tensor:
    """``C x H x W`` -> ``C x (H*W)`` float32 with every token vector L2-normalised
    (all-zero tokens stay zero, so their similarity to anything is 0)."""
    d = desc.reshape(desc.shape[0], -1).float()
    return d / d.norm(dim=0, keepdim=True).clamp_min(1e-12)


def _default_mask(mask, features, height: int, width: int, device) -> torch.Tensor:
    """``mask`` as a bool tensor; if None, ``features.valid_mask()`` for FusedFeatures
    (tokens on the image), else all tokens."""
    if mask is None:
        if isinstance(features, FusedFeatures):
            mask = features.valid_mask()
        else:
            mask = torch.ones(height, width, dtype=torch.bool)
    mask = torch.as_tensor(mask, dtype=torch.bool).to(device)
    if mask.shape != (height, width):
        raise ValueError(f"mask must be {height}x{width}, got {tuple(mask.shape)}")
    return mask


def check_tokens(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    tokens = torch.as_tensor(tokens).reshape(-1, 2).long()
    if tokens.numel() and (
        (tokens[:, 0] < 0).any()
        or (tokens[:, 0] >= width).any()
        or (tokens[:, 1] < 0).any()
        or (tokens[:, 1] >= height).any()
    ):
        raise ValueError(f"source tokens must lie on the {width}x{height} grid (col, row)")
    return tokens


def similarity_maps(src_desc, tgt_desc, src_tokens) -> torch.Tensor:
    """Cosine similarity of ``K`` source tokens to every target token.

    Args:
        src_desc: ``C x H_s x W_s`` source descriptors (or a :class:`FusedFeatures`).
        tgt_desc: ``C x H_t x W_t`` target descriptors (or a :class:`FusedFeatures`).
        src_tokens: ``(K, 2)`` integer ``(col, row)`` source tokens.

    Returns:
        ``(K, H_t, W_t)`` float32 cosine similarities (each token vector is normalised).
    """
    src_desc, tgt_desc = descriptors_of(src_desc), descriptors_of(tgt_desc)
    if src_desc.shape[0] != tgt_desc.shape[0]:
        raise ValueError(f"channel mismatch: {src_desc.shape[0]} vs {tgt_desc.shape[0]}")
    _, hs, ws = src_desc.shape
    _, ht, wt = tgt_desc.shape
    tokens = check_tokens(src_tokens, hs, ws).to(src_desc.device)
    src = _unit_tokens(src_desc)[:, tokens[:, 1] * ws + tokens[:, 0]]  # C x K
    tgt = _unit_tokens(tgt_desc).to(src.device)  # C x N_t
    return (src.T @ tgt).reshape(-1, ht, wt)


def window_soft_argmax(
    sim: torch.Tensor,
    peak: torch.Tensor,
    *,
    window: int = DEFAULT_SOFT_WINDOW,
    temperature: float = DEFAULT_TEMPERATURE,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sub-token position of each similarity peak (GeoAware-SC window soft-argmax).

    Takes the ``window x window`` neighbourhood of the integer ``peak`` in each map,
    applies ``softmax(sim / temperature)`` over it and returns the expected ``(col, row)``.
    Window cells off the grid or outside ``mask`` are left out (so near a border the
    window is one-sided). Vectorised over all maps.

    Args:
        sim: ``(K, H, W)`` similarity maps, or ``(T, K, H, W)`` (``K`` maps in each of
            ``T`` targets).
        peak: ``(K, 2)`` (or ``(T, K, 2)``) integer ``(col, row)`` of each map's argmax.
        window: odd window size in tokens (11 in GeoAware-SC).
        temperature: softmax temperature (0.02 in GeoAware-SC, on cosine similarities).
        mask: optional bool mask of allowed cells: ``(H, W)`` for every map, or
            ``(T, H, W)``, one per target of a ``(T, K, H, W)`` ``sim``.

    Returns:
        ``(K, 2)`` (or ``(T, K, 2)``) float32 ``(col, row)``.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number, got {window}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    lead, (h, w) = sim.shape[:-2], sim.shape[-2:]
    flat = sim.reshape(-1, h * w).float()  # B x N, B = all maps
    k = flat.shape[0]
    peak = peak.reshape(-1, 2).to(sim.device)
    half = window // 2
    off = torch.arange(-half, half + 1, device=sim.device)
    cols = peak[:, 0, None, None] + off[None, None, :]  # B x 1 x w
    rows = peak[:, 1, None, None] + off[None, :, None]  # B x w x 1
    cols, rows = torch.broadcast_tensors(cols, rows)  # B x w x w
    inside = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
    cc, rr = cols.clamp(0, w - 1), rows.clamp(0, h - 1)
    cells = window * window
    idx = (rr * w + cc).reshape(k, cells)
    vals = torch.gather(flat, 1, idx)
    keep = inside.reshape(k, cells)
    if mask is not None:
        m = mask.to(device=sim.device, dtype=torch.bool).reshape(-1, h * w)  # 1 x N, or one row per target
        keep = keep & torch.gather(m, 1, idx.reshape(m.shape[0], k // m.shape[0] * cells)).reshape(k, cells)
    logits = (vals / temperature).masked_fill(~keep, float("-inf"))
    weights = torch.softmax(logits, dim=1)
    col = (weights * cc.reshape(k, cells).float()).sum(1)
    row = (weights * rr.reshape(k, cells).float()).sum(1)
    return torch.stack([col, row], dim=1).reshape(*lead, 2)


def confidence_from(similarity: torch.Tensor, cycle_error: torch.Tensor) -> torch.Tensor:
    """``clamp(similarity, 0, 1) * exp(-(cycle_error / 2) ** 2)``; a NaN cycle error
    (not computed) leaves the factor out; a NaN similarity gives 0."""
    conf = similarity.float().clamp(0, 1)
    factor = torch.exp(-((cycle_error.float() / CYCLE_SCALE) ** 2))
    conf = torch.where(torch.isnan(cycle_error), conf, conf * factor)
    return torch.nan_to_num(conf, nan=0.0)


# --------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """Features ready for matching: unit-norm token vectors ``C x N`` computed once."""

    features: FusedFeatures
    unit: torch.Tensor  # C x N float32, unit-norm columns (zero tokens stay zero)
    mask: torch.Tensor  # N bool: tokens on the image
    height: int
    width: int

    @classmethod
    def of(cls, f, mask=None) -> "Prepared":
        """Prepare a :class:`FusedFeatures` (or a ``C x H x W`` tensor); ``mask``
        (``H x W`` bool) overrides the candidate tokens (default: ``valid_mask()``)."""
        d = descriptors_of(f)
        c, h, w = d.shape
        flat = d.reshape(c, -1).float()
        unit = flat / flat.norm(dim=0, keepdim=True).clamp_min(1e-12)
        mask = _default_mask(mask, f, int(h), int(w), unit.device).reshape(-1)
        return cls(f, unit, mask, int(h), int(w))

    def global_vector(self) -> torch.Tensor:
        """Same as :meth:`FusedFeatures.global_vector`, from the prepared tokens."""
        v = self.unit @ self.mask.to(self.unit.dtype)  # sum over image tokens, no copy
        return v / v.norm().clamp_min(1e-12)


@dataclass
class PreparedBatch:
    """``T`` targets of one descriptor shape ready for matching, stacked on one device:
    unit-norm token vectors ``T x C x N`` and masks ``T x N`` (tokens on the image)."""

    unit: torch.Tensor  # T x C x N float32, unit-norm columns (zero tokens stay zero)
    mask: torch.Tensor  # T x N bool
    height: int
    width: int

    def __len__(self) -> int:
        return int(self.unit.shape[0])

    @classmethod
    def of(cls, features: Sequence, masks: Optional[Sequence] = None) -> "PreparedBatch":
        """Stack and normalise the descriptors of :class:`FusedFeatures` (or ``C x H x W``
        tensors) of one shape, on their (common) device; ``masks`` as in
        :meth:`Prepared.of` (default: each one's ``valid_mask()``). Each target is
        normalised straight into the batch (one pass fewer than stacking first)."""
        descs = [descriptors_of(f) for f in features]
        if not descs:
            raise ValueError("no features to prepare")
        shape, dev = tuple(descs[0].shape), descs[0].device
        if len(shape) != 3 or any(tuple(d.shape) != shape or d.device != dev for d in descs):
            raise ValueError("a batch of targets needs C x H x W descriptors of one shape on one device, got "
                             f"{sorted({(tuple(d.shape), str(d.device)) for d in descs})}")
        c, h, w = shape
        masks = [None] * len(descs) if masks is None else list(masks)
        mask = torch.stack([_default_mask(m, f, h, w, dev).reshape(-1) for f, m in zip(features, masks)])
        unit = torch.empty(len(descs), c, h * w, dtype=torch.float32, device=dev)
        for i, d in enumerate(descs):
            flat = d.reshape(c, -1)
            norm = torch.linalg.vector_norm(flat, dim=0, keepdim=True, dtype=torch.float32)
            torch.div(flat, norm.clamp_min_(1e-12), out=unit[i])
        return cls(unit, mask, int(h), int(w))

    @classmethod
    def of_prepared(cls, prepared: Sequence[Prepared]) -> "PreparedBatch":
        """A batch of :class:`Prepared` targets of one shape (one target: no copy)."""
        p0 = prepared[0]
        if len(prepared) == 1:
            return cls(p0.unit[None], p0.mask[None], p0.height, p0.width)
        return cls(torch.stack([p.unit for p in prepared]), torch.stack([p.mask for p in prepared]),
                   p0.height, p0.width)

    def select(self, index: Sequence[int]) -> "PreparedBatch":
        """The targets at ``index`` (a copy on the same device)."""
        i = torch.as_tensor(list(index), dtype=torch.long, device=self.unit.device)
        return PreparedBatch(self.unit.index_select(0, i), self.mask.index_select(0, i), self.height, self.width)

    def global_vectors(self) -> torch.Tensor:
        """``T x C``: :meth:`Prepared.global_vector` of every target, in one product."""
        v = torch.bmm(self.unit, self.mask.to(self.unit.dtype)[:, :, None]).squeeze(2)
        return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _query_rows(queries, dev):
    """Source rows ``Ktot x C`` of all queries, their tokens ``Ktot x 2``, validity and sizes."""
    rows, toks, valids, sizes = [], [], [], []
    for src, tokens, valid in queries:
        tokens = torch.as_tensor(tokens).reshape(-1, 2).long().to(dev)
        valid = torch.as_tensor(valid, dtype=torch.bool).reshape(-1).to(dev)
        safe = torch.where(valid[:, None], tokens, torch.zeros_like(tokens))
        if safe.numel() and bool(((safe < 0) | (safe[:, :1] >= src.width) | (safe[:, 1:] >= src.height)).any()):
            raise ValueError("source tokens off the grid")
        rows.append(src.unit[:, safe[:, 1] * src.width + safe[:, 0]].T)
        toks.append(tokens)
        valids.append(valid)
        sizes.append(len(safe))
    return torch.cat(rows), torch.cat(toks), torch.cat(valids), sizes


def match_prepared_many(tgts: PreparedBatch, queries, *, soft_window=None, temperature=DEFAULT_TEMPERATURE,
                        cycle=True, out_device=None) -> List[List[Matches]]:
    """:func:`match_prepared` for ``T`` targets of one shape at once.

    ``queries``: ``[(src: Prepared, tokens (K, 2) long (col, row), valid (K,) bool)]``,
    the same for every target. ONE batched ``T x (sum K) x N`` similarity product, then
    argmax, window soft-argmax and the cycle check batched over the targets (one product
    per source). Everything runs on the targets' device (CPU or CUDA; the sources must be
    there too); the matches come back in one transfer to ``out_device`` (default: that
    device). Returns ``[target][query]`` :class:`Matches`.
    """
    t = len(tgts)
    if not queries:
        return [[] for _ in range(t)]
    dev = tgts.unit.device
    if not bool(tgts.mask.any(dim=1).all()):
        raise ValueError("tgt_mask allows no target token")
    q, tokens, valid, sizes = _query_rows(queries, dev)
    c, h, w = tgts.unit.shape[1], tgts.height, tgts.width
    if c != q.shape[1]:
        raise ValueError(f"channel mismatch: reference {q.shape[1]} vs target {c}")
    sim = torch.matmul(q, tgts.unit)  # T x Ktot x N
    best = sim.masked_fill(~tgts.mask[:, None, :], float("-inf")).argmax(dim=2)  # T x Ktot
    similarity = sim.gather(2, best[:, :, None]).squeeze(2)
    peak = torch.stack([best % w, best // w], dim=2)  # T x Ktot x 2
    if soft_window:
        pos = window_soft_argmax(sim.reshape(t, -1, h, w), peak, window=soft_window, temperature=temperature,
                                 mask=tgts.mask.reshape(t, h, w))
    else:
        pos = peak.float()
    cyc = torch.full_like(similarity, float("nan"))
    if cycle and q.shape[0]:
        matched = torch.gather(tgts.unit, 2, best[:, None, :].expand(-1, c, -1)).transpose(1, 2)  # T x Ktot x C
        start = 0
        for (src, _, _), k in zip(queries, sizes):
            sl = slice(start, start + k)
            start += k
            back = torch.matmul(matched[:, sl], src.unit).masked_fill(~src.mask, float("-inf")).argmax(dim=2)
            back_cr = torch.stack([back % src.width, back // src.width], dim=2).float()
            cyc[:, sl] = (back_cr - tokens[sl].float()).norm(dim=2)
    v = valid[None, :]
    similarity = torch.where(v, similarity, float("nan"))
    cyc = torch.where(v, cyc, float("nan"))
    conf = torch.where(v, confidence_from(similarity, cyc), 0.0)
    pos = torch.where(v[:, :, None], pos.float(), float("nan"))
    packed = torch.cat([pos, similarity[:, :, None], cyc[:, :, None], conf[:, :, None]], dim=2)  # T x Ktot x 5
    if out_device is not None:
        packed, valid = packed.to(out_device), valid.to(out_device)
    out = []
    for i in range(t):
        row, start = [], 0
        for k in sizes:
            p = packed[i, start:start + k]
            row.append(Matches(tokens=p[:, :2], similarity=p[:, 2], cycle_error=p[:, 3], confidence=p[:, 4],
                               valid=valid[start:start + k]))
            start += k
        out.append(row)
    return out


def match_prepared(tgt: Prepared, queries, *, soft_window=None, temperature=DEFAULT_TEMPERATURE,
                   cycle=True) -> List[Matches]:
    """:func:`fiftyone_sdcorrespondence.match_points` for many sources at once.

    ``queries``: ``[(src: Prepared, tokens (K, 2) long (col, row), valid (K,) bool)]``.
    One ``(sum K) x N`` similarity matrix for all of them; each source's tokens are
    normalised once (:class:`Prepared`), not per call. Same rules as ``match_points``:
    argmax over the target's image tokens, optional window soft-argmax, cycle error
    against the source's image tokens, ``confidence_from``. Works on the target's device
    (CPU or CUDA; sources must be there too); the matches are returned on it.
    :func:`match_prepared_many` with one target.
    """
    return match_prepared_many(PreparedBatch.of_prepared([tgt]), queries, soft_window=soft_window,
                               temperature=temperature, cycle=cycle)[0]


def match_points(
    src: FusedFeatures,
    tgt: FusedFeatures,
    src_tokens,
    *,
    soft_window: Optional[int] = None,
    temperature: float = DEFAULT_TEMPERATURE,
    tgt_mask: Optional[torch.Tensor] = None,
    src_mask: Optional[torch.Tensor] = None,
    cycle: bool = True,
    valid: Optional[torch.Tensor] = None,
) -> Matches:
    """Match ``K`` source tokens into the target by nearest neighbour (argmax cosine).

    Args:
        src, tgt: fused features of the source and target image.
        src_tokens: ``(K, 2)`` integer ``(col, row)`` source tokens
            (see :func:`keypoints_to_tokens`).
        soft_window: if set (e.g. 11), refine each match with the window soft-argmax
            (:func:`window_soft_argmax`) for sub-token positions.
        temperature: soft-argmax temperature.
        tgt_mask: ``(H_t, W_t)`` bool; only these target tokens may be matched.
            Default: ``tgt.valid_mask()`` (tokens on the image, not on the padding).
        src_mask: ``(H_s, W_s)`` bool; candidates of the cycle back-match.
            Default: ``src.valid_mask()``.
        cycle: compute the cycle error (match each target token back to the source).
        valid: optional ``(K,)`` bool; False rows get NaN outputs and confidence 0
            (their tokens are ignored).

    Returns:
        :class:`Matches`.
    """
    tokens = torch.as_tensor(src_tokens).reshape(-1, 2).long()
    k = tokens.shape[0]
    valid = torch.ones(k, dtype=torch.bool) if valid is None else torch.as_tensor(valid, dtype=torch.bool).reshape(-1)
    if valid.shape[0] != k:
        raise ValueError(f"valid has {valid.shape[0]} entries for {k} tokens")
    src_p = Prepared.of(src, src_mask)
    safe = torch.where(valid[:, None], tokens, torch.zeros_like(tokens))
    check_tokens(safe, src_p.height, src_p.width)
    return match_prepared(
        Prepared.of(tgt, tgt_mask), [(src_p, tokens, valid)],
        soft_window=soft_window, temperature=temperature, cycle=cycle,
    )[0]


def match_keypoints(src: FusedFeatures, tgt: FusedFeatures, points_normalized, **kwargs) -> Matches:
    """:func:`match_points` for normalised source keypoints ``(K, 2)`` (NaN = absent).

    ``Matches.normalized(tgt)`` gives the predicted target keypoints in ``[0, 1]``.
    """
    tokens, valid = keypoints_to_tokens(points_normalized, src)
    return match_points(src, tgt, tokens, valid=valid, **kwargs)


def swap_permutation(k: int, flip_pairs: Sequence[Tuple[int, int]]) -> torch.Tensor:
    perm = torch.arange(k)
    seen = set()
    for i, j in flip_pairs:
        i, j = int(i), int(j)
        if not (0 <= i < k and 0 <= j < k):
            raise ValueError(f"flip pair {(i, j)} out of range for {k} keypoints")
        if i in seen or j in seen:
            raise ValueError(f"keypoint in more than one flip pair: {(i, j)}")
        seen.update((i, j))
        perm[i], perm[j] = j, i
    return perm


def match_points_with_flip(
    src: FusedFeatures,
    src_flipped: FusedFeatures,
    tgt: FusedFeatures,
    src_tokens,
    flip_pairs: Sequence[Tuple[int, int]],
    *,
    valid: Optional[torch.Tensor] = None,
    **kwargs,
) -> Matches:
    """Flip alignment (GeoAware-SC, training-free): match the source as is and mirrored,
    keep whichever agrees better with the target.

    ``src_flipped`` holds the features of the horizontally flipped source image (the caller
    computes them). ``flip_pairs`` lists keypoint index pairs ``(i, j)`` whose labels swap
    under a mirror (left eye <-> right eye); unpaired keypoints (nose) keep their label.

    Which labels land where: mirroring the source image turns the object's left eye into
    what looks like a right eye. So in the flipped image, the keypoint that *plays the
    role* of label ``i`` sits at the mirror of the original keypoint of its partner
    ``j = swap(i)``. The flipped branch therefore predicts label ``i`` in the target by
    matching the flipped-frame token ``mirror(src_tokens[swap(i)])``; output row ``i``
    always refers to label ``i``, in both branches.

    The branch with the higher mean similarity over the valid points wins (ties keep the
    original); ``Matches.flipped`` says which. In the flipped branch the cycle error is
    measured in the flipped source frame, and a label is valid when its partner was.
    Extra keyword arguments go to :func:`match_points`.
    """
    tokens = torch.as_tensor(src_tokens).reshape(-1, 2).long()
    k = tokens.shape[0]
    if valid is None:
        valid = torch.ones(k, dtype=torch.bool)
    valid = torch.as_tensor(valid, dtype=torch.bool).reshape(-1)
    lb, lbf = src.letterbox, src_flipped.letterbox
    same = (lb.width, lb.height, lb.size, src.stride) == (lbf.width, lbf.height, lbf.size, src_flipped.stride)
    if not same:
        raise ValueError("src_flipped must describe the mirrored source image (same size, frame and stride)")

    original = match_points(src, tgt, tokens, valid=valid, **kwargs)
    perm = swap_permutation(k, flip_pairs)
    safe = torch.where(valid[:, None], tokens, torch.zeros_like(tokens))
    flipped_tokens = mirror_tokens(safe, src)[perm]
    flipped = match_points(src_flipped, tgt, flipped_tokens, valid=valid[perm], **kwargs)
    if flipped.mean_similarity() > original.mean_similarity():
        flipped.flipped = True
        return flipped
    return original


def match_keypoints_with_flip(
    src: FusedFeatures,
    src_flipped: FusedFeatures,
    tgt: FusedFeatures,
    points_normalized,
    flip_pairs: Sequence[Tuple[int, int]],
    **kwargs,
) -> Matches:
    """:func:`match_points_with_flip` for normalised source keypoints (NaN = absent)."""
    tokens, valid = keypoints_to_tokens(points_normalized, src)
    return match_points_with_flip(src, src_flipped, tgt, tokens, flip_pairs, valid=valid, **kwargs)


def mutual_nn(
    src_desc,
    tgt_desc,
    *,
    src_mask: Optional[torch.Tensor] = None,
    tgt_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mutual nearest neighbours ("best buddies") between all tokens of two images.

    Returns ``(src_tokens (M, 2), tgt_tokens (M, 2), similarity (M,))``, ``(col, row)``
    long tokens of the pairs that are each other's nearest neighbour (within the masks).
    Builds the full ``N_s x N_t`` similarity matrix (3600 x 3600 floats = 52 MB at 60x60).
    """
    sdesc, tdesc = descriptors_of(src_desc), descriptors_of(tgt_desc)
    _, hs, ws = sdesc.shape
    _, ht, wt = tdesc.shape
    device = tdesc.device
    smask = _default_mask(src_mask, src_desc, hs, ws, device).reshape(-1)
    tmask = _default_mask(tgt_mask, tgt_desc, ht, wt, device).reshape(-1)
    sim = _unit_tokens(sdesc).to(device).T @ _unit_tokens(tdesc)
    sim = sim.masked_fill(~smask[:, None], float("-inf")).masked_fill(~tmask[None, :], float("-inf"))
    fwd = sim.argmax(dim=1)  # N_s
    bwd = sim.argmax(dim=0)  # N_t
    s_idx = torch.arange(sim.shape[0], device=device)
    keep = smask & tmask[fwd] & (bwd[fwd] == s_idx)
    s_idx, t_idx = s_idx[keep], fwd[keep]
    return (
        torch.stack([s_idx % ws, s_idx // ws], dim=1),
        torch.stack([t_idx % wt, t_idx // wt], dim=1),
        sim[s_idx, t_idx],
    )


__all__ = [
    "Matches",
    "keypoints_to_tokens",
    "tokens_to_normalized",
    "mirror_tokens",
    "similarity_maps",
    "window_soft_argmax",
    "confidence_from",
    "Prepared",
    "PreparedBatch",
    "match_prepared",
    "match_prepared_many",
    "match_points",
    "match_keypoints",
    "match_points_with_flip",
    "match_keypoints_with_flip",
    "mutual_nn",
]
