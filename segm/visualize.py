"""Colour label maps with a dataset palette, blend them with images, and draw token-reduction groups
(evaluation, inference and ``segm.vis`` outputs)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from segm.model.inference import padding
from tokred.errors import UsageError


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


def token_colours(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random, well-saturated RGB colours (uint8), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return rng.integers(40, 256, size=(n, 3), dtype=np.uint8)


def draw_merge_groups(
    image: np.ndarray, index: np.ndarray, grid: tuple[int, int], patch_size: int, alpha: float = 0.5
) -> np.ndarray:
    """Blend one colour per token over ``image`` (H x W x 3 uint8) and draw black group boundaries.

    ``index`` (gh * gw,) gives the token of every patch in raster order (a ``MergeState`` index map).
    """
    gh, gw = grid
    H, W = image.shape[:2]
    tokens = np.asarray(index).reshape(gh, gw)
    tokens = np.repeat(np.repeat(tokens, patch_size, axis=0), patch_size, axis=1)[:H, :W]
    colours = token_colours(int(tokens.max()) + 1)[tokens]
    out = blend(image, colours, alpha)
    edge = np.zeros((H, W), dtype=bool)
    edge[:, 1:] |= tokens[:, 1:] != tokens[:, :-1]
    edge[1:, :] |= tokens[1:, :] != tokens[:-1, :]
    out[edge] = 0
    return out


def merge_panels(
    image: np.ndarray, index_maps: Sequence[np.ndarray], grid: tuple[int, int], patch_size: int, titles: Sequence[str]
) -> Image.Image:
    """The image followed by one merge-group panel per index map, side by side, each with its title."""
    panels = [image] + [draw_merge_groups(image, idx, grid, patch_size) for idx in index_maps]
    H, W = image.shape[:2]
    canvas = Image.new("RGB", (W * len(panels), H + 16), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(zip(panels, ["input", *titles])):
        canvas.paste(Image.fromarray(panel), (i * W, 16))
        draw.text((i * W + 4, 2), title, fill="black")
    return canvas


def reduction_maps(model: torch.nn.Module, x: torch.Tensor, patch_type: str) -> tuple[list[np.ndarray], tuple[int, int]]:
    """The patch -> token index maps after each reduction step on image ``x`` (the model traces sources).

    A patch type that records no index maps (one that changes no tokens, or keeps a reduced grid) is a
    ``UsageError``: there are no groups to draw.
    """
    if not hasattr(model, "encoder"):
        raise UsageError(f"merge groups are drawn for ViT encoders; a {type(model).__name__} has none")
    with torch.no_grad():
        _, state = model.encoder.forward_tokens(padding(x, model.patch_size))
    if not state.history:
        raise UsageError(f"patch type '{patch_type}' recorded no patch-to-token maps on this image: nothing to draw")
    return [h[0].cpu().numpy() for h in state.history], state.grid
