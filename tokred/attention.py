"""The one override of timm's ``Attention`` forward, in three parts, on timm's own weights.

``project_qkv`` -> ``attend`` -> ``project_out`` compute exactly what ``Attention.forward`` computes
(qkv projection, q/k norms, fused ``scaled_dot_product_attention`` or the explicit softmax when
``fused_attn`` is off, optional output norm and gate, output projection); the tests hold them against
timm's own forward so that a timm upgrade that changes it fails loudly. ``attention`` adds what
methods need beside the output without leaving the fused path: the keys averaged over heads (ToMe's
merge metric) and the class token's post-softmax attention row (EViT's attentiveness), one query row
instead of the whole attention matrix. Methods that change the queries (ACT) call the parts directly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention


class AttentionOutput(NamedTuple):
    """The attention output (B, T, C), and on request the head-mean keys (B, T, hd) and the class row (B, h, T)."""

    out: torch.Tensor
    keys: torch.Tensor | None = None
    cls_attn: torch.Tensor | None = None


def project_qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values (B, heads, T, head_dim) after the q/k norms, unscaled."""
    B, T, _ = x.shape
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attend(
    attn: Attention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` per head (B, heads, Tq, head_dim), fused unless ``fused_attn`` is off.

    ``scale`` defaults to the module's ``head_dim ** -0.5``; attention dropout applies in training.
    """
    dropout = attn.attn_drop.p if attn.training else 0.0
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    weights = (q * (attn.scale if scale is None else scale)) @ k.transpose(-2, -1)
    if mask is not None:
        weights = weights + mask
    return attn.attn_drop(weights.softmax(dim=-1)) @ v


def project_out(attn: Attention, heads: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-head outputs (B, heads, T, head_dim) -> (B, T, C): output norm, gate (from the input ``x``), projection."""
    B, _, T, _ = heads.shape
    out = attn.norm(heads.transpose(1, 2).reshape(B, T, attn.attn_dim))
    if attn.gate is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def class_attention(attn: Attention, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The class token's post-softmax attention over every key (B, heads, T), as the explicit path computes it."""
    logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits + mask
    return logits.softmax(dim=-1)[:, :, 0]


def attention(
    attn: Attention,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    keys: bool = False,
    cls_attn: bool = False,
) -> AttentionOutput:
    """timm's attention on ``x`` with an additive ``mask``, plus the head-mean keys and/or the class row."""
    if not (keys or cls_attn):
        return AttentionOutput(attn(x, attn_mask=mask))
    q, k, v = project_qkv(attn, x)
    out = project_out(attn, attend(attn, q, k, v, mask), x)
    return AttentionOutput(
        out,
        keys=k.mean(1) if keys else None,
        cls_attn=class_attention(attn, q, k, mask) if cls_attn else None,
    )
