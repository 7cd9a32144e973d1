"""GBM, global bipartite merging with an adaptive threshold: ALGM's later merge steps.

The matching is ToMe's bipartite soft matching on the alternating split (``tokred.bipartite``) with the
hidden states themselves as the metric. The threshold is one scalar for the batch,
``mean_b(mean_i s[b, i]) + mean_b(std_i s[b, i]) / layer_idx`` over the best scores ``s`` of the
non-class A tokens; ``r`` is the batch minimum of the count of scores at or above it, and the top-``r``
A tokens of each image are averaged (by size) into their B partners.
"""

from __future__ import annotations

import torch

from tokred.bipartite import best_partners, bipartite_destinations, merge_cap
from tokred.state import MergeState


def gbm_destinations(
    x: torch.Tensor, n_prefix: int, layer_idx: int
) -> tuple[torch.Tensor | None, int, int]:
    """Where GBM sends each token of ``x``: ``(dest (B, T), n_out, r)``; ``dest`` is None when T is too small."""
    T = x.shape[1]
    if merge_cap(T, n_prefix) <= 0:
        return None, T, 0
    with torch.no_grad():
        node_max, node_idx = best_partners(x, n_prefix)
        scored = node_max[:, 1:]
        threshold = scored.mean(dim=1).mean() + scored.std(dim=1).mean() / layer_idx
        r = int((node_max >= threshold).sum(dim=1).min())
        dest = bipartite_destinations(node_max, node_idx, T, r, n_prefix)
    return dest, T - r, r


def global_merge(x: torch.Tensor, state: MergeState, layer_idx: int) -> torch.Tensor:
    """Apply GBM (``layer_idx`` = the 1-based number of the block it runs in) to ``x`` and ``state``."""
    dest, n_out, _ = gbm_destinations(x, state.n_prefix, layer_idx)
    return state.merge(x, dest, n_out)
