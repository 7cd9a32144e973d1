"""Datasets read from files in a :class:`~segm.data.layout.FolderLayout` (ADE20K, Cityscapes, ...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segm.data.base import DatasetSpec, SegmentationDataset
from segm.data.io import load_label, load_rgb
from segm.data.transforms import TrainPipeline, ValPipeline
from tokred.errors import UsageError


class FolderDataset(SegmentationDataset):
    """Image/label pairs listed from ``root`` with the spec's layout, in the reference's order.

    ``samples`` is the list of (image path, label path); ``max_images`` keeps the first ones.
    Missing folders and unpaired files raise :class:`~segm.data.io.DatasetError` at construction.
    """

    def __init__(self, spec: DatasetSpec, split: str, transform: TrainPipeline | ValPipeline, root: Path,
                 seed: int = 0, max_images: int | None = None) -> None:
        super().__init__(spec.info, split, transform, seed)
        if spec.layout is None:
            raise UsageError(f"dataset '{spec.name}' has no folder layout")
        self.root = Path(root)
        self.image_dir = spec.layout.image_dir(self.root, split)
        self.samples = spec.layout.samples(self.root, split)[:max_images]

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> np.ndarray:
        return load_rgb(self.samples[index][0])

    def raw_label(self, index: int) -> np.ndarray:
        return load_label(self.samples[index][1])

    def filename(self, index: int) -> str:
        return self.samples[index][0].relative_to(self.image_dir).as_posix()

    def describe(self, index: int) -> str:
        return str(self.samples[index][1])
