"""What every dataset shares: class metadata, the raw -> training label mapping, and the torch Dataset.

A dataset module describes itself with a :class:`DatasetSpec` (classes, label mapping, resize
ratio, folder layout); :class:`SegmentationDataset` turns any source of (image, label) arrays into
training items (random augmentation from a per-sample seed) or validation items (deterministic views).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from torch.utils.data import Dataset

from segm.data.io import DatasetError
from segm.data.seeding import derive_seed
from segm.data.transforms import IGNORE_INDEX, TrainPipeline, ValPipeline

if TYPE_CHECKING:
    from segm.data.layout import FolderLayout

SPLITS = ("train", "val")


@functools.cache
def read_classes(stem: str) -> tuple[tuple[str, ...], np.ndarray]:
    """Class names and the (n, 3) uint8 RGB palette stored in ``segm/data/classes/<stem>.yml``."""
    text = resources.files("segm.data").joinpath("classes", f"{stem}.yml").read_text()
    entries = yaml.safe_load(text)
    names = tuple(entry["name"] for entry in entries)
    palette = np.array([entry["color"] for entry in entries], dtype=np.uint8)
    palette.setflags(write=False)
    return names, palette


@dataclass(frozen=True, eq=False)
class DatasetInfo:
    """Class metadata and the label mapping applied to every raw label map.

    ``reduce_zero_label`` (mmseg): raw 0 becomes ignore and every other value v becomes v - 1
    (raw 255 stays ignore). Mapped values are class ids in [0, n_cls) or ``ignore_index``.
    """

    name: str
    names: tuple[str, ...]
    palette: np.ndarray
    reduce_zero_label: bool = False
    ignore_index: int = IGNORE_INDEX
    lut: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.names) != len(self.palette):
            raise ValueError(f"{self.name}: {len(self.names)} class names but {len(self.palette)} colours")
        lut = np.arange(256, dtype=np.uint8)
        if self.reduce_zero_label:
            lut = np.where(lut == 0, self.ignore_index, lut - 1).astype(np.uint8)
            lut[255] = self.ignore_index
        lut.setflags(write=False)
        object.__setattr__(self, "lut", lut)

    @property
    def n_cls(self) -> int:
        return len(self.names)

    def map_labels(self, raw: np.ndarray) -> np.ndarray:
        """Raw uint8 label values -> class ids in [0, n_cls) or ``ignore_index``."""
        return self.lut[raw]

    @staticmethod
    def value_counts(mapped: np.ndarray) -> np.ndarray:
        """Pixel count of every value 0..255 in a mapped label map."""
        return np.bincount(mapped.reshape(-1), minlength=256)

    def invalid_values(self, counts: np.ndarray) -> np.ndarray:
        """Values present in ``counts`` that are neither a class id nor the ignore value, sorted."""
        present = np.flatnonzero(counts)
        return present[(present >= self.n_cls) & (present != self.ignore_index)]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the loaders need to know about one dataset name.

    ``max_ratio`` sets the reference's resize scale (max_ratio * im_size, im_size); ``layout`` is
    the folder layout under ``$DATASET`` (None for in-memory data); ``build`` overrides how the
    torch dataset is made (the synthetic dataset uses it).
    """

    name: str
    load_info: Callable[[], DatasetInfo]
    max_ratio: int
    layout: FolderLayout | None = None
    build: Callable[..., SegmentationDataset] | None = None

    @property
    def info(self) -> DatasetInfo:
        return self.load_info()


class SegmentationDataset(Dataset):
    """A torch dataset of (image, label) pairs with the reference's train or val pipeline.

    Subclasses provide ``__len__``, :meth:`image` (uint8 H x W x 3 RGB), :meth:`raw_label` and
    :meth:`filename`. Items are indexed either by an int (the sample seed is then derived from
    ``(seed, index)``) or by an ``(index, sample_seed)`` pair as yielded by
    :class:`segm.data.loader.EpochSampler`; all augmentation randomness comes from a
    ``torch.Generator`` seeded with the sample seed.
    """

    samples: list[tuple[Path, Path | None]]

    def __init__(self, info: DatasetInfo, split: str, transform: TrainPipeline | ValPipeline, seed: int = 0) -> None:
        self.info = info
        self.split = split
        self.transform = transform
        self.seed = seed

    @property
    def n_cls(self) -> int:
        return self.info.n_cls

    @property
    def names(self) -> tuple[str, ...]:
        return self.info.names

    @property
    def palette(self) -> np.ndarray:
        return self.info.palette

    @property
    def ignore_index(self) -> int:
        return self.info.ignore_index

    @property
    def reduce_zero_label(self) -> bool:
        return self.info.reduce_zero_label

    def image(self, index: int) -> np.ndarray:
        """The decoded image, uint8 H x W x 3 RGB."""
        raise NotImplementedError

    def raw_label(self, index: int) -> np.ndarray:
        """The label map as stored (before the dataset's mapping), uint8 H x W."""
        raise NotImplementedError

    def filename(self, index: int) -> str:
        """The image path relative to the image folder (mmseg's ``ori_filename``)."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """How to name sample ``index`` in error messages (its label file where there is one)."""
        return self.filename(index)

    def label(self, index: int) -> np.ndarray:
        """The mapped label map, uint8 H x W of class ids and ``ignore_index``.

        Raises :class:`DatasetError` naming the file when a value falls outside the class range.
        """
        mapped = self.info.map_labels(self.raw_label(index))
        bad = self.info.invalid_values(self.info.value_counts(mapped))
        if len(bad):
            raise DatasetError(
                f"label {self.describe(index)} holds values {bad.tolist()} outside the {self.n_cls} classes of "
                f"{self.info.name} after its label mapping; check the dataset with "
                f"`python -m segm.data.check {self.info.name} --split {self.split}`"
            )
        return mapped

    def resolve(self, key: int | tuple[int, int]) -> tuple[int, int]:
        """``(index, sample_seed)`` of an item key: a bare index (seed derived) or a sampler's pair."""
        if isinstance(key, (tuple, list)):
            index, sample_seed = (int(k) for k in key)
        else:
            index = int(key)
            sample_seed = derive_seed(self.seed, index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.info.name} {self.split} ({len(self)} samples)")
        return index, sample_seed

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, sample_seed = self.resolve(key)
        image, label = self.image(index), self.label(index)
        if image.shape[:2] != label.shape:
            raise DatasetError(
                f"image {self.filename(index)} is {image.shape[0]}x{image.shape[1]} but its label "
                f"{self.describe(index)} is {label.shape[0]}x{label.shape[1]}; they must have the same size"
            )
        if isinstance(self.transform, TrainPipeline):
            return self.transform(image, label, torch.Generator().manual_seed(sample_seed))
        item = self.transform(image)
        item.update(ori_shape=tuple(image.shape[:2]), filename=self.filename(index), gt=torch.from_numpy(label))
        return item
