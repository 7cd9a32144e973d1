"""``python -m segm.scripts.prepare_ade20k DOWNLOAD_DIR``: download and unpack ADE20K SceneParsing.

Writes ``DOWNLOAD_DIR/ade20k/ADEChallengeData2016`` (train/val) and ``DOWNLOAD_DIR/ade20k/release_test``
(test images), keeping the archives in ``DOWNLOAD_DIR/ade20k/downloads``. The labels need no
conversion (raw 0 = other, 1..150 = classes); the reader applies ``reduce_zero_label``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from segm.data.check import check_prepared
from segm.scripts.download import Source, extract, fetch, from_archive_option

SOURCES = (
    Source("http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip", "ADEChallengeData2016.zip",
           "219e1696abb36c8ba3a3afe7fb2f4b4606a897c7"),
    Source("http://data.csail.mit.edu/places/ADEchallenge/release_test.zip", "release_test.zip",
           "e05747892219d10e9243933371a497e905a4860c"),
)


@click.command(help="Download ADE20K into DOWNLOAD_DIR/ade20k and check it.")
@click.argument("download_dir", type=click.Path(file_okay=False, path_type=Path))
@from_archive_option
def main(download_dir: Path, archives: tuple[Path, ...]) -> None:
    dataset_dir = download_dir / "ade20k"
    downloads = dataset_dir / "downloads"
    for path in fetch(SOURCES, downloads, archives).values():
        extract(path, dataset_dir, marker_dir=downloads)
    sys.exit(check_prepared("ade20k", download_dir))


if __name__ == "__main__":
    main()
