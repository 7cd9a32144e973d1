"""Encoder blocks that take part in token reduction, installed by class swap on timm ``Block``s.

A ``ReductionBlock`` receives the ``MergeState`` (``forward(x, state)``); a ``MidBlock`` is the common
shape of ALGM, ToMe and EViT: attention residual, then a reduction step, then the MLP residual on the
reduced tokens. ``run_block`` is how an encoder calls any block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from tokred.attention import AttentionOutput, attention
from tokred.precision import compute_dtype
from tokred.profiling import section
from tokred.state import MergeState


class ReductionBlock(Block):
    """A timm ``Block`` whose forward takes the merge state: ``forward(x, state) -> x``.

    Reducers turn selected blocks into subclasses of this by class swap (no new parameters) and keep
    what the block needs in ``block.spec``; ``restore_blocks`` turns them back into plain ``Block``s.
    """

    spec: Any

    def forward(self, x: torch.Tensor, state: MergeState) -> torch.Tensor:  # type: ignore[override]
        raise NotImplementedError


def swap_block(block: Block, cls: type[ReductionBlock], spec: Any) -> None:
    """Turn a plain timm ``block`` into ``cls`` in place, with its per-block settings ``spec``."""
    block.__class__ = cls
    block.spec = spec


def restore_blocks(encoder: nn.Module) -> None:
    """Every ``ReductionBlock`` of ``encoder`` back to a plain timm ``Block``."""
    for block in encoder.blocks:
        if isinstance(block, ReductionBlock):
            block.__class__ = Block
            del block.spec


def run_block(block: nn.Module, x: torch.Tensor, state: MergeState) -> torch.Tensor:
    """Run one encoder block: reduction blocks get the state, plain blocks the proportional-attention mask."""
    if isinstance(block, ReductionBlock):
        return block(x, state)
    return block(x, attn_mask=state.attn_bias(compute_dtype(x)))


class MidBlock(ReductionBlock):
    """Attention residual -> ``reduce`` -> MLP residual, as ALGM, ToMe and EViT place their step.

    ``needs_keys`` / ``needs_cls_attn`` ask the attention for the head-mean keys or the class row
    (computed beside timm's fused attention); the proportional-attention mask comes from the state.
    """

    needs_keys = False
    needs_cls_attn = False

    def forward(self, x: torch.Tensor, state: MergeState) -> torch.Tensor:  # type: ignore[override]
        out = attention(self.attn, self.norm1(x), state.attn_bias(compute_dtype(x)), keys=self.needs_keys,
                        cls_attn=self.needs_cls_attn)
        x = x + self.drop_path1(self.ls1(out.out))
        with section("reduce"):
            x = self.reduce(x, out, state)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def reduce(self, x: torch.Tensor, attn: AttentionOutput, state: MergeState) -> torch.Tensor:
        """The reduction step on the residual stream after attention; returns the new tokens."""
        raise NotImplementedError
