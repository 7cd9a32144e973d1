"""Evaluate a checkpoint: ``python -m segm.eval.miou MODEL_PATH DATASET_NAME [--multiscale] [--patch-type ...]``.

Without ``--patch-type`` the model runs with the patch type and settings its ``variant.yml`` records.

Sliding-window inference (windows forwarded ``--window-batch-size`` at a time, in the reference's order),
metrics on the original-resolution labels as mmsegmentation 0.14 computes them; prints the reference's
lines and a per-class table and writes ``scores_{ss,ms}.yml`` beside the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from segm.cli import (
    POSITIVE,
    Command,
    ReductionRequest,
    apply_requested_reduction,
    compile_option,
    device_option,
    dtype_option,
    fail_cleanly,
    reduction_request,
    resolve_device,
    root_option,
    token_reduction_options,
    window_batch_option,
    window_options,
)
from segm.config import backbone_family, dataset_config, family_overrides
from segm.data import STATS, create_dataset, create_loader
from segm.data.loader import ShardSampler
from segm.engine import evaluate
from segm.model.factory import load_model, variant_crop_size, variant_normalization
from segm.run_dir import move_aside
from segm.runtime import compile_model, dtype_autocast
from segm.utils import distributed
from segm.visualize import blend, colorize, denormalize
from tokred.errors import UsageError


def default_window(variant: dict[str, Any], dataset: str, crop_size: int) -> tuple[int, int]:
    """The published sliding window of a model family: Segmenter's is the crop with stride crop - 32 (512 on
    Cityscapes); SegFormer's (mmseg) the crop with the family's stride for the dataset (Cityscapes 768)."""
    backbone = variant["net_kwargs"].get("backbone")
    if backbone is not None and backbone_family(backbone) == "mit":
        return crop_size, family_overrides(backbone, dataset).get("window_stride", crop_size)
    return crop_size, 512 if dataset == "cityscapes" else crop_size - 32


class ImageSaver:
    """Writes ``input/``, ``pred/`` and ``gt/`` PNGs (blended or not) under ``<model dir>/images``."""

    def __init__(self, out_dir: Path, dataset: Any, normalization: str, use_blend: bool):
        self.out_dir = out_dir
        self.palette = np.asarray(dataset.palette, dtype=np.uint8)
        self.stats = STATS[normalization]
        self.use_blend = use_blend
        self.per_city = dataset.info.name == "cityscapes"

    def __call__(self, item: dict[str, Any], pred: torch.Tensor) -> None:
        H, W = item["ori_shape"]
        unflipped = [v for v, f in zip(item["im"], item["flip"]) if not f] or list(item["im"])
        view = min(unflipped, key=lambda v: abs(v.shape[-2] * v.shape[-1] - H * W))
        view = F.interpolate(view.reshape(1, 3, *view.shape[-2:]).float(), (H, W), mode="bilinear", align_corners=False)
        image = denormalize(view, self.stats["mean"], self.stats["std"])
        pred_rgb = colorize(pred, self.palette)
        gt_rgb = colorize(item["gt"], self.palette)
        if self.use_blend:
            pred_rgb, gt_rgb = blend(image, pred_rgb), blend(image, gt_rgb)
        name = Path(item["filename"])
        base = self.out_dir / name.parent if self.per_city else self.out_dir
        stem = name.name if self.per_city else str(name)
        for sub, array in (("input", image), ("pred", pred_rgb), ("gt", gt_rgb)):
            path = (base / sub / stem).with_suffix(".png")
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)


def write_archive(folder: Path) -> Path:
    """Zip ``folder`` to ``folder.zip`` through a temporary name, so no half-written zip is ever left."""
    tmp_base = folder.with_name(f".{folder.name}-partial")
    archive = Path(shutil.make_archive(str(tmp_base), "zip", folder))
    final = folder.with_suffix(".zip")
    archive.replace(final)
    return final


def scores_path(model_dir: Path, suffix: str, settings: dict[str, Any]) -> Path:
    """``scores_<ss|ms>.yml``, unless that file holds the scores of other settings: then a file named by
    these settings' digest, so that no evaluation silently replaces another one's scores."""
    plain = model_dir / f"scores_{suffix}.yml"
    if not plain.exists() or (yaml.safe_load(plain.read_text()) or {}).get("settings") == settings:
        return plain
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return model_dir / f"scores_{suffix}-{digest}.yml"


def format_table(names: list[str], cat_iou: np.ndarray, cat_acc: np.ndarray) -> str:
    """A Markdown table of per-class IoU and accuracy (percent)."""
    width = max([len("class")] + [len(n) for n in names])

    def fmt(value: float) -> str:
        return f"{'nan' if math.isnan(value) else f'{100 * value:.2f}':>6}"

    lines = [f"| {'class':<{width}} |    IoU |    Acc |", f"|{'-' * (width + 2)}|-------:|-------:|"]
    lines += [f"| {name:<{width}} | {fmt(iou)} | {fmt(acc)} |" for name, iou, acc in zip(names, cat_iou, cat_acc)]
    return "\n".join(lines)


@click.command(cls=Command)
@click.argument("model_path", type=click.Path(path_type=Path))
@click.argument("dataset_name", type=str)
@root_option
@click.option("--im-size", type=POSITIVE, default=None, help="Short side of the test images (default: config.yml's for the dataset).")
@click.option("--multiscale/--singlescale", default=False, show_default=True, help="6 scales x flip, or one view.")
@click.option("--blend/--no-blend", default=True, show_default=True, help="Blend saved predictions with the input.")
@window_options
@window_batch_option(4)
@click.option("--save-images/--no-save-images", default=False, show_default=True, help="Write images/ and images.zip beside the model.")
@click.option("-frac-dataset", "--frac-dataset", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Evaluate the first ceil(fraction x N) validation images (in 0..1, 0 excluded).")
@click.option("--num-workers", type=click.IntRange(0), default=2, show_default=True)
@dtype_option("the forward")
@compile_option
@device_option
@token_reduction_options
@fail_cleanly
def main(model_path: Path, dataset_name: str, **opts: Any) -> None:
    """Evaluate MODEL_PATH (checkpoint.pth with variant.yml beside it) on the validation set of DATASET_NAME."""
    request = reduction_request(opts)
    requested = resolve_device(opts.pop("device"))
    env = distributed.init_distributed(requested)
    device = distributed.process_device(requested, env)
    try:
        run(model_path, dataset_name, opts, request, env, device)
    finally:
        distributed.destroy()


def run(model_path: Path, dataset_name: str, opts: dict[str, Any], request: ReductionRequest,
        env: distributed.DistEnv, device: torch.device) -> None:
    model, variant = load_model(model_path)
    ds_cfg = dataset_config(dataset_name)
    trained = variant.get("dataset_kwargs", {})
    patch_type, settings = apply_requested_reduction(model, request, variant, announce=env.is_main)
    model.to(device).eval()

    crop_size = variant_crop_size(variant)
    im_size = opts["im_size"] or ds_cfg.get("im_size", trained.get("image_size"))
    default_size, default_stride = default_window(variant, dataset_name, crop_size)
    window_size = opts["window_size"] or default_size
    window_stride = opts["window_stride"] or default_stride
    normalization = variant_normalization(variant)
    dataset = create_dataset(dataset_name, "val", im_size=im_size, normalization=normalization,
                             root=opts["root"], multiscale=opts["multiscale"])
    if dataset.n_cls != model.n_cls:
        raise UsageError(f"the model predicts {model.n_cls} classes but {dataset_name} has {dataset.n_cls}")
    loader = create_loader(dataset, 1, num_workers=opts["num_workers"], distributed=env.distributed,
                           pin_memory=device.type == "cuda")
    n_images = math.ceil(len(dataset) * opts["frac_dataset"])
    per_process = len(ShardSampler(n_images, env.world_size, env.rank))  # this process's share of the first n_images

    model_dir = model_path if model_path.is_dir() else model_path.parent
    saver = None
    if opts["save_images"]:
        images_dir = model_dir / "images"
        if env.is_main:
            moved = move_aside(model_dir, ("images", "images.zip"))
            if moved is not None:
                click.echo(f"note: moved the earlier evaluation images to {moved}", err=True)
        distributed.barrier()
        saver = ImageSaver(images_dir, dataset, normalization, opts["blend"])
    forward = compile_model(model) if opts["compiled"] else model
    scores = evaluate(forward, loader, dataset.n_cls, window_size, window_stride, device,
                      window_batch_size=opts["window_batch_size"], autocast=dtype_autocast(device, opts["dtype"]),
                      show_progress=env.is_main, max_images=per_process, on_prediction=saver)
    distributed.barrier()
    if not env.is_main:
        return
    if saver is not None:
        click.echo(f"Saved evaluation images in {write_archive(model_dir / 'images')}")
    inference_mode = "multi_scale" if opts["multiscale"] else "single_scale"
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou"):
        click.echo(f"{key}: {scores[key]}")
    click.echo(f"inference: {inference_mode}")
    click.echo(f"images: {scores['images']}, window {window_size}, stride {window_stride}, short side {im_size}")
    click.echo(format_table(list(dataset.names), scores["cat_iou"], scores["cat_acc"]))
    out = {
        "cat_iou": [float(v) for v in np.round(100 * scores["cat_iou"], 2)],
        "inference": inference_mode,
        "mean_accuracy": scores["mean_accuracy"],
        "mean_iou": scores["mean_iou"],
        "pixel_accuracy": scores["pixel_accuracy"],
        "settings": {
            "checkpoint": str(model_path), "dataset": dataset_name, "split": "val", "images": scores["images"],
            "frac_dataset": opts["frac_dataset"], "patch_type": patch_type, "patch_settings": settings,
            "short_side": im_size, "window_size": window_size, "window_stride": window_stride,
            "window_batch_size": opts["window_batch_size"], "dtype": opts["dtype"], "compiled": opts["compiled"],
        },
    }
    path = scores_path(model_dir, "ms" if opts["multiscale"] else "ss", out["settings"])
    path.write_text(yaml.safe_dump(out))
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
