"""Policy targets from ground truth, CTS's rule (``specs/methods.md`` 5.2), and where each dataset trains.

CTS's policy network learns, per 32 x 32 superpatch, whether the superpatch is uniform and can share one
token. Its target comes from the label map at the training geometry:

- 1 (shareable) when every pixel of the cell holds the same value, cells that are all ignore included;
- 0 otherwise;
- with the border rule (ADE20K only), a cell holding exactly one real class plus some ignore pixels on
  the outer ring of the cell grid gets 255 and is left out of the loss.

The rule reads the labels as stored (``raw_label``): ADE20K and Pascal-Context first turn raw 0 ("other",
"background") into ignore; Cityscapes' trainId maps and every other dataset are used unchanged.
:data:`POLICY_RULES` holds these choices and the training geometry of each dataset.

``python -m segm.policy.labels DATASET [--split train|val] [--root R] [--max-images N] [--out DIR]``
computes the labels of every image at the dataset's deterministic geometry (the whole resized image, no
random crop), prints the share of shareable / not shareable / ignored cells and, with ``--out``, writes
one PNG per image (values 0, 1, 255).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from segm.cli import POSITIVE, fail_cleanly, root_option
from segm.config import dataset_config
from segm.data import DatasetError, SegmentationDataset, create_dataset
from segm.data.base import SPLITS
from segm.data.registry import get_spec
from segm.data.transforms import IGNORE_INDEX, resize_image, resize_mask
from segm.model.policy_net import CELL
from segm.utils.progress import progress
from tokred.errors import UsageError

SHAREABLE, NOT_SHAREABLE = 1, 0


def _as_uint8(label: np.ndarray | torch.Tensor) -> np.ndarray:
    values = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if values.ndim != 2:
        raise UsageError(f"a label map is 2-D (H x W), got shape {tuple(values.shape)}")
    if values.dtype != np.uint8:
        if values.size and (values.min() < 0 or values.max() > 255):
            raise UsageError(f"label values must lie in 0..255 (min {values.min()}, max {values.max()})")
        values = values.astype(np.uint8)
    return values


def policy_labels(label: np.ndarray | torch.Tensor, cell: int = CELL, zero_is_ignore: bool = False,
                  border_ignore: bool = False) -> np.ndarray:
    """CTS's policy target of every ``cell`` x ``cell`` region: uint8 (H // cell, W // cell) of 1, 0 or 255.

    1 when all pixels of the cell are equal (all-ignore cells too), else 0. ``zero_is_ignore`` first turns
    value 0 into ignore (255). ``border_ignore``: a cell with exactly one real class plus some ignore, on
    the outer ring of the cell grid, gets 255. Rows and columns past the last whole cell are dropped.
    """
    values = _as_uint8(label)
    if cell < 1:
        raise UsageError(f"the cell size must be a positive number of pixels, got {cell}")
    rows, cols = values.shape[0] // cell, values.shape[1] // cell
    if rows == 0 or cols == 0:
        raise UsageError(f"a {values.shape[0]}x{values.shape[1]} label map holds no whole {cell}x{cell} cell")
    if zero_is_ignore:
        values = np.where(values == 0, np.uint8(IGNORE_INDEX), values)
    blocks = values[: rows * cell, : cols * cell].reshape(rows, cell, cols, cell)
    low, high = blocks.min(axis=(1, 3)), blocks.max(axis=(1, 3))
    uniform = low == high
    out = uniform.astype(np.uint8)
    if border_ignore:
        # Ignore (255) is the largest uint8, so ``high == 255`` means "some ignore" and ``low`` is the smallest
        # real class; one real class iff the largest real value (ignore counted as 0) equals it.
        real_high = np.where(blocks == IGNORE_INDEX, np.uint8(0), blocks).max(axis=(1, 3))
        one_class_plus_ignore = ~uniform & (high == IGNORE_INDEX) & (real_high == low)
        ring = np.ones((rows, cols), dtype=bool)
        ring[1:-1, 1:-1] = False
        out[one_class_plus_ignore & ring] = IGNORE_INDEX
    return out


@dataclass(frozen=True)
class PolicyRule:
    """How one dataset's policy labels are made and at which geometry its policy network trains.

    Geometry: resize to exactly ``size`` (aspect not kept), or the short side to ``short_side``, or keep
    the size; then, when ``crop`` is set and a generator is given, a random ``crop`` x ``crop`` window
    (offsets ``int(u * margin)``, u uniform in [0, 1), as CTS draws them).
    """

    zero_is_ignore: bool = False
    border_ignore: bool = False
    size: tuple[int, int] | None = None
    short_side: int | None = None
    crop: int | None = None

    def labels(self, label: np.ndarray | torch.Tensor) -> np.ndarray:
        """:func:`policy_labels` of a label map with this dataset's options."""
        return policy_labels(label, zero_is_ignore=self.zero_is_ignore, border_ignore=self.border_ignore)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step (torchvision's short-side rule: long = int(short' * long / short))."""
        if self.size is not None:
            return self.size
        if self.short_side is not None:
            if height <= width:
                return self.short_side, int(self.short_side * width / height)
            return int(self.short_side * height / width), self.short_side
        return height, width

    def apply(self, image: torch.Tensor | None, label: torch.Tensor,
              gen: torch.Generator | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Resize (image: float [3, H, W] bilinear; label: uint8 [H, W] nearest), then crop when ``gen`` is given.

        ``image`` may be None (labels only). Without a generator the whole resized image is kept.
        """
        size = self.resized_size(*label.shape[-2:])
        if size != tuple(label.shape[-2:]):
            label = resize_mask(tv_tensors.Mask(label), size).as_subclass(torch.Tensor)
            if image is not None:
                image = resize_image(image, size)
        if self.crop is None or gen is None:
            return image, label
        height, width = label.shape[-2:]
        if height < self.crop or width < self.crop:
            raise DatasetError(f"the {height}x{width} image is smaller than the {self.crop}x{self.crop} policy crop")
        u = torch.rand(2, generator=gen, dtype=torch.float64)
        top, left = int(u[0].item() * (height - self.crop)), int(u[1].item() * (width - self.crop))
        label = label[..., top:top + self.crop, left:left + self.crop]
        if image is not None:
            image = image[..., top:top + self.crop, left:left + self.crop]
        return image, label

    def describe(self) -> str:
        if self.size is not None:
            geometry = f"resized to {self.size[0]}x{self.size[1]}"
        elif self.short_side is not None:
            geometry = f"short side resized to {self.short_side}"
        else:
            geometry = "full resolution"
        if self.crop is not None:
            geometry += f", random {self.crop}x{self.crop} crops in training"
        zero = "raw 0 is ignore" if self.zero_is_ignore else "labels unchanged"
        border = "border rule" if self.border_ignore else "no border rule"
        return f"{geometry}; {zero}, {border}"


