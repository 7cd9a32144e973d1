"""Whole-image inference as in Segmenter: resize up, sliding windows, mean logits, softmax, view averaging.

Windows are forwarded ``batch_size`` at a time in the reference's order (row-major anchors); with ALGM
the merge count is a minimum over each such group, so the grouping is part of the method's semantics.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokred.profiling import section


def padding(im: torch.Tensor, patch_size: int, fill_value: float = 0.0) -> torch.Tensor:
    """Pad the bottom and right of ``[B, C, H, W]`` so that H and W are multiples of ``patch_size``."""
    H, W = im.shape[2], im.shape[3]
    pad_h, pad_w = (-H) % patch_size, (-W) % patch_size
    if pad_h or pad_w:
        im = F.pad(im, (0, pad_w, 0, pad_h), value=fill_value)
    return im


def unpadding(y: torch.Tensor, target_size: tuple[int, int]) -> torch.Tensor:
    """Crop the bottom and right of ``[B, C, H', W']`` back to ``target_size = (H, W)``."""
    H, W = target_size
    return y[:, :, :H, :W]


def upsampling_dtype(logits: torch.Tensor) -> torch.dtype:
    """fp16 under fp16 autocast, else at least fp32: the precision whose argmax the evaluation can bear.

    On the demo checkpoint, fp16 upsampling agrees with fp32 on 99.987 % of the pixels (worst image
    99.93 %); bf16 on only 99.917 % (worst 99.66 %), so bf16 logits are upsampled in fp32
    (``benchmarks/upsampling.py`` measures both).
    """
    device = logits.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16:
        return torch.float16
    return torch.promote_types(logits.dtype, torch.float32)


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of ``[B, K, h, w]`` class logits to the image ``size``, in the layout fastest here.

    On CPU the logits go channels-last, which upsamples about 1.6x faster than NCHW with the same values
    (to float rounding) and stays channels-last: converting a full-size map back would cost more than it
    saves. The small input is always copied, so that its strides are canonical: a batch-1 view can pass as
    channels-last and still make the kernel choose NCHW. The dtype is ``upsampling_dtype``. Under the
    profiler the call is the ``segm::upsample`` range that the time shares report.
    """
    with section("upsample", prefix="segm::"):
        dtype = upsampling_dtype(logits)
        if logits.device.type == "cpu":
            logits = logits.to(dtype, memory_format=torch.channels_last, copy=True)
        else:
            logits = logits.to(dtype)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def resize(im: torch.Tensor, smaller_size: int) -> torch.Tensor:
    """Scale up (never down) so that the short side is at least ``smaller_size``, keeping the aspect.

    Sizes follow the reference exactly: the long side becomes ``int(ratio * smaller_size)``.
    """
    h, w = im.shape[2], im.shape[3]
    if min(h, w) >= smaller_size:
        return im
    if h < w:
        h_res, w_res = smaller_size, (w / h) * smaller_size
    else:
        h_res, w_res = (h / w) * smaller_size, smaller_size
    return F.interpolate(im, (int(h_res), int(w_res)), mode="bilinear", align_corners=False)


def window_anchors(length: int, window_size: int, stride: int) -> list[int]:
    """Window starts along one axis: every ``stride`` below ``length - window_size``, then one flush with the end."""
    return [a for a in range(0, length, stride) if a < length - window_size] + [length - window_size]


def sliding_window(
    im: torch.Tensor, flip: bool, window_size: int, window_stride: int
) -> dict[str, Any]:
    """Cut ``[1, C, H, W]`` into ``window_size`` squares (row-major anchors).

    Returns ``crop`` ``[n, C, ws, ws]``, ``anchors``, ``flip`` and ``shape = (H, W)``. An image smaller
    than the window on a side is zero-padded to it (bottom/right); ``merge_windows`` crops that away.
    """
    if im.ndim != 4 or im.shape[0] != 1:
        raise ValueError(f"sliding_window expects a single image [1, C, H, W], got {tuple(im.shape)}")
    H, W = im.shape[2], im.shape[3]
    ws = window_size
    padded = F.pad(im, (0, max(ws - W, 0), 0, max(ws - H, 0)))
    Hp, Wp = padded.shape[2], padded.shape[3]
    anchors = [(ha, wa) for ha in window_anchors(Hp, ws, window_stride) for wa in window_anchors(Wp, ws, window_stride)]
    crops = torch.stack([padded[0, :, ha : ha + ws, wa : wa + ws] for ha, wa in anchors])
    return {"crop": crops, "anchors": anchors, "flip": flip, "shape": (H, W)}


def merge_windows(windows: Mapping[str, Any], window_size: int, ori_shape: Sequence[int]) -> torch.Tensor:
    """Average overlapping window logits, resize to ``ori_shape``, undo the flip, softmax: ``[K, H0, W0]``."""
    seg_maps = windows["seg_maps"]
    anchors = windows["anchors"]
    H, W = windows["shape"]
    ws = window_size
    Hp = max(max(ha for ha, _ in anchors) + ws, H)
    Wp = max(max(wa for _, wa in anchors) + ws, W)
    logit = seg_maps.new_zeros((seg_maps.shape[1], Hp, Wp))
    count = seg_maps.new_zeros((1, Hp, Wp))
    for window, (ha, wa) in zip(seg_maps, anchors):
        logit[:, ha : ha + ws, wa : wa + ws] += window
        count[:, ha : ha + ws, wa : wa + ws] += 1
    logit = (logit / count)[:, :H, :W]
    logit = F.interpolate(logit.unsqueeze(0), tuple(ori_shape), mode="bilinear", align_corners=False)[0]
    if windows["flip"]:
        logit = torch.flip(logit, (2,))
    return F.softmax(logit, 0)


def forward_windows(model: nn.Module, crops: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits of ``crops`` forwarded ``batch_size`` windows at a time, in order, as float32."""
    with torch.no_grad():
        return torch.cat([model(crops[i : i + batch_size]).float() for i in range(0, len(crops), batch_size)])


def inference(
    model: nn.Module,
    ims: Sequence[torch.Tensor],
    ims_metas: Sequence[Mapping[str, Any]],
    ori_shape: Sequence[int],
    window_size: int,
    window_stride: int,
    batch_size: int,
) -> torch.Tensor:
    """Class probabilities ``[K, H0, W0]`` of one image, averaged over its views (scales, flips).

    Each view ``[1, 3, h, w]`` is scaled up to at least ``window_size``, cut into sliding windows,
    forwarded ``batch_size`` windows at a time, and merged back at ``ori_shape``.
    """
    device = next(model.parameters()).device
    seg_map = None
    for im, meta in zip(ims, ims_metas):
        im = resize(im.to(device), window_size)
        windows = sliding_window(im, bool(meta["flip"]), window_size, window_stride)
        windows["seg_maps"] = forward_windows(model, windows.pop("crop"), batch_size)
        probs = merge_windows(windows, window_size, ori_shape)
        seg_map = probs if seg_map is None else seg_map + probs
    return seg_map / len(ims)
