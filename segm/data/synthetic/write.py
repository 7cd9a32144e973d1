"""Write the synthetic scenes to disk in the folder layout of a real dataset (``python -m segm.data.synthetic``).

Separate from the generator so that the dataset registry, which lists ``synthetic``, is imported here
and never by the generator.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from segm.data.base import DatasetSpec
from segm.data.registry import get_spec
from segm.data.synthetic import DEFAULT_COUNTS, DEFAULT_SIZE, SyntheticScenes
from segm.data.transforms import IGNORE_INDEX
from tokred.errors import UsageError


def _raw_values(spec: DatasetSpec, label: np.ndarray) -> np.ndarray:
    """Invert the dataset's label mapping: class ids -> the values stored in its label files."""
    if not spec.info.reduce_zero_label:
        return label
    return np.where(label == IGNORE_INDEX, 0, label + 1).astype(np.uint8)


def write_layout(out: Path, layout: str, counts: dict[str, int] | None = None, height: int = DEFAULT_SIZE,
                 width: int = DEFAULT_SIZE, seed: int = 0) -> list[Path]:
    """Write the synthetic scenes as a dataset root ``out`` in the folder layout of dataset ``layout``.

    JPEG images get the in-memory JPEG bytes, PNG images (Cityscapes) the decoded pixels, so the
    matching reader sees the same pixels as :class:`SyntheticDataset`. Label files hold the raw
    values of that dataset (e.g. ADE20K: class + 1, ignore -> 0). Returns the written image paths.
    """
    spec = get_spec(layout)
    if spec.layout is None:
        raise UsageError(f"'{layout}' has no folder layout; choose a dataset read from files")
    folders = spec.layout
    written = []
    for split, count in (counts or DEFAULT_COUNTS).items():
        scenes = SyntheticScenes(split, count, height, width, seed)
        image_dir, label_dir = folders.image_dir(out, split), folders.label_dir(out, split)
        nest = "synthetic/" if folders.nesting else ""
        ids = [f"{split}_{index:06d}" for index in range(count)]
        for index in tqdm(range(count), desc=f"writing {split}", disable=not sys.stderr.isatty()):
            data, image, label = scenes.get(index)
            image_path = image_dir / f"{nest}{ids[index]}{folders.image_suffix}"
            label_path = label_dir / f"{nest}{ids[index]}{folders.label_suffix}"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            label_path.parent.mkdir(parents=True, exist_ok=True)
            if folders.image_suffix.endswith(".jpg"):
                image_path.write_bytes(data)
            else:
                Image.fromarray(image).save(image_path)
            Image.fromarray(_raw_values(spec, label)).save(label_path)
            written.append(image_path)
        split_file = folders.split_file(out, split)
        if split_file is not None:
            split_file.parent.mkdir(parents=True, exist_ok=True)
            split_file.write_text("".join(f"{sample_id}\n" for sample_id in ids))
    return written
