"""The reference's train/val pipelines: resize semantics, the crop rule, photometric distortion, views.

Pixel values are checked against OpenCV directly: small references below redo mmseg 0.14.1 / mmcv 1.3.8's
steps with ``cv2`` and NumPy on the image stored as BGR, as mmcv holds it, replaying the same random draws.
"""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from segm.data.loader import seed_worker
from segm.data.transforms import (
    MULTISCALE_RATIOS,
    PhotoMetricDistortion,
    RandomCrop,
    TrainPipeline,
    ValPipeline,
    affine_table,
    crop_is_balanced,
    normalize,
    pixel_stats,
    rescale_size,
    resize_image,
    resize_mask,
    to_image,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    ("size", "scale", "expected"),
    [((512, 683), (2048, 512), (512, 683)), ((375, 500), (2048, 512), (512, 683)),
     ((1024, 2048), (2048, 1024), (1024, 2048)), ((100, 1000), (2048, 512), (205, 2048)),
     ((600, 800), (1024, 256), (256, 341))],
)
def test_rescale_size_follows_mmcv_imrescale(size, scale, expected):
    assert rescale_size(*size, scale) == expected


def test_normalisation_stats_are_rounded_like_the_reference():
    assert pixel_stats("vit") == ((127.5,) * 3, (127.5,) * 3)
    assert pixel_stats("deit") == ((123.68, 116.28, 103.53), (58.4, 57.12, 57.38))
    assert pixel_stats("imagenet") == ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))  # SegFormer's, exact
    with pytest.raises(ValueError, match="choose one of: vit, deit, imagenet"):
        pixel_stats("coco")


@pytest.mark.parametrize(
    ("values", "balanced"),
    [([0] * 10, False), ([255] * 10, False), ([0] * 7 + [1] * 3, True), ([0] * 8 + [1] * 2, False),
     ([0] * 6 + [1] * 2 + [255] * 2, False), ([0] * 5 + [1] * 2 + [255] * 3, True), ([0, 1, 2, 3] * 3, True)],
)
def test_crop_balance_rule(values, balanced):
    assert crop_is_balanced(torch.tensor(values, dtype=torch.uint8), 0.75) is balanced


def valid_offsets(mask: torch.Tensor, crop: int) -> set[tuple[int, int]]:
    """Brute force: every crop position that passes the 75 % rule."""
    h, w = mask.shape
    return {(top, left) for top in range(h - crop + 1) for left in range(w - crop + 1)
            if crop_is_balanced(mask[top:top + crop, left:left + crop], 0.75)}


def test_chosen_crops_pass_the_rule_whenever_valid_crops_are_common():
    mask = torch.zeros(24, 24, dtype=torch.uint8)
    mask[:, 14:] = 1
    mask[:3] = 255
    crop = 12
    valid = valid_offsets(mask, crop)
    assert 0.3 < len(valid) / 13**2 < 1
    cropper = RandomCrop(crop)
    for seed in range(60):
        top, left, height, width = cropper.choose(mask, gen(seed))
        assert (height, width) == (crop, crop)
        assert (top, left) in valid


def test_without_a_valid_crop_the_eleventh_draw_is_kept():
    mask = torch.zeros(20, 30, dtype=torch.uint8)
    cropper = RandomCrop(8)
    top, left, _, _ = cropper.choose(mask, gen(5))
    replay = gen(5)
    draws = [(int(torch.randint(0, 13, (), generator=replay)), int(torch.randint(0, 23, (), generator=replay)))
             for _ in range(11)]
    assert (top, left) == draws[-1]
    assert torch.equal(torch.rand(4, generator=replay), torch.rand(4, generator=gen_after(cropper, mask, 5)))


def gen_after(cropper: RandomCrop, mask: torch.Tensor, seed: int) -> torch.Generator:
    g = gen(seed)
    cropper.choose(mask, g)
    return g


