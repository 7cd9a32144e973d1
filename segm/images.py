"""Single images as model inputs for inference, visualisation and measurement.

Resizing is PIL's bilinear (what torchvision's ``Resize`` does on PIL images in the reference's
inference and measurement scripts); normalisation divides by 255 and applies ``STATS``. The training
and evaluation pipelines (``segm.data.transforms``) follow mmseg instead.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from segm.data import STATS


def short_side_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(height, width) scaled so that the short side is ``side``, each rounded to the nearest pixel."""
    scale = side / min(height, width)
    return round(height * scale), round(width * scale)


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An H x W x 3 uint8 image resized bilinearly (PIL) to ``size = (height, width)``."""
    return np.array(Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR))


def model_input(rgb: np.ndarray, normalization: str) -> torch.Tensor:
    """An H x W x 3 uint8 image -> float32 ``[3, H, W]``: ``(x / 255 - mean) / std``."""
    stats = STATS[normalization]
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div(255)
    return (x - torch.tensor(stats["mean"])[:, None, None]) / torch.tensor(stats["std"])[:, None, None]
