"""Dataset doctor: ``python -m segm.data.check NAME [--split train|val] [--root DIR]``.

Checks the folder layout (a missing folder is named and the expected tree printed), pairs every
image with its label, reads every label and image header, maps the labels through the dataset's
label mapping, and prints::

    images: N
    classes present: K
    ignored pixels: P

followed by a per-class pixel-count table. The exit status is 1 when anything is wrong (missing
folders, unpaired or unreadable files, image/label size mismatches, label values outside the class
range after the mapping), with up to 10 offenders listed on stderr. ``synthetic`` needs no folder.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from segm.config import dataset_dir
from segm.data.base import SPLITS, DatasetInfo, DatasetSpec
from segm.data.io import DatasetError, image_size, load_label, load_rgb
from segm.data.layout import MAX_LISTED, FolderLayout
from segm.data.loader import create_dataset
from segm.data.registry import dataset_names, get_spec

_CHUNK = 64
_NAME_WIDTH = 24


@dataclass
class Report:
    """What the doctor found in one split."""

    n_images: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    problems: list[str] = field(default_factory=list)

    def add(self, other: Report) -> None:
        self.counts += other.counts
        self.problems.extend(other.problems)


def check_pair(info: DatasetInfo, image_path: Path, label_path: Path, quick: bool = False) -> Report:
    """Read one label and decode its image fully (only the image's header with ``quick``), count the
    label's mapped values; a truncated or corrupt image is reported with its path."""
    report = Report()
    try:
        raw = load_label(label_path)
        shape = image_size(image_path) if quick else load_rgb(image_path).shape[:2]
    except DatasetError as err:
        report.problems.append(str(err))
        return report
    if shape != raw.shape:
        report.problems.append(
            f"size mismatch: image {image_path} is {shape[0]}x{shape[1]}, "
            f"label {label_path} is {raw.shape[0]}x{raw.shape[1]}"
        )
    counts = info.value_counts(info.map_labels(raw))
    bad = info.invalid_values(counts)
    if len(bad):
        report.problems.append(
            f"label values outside the {info.n_cls} classes after the mapping: {bad.tolist()} in {label_path}"
        )
    report.counts = counts
    return report


def _check_chunk(args: tuple[DatasetInfo, list[tuple[Path, Path]], bool]) -> Report:
    info, pairs, quick = args
    report = Report()
    for image_path, label_path in pairs:
        report.add(check_pair(info, image_path, label_path, quick))
    return report


def _chunks(info: DatasetInfo, pairs: list[tuple[Path, Path]], quick: bool
            ) -> Iterator[tuple[DatasetInfo, list[tuple[Path, Path]], bool]]:
    for start in range(0, len(pairs), _CHUNK):
        yield info, pairs[start:start + _CHUNK], quick


def check_folder(spec: DatasetSpec, layout: FolderLayout, split: str, root: Path, workers: int,
                 quick: bool = False) -> Report:
    """Check the files of ``split`` under ``root`` (raises DatasetError when a folder is missing)."""
    pairing = layout.pair(root, split)
    report = Report(n_images=len(pairing.pairs) + len(pairing.images_without_label))
    if report.n_images == 0:
        report.problems.append(f"no '*{layout.image_suffix}' images in {layout.image_dir(root, split)}")
    report.problems.extend(pairing.problems())
    info = spec.info
    chunks = list(_chunks(info, pairing.pairs, quick))
    progress = tqdm(total=len(pairing.pairs), desc=f"checking {spec.name} {split}", unit="pair",
                    disable=not sys.stderr.isatty())
    with progress:
        if workers > 1 and len(chunks) > 1:
            with ProcessPoolExecutor(workers) as pool:
                for part, chunk in zip(pool.map(_check_chunk, chunks), chunks):
                    report.add(part)
                    progress.update(len(chunk[1]))
        else:
            for chunk in chunks:
                report.add(_check_chunk(chunk))
                progress.update(len(chunk[1]))
    return report


def check_in_memory(name: str, split: str) -> Report:
    """Count the mapped labels of a dataset generated in memory (``synthetic``)."""
    dataset = create_dataset(name, split)
    report = Report(n_images=len(dataset))
    for index in tqdm(range(len(dataset)), desc=f"checking {name} {split}", disable=not sys.stderr.isatty()):
        report.counts += dataset.info.value_counts(dataset.info.map_labels(dataset.raw_label(index)))
    return report


def format_report(info: DatasetInfo, report: Report) -> str:
    """The three summary lines and the per-class pixel table."""
    class_counts = report.counts[: info.n_cls]
    total = max(int(class_counts.sum()), 1)
    width = min(max(len(name) for name in info.names), _NAME_WIDTH)
    lines = [
        f"images: {report.n_images}",
        f"classes present: {int(np.count_nonzero(class_counts))}",
        f"ignored pixels: {int(report.counts[info.ignore_index])}",
        "",
        f"{'id':>4}  {'class':<{width}}  {'pixels':>12}  {'share':>7}",
    ]
    for cls, (name, count) in enumerate(zip(info.names, class_counts)):
        lines.append(f"{cls:>4}  {name[:width]:<{width}}  {int(count):>12}  {100 * count / total:>6.2f}%")
    return "\n".join(lines)


def run_check(name: str, split: str, root: Path | None = None, workers: int = 1, quick: bool = False) -> int:
    """Check a dataset split, print the report, and return the exit status (0 = all good)."""
    spec = get_spec(name)
    try:
        if spec.layout is None:
            report = check_in_memory(name, split)
        else:
            root = Path(root) if root is not None else dataset_dir()
            report = check_folder(spec, spec.layout, split, root, workers, quick)
    except (DatasetError, ValueError) as err:
        click.echo(f"error: {err}", err=True)
        return 1
    click.echo(format_report(spec.info, report))
    if report.problems:
        click.echo(f"\n{len(report.problems)} problem(s) in {name} {split}:", err=True)
        for problem in report.problems[:MAX_LISTED]:
            click.echo(f"  {problem}", err=True)
        if len(report.problems) > MAX_LISTED:
            click.echo(f"  ... and {len(report.problems) - MAX_LISTED} more", err=True)
        return 1
    return 0


def check_prepared(name: str, root: Path, workers: int = min(8, os.cpu_count() or 1)) -> int:
    """Check both splits of a dataset written under ``root``; returns the worse exit status."""
    statuses = []
    for split in SPLITS:
        click.echo(f"== {name} {split}")
        statuses.append(run_check(name, split, root, workers))
    return max(statuses)


@click.command(help="Check a dataset folder: layout, image/label pairs, label values; prints class pixel counts.")
@click.argument("name", type=click.Choice(dataset_names()))
@click.option("--split", type=click.Choice(SPLITS), default="val", show_default=True)
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder holding the datasets (default: $DATASET).")
@click.option("--workers", type=click.IntRange(1), default=min(8, os.cpu_count() or 1), show_default=True,
              help="Processes reading the files.")
@click.option("--quick", is_flag=True, default=False,
              help="Read only the images' headers (sizes) instead of decoding every image.")
def main(name: str, split: str, root: Path | None, workers: int, quick: bool) -> None:
    sys.exit(run_check(name, split, root, workers, quick))


if __name__ == "__main__":
    main()
