"""Predict a folder of images: ``python -m segm.inference --model-path run/checkpoint.pth -i images/ -o out/``.

Runs in eval mode with sliding windows (the model's window size and stride), colours predictions with
the dataset's own palette and blends them with the input; ``--show-merges`` adds the merge groups of
the patch type (one panel per step). Without ``--patch-type`` the model's ``variant.yml`` decides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from PIL import Image

from segm.cli import (
    Command,
    apply_requested_reduction,
    compile_option,
    device_option,
    dtype_option,
    fail_cleanly,
    reduction_request,
    refuse_overwriting,
    resolve_device,
    token_reduction_options,
    window_batch_option,
)
from segm.data import dataset_info, dataset_names, load_rgb
from segm.images import model_input, resize_rgb, short_side_size
from segm.model.factory import load_model, variant_crop_size, variant_normalization
from segm.model.inference import inference
from segm.runtime import compile_model, dtype_autocast
from segm.utils.progress import progress
from segm.visualize import blend, colorize, merge_panels, reduction_maps
from tokred.errors import UsageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def list_images(folder: Path) -> list[Path]:
    """Image files of ``folder`` (by extension), sorted; a clear error when there are none."""
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder not found: {folder}")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return images


@click.command(cls=Command)
@click.option("--model-path", type=click.Path(path_type=Path), required=True, help="checkpoint.pth (variant.yml beside it).")
@click.option("-i", "--input-dir", type=click.Path(path_type=Path), required=True, help="Folder of images.")
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), required=True, help="Folder for the blended predictions.")
@click.option("--gpu/--cpu", "use_gpu", default=None, help="The reference's device flags (--device chooses any device).")
@device_option
@click.option("--dataset", type=click.Choice(dataset_names()), default=None,
              help="Palette and class names (default: the dataset the model was trained on).")
@click.option("--resize/--no-resize", default=False, show_default=True,
              help="Resize the short side to the model's im_size first (the reference does not).")
@window_batch_option(2)
@dtype_option("the forward")
@compile_option
@click.option("--show-merges", is_flag=True, default=False,
              help="Draw the merge groups of every reduction step beside the prediction.")
@token_reduction_options
@fail_cleanly
def main(model_path: Path, input_dir: Path, output_dir: Path, use_gpu: bool | None, **opts: Any) -> None:
    """Segment every image of INPUT_DIR and write blended predictions (same file names) to OUTPUT_DIR."""
    request = reduction_request(opts)
    if opts["device"] is not None and use_gpu is not None:
        raise UsageError("give --device or --gpu/--cpu, not both")
    device = resolve_device(opts["device"] if use_gpu is None else ("cuda" if use_gpu else "cpu"))
    images = list_images(input_dir)
    refuse_overwriting(images + [model_path], [output_dir / p.name for p in images], f"--output-dir {output_dir}")
    model, variant = load_model(model_path)
    patch_type, _ = apply_requested_reduction(model, request, variant, trace_source=opts["show_merges"])
    model.to(device).eval()
    trained = variant.get("dataset_kwargs", {})
    info = dataset_info(opts["dataset"] or trained.get("dataset", "ade20k"))
    if info.n_cls != model.n_cls:
        raise UsageError(f"the model predicts {model.n_cls} classes but {info.name} has {info.n_cls}; pass --dataset")
    normalization = variant_normalization(variant)
    inf = variant.get("inference_kwargs", {})
    crop = variant_crop_size(variant)
    window, stride = inf.get("window_size", crop), inf.get("window_stride", crop)
    forward = compile_model(model) if opts["compiled"] else model
    autocast = dtype_autocast(device, opts["dtype"])
    output_dir.mkdir(parents=True, exist_ok=True)
    for path in progress(images, desc="images"):
        rgb = load_rgb(path)
        if opts["resize"]:
            rgb = resize_rgb(rgb, short_side_size(*rgb.shape[:2], inf.get("im_size", crop)))
        x = model_input(rgb, normalization)[None].to(device)
        with torch.no_grad(), autocast():
            probs = inference(forward, [x], [{"flip": False}], rgb.shape[:2], window, stride, opts["window_batch_size"])
        out = blend(rgb, colorize(probs.argmax(0), info.palette))
        if opts["show_merges"]:
            maps, grid = reduction_maps(model, x, patch_type)
            titles = [f"merge step {i + 1}: {int(m.max()) + 1} tokens" for i, m in enumerate(maps)]
            out = np.asarray(merge_panels(out, maps, grid, model.patch_size, titles))
        Image.fromarray(out).save(output_dir / path.name)
    click.echo(f"wrote {len(images)} predictions to {output_dir}")


if __name__ == "__main__":
    main()
