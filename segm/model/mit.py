"""SegFormer's Mix Transformer (MiT-B0 ... B5), with mmsegmentation 1.x parameter names.

Four stages, each an overlapping patch embedding (strided convolution + LayerNorm), blocks of efficient
self-attention (keys and values from a ``sr x sr`` strided convolution of the tokens, then LayerNorm)
and a Mix-FFN (1 x 1 conv, depth-wise 3 x 3 conv, GELU, 1 x 1 conv), and a stage LayerNorm; every
LayerNorm has eps 1e-6. ``backbone.layers.{stage}.{0: patch embed, 1: blocks, 2: norm}`` are the
names mmseg's checkpoints use, so official SegFormer and SegFormer++ weights load strictly.

Attention is split into ``kv_tokens`` (the spatial reduction) and ``attend`` (projections, fused
``scaled_dot_product_attention``, output projection) so that token merging can act between them.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from tokred.reducer import Pure, TokenReducer

LN_EPS = 1e-6


def nlc_to_nchw(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) map."""
    B, _, C = x.shape
    return x.transpose(1, 2).reshape(B, C, *hw)


def nchw_to_nlc(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) map -> (B, H*W, C) tokens."""
    return x.flatten(2).transpose(1, 2)


class OverlapPatchEmbed(nn.Module):
    """A ``k x k`` convolution with stride ``s`` and padding ``k // 2``, then LayerNorm; returns tokens and the grid."""

    def __init__(self, in_channels: int, embed_dims: int, kernel_size: int, stride: int):
        super().__init__()
        self.projection = nn.Conv2d(in_channels, embed_dims, kernel_size, stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(embed_dims, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.projection(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(nchw_to_nlc(x)), hw


class PackedAttention(nn.Module):
    """Multi-head attention with ``torch.nn.MultiheadAttention``'s parameters (``in_proj_*``, ``out_proj``).

    Queries and keys/values may differ in length; the products run in fused ``scaled_dot_product_attention``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim)) if qkv_bias else None
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        B, Tq, C = query.shape
        w_q, w_kv = self.in_proj_weight.split([C, 2 * C])
        b_q, b_kv = self.in_proj_bias.split([C, 2 * C]) if self.in_proj_bias is not None else (None, None)
        h = self.num_heads
        q = F.linear(query, w_q, b_q).reshape(B, Tq, h, C // h).transpose(1, 2)
        k, v = F.linear(kv, w_kv, b_kv).reshape(B, kv.shape[1], 2, h, C // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, Tq, C))


class EfficientAttention(nn.Module):
    """SegFormer's efficient self-attention: keys and values from a spatially reduced copy of the tokens."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.sr_ratio = sr_ratio
        self.attn = PackedAttention(dim, num_heads, qkv_bias, attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def kv_tokens(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """The key/value tokens and their grid: the tokens themselves, or their ``sr x sr`` reduction, normed."""
        if self.sr_ratio == 1:
            return x, hw
        reduced = self.sr(nlc_to_nchw(x, hw))
        return self.norm(nchw_to_nlc(reduced)), (reduced.shape[2], reduced.shape[3])

    def attend(self, query: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Attention of ``query`` tokens over ``kv`` tokens, with the output dropout."""
        return self.proj_drop(self.attn(query, kv))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return self.attend(x, self.kv_tokens(x, hw)[0])


class MixFFN(nn.Module):
    """1 x 1 conv, 3 x 3 depth-wise conv (the positional information), GELU, 1 x 1 conv, on the token map."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(dim, hidden, 1),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
            nn.GELU(),
            nn.Dropout(drop),
            nn.Conv2d(hidden, dim, 1),
            nn.Dropout(drop),
        )

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return nchw_to_nlc(self.layers(nlc_to_nchw(x, hw)))


class MiTBlock(nn.Module):
    """Pre-norm block: ``x + drop_path(attn(norm1 x))``, then ``x + drop_path(ffn(norm2 x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, sr_ratio: int, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = EfficientAttention(dim, num_heads, sr_ratio, qkv_bias, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.ffn = MixFFN(dim, mlp_ratio * dim, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.ffn(self.norm2(x), hw))


class MixVisionTransformer(nn.Module):
    """The MiT backbone: four stages, feature maps at strides 4, 8, 16 and 32; ``reducer`` is its token
    reduction (``Pure`` unless a patch type such as SegFormer++'s merging is applied)."""

    def __init__(
        self,
        embed_dims: int,
        num_layers: Sequence[int],
        num_heads: Sequence[int],
        patch_sizes: Sequence[int] = (7, 3, 3, 3),
        strides: Sequence[int] = (4, 2, 2, 2),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratio: int = 4,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        in_channels: int = 3,
    ):
        super().__init__()
        self.widths = [embed_dims * h for h in num_heads]
        self.strides = list(strides)
        self.sr_ratios = list(sr_ratios)
        rates = torch.linspace(0, drop_path_rate, sum(num_layers), device="cpu").tolist()
        self.layers = nn.ModuleList()
        start = 0
        for i, depth in enumerate(num_layers):
            width = self.widths[i]
            blocks = nn.ModuleList(
                MiTBlock(width, num_heads[i], mlp_ratio, sr_ratios[i], qkv_bias, drop_rate, attn_drop_rate,
                         rates[start + j])
                for j in range(depth)
            )
            embed = OverlapPatchEmbed(in_channels, width, patch_sizes[i], strides[i])
            self.layers.append(nn.ModuleList([embed, blocks, nn.LayerNorm(width, eps=LN_EPS)]))
            in_channels = width
            start += depth
        self.reducer: TokenReducer = Pure()
        self.apply(init_weights)

    @property
    def output_stride(self) -> int:
        """The stride of the last stage (32)."""
        return math.prod(self.strides)

    @property
    def blocks(self) -> list[MiTBlock]:
        """Every block of every stage, in order."""
        return [block for stage in self.layers for block in stage[1]]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for embed, blocks, norm in self.layers:
            x, hw = embed(x)
            for block in blocks:
                x = block(x, hw)
            x = nlc_to_nchw(norm(x), hw)
            outs.append(x)
        return outs


def init_weights(module: nn.Module) -> None:
    """mmseg's MiT initialisation: truncated-normal linears, unit LayerNorms, fan-out normal convolutions."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
