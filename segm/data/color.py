"""RGB <-> HSV on uint8 images with OpenCV's 8-bit conventions, vectorised in torch.

The reference's photometric distortion converts with ``cv2.cvtColor(BGR2HSV / HSV2BGR)`` on
uint8 images: H in [0, 180), S and V in [0, 255]. OpenCV is not a dependency, so the same
arithmetic is reproduced here:

- RGB -> HSV follows OpenCV's fixed-point integer formulas (12-bit shift, rounded divisions by
  v and by 6 * (max - min)); they are tabulated once over (v, max - min) and (hue numerator,
  max - min), so the result is bit-exact with ``cv2.COLOR_BGR2HSV`` on the same colour.
- HSV -> RGB follows OpenCV's float path (S and V scaled by ``1/255`` in float32, six hue sectors,
  round to nearest); it matches OpenCV up to the last-bit float rounding of its C++ code.

Channels are in RGB order; the HSV of a colour does not depend on the channel order of storage.
"""

from __future__ import annotations

import torch

_SHIFT = 12
_HALF = 1 << (_SHIFT - 1)


def _saturation_table() -> torch.Tensor:
    """S for every (v, max - min), flattened as v * 256 + diff: (diff * round((255 << 12) / v) + half) >> 12."""
    v = torch.arange(256, dtype=torch.int64).view(256, 1)
    diff = torch.arange(256, dtype=torch.int64).view(1, 256)
    sdiv = torch.where(v > 0, torch.round((255 << _SHIFT) / v.clamp(min=1)), 0).to(torch.int64)
    return ((diff * sdiv + _HALF) >> _SHIFT).clamp(0, 255).to(torch.uint8).reshape(-1)


def _hue_table() -> torch.Tensor:
    """H for every (numerator + 255, max - min), flattened: (num * round((180 << 12) / (6 diff)) + half) >> 12."""
    numerator = torch.arange(-255, 5 * 255 + 1, dtype=torch.int64).view(-1, 1)
    diff = torch.arange(256, dtype=torch.int64).view(1, 256)
    hdiv = torch.where(diff > 0, torch.round((180 << _SHIFT) / (6 * diff.clamp(min=1))), 0).to(torch.int64)
    hue = (numerator * hdiv + _HALF) >> _SHIFT
    return torch.where(hue < 0, hue + 180, hue).to(torch.uint8).reshape(-1)


_S_TABLE = _saturation_table()
_H_TABLE = _hue_table()
_HUE_SCALE = torch.tensor(6.0 / 180.0, dtype=torch.float32)
_INV_255 = torch.tensor(1.0 / 255.0, dtype=torch.float32)
# Per output channel (R, G, B): bit masks of the hue sectors where it is v (top) and v(1 - s) (bottom).
_SECTOR_ROLES = ((0b100001, 0b001100), (0b000110, 0b110000), (0b011000, 0b000011))


def _check_uint8_image(image: torch.Tensor) -> None:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 tensor of shape [3, H, W], got {image.dtype} {tuple(image.shape)}")


def _lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.index_select(table, 0, index.reshape(-1)).view(index.shape)


def rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [3, H, W] -> uint8 HSV [3, H, W] with H in [0, 180) (OpenCV's 8-bit HSV)."""
    _check_uint8_image(image)
    r, g, b = image.unbind(0)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    diff_long = diff.to(torch.int64)
    s = _lookup(_S_TABLE, v.to(torch.int64).mul_(256).add_(diff_long))
    r, g, b = image.to(torch.int16).unbind(0)
    diff_short = diff.to(torch.int16)
    numerator = torch.where(v == image[0], g - b, torch.where(v == image[1], b - r + 2 * diff_short,
                                                              r - g + 4 * diff_short))
    h = _lookup(_H_TABLE, numerator.to(torch.int64).add_(255).mul_(256).add_(diff_long))
    return torch.stack((h, s, v))


def hsv_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """uint8 HSV [3, H, W] with H in [0, 180) -> uint8 RGB [3, H, W] (OpenCV's 8-bit HSV2RGB).

    In each of the six hue sectors every channel takes one of three values: v (top), v(1 - s)
    (bottom) or the ramp between them, v(1 - s f) falling in odd sectors and v(1 - s(1 - f)) rising
    in even ones. The choice is made with 0/1 uint8 masks, which is much faster than a gather.
    """
    _check_uint8_image(image)
    hue, sat, val = image.to(torch.float32).unbind(0)
    h = hue * _HUE_SCALE
    sector = h.floor()
    f = h - sector
    s = sat * _INV_255
    v = val * _INV_255

    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        return x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)

    top = image[2]
    bottom = to_uint8(v * (1.0 - s))
    sector = sector.to(torch.uint8)
    odd = sector & 1
    middle = to_uint8(v * (1.0 - s * f)) * odd + to_uint8(v * (1.0 - s * (1.0 - f))) * (1 - odd)
    channels = []
    for top_sectors, bottom_sectors in _SECTOR_ROLES:
        is_top = torch.bitwise_right_shift(top_sectors, sector) & 1
        is_bottom = torch.bitwise_right_shift(bottom_sectors, sector) & 1
        channels.append(top * is_top + bottom * is_bottom + middle * (1 - is_top - is_bottom))
    return torch.stack(channels)
