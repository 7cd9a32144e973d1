"""Dataset readers on tiny folders in every layout: counts, order, label mappings, items, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.data_fixtures import COUNTS, LAYOUTS, SMALL, save_palette_png, save_png, write_small
from PIL import Image

from segm.data import DatasetError, create_dataset, dataset_info, dataset_names, load_label, load_rgb
from segm.data.synthetic import SyntheticScenes


def test_known_names():
    assert dataset_names() == ["ade20k", "ade20k_large", "cityscapes", "pascal_context", "pascal_context_59",
                               "coco_stuff", "synthetic"]
    expected = {"ade20k": 150, "ade20k_large": 150, "cityscapes": 19, "pascal_context": 60,
                "pascal_context_59": 59, "coco_stuff": 171, "synthetic": 16}
    for name, n_cls in expected.items():
        info = dataset_info(name)
        assert info.n_cls == n_cls == len(info.names) == len(info.palette)
        assert info.ignore_index == 255
    assert dataset_info("ade20k").names[0] == "wall" and dataset_info("ade20k").palette[0].tolist() == [120, 120, 120]
    assert dataset_info("cityscapes").palette[0].tolist() == [128, 64, 128]
    assert dataset_info("pascal_context").names[:3] == ("background", "aeroplane", "bag")
    assert dataset_info("pascal_context_59").names[0] == "aeroplane"
    assert dataset_info("coco_stuff").names[-1] == "wood"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reader_counts_order_and_labels(tmp_path, layout):
    write_small(tmp_path, layout)
    for split, count in COUNTS.items():
        dataset = create_dataset(layout, split, root=tmp_path, im_size=32, crop_size=32)
        assert len(dataset) == len(dataset.samples) == count
        assert [image for image, _ in dataset.samples] == sorted(image for image, _ in dataset.samples)
        scenes = SyntheticScenes(split, count, **SMALL)
        for index in range(count):
            assert np.array_equal(dataset.label(index), scenes.get(index)[2])
            assert np.array_equal(dataset.image(index), scenes.get(index)[1])


def test_ade20k_reduce_zero_label(tmp_path):
    base = tmp_path / "ade20k/ADEChallengeData2016"
    save_png(base / "images/validation/a.jpg", np.zeros((2, 4, 3), np.uint8))
    save_png(base / "annotations/validation/a.png", np.array([[0, 1, 150, 255], [2, 0, 0, 0]], np.uint8))
    dataset = create_dataset("ade20k", "val", root=tmp_path)
    assert dataset.label(0).tolist() == [[255, 0, 149, 255], [1, 255, 255, 255]]
    item = dataset[0]
    assert item["gt"].tolist() == [[255, 0, 149, 255], [1, 255, 255, 255]]
    assert item["filename"] == "a.jpg" and item["ori_shape"] == (2, 4)


def write_pcontext(root, raw: np.ndarray) -> None:
    base = root / "pcontext/VOCdevkit/VOC2010"
    save_png(base / "JPEGImages/2008_000002.jpg", np.zeros((*raw.shape, 3), np.uint8))
    save_palette_png(base / "SegmentationClassContext/2008_000002.png", raw)
    (base / "ImageSets/SegmentationContext").mkdir(parents=True)
    (base / "ImageSets/SegmentationContext/val.txt").write_text("2008_000002\n")


def test_pascal_context_60_and_59(tmp_path):
    write_pcontext(tmp_path, np.array([[0, 1, 59, 255]], np.uint8))
    assert create_dataset("pascal_context", "val", root=tmp_path).label(0).tolist() == [[0, 1, 59, 255]]
    assert create_dataset("pascal_context_59", "val", root=tmp_path).label(0).tolist() == [[255, 0, 58, 255]]


def test_cityscapes_scans_city_folders(tmp_path):
    write_small(tmp_path, "cityscapes")
    dataset = create_dataset("cityscapes", "val", root=tmp_path)
    assert dataset[0]["filename"] == "synthetic/val_000000_leftImg8bit.png"


def test_val_items(tmp_path):
    write_small(tmp_path, "ade20k")
    dataset = create_dataset("ade20k", "val", root=tmp_path, im_size=32)
    item = dataset[1]
    assert set(item) == {"im", "flip", "ori_shape", "filename", "gt"}
    assert item["ori_shape"] == (40, 56) and item["gt"].shape == (40, 56) and item["gt"].dtype == torch.uint8
    assert item["im"][0].shape == (3, 32, 45) and item["flip"] == [False]
    views = create_dataset("ade20k", "val", root=tmp_path, im_size=32, multiscale=True)[1]["im"]
    assert len(views) == 12


def test_train_items_follow_the_seed(tmp_path):
    write_small(tmp_path, "ade20k")
    dataset = create_dataset("ade20k", "train", root=tmp_path, im_size=32, crop_size=24, seed=3)
    item = dataset[0]
    assert item["im"].shape == (3, 24, 24) and item["segmentation"].shape == (24, 24)
    assert torch.equal(dataset[0]["im"], item["im"])
    assert torch.equal(dataset[(0, 11)]["im"], dataset[(0, 11)]["im"])
    assert not torch.equal(dataset[(0, 11)]["im"], dataset[(0, 12)]["im"])
    other_seed = create_dataset("ade20k", "train", root=tmp_path, im_size=32, crop_size=24, seed=4)
    assert not torch.equal(other_seed[0]["im"], item["im"])


def test_max_images_and_root_overrides_dataset_env(tmp_path, monkeypatch):
    write_small(tmp_path, "coco_stuff")
    monkeypatch.setenv("DATASET", str(tmp_path / "elsewhere"))
    assert len(create_dataset("coco_stuff", "train", root=tmp_path, max_images=2)) == 2
    monkeypatch.setenv("DATASET", str(tmp_path))
    assert len(create_dataset("coco_stuff", "train")) == 3


def test_images_are_converted_to_rgb_and_labels_read_unchanged(tmp_path):
    grey = save_png(tmp_path / "grey.png", np.full((3, 5), 77, np.uint8))
    assert load_rgb(grey).shape == (3, 5, 3) and (load_rgb(grey) == 77).all()
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.full((3, 5, 4), 9, np.uint8)).save(rgba)
    assert load_rgb(rgba).shape == (3, 5, 3)
    indices = np.arange(15, dtype=np.uint8).reshape(3, 5)
    palette = save_palette_png(tmp_path / "palette.png", indices)
    assert load_rgb(palette).shape == (3, 5, 3)
    assert np.array_equal(load_label(palette), indices)


def test_unset_dataset_variable(monkeypatch):
    monkeypatch.delenv("DATASET", raising=False)
    with pytest.raises(ValueError, match="DATASET is not set.*synthetic"):
        create_dataset("ade20k", "val")
    assert len(create_dataset("synthetic", "val")) == 64


def test_missing_folder_names_it_and_prints_the_tree(tmp_path):
    with pytest.raises(DatasetError) as err:
        create_dataset("cityscapes", "train", root=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "cityscapes") in message
    assert "cityscapes/leftImg8bit/train/<city>/*_leftImg8bit.png" in message
    assert "cityscapes/gtFine/train/<city>/*_gtFine_labelTrainIds.png" in message


def test_unpaired_files(tmp_path):
    write_small(tmp_path, "ade20k")
    base = tmp_path / "ade20k/ADEChallengeData2016"
    (base / "annotations/training/train_000001.png").unlink()
    save_png(base / "annotations/training/stray.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DatasetError) as err:
        create_dataset("ade20k", "train", root=tmp_path)
    message = str(err.value)
    assert "image without label" in message and "train_000001.jpg" in message
    assert "label without image" in message and "stray.png" in message


def test_split_file_entry_without_files(tmp_path):
    write_small(tmp_path, "pascal_context")
    split_file = tmp_path / "pcontext/VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt"
    split_file.write_text(split_file.read_text() + "2010_999999\n")
    with pytest.raises(DatasetError, match="2010_999999"):
        create_dataset("pascal_context", "val", root=tmp_path)


def test_corrupt_image_is_named(tmp_path):
    write_small(tmp_path, "ade20k")
    broken = tmp_path / "ade20k/ADEChallengeData2016/images/training/train_000002.jpg"
    broken.write_bytes(broken.read_bytes()[:100])
    dataset = create_dataset("ade20k", "train", root=tmp_path)
    dataset[0]
    with pytest.raises(DatasetError, match="train_000002.jpg"):
        dataset[2]


def test_label_values_outside_the_classes(tmp_path):
    write_small(tmp_path, "cityscapes")
    label = next((tmp_path / "cityscapes/gtFine/val").rglob("*_labelTrainIds.png"))
    save_png(label, np.full((40, 56), 19, np.uint8))
    with pytest.raises(DatasetError, match=r"values \[19\] outside the 19 classes"):
        create_dataset("cityscapes", "val", root=tmp_path)[0]


def test_size_mismatch_is_named(tmp_path):
    write_small(tmp_path, "coco_stuff")
    label = tmp_path / "coco_stuff164k/annotations/val2017/val_000000_labelTrainIds.png"
    save_png(label, np.zeros((10, 10), np.uint8))
    with pytest.raises(DatasetError, match="same size"):
        create_dataset("coco_stuff", "val", root=tmp_path)[0]


def test_unknown_names_and_splits():
    with pytest.raises(ValueError, match="known datasets: ade20k, ade20k_large, cityscapes"):
        create_dataset("ade21k", "train")
    with pytest.raises(ValueError, match="choose one of: train, val"):
        create_dataset("synthetic", "test")
