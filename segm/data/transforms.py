"""The reference's mmseg 0.14 training and validation pipelines, pixel for pixel as mmcv 1.3.8 computes them.

Where each kernel comes from, and why:

- **OpenCV** (``cv2``), wherever mmcv calls it, so that the pixels are OpenCV's own and no formula of
  it is transcribed here: bilinear image resize (``cv2.resize`` ``INTER_LINEAR``, mmcv's
  ``imresize(..., "bilinear")``; OpenCV itself takes its ``INTER_AREA`` path for exact 2x reductions),
  nearest label resize (``INTER_NEAREST``), the HSV round trips of the photometric distortion
  (``cv2.cvtColor``, mmcv's ``bgr2hsv`` / ``hsv2bgr``) and the normalisation (``cv2.subtract`` and
  ``cv2.multiply`` with float64 mean and 1 / std, mmcv's ``imnormalize_``). The sizes follow mmcv's
  ``imrescale`` rule (:func:`rescale_size`).
- **NumPy**, where mmseg computes in NumPy: the photometric ``convert`` (float32 ``x * alpha + beta``,
  clipped, truncated to uint8). It depends on the uint8 value alone, so it is evaluated with mmseg's
  own NumPy expression on the 256 possible values and applied with ``cv2.LUT``: identical results,
  several times faster than converting the whole image to float32.
- **torchvision v2** for what it does well: images travel as ``tv_tensors.Image`` [3, H, W] and label
  maps as ``tv_tensors.Mask`` [H, W] (uint8 class ids, 255 = ignore), composition, crops and flips
  (``F.crop`` / ``F.horizontal_flip``: exact index operations, like mmcv's NumPy slicing and
  ``np.flip``), the final padding (``F.pad``; mmcv's ``impad`` pads with a constant too) and the
  tensors handed to the model. An image tensor is a channel-first view of channels-last (H x W x 3)
  memory, the layout OpenCV works in, so moving between the two costs no copy.
- **torch.Generator** for every random draw, passed in by the caller, never global state, so a sample
  is a pure function of its image, its label and its seed.

The images are RGB (decoded with PIL) where mmcv's are BGR; OpenCV's ``COLOR_RGB2HSV`` /
``COLOR_HSV2RGB`` on RGB data give exactly the HSV values and colours that ``COLOR_BGR2HSV`` /
``COLOR_HSV2BGR`` give on the same colours stored as BGR (the same code with the channel index
swapped; checked on all 2^24 colours and all 8-bit HSV triples in the tests), so the channels are
never swapped. What can still differ from one machine to another is inside OpenCV itself: in
``HSV2RGB`` its vectorised (SIMD) loops and the scalar code that finishes a row round differently (by
one grey level), and which pixels each handles depends on the vector width OpenCV dispatches to on
the CPU (here, turning AVX2 off changes about 0.01 % of the pixels by one grey level; the resizes and
``RGB2HSV`` do not change).

Decoding stays with PIL (:mod:`segm.data.io`), whose RGB pixels equal ``cv2.imread``'s reversed on the
JPEGs and PNGs the project reads. OpenCV threads: in a DataLoader worker :func:`segm.data.loader.seed_worker` sets
``cv2.setNumThreads(0)`` so every worker runs its kernels on its own core.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

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


def to_image(image: np.ndarray) -> tv_tensors.Image:
    """H x W x C array -> ``tv_tensors.Image`` [C, H, W] (a channel-first view of the same memory, no copy)."""
    return tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))


def pixels_of(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] tensor -> C-contiguous H x W x C array, OpenCV's layout (no copy for :func:`to_image` views)."""
    return np.ascontiguousarray(image.as_subclass(torch.Tensor).permute(1, 2, 0).numpy())


