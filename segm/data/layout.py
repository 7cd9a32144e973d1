"""Folder layouts under ``$DATASET`` and the pairing of image files with label files.

Two listing modes reproduce mmseg 0.14's ``CustomDataset.load_annotations``:

- scan: every file under the image folder (recursively) ending with the image suffix, sorted by
  its path relative to that folder; its label is the same relative path with the label suffix.
- split file: one id per line in file order; image ``<id><image suffix>``, label ``<id><label suffix>``.

Unlike mmseg, files that have no partner are reported (images without labels and, when scanning,
labels without images) instead of failing later or being silently skipped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from segm.data.io import DatasetError

MAX_LISTED = 10


@dataclass(frozen=True)
class Pairing:
    """Result of matching the image and label files of one split."""

    pairs: list[tuple[Path, Path]]
    images_without_label: list[Path] = field(default_factory=list)
    labels_without_image: list[Path] = field(default_factory=list)
    listed_but_missing: list[Path] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.images_without_label or self.labels_without_image or self.listed_but_missing)

    def problems(self) -> list[str]:
        """One line per unpaired file."""
        return (
            [f"image without label: {path}" for path in self.images_without_label]
            + [f"label without image: {path}" for path in self.labels_without_image]
            + [f"listed in the split file, neither image nor label exists: {path}" for path in self.listed_but_missing]
        )


def _scan(folder: Path, suffix: str) -> dict[str, Path]:
    """Relative posix path (suffix included) -> path, for every file under ``folder`` ending with ``suffix``."""
    found = {}
    for directory, _, files in os.walk(folder, followlinks=True):
        for name in files:
            if name.endswith(suffix):
                path = Path(directory, name)
                found[path.relative_to(folder).as_posix()] = path
    return found


@dataclass(frozen=True)
class FolderLayout:
    """Where a dataset's files live, relative to the dataset root (``$DATASET`` or ``--root``).

    ``subdir`` is the dataset's own folder under the root; ``image_dirs`` / ``label_dirs`` map each
    split to folders under ``subdir``; ``split_files`` (optional) map splits to id lists;
    ``nesting`` names an intermediate folder level shown in the expected tree (e.g. ``<city>/``).
    """

    subdir: str
    image_dirs: Mapping[str, str]
    label_dirs: Mapping[str, str]
    image_suffix: str
    label_suffix: str
    split_files: Mapping[str, str] | None = None
    nesting: str = ""

    def base(self, root: Path) -> Path:
        return Path(root) / self.subdir

    def image_dir(self, root: Path, split: str) -> Path:
        return self.base(root) / self.image_dirs[split]

    def label_dir(self, root: Path, split: str) -> Path:
        return self.base(root) / self.label_dirs[split]

    def split_file(self, root: Path, split: str) -> Path | None:
        return self.base(root) / self.split_files[split] if self.split_files else None

    def expected_tree(self, root: Path) -> str:
        """The expected files under ``root``, one pattern per line."""
        patterns = []
        for split in self.image_dirs:
            patterns.append(f"{self.subdir}/{self.image_dirs[split]}/{self.nesting}*{self.image_suffix}")
            patterns.append(f"{self.subdir}/{self.label_dirs[split]}/{self.nesting}*{self.label_suffix}")
            if self.split_files:
                patterns.append(f"{self.subdir}/{self.split_files[split]}   (one image id per line)")
        return "\n".join([f"expected layout under {root}:"] + [f"  {p}" for p in dict.fromkeys(patterns)])

    def check_folders(self, root: Path, split: str) -> None:
        """Raise :class:`DatasetError` naming the first missing folder or split file, with the expected tree."""
        required = [self.base(root), self.image_dir(root, split), self.label_dir(root, split)]
        split_file = self.split_file(root, split)
        for path in required:
            if not path.is_dir():
                raise DatasetError(f"dataset folder not found: {path}\n{self.expected_tree(root)}")
        if split_file is not None and not split_file.is_file():
            raise DatasetError(f"split file not found: {split_file}\n{self.expected_tree(root)}")

    def pair(self, root: Path, split: str) -> Pairing:
        """Match the image and label files of ``split`` (folders must exist, see :meth:`check_folders`)."""
        self.check_folders(root, split)
        image_dir, label_dir = self.image_dir(root, split), self.label_dir(root, split)
        split_file = self.split_file(root, split)
        if split_file is not None:
            return self._pair_listed(split_file, image_dir, label_dir)
        images = _scan(image_dir, self.image_suffix)
        labels = _scan(label_dir, self.label_suffix)
        pairs, lonely_images = [], []
        for rel in sorted(images):
            label_rel = rel[: -len(self.image_suffix)] + self.label_suffix
            if label_rel in labels:
                pairs.append((images[rel], labels.pop(label_rel)))
            else:
                lonely_images.append(images[rel])
        return Pairing(pairs, lonely_images, sorted(labels.values()))

    def _pair_listed(self, split_file: Path, image_dir: Path, label_dir: Path) -> Pairing:
        pairs, lonely_images, lonely_labels, missing = [], [], [], []
        for line in split_file.read_text().splitlines():
            sample_id = line.strip()
            if not sample_id:
                continue
            image = image_dir / f"{sample_id}{self.image_suffix}"
            label = label_dir / f"{sample_id}{self.label_suffix}"
            has_image, has_label = image.is_file(), label.is_file()
            if has_image and has_label:
                pairs.append((image, label))
            elif has_image:
                lonely_images.append(image)
            elif has_label:
                lonely_labels.append(label)
            else:
                missing.append(image)
        return Pairing(pairs, lonely_images, lonely_labels, missing)

    def samples(self, root: Path, split: str) -> list[tuple[Path, Path]]:
        """The (image, label) pairs of ``split``; raises :class:`DatasetError` listing unpaired files."""
        pairing = self.pair(root, split)
        if not pairing.pairs and pairing.complete:
            raise DatasetError(
                f"no '*{self.image_suffix}' images in {self.image_dir(root, split)}\n{self.expected_tree(root)}"
            )
        if not pairing.complete:
            problems = pairing.problems()
            listed = "\n  ".join(problems[:MAX_LISTED])
            more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
            raise DatasetError(
                f"{len(problems)} unpaired file(s) in the {split} split under {self.base(root)}; every image "
                f"needs a label '<name>{self.label_suffix}' and vice versa:\n  {listed}{more}"
            )
        return pairing.pairs
