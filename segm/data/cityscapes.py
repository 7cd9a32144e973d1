"""Cityscapes fine annotations: the 19 evaluation trainIds, 255 = ignore, city sub-folders.

Labels are the ``*_gtFine_labelTrainIds.png`` files written by cityscapesscripts (see
``python -m segm.scripts.prepare_cityscapes``); they are used unchanged.
"""

from __future__ import annotations

from segm.data.base import DatasetInfo, DatasetSpec, read_classes
from segm.data.layout import FolderLayout

LAYOUT = FolderLayout(
    subdir="cityscapes",
    image_dirs={"train": "leftImg8bit/train", "val": "leftImg8bit/val"},
    label_dirs={"train": "gtFine/train", "val": "gtFine/val"},
    image_suffix="_leftImg8bit.png",
    label_suffix="_gtFine_labelTrainIds.png",
    nesting="<city>/",
)
MAX_RATIO = 2


def info() -> DatasetInfo:
    """Class names, palette and (identity) label mapping of Cityscapes."""
    names, palette = read_classes("cityscapes")
    return DatasetInfo("cityscapes", names, palette)


SPEC = DatasetSpec("cityscapes", info, MAX_RATIO, LAYOUT)
