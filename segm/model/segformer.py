"""SegFormer: the MiT backbone and the all-MLP head, as mmsegmentation builds them (``backbone.*``,
``decode_head.*`` parameter names), producing per-pixel class logits ``[B, K, H, W]`` for any input size.

The head projects every stage to ``channels`` with a 1 x 1 convolution (no bias) + BatchNorm (eps 1e-5)
+ ReLU, resizes the four maps bilinearly (align_corners False) to the stage-1 grid (stride 4),
concatenates them in stage order c1 ... c4, fuses them with another 1 x 1 conv + BN + ReLU, applies
dropout and ``conv_seg``; the stride-4 logits are resized bilinearly to the input size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from segm.model.inference import upsample_logits
from segm.model.mit import MixVisionTransformer
from segm.model.segmenter import check_image_batch
from segm.model.weights import check_state_dict, read_checkpoint, strip_prefix, to_float32, unwrap
from tokred.errors import UsageError

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

    def parameter_groups(self, weight_decay: float, head_lr_mult: float) -> list[dict[str, Any]]:
        """mmseg's SegFormer optimizer rules: no weight decay on norms, ``head_lr_mult`` x lr on the head."""
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            head = name.startswith("decode_head.")
            key = (head_lr_mult if head else 1.0, 0.0 if "norm" in name and not head else weight_decay)
            groups.setdefault(key, []).append(param)
        return [{"params": params, "lr_mult": mult, "weight_decay": decay} for (mult, decay), params in groups.items()]

    def forward(self, im: torch.Tensor) -> torch.Tensor:
        check_image_batch(im, self.backbone.layers[0][0].projection.in_channels)
        stride = self.backbone.output_stride
        if min(im.shape[2:]) < stride:
            raise UsageError(f"SegFormer needs inputs of at least {stride} pixels a side (its stage-4 stride), "
                             f"got {im.shape[2]}x{im.shape[3]}")
        logits = self.decode_head(self.backbone(im))
        return upsample_logits(logits, im.shape[2:])


MIT_KEYS = {"backbone", "family", "image_size", "embed_dims", "num_layers", "num_heads", "sr_ratios", "normalization",
            "n_cls", "decoder", "dropout", "drop_path_rate"}


def create_segformer(net_kwargs: Mapping[str, Any], pretrained: bool | str | Path = False) -> SegFormer:
    """A SegFormer from a variant's ``net_kwargs`` (a ``mit_b*`` backbone entry plus the ``segformer`` decoder).

    ``pretrained`` is a local file of ImageNet MiT weights (mmseg's ``mit_b*.pth`` or the original SegFormer
    release); there are no hub weights to fetch.
    """
    unknown = sorted(set(net_kwargs) - MIT_KEYS)
    if unknown:
        raise UsageError(f"unknown SegFormer settings: {', '.join(unknown)}")
    decoder = net_kwargs["decoder"]
    backbone = MixVisionTransformer(
        embed_dims=net_kwargs["embed_dims"],
        num_layers=net_kwargs["num_layers"],
        num_heads=net_kwargs["num_heads"],
        sr_ratios=net_kwargs["sr_ratios"],
        drop_rate=net_kwargs.get("dropout", 0.0),
        drop_path_rate=net_kwargs.get("drop_path_rate", 0.1),
    )
    if pretrained is True:
        raise UsageError(f"no hub weights are known for {net_kwargs['backbone']}: pass ImageNet MiT weights with "
                         "--pretrained PATH (mmseg's mit_b*.pth or the original SegFormer release), or --no-pretrained")
    if pretrained:
        load_pretrained_backbone(backbone, Path(pretrained))
    head = SegformerHead(backbone.widths, decoder["channels"], net_kwargs["n_cls"], decoder.get("dropout", 0.1))
    return SegFormer(backbone, head, net_kwargs["n_cls"])


def from_original_release(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MiT weights of the original SegFormer release (``patch_embed1``, ``block1``, ``norm1``, ...) in mmseg's names.

    Queries and key/values join into ``in_proj_weight`` / ``in_proj_bias``, the linear layers of the
    Mix-FFN become 1 x 1 convolutions, classification-head weights are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        head, _, rest = key.partition(".")
        if key.startswith("head") or ".attn.kv." in key:
            continue
        if head.startswith("patch_embed"):
            key = f"layers.{int(head[11:]) - 1}.0.{rest.replace('proj.', 'projection.')}"
        elif head.startswith("norm"):
            key = f"layers.{int(head[4:]) - 1}.2.{rest}"
        elif head.startswith("block"):
            key = f"layers.{int(head[5:]) - 1}.1.{rest}"
            if ".attn.q." in key:
                value = torch.cat([value, weights[f"{head}.{rest.replace('attn.q.', 'attn.kv.')}"]])
                key = key.replace(".attn.q.", ".attn.attn.in_proj_")
            elif ".attn.proj." in key:
                key = key.replace(".attn.proj.", ".attn.attn.out_proj.")
            elif ".mlp." in key:
                if ".fc1.weight" in key or ".fc2.weight" in key:
                    value = value.reshape(*value.shape, 1, 1)
                key = key.replace(".mlp.fc1.", ".ffn.layers.0.").replace(".mlp.dwconv.dwconv.", ".ffn.layers.1.")
                key = key.replace(".mlp.fc2.", ".ffn.layers.4.")
        out[key] = value
    return out


def load_pretrained_backbone(backbone: MixVisionTransformer, path: Path) -> None:
    """Initialise ``backbone`` from an ImageNet MiT file in mmseg's layout or the original release's, strictly."""
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weight file not found: {path}")
    data = unwrap(read_checkpoint(path), ("state_dict", "model"))
    weights = strip_prefix(strip_prefix(data, "module."), "backbone.")
    if any(k.startswith("patch_embed1.") for k in weights):
        weights = from_original_release(weights)
    check_state_dict(backbone, weights, f"pretrained MiT weights {path}")
    backbone.load_state_dict(to_float32(weights), strict=True)
