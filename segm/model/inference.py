"""Whole-image inference as in Segmenter: resize up, sliding windows, mean logits, softmax, view averaging.

Windows are forwarded ``batch_size`` at a time in the reference's order (row-major anchors); with ALGM
the merge count is a minimum over each such group, so the grouping is part of the method's semantics.
Each group's logits go straight into one ``WindowCanvas`` per view; views are summed in place.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

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


def channels_last_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of a freshly allocated channels-last ``[B, C, H, W]`` tensor."""
    _, C, H, W = shape
    return (H * W * C, 1, W * C, C)


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of ``[B, K, h, w]`` class logits to the image ``size``, in the layout fastest here.

    On CPU the logits go channels-last, which upsamples about 1.6x faster than NCHW with the same values
    (to float rounding) and stays channels-last: converting a full-size map back would cost more than it
    saves. The input is copied unless it already is a channels-last tensor of that dtype with canonical
    strides (the window canvas): a batch-1 view can pass as channels-last and still make the kernel
    choose NCHW. The dtype is ``upsampling_dtype``. Under the profiler the call is the ``segm::upsample``
    range that the time shares report.
    """
    with section("upsample", prefix="segm::"):
        dtype = upsampling_dtype(logits)
        if logits.device.type == "cpu":
            if logits.dtype != dtype or logits.stride() != channels_last_strides(logits.shape):
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


class WindowCanvas:
    """The sum of window logits and the number of windows over every pixel of one view, filled as windows arrive.

    Windows are added in anchor order straight into one fp32 canvas (channels-last on CPU, the layout
    ``upsample_logits`` takes without a copy), so no stack of window logits and no second full-size map
    is ever built; ``probabilities`` divides in place, upsamples, undoes the flip and applies the softmax.
    """

    def __init__(self, windows: Mapping[str, Any], window_size: int):
        self.anchors = list(windows["anchors"])
        self.shape = tuple(windows["shape"])
        self.flip = bool(windows["flip"])
        self.window_size = window_size
        self.logits: torch.Tensor | None = None
        self.filled = 0

    def add(self, logits: torch.Tensor) -> None:
        """Add the logits ``[n, K, ws, ws]`` of the next ``n`` windows."""
        if self.filled + len(logits) > len(self.anchors):
            raise ValueError(f"{self.filled + len(logits)} windows added to a view cut into {len(self.anchors)}")
        ws = self.window_size
        if self.logits is None:
            H, W = self.shape
            Hp = max(max(ha for ha, _ in self.anchors) + ws, H)
            Wp = max(max(wa for _, wa in self.anchors) + ws, W)
            layout = torch.channels_last if logits.device.type == "cpu" else torch.contiguous_format
            self.logits = torch.empty(1, logits.shape[1], Hp, Wp, dtype=torch.float32, device=logits.device,
                                      memory_format=layout).zero_()
        for window, (ha, wa) in zip(logits, self.anchors[self.filled :]):
            self.logits[0, :, ha : ha + ws, wa : wa + ws] += window
        self.filled += len(logits)

    def probabilities(self, ori_shape: Sequence[int]) -> torch.Tensor:
        """Mean window logits, upsampled to ``ori_shape``, flipped back, softmax in fp32: ``[K, H0, W0]``."""
        if self.logits is None or self.filled != len(self.anchors):
            raise ValueError(f"{self.filled} of {len(self.anchors)} windows were added")
        ws = self.window_size
        count = self.logits.new_zeros((1, 1, *self.logits.shape[2:]))
        for ha, wa in self.anchors:
            count[:, :, ha : ha + ws, wa : wa + ws] += 1
        H, W = self.shape
        logit = upsample_logits(self.logits.div_(count)[:, :, :H, :W], tuple(ori_shape))
        if self.flip:
            logit = torch.flip(logit, (3,))
        return F.softmax(logit[0], 0, dtype=torch.float32)


def merge_windows(windows: Mapping[str, Any], window_size: int, ori_shape: Sequence[int]) -> torch.Tensor:
    """Average the overlapping window logits ``windows["seg_maps"]``, resize to ``ori_shape``, undo the flip,
    softmax: ``[K, H0, W0]``."""
    canvas = WindowCanvas(windows, window_size)
    canvas.add(windows["seg_maps"])
    return canvas.probabilities(ori_shape)


def window_batches(model: nn.Module, crops: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Logits of ``crops`` forwarded ``batch_size`` windows at a time, in order."""
    for i in range(0, len(crops), batch_size):
        yield model(crops[i : i + batch_size])


@torch.no_grad()
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
        canvas = WindowCanvas(windows, window_size)
        for logits in window_batches(model, windows["crop"], batch_size):
            canvas.add(logits)
        probs = canvas.probabilities(ori_shape)
        seg_map = probs if seg_map is None else seg_map.add_(probs)
    return seg_map.div_(len(ims))
