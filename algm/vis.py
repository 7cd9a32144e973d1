"""Draw ALGM's merge groups over an image: one colour per token, group boundaries in black, a panel per
merge step. ``python -m algm.vis MODEL_PATH IMAGE -o out.png [--selected-layers 1 5 --threshold 0.88]``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import click
import numpy as np
from PIL import Image, ImageDraw

from segm.cli import Command, algm_options, fail_cleanly


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
    out = ((1 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)).astype(np.uint8)
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


@click.command(cls=Command)
@click.argument("model_path", type=click.Path(path_type=Path))
@click.argument("image", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="PNG to write.")
@click.option("--im-size", type=int, default=None,
              help="Short side the image is resized to (default: the model's crop size).")
@algm_options
@fail_cleanly
def main(model_path: Path, image: Path, output: Path, im_size: int | None, **algm_settings) -> None:
    """Visualise ALGM merge groups of MODEL_PATH (a checkpoint) on IMAGE, one panel per selected layer."""
    from segm.data import load_rgb
    from segm.inference import merge_maps, resize_short_side, to_tensor
    from segm.model.factory import load_model, variant_crop_size, variant_normalization
    from segm.model.token_reduction import apply_token_reduction

    model, variant = load_model(model_path)
    layers = apply_token_reduction(
        model, "algm", algm_settings["selected_layers"] or None,
        algm_settings["merging_window_size"], algm_settings["threshold"], trace_source=True,
    )
    rgb = resize_short_side(load_rgb(image), im_size or variant_crop_size(variant))
    maps, grid = merge_maps(model, to_tensor(rgb, variant_normalization(variant)))
    titles = [f"layer {n}: {int(m.max()) + 1} tokens" for n, m in zip(layers, maps)]
    merge_panels(rgb, maps, grid, model.patch_size, titles).save(output)
    click.echo(f"wrote {output} ({', '.join(titles)})")


if __name__ == "__main__":
    main()
