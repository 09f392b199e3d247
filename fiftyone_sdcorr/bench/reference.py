"""The reference code's per-token matcher: the matching benchmark's baseline (not runtime)."""

from __future__ import annotations

from typing import Optional

import torch

from fiftyone_sdcorr.core.matching.correspondence import check_tokens, descriptors_of


def match_points_loop(src_desc, tgt_desc, src_tokens, tgt_mask: Optional[torch.Tensor] = None,
                      all_tokens: bool = True):
    """The reference code's matcher, kept as the benchmark baseline.

    ``sd-dino``'s evaluation computes the similarity of EVERY source token to every target
    token with a per-token loop (``chunk_cosine_sim``: one ``nn.CosineSimilarity`` call per
    source token), takes the nearest neighbour of each source token, and only then reads
    off the keypoints' tokens. This does the same; its nearest neighbours equal
    :func:`match_points` without soft-argmax. For benchmarks and tests only.

    With ``all_tokens=False`` only the keypoints' own rows are computed (same per-token
    iteration, ``K`` instead of ``H_s x W_s`` of them): the benchmark times that and scales
    by ``H_s W_s / K``, since every iteration does the same work.

    Returns:
        ``((K, 2)`` long ``(col, row)`` target tokens, ``(K,)`` similarities``)``.
    """
    src_desc, tgt_desc = descriptors_of(src_desc).float(), descriptors_of(tgt_desc).float()
    c, hs, ws = src_desc.shape
    _, ht, wt = tgt_desc.shape
    tokens = check_tokens(src_tokens, hs, ws)
    src_tok = src_desc.reshape(c, -1).T[None, :, None, :]  # 1 x Ns x 1 x C
    tgt_tok = tgt_desc.reshape(c, -1).T[None, None, :, :]  # 1 x 1 x Nt x C
    idx = (tokens[:, 1] * ws + tokens[:, 0]).to(src_tok.device)
    rows_to_do = range(src_tok.shape[1]) if all_tokens else idx.tolist()
    cos = torch.nn.CosineSimilarity(dim=3)
    rows = [cos(src_tok[:, i : i + 1], tgt_tok)[0, 0] for i in rows_to_do]  # one source token each
    sim = torch.stack(rows) if rows else torch.zeros(0, ht * wt, device=src_tok.device)
    if tgt_mask is not None:
        allowed = torch.as_tensor(tgt_mask, dtype=torch.bool).to(sim.device).reshape(1, -1)
        sim = sim.masked_fill(~allowed, float("-inf"))
    nn_sim, nn_idx = sim.max(dim=1) if rows else (sim[:, 0], sim[:, 0].long())
    if all_tokens:
        nn_sim, nn_idx = nn_sim[idx], nn_idx[idx]
    return torch.stack([nn_idx % wt, nn_idx // wt], dim=1), nn_sim
