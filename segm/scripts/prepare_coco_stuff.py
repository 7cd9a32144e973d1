"""``python -m segm.scripts.prepare_coco_stuff DOWNLOAD_DIR``: download COCO-Stuff 164k in mmseg's layout.

Unpacks the COCO 2017 images to ``coco_stuff164k/images/{train2017,val2017}`` and the stuffthingmaps
to ``coco_stuff164k/annotations/{train2017,val2017}``, then writes ``<name>_labelTrainIds.png`` beside
every raw map, mapping the 182 raw ids to the 171 trainIds as mmsegmentation's
``coco_stuff164k.py`` does (:data:`segm.data.coco_stuff.RAW_TO_TRAIN_ID`; ids that are never used
become 255 instead of staying unchanged). Conversion runs in parallel and skips labels already written.
COCO publishes MD5 sums for its image zips; no checksum is known for the stuffthingmaps zip.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import numpy as np
from PIL import Image

from segm.data.check import check_prepared
from segm.data.coco_stuff import LAYOUT, RAW_TO_TRAIN_ID
from segm.data.io import load_label
from segm.scripts.download import Source, extract, fetch, from_archive_option
from segm.scripts.parallel import run_parallel

IMAGES = ("train2017.zip", "val2017.zip")
SOURCES = (
    Source("http://images.cocodataset.org/zips/train2017.zip", "train2017.zip",
           "cced6f7f71b7629ddf16f17bbcfab6b2", "md5"),
    Source("http://images.cocodataset.org/zips/val2017.zip", "val2017.zip",
           "442b8da7639aecaf257c1dceb8ba8c80", "md5"),
    Source("http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip",
           "stuffthingmaps_trainval2017.zip"),
)


def train_id_path(raw_path: Path) -> Path:
    return raw_path.with_name(raw_path.stem + LAYOUT.label_suffix)


def convert_map(raw_path: Path) -> None:
    """Write the trainId map of one raw stuffthingmap (run in a worker process)."""
    Image.fromarray(RAW_TO_TRAIN_ID[load_label(raw_path)].astype(np.uint8)).save(train_id_path(raw_path))


def pending_maps(annotation_dir: Path) -> list[Path]:
    """Raw maps under ``annotation_dir`` whose trainId map does not exist yet, sorted."""
    return sorted(
        path for path in annotation_dir.rglob("*.png")
        if not path.name.endswith(LAYOUT.label_suffix) and not train_id_path(path).exists()
    )


@click.command(help="Download COCO-Stuff 164k into DOWNLOAD_DIR/coco_stuff164k, write trainId labels and check it.")
@click.argument("download_dir", type=click.Path(file_okay=False, path_type=Path))
@from_archive_option
@click.option("--nproc", default=os.cpu_count() or 1, show_default=True, help="Processes converting labels.")
def main(download_dir: Path, archives: tuple[Path, ...], nproc: int) -> None:
    dataset_dir = LAYOUT.base(download_dir)
    downloads = dataset_dir / "downloads"
    for name, path in fetch(SOURCES, downloads, archives).items():
        extract(path, dataset_dir / ("images" if name in IMAGES else "annotations"), marker_dir=downloads)
    run_parallel(convert_map, pending_maps(dataset_dir / "annotations"), nproc, "raw ids -> trainIds")
    sys.exit(check_prepared("coco_stuff", download_dir))


if __name__ == "__main__":
    main()
