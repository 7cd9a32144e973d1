"""Getting dataset archives onto disk: resumable downloads, checksums, archives given by path, extraction.

Used by the ``prepare_*`` scripts. A download goes to ``<name>.part`` and continues from there when
run again (HTTP range request); a finished file is renamed and its checksum verified. With
``--from-archive PATH`` (repeatable) the scripts use archives that are already on disk and never
touch the network. Extraction refuses members that would land outside the target folder and
leaves a marker so that a second run does not extract again.
"""

from __future__ import annotations

import hashlib
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click
from tqdm import tqdm

_BLOCK = 1 << 20


class DownloadError(RuntimeError):
    """An archive could not be obtained or verified; the message says what to do."""


@dataclass(frozen=True)
class Source:
    """One archive: where it comes from, its file name, and its checksum (``algorithm``: sha1 or md5)."""

    url: str
    filename: str
    checksum: str | None = None
    algorithm: str = "sha1"


def _progress(**kwargs: object) -> tqdm:
    return tqdm(unit="B", unit_scale=True, unit_divisor=1024, disable=not sys.stderr.isatty(), **kwargs)


def file_digest(path: Path, algorithm: str = "sha1") -> str:
    """Hex digest of a file, read in blocks with a progress bar."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f, _progress(total=path.stat().st_size, desc=f"{algorithm} {path.name}") as bar:
        while block := f.read(_BLOCK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def matches(path: Path, source: Source) -> bool:
    """Whether ``path`` has the source's checksum (always True when none is known)."""
    return source.checksum is None or file_digest(path, source.algorithm) == source.checksum


def verify(path: Path, source: Source) -> None:
    """Raise :class:`DownloadError` when ``path`` does not have the source's checksum."""
    if source.checksum is None:
        click.echo(f"no checksum is known for {source.filename}; using it unchecked", err=True)
    elif not matches(path, source):
        raise DownloadError(
            f"{path} does not match the {source.algorithm} {source.checksum} of {source.filename}: "
            "it is incomplete or a different file; delete it and run again"
        )


def download(url: str, dest: Path, opener: urllib.request.OpenerDirector | None = None) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a previous partial download."""
    opener = opener or urllib.request.build_opener()
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = opener.open(request, timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:
            part.replace(dest)
            return dest
        raise DownloadError(f"downloading {url} failed: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise DownloadError(
            f"cannot reach {url} ({err.reason}); without network, download it elsewhere and pass "
            "--from-archive PATH"
        ) from None
    with response:
        if response.headers.get_content_type() == "text/html":
            raise DownloadError(f"{url} answered with a web page instead of {dest.name} (login or link expired?)")
        resumed = start if response.status == 206 else 0
        length = response.headers.get("Content-Length")
        total = int(length) + resumed if length else None
        with open(part, "ab" if resumed else "wb") as f, _progress(total=total, initial=resumed, desc=dest.name) as bar:
            while block := response.read(_BLOCK):
                f.write(block)
                bar.update(len(block))
    part.replace(dest)
    return dest


def fetch(sources: Sequence[Source], download_dir: Path, archives: Sequence[Path] = (),
          opener: urllib.request.OpenerDirector | None = None) -> dict[str, Path]:
    """Paths of all ``sources``, verified, keyed by file name.

    An archive passed in ``archives`` (matched by file name) is used where it is; otherwise a
    verified copy in ``download_dir`` is reused; otherwise it is downloaded, unless ``archives`` is
    non-empty, which means: no network.
    """
    by_name = {Path(path).name: Path(path) for path in archives}
    expected = {source.filename for source in sources}
    unknown = sorted(set(by_name) - expected)
    if unknown:
        raise DownloadError(f"unexpected archive(s) {', '.join(unknown)}; expected: {', '.join(sorted(expected))}")
    download_dir.mkdir(parents=True, exist_ok=True)
    found = {}
    for source in sources:
        path = by_name.get(source.filename, download_dir / source.filename)
        if not path.is_file() or (source.filename not in by_name and not matches(path, source)):
            if archives:
                raise DownloadError(
                    f"{source.filename} is missing: pass it with --from-archive too, or drop --from-archive "
                    f"to download it from {source.url}"
                )
            download(source.url, path, opener)
        verify(path, source)
        found[source.filename] = path
    return found


def _safe_target(dest: Path, member: str) -> Path:
    target = (dest / member).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise DownloadError(f"archive member {member} would be written outside {dest}; refusing to extract")
    return target


def extract(archive: Path, dest: Path, marker_dir: Path | None = None) -> None:
    """Extract a .zip or .tar(.gz) archive into ``dest`` once (a marker file records completion)."""
    marker = (marker_dir or dest) / f".{archive.name}.extracted"
    if marker.exists():
        return
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in tqdm(zf.infolist(), desc=f"extracting {archive.name}", disable=not sys.stderr.isatty()):
                _safe_target(dest, info.filename)
                zf.extract(info, dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in tqdm(tf, desc=f"extracting {archive.name}", disable=not sys.stderr.isatty()):
                _safe_target(dest, member.name)
                tf.extract(member, dest, filter="data")
    else:
        raise DownloadError(f"{archive} is neither a zip nor a tar archive")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


from_archive_option = click.option(
    "--from-archive", "archives", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="An archive already on disk (repeatable); with it nothing is downloaded.",
)
