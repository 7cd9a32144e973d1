"""ADE20K SceneParsing: 150 classes, raw label 0 = "other" (ignored), official ADEChallengeData2016 layout.

Labels use mmseg's ``reduce_zero_label``: raw 0 -> 255, raw v -> v - 1, so class ids are 0..149.
``ade20k_large`` is the same data read at the 640-pixel sizes of its ``config.yml`` entry.
"""

from __future__ import annotations

import functools

from segm.data.base import DatasetInfo, DatasetSpec, read_classes
from segm.data.layout import FolderLayout

LAYOUT = FolderLayout(
    subdir="ade20k/ADEChallengeData2016",
    image_dirs={"train": "images/training", "val": "images/validation"},
    label_dirs={"train": "annotations/training", "val": "annotations/validation"},
    image_suffix=".jpg",
    label_suffix=".png",
)
MAX_RATIO = 4


def info(name: str = "ade20k") -> DatasetInfo:
    """Class names, palette and label mapping of ADE20K."""
    names, palette = read_classes("ade20k")
    return DatasetInfo(name, names, palette, reduce_zero_label=True)


SPEC = DatasetSpec("ade20k", functools.partial(info, "ade20k"), MAX_RATIO, LAYOUT)
SPEC_LARGE = DatasetSpec("ade20k_large", functools.partial(info, "ade20k_large"), MAX_RATIO, LAYOUT)
