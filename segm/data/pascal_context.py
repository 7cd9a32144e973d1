"""Pascal-Context (VOC2010 images with the 59 most frequent context classes + background).

``pascal_context`` is the published Segmenter protocol: 60 classes with background = 0, labels used
unchanged (255 = ignore). ``pascal_context_59`` is mmseg's PascalContextDataset59: background is
ignored (``reduce_zero_label``), leaving 59 classes. Both read the split files written by
``python -m segm.scripts.prepare_pcontext``.
"""

from __future__ import annotations

from segm.data.base import DatasetInfo, DatasetSpec, read_classes
from segm.data.layout import FolderLayout

LAYOUT = FolderLayout(
    subdir="pcontext/VOCdevkit/VOC2010",
    image_dirs={"train": "JPEGImages", "val": "JPEGImages"},
    label_dirs={"train": "SegmentationClassContext", "val": "SegmentationClassContext"},
    image_suffix=".jpg",
    label_suffix=".png",
    split_files={
        "train": "ImageSets/SegmentationContext/train.txt",
        "val": "ImageSets/SegmentationContext/val.txt",
    },
)
MAX_RATIO = 8


def info() -> DatasetInfo:
    """60 classes, background included, labels unchanged."""
    names, palette = read_classes("pascal_context")
    return DatasetInfo("pascal_context", names, palette)


def info_59() -> DatasetInfo:
    """59 classes: background (raw 0) ignored, the others shifted down by one."""
    names, palette = read_classes("pascal_context")
    return DatasetInfo("pascal_context_59", names[1:], palette[1:], reduce_zero_label=True)


SPEC = DatasetSpec("pascal_context", info, MAX_RATIO, LAYOUT)
SPEC_59 = DatasetSpec("pascal_context_59", info_59, MAX_RATIO, LAYOUT)
