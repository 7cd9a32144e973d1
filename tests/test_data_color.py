"""HSV conversion with OpenCV's 8-bit conventions (H in [0, 180))."""

from __future__ import annotations

import colorsys

import pytest
import torch

from segm.data.color import hsv_to_rgb, rgb_to_hsv

_SDIV = [0] + [round((255 << 12) / v) for v in range(1, 256)]
_HDIV = [0] + [round((180 << 12) / (6 * d)) for d in range(1, 256)]


def opencv_hsv(r: int, g: int, b: int) -> tuple[int, int, int]:
    """OpenCV's scalar RGB2HSV_b for one pixel, transcribed from its fixed-point definition."""
    v = max(r, g, b)
    diff = v - min(r, g, b)
    s = (diff * _SDIV[v] + 2048) >> 12
    if v == r:
        h = g - b
    elif v == g:
        h = b - r + 2 * diff
    else:
        h = r - g + 4 * diff
    h = (h * _HDIV[diff] + 2048) >> 12
    return (h + 180 if h < 0 else h), s, v


def as_image(colours: list[tuple[int, int, int]]) -> torch.Tensor:
    return torch.tensor(colours, dtype=torch.uint8).T.reshape(3, 1, -1)


@pytest.mark.parametrize(
    ("rgb", "hsv"),
    [((255, 0, 0), (0, 255, 255)), ((0, 255, 0), (60, 255, 255)), ((0, 0, 255), (120, 255, 255)),
     ((128, 128, 128), (0, 0, 128)), ((255, 128, 0), (15, 255, 255)), ((10, 20, 30), (105, 170, 30)),
     ((0, 0, 0), (0, 0, 0)), ((255, 0, 1), (0, 255, 255)), ((255, 0, 9), (179, 255, 255))],
)
def test_known_colours(rgb, hsv):
    assert tuple(rgb_to_hsv(as_image([rgb])).flatten().tolist()) == hsv


def test_rgb_to_hsv_matches_opencv_formula_on_a_colour_lattice():
    levels = list(range(0, 256, 17)) + [1, 254]
    colours = [(r, g, b) for r in levels for g in levels for b in levels]
    got = rgb_to_hsv(as_image(colours)).reshape(3, -1).T.tolist()
    assert got == [list(opencv_hsv(*c)) for c in colours]


def test_hue_stays_below_180_and_types_are_uint8():
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    hsv = rgb_to_hsv(image)
    assert hsv.dtype == torch.uint8 and int(hsv[0].max()) < 180
    assert hsv_to_rgb(hsv).dtype == torch.uint8


def test_hsv_to_rgb_agrees_with_float_reference():
    hsv = torch.stack(torch.meshgrid(torch.arange(0, 180, 7), torch.arange(0, 256, 15), torch.arange(0, 256, 15),
                                     indexing="ij")).reshape(3, 1, -1).to(torch.uint8)
    got = hsv_to_rgb(hsv).reshape(3, -1).T.tolist()
    for (h, s, v), rgb in zip(hsv.reshape(3, -1).T.tolist(), got):
        expected = [round(255 * c) for c in colorsys.hsv_to_rgb(h / 180, s / 255, v / 255)]
        assert max(abs(a - b) for a, b in zip(rgb, expected)) <= 1


def test_round_trip_is_close_and_exact_for_greys():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    back = hsv_to_rgb(rgb_to_hsv(image))
    assert (back.int() - image.int()).abs().max() <= 6
    greys = torch.arange(256, dtype=torch.uint8).repeat(3, 1).reshape(3, 1, 256)
    assert torch.equal(hsv_to_rgb(rgb_to_hsv(greys)), greys)


def test_rejects_non_uint8_images():
    with pytest.raises(ValueError, match="uint8"):
        rgb_to_hsv(torch.zeros(3, 4, 4))
