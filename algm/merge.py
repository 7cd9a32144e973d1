"""MergeState: the one record of token merging (token sizes and a patch -> token index map).

A merge step is described by ``dest``, a ``(B, T_old)`` map from every current token row to its row
in the merged sequence. Tokens sharing a destination are averaged with their sizes as weights; the
patch index map is composed with ``dest`` by one gather. Unmerging per-token outputs back to the
patch grid is one gather through the index map. Memory stays O(B * N); a dense source matrix is only
built on request (visualisation, tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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


@dataclass
class MergeOptions:
    """How a token-merging patch wants the encoder to run; the encoder's ``merge_options`` is ``None`` unpatched."""

    prop_attn: bool = False
    trace_source: bool = False


@dataclass
class MergeState:
    """Per-forward merge bookkeeping of an encoder.

    - ``size`` (B, T, 1): how many original tokens each current token stands for.
    - ``index`` (B, N): for every original patch (raster order), its row in the current token sequence
      (prefix tokens included, so patch rows start at ``n_prefix``).
    - ``steps``: merge steps applied so far; ``history``: with ``trace_source``, the ``index`` map after
      each step (for visualisation).
    """

    size: torch.Tensor
    index: torch.Tensor
    n_prefix: int
    grid: tuple[int, int]
    prop_attn: bool = False
    trace_source: bool = False
    steps: int = 0
    history: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        x: torch.Tensor,
        n_prefix: int,
        grid: tuple[int, int],
        prop_attn: bool = False,
        trace_source: bool = False,
    ) -> "MergeState":
        """The state of an unmerged sequence ``x`` = ``[prefix tokens, gh*gw patches in raster order]``."""
        B, T, _ = x.shape
        n_patches = grid[0] * grid[1]
        if T != n_prefix + n_patches:
            raise ValueError(f"{T} tokens do not match {n_prefix} prefix tokens and a {grid[0]}x{grid[1]} grid")
        index = torch.arange(n_prefix, T, device=x.device).expand(B, -1)
        size = torch.ones(B, T, 1, device=x.device, dtype=torch.float32)
        return cls(size, index, n_prefix, tuple(grid), prop_attn, trace_source)

    @property
    def num_tokens(self) -> int:
        """Current sequence length, prefix tokens included."""
        return self.size.shape[1]

    def merge(self, x: torch.Tensor, dest: torch.Tensor | None, n_out: int) -> torch.Tensor:
        """Apply one merge step to the tokens ``x`` and to this state; returns the merged tokens.

        ``dest=None`` records a step that left every token in place.
        """
        if dest is not None:
            x, self.size = merge_weighted(x, self.size, dest, n_out)
            self.index = dest.gather(1, self.index)
        self.steps += 1
        if self.trace_source:
            self.history.append(self.index)
        return x

    def attn_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Proportional attention: ``log(size)`` of every key as an additive mask (B, 1, 1, T).

        ``None`` without proportional attention or before any merge (all sizes are 1 then).
        """
        if not self.prop_attn or self.steps == 0:
            return None
        return self.size.log().to(dtype).transpose(1, 2).unsqueeze(1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """Copy per-token outputs of the patch tokens (B, T - n_prefix, K) back to every patch: (B, N, K)."""
        rows = (self.index - self.n_prefix).unsqueeze(-1).expand(-1, -1, y.shape[-1])
        return y.gather(1, rows)

    def source_matrix(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Dense one-hot (B, T_patches, N) membership of patches in patch tokens (tests, visualisation)."""
        index = self.index if index is None else index
        rows = index - self.n_prefix
        n_rows = int(rows.max()) + 1 if rows.numel() else 0
        out = torch.zeros(rows.shape[0], n_rows, rows.shape[1], device=rows.device)
        return out.scatter_(1, rows.unsqueeze(1), 1.0)


class MergingBlock:
    """Marker base for transformer blocks that merge tokens: ``forward(x, state) -> (x, state)``.

    The encoder hands such blocks the current ``MergeState``; every other block is called as a plain
    timm ``Block``. A token-reduction method plugs in by providing blocks of this kind.
    """
