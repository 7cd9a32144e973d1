"""COCO-Stuff 164k in mmsegmentation's layout: 171 trainIds (80 things + 91 stuff), 255 = ignore.

The raw stuffthingmaps hold COCO category ids minus one (0..181, with eleven unused ids) and 255
for unlabelled pixels. ``python -m segm.scripts.prepare_coco_stuff`` converts them to
``*_labelTrainIds.png`` with :data:`RAW_TO_TRAIN_ID` (mmsegmentation's
``tools/convert_datasets/coco_stuff164k.py`` mapping); the reader uses those files unchanged.
"""

from __future__ import annotations

import numpy as np

from segm.data.base import DatasetInfo, DatasetSpec, read_classes
from segm.data.layout import FolderLayout

LAYOUT = FolderLayout(
    subdir="coco_stuff164k",
    image_dirs={"train": "images/train2017", "val": "images/val2017"},
    label_dirs={"train": "annotations/train2017", "val": "annotations/val2017"},
    image_suffix=".jpg",
    label_suffix="_labelTrainIds.png",
)
MAX_RATIO = 4
N_RAW_IDS = 182
UNUSED_RAW_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)


def _raw_to_train_id() -> np.ndarray:
    """256-entry lookup table: used raw ids in increasing order -> 0..170, everything else -> 255."""
    table = np.full(256, 255, dtype=np.uint8)
    used = [raw for raw in range(N_RAW_IDS) if raw not in UNUSED_RAW_IDS]
    table[used] = np.arange(len(used), dtype=np.uint8)
    table.setflags(write=False)
    return table


RAW_TO_TRAIN_ID = _raw_to_train_id()


def info() -> DatasetInfo:
    """Class names, palette and (identity) label mapping of the converted trainId maps."""
    names, palette = read_classes("coco_stuff")
    return DatasetInfo("coco_stuff", names, palette)


SPEC = DatasetSpec("coco_stuff", info, MAX_RATIO, LAYOUT)
