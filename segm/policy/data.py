"""Policy-network training items and a loader that can resume inside an epoch.

:class:`PolicyDataset` wraps any :class:`~segm.data.SegmentationDataset`: the image and its raw label go
through the dataset's policy geometry (:func:`segm.policy.labels.policy_rule`: bilinear for the image,
nearest for the label, CTS's random crop where it has one), a horizontal flip with p = 0.5 when training,
the normalisation ``(x - 127.5) / 127.5`` and CTS's label rule. Items are ``(image float [3, H, W],
policy label long [H / 32, W / 32])``.

As everywhere in ``segm``, every random draw of an item comes from a generator seeded with its sample
seed (the ``(index, sample_seed)`` pairs of :class:`~segm.data.EpochSampler`, or a seed derived from the
index for a bare int), so runs are reproducible whatever the number of workers. Validation items are
indexed by int: their crop is random but fixed per image, as CTS also crops its validation images.

The policy network trains for a number of iterations, not epochs, and checkpoints inside an epoch;
:meth:`EpochSampler.set_position` starts an epoch part-way without loading the skipped samples, and
:func:`batch_stream` yields the batches of iteration ``start`` onwards, so a resumed run sees exactly the
batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from segm.data import DatasetError, EpochSampler, SegmentationDataset
from segm.data.loader import loader_settings
from segm.data.transforms import pixel_stats
from segm.policy.labels import PolicyRule, policy_rule

FLIP_PROB = 0.5
NORMALIZATION = "vit"  # mean = std = 127.5 on the 0..255 scale: CTS's (x - 127.5) / 127.5


class PolicyDataset(Dataset):
    """``(image, policy label)`` items of ``dataset`` at its policy geometry; flips when ``flip`` (default: train split)."""

    def __init__(self, dataset: SegmentationDataset, rule: PolicyRule | None = None, flip: bool | None = None) -> None:
        self.dataset = dataset
        self.rule = policy_rule(dataset.info.name) if rule is None else rule
        self.flip = dataset.split == "train" if flip is None else flip
        mean, std = pixel_stats(NORMALIZATION)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    @property
    def split(self) -> str:
        return self.dataset.split

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, sample_seed = self.dataset.resolve(key)
        image, raw = self.dataset.image(index), self.dataset.raw_label(index)
        if image.shape[:2] != raw.shape:
            raise DatasetError(
                f"image {self.dataset.filename(index)} is {image.shape[0]}x{image.shape[1]} but its label "
                f"{self.dataset.describe(index)} is {raw.shape[0]}x{raw.shape[1]}; they must have the same size"
            )
        gen = torch.Generator().manual_seed(sample_seed)
        pixels = torch.from_numpy(image).permute(2, 0, 1).to(torch.float32)
        try:
            pixels, label = self.rule.apply(pixels, torch.from_numpy(raw), gen)
        except DatasetError as err:
            raise DatasetError(f"{self.dataset.filename(index)} of {self.dataset.info.name}: {err}") from None
        if self.flip and torch.rand((), generator=gen, dtype=torch.float64).item() < FLIP_PROB:
            pixels, label = pixels.flip(-1), label.flip(-1)
        target = torch.from_numpy(self.rule.labels(label)).long()
        return ((pixels - self.mean) / self.std).contiguous(), target


def policy_loader(dataset: PolicyDataset, batch_size: int, sampler: Sampler | None, *, num_workers: int = 0,
                  seed: int = 0, rank: int = 0, pin_memory: bool = False) -> DataLoader:
    """A loader of ``dataset`` in ``sampler``'s order; a training sampler (:class:`EpochSampler`) drops the last
    partial batch."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=isinstance(sampler, EpochSampler),
                      **loader_settings(num_workers, seed, rank, pin_memory))


def iterations_per_epoch(loader: DataLoader) -> int:
    """Full batches in one epoch of this process (the last partial batch is dropped)."""
    return loader.sampler.num_samples // loader.batch_size


def batch_stream(loader: DataLoader, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of iteration ``start`` onwards, epoch after epoch (the loader's sampler is an EpochSampler)."""
    per_epoch = iterations_per_epoch(loader)
    epoch, offset = divmod(start, per_epoch)
    while True:
        loader.sampler.set_position(epoch, offset * loader.batch_size)
        yield from loader
        epoch, offset = epoch + 1, 0
