"""``python -m segm.data.synthetic --out DIR --layout ade20k``: write the synthetic dataset to disk."""

from __future__ import annotations

from pathlib import Path

import click

from segm.data.synthetic import DEFAULT_COUNTS, DEFAULT_SIZE
from segm.data.synthetic.write import write_layout

LAYOUTS = ("ade20k", "cityscapes", "pascal_context", "pascal_context_59", "coco_stuff")


@click.command(help="Write the synthetic dataset to disk in the folder layout of a real dataset.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Dataset root to create (use it as $DATASET or --root).")
@click.option("--layout", type=click.Choice(LAYOUTS), default="ade20k", show_default=True)
@click.option("--train", "n_train", default=DEFAULT_COUNTS["train"], show_default=True, help="Training images.")
@click.option("--val", "n_val", default=DEFAULT_COUNTS["val"], show_default=True, help="Validation images.")
@click.option("--height", default=DEFAULT_SIZE, show_default=True, help="Image height in pixels.")
@click.option("--width", default=DEFAULT_SIZE, show_default=True, help="Image width in pixels.")
@click.option("--seed", default=0, show_default=True, help="Scene seed (0 gives the built-in dataset).")
def main(out: Path, layout: str, n_train: int, n_val: int, height: int, width: int, seed: int) -> None:
    paths = write_layout(out, layout, {"train": n_train, "val": n_val}, height, width, seed)
    click.echo(f"wrote {len(paths)} images in the {layout} layout under {out}")
    click.echo(f"check it with: python -m segm.data.check {layout} --split val --root {out}")


if __name__ == "__main__":
    main()