def test_small_images_are_kept_whole_and_padded():
    image = np.full((20, 30, 3), 200, dtype=np.uint8)
    label = np.ones((20, 30), dtype=np.uint8)
    out = TrainPipeline((40, 10), crop_size=64)(image, label, gen(0))
    assert out["im"].shape == (3, 64, 64) and out["im"].dtype == torch.float32
    assert out["segmentation"].shape == (64, 64) and out["segmentation"].dtype == torch.int64
    h = int((out["segmentation"] != 255).any(1).sum())
    w = int((out["segmentation"] != 255).any(0).sum())
    assert 5 <= h < 64 and 5 <= w < 64
    assert torch.all(out["im"][:, h:, :] == 0) and torch.all(out["im"][:, :, w:] == 0)
    assert torch.all(out["segmentation"][h:, :] == 255)


def test_photometric_distortion_stays_uint8_in_range():
    distortion = PhotoMetricDistortion()
    for seed, fill in enumerate((0, 255, None, None, None, None)):
        if fill is None:
            image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=gen(100 + seed))
        else:
            image = torch.full((3, 16, 16), fill, dtype=torch.uint8)
        for draw in range(8):
            out = distortion.distort(image, gen(seed * 8 + draw))
            assert out.dtype == torch.uint8 and out.shape == image.shape


def test_photometric_distortion_is_seeded():
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=gen(0))
    distortion = PhotoMetricDistortion()
    assert torch.equal(distortion.distort(image, gen(3)), distortion.distort(image, gen(3)))
    outputs = {distortion.distort(image, gen(seed)).sum().item() for seed in range(16)}
    assert len(outputs) > 8


def scene(height: int = 48, width: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = (np.arange(height * width).reshape(height, width) // 300 % 5).astype(np.uint8)
    return image, label


def test_train_pipeline_is_a_function_of_the_seed():
    image, label = scene()
    pipeline = TrainPipeline((128, 32), crop_size=32)
    first, again, other = (pipeline(image, label, gen(s)) for s in (7, 7, 8))
    assert torch.equal(first["im"], again["im"]) and torch.equal(first["segmentation"], again["segmentation"])
    assert not torch.equal(first["im"], other["im"])
    assert set(first["segmentation"].unique().tolist()) <= {0, 1, 2, 3, 4, 255}


@pytest.mark.parametrize(("height", "width", "im_size"), [(48, 64, 32), (48, 64, 96), (64, 48, 32)])
def test_val_single_scale_sets_the_short_side(height, width, im_size):
    image, _ = scene(height, width)
    out = ValPipeline((4 * im_size, im_size))(image)
    assert out["flip"] == [False] and len(out["im"]) == 1
    view = out["im"][0]
    assert min(view.shape[1:]) == im_size
    assert abs(max(view.shape[1:]) / im_size - max(height, width) / min(height, width)) < 0.05


def test_val_multiscale_views_are_ratio_major_then_flip():
    image, _ = scene()
    out = ValPipeline((128, 32), multiscale=True)(image)
    assert len(out["im"]) == 12
    assert out["flip"] == [False, True] * 6
    for k, ratio in enumerate(MULTISCALE_RATIOS):
        plain, flipped = out["im"][2 * k], out["im"][2 * k + 1]
        assert min(plain.shape[1:]) == int(32 * ratio)
        assert torch.equal(flipped, plain.flip(-1))


def test_val_views_are_normalised_rgb():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[..., 0] = 255
    view = ValPipeline((32, 8))(image)["im"][0]
    assert torch.allclose(view[0], torch.ones(8, 8)) and torch.allclose(view[1:], -torch.ones(2, 8, 8))


def test_masks_are_resized_nearest():
    _, label = scene()
    pipeline = TrainPipeline((256, 64), crop_size=48)
    for seed in range(5):
        segmentation = pipeline(np.zeros((*label.shape, 3), np.uint8), label, gen(seed))["segmentation"]
        values = set(segmentation.unique().tolist())
        assert values <= {0, 1, 2, 3, 4, 255}


def test_tv_tensor_types_drive_the_kernels():
    cropper = RandomCrop(4)
    image = tv_tensors.Image(torch.zeros(3, 8, 8, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.zeros(8, 8, dtype=torch.uint8))
    cropped_image, cropped_mask = cropper(image, mask, gen(0))
    assert isinstance(cropped_image, tv_tensors.Image) and isinstance(cropped_mask, tv_tensors.Mask)
    assert cropped_image.shape == (3, 4, 4) and cropped_mask.shape == (4, 4)


# --- OpenCV references -------------------------------------------------------------------------------------

class Draws:
    """The pipeline's random draws, replayed from the same seed in the order mmseg makes them."""

    def __init__(self, seed: int) -> None:
        self.gen = gen(seed)

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=self.gen, dtype=torch.float64).item()

    def randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, (), generator=self.gen))

    def rand(self) -> float:
        return torch.rand((), generator=self.gen).item()


