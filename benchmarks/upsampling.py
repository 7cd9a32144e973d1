"""The final upsampling of the class masks: layouts and dtypes timed against NCHW fp32, and what they cost in argmax.

Times ``F.interpolate`` of ``[batch, classes, grid, grid]`` logits to ``size`` (default: ViT-S/16 at 512,
150 classes) in NCHW fp32, the reference, and through ``segm.model.inference.upsample_logits`` outside
autocast and under each autocast dtype, all variants interleaved in one run. With ``--checkpoint``, the
logits a trained model produces on synthetic validation scenes are upsampled in fp16 and in bf16, and
their per-pixel argmax is compared with fp32's (mean over the images and the worst image).

    python benchmarks/upsampling.py [--device cpu] [--checkpoint runs/demo/checkpoint.pth] [--out FILE.md]
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable

import click
import torch
import torch.nn.functional as F

import segm.model.segmenter as segmenter
from segm.cli import resolve_device
from segm.measure import measurement_loader, timed_call
from segm.model.factory import load_model, variant_crop_size, variant_normalization
from segm.model.inference import upsample_logits
from segm.runtime import DTYPES, dtype_autocast

from patch_types import machine_card
from report import emit


def timings(variants: dict[str, Callable[[], torch.Tensor]], device: torch.device, iters: int) -> dict[str, float]:
    """Median seconds per variant, the variants interleaved (one warm-up call each)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, run in variants.items():
        run()
    for _ in range(iters):
        for name, run in variants.items():
            times[name].append(timed_call(run, device))
    return {name: statistics.median(t) for name, t in times.items()}


def captured_logits(checkpoint: Path, images: int) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """The fp32 logits ``upsample_logits`` receives while the checkpoint's model segments synthetic scenes."""
    model, variant = load_model(checkpoint)
    model.eval()
    loader, _ = measurement_loader("synthetic", None, "val", variant_crop_size(variant),
                                   variant_normalization(variant), limit=images)
    seen: list[tuple[torch.Tensor, tuple[int, int]]] = []

    def spy(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        seen.append((logits.float().clone(), tuple(size)))
        return upsample_logits(logits, size)

    segmenter.upsample_logits, original = spy, segmenter.upsample_logits
    try:
        with torch.no_grad():
            for x in loader:
                model(x)
    finally:
        segmenter.upsample_logits = original
    return seen


def agreement(captured: list[tuple[torch.Tensor, tuple[int, int]]], dtype: torch.dtype) -> tuple[float, float]:
    """Mean and worst per-image share of pixels whose argmax in ``dtype`` upsampling equals fp32's."""
    shares = []
    for logits, size in captured:
        want = F.interpolate(logits, size, mode="bilinear", align_corners=False).argmax(1)
        got = F.interpolate(logits.to(dtype), size, mode="bilinear", align_corners=False).argmax(1)
        shares.extend((got == want).flatten(1).float().mean(1).tolist())
    return statistics.mean(shares), min(shares)


@click.command()
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch", default=2, show_default=True)
@click.option("--classes", default=150, show_default=True)
@click.option("--grid", default=32, show_default=True, help="Side of the logit grid (512 / 16).")
@click.option("--size", default=512, show_default=True, help="Side of the upsampled map.")
@click.option("--iters", default=10, show_default=True)
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A trained Segmenter whose logits measure the argmax agreement.")
@click.option("--images", default=32, show_default=True, help="Synthetic validation scenes for the agreement.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the table here.")
def main(device: str, batch: int, classes: int, grid: int, size: int, iters: int, checkpoint: Path | None,
         images: int, out: Path | None) -> None:
    """Time the class-mask upsampling variants and measure the argmax agreement of reduced precisions."""
    dev = resolve_device(device)
    torch.manual_seed(0)
    logits = torch.randn(batch, classes, grid, grid, device=dev)
    reduced = ("fp16", "bf16")

    def under(dtype: str) -> Callable[[], torch.Tensor]:
        autocast = dtype_autocast(dev, dtype)

        def run() -> torch.Tensor:
            with autocast():
                return upsample_logits(logits, (size, size))
        return run

    variants = {"NCHW fp32 (F.interpolate)": lambda: F.interpolate(logits, (size, size), mode="bilinear",
                                                                   align_corners=False),
                "upsample_logits, fp32": under("fp32")}
    variants.update({f"upsample_logits, {name} autocast": under(name) for name in reduced})
    seconds = timings(variants, dev, iters)
    base = seconds["NCHW fp32 (F.interpolate)"]
    lines = [f"[{batch}, {classes}, {grid}, {grid}] -> {size}x{size}, bilinear; device {dev.type} "
             f"({machine_card(dev)}); median of {iters} interleaved calls.", "",
             "| variant | output dtype | layout | ms | speed-up |", "|---|---|---|---|---|"]
    for name, run in variants.items():
        y = run()
        layout = "channels-last" if y.is_contiguous(memory_format=torch.channels_last) else "NCHW"
        lines.append(f"| {name} | {str(y.dtype).removeprefix('torch.')} | {layout} | {1e3 * seconds[name]:.1f} | "
                     f"{base / seconds[name]:.2f} |")
    if checkpoint is not None:
        captured = captured_logits(checkpoint, images)
        lines += ["", f"Argmax agreement with fp32 upsampling, logits of {checkpoint} on {images} synthetic "
                  "validation scenes:", "", "| dtype | mean | worst image |", "|---|---|---|"]
        for name in reduced:
            mean, worst = agreement(captured, DTYPES[name])
            lines.append(f"| {name} | {100 * mean:.3f} % | {100 * worst:.2f} % |")
    emit("\n".join(lines), out)


if __name__ == "__main__":
    main()
