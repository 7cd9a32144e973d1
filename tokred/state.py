"""MergeState: the one record of token reduction during a forward pass.

The sequence is ``[prefix tokens, patch tokens]``. The state maps every original patch (raster order
over the input grid) to the tokens that stand for it, in one of three forms:

- an **index map** ``index`` (B, N): the row of each patch in the current sequence (merging, pruning
  with reassignment, token sharing). A merge step is a ``dest`` map (B, T_old) from every current row
  to its row in the new sequence; the index map is composed with it by one gather, O(B * N) memory.
- a **reduced grid** ``out_grid`` (h, w): the patch tokens themselves form an ``h x w`` raster grid
  (clustering that keeps a grid), with no per-patch map.
- a **weighted map** ``index`` / ``weight`` (B, N, k): each patch is a weighted sum of k tokens
  (reconstruction from clusters).

``to_grid`` turns per-token outputs into a patch grid through whichever form is held. A dense source
matrix is built only on request (``source_matrix``, for visualisation and tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tokred.errors import UsageError
from tokred.profiling import section


def merge_weighted(
    x: torch.Tensor, size: torch.Tensor, dest: torch.Tensor, n_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of the rows of ``x`` that share a destination row.

    ``x``: (B, T, C); ``size``: (B, T, 1) float; ``dest``: (B, T) long in ``[0, n_out)``, every output row
    hit at least once. Returns the merged tokens (B, n_out, C) in ``x``'s dtype and their sizes
    (B, n_out, 1). Differentiable in ``x``.
    """
    B, _, C = x.shape
    weighted = x * size
    summed = weighted.new_zeros(B, n_out, C).scatter_add(1, dest.unsqueeze(-1).expand(-1, -1, C), weighted)
    new_size = size.new_zeros(B, n_out, 1).scatter_add(1, dest.unsqueeze(-1), size)
    return (summed / new_size).to(x.dtype), new_size


def merge_mean(x: torch.Tensor, dest: torch.Tensor, n_out: int) -> torch.Tensor:
    """Plain mean of the rows of ``x`` that share a destination row (every token weighs 1)."""
    ones = torch.ones(*dest.shape, 1, dtype=torch.float32, device=x.device)
    return merge_weighted(x, ones, dest, n_out)[0]