def mmcv_normalize(bgr: np.ndarray, mean, std) -> np.ndarray:
    """mmcv 1.3.8 ``imnormalize(img, mean, std, to_rgb=True)`` with mmseg's float32 mean and std."""
    img = bgr.copy().astype(np.float32)
    mean64 = np.float64(np.array(mean, dtype=np.float32).reshape(1, -1))
    stdinv = 1 / np.float64(np.array(std, dtype=np.float32).reshape(1, -1))
    cv2.cvtColor(img, cv2.COLOR_BGR2RGB, img)
    cv2.subtract(img, mean64, img)
    cv2.multiply(img, stdinv, img)
    return img


def mmseg_convert(img: np.ndarray, alpha: float = 1, beta: float = 0) -> np.ndarray:
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def mmseg_photometric(bgr: np.ndarray, draws: Draws, branches: list | None = None) -> np.ndarray:
    """mmseg 0.14.1 ``PhotoMetricDistortion.__call__`` on a BGR image, mmcv's ``bgr2hsv`` / ``hsv2bgr``.

    ``branches`` collects (brightness, mode, contrast, saturation, hue): which steps ran.
    """
    taken = []

    def coin() -> int:
        taken.append(draws.randint(0, 2))
        return taken[-1]

    def contrast(img):
        return mmseg_convert(img, alpha=draws.uniform(0.5, 1.5)) if coin() else img

    img = bgr
    if coin():
        img = mmseg_convert(img, beta=draws.uniform(-32, 32))
    mode = coin()
    if mode == 1:
        img = contrast(img)
    if coin():
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        img[:, :, 1] = mmseg_convert(img[:, :, 1], alpha=draws.uniform(0.5, 1.5))
        img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    if coin():
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        img[:, :, 0] = (img[:, :, 0].astype(int) + draws.randint(-18, 18)) % 180
        img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    if mode == 0:
        img = contrast(img)
    if branches is not None:
        brightness, mode, *rest = taken
        saturation, hue, contrast_coin = rest if mode == 0 else (rest[1], rest[2], rest[0])
        branches.append((brightness, mode, contrast_coin, saturation, hue))
    return img


def mmseg_train(rgb: np.ndarray, label: np.ndarray, img_scale, crop: int, normalization: str, seed: int):
    """mmseg 0.14.1's training pipeline (Resize, RandomCrop, RandomFlip, PhotoMetricDistortion, Normalize,
    Pad, ImageToTensor) on the BGR image, with OpenCV and NumPy as mmcv 1.3.8 runs them."""
    draws = Draws(seed)
    img, seg = rgb[..., ::-1].copy(), label
    ratio = draws.uniform(0.5, 2.0)
    scale = (int(img_scale[0] * ratio), int(img_scale[1] * ratio))
    h, w = img.shape[:2]
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    size = (int(w * factor + 0.5), int(h * factor + 0.5))
    img = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
    seg = cv2.resize(seg, size, interpolation=cv2.INTER_NEAREST)

    def bbox():
        top = draws.randint(0, max(img.shape[0] - crop, 0) + 1)
        left = draws.randint(0, max(img.shape[1] - crop, 0) + 1)
        return top, left

    top, left = bbox()
    for _ in range(10):
        labels, cnt = np.unique(seg[top:top + crop, left:left + crop], return_counts=True)
        cnt = cnt[labels != 255]
        if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < 0.75:
            break
        top, left = bbox()
    img, seg = img[top:top + crop, left:left + crop, ...], seg[top:top + crop, left:left + crop]
    if draws.rand() < 0.5:
        img, seg = np.flip(img, axis=1), np.flip(seg, axis=1).copy()
    img = mmseg_photometric(img, draws)
    img = mmcv_normalize(img, *pixel_stats(normalization))
    pad = ((0, max(crop - img.shape[0], 0)), (0, max(crop - img.shape[1], 0)))
    img = cv2.copyMakeBorder(img, *pad[0], *pad[1], cv2.BORDER_CONSTANT, value=0)
    seg = cv2.copyMakeBorder(seg, *pad[0], *pad[1], cv2.BORDER_CONSTANT, value=255)
    return torch.from_numpy(img.transpose(2, 0, 1).copy()), torch.from_numpy(seg).long()


