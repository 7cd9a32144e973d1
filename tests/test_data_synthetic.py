"""The built-in synthetic dataset: deterministic scenes, ignore borders, and a lossless trip through disk."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from segm.data import create_dataset
from segm.data.synthetic import N_CLASSES, SyntheticScenes, render_scene
from segm.data.synthetic.__main__ import main


def test_scenes_are_deterministic_and_splits_differ():
    first, second = SyntheticScenes("train", 4), SyntheticScenes("train", 4)
    for index in range(4):
        assert first.get(index)[0] == second.get(index)[0]
        assert np.array_equal(first.get(index)[2], second.get(index)[2])
    assert not np.array_equal(SyntheticScenes("val", 1).get(0)[2], first.get(0)[2])
    assert not np.array_equal(render_scene(1)[0], render_scene(2)[0])


def test_labels_hold_classes_and_thin_ignore_borders():
    scenes = SyntheticScenes("train", 8)
    present = set()
    for index in range(8):
        label = scenes.get(index)[2]
        values = set(np.unique(label).tolist())
        assert values <= set(range(N_CLASSES)) | {255}
        present |= values
        ignored = label == 255
        assert 0 < ignored.mean() < 0.2
        interior = ~ignored[1:-1, 1:-1]
        assert interior.any()
    assert len(present - {255}) > 8


def test_in_memory_dataset_defaults():
    train, val = create_dataset("synthetic", "train"), create_dataset("synthetic", "val")
    assert (len(train), len(val), train.samples) == (512, 64, [])
    assert train.image(0).shape == (128, 128, 3) and train.image(0).dtype == np.uint8
    assert val[0]["im"][0].shape == (3, 128, 128)
    assert train[0]["im"].shape == (3, 128, 128)


def test_written_ade20k_layout_reads_back_identically(tmp_path):
    result = CliRunner().invoke(main, ["--out", str(tmp_path), "--layout", "ade20k", "--train", "2", "--val", "3"])
    assert result.exit_code == 0, result.output
    memory = create_dataset("synthetic", "val", max_images=3)
    disk = create_dataset("ade20k", "val", root=tmp_path, im_size=128)
    assert len(disk) == 3
    for index in range(3):
        assert np.array_equal(disk.image(index), memory.image(index))
        assert np.array_equal(disk.label(index), memory.label(index))
        for ours, theirs in zip(disk[index]["im"], memory[index]["im"]):
            assert np.array_equal(ours.numpy(), theirs.numpy())
