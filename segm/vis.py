"""Draw the merge groups of a patch type over an image: one colour per token, group boundaries in black,
a panel per reduction step.

    python -m segm.vis MODEL_PATH IMAGE -o out.png [--patch-type tome --tome-r 16]

Without ``--patch-type`` the checkpoint's ``variant.yml`` decides (ALGM's published checkpoints record
theirs); any patch type that merges tokens into index maps can be drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from segm.cli import (
    POSITIVE,
    Command,
    apply_requested_reduction,
    fail_cleanly,
    format_settings,
    reduction_request,
    refuse_overwriting,
    token_reduction_options,
)
from segm.data import load_rgb
from segm.images import model_input, resize_rgb, short_side_size
from segm.model.factory import load_model, variant_crop_size, variant_normalization
from segm.visualize import merge_panels, reduction_maps


@click.command(cls=Command)
@click.argument("model_path", type=click.Path(path_type=Path))
@click.argument("image", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="PNG to write.")
@click.option("--im-size", type=POSITIVE, default=None,
              help="Short side the image is resized to (default: the model's crop size).")
@token_reduction_options
@fail_cleanly
def main(model_path: Path, image: Path, output: Path, im_size: int | None, **opts: Any) -> None:
    """Visualise the merge groups of MODEL_PATH (a checkpoint) on IMAGE, one panel per reduction step."""
    request = reduction_request(opts)
    refuse_overwriting([model_path, image], [output], f"--output {output}")
    model, variant = load_model(model_path)
    patch_type, settings = apply_requested_reduction(model, request, variant, trace_source=True)
    rgb = load_rgb(image)
    rgb = resize_rgb(rgb, short_side_size(*rgb.shape[:2], im_size or variant_crop_size(variant)))
    maps, grid = reduction_maps(model, model_input(rgb, variant_normalization(variant))[None], patch_type)
    titles = [f"step {i + 1}: {int(m.max()) + 1} tokens" for i, m in enumerate(maps)]
    merge_panels(rgb, maps, grid, model.patch_size, titles).save(output)
    click.echo(f"wrote {output}: {patch_type} ({format_settings(settings)}); {', '.join(titles)}")


if __name__ == "__main__":
    main()
