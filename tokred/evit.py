"""EViT, attentive-token pruning with a fused token (Liang et al., ICLR 2022), as Expedite runs it on Segmenter.

In a pruning block, after the attention residual and before the MLP: the attentiveness of every
non-prefix token is the class token's post-softmax attention to it, averaged over heads; the
``K = ceil(keep_rate * (T - n_prefix))`` most attentive tokens are kept, reordered by descending
attentiveness (``topk``, as upstream); with ``fuse_token`` one token is appended, the
attentiveness-weighted **sum** of the pruned tokens (raw weights). ``K`` counts every non-prefix token,
an earlier fused token included: a fused token is an ordinary token afterwards. A distillation token
keeps its place and is never scored, pruned or fused: the sequence is ``[cls, (dist), kept, (fused)]``.

Dense output (Expedite restores the pruned tokens before the decoder): with ``restore="nearest"`` every
pruned token takes the final output of its nearest kept token of that stage (Euclidean distance on the
un-normed residual stream at the pruning point); with ``restore="fused"`` it takes the output at that
stage's fused slot. Both are index-map steps of the merge state (``reassign``), so walking the stages
back is one gather at the end, batched, with no per-method decoder code. Expedite computes the nearest
copy with its reconstruction layer (k = 1, ``exp(-0.005 d^2)`` weights): identical, except that there
a pruned token farther than about 143 (in feature norm) from every kept token underflows to a zero
output, where here it still copies its nearest kept token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from tokred.attention import AttentionOutput
from tokred.bipartite import check_prefix
from tokred.blocks import MidBlock, swap_block
from tokred.errors import UsageError
from tokred.options import Option, block_numbers, boolean, check_depth, one_of, real
from tokred.precision import fp32_island
from tokred.reducer import TokenReducer
from tokred.state import MergeState

RESTORE = ("nearest", "fused")


def default_drop_layers(depth: int) -> list[int]:
    """EViT's pruning blocks scaled to the depth: 4, 7, 10 of 12 blocks (upstream), 8, 14, 20 of 24 (Expedite's ViT-L)."""
    return sorted({min(max(round(depth * k / 12), 1), depth) for k in (4, 7, 10)})


@dataclass(frozen=True)
class PruneSpec:
    """What one pruning block does."""

    keep_rate: float
    fuse_token: bool
    restore: str


def complement(kept: torch.Tensor, count: int) -> torch.Tensor:
    """The indices in ``0..count-1`` that ``kept`` (B, K) does not hold, ascending: (B, count - K)."""
    positions = torch.arange(count, device=kept.device).expand(kept.shape[0], -1)
    marked = positions.scatter(1, kept, torch.full_like(kept, count))
    return marked.sort(dim=1).values[:, : count - kept.shape[1]]


@fp32_island
def attentiveness(cls_attn: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """EViT's score of every non-prefix token: the class token's attention to it, averaged over heads, in fp32."""
    return cls_attn[:, :, n_prefix:].float().mean(dim=1)


@fp32_island
def nearest_kept(features: torch.Tensor, kept: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """For every pruned token, the rank (0..K-1) of its nearest kept token by squared Euclidean distance.

    ``features`` (B, n, C) are the non-prefix tokens; the distance is expanded as
    ``|f|^2 + |s|^2 - 2 f.s`` in fp32, as the reference's reconstruction layer computes it.
    """
    C = features.shape[-1]
    f = features.float()
    src = f.gather(1, pruned.unsqueeze(-1).expand(-1, -1, C))
    dst = f.gather(1, kept.unsqueeze(-1).expand(-1, -1, C))
    dist = src.square().sum(-1, keepdim=True) + dst.square().sum(-1).unsqueeze(1) - 2 * src @ dst.transpose(1, 2)
    return dist.argmin(dim=-1)


class EViTBlock(MidBlock):
    """A block that prunes inattentive tokens (and fuses them) after its attention."""

    spec: PruneSpec
    needs_cls_attn = True

    def reduce(self, x: torch.Tensor, attn: AttentionOutput, state: MergeState) -> torch.Tensor:
        spec = self.spec
        B, T, C = x.shape
        n = state.n_prefix
        count = T - n
        K = math.ceil(spec.keep_rate * count)
        if K >= count:
            return x
        scores = attentiveness(attn.cls_attn, n)
        with torch.no_grad():
            kept = scores.topk(K, dim=1, largest=True, sorted=True).indices
            pruned = complement(kept, count)
            dest = torch.empty(B, T, dtype=torch.long, device=x.device)
            dest[:, :n] = torch.arange(n, device=x.device)
            dest[:, n:].scatter_(1, kept, n + torch.arange(K, device=x.device).expand(B, -1))
            if spec.restore == "fused":
                target = torch.full_like(pruned, n + K)
            else:
                target = n + nearest_kept(x[:, n:], kept, pruned)
            dest[:, n:].scatter_(1, pruned, target)
        others = x[:, n:]
        parts = [x[:, :n], others.gather(1, kept.unsqueeze(-1).expand(-1, -1, C))]
        if spec.fuse_token:
            weights = scores.gather(1, pruned).unsqueeze(-1).to(x.dtype)
            parts.append((others.gather(1, pruned.unsqueeze(-1).expand(-1, -1, C)) * weights).sum(1, keepdim=True))
        x = torch.cat(parts, dim=1)
        state.reassign(dest, x.shape[1])
        return x


class EViT(TokenReducer):
    """EViT: keep the most attended tokens at a few blocks, fuse the rest into one token."""

    name = "evit"
    summary = "EViT: prune the tokens the class token attends least, fuse them into one (Liang et al., ICLR 2022)"
    options = (
        Option("keep_rate", 0.7, "Fraction of the non-prefix tokens kept at each pruning block, in (0, 1].",
               real("keep_rate", 0.0, 1.0, low_open=True), value_type=float),
        Option("drop_layers", None, "Pruning blocks, counted from 1 (default: 4 7 10 of 12 blocks, 8 14 20 of 24).",
               block_numbers("drop_layers", allow_none=True), value_type=int, nargs="+"),
        Option("fuse_token", True, "Append the attentiveness-weighted sum of the pruned tokens.",
               boolean("fuse_token"), value_type=bool),
        Option("restore", "nearest", "What a pruned patch outputs: its nearest kept token's output (as Expedite) "
               "or the fused token's.", one_of("restore", RESTORE), value_type=str, choices=RESTORE),
    )

    @classmethod
    def sweep(cls, encoder: nn.Module) -> list[dict[str, Any]]:
        """EViT's and Expedite's keep rates."""
        return [{"keep_rate": k} for k in (0.9, 0.8, 0.7, 0.5)]

    def prepare(self, encoder: nn.Module) -> None:
        check_prefix(encoder.num_prefix_tokens)
        depth = len(encoder.blocks)
        layers = self.config["drop_layers"] or default_drop_layers(depth)
        check_depth("drop_layers", layers, depth)
        if self.config["restore"] == "fused" and not self.config["fuse_token"]:
            raise UsageError("restore='fused' copies the fused token's output: it needs fuse_token=True")
        self.config["drop_layers"] = list(layers)

    def apply(self, encoder: nn.Module) -> None:
        spec = PruneSpec(self.config["keep_rate"], self.config["fuse_token"], self.config["restore"])
        for number in self.config["drop_layers"]:
            swap_block(encoder.blocks[number - 1], EViTBlock, spec)