_ADE20K = PolicyRule(zero_is_ignore=True, border_ignore=True, size=(512, 512))
_PASCAL_CONTEXT = PolicyRule(zero_is_ignore=True, short_side=512, crop=480)
POLICY_RULES: dict[str, PolicyRule] = {
    "ade20k": _ADE20K,
    "ade20k_large": _ADE20K,
    "pascal_context": _PASCAL_CONTEXT,
    "pascal_context_59": _PASCAL_CONTEXT,
    "cityscapes": PolicyRule(crop=768),
}


def policy_rule(name: str) -> PolicyRule:
    """The rule of dataset ``name``; datasets CTS did not train on resize to their ``config.yml`` crop size."""
    get_spec(name)
    if name in POLICY_RULES:
        return POLICY_RULES[name]
    crop = dataset_config(name)["crop_size"]
    return PolicyRule(size=(crop, crop))


def _dataset_folders(name: str, dataset: SegmentationDataset) -> list[Path]:
    spec = get_spec(name)
    root = getattr(dataset, "root", None)
    if spec.layout is None or root is None:
        return []
    return [folder(root, split).resolve() for split in SPLITS for folder in (spec.layout.image_dir, spec.layout.label_dir)]


def output_paths(name: str, dataset: SegmentationDataset, out: Path) -> list[Path]:
    """``out/<image name>.png`` per image; refused when one would land in the dataset's own folders."""
    folders = _dataset_folders(name, dataset)
    paths = [out / Path(dataset.filename(i)).with_suffix(".png") for i in range(len(dataset))]
    for parent in {path.parent.resolve() for path in paths} if folders else ():
        for folder in folders:
            if parent == folder or folder in parent.parents:
                raise UsageError(f"--out {out} would write into the dataset's folder {folder} and could overwrite "
                                 "its files; choose a folder outside the dataset")
    return paths


def format_table(counts: np.ndarray) -> str:
    """The Markdown table of cell counts and shares (counts indexed by label value)."""
    total = int(counts.sum())
    rows = [("shareable (1)", int(counts[SHAREABLE])), ("not shareable (0)", int(counts[NOT_SHAREABLE])),
            ("ignored (255)", int(counts[IGNORE_INDEX])), ("total", total)]
    lines = ["| cells | count | share |", "|---|---:|---:|"]
    lines += [f"| {what} | {count} | {100 * count / max(total, 1):.2f} % |" for what, count in rows]
    return "\n".join(lines)


@click.command(help="Compute CTS policy labels of a dataset split; print the shares of shareable, not shareable "
                    "and ignored cells; optionally write one PNG per image (0, 1, 255).")
@click.argument("dataset")
@click.option("--split", type=click.Choice(SPLITS), default="train", show_default=True)
@root_option
@click.option("--max-images", type=POSITIVE, default=None, help="Only the first N images.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the labels as PNGs under this folder (same names as the images).")
@fail_cleanly
def main(dataset: str, split: str, root: str | None, max_images: int | None, out: Path | None) -> None:
    rule = policy_rule(dataset)
    data = create_dataset(dataset, split, root=root, max_images=max_images)
    paths = output_paths(dataset, data, out) if out is not None else None
    counts = np.zeros(256, dtype=np.int64)
    for index in progress(range(len(data)), desc=f"policy labels {dataset} {split}"):
        _, label = rule.apply(None, torch.from_numpy(data.raw_label(index)))
        target = rule.labels(label)
        counts += np.bincount(target.reshape(-1), minlength=256)
        if paths is not None:
            try:
                paths[index].parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(target).save(paths[index])
            except OSError as err:
                raise UsageError(f"cannot write {paths[index]} ({err.strerror or err}); choose another --out") from None
    click.echo(f"Policy labels of {dataset} {split}: {len(data)} images, {rule.describe()}, {CELL}x{CELL} cells")
    click.echo(format_table(counts))
    if out is not None:
        click.echo(f"wrote {len(data)} label maps under {out}")


if __name__ == "__main__":
    main()
