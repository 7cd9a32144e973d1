"""ToMe, token merging (Bolya et al., ICLR 2023), and the per-sublayer variant Expedite benchmarks.

``tome``: in every block, after the attention residual and before the MLP, ``r`` tokens are merged by
bipartite soft matching on the block's keys averaged over heads (``tome/merge.py``,
``tome/patch/timm.py``); merged tokens are size-weighted means and, with ``prop_attn``, every later
attention adds ``log(size)`` to its logits. The decoder decodes the merged patch tokens and every patch
receives its token's output through the merge state's index map (correct with a distillation token,
where upstream's ``unmerge`` closure is not).

``tome_sublayer``: the merge -> compute -> unmerge pattern of Expedite's ``tome/patch/mmseg.py``:
separately for attention and MLP, the LayerNorm output is merged (metric = that output, plain mean),
the sublayer runs on the reduced set, each member token receives its merged token's output, and the
result is added to the full-resolution residual stream, which never shrinks.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from tokred.attention import AttentionOutput
from tokred.bipartite import bipartite_plan, check_prefix
from tokred.blocks import MidBlock, ReductionBlock, swap_block
from tokred.errors import UsageError
from tokred.options import Option, boolean, is_int, is_real, real
from tokred.profiling import section
from tokred.reducer import TokenReducer
from tokred.state import MergeState, merge_mean

R_RULE = "an int >= 0, (r, inflect) with inflect in [-1, 1], or a list of ints >= 0 (one per block)"


def check_r(value: Any) -> int | tuple[int, float] | list[int]:
    """Validate ToMe's ``r``: a constant, an ``(r, inflect)`` schedule or a per-block list."""
    if is_int(value) and value >= 0:
        return int(value)
    if isinstance(value, tuple) and len(value) == 2 and is_int(value[0]) and value[0] >= 0 and is_real(value[1]):
        if not -1 <= value[1] <= 1:
            raise UsageError(f"r schedule {value!r}: inflect must lie in [-1, 1]")
        return (int(value[0]), float(value[1]))
    if isinstance(value, list) and all(is_int(v) and v >= 0 for v in value):
        return [int(v) for v in value]
    raise UsageError(f"r must be {R_RULE}; got {value!r}")


def r_from_cli(values: tuple[float, ...]) -> int | tuple[int, float] | list[int]:
    """``--tome-r 8`` -> 8, ``--tome-r 16 -1.0`` -> (16, -1.0), three or more values -> a per-block list."""
    def whole(v: float) -> int:
        if not float(v).is_integer():
            raise UsageError(f"--tome-r: {v:g} is not a whole number of tokens")
        return int(v)

    if len(values) == 1:
        return whole(values[0])
    if len(values) == 2:
        return (whole(values[0]), float(values[1]))
    return [whole(v) for v in values]


def parse_r(r: int | tuple[int, float] | list[int], depth: int) -> list[int]:
    """Tokens merged in each of ``depth`` blocks, as upstream's ``parse_r`` (``int()`` truncation included)."""
    if isinstance(r, list):
        if len(r) > depth:
            raise UsageError(f"r lists {len(r)} blocks but the encoder has {depth}")
        return r + [0] * (depth - len(r))
    r, inflect = r if isinstance(r, tuple) else (r, 0.0)
    low = int(r * (1.0 - inflect))
    high = 2 * r - low
    step = (high - low) / (depth - 1) if depth > 1 else 0.0
    return [int(low + step * i) for i in range(depth)]


class ToMeBlock(MidBlock):
    """A block that merges ``spec`` tokens (at most half the unprotected ones) after its attention."""

    spec: int

    @property
    def needs_keys(self) -> bool:  # type: ignore[override]
        return self.spec > 0

    def reduce(self, x: torch.Tensor, attn: AttentionOutput, state: MergeState) -> torch.Tensor:
        if self.spec == 0:
            return x
        dest, n_out = bipartite_plan(attn.keys, self.spec, state.n_prefix)
        return x if dest is None else state.merge(x, dest, n_out)


class ToMe(TokenReducer):
    """ToMe in every block: ``r`` tokens merged by key similarity between attention and MLP."""

    name = "tome"
    summary = "ToMe: r tokens merged per block by key similarity, sizes tracked (Bolya et al., ICLR 2023)"
    options = (
        Option("r", 8, f"Tokens merged per block: {R_RULE}. Two values on the command line are (r, inflect).",
               check_r, value_type=float, nargs="+", from_cli=r_from_cli),
        Option("prop_attn", True, "Proportional attention: add log(token size) to the attention logits.",
               boolean("prop_attn"), value_type=bool),
    )

    @classmethod
    def sweep(cls, encoder: nn.Module) -> list[dict[str, Any]]:
        """Constant r removing about 25, 50 and 75 % of the patch tokens over the depth (before the cap)."""
        gh, gw = encoder.patch_embed.grid_size
        depth = len(encoder.blocks)
        return [{"r": max(1, round(share * gh * gw / depth))} for share in (0.25, 0.5, 0.75)]

    def prepare(self, encoder: nn.Module) -> None:
        check_prefix(encoder.num_prefix_tokens)
        self.per_block = parse_r(self.config["r"], len(encoder.blocks))
        if not isinstance(self.config["r"], int):
            self.config["r"] = list(self.per_block)

    def apply(self, encoder: nn.Module) -> None:
        for block, r in zip(encoder.blocks, self.per_block):
            swap_block(block, ToMeBlock, r)


def merged_sublayer(sublayer: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor, ratio: float,
                    n_prefix: int) -> torch.Tensor:
    """``sublayer`` on ``u`` with ``int(T * ratio)`` tokens merged (plain mean) first and copied back after."""
    with section("merge"):
        dest, n_out = bipartite_plan(u, int(u.shape[1] * ratio), n_prefix)
        merged = u if dest is None else merge_mean(u, dest, n_out)
    y = sublayer(merged)
    if dest is None:
        return y
    with section("unmerge"):
        return y.gather(1, dest.unsqueeze(-1).expand(-1, -1, y.shape[-1]))


class SublayerMergeBlock(ReductionBlock):
    """A block whose attention and MLP each run on a merged copy of their input; the residual stays full."""

    spec: float

    def forward(self, x: torch.Tensor, state: MergeState) -> torch.Tensor:  # type: ignore[override]
        n_prefix = state.n_prefix
        x = x + self.drop_path1(self.ls1(merged_sublayer(self.attn, self.norm1(x), self.spec, n_prefix)))
        return x + self.drop_path2(self.ls2(merged_sublayer(self.mlp, self.norm2(x), self.spec, n_prefix)))


class ToMeSublayer(TokenReducer):
    """Expedite's ToMe baseline: per-sublayer merge, compute, unmerge in every block."""

    name = "tome_sublayer"
    summary = "ToMe as Expedite benchmarks it: merge, compute, unmerge per sublayer; full residual stream"
    options = (
        Option("ratio", 0.2, "Fraction of all tokens (class token included) merged before each sublayer, in [0, 1).",
               real("ratio", 0.0, 1.0, high_open=True), value_type=float),
    )

    @classmethod
    def sweep(cls, encoder: nn.Module) -> list[dict[str, Any]]:
        """Expedite's rows: 20, 30 and 50 % of the tokens merged per sublayer."""
        return [{"ratio": r} for r in (0.2, 0.3, 0.5)]

    def prepare(self, encoder: nn.Module) -> None:
        check_prefix(encoder.num_prefix_tokens)

    def apply(self, encoder: nn.Module) -> None:
        for block in encoder.blocks:
            swap_block(block, SublayerMergeBlock, self.config["ratio"])