@dataclass
class MergeState:
    """Per-forward bookkeeping of an encoder's token reduction (see the module docstring).

    - ``size`` (B, T, 1) float32: how many original patches each current token stands for.
    - ``index`` (B, N) long, or (B, N, k) with ``weight``; ``None`` when the tokens form ``out_grid``.
    - ``grid``: the input patch grid; ``n_prefix``: class (and distillation) tokens in front.
    - ``prop_attn``: add ``log(size)`` to the attention logits once tokens have been merged.
    - ``trace_source``: keep the index map after every step in ``history`` (visualisation).
    - ``merged``: whether any step has changed the sequence (sizes may differ from 1).
    - ``scratch``: what a method keeps between its hooks within one forward (e.g. clustering inputs).
    """

    size: torch.Tensor
    index: torch.Tensor | None
    n_prefix: int
    grid: tuple[int, int]
    prop_attn: bool = False
    trace_source: bool = False
    merged: bool = False
    out_grid: tuple[int, int] | None = None
    weight: torch.Tensor | None = None
    history: list[torch.Tensor] = field(default_factory=list)
    scratch: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        x: torch.Tensor,
        n_prefix: int,
        grid: tuple[int, int],
        prop_attn: bool = False,
        trace_source: bool = False,
        index: torch.Tensor | None = None,
        size: torch.Tensor | None = None,
    ) -> "MergeState":
        """The state of the sequence ``x`` entering the first block.

        By default ``x`` is ``[prefix tokens, gh*gw patches in raster order]``; a method that builds its
        own input tokens gives their patch -> row map ``index`` (B, N) and their ``size`` (B, T, 1).
        """
        B, T, _ = x.shape
        n_patches = grid[0] * grid[1]
        if index is None and T != n_prefix + n_patches:
            raise UsageError(f"{T} tokens do not match {n_prefix} prefix tokens and a {grid[0]}x{grid[1]} grid")
        state = cls(
            torch.ones(B, T, 1, device=x.device, dtype=torch.float32) if size is None else size,
            torch.arange(n_prefix, T, device=x.device).repeat(B, 1) if index is None else index,
            n_prefix, tuple(grid), bool(prop_attn), bool(trace_source),
        )
        if index is not None:
            state._record()
        return state

    @property
    def num_tokens(self) -> int:
        """Current sequence length, prefix tokens included."""
        return self.size.shape[1]

    @property
    def is_raster(self) -> bool:
        """Whether the patch tokens are still the unreduced raster grid (nothing merged or moved yet)."""
        return not self.merged and self.out_grid is None

    def _record(self) -> None:
        self.merged = True
        if self.trace_source and self.index is not None and self.weight is None:
            self.history.append(self.index)

    def merge(self, x: torch.Tensor, dest: torch.Tensor | None, n_out: int) -> torch.Tensor:
        """One merge step: tokens sharing a destination row become their size-weighted mean.

        ``dest`` (B, T) maps every current row to its row among ``n_out``; ``None`` leaves every token in
        place (the step is still recorded in ``history``). Returns the merged tokens.
        """
        if dest is None:
            if self.trace_source and self.index is not None:
                self.history.append(self.index)
            return x
        x, self.size = merge_weighted(x, self.size, dest, n_out)
        self.index = dest.gather(1, self.index)
        self._record()
        return x

    def reassign(self, dest: torch.Tensor, n_out: int) -> None:
        """Compose the patch map with ``dest`` (B, T) without averaging any token (pruning, restoration).

        The method builds the new tokens itself; sizes become the patch counts each new row stands for.
        """
        self.size = self.size.new_zeros(dest.shape[0], n_out, 1).scatter_add(1, dest.unsqueeze(-1), self.size)
        self.index = dest.gather(1, self.index)
        self._record()

    def replace(
        self,
        x: torch.Tensor,
        index: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        out_grid: tuple[int, int] | None = None,
        size: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Take tokens ``x`` that a method computed itself, with their patch map; returns ``x``.

        Give ``index`` (B, N) for an index map, ``index`` and ``weight`` (B, N, k) for a weighted map, or
        ``out_grid`` when the patch tokens of ``x`` form that raster grid. ``size`` defaults to ones.
        """
        if (index is None) == (out_grid is None):
            raise ValueError("replace() takes either an index map or an output grid")
        B, T, _ = x.shape
        if out_grid is not None and T - self.n_prefix != out_grid[0] * out_grid[1]:
            raise ValueError(f"{T - self.n_prefix} patch tokens do not form a {out_grid[0]}x{out_grid[1]} grid")
        self.index, self.weight, self.out_grid = index, weight, None if out_grid is None else tuple(out_grid)
        self.size = size if size is not None else torch.ones(B, T, 1, device=x.device, dtype=torch.float32)
        self._record()
        return x

    def attn_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Proportional attention: ``log(size)`` of every key as an additive mask (B, 1, 1, T) in ``dtype``.

        ``None`` without proportional attention or before any merge (all sizes are 1 then). The logarithm
        of the fp32 sizes is written straight into ``dtype`` (the attention's, ``compute_dtype``): one
        kernel, no separate conversion of the mask.
        """
        if not self.prop_attn or not self.merged:
            return None
        B, T, _ = self.size.shape
        bias = self.size.new_empty(B, 1, 1, T, dtype=dtype)
        return torch.log(self.size.transpose(1, 2).unsqueeze(1), out=bias)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """The grid that ``to_grid`` produces: the reduced grid if the tokens form one, else the input grid."""
        return self.out_grid if self.index is None else self.grid

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """Per-token rows of the patch tokens (B, T - n_prefix, K) -> one row per original patch (B, N, K)."""
        if self.index is None:
            raise ValueError("the tokens form a reduced grid: there is no per-patch map to unmerge through")
        K = y.shape[-1]
        rows = self.index - self.n_prefix
        if self.weight is None:
            return y.gather(1, rows.unsqueeze(-1).expand(-1, -1, K))
        B, N, k = rows.shape
        picked = y.gather(1, rows.reshape(B, N * k, 1).expand(-1, -1, K)).reshape(B, N, k, K)
        return (picked * self.weight.unsqueeze(-1).to(y.dtype)).sum(2)

    def to_grid(self, y: torch.Tensor) -> torch.Tensor:
        """Per-token outputs of the patch tokens (B, T - n_prefix, K) -> (B, K, gh, gw) on ``patch_grid``."""
        if self.index is not None and not self.is_raster:
            with section("unmerge"):
                y = self.unmerge(y)
        gh, gw = self.patch_grid
        B, N, K = y.shape
        if N != gh * gw:
            raise ValueError(f"{N} patch outputs do not fill a {gh}x{gw} grid")
        return y.transpose(1, 2).reshape(B, K, gh, gw)

    def unmerge_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The full sequence ``x`` back at one token per patch, ``[prefix, N patches]``; the state restarts there."""
        with section("unmerge"):
            patches = self.unmerge(x[:, self.n_prefix :])
        x = torch.cat([x[:, : self.n_prefix], patches], dim=1)
        B, T, _ = x.shape
        self.index = torch.arange(self.n_prefix, T, device=x.device).repeat(B, 1)
        self.weight = None
        self.size = torch.ones(B, T, 1, device=x.device, dtype=torch.float32)
        self.merged = False
        return x

    def source_matrix(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Dense one-hot (B, T_patches, N) membership of patches in patch tokens (tests, visualisation)."""
        index = self.index if index is None else index
        rows = index - self.n_prefix
        n_rows = int(rows.max()) + 1 if rows.numel() else 0
        out = torch.zeros(rows.shape[0], n_rows, rows.shape[1], device=rows.device)
        return out.scatter_(1, rows.unsqueeze(1), 1.0)
