"""GBM, global bipartite merging with an adaptive threshold: ALGM's later merge steps.

Tokens are split alternately into A (even positions, the class token first) and B (odd positions).
Every A token finds its most similar B token (cosine similarity of the hidden states). The threshold is
one scalar for the batch, ``mean_b(mean_i s[b, i]) + mean_b(std_i s[b, i]) / layer_idx`` over the best
scores ``s`` of the non-class A tokens; ``r`` is the batch minimum of the count of scores at or above it.
The top-``r`` A tokens of each image are averaged (by size) into their B partners. Output order:
unmerged A tokens in A order, then all B tokens in order (with a distillation token, which sits at B[0]
and takes no merges: class token, distillation token, other unmerged A, other B).
"""

from __future__ import annotations

import math

import torch

from algm.merge import MergeState


def best_partners(x: torch.Tensor, n_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every A token (even positions), its best cosine similarity to a B token and that B index.

    The class token's row (A[0]) is -inf; with a distillation token (B[0]) nobody may pick it. fp32.
    """
    metric = x.float()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores[:, 0, :] = -math.inf
    if n_prefix == 2:
        scores[:, :, 0] = -math.inf
    return scores.max(dim=-1)


def gbm_destinations(
    x: torch.Tensor, n_prefix: int, layer_idx: int
) -> tuple[torch.Tensor | None, int, int]:
    """Where GBM sends each token of ``x``: ``(dest (B, T), n_out, r)``; ``dest`` is None when T is too small."""
    B, T, _ = x.shape
    if (T - n_prefix) // 2 <= 0:
        return None, T, 0
    with torch.no_grad():
        node_max, node_idx = best_partners(x, n_prefix)
        scored = node_max[:, 1:]
        threshold = scored.mean(dim=1).mean() + scored.std(dim=1).mean() / layer_idx
        r = int((node_max >= threshold).sum(dim=1).min())

        n_a, n_b = (T + 1) // 2, T // 2
        order = node_max.argsort(dim=1, descending=True)
        sources = order[:, :r]
        merged = torch.zeros(B, n_a, dtype=torch.bool, device=x.device)
        merged.scatter_(1, sources, torch.ones_like(sources, dtype=torch.bool))
        kept_rank = (~merged).long().cumsum(dim=1) - 1
        n_kept = n_a - r
        b_pos = n_kept + torch.arange(n_b, device=x.device).expand(B, -1)
        if n_prefix == 2:
            kept_rank = kept_rank + (kept_rank >= 1).long()
            b_pos = b_pos.clone()
            b_pos[:, 0] = 1
        dest = torch.empty(B, T, dtype=torch.long, device=x.device)
        dest[:, ::2] = torch.where(merged, b_pos.gather(1, node_idx), kept_rank)
        dest[:, 1::2] = b_pos
    return dest, T - r, r


def global_merge(x: torch.Tensor, state: MergeState, layer_idx: int) -> torch.Tensor:
    """Apply GBM (``layer_idx`` = the 1-based number of the block it runs in) to ``x`` and ``state``."""
    dest, n_out, _ = gbm_destinations(x, state.n_prefix, layer_idx)
    return state.merge(x, dest, n_out)
