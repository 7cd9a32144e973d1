"""A procedural segmentation dataset that needs no download: ``synthetic``.

Each scene is a textured ground (class 0) with 3-6 overlapping shapes of 15 object classes drawn
on top. A class is defined by a colour distribution and a texture, not by its shape (ellipses,
rectangles, triangles and blobs are drawn for every class), and classes come in pairs of similar
colours told apart by texture, so a model has to look at more than the mean colour. Small
random-coloured specks (labelled as what they cover), a lighting gradient, pixel noise and a JPEG
round trip make it less trivial. Pixels within one pixel of a boundary between two labels are
ignored (255), a 2-pixel band.

Everything is a pure function of (scene seed, split, index): generation is vectorised NumPy with a
local ``numpy.random.Generator``, a few milliseconds per 128 x 128 scene. The in-memory images
are the decoded JPEG bytes, so ``python -m segm.data.synthetic --out DIR --layout ade20k`` writes
files that the ADE20K reader decodes to exactly the same pixels and labels.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from segm.data.base import SPLITS, DatasetInfo, DatasetSpec, SegmentationDataset
from segm.data.seeding import derive_seed
from segm.data.transforms import IGNORE_INDEX, TrainPipeline, ValPipeline

DEFAULT_SIZE = 128
DEFAULT_COUNTS = {"train": 512, "val": 64}
JPEG_QUALITY = 95
MAX_RATIO = 4


@dataclass(frozen=True)
class ClassStyle:
    """How one class looks: mean RGB colour, texture kind and texture period (pixels at 128 px)."""

    name: str
    color: tuple[int, int, int]
    texture: str
    period: float = 8.0


STYLES = (
    ClassStyle("ground", (128, 118, 100), "noise", 16.0),
    ClassStyle("red stripes", (205, 50, 45), "stripes", 8.0),
    ClassStyle("red plain", (170, 75, 65), "flat"),
    ClassStyle("green dots", (55, 170, 55), "dots", 9.0),
    ClassStyle("green checker", (85, 140, 90), "checker", 12.0),
    ClassStyle("blue stripes", (50, 70, 205), "stripes", 6.0),
    ClassStyle("blue plain", (75, 105, 170), "flat"),
    ClassStyle("yellow checker", (215, 205, 55), "checker", 10.0),
    ClassStyle("yellow waves", (190, 175, 95), "waves", 14.0),
    ClassStyle("cyan noise", (60, 185, 200), "noise", 4.0),
    ClassStyle("magenta dots", (190, 60, 180), "dots", 8.0),
    ClassStyle("orange stripes", (235, 135, 35), "stripes", 10.0),
    ClassStyle("purple plain", (120, 60, 165), "flat"),
    ClassStyle("white checker", (215, 215, 215), "checker", 8.0),
    ClassStyle("dark stripes", (55, 55, 60), "stripes", 7.0),
    ClassStyle("brown noise", (130, 80, 40), "noise", 5.0),
)
N_CLASSES = len(STYLES)
SHAPES = ("ellipse", "rectangle", "triangle", "blob")


def info() -> DatasetInfo:
    """16 classes named after their look; the palette is each class's mean colour."""
    return DatasetInfo("synthetic", tuple(s.name for s in STYLES), np.array([s.color for s in STYLES], dtype=np.uint8))


@functools.cache
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ys.setflags(write=False)
    xs.setflags(write=False)
    return ys, xs


def _rotated(ys: np.ndarray, xs: np.ndarray, cy: float, cx: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in a frame centred on (cy, cx) and rotated by ``angle``."""
    cos, sin = np.cos(angle), np.sin(angle)
    dx, dy = xs - cx, ys - cy
    return dx * cos + dy * sin, dy * cos - dx * sin


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Values in about [-1, 1], bilinearly interpolated from a random grid with ``cell``-pixel spacing."""
    cell = max(cell, 1.0)
    grid = rng.uniform(-1.0, 1.0, size=(int(height / cell) + 2, int(width / cell) + 2)).astype(np.float32)
    ys = np.arange(height, dtype=np.float32) / cell
    xs = np.arange(width, dtype=np.float32) / cell
    y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - wx) + grid[y0][:, x0 + 1] * wx
    bottom = grid[y0 + 1][:, x0] * (1 - wx) + grid[y0 + 1][:, x0 + 1] * wx
    return top * (1 - wy) + bottom * wy


