"""Throughput of the data pipelines at ADE20K settings (512 crop), per loader worker.

Writes the synthetic dataset in the ADE20K layout at ADE20K-like image sizes (512 x 683 JPEGs by
default) to a temporary folder, reads it back through the ADE20K reader, and times:

- one worker: the dataset's ``__getitem__`` in a single process with one torch thread, which is
  what each DataLoader worker runs (decode + pipeline), split into decoding and transforms
  (median of three passes);
- a DataLoader with several workers, for the aggregate rate on this machine.

OpenCV threading: DataLoader workers run OpenCV single-threaded (``cv2.setNumThreads(0)`` in
:func:`segm.data.loader.seed_worker`), so the one-worker rows run that way too; one row runs the
pipeline with OpenCV's default pool instead, and one loader row lets every worker keep that pool,
which shows what the setting avoids (workers x cores threads on the cores).

``--baseline`` adds the figures of an earlier report of this script as a column, e.g. one made
before a change (``--baseline-label`` names it).

Usage: ``python benchmarks/data_loading.py [--images 48] [--workers 2] [--out benchmarks/results/data_loading.md]
[--baseline OLD.md --baseline-label "before"]``
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
import cv2
import torch
import torchvision

from segm.data import create_dataset, create_loader
from segm.data.loader import seed_worker
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


def pooled_worker(worker_id: int) -> None:
    """The project's worker set-up, then OpenCV's default thread pool back (for comparison only)."""
    seed_worker(worker_id)
    cv2.setNumThreads(-1)


def loader_rate(dataset, batch_size: int, workers: int, opencv_pool: bool = False) -> float:
    """Images per second through a DataLoader, timed from the first batch on (workers already started).

    ``opencv_pool`` keeps OpenCV's default thread pool in every worker instead of the project's setting.
    """
    loader = create_loader(dataset, batch_size, num_workers=workers, seed=0)
    if opencv_pool:
        loader.worker_init_fn = pooled_worker  # read when the workers start
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
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(0)  # as in a DataLoader worker (seed_worker)
    rows = [
        ("train, decode only (image + label), 1 worker", rate(lambda i: (train.image(i), train.label(i)), count)),
        ("train, full pipeline, 1 worker", rate(lambda i: train[i], count)),
        ("val single-scale, 1 worker", rate(lambda i: val[i % len(val)], count)),
        ("val multi-scale + flip (12 views), 1 worker", rate(lambda i: val_ms[i % len(val_ms)], max(count // 4, 4))),
    ]
    cv2.setNumThreads(-1)
    rows.append((f"train, full pipeline, 1 process, OpenCV default pool ({cv2.getNumThreads()} threads)",
                 rate(lambda i: train[i], count)))
    torch.set_num_threads(threads)
    cv2.setNumThreads(cv_threads)
    rows.append((f"train, DataLoader with {workers} workers, batch 8", loader_rate(train, 8, workers)))
    rows.append((f"train, DataLoader with {workers} workers, batch 8, OpenCV default pool in each worker",
                 loader_rate(train, 8, workers, opencv_pool=True)))
    return rows


def read_rows(path: Path) -> dict[str, float]:
    """The rows of an earlier report of this script: name -> its last figure (that run's own)."""
    rows = {}
    for line in path.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and line.lstrip().startswith("|"):
            try:
                rows[cells[0]] = float(cells[-1])
            except ValueError:
                continue
    return rows


def render(rows: list[tuple[str, float]], images: int, height: int, width: int, workers: int, load: float,
           baseline: dict[str, float] | None = None, baseline_label: str = "baseline") -> str:
    per_worker = dict(rows)["train, full pipeline, 1 worker"]
    verdict = "meets" if per_worker >= TARGET else "misses"
    if baseline is None:
        table = ["| pipeline | images/s |", "|---|---:|", *(f"| {name} | {value:.1f} |" for name, value in rows)]
    else:
        def old(name: str) -> str:
            return f"{baseline[name]:.1f}" if name in baseline else "–"

        table = [f"| pipeline | {baseline_label}, images/s | images/s |", "|---|---:|---:|",
                 *(f"| {name} | {old(name)} | {value:.1f} |" for name, value in rows)]
    lines = [
        "# Data loading throughput (ADE20K settings, 512 crop)",
        "",
        f"Synthetic scenes written in the ADE20K layout ({height} x {width} JPEG, {images} train images) and read",
        "back through the ADE20K reader; produced by `python benchmarks/data_loading.py`.",
        f"Machine: {cpu_name()}, {os.cpu_count()} CPU cores; "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, OpenCV {cv2.__version__}.",
        f"Load average when the run started: {load:.1f} (other processes sharing the cores lower every figure;"
        " compare figures of one run, or runs at the same load).",
        "",
        "OpenCV threading: DataLoader workers call `cv2.setNumThreads(0)` (`segm.data.loader.seed_worker`) and",
        "torch runs one thread per worker (DataLoader's default), so each worker uses one core; the one-worker",
        "rows run the same way in a single process. The rows marked \"OpenCV default pool\" keep OpenCV's",
        "thread pool (one thread per core) for comparison.",
        "",
        *table,
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
@click.option("--baseline", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="An earlier report of this script whose figures to show beside the new ones.")
@click.option("--baseline-label", default="baseline", show_default=True, help="Column title of --baseline.")
def main(images: int, height: int, width: int, workers: int, out: Path | None, baseline: Path | None,
         baseline_label: str) -> None:
    old = read_rows(baseline) if baseline is not None else None
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_layout(root, "ade20k", {"train": images, "val": max(images // 4, 4)}, height, width)
        rows = measure(root, images, workers)
    emit(render(rows, images, height, width, workers, load, old, baseline_label), out)


if __name__ == "__main__":
    main()
