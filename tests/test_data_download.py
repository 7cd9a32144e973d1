"""Archive handling of the prepare scripts, and the scripts end to end on small fake archives (no network)."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tests.data_fixtures import save_png, write_small
from PIL import Image

from segm.data import create_dataset
from segm.scripts import prepare_ade20k, prepare_cityscapes, prepare_coco_stuff, prepare_pcontext
from segm.scripts.download import DownloadError, Source, download, extract, fetch
from segm.scripts.parallel import run_parallel

PAYLOAD = bytes(range(256)) * 4096


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at any path, honouring ``Range: bytes=N-``; remembers the ranges asked for."""

    ranges: list[str] = []

    def do_GET(self) -> None:
        start = 0
        if "Range" in self.headers:
            self.ranges.append(self.headers["Range"])
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
        body = PAYLOAD[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    httpd = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_resumes_a_partial_file(tmp_path, server):
    dest = tmp_path / "data.zip"
    (tmp_path / "data.zip.part").write_bytes(PAYLOAD[:1000])
    RangeHandler.ranges.clear()
    download(f"{server}/data.zip", dest)
    assert dest.read_bytes() == PAYLOAD and RangeHandler.ranges == ["bytes=1000-"]
    assert not (tmp_path / "data.zip.part").exists()


def test_fetch_downloads_then_reuses(tmp_path, server):
    source = Source(f"{server}/a.zip", "a.zip", hashlib.sha1(PAYLOAD).hexdigest())
    assert fetch([source], tmp_path)["a.zip"].read_bytes() == PAYLOAD
    RangeHandler.ranges.clear()
    assert fetch([source], tmp_path)["a.zip"] == tmp_path / "a.zip"
    wrong = Source(f"{server}/a.zip", "a.zip", "0" * 40)
    with pytest.raises(DownloadError, match="delete it and run again"):
        fetch([wrong], tmp_path / "other")


def test_from_archive_never_downloads(tmp_path):
    archive = tmp_path / "given.zip"
    archive.write_bytes(b"archive")
    good = Source("http://unreachable.invalid/given.zip", "given.zip", sha1(archive))
    assert fetch([good], tmp_path / "dl", [archive]) == {"given.zip": archive}
    with pytest.raises(DownloadError, match="does not match the sha1"):
        fetch([Source(good.url, "given.zip", "1" * 40)], tmp_path / "dl", [archive])
    other = Source("http://unreachable.invalid/other.zip", "other.zip")
    with pytest.raises(DownloadError, match="other.zip is missing: pass it with --from-archive"):
        fetch([good, other], tmp_path / "dl", [archive])
    with pytest.raises(DownloadError, match="unexpected archive"):
        fetch([other], tmp_path / "dl", [archive])


def test_extract_refuses_paths_outside_the_target(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(DownloadError, match="outside"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def zip_folder(folder: Path, archive: Path, prefix: Path) -> Path:
    """Zip every file under ``folder`` with names relative to ``prefix``."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(prefix).as_posix())
    return archive


def sources_for(module, archives: list[Path]) -> tuple[Source, ...]:
    names = {path.name: path for path in archives}
    return tuple(Source(s.url, s.filename, sha1(names[s.filename])) for s in module.SOURCES)


def test_prepare_ade20k_from_archives(tmp_path, monkeypatch):
    write_small(tmp_path / "src", "ade20k")
    ade = tmp_path / "src/ade20k"
    save_png(ade / "release_test/testing/t.jpg", np.zeros((4, 4, 3), np.uint8))
    archives = [zip_folder(ade / "ADEChallengeData2016", tmp_path / "ADEChallengeData2016.zip", ade),
                zip_folder(ade / "release_test", tmp_path / "release_test.zip", ade)]
    monkeypatch.setattr(prepare_ade20k, "SOURCES", sources_for(prepare_ade20k, archives))
    out = tmp_path / "out"
    args = [str(out)] + [arg for path in archives for arg in ("--from-archive", str(path))]
    result = CliRunner().invoke(prepare_ade20k.main, args)
    assert result.exit_code == 0, result.output + result.stderr
    assert "images: 3" in result.stdout and "images: 2" in result.stdout
    assert (out / "ade20k/release_test/testing/t.jpg").is_file()


def test_prepare_pcontext_writes_labels_and_splits(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    tar_path = tmp_path / "VOCtrainval_03-May-2010.tar"
    masks = {"train": {2008000002: None, 2008000010: None}, "val": {2009000001: None}}
    with tarfile.open(tar_path, "w") as tar:
        for split in masks:
            for encoding_id in masks[split]:
                voc = f"{str(encoding_id)[:4]}_{str(encoding_id)[4:]}"
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(buffer, format="JPEG")
                info = tarfile.TarInfo(f"VOCdevkit/VOC2010/JPEGImages/{voc}.jpg")
                info.size = len(buffer.getvalue())
                tar.addfile(info, io.BytesIO(buffer.getvalue()))
                masks[split][encoding_id] = Image.fromarray(rng.integers(0, 60, (12, 16), dtype=np.uint8))
    archives = [tar_path]
    for split, split_masks in masks.items():
        torch.save(split_masks, tmp_path / f"{split}.pth")
        archives.append(tmp_path / f"{split}.pth")
    monkeypatch.setattr(prepare_pcontext, "SOURCES", sources_for(prepare_pcontext, archives))
    out = tmp_path / "out"
    args = [str(out)] + [arg for path in archives for arg in ("--from-archive", str(path))]
    result = CliRunner().invoke(prepare_pcontext.main, args)
    assert result.exit_code == 0, result.output + result.stderr
    voc = out / "pcontext/VOCdevkit/VOC2010"
    assert (voc / "ImageSets/SegmentationContext/train.txt").read_text() == "2008_000002\n2008_000010\n"
    dataset = create_dataset("pascal_context", "val", root=out)
    assert np.array_equal(dataset.label(0), np.array(masks["val"][2009000001]))


def test_prepare_coco_stuff_maps_raw_ids(tmp_path, monkeypatch):
    src = tmp_path / "src"
    raw = np.array([[0, 11, 12, 90], [91, 181, 255, 5]], dtype=np.uint8)
    for split in ("train2017", "val2017"):
        save_png(src / "images" / split / "000000000001.jpg", np.zeros((2, 4, 3), np.uint8))
        save_png(src / "maps" / split / "000000000001.png", raw)
    archives = [zip_folder(src / "images/train2017", tmp_path / "train2017.zip", src / "images"),
                zip_folder(src / "images/val2017", tmp_path / "val2017.zip", src / "images"),
                zip_folder(src / "maps", tmp_path / "stuffthingmaps_trainval2017.zip", src / "maps")]
    monkeypatch.setattr(prepare_coco_stuff, "SOURCES", sources_for(prepare_coco_stuff, archives))
    out = tmp_path / "out"
    args = [str(out), "--nproc", "1"] + [a for p in archives for a in ("--from-archive", str(p))]
    result = CliRunner().invoke(prepare_coco_stuff.main, args)
    assert result.exit_code == 0, result.output + result.stderr
    label = create_dataset("coco_stuff", "val", root=out).label(0)
    assert label.tolist() == [[0, 255, 11, 255], [80, 170, 255, 5]]


def test_prepare_cityscapes_needs_cityscapesscripts(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_cityscapes.importlib.util, "find_spec", lambda name: None)
    result = CliRunner().invoke(prepare_cityscapes.main, [str(tmp_path)])
    assert result.exit_code == 1
    assert 'pip install ".[cityscapes]"' in result.output


def test_prepare_cityscapes_download_needs_credentials(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_cityscapes.importlib.util, "find_spec", lambda name: object())
    monkeypatch.delenv("CITYSCAPES_USERNAME", raising=False)
    result = CliRunner().invoke(prepare_cityscapes.main, [str(tmp_path)], env={"CITYSCAPES_USERNAME": None})
    assert result.exit_code == 2 and "--username" in result.output
    assert os.listdir(tmp_path) == []


def touch(path: Path) -> None:
    path.write_text("done")


@pytest.mark.parametrize("nproc", [1, 2])
def test_run_parallel_processes_every_item(tmp_path, nproc):
    paths = [tmp_path / f"{index}.txt" for index in range(20)]
    run_parallel(touch, paths, nproc, "touching")
    assert all(path.read_text() == "done" for path in paths)
