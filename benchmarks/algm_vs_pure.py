"""Pure vs ALGM: GFLOPs, images/s and how much of the FLOP saving becomes time saving.

Random weights on synthetic scenes do not merge like trained models, so for each backbone the CLAP
threshold is first searched (bisection on a few images) so that ALGM's GFLOPs reach the published
ratio to the pure model (Ti 0.66, S 0.68, B 0.70, L 0.65). Then pure and ALGM are timed interleaved on
the same images with the speedtest protocol (each image repeated ``--repeat`` times per forward), and the
reported ALGM GFLOPs are the mean over exactly the timed images (pure GFLOPs do not depend on the image).
``efficiency = speed-up x FLOPs ratio``: 1.0 means every FLOP saved became time saved.

    python benchmarks/algm_vs_pure.py [--device cuda] [--large] [--out benchmarks/results/algm_vs_pure_cpu.md]
"""

from __future__ import annotations

import platform
import statistics
from contextlib import nullcontext
from pathlib import Path

import click
import torch

from segm.cli import resolve_device
from segm.measure import flop_analysis, measured_model, measurement_loader
from segm.model.token_reduction import apply_token_reduction
from segm.speedtest import batches, measure

from report import emit

BACKBONES = {  # name: (backbone, crop, ALGM layers, published ALGM/pure GFLOPs ratio)
    "ViT-Ti/16": ("vit_tiny_patch16_384", 512, [1, 5], 8.4 / 12.8),
    "ViT-S/16": ("vit_small_patch16_384", 512, [1, 5], 26.3 / 38.6),
    "ViT-B/16": ("vit_base_patch16_384", 512, [1, 5], 91 / 130),
    "ViT-L/16": ("vit_large_patch16_384", 640, [1, 7], 438 / 672),
}


def mean_gflops(model: torch.nn.Module, images: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return statistics.mean(flop_analysis(model, x).total() / 1e9 for x in images)


def search_threshold(model, layers: list[int], images: list[torch.Tensor], pure: float, target: float, steps: int) -> float:
    """CLAP threshold whose ALGM/pure GFLOPs ratio is closest to ``target`` (GFLOPs grow with the threshold)."""
    low, high = -1.0, 1.0
    best = (float("inf"), 1.0)
    for _ in range(steps):
        mid = (low + high) / 2
        apply_token_reduction(model, "algm", selected_layers=layers, threshold=mid)
        ratio = mean_gflops(model, images) / pure
        best = min(best, (abs(ratio - target), mid))
        low, high = (mid, high) if ratio < target else (low, mid)
    return best[1]


@click.command()
@click.option("--device", default="cpu", show_default=True)
@click.option("--large", is_flag=True, default=False, help="Include ViT-L/16 at 640.")
@click.option("--repeat", type=int, default=None, help="Copies per forward (default: 32 on GPU, 4 on CPU).")
@click.option("--warmup", type=int, default=None, help="Untimed forwards (default: 20 on GPU, 2 on CPU).")
@click.option("--iters", type=int, default=None, help="Timed forwards per model (default: 100 on GPU, 6 on CPU).")
@click.option("--search-images", type=int, default=3, show_default=True,
              help="Timed images on which the CLAP threshold is searched.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the table here.")
def main(device: str, large: bool, repeat: int | None, warmup: int | None, iters: int | None, search_images: int,
         out: Path | None) -> None:
    """Benchmark pure Segmenter against ALGM for ViT-Ti/S/B (and L) with random weights."""
    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    repeat = repeat or (32 if gpu else 4)
    warmup = warmup if warmup is not None else (20 if gpu else 2)
    iters = iters or (100 if gpu else 6)
    rows = []
    for label, (backbone, crop, layers, target) in BACKBONES.items():
        if label == "ViT-L/16" and not large:
            continue
        model, info = measured_model(None, backbone, "mask_transformer", crop, 150)
        loader, _ = measurement_loader("synthetic", None, "val", crop, info["normalization"], limit=warmup + iters)
        timed_images = list(batches(loader, warmup + iters))[warmup:]
        pure_gflops = mean_gflops(model, timed_images[:1])
        threshold = search_threshold(model, layers, timed_images[:search_images], pure_gflops, target, steps=10)
        apply_token_reduction(model, "algm", selected_layers=layers, threshold=threshold)
        algm_gflops = mean_gflops(model, timed_images)
        model.to(dev)
        variants = {
            "pure": lambda: apply_token_reduction(model, "pure"),
            "algm": lambda: apply_token_reduction(model, "algm", selected_layers=layers, threshold=threshold),
        }
        times = measure(model, loader, dev, repeat, warmup, iters, nullcontext, False, variants, show_progress=False)
        fps = {k: repeat / statistics.mean(v) for k, v in times.items()}
        ratio = algm_gflops / pure_gflops
        speedup = fps["algm"] / fps["pure"]
        rows.append((label, crop, threshold, pure_gflops, algm_gflops, ratio, fps["pure"], fps["algm"], speedup, speedup * ratio))
        model.cpu()
        click.echo(f"{label}: threshold {threshold:.4f}, GFLOPs {pure_gflops:.2f} -> {algm_gflops:.2f}, "
                   f"im/s {fps['pure']:.2f} -> {fps['algm']:.2f}", err=True)
    name = torch.cuda.get_device_name(dev) if gpu else (platform.processor() or platform.machine())
    lines = [
        f"Random weights, synthetic scenes squashed to the crop, mask-transformer decoder, 150 classes; device {device} "
        f"({name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads); batch = 1 image x {repeat} copies, "
        f"{warmup} warm-up and {iters} timed forwards per model, interleaved, fp32.",
        "",
        "| model | crop | CLAP threshold | GFLOPs pure | GFLOPs ALGM | FLOPs ratio | im/s pure | im/s ALGM | speed-up | efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {r[0]} | {r[1]} | {r[2]:.4f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.3f} | {r[6]:.2f} | {r[7]:.2f} | {r[8]:.3f} | {r[9]:.3f} |"
          for r in rows],
    ]
    emit("\n".join(lines), out)


if __name__ == "__main__":
    main()