def _texture(style: ClassStyle, rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, scale: float) -> np.ndarray:
    """A texture in about [-1, 1] over the whole image, randomly oriented and phased per instance."""
    period = style.period * scale * rng.uniform(0.85, 1.15)
    if style.texture == "flat":
        return np.zeros_like(xs)
    if style.texture == "noise":
        return _smooth_noise(rng, *xs.shape, cell=period / 2)
    u, v = _rotated(ys, xs, 0.0, 0.0, rng.uniform(0, np.pi))
    phase = rng.uniform(0, 2 * np.pi)
    wave_u = 2 * np.pi * u / period + phase
    wave_v = 2 * np.pi * v / period + phase
    if style.texture == "stripes":
        return np.tanh(3 * np.sin(wave_u))
    if style.texture == "checker":
        return np.tanh(3 * np.sin(wave_u) * np.sin(wave_v))
    if style.texture == "dots":
        return np.where(np.cos(wave_u) * np.cos(wave_v) > 0.4, 1.0, -0.4).astype(np.float32)
    if style.texture == "waves":
        return np.sin(wave_u + 1.5 * np.sin(wave_v / 2))
    raise ValueError(f"unknown texture '{style.texture}'")


def _shape_mask(rng: np.random.Generator, height: int, width: int,
                radius: float) -> tuple[tuple[slice, slice], np.ndarray]:
    """A random ellipse, rectangle, triangle or blob of about ``radius`` pixels, anywhere in the image.

    Returns the bounding box (a pair of slices) and the mask inside it, so that only the pixels
    near the shape are computed.
    """
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    angle, aspect = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.0)
    kind = SHAPES[rng.integers(len(SHAPES))]
    reach = 1.3 * radius
    box = (slice(max(int(cy - reach), 0), min(int(cy + reach) + 2, height)),
           slice(max(int(cx - reach), 0), min(int(cx + reach) + 2, width)))
    ys, xs = (grid[box] for grid in _grid(height, width))
    u, v = _rotated(ys, xs, cy, cx, angle)
    if kind == "ellipse":
        mask = (u / radius) ** 2 + (v / (aspect * radius)) ** 2 <= 1.0
    elif kind == "rectangle":
        mask = (np.abs(u) <= radius) & (np.abs(v) <= aspect * radius)
    elif kind == "triangle":
        mask = np.ones_like(u, dtype=bool)
        for corner in range(3):
            normal = 2 * np.pi * corner / 3
            mask &= u * np.cos(normal) + v * np.sin(normal) <= radius / 2
    else:
        wobble = 1 + 0.3 * np.sin(3 * np.arctan2(v, u) + rng.uniform(0, 2 * np.pi))
        mask = np.hypot(u, v) <= radius * wobble
    return box, mask


