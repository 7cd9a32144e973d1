"""SegFormer: the MiT backbone and the all-MLP head, as mmsegmentation builds them (``backbone.*``,
``decode_head.*`` parameter names), producing per-pixel class logits ``[B, K, H, W]`` for any input size.

The head projects every stage to ``channels`` with a 1 x 1 convolution (no bias) + BatchNorm (eps 1e-5)
+ ReLU, resizes the four maps bilinearly (align_corners False) to the stage-1 grid (stride 4),
concatenates them in stage order c1 ... c4, fuses them with another 1 x 1 conv + BN + ReLU, applies
dropout and ``conv_seg``; the stride-4 logits are resized bilinearly to the input size.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from segm.model.mit import MixVisionTransformer
from segm.model.segmenter import check_image_batch

BN_EPS = 1e-5


class ConvModule(nn.Module):
    """mmcv's ConvModule as the head uses it: 1 x 1 convolution without bias, BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class SegformerHead(nn.Module):
    """The all-MLP decoder: four projected and upsampled stages, fused, then classified per pixel (stride 4)."""

    def __init__(self, in_channels: Sequence[int], channels: int, n_cls: int, dropout: float = 0.1):
        super().__init__()
        self.n_cls = n_cls
        self.convs = nn.ModuleList(ConvModule(c, channels) for c in in_channels)
        self.fusion_conv = ConvModule(channels * len(in_channels), channels)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, n_cls, 1)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]
        maps = [F.interpolate(conv(f), size=size, mode="bilinear", align_corners=False)
                for conv, f in zip(self.convs, features)]
        return self.conv_seg(self.dropout(self.fusion_conv(torch.cat(maps, dim=1))))


class SegFormer(nn.Module):
    """MiT backbone + SegFormer head; logits at the input size. The backbone holds the token reducer."""

    def __init__(self, backbone: MixVisionTransformer, decode_head: SegformerHead, n_cls: int):
        super().__init__()
        self.n_cls = n_cls
        self.backbone = backbone
        self.decode_head = decode_head

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    def forward(self, im: torch.Tensor) -> torch.Tensor:
        check_image_batch(im, self.backbone.layers[0][0].projection.in_channels)
        logits = self.decode_head(self.backbone(im))
        return F.interpolate(logits, size=im.shape[2:], mode="bilinear", align_corners=False)
