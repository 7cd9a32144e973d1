"""Colour label maps with a dataset palette and blend them with images (evaluation and inference outputs)."""

from __future__ import annotations

import numpy as np
import torch


def colorize(labels: np.ndarray | torch.Tensor, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """``H x W`` class ids -> ``H x W x 3`` uint8 colours; ignored pixels are black."""
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    table[ignore_index] = 0
    return table[np.clip(labels, 0, 255)]


def blend(image: np.ndarray, overlay: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(1 - alpha) * image + alpha * overlay`` on uint8 RGB arrays."""
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * overlay.astype(np.float32)
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


def denormalize(view: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """A normalised ``[3, H, W]`` (or ``[1, 3, H, W]``) view back to ``H x W x 3`` uint8 RGB."""
    view = view.reshape(3, *view.shape[-2:]).float().cpu()
    rgb = view * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (rgb.clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).numpy()
