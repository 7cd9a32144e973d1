"""The reference's mmseg 0.14 training and validation pipelines on ``torchvision.transforms.v2``.

Images travel as ``tv_tensors.Image`` (uint8 RGB until normalisation) and label maps as
``tv_tensors.Mask`` (uint8 class ids, 255 = ignore), so the v2 functionals pick the right kernel:
images are resized bilinearly without antialiasing (the closest match to OpenCV's
``INTER_LINEAR`` used by mmcv; both use half-pixel centres, torch's uint8 kernel rounds with
fixed-point weights like OpenCV and differs from it by at most one grey level), masks with
OpenCV's ``INTER_NEAREST`` index rule computed exactly (:func:`resize_mask`).

Every random step draws from a ``torch.Generator`` passed in by the caller, never from global
state, so a sample is a pure function of its image, its label and its seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from segm.data.color import hsv_to_rgb, rgb_to_hsv
from tokred.errors import UsageError

IGNORE_INDEX = 255
MULTISCALE_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
STATS = {
    "vit": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    "deit": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "imagenet": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
}
# mmseg's ImageNet statistics on the 0..255 scale as SegFormer's configs write them (not rounded).
EXACT_PIXEL_STATS = {"imagenet": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))}

Pair = tuple[tv_tensors.Image, tv_tensors.Mask]


def pixel_stats(normalization: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std on the 0..255 scale: ``STATS`` x 255 rounded to 2 decimals, as Segmenter does, or the
    exact values of mmseg's configs (``imagenet``, SegFormer's)."""
    if normalization not in STATS:
        raise UsageError(f"unknown normalization '{normalization}'; choose one of: {', '.join(STATS)}")
    if normalization in EXACT_PIXEL_STATS:
        return EXACT_PIXEL_STATS[normalization]
    stats = STATS[normalization]
    mean, std = (tuple(float(v) for v in np.round(255 * np.array(stats[key]), 2)) for key in ("mean", "std"))
    return mean, std


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """Output (height, width) of ``mmcv.imrescale(img, scale)``: the largest size that fits the scale.

    factor = min(max(scale) / long edge, min(scale) / short edge), each side -> int(side * factor + 0.5).
    """
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image(image: tv_tensors.Image, size: tuple[int, int]) -> tv_tensors.Image:
    """Bilinear resize without antialiasing (OpenCV ``INTER_LINEAR`` semantics, up or down)."""
    return F.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=False)


def nearest_indices(src: int, dst: int) -> torch.Tensor:
    """Source index of every output pixel under OpenCV's ``INTER_NEAREST``: ``floor(x * (1 / (dst / src)))``
    in float64, clamped to ``src - 1`` (torch's float32 ``src / dst`` rounds differently on exact integers)."""
    step = 1.0 / (dst / src)
    return torch.floor(torch.arange(dst, dtype=torch.float64) * step).clamp_(max=src - 1).long()


def resize_mask(mask: tv_tensors.Mask, size: tuple[int, int]) -> tv_tensors.Mask:
    """Nearest-neighbour resize of a label map, pixel for pixel as mmcv's ``imresize(..., "nearest")``."""
    rows, cols = nearest_indices(mask.shape[-2], size[0]), nearest_indices(mask.shape[-1], size[1])
    return tv_tensors.wrap(mask[..., rows[:, None], cols[None, :]], like=mask)


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    """A draw from U[low, high) in float64."""
    return low + (high - low) * torch.rand((), generator=gen, dtype=torch.float64).item()


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """A draw from {low, ..., high - 1} (NumPy's ``randint`` convention)."""
    return int(torch.randint(low, high, (), generator=gen))


class RandomRescale:
    """mmseg ``Resize(img_scale, ratio_range, keep_ratio=True)``.

    Draws r ~ U[ratio_range), targets (int(long * r), int(short * r)) and rescales the pair to the
    largest size that fits it (:func:`rescale_size`): the short side becomes ``short * r`` unless
    the aspect ratio exceeds ``long / short``.
    """

    def __init__(self, img_scale: tuple[int, int], ratio_range: tuple[float, float] = (0.5, 2.0)) -> None:
        self.img_scale = img_scale
        self.ratio_range = ratio_range

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask, gen: torch.Generator) -> Pair:
        ratio = _uniform(gen, *self.ratio_range)
        target = (int(self.img_scale[0] * ratio), int(self.img_scale[1] * ratio))
        size = rescale_size(*image.shape[-2:], target)
        return resize_image(image, size), resize_mask(mask, size)


