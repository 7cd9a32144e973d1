"""Bipartite soft matching on the alternating split, shared by ALGM's GBM (adaptive r) and ToMe (fixed r).

Tokens are split by position: set A = 0, 2, 4, ... (the class token is A[0]), set B = 1, 3, 5, ... (a
distillation token is B[0]). Every A token finds its most similar B token by cosine similarity; the
``r`` A tokens with the highest best similarity are merged into their partners. The class token is
never a source and nothing merges into the distillation token. The merged sequence is the unmerged A
tokens in ascending position, then all B tokens; with a distillation token ``[cls, dist, other
unmerged A, other B]``. The result is a ``dest`` map for ``MergeState.merge``; no Python loop.
"""

from __future__ import annotations

import math

import torch

from tokred.errors import UsageError
from tokred.precision import fp32_island


def check_prefix(n_prefix: int) -> None:
    """The matcher protects a class token and an optional distillation token, nothing else."""
    if n_prefix not in (1, 2):
        raise UsageError(f"bipartite matching needs a class token and at most a distillation token, not {n_prefix} prefix tokens")


def merge_cap(n_tokens: int, n_prefix: int) -> int:
    """The largest ``r`` of one step: half of the unprotected tokens, rounded down."""
    return (n_tokens - n_prefix) // 2


@fp32_island
def best_partners(metric: torch.Tensor, n_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every A token, its best cosine similarity to a B token and that B index, in fp32.

    The class token's row (A[0]) is -inf; with a distillation token (B[0]) nobody may pick it.
    """
    check_prefix(n_prefix)
    with torch.no_grad():
        unit = metric.float()
        unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        scores = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)
        scores[:, 0, :] = -math.inf
        if n_prefix == 2:
            scores[:, :, 0] = -math.inf
        return scores.max(dim=-1)


@fp32_island
def bipartite_destinations(
    node_max: torch.Tensor, node_idx: torch.Tensor, n_tokens: int, r: int, n_prefix: int
) -> torch.Tensor:
    """The ``dest`` map (B, T) that merges the top-``r`` A tokens of every image into their best B partners.

    ``node_max`` / ``node_idx`` come from ``best_partners``; ``0 <= r <= merge_cap(T, n_prefix)`` (``r = 0`` still
    reorders the tokens into the merged layout). Sources
    are chosen by a descending argsort of ``node_max``, as the reference does.
    """
    B = node_max.shape[0]
    device = node_max.device
    n_a, n_b = (n_tokens + 1) // 2, n_tokens // 2
    with torch.no_grad():
        sources = node_max.argsort(dim=1, descending=True)[:, :r]
        merged = torch.zeros(B, n_a, dtype=torch.bool, device=device)
        merged.scatter_(1, sources, torch.ones_like(sources, dtype=torch.bool))
        kept_rank = (~merged).long().cumsum(dim=1) - 1
        b_pos = (n_a - r) + torch.arange(n_b, device=device).expand(B, -1)
        if n_prefix == 2:
            kept_rank = kept_rank + (kept_rank >= 1).long()
            b_pos = b_pos.clone()
            b_pos[:, 0] = 1
        dest = torch.empty(B, n_tokens, dtype=torch.long, device=device)
        dest[:, ::2] = torch.where(merged, b_pos.gather(1, node_idx), kept_rank)
        dest[:, 1::2] = b_pos
    return dest


def bipartite_plan(metric: torch.Tensor, r: int, n_prefix: int) -> tuple[torch.Tensor | None, int]:
    """``(dest, n_out)`` merging ``min(r, cap)`` tokens of every image by ``metric`` (B, T, c); ``dest`` is None for r <= 0."""
    T = metric.shape[1]
    r = min(r, merge_cap(T, n_prefix))
    if r <= 0:
        return None, T
    node_max, node_idx = best_partners(metric, n_prefix)
    return bipartite_destinations(node_max, node_idx, T, r, n_prefix), T - r
