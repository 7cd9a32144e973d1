"""The reference's train/val pipelines: resize semantics, the crop rule, photometric distortion, views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from segm.data.transforms import (
    MULTISCALE_RATIOS,
    PhotoMetricDistortion,
    RandomCrop,
    TrainPipeline,
    ValPipeline,
    crop_is_balanced,
    nearest_indices,
    pixel_stats,
    rescale_size,
    resize_mask,
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


def opencv_nearest_index(x: int, src: int, dst: int) -> int:
    """OpenCV's ``resizeNN``: ``min(cvFloor(x * ifx), src - 1)`` with ``ifx = 1. / ((double)dst / src)``."""
    return min(int(np.floor(x * (1.0 / (dst / src)))), src - 1)


@pytest.mark.parametrize(("src", "dst"), [(2, 82), (1175, 1885), (683, 1366), (512, 341), (7, 3), (100, 100)])
def test_mask_resize_uses_opencv_nearest_indices(src, dst):
    assert nearest_indices(src, dst).tolist() == [opencv_nearest_index(x, src, dst) for x in range(dst)]


def test_mask_resize_differs_from_float32_rounding_where_opencv_does():
    assert nearest_indices(2, 82)[41].item() == 1 and nearest_indices(1175, 1885)[377].item() == 234
    mask = tv_tensors.Mask(torch.arange(6, dtype=torch.uint8).reshape(2, 3))
    resized = resize_mask(mask, (3, 5))
    assert isinstance(resized, tv_tensors.Mask)
    assert resized.tolist() == [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]]


def test_tv_tensor_types_drive_the_kernels():
    cropper = RandomCrop(4)
    image = tv_tensors.Image(torch.zeros(3, 8, 8, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.zeros(8, 8, dtype=torch.uint8))
    cropped_image, cropped_mask = cropper(image, mask, gen(0))
    assert isinstance(cropped_image, tv_tensors.Image) and isinstance(cropped_mask, tv_tensors.Mask)
    assert cropped_image.shape == (3, 4, 4) and cropped_mask.shape == (4, 4)
