"""Access to ``segm/config.yml``: backbones, decoders and dataset defaults, read once per process."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import yaml

from tokred.errors import UsageError

CONFIG_PATH = Path(__file__).with_name("config.yml")


@functools.lru_cache(maxsize=1)
def _read_config() -> dict[str, Any]:
    with open(CONFIG_PATH) as f:
        return yaml.safe_load(f)


def _section_entry(section: str, name: str, what: str) -> dict[str, Any]:
    entries = _read_config()[section]
    if name not in entries:
        known = ", ".join(sorted(entries))
        raise UsageError(f"unknown {what} '{name}'; known {what}s: {known}")
    return copy.deepcopy(entries[name])


def backbone_config(name: str) -> dict[str, Any]:
    """Architecture of a backbone key of ``config.yml`` (``image_size``, ``patch_size``, ``d_model``, ...)."""
    return _section_entry("model", name, "backbone")


def decoder_config(name: str) -> dict[str, Any]:
    """Hyper-parameters of a decoder key (``linear`` or ``mask_transformer``)."""
    return _section_entry("decoder", name, "decoder")


def dataset_config(name: str) -> dict[str, Any]:
    """Training and evaluation defaults of a dataset key (epochs, world batch size, sizes, ...)."""
    return _section_entry("dataset", name, "dataset")


def backbone_family(name: str) -> str:
    """The model family of a backbone: ``vit`` (Segmenter) or ``mit`` (SegFormer)."""
    return backbone_config(name).get("family", "vit")


def family_overrides(backbone: str, dataset: str) -> dict[str, Any]:
    """The sizes a backbone's family sets for a dataset (empty when the dataset's own apply)."""
    return copy.deepcopy(_read_config()["family_training"][backbone_family(backbone)].get(dataset, {}))


def training_defaults(backbone: str, dataset: str) -> dict[str, Any]:
    """The dataset's defaults with its backbone family's optimizer settings and size overrides on top."""
    defaults = dataset_config(dataset)
    defaults.update(family_overrides(backbone, dataset))
    defaults.update(copy.deepcopy(_read_config()["family_training"][backbone_family(backbone)]["optimizer"]))
    return defaults


def known_names(section: str) -> list[str]:
    """Sorted keys of a section: ``model``, ``decoder`` or ``dataset``."""
    return sorted(_read_config()[section])


def dataset_dir() -> Path:
    """The root of all datasets, ``$DATASET``; raises a clear error when it is not set."""
    root = os.environ.get("DATASET")
    if not root:
        raise UsageError(
            "the environment variable DATASET is not set: point it at the folder that holds "
            "ade20k/, cityscapes/, pcontext/ or coco_stuff164k/ (the 'synthetic' dataset needs nothing)"
        )
    return Path(os.path.expandvars(root)).expanduser()