def crop_is_balanced(mask: torch.Tensor, cat_max_ratio: float, ignore_index: int = IGNORE_INDEX) -> bool:
    """mmseg's ``cat_max_ratio`` test: more than one non-ignored class and none above the ratio."""
    counts = torch.bincount(mask.reshape(-1).to(torch.int64), minlength=256)
    counts[ignore_index] = 0
    present = counts[counts > 0]
    return len(present) > 1 and present.max().item() / present.sum().item() < cat_max_ratio


class RandomCrop:
    """mmseg ``RandomCrop(crop_size, cat_max_ratio, ignore_index)``.

    Offsets are uniform in [0, margin] (inclusive) per axis. The first crop is drawn, then up to ten
    times: if it passes :func:`crop_is_balanced` it is kept, otherwise a new one is drawn. After ten
    failures the eleventh draw is kept untested, exactly as mmseg's loop does. A side shorter than the
    crop is kept whole (the result is padded later).
    """

    def __init__(self, crop_size: int, cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX,
                 tries: int = 10) -> None:
        self.crop_size = crop_size
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.tries = tries

    def choose(self, mask: torch.Tensor, gen: torch.Generator) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop chosen for this label map."""
        height, width = mask.shape[-2:]
        crop_h, crop_w = min(self.crop_size, height), min(self.crop_size, width)

        def draw() -> tuple[int, int]:
            return _randint(gen, 0, height - crop_h + 1), _randint(gen, 0, width - crop_w + 1)

        top, left = draw()
        if self.cat_max_ratio < 1.0:
            for _ in range(self.tries):
                window = mask[..., top:top + crop_h, left:left + crop_w]
                if crop_is_balanced(window, self.cat_max_ratio, self.ignore_index):
                    break
                top, left = draw()
        return top, left, crop_h, crop_w

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask, gen: torch.Generator) -> Pair:
        box = self.choose(mask, gen)
        return F.crop(image, *box), F.crop(mask, *box)


class RandomHorizontalFlip:
    """mmseg ``RandomFlip(prob)``: flip image and mask together when U[0, 1) < prob."""

    def __init__(self, prob: float = 0.5) -> None:
        self.prob = prob

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask, gen: torch.Generator) -> Pair:
        if torch.rand((), generator=gen).item() < self.prob:
            return F.horizontal_flip(image), F.horizontal_flip(mask)
        return image, mask


def _affine_uint8(values: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """mmseg's ``convert``: float32 ``x * alpha + beta``, clipped to [0, 255], truncated to uint8."""
    return (values.to(torch.float32) * alpha + beta).clamp_(0, 255).to(torch.uint8)