def photo_scene(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth colour gradients with noise (resize differences show) and a few label regions."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height) + 64], -1)
    image = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    label = ((x // max(width // 4, 1)) + 2 * (y // max(height // 3, 1))).astype(np.uint8) % 7
    label[rng.random(label.shape) < 0.05] = 255
    return image, label


@pytest.mark.parametrize(("normalization", "size", "crop"),
                         [("vit", (75, 101), 48), ("deit", (64, 64), 40), ("imagenet", (37, 120), 64)])
def test_train_pipeline_equals_mmseg_with_opencv_on_bgr(normalization, size, crop):
    image, label = photo_scene(*size)
    pipeline = TrainPipeline((4 * crop, crop), crop_size=crop, normalization=normalization)
    for seed in range(12):
        out = pipeline(image, label, gen(seed))
        im, segmentation = mmseg_train(image, label, (4 * crop, crop), crop, normalization, seed)
        assert out["im"].is_contiguous() and out["im"].shape == (3, crop, crop)
        assert torch.equal(out["segmentation"], segmentation)
        assert torch.equal(out["im"], im)


@pytest.mark.parametrize(("height", "width"), [(16, 16), (23, 61), (40, 33)])
def test_photometric_distortion_equals_mmseg_with_opencv_on_bgr(height, width):
    image, _ = photo_scene(height, width, seed=height)
    distortion, branches = PhotoMetricDistortion(), []
    for seed in range(300):
        got = distortion.distort(to_image(image), gen(seed))
        expected = mmseg_photometric(np.ascontiguousarray(image[..., ::-1]), Draws(seed), branches)[..., ::-1]
        assert got.dtype == torch.uint8 and np.array_equal(got.permute(1, 2, 0).numpy(), expected)
    assert len(set(branches)) == 32  # every combination of the four coins and the two modes


def test_convert_table_is_mmsegs_convert():
    values = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for alpha, beta in ((1.0, -31.7), (1.0, 31.99), (0.5017, 0.0), (1.4999, 0.0), (1.2, 0.0)):
        assert np.array_equal(affine_table(alpha, beta)[values], mmseg_convert(values, alpha, beta))


def all_colours() -> np.ndarray:
    code = np.arange(2**24, dtype=np.uint32)
    return np.stack([code >> 16, (code >> 8) & 255, code & 255], -1).astype(np.uint8).reshape(4096, 4096, 3)


def test_opencv_hsv_of_rgb_is_the_hsv_of_bgr_on_every_colour():
    rgb = all_colours()
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    assert np.array_equal(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV), cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV))


def test_opencv_rgb_of_hsv_is_the_bgr_of_hsv_reversed_on_every_triple():
    h, s, v = np.meshgrid(np.arange(180), np.arange(256), np.arange(256), indexing="ij")
    hsv = np.stack([h, s, v], -1).astype(np.uint8).reshape(180 * 256, 256, 3)
    assert np.array_equal(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[..., ::-1])


def numpy_normalize(rgb: np.ndarray, mean, std) -> np.ndarray:
    """mmcv's normalisation by hand: x - float32 mean in float32, times float64 1 / float32 std, to float32."""
    shifted = rgb.astype(np.float32) - np.array(mean, dtype=np.float32)
    return (shifted.astype(np.float64) * (1 / np.array(std, dtype=np.float32).astype(np.float64))).astype(np.float32)


@pytest.mark.parametrize("normalization", ["vit", "deit", "imagenet"])
@pytest.mark.parametrize(("height", "width", "im_size"), [(75, 101, 48), (64, 48, 32), (30, 90, 64)])
def test_val_views_are_opencv_resize_then_mmcv_normalisation(normalization, height, width, im_size):
    image, _ = photo_scene(height, width)
    mean, std = pixel_stats(normalization)
    out = ValPipeline((4 * im_size, im_size), normalization, multiscale=True)(image)
    bgr = np.ascontiguousarray(image[..., ::-1])
    for k, ratio in enumerate(MULTISCALE_RATIOS):
        new_h, new_w = rescale_size(height, width, (int(4 * im_size * ratio), int(im_size * ratio)))
        resized = cv2.resize(bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        for flip in (False, True):
            view = np.flip(resized, axis=1) if flip else resized
            expected = mmcv_normalize(view, mean, std).transpose(2, 0, 1)
            got = out["im"][2 * k + flip]
            assert got.is_contiguous() and torch.equal(got, torch.from_numpy(expected.copy()))
            by_hand = numpy_normalize(np.ascontiguousarray(view[..., ::-1]), mean, std).transpose(2, 0, 1)
            assert np.array_equal(got.numpy(), by_hand)


def test_image_resize_is_opencv_bilinear_for_uint8_and_float():
    image, _ = photo_scene(30, 41)
    for size in ((60, 82), (15, 20), (47, 13), (30, 41)):
        expected = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)
        resized = resize_image(to_image(image), size)
        assert isinstance(resized, tv_tensors.Image) and resized.shape == (3, *size)
        assert np.array_equal(resized.permute(1, 2, 0).numpy(), expected)
    floats = torch.from_numpy(image).permute(2, 0, 1).float().contiguous()  # the policy data's images
    resized = resize_image(floats, (50, 50))
    assert type(resized) is torch.Tensor and resized.dtype == torch.float32
    expected = cv2.resize(image.astype(np.float32), (50, 50), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(resized.permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize(("src", "dst"), [((2, 2), (82, 82)), ((1175, 3), (1885, 5)), ((7, 683), (3, 1366)),
                                          ((100, 512), (100, 341))])
def test_label_resize_is_opencv_nearest(src, dst):
    label = np.random.default_rng(1).integers(0, 151, src, dtype=np.uint8)
    resized = resize_mask(tv_tensors.Mask(torch.from_numpy(label)), dst)
    assert isinstance(resized, tv_tensors.Mask) and resized.dtype == torch.uint8
    assert np.array_equal(resized.numpy(), cv2.resize(label, dst[::-1], interpolation=cv2.INTER_NEAREST))
    small = resize_mask(tv_tensors.Mask(torch.arange(6, dtype=torch.uint8).reshape(2, 3)), (3, 5))
    assert small.tolist() == [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]]


def test_normalize_accepts_flipped_and_cropped_views():
    image, _ = photo_scene(20, 30)
    view = to_image(image)[:, 3:17, 5:25].flip(-1)
    expected = numpy_normalize(np.ascontiguousarray(image[3:17, 5:25][:, ::-1]), (127.5,) * 3, (127.5,) * 3)
    assert np.array_equal(normalize(view, (127.5,) * 3, (127.5,) * 3).permute(1, 2, 0).numpy(), expected)


def test_loader_workers_run_opencv_single_threaded():
    threads, np_state, py_state = cv2.getNumThreads(), np.random.get_state(), random.getstate()
    try:
        seed_worker(0)
        assert cv2.getNumThreads() == 1  # setNumThreads(0): OpenCV runs its kernels in the calling thread
    finally:
        cv2.setNumThreads(threads)
        np.random.set_state(np_state)
        random.setstate(py_state)
