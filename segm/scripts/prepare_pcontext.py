"""``python -m segm.scripts.prepare_pcontext DOWNLOAD_DIR``: download Pascal-Context and write its labels.

Gets the VOC2010 trainval tar and PyTorch-Encoding's ``train.pth`` / ``val.pth`` (pickled
``{image id: PIL mask}`` dicts, 0 = background, 1..59 = classes), checks their SHA-1, and writes
``VOC2010/SegmentationClassContext/<id>.png`` plus the sorted id lists
``VOC2010/ImageSets/SegmentationContext/{train,val}.txt`` under ``DOWNLOAD_DIR/pcontext/VOCdevkit``.
The reference also downloads ``trainval_merged.json``, which nothing reads; it is skipped here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import torch
from tqdm import tqdm

from segm.data.check import check_prepared
from segm.data.pascal_context import LAYOUT
from segm.scripts.download import Source, extract, fetch, from_archive_option

ENCODING_URL = "https://hangzh.s3.amazonaws.com/encoding/data/pcontext"
SOURCES = (
    Source("https://www.dropbox.com/s/wtdibo9lb2fur70/VOCtrainval_03-May-2010.tar?dl=1", "VOCtrainval_03-May-2010.tar",
           "bf9985e9f2b064752bf6bd654d89f017c76c395a"),
    Source(f"{ENCODING_URL}/train.pth", "train.pth", "4bfb49e8c1cefe352df876c9b5434e655c9c1d07"),
    Source(f"{ENCODING_URL}/val.pth", "val.pth", "ebedc94247ec616c57b9a2df15091784826a7b0c"),
)


def voc_id(encoding_id: int) -> str:
    """PyTorch-Encoding's integer id (2008000002) -> the VOC file id (2008_000002)."""
    text = str(encoding_id)
    return f"{text[:4]}_{text[4:]}"


def write_split(masks_file: Path, label_dir: Path, split_file: Path) -> int:
    """Save every mask of one ``.pth`` dict as a png and write the sorted id list; returns the count.

    The file is unpickled with ``weights_only=False`` (it holds PIL images); its SHA-1 has been
    checked against the published value before this is called.
    """
    masks = torch.load(masks_file, weights_only=False)
    label_dir.mkdir(parents=True, exist_ok=True)
    ids = []
    for encoding_id, mask in tqdm(masks.items(), desc=f"writing {split_file.stem} labels",
                                  disable=not sys.stderr.isatty()):
        ids.append(voc_id(encoding_id))
        mask.save(label_dir / f"{ids[-1]}.png")
    split_file.parent.mkdir(parents=True, exist_ok=True)
    split_file.write_text("".join(f"{sample_id}\n" for sample_id in sorted(ids)))
    return len(ids)


@click.command(help="Download Pascal-Context into DOWNLOAD_DIR/pcontext, write its labels and check it.")
@click.argument("download_dir", type=click.Path(file_okay=False, path_type=Path))
@from_archive_option
def main(download_dir: Path, archives: tuple[Path, ...]) -> None:
    dataset_dir = download_dir / "pcontext"
    downloads = dataset_dir / "downloads"
    paths = fetch(SOURCES, downloads, archives)
    extract(paths[SOURCES[0].filename], dataset_dir, marker_dir=downloads)
    for split in ("train", "val"):
        split_file = LAYOUT.split_file(download_dir, split)
        write_split(paths[f"{split}.pth"], LAYOUT.label_dir(download_dir, split), split_file)
    sys.exit(check_prepared("pascal_context", download_dir))


if __name__ == "__main__":
    main()