def _wrap_like(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return tv_tensors.wrap(values, like=like) if isinstance(like, tv_tensors.TVTensor) else values


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a [C, H, W] image (uint8 or float32) to ``size`` = (height, width).

    ``cv2.resize(..., INTER_LINEAR)`` on the channels-last pixels, exactly mmcv's ``imresize``; the result
    has the type of ``image`` (``tv_tensors.Image`` or plain tensor).
    """
    resized = cv2.resize(pixels_of(image), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    if resized.ndim == 2:  # OpenCV drops a single channel
        resized = resized[..., None]
    return _wrap_like(torch.from_numpy(resized).permute(2, 0, 1), image)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a uint8 [H, W] label map: ``cv2.resize(..., INTER_NEAREST)``, as mmcv's
    ``imresize(..., "nearest")``; the result has the type of ``mask`` (``tv_tensors.Mask`` or plain tensor)."""
    values = np.ascontiguousarray(mask.as_subclass(torch.Tensor).numpy())
    resized = cv2.resize(values, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return _wrap_like(torch.from_numpy(resized), mask)


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


_IDENTITY = np.arange(256, dtype=np.uint8)


def affine_table(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's ``convert`` of every uint8 value: float32 ``x * alpha + beta``, clipped to [0, 255], truncated.

    The same NumPy expression as mmseg's (``alpha`` and ``beta`` are Python floats, so the arithmetic is
    float32), evaluated on the 256 possible inputs; looking the image up in it gives mmseg's result.
    """
    return np.clip(np.arange(256, dtype=np.float32) * float(alpha) + float(beta), 0, 255).astype(np.uint8)


def _lookup(pixels: np.ndarray, table: np.ndarray, channel: int | None = None) -> np.ndarray:
    """``table`` applied to every channel of uint8 H x W x 3 ``pixels``, or to ``channel`` only."""
    if channel is not None:
        tables = np.repeat(_IDENTITY[:, None], pixels.shape[-1], axis=1)
        tables[:, channel] = table
        table = tables.reshape(256, 1, -1)
    return cv2.LUT(pixels, table)


class PhotoMetricDistortion:
    """mmseg ``PhotoMetricDistortion`` with its defaults, on a uint8 RGB image.

    Order and probabilities: brightness (p 0.5, + U(-32, 32)); mode = randint(2); if mode == 1,
    contrast first (p 0.5, x U(0.5, 1.5)); saturation (p 0.5, HSV S x U(0.5, 1.5)); hue (p 0.5,
    H + randint(-18, 18) mod 180, upper bound exclusive); if mode == 0, contrast last. Every step
    clips and truncates to uint8 (:func:`affine_table`). Saturation and hue each convert to OpenCV's
    8-bit HSV (H in [0, 180)) and back with ``cv2.cvtColor``; ``COLOR_RGB2HSV`` / ``COLOR_HSV2RGB`` on
    RGB give mmseg's ``BGR2HSV`` / ``HSV2BGR`` results on the same image stored as BGR.
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

    def _contrast(self, pixels: np.ndarray, gen: torch.Generator) -> np.ndarray:
        if self._coin(gen):
            return _lookup(pixels, affine_table(alpha=_uniform(gen, *self.contrast_range)))
        return pixels

    def distort_pixels(self, pixels: np.ndarray, gen: torch.Generator) -> np.ndarray:
        """Apply the distortion to a uint8 H x W x 3 RGB array (C-contiguous); returns a new array or ``pixels``."""
        if self._coin(gen):
            pixels = _lookup(pixels, affine_table(beta=_uniform(gen, -self.brightness_delta, self.brightness_delta)))
        contrast_first = _randint(gen, 0, 2) == 1
        if contrast_first:
            pixels = self._contrast(pixels, gen)
        if self._coin(gen):
            hsv = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV)
            hsv = _lookup(hsv, affine_table(alpha=_uniform(gen, *self.saturation_range)), channel=1)
            pixels = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if self._coin(gen):
            hsv = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV)
            shift = _randint(gen, -self.hue_delta, self.hue_delta)
            hsv = _lookup(hsv, ((_IDENTITY.astype(np.int64) + shift) % 180).astype(np.uint8), channel=0)
            pixels = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if not contrast_first:
            pixels = self._contrast(pixels, gen)
        return pixels

    def distort(self, image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Apply the distortion to a uint8 [3, H, W] RGB tensor (:meth:`distort_pixels` on its pixels)."""
        return torch.from_numpy(self.distort_pixels(pixels_of(image), gen)).permute(2, 0, 1)

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask, gen: torch.Generator) -> Pair:
        return tv_tensors.Image(self.distort(image, gen)), mask


def normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [3, H, W] RGB -> float32 ``(x - mean) * (1 / std)`` with mean and std on the 0..255 scale.

    mmcv's ``imnormalize``: mmseg stores mean and std as float32, mmcv widens them to float64 and
    calls ``cv2.subtract(img, mean)`` then ``cv2.multiply(img, 1 / std)`` on the float32 image (its
    ``BGR2RGB`` step is a no-op here: the image is RGB already). The result is a channel-first view
    of channels-last memory; call ``.contiguous()`` for a packed tensor.
    """
    pixels = pixels_of(image).astype(np.float32)
    mean64 = np.array(mean, dtype=np.float32).astype(np.float64).reshape(1, -1)
    stdinv = 1 / np.array(std, dtype=np.float32).astype(np.float64).reshape(1, -1)
    cv2.subtract(pixels, mean64, pixels)
    cv2.multiply(pixels, stdinv, pixels)
    return torch.from_numpy(pixels).permute(2, 0, 1)


def pad_bottom_right(image: tv_tensors.Image, mask: tv_tensors.Mask, size: int,
                     ignore_index: int = IGNORE_INDEX) -> Pair:
    """mmseg ``Pad(size, pad_val=0, seg_pad_val=255)`` after normalisation: image 0, mask ignore."""
    pad_h = max(size - image.shape[-2], 0)
    pad_w = max(size - image.shape[-1], 0)
    if pad_h == 0 and pad_w == 0:
        return image, mask
    padding = [0, 0, pad_w, pad_h]
    return F.pad(image, padding, fill=0), F.pad(mask, padding, fill=ignore_index)


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
