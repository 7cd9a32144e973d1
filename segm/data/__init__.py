"""Datasets, the reference's data pipelines and loaders, without OpenMMLab.

Readers for ADE20K, Cityscapes, Pascal-Context (60 and 59 classes) and COCO-Stuff 164k in the
folder layouts prepared for mmsegmentation, plus the in-memory ``synthetic`` dataset. See
:func:`create_dataset` and :func:`create_loader`; ``python -m segm.data.check NAME`` checks a
dataset folder.
"""

from segm.data.base import DatasetInfo, SegmentationDataset
from segm.data.io import DatasetError, load_label, load_rgb
from segm.data.loader import (
    EpochSampler,
    collate_val,
    create_dataset,
    create_loader,
    per_process_batch_size,
)
from segm.data.registry import DATASETS, dataset_info, dataset_names
from segm.data.transforms import IGNORE_INDEX, STATS

__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "STATS",
    "DatasetError",
    "DatasetInfo",
    "EpochSampler",
    "SegmentationDataset",
    "collate_val",
    "create_dataset",
    "create_loader",
    "dataset_info",
    "dataset_names",
    "load_label",
    "load_rgb",
    "per_process_batch_size",
]
