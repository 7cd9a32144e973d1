"""Throughput of the data pipelines at ADE20K settings (512 crop), per loader worker.

Writes the synthetic dataset in the ADE20K layout at ADE20K-like image sizes (512 x 683 JPEGs by
default) to a temporary folder, reads it back through the ADE20K reader, and times:

- one worker: the dataset's ``__getitem__`` in a single process with one torch thread, which is
  what each DataLoader worker runs (decode + pipeline), split into decoding and transforms
  (median of three passes);
- a DataLoader with several workers, for the aggregate rate on this machine.

Usage: ``python benchmarks/data_loading.py [--images 48] [--workers 2] [--out benchmarks/results/data_loading.md]``
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch
import torchvision

from segm.data import create_dataset, create_loader
from segm.data.synthetic.write import write_layout

from report import emit

TARGET = 25.0
CROP = 512


def rate(work: Callable[[int], object], count: int, warmup: int = 2, repeats: int = 3) -> float:
    """Median over ``repeats`` passes of the items per second of ``work(i)`` for i < ``count``."""
    for index in range(warmup):
        work(index)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for index in range(count):
            work(index)
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def loader_rate(dataset, batch_size: int, workers: int) -> float:
    """Images per second through a DataLoader, timed from the first batch on (workers already started)."""
    loader = create_loader(dataset, batch_size, num_workers=workers, seed=0)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    images = sum(len(batch["im"]) for batch in iterator)
    return images / (time.perf_counter() - start)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure(root: Path, images: int, workers: int) -> list[tuple[str, float]]:
    train = create_dataset("ade20k", "train", root=root, crop_size=CROP, im_size=CROP)
    val = create_dataset("ade20k", "val", root=root, im_size=CROP)
    val_ms = create_dataset("ade20k", "val", root=root, im_size=CROP, multiscale=True)
    count = min(images, len(train))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = [
        ("train, decode only (image + label), 1 worker", rate(lambda i: (train.image(i), train.label(i)), count)),
        ("train, full pipeline, 1 worker", rate(lambda i: train[i], count)),
        ("val single-scale, 1 worker", rate(lambda i: val[i % len(val)], count)),
        ("val multi-scale + flip (12 views), 1 worker", rate(lambda i: val_ms[i % len(val_ms)], max(count // 4, 4))),
    ]
    torch.set_num_threads(threads)
    rows.append((f"train, DataLoader with {workers} workers, batch 8", loader_rate(train, 8, workers)))
    return rows


def render(rows: list[tuple[str, float]], images: int, height: int, width: int, workers: int) -> str:
    per_worker = dict(rows)["train, full pipeline, 1 worker"]
    verdict = "meets" if per_worker >= TARGET else "misses"
    lines = [
        "# Data loading throughput (ADE20K settings, 512 crop)",
        "",
        f"Synthetic scenes written in the ADE20K layout ({height} x {width} JPEG, {images} train images) and read",
        "back through the ADE20K reader; produced by `python benchmarks/data_loading.py`.",
        f"Machine: {cpu_name()}, {os.cpu_count()} CPU cores; "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}.",
        "",
        "| pipeline | images/s |",
        "|---|---:|",
        *(f"| {name} | {value:.1f} |" for name, value in rows),
        "",
        f"Per-worker training throughput {per_worker:.1f} images/s {verdict} the target of {TARGET:.0f} images/s"
        f" per worker.",
        "",
    ]
    return "\n".join(lines)


@click.command(help="Time the train and val pipelines at ADE20K settings on synthetic data.")
@click.option("--images", default=48, show_default=True, help="Training images to write and time.")
@click.option("--height", default=512, show_default=True)
@click.option("--width", default=683, show_default=True)
@click.option("--workers", default=2, show_default=True, help="DataLoader workers for the aggregate row.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the Markdown table here (e.g. benchmarks/results/data_loading.md).")
def main(images: int, height: int, width: int, workers: int, out: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_layout(root, "ade20k", {"train": images, "val": max(images // 4, 4)}, height, width)
        rows = measure(root, images, workers)
    emit(render(rows, images, height, width, workers), out)


if __name__ == "__main__":
    main()
