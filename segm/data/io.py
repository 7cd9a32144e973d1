"""Reading image and label files the way the reference pipelines see them.

Images are decoded to RGB (the reference decodes BGR with OpenCV and swaps to RGB in its
``Normalize(to_rgb=True)``, so working in RGB throughout gives the same pixels). Label maps are
read unchanged: the palette indices or grey values are the class ids, nothing is colour-converted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from tokred.errors import UsageError

_EXIF_ORIENTATION = ExifTags.Base.Orientation
_INDEX_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N")


class DatasetError(UsageError):
    """A problem with dataset files or folders that the user can fix (missing, unpaired, unreadable)."""


def _open(path: str | Path, what: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise DatasetError(f"{what} file not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(
            f"cannot decode {what} file {path} ({err}); it is corrupt or not an image: "
            "extract it again from the dataset archive"
        ) from None
    return image


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image to a ``uint8`` H x W x 3 RGB array.

    Greyscale, palette, CMYK and RGBA images are converted to RGB (alpha is dropped) and the
    EXIF orientation is applied, as OpenCV's ``imread`` does for the reference; 16-bit greyscale
    images are scaled to 8 bits as ``imread`` scales them (the high byte), not saturated. A missing
    or corrupt file raises :class:`DatasetError` naming it.
    """
    image = _open(path, "image")
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):
        grey = _eight_bits(np.array(image), path)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image)


def _eight_bits(values: np.ndarray, path: str | Path) -> np.ndarray:
    """A 16-bit (or wider integer) greyscale image as 8 bits: values up to 255 kept, 16-bit ones >> 8."""
    top = int(values.max()) if values.size else 0
    if values.min() < 0 or top > 65535:
        raise DatasetError(f"image file {path} holds integer values outside 0..65535; convert it to an 8-bit image")
    if values.dtype == np.uint8 or (values.dtype != np.uint16 and top <= 255):
        return values.astype(np.uint8)
    return (values.astype(np.uint32) >> 8).astype(np.uint8)


def load_label(path: str | Path) -> np.ndarray:
    """Read a label map unchanged as a ``uint8`` H x W array of raw class values.

    Single-channel images only (palette, greyscale, or 16/32-bit integer with values below 256);
    a colour label or one with values above 255 raises :class:`DatasetError` naming the file.
    """
    image = _open(path, "label")
    if image.mode not in _INDEX_MODES:
        raise DatasetError(
            f"label file {path} is a {image.mode} image; label maps must be single-channel "
            "(palette or greyscale PNG holding class ids), not colour renderings"
        )
    values = np.array(image)
    if values.dtype != np.uint8:
        if values.size and (values.min() < 0 or values.max() > 255):
            raise DatasetError(
                f"label file {path} holds values outside 0..255 (min {values.min()}, max {values.max()}); "
                "class ids must fit in 8 bits"
            )
        values = values.astype(np.uint8)
    return values


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file after EXIF orientation, read from its header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(
            f"cannot read the header of image file {path} ({err}); it is corrupt or not an image"
        ) from None
    return height, width
