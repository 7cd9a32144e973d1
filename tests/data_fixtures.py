"""Helpers for the data tests: tiny dataset folders in every supported layout, written to tmp dirs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from segm.data.synthetic.write import write_layout

LAYOUTS = ("ade20k", "cityscapes", "pascal_context", "pascal_context_59", "coco_stuff")
SMALL = {"height": 40, "width": 56}
COUNTS = {"train": 3, "val": 2}


def write_small(root: Path, layout: str, counts: dict[str, int] | None = None) -> Path:
    """Synthetic scenes of 40 x 56 pixels (3 train, 2 val) written in ``layout`` under ``root``."""
    write_layout(root, layout, counts or COUNTS, **SMALL)
    return root


def save_png(path: Path, array: np.ndarray) -> Path:
    """Save a uint8 array (H x W greyscale or H x W x 3 RGB) as png, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def save_palette_png(path: Path, indices: np.ndarray) -> Path:
    """Save uint8 indices as a palette ("P") png whose colours differ from the indices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.frombytes("P", (indices.shape[1], indices.shape[0]), np.ascontiguousarray(indices).tobytes())
    image.putpalette([(i * 7 + c * 50) % 256 for i in range(256) for c in range(3)])
    image.save(path)
    return path
