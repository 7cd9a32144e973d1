"""The known dataset names and their specs; one place to look a name up."""

from __future__ import annotations

from segm.data import ade20k, cityscapes, coco_stuff, pascal_context, synthetic
from segm.data.base import DatasetInfo, DatasetSpec
from tokred.errors import UsageError

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        ade20k.SPEC,
        ade20k.SPEC_LARGE,
        cityscapes.SPEC,
        pascal_context.SPEC,
        pascal_context.SPEC_59,
        coco_stuff.SPEC,
        synthetic.SPEC,
    )
}


def dataset_names() -> list[str]:
    """Names accepted by ``--dataset``, :func:`create_dataset` and ``python -m segm.data.check``."""
    return list(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name``; an unknown name raises a ValueError listing the known ones."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset '{name}'; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def dataset_info(name: str) -> DatasetInfo:
    """Class count, names, palette, ignore value and label mapping of dataset ``name``."""
    return get_spec(name).info