class PhotoMetricDistortion:
    """mmseg ``PhotoMetricDistortion`` with its defaults, on a uint8 RGB image.

    Order and probabilities: brightness (p 0.5, + U(-32, 32)); mode = randint(2); if mode == 1,
    contrast first (p 0.5, x U(0.5, 1.5)); saturation (p 0.5, HSV S x U(0.5, 1.5)); hue (p 0.5,
    H + randint(-18, 18) mod 180, upper bound exclusive); if mode == 0, contrast last. Every step
    clips and truncates to uint8. HSV uses OpenCV's 8-bit convention (:mod:`segm.data.color`),
    which is independent of the channel order, so RGB input gives mmseg's BGR results.
    """

    def __init__(self, brightness_delta: int = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    @staticmethod
    def _coin(gen: torch.Generator) -> bool:
        return _randint(gen, 0, 2) == 1

    def _contrast(self, image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self._coin(gen):
            return _affine_uint8(image, alpha=_uniform(gen, *self.contrast_range))
        return image

    def distort(self, image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Apply the distortion to a uint8 [3, H, W] RGB tensor."""
        if self._coin(gen):
            image = _affine_uint8(image, beta=_uniform(gen, -self.brightness_delta, self.brightness_delta))
        contrast_first = _randint(gen, 0, 2) == 1
        if contrast_first:
            image = self._contrast(image, gen)
        if self._coin(gen):
            hsv = rgb_to_hsv(image)
            hsv[1] = _affine_uint8(hsv[1], alpha=_uniform(gen, *self.saturation_range))
            image = hsv_to_rgb(hsv)
        if self._coin(gen):
            hsv = rgb_to_hsv(image)
            shift = _randint(gen, -self.hue_delta, self.hue_delta)
            hsv[0] = torch.remainder(hsv[0].to(torch.int32) + shift, 180).to(torch.uint8)
            image = hsv_to_rgb(hsv)
        if not contrast_first:
            image = self._contrast(image, gen)
        return image

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask, gen: torch.Generator) -> Pair:
        return tv_tensors.Image(self.distort(image.as_subclass(torch.Tensor), gen)), mask


def normalize(image: tv_tensors.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 RGB -> float32 ``(x - mean) / std`` with mean and std on the 0..255 scale."""
    return F.normalize(F.to_dtype(image, torch.float32, scale=False), list(mean), list(std))


def pad_bottom_right(image: tv_tensors.Image, mask: tv_tensors.Mask, size: int,
                     ignore_index: int = IGNORE_INDEX) -> Pair:
    """mmseg ``Pad(size, pad_val=0, seg_pad_val=255)`` after normalisation: image 0, mask ignore."""
    pad_h = max(size - image.shape[-2], 0)
    pad_w = max(size - image.shape[-1], 0)
    if pad_h == 0 and pad_w == 0:
        return image, mask
    padding = [0, 0, pad_w, pad_h]
    return F.pad(image, padding, fill=0), F.pad(mask, padding, fill=ignore_index)


def to_image(image: np.ndarray) -> tv_tensors.Image:
    """H x W x 3 uint8 array -> ``tv_tensors.Image`` [3, H, W] (a channels-last view, no copy)."""
    return tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))


class TrainPipeline:
    """Reference training pipeline (spec section 1.7) from decoded arrays to model inputs.

    resize (img_scale = (max_ratio * im_size, im_size), ratio in [0.5, 2.0)) -> random crop with
    the cat_max_ratio 0.75 rule -> horizontal flip 0.5 -> photometric distortion (uint8) ->
    normalise -> pad to the crop (image 0, label 255).
    """

    def __init__(self, img_scale: tuple[int, int], crop_size: int, normalization: str = "vit",
                 ignore_index: int = IGNORE_INDEX) -> None:
        self.crop_size = crop_size
        self.ignore_index = ignore_index
        self.mean, self.std = pixel_stats(normalization)
        self.steps = (
            RandomRescale(img_scale),
            RandomCrop(crop_size, cat_max_ratio=0.75, ignore_index=ignore_index),
            RandomHorizontalFlip(0.5),
            PhotoMetricDistortion(),
        )

    def __call__(self, image: np.ndarray, label: np.ndarray, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """``{"im": float [3, crop, crop], "segmentation": long [crop, crop]}`` from uint8 arrays."""
        pixels, mask = to_image(image), tv_tensors.Mask(torch.from_numpy(label))
        for step in self.steps:
            pixels, mask = step(pixels, mask, gen)
        pixels, mask = pad_bottom_right(normalize(pixels, self.mean, self.std), mask, self.crop_size,
                                        self.ignore_index)
        return {
            "im": pixels.as_subclass(torch.Tensor).contiguous(),
            "segmentation": mask.as_subclass(torch.Tensor).to(torch.int64),
        }


class ValPipeline:
    """Reference validation pipeline (spec section 1.8): mmseg ``MultiScaleFlipAug``.

    Single scale: one view, rescaled to ``img_scale`` (short side = im_size, up or down, unless the
    aspect ratio exceeds max_ratio), not flipped. Multi-scale: scales (int(long * r), int(short * r))
    for r in ``MULTISCALE_RATIOS`` and, as in mmseg 0.14's ``MultiScaleFlipAug.__call__`` (loop over
    scales, then over flip in [False, True]), for each ratio the unflipped view then the flipped one:
    12 views in the order (0.5, no flip), (0.5, flip), (0.75, no flip), ... (1.75, flip).
    """

    def __init__(self, img_scale: tuple[int, int], normalization: str = "vit", multiscale: bool = False) -> None:
        ratios = MULTISCALE_RATIOS if multiscale else (1.0,)
        self.scales = [(int(img_scale[0] * r), int(img_scale[1] * r)) for r in ratios]
        self.flips = (False, True) if multiscale else (False,)
        self.mean, self.std = pixel_stats(normalization)

    def __call__(self, image: np.ndarray) -> dict[str, list]:
        """``{"im": [float [3, h, w] per view], "flip": [bool per view]}`` from a uint8 H x W x 3 array."""
        pixels = to_image(image)
        views, flips = [], []
        for scale in self.scales:
            resized = resize_image(pixels, rescale_size(*pixels.shape[-2:], scale))
            for flip in self.flips:
                view = F.horizontal_flip(resized) if flip else resized
                views.append(normalize(view, self.mean, self.std).as_subclass(torch.Tensor).contiguous())
                flips.append(flip)
        return {"im": views, "flip": flips}