def _ignore_borders(label: np.ndarray) -> np.ndarray:
    """Set to ignore every pixel with a 4-neighbour of another label (a 2-pixel band per boundary)."""
    edge = np.zeros(label.shape, dtype=bool)
    vertical = label[1:] != label[:-1]
    horizontal = label[:, 1:] != label[:, :-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return np.where(edge, IGNORE_INDEX, label).astype(np.uint8)


def render_scene(seed: int, height: int = DEFAULT_SIZE, width: int = DEFAULT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 H x W x 3 RGB image before JPEG, uint8 H x W label with ignore borders) for one seed."""
    rng = np.random.default_rng(seed)
    ys, xs = _grid(height, width)
    scale = min(height, width) / DEFAULT_SIZE
    ground = STYLES[0]
    base = (np.array(ground.color) + rng.normal(0, 20, 3)).astype(np.float32)
    image = base + 25 * _texture(ground, rng, ys, xs, scale)[..., None]
    label = np.zeros((height, width), dtype=np.uint8)
    for _ in range(rng.integers(3, 7)):
        cls = int(rng.integers(1, N_CLASSES))
        style = STYLES[cls]
        box, mask = _shape_mask(rng, height, width, rng.uniform(0.12, 0.32) * min(height, width))
        colour = (np.array(style.color) + rng.normal(0, 6, 3)).astype(np.float32)
        pixels = colour + 60 * _texture(style, rng, ys[box], xs[box], scale)[..., None]
        image[box][mask] = pixels[mask]
        label[box][mask] = cls
    for _ in range(rng.integers(4, 12)):
        box, speck = _shape_mask(rng, height, width, rng.uniform(2, 6) * scale)
        image[box][speck] = rng.uniform(0, 255, 3)
    slope_y, slope_x = rng.uniform(-0.15, 0.15, 2)
    lighting = 1 + slope_y * (ys / height - 0.5) * 2 + slope_x * (xs / width - 0.5) * 2
    image = image * lighting[..., None] + 6 * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), _ignore_borders(label)


def encode_jpeg(image: np.ndarray) -> bytes:
    """JPEG bytes of an RGB array (quality 95, deterministic for a given Pillow)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    """Decode JPEG bytes to a uint8 RGB array."""
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))


def scene_seed(seed: int, split: str, index: int) -> int:
    """The seed of scene ``index`` of ``split``: train and val scenes never coincide."""
    return derive_seed(seed, SPLITS.index(split), index)


class SyntheticScenes:
    """The scenes of one split: JPEG bytes and labels, generated on first use and cached."""

    def __init__(self, split: str, count: int, height: int = DEFAULT_SIZE, width: int = DEFAULT_SIZE,
                 seed: int = 0) -> None:
        self.split, self.count, self.height, self.width, self.seed = split, count, height, width, seed
        self._cache: dict[int, tuple[bytes, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.count

    def get(self, index: int) -> tuple[bytes, np.ndarray, np.ndarray]:
        """(JPEG bytes, decoded RGB image, label) of scene ``index``."""
        if index not in self._cache:
            image, label = render_scene(scene_seed(self.seed, self.split, index), self.height, self.width)
            data = encode_jpeg(image)
            self._cache[index] = (data, decode(data), label)
        return self._cache[index]


class SyntheticDataset(SegmentationDataset):
    """The in-memory ``synthetic`` dataset; ``samples`` is empty, use :meth:`image` and :meth:`label`."""

    def __init__(self, split: str, transform: TrainPipeline | ValPipeline, seed: int = 0,
                 max_images: int | None = None) -> None:
        super().__init__(info(), split, transform, seed)
        count = DEFAULT_COUNTS[split] if max_images is None else min(max_images, DEFAULT_COUNTS[split])
        self.scenes = SyntheticScenes(split, count)
        self.samples = []

    def __len__(self) -> int:
        return len(self.scenes)

    def image(self, index: int) -> np.ndarray:
        return self.scenes.get(index)[1]

    def raw_label(self, index: int) -> np.ndarray:
        return self.scenes.get(index)[2]

    def filename(self, index: int) -> str:
        return f"{self.split}_{index:06d}.jpg"


def build(split: str, transform: TrainPipeline | ValPipeline, root: Path | None = None, seed: int = 0,
          max_images: int | None = None) -> SyntheticDataset:
    """Factory used by :func:`segm.data.create_dataset` (``root`` is not needed and ignored)."""
    return SyntheticDataset(split, transform, seed=seed, max_images=max_images)


SPEC = DatasetSpec("synthetic", info, MAX_RATIO, layout=None, build=build)
