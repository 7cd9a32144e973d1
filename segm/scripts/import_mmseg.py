"""Use an mmsegmentation 1.x SegFormer / SegFormer++ checkpoint here: write the ``variant.yml`` it needs.

    python -m segm.scripts.import_mmseg segformer_mit-b5_cityscapes.pth --backbone mit_b5 --dataset cityscapes

The checkpoint (``{"meta": ..., "state_dict": ...}``, mmseg's key names) stays as it is; ``variant.yml`` is
written beside it (refused when one exists, unless ``--overwrite``), and the model is loaded once to
check that every key matches, so ``load_model`` and every command can use it.
"""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from segm.cli import fail_cleanly
from segm.config import backbone_family, training_defaults
from segm.data import dataset_info, dataset_names
from segm.model.factory import load_model, net_kwargs_for
from tokred.errors import UsageError


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--backbone", required=True, help="The MiT backbone of the checkpoint: mit_b0 ... mit_b5.")
@click.option("--dataset", type=click.Choice(dataset_names()), required=True,
              help="The dataset it was trained on (classes, crop and sliding window).")
@click.option("--overwrite", is_flag=True, default=False, help="Replace an existing variant.yml.")
@fail_cleanly
def main(checkpoint: Path, backbone: str, dataset: str, overwrite: bool) -> None:
    """Write CHECKPOINT's variant.yml (SegFormer with BACKBONE, trained on DATASET) and check that it loads."""
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if backbone_family(backbone) != "mit":
        raise UsageError(f"--backbone {backbone} is not a MiT backbone; mmseg SegFormer checkpoints use mit_b0 ... mit_b5")
    target = checkpoint.parent / "variant.yml"
    if target.exists() and not overwrite:
        raise UsageError(f"{target} exists; pass --overwrite to replace it")
    defaults = training_defaults(backbone, dataset)
    net = net_kwargs_for(backbone, "segformer", dataset_info(dataset).n_cls, defaults["crop_size"])
    variant = {
        "net_kwargs": net,
        "dataset_kwargs": {"dataset": dataset, "image_size": defaults["im_size"], "crop_size": defaults["crop_size"],
                           "normalization": net["normalization"]},
        "inference_kwargs": {"im_size": defaults["im_size"], "window_size": defaults["window_size"],
                             "window_stride": defaults["window_stride"]},
    }
    previous = target.read_text() if target.exists() else None
    target.write_text(yaml.safe_dump(variant, sort_keys=True))
    try:
        load_model(checkpoint)
    except UsageError:
        if previous is None:
            target.unlink()
        else:
            target.write_text(previous)
        raise
    click.echo(f"wrote {target}; {checkpoint} loads as a {backbone} SegFormer for {dataset}")


if __name__ == "__main__":
    main()
