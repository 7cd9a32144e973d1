"""The dataset doctor: its three summary lines, the class table, and exit codes on bad folders."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from tests.data_fixtures import SMALL, save_png, write_small

from segm.data import dataset_info
from segm.data.check import main
from segm.data.synthetic import SyntheticScenes


def doctor(*args: str):
    return CliRunner().invoke(main, [*args, "--workers", "1"])


def expected_lines(labels: list[np.ndarray], n_images: int) -> list[str]:
    stacked = np.concatenate([label.reshape(-1) for label in labels])
    return [f"images: {n_images}", f"classes present: {len(set(stacked.tolist()) - {255})}",
            f"ignored pixels: {int((stacked == 255).sum())}"]


@pytest.mark.parametrize("layout", ["ade20k", "pascal_context_59", "cityscapes"])
def test_prints_the_three_lines_and_the_table(tmp_path, layout):
    write_small(tmp_path, layout)
    result = doctor(layout, "--split", "val", "--root", str(tmp_path))
    assert result.exit_code == 0, result.output
    scenes = SyntheticScenes("val", 2, **SMALL)
    lines = result.stdout.splitlines()
    assert lines[:3] == expected_lines([scenes.get(i)[2] for i in range(2)], 2)
    info = dataset_info(layout)
    assert lines[4].split() == ["id", "class", "pixels", "share"]
    assert len(lines) == 5 + info.n_cls
    assert lines[5].split()[:2] == ["0", info.names[0].split()[0]]


def test_works_for_synthetic_without_dataset(monkeypatch):
    monkeypatch.delenv("DATASET", raising=False)
    result = doctor("synthetic", "--split", "val")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0] == "images: 64"
    assert "ground" in result.stdout


def test_missing_folder_prints_the_expected_tree(tmp_path):
    result = doctor("ade20k", "--split", "val", "--root", str(tmp_path))
    assert result.exit_code == 1
    assert f"dataset folder not found: {tmp_path / 'ade20k/ADEChallengeData2016'}" in result.stderr
    assert "ade20k/ADEChallengeData2016/annotations/validation/*.png" in result.stderr


def test_unset_dataset_variable(monkeypatch):
    monkeypatch.delenv("DATASET", raising=False)
    result = doctor("cityscapes")
    assert result.exit_code == 1 and "DATASET is not set" in result.stderr


def test_unknown_name_lists_the_known_ones():
    result = doctor("voc")
    assert result.exit_code == 2 and "'pascal_context_59'" in result.output


def test_reports_unpaired_unreadable_and_out_of_range(tmp_path):
    write_small(tmp_path, "ade20k", {"train": 1, "val": 14})
    base = tmp_path / "ade20k/ADEChallengeData2016"
    (base / "annotations/validation/val_000000.png").unlink()
    (base / "annotations/validation/val_000001.png").write_bytes(b"not a png")
    save_png(base / "annotations/validation/val_000002.png", np.full((40, 56), 152, np.uint8))
    save_png(base / "annotations/validation/orphan.png", np.zeros((40, 56), np.uint8))
    for index in range(3, 14):
        save_png(base / f"annotations/validation/val_{index:06d}.png", np.zeros((8, 8), np.uint8))
    result = doctor("ade20k", "--split", "val", "--root", str(tmp_path))
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0] == "images: 14"
    stderr = result.stderr
    assert "15 problem(s)" in stderr and "and 5 more" in stderr
    assert "image without label" in stderr and "val_000000.jpg" in stderr
    assert "label without image" in stderr and "orphan.png" in stderr
    assert "val_000001.png" in stderr
    assert "[151]" in stderr and "val_000002.png" in stderr


def test_parallel_workers_give_the_same_report(tmp_path):
    write_small(tmp_path, "coco_stuff", {"train": 70, "val": 1})
    serial = doctor("coco_stuff", "--split", "train", "--root", str(tmp_path))
    parallel = CliRunner().invoke(main, ["coco_stuff", "--split", "train", "--root", str(tmp_path), "--workers", "2"])
    assert serial.exit_code == parallel.exit_code == 0
    assert serial.stdout == parallel.stdout
