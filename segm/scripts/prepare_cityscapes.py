"""``python -m segm.scripts.prepare_cityscapes DOWNLOAD_DIR``: download Cityscapes and write trainId labels.

The archives need a cityscapes-dataset.com account: give ``--username`` and the password through
``$CITYSCAPES_PASSWORD`` or the prompt (it never appears on a command line), or pass archives you
already have with ``--from-archive``. Every ``gtFine/*/*/*_gtFine_polygons.json`` is rendered to
``*_gtFine_labelTrainIds.png`` (19 trainIds, 255 = ignore) with cityscapesscripts, an optional
dependency (``pip install ".[cityscapes]"``), in parallel; labels already written are kept.
"""

from __future__ import annotations

import http.cookiejar
import importlib.util
import os
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import click

from segm.data.check import check_prepared
from segm.scripts.download import DownloadError, Source, extract, fetch, from_archive_option
from segm.scripts.parallel import run_parallel

LOGIN_URL = "https://www.cityscapes-dataset.com/login/"
SOURCES = (
    Source("https://www.cityscapes-dataset.com/file-handling/?packageID=1", "gtFine_trainvaltest.zip",
           "99f532cb1af174f5fcc4c5bc8feea8c66246ddbc"),
    Source("https://www.cityscapes-dataset.com/file-handling/?packageID=3", "leftImg8bit_trainvaltest.zip",
           "2c0b77ce9933cc635adda307fbba5566f5d9d404"),
)
POLYGON_SUFFIX = "_polygons.json"
LABEL_SUFFIX = "_labelTrainIds.png"


def require_cityscapesscripts() -> None:
    """Fail early with the install command when the optional converter is missing."""
    if importlib.util.find_spec("cityscapesscripts") is None:
        raise click.ClickException(
            "cityscapesscripts is needed to convert the Cityscapes polygons to trainId labels: "
            "install it with  pip install \".[cityscapes]\"  (or  pip install cityscapesscripts)"
        )


def login(username: str, password: str) -> urllib.request.OpenerDirector:
    """An opener holding the session cookie of a cityscapes-dataset.com login."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    form = urllib.parse.urlencode({"username": username, "password": password, "submit": "Login"}).encode()
    try:
        opener.open(LOGIN_URL, data=form, timeout=60).close()
    except OSError as err:
        raise DownloadError(f"cannot log in at {LOGIN_URL} ({err}); pass the archives with --from-archive") from None
    return opener


def convert_polygons(json_path: str) -> None:
    """Render one polygon file to its trainId label png (run in a worker process)."""
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    json2labelImg(json_path, json_path[: -len(POLYGON_SUFFIX)] + LABEL_SUFFIX, "trainIds")


def pending_polygons(gt_dir: Path) -> list[str]:
    """Polygon files under ``gt_dir`` whose trainId label does not exist yet, sorted."""
    return sorted(
        str(path) for path in gt_dir.rglob(f"*{POLYGON_SUFFIX}")
        if not path.with_name(path.name[: -len(POLYGON_SUFFIX)] + LABEL_SUFFIX).exists()
    )


@click.command(help="Download Cityscapes into DOWNLOAD_DIR/cityscapes, write trainId labels and check it.")
@click.argument("download_dir", type=click.Path(file_okay=False, path_type=Path))
@from_archive_option
@click.option("--username", envvar="CITYSCAPES_USERNAME",
              help="cityscapes-dataset.com account (or $CITYSCAPES_USERNAME).")
@click.option("--nproc", default=os.cpu_count() or 1, show_default=True, help="Processes converting polygons.")
def main(download_dir: Path, archives: tuple[Path, ...], username: str | None, nproc: int) -> None:
    require_cityscapesscripts()
    dataset_dir = download_dir / "cityscapes"
    downloads = dataset_dir / "downloads"
    opener = None
    if not archives and not all((downloads / source.filename).is_file() for source in SOURCES):
        if not username:
            raise click.UsageError("downloading Cityscapes needs --username (and a password), or --from-archive PATH")
        password = os.environ.get("CITYSCAPES_PASSWORD") or click.prompt("Cityscapes password", hide_input=True)
        opener = login(username, password)
    for path in fetch(SOURCES, downloads, archives, opener).values():
        extract(path, dataset_dir, marker_dir=downloads)
    run_parallel(convert_polygons, pending_polygons(dataset_dir / "gtFine"), nproc, "polygons -> trainIds")
    sys.exit(check_prepared("cityscapes", download_dir))


if __name__ == "__main__":
    main()
