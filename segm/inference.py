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

from segm.cli import Command, apply_requested_reduction, fail_cleanly, reduction_request, resolve_device, token_reduction_options
from segm.data import STATS, dataset_info, dataset_names, load_rgb
from segm.model.factory import load_model, variant_crop_size, variant_normalization
from segm.model.inference import inference
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


def resize_short_side(rgb: np.ndarray, size: int) -> np.ndarray:
    scale = size / min(rgb.shape[:2])
    h, w = round(rgb.shape[0] * scale), round(rgb.shape[1] * scale)
    return np.array(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))


def to_tensor(rgb: np.ndarray, normalization: str) -> torch.Tensor:
    stats = STATS[normalization]
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)
    return ((x - torch.tensor(stats["mean"])[:, None, None]) / torch.tensor(stats["std"])[:, None, None])[None]


@click.command(cls=Command)
@click.option("--model-path", type=click.Path(path_type=Path), required=True, help="checkpoint.pth (variant.yml beside it).")
@click.option("-i", "--input-dir", type=click.Path(path_type=Path), required=True, help="Folder of images.")
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), required=True, help="Folder for the blended predictions.")
@click.option("--gpu/--cpu", "use_gpu", default=None, help="Device (default: the GPU when there is one).")
@click.option("--dataset", type=click.Choice(dataset_names()), default=None,
              help="Palette and class names (default: the dataset the model was trained on).")
@click.option("--resize/--no-resize", default=False, show_default=True,
              help="Resize the short side to the model's im_size first (the reference does not).")
@click.option("--window-batch-size", type=int, default=2, show_default=True)
@click.option("--show-merges", is_flag=True, default=False,
              help="Draw the merge groups of every reduction step beside the prediction.")
@token_reduction_options
@fail_cleanly
def main(model_path: Path, input_dir: Path, output_dir: Path, use_gpu: bool | None, **opts: Any) -> None:
    """Segment every image of INPUT_DIR and write blended predictions (same file names) to OUTPUT_DIR."""
    request = reduction_request(opts)
    device = resolve_device(None if use_gpu is None else ("cuda" if use_gpu else "cpu"))
    images = list_images(input_dir)
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
    output_dir.mkdir(parents=True, exist_ok=True)
    for path in progress(images, desc="images"):
        rgb = load_rgb(path)
        if opts["resize"]:
            rgb = resize_short_side(rgb, inf.get("im_size", crop))
        x = to_tensor(rgb, normalization).to(device)
        with torch.no_grad():
            probs = inference(model, [x], [{"flip": False}], rgb.shape[:2], window, stride, opts["window_batch_size"])
        out = blend(rgb, colorize(probs.argmax(0), info.palette))
        if opts["show_merges"]:
            maps, grid = reduction_maps(model, x, patch_type)
            titles = [f"merge step {i + 1}: {int(m.max()) + 1} tokens" for i, m in enumerate(maps)]
            out = np.asarray(merge_panels(out, maps, grid, model.patch_size, titles))
        Image.fromarray(out).save(output_dir / path.name)
    click.echo(f"wrote {len(images)} predictions to {output_dir}")


if __name__ == "__main__":
    main()
