"""Apply ALGM to a Segmenter (or its ViT encoder) by turning selected timm ``Block``s into ``TurboBlock``s.

The patch adds no parameters (checkpoints load before or after patching), is idempotent and can be
undone with ``unpatch``. Selected layers count from 1: the first runs CLAP, every later one GBM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Sequence

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from algm.global_merge import global_merge
from algm.local_merge import conditional_pooling
from algm.merge import MergeOptions, MergeState, MergingBlock


@dataclass(frozen=True)
class MergeSpec:
    """What one patched block does: CLAP with a window and threshold, or GBM at a 1-based layer index."""

    kind: str
    layer_idx: int
    window_size: tuple[int, int]
    threshold: float


class TurboBlock(Block, MergingBlock):
    """A timm ``Block`` that merges tokens between attention and MLP (as ALGM does)."""

    merge_spec: MergeSpec

    def forward(self, x: torch.Tensor, state: MergeState) -> tuple[torch.Tensor, MergeState]:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=state.attn_bias(x.dtype))))
        spec = self.merge_spec
        if spec.kind == "clap":
            x = conditional_pooling(x, state, spec.window_size, spec.threshold)
        else:
            x = global_merge(x, state, spec.layer_idx)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, state


def _encoder_of(model: nn.Module) -> nn.Module:
    encoder = getattr(model, "encoder", model)
    blocks = getattr(encoder, "blocks", None)
    if (
        blocks is None
        or not hasattr(encoder, "merge_options")
        or not hasattr(encoder, "patch_embed")
        or not all(isinstance(b, Block) for b in blocks)
    ):
        raise TypeError(
            f"ALGM patches a Segmenter or its VisionTransformer encoder built from timm Blocks, "
            f"not {type(model).__name__}"
        )
    return encoder


def _check_layers(selected_layers: Sequence[int], depth: int) -> list[int]:
    layers = list(selected_layers) if isinstance(selected_layers, (list, tuple)) else None
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"selected_layers must be a non-empty list of block numbers in 1..{depth}, got {selected_layers!r}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"selected_layers must be strictly increasing, got {layers}")
    if layers[0] < 1 or layers[-1] > depth:
        raise ValueError(f"selected_layers {layers} out of range: blocks are numbered 1..{depth}")
    return layers


def _check_window(window_size: Sequence[int], grid: tuple[int, int]) -> tuple[int, int]:
    ok = (
        isinstance(window_size, (list, tuple))
        and len(window_size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in window_size)
    )
    if not ok:
        raise ValueError(f"window_size must be two positive ints (height, width), got {window_size!r}")
    wh, ww = window_size
    if wh * ww < 2:
        raise ValueError(f"window_size {wh}x{ww} holds a single token; use at least 2 tokens, e.g. (2, 2)")
    if wh > grid[0] or ww > grid[1]:
        raise ValueError(f"window_size {wh}x{ww} is larger than the {grid[0]}x{grid[1]} patch grid")
    return (wh, ww)


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number (cosine similarity, e.g. 0.88), got {threshold!r}")
    return float(threshold)


def algm_segmenter_patch(
    model: nn.Module,
    selected_layers: Sequence[int],
    window_size: Sequence[int] = (2, 2),
    threshold: float = 0.88,
    trace_source: bool = False,
    prop_attn: bool = False,
) -> nn.Module:
    """Patch ``model`` (a Segmenter or its encoder) in place with ALGM and return it.

    ``selected_layers`` (1-based, increasing): CLAP in the first, GBM in the others. ``threshold`` is
    CLAP's; GBM's is adaptive. ``trace_source`` keeps every step's patch->token index map in the merge
    state (for visualisation); ``prop_attn`` adds ``log(size)`` to the attention logits (off, as published).
    """
    encoder = _encoder_of(model)
    unpatch(model)
    layers = _check_layers(selected_layers, len(encoder.blocks))
    window = _check_window(window_size, tuple(encoder.patch_embed.grid_size))
    threshold = _check_threshold(threshold)
    if encoder.num_prefix_tokens not in (1, 2):
        raise ValueError(f"ALGM supports a class token and an optional distillation token, not {encoder.num_prefix_tokens} prefix tokens")
    for number in layers:
        block = encoder.blocks[number - 1]
        block.__class__ = TurboBlock
        kind = "clap" if number == layers[0] else "gbm"
        block.merge_spec = MergeSpec(kind, number, window, threshold)
    encoder.merge_options = MergeOptions(prop_attn=bool(prop_attn), trace_source=bool(trace_source))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore plain timm ``Block``s and the unmerged encoder; a no-op on an unpatched model."""
    encoder = _encoder_of(model)
    for block in encoder.blocks:
        if isinstance(block, TurboBlock):
            block.__class__ = Block
            del block.merge_spec
    encoder.merge_options = None
    return model


def patched_layers(model: nn.Module) -> list[MergeSpec]:
    """The merge steps of a patched model, in block order (empty when unpatched)."""
    return [b.merge_spec for b in _encoder_of(model).blocks if isinstance(b, TurboBlock)]
