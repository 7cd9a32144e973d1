"""ALGM as a patch type: selected timm ``Block``s become ``TurboBlock``s that merge between attention and MLP.

The first selected layer (counted from 1) runs CLAP, every later one GBM. The patch adds no parameters
(checkpoints load before or after patching), replaces any earlier patch and is undone by ``unpatch``.
ALGM's defaults (window, threshold, published layers) are stated here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from algm.global_merge import global_merge
from algm.local_merge import conditional_pooling
from tokred.attention import AttentionOutput
from tokred.blocks import MidBlock, swap_block
from tokred.errors import UsageError
from tokred.options import Option, block_numbers, boolean, check_depth, is_int, real
from tokred.reducer import TokenReducer, install, uninstall
from tokred.state import MergeState

DEFAULT_WINDOW = (2, 2)
DEFAULT_THRESHOLD = 0.88


def default_selected_layers(depth: int) -> list[int]:
    """ALGM's published layers: 1 and 5 for 12-block encoders (Ti/S/B), 1 and 7 for 24-block ones (L)."""
    return [1, 7] if depth >= 24 else [1, 5]


@dataclass(frozen=True)
class MergeSpec:
    """What one patched block does: CLAP with a window and threshold, or GBM at a 1-based layer index."""

    kind: str
    layer_idx: int
    window_size: tuple[int, int]
    threshold: float


class TurboBlock(MidBlock):
    """A timm ``Block`` that merges tokens between attention and MLP (as ALGM does)."""

    spec: MergeSpec

    def reduce(self, x: torch.Tensor, attn: AttentionOutput, state: MergeState) -> torch.Tensor:
        spec = self.spec
        if spec.kind == "clap":
            return conditional_pooling(x, state, spec.window_size, spec.threshold)
        return global_merge(x, state, spec.layer_idx)


def check_window(value: Any) -> tuple[int, int]:
    """CLAP's window: two positive ints (height, width) holding at least two tokens."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(is_int(v) and v > 0 for v in value)
    if not ok:
        raise UsageError(f"window_size must be two positive ints (height, width), got {value!r}")
    wh, ww = value
    if wh * ww < 2:
        raise UsageError(f"window_size {wh}x{ww} holds a single token; use at least 2 tokens, e.g. (2, 2)")
    return (int(wh), int(ww))


class ALGM(TokenReducer):
    """ALGM: CLAP in the first selected block, GBM with the adaptive threshold in the later ones."""

    name = "algm"
    summary = "ALGM: local (CLAP) then global (GBM) merging at selected blocks (Norouzi et al., CVPR 2024)"
    options = (
        Option("selected_layers", None,
               "Blocks (from 1) where tokens are merged, e.g. --selected-layers 1 5; the first runs CLAP, the "
               "others GBM. Default: 1 5 (1 7 for 24-block encoders).",
               block_numbers("selected_layers", allow_none=True), value_type=int, nargs="+",
               flag="--selected-layers"),
        Option("window_size", DEFAULT_WINDOW, "CLAP window (height width) in patches.", check_window,
               value_type=int, nargs=2, flag="--merging-window-size", from_cli=tuple),
        Option("threshold", DEFAULT_THRESHOLD, "CLAP cosine-similarity threshold, in [-1, 1].",
               real("threshold", -1.0, 1.0), value_type=float, flag="--threshold"),
        Option("prop_attn", False, "Proportional attention (off in the published ALGM).",
               boolean("prop_attn"), value_type=bool),
    )

    @classmethod
    def sweep(cls, encoder: nn.Module) -> list[dict[str, Any]]:
        """The CLAP threshold from 0.95 (mildest) down to 0.80, at the selected layers."""
        return [{"threshold": t} for t in (0.95, 0.92, 0.90, 0.88, 0.85, 0.80)]

    def prepare(self, encoder: nn.Module) -> None:
        depth = len(encoder.blocks)
        layers = self.config["selected_layers"] or default_selected_layers(depth)
        check_depth("selected_layers", layers, depth)
        grid = tuple(encoder.patch_embed.grid_size)
        wh, ww = self.config["window_size"]
        if wh > grid[0] or ww > grid[1]:
            raise UsageError(f"window_size {wh}x{ww} is larger than the {grid[0]}x{grid[1]} patch grid")
        if encoder.num_prefix_tokens not in (1, 2):
            raise UsageError(
                f"ALGM supports a class token and an optional distillation token, not "
                f"{encoder.num_prefix_tokens} prefix tokens"
            )
        self.config["selected_layers"] = list(layers)

    def apply(self, encoder: nn.Module) -> None:
        layers = self.config["selected_layers"]
        for number in layers:
            kind = "clap" if number == layers[0] else "gbm"
            spec = MergeSpec(kind, number, self.config["window_size"], self.config["threshold"])
            swap_block(encoder.blocks[number - 1], TurboBlock, spec)


def algm_segmenter_patch(
    model: nn.Module,
    selected_layers: Sequence[int],
    window_size: Sequence[int] = DEFAULT_WINDOW,
    threshold: float = DEFAULT_THRESHOLD,
    trace_source: bool = False,
    prop_attn: bool = False,
) -> nn.Module:
    """Patch ``model`` (a Segmenter or its encoder) in place with ALGM and return it.

    ``selected_layers`` (1-based, increasing): CLAP in the first, GBM in the others. ``threshold`` is
    CLAP's; GBM's is adaptive. ``trace_source`` keeps every step's patch->token index map in the merge
    state (for visualisation); ``prop_attn`` adds ``log(size)`` to the attention logits (off, as published).
    """
    reducer = ALGM(selected_layers=selected_layers, window_size=window_size, threshold=threshold,
                   prop_attn=prop_attn)
    install(model, reducer, trace_source=trace_source)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore plain timm ``Block``s and the unreduced encoder; a no-op on an unpatched model."""
    uninstall(model)
    return model


def patched_layers(model: nn.Module) -> list[MergeSpec]:
    """The merge steps of a patched model, in block order (empty when unpatched)."""
    encoder = ALGM.target(model)
    return [b.spec for b in encoder.blocks if isinstance(b, TurboBlock)]
