"""Building datasets and loaders: the reference's pipelines, reproducible sampling, distributed splits.

Reproducibility contract: the training samples of epoch ``e`` on process ``rank`` of ``world_size``
(their order and all their augmentation randomness) are a pure function of (seed, e, world_size,
rank). :class:`EpochSampler` yields ``(index, sample_seed)`` pairs drawn in the main process, and
the dataset seeds a ``torch.Generator`` with ``sample_seed`` for every item, so the number of
workers and whether they persist make no difference.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from segm.config import dataset_config, dataset_dir
from segm.data.base import SPLITS, SegmentationDataset
from segm.data.folder import FolderDataset
from segm.data.registry import get_spec
from segm.data.seeding import derive_seed, generator
from segm.data.transforms import TrainPipeline, ValPipeline
from segm.utils.distributed import is_distributed
from tokred.errors import UsageError

_SEED_RANGE = 2**62


def create_dataset(name: str, split: str, *, im_size: int | None = None, crop_size: int | None = None,
                   normalization: str = "vit", root: str | Path | None = None, multiscale: bool = False,
                   seed: int = 0, max_images: int | None = None) -> SegmentationDataset:
    """Dataset ``name`` / ``split`` ("train" or "val") with the reference's pipeline.

    Sizes default to the dataset's ``config.yml`` entry; the resize scale is (max_ratio * im_size,
    im_size). ``root`` replaces ``$DATASET`` (the synthetic dataset needs neither). ``multiscale``
    gives the 12 multi-scale + flip views of a val item. ``seed`` seeds the augmentation of items
    indexed by a bare int; ``max_images`` keeps the first images only.
    """
    spec = get_spec(name)
    if split not in SPLITS:
        raise UsageError(f"unknown split '{split}' for {name}; choose one of: {', '.join(SPLITS)}")
    if multiscale and split == "train":
        raise UsageError("multiscale views apply to the val split only; drop multiscale for training")
    if max_images is not None and max_images < 1:
        raise UsageError(f"max_images must be a positive number of images, got {max_images}")
    defaults = dataset_config(name)
    im_size = im_size or defaults["im_size"]
    crop_size = crop_size or defaults["crop_size"]
    img_scale = (spec.max_ratio * im_size, im_size)
    if split == "train":
        transform: TrainPipeline | ValPipeline = TrainPipeline(img_scale, crop_size, normalization)
    else:
        transform = ValPipeline(img_scale, normalization, multiscale=multiscale)
    if spec.build is not None:
        return spec.build(split, transform, root=root, seed=seed, max_images=max_images)
    dataset_root = Path(root).expanduser() if root is not None else dataset_dir()
    return FolderDataset(spec, split, transform, dataset_root, seed=seed, max_images=max_images)


class EpochSampler(DistributedSampler):
    """A ``DistributedSampler`` that yields ``(index, sample_seed)`` pairs.

    The order is DistributedSampler's (shuffled with ``seed + epoch``, padded to a multiple of
    ``num_replicas``, then every ``num_replicas``-th index from ``rank``). The sample seeds are drawn
    for the whole padded epoch from a generator seeded with (seed, epoch) and split the same way, so
    every position of an epoch has its own seed, also when an image appears twice through padding.
    With ``num_replicas=1`` it is the single-process sampler.
    """

    def __init__(self, dataset: SegmentationDataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        """Sample epoch ``epoch`` from this process's ``skip``-th sample on (continuing a stopped epoch)."""
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        seeds = torch.randint(0, _SEED_RANGE, (self.total_size,), generator=generator(self.seed, self.epoch))
        pairs = zip(indices, seeds[self.rank:self.total_size:self.num_replicas].tolist())
        return itertools.islice(pairs, self.skip, None)

    def __len__(self) -> int:
        return self.num_samples - self.skip


class ShardSampler(Sampler[int]):
    """Every ``num_replicas``-th index from ``rank``, without padding: each image is seen by one process
    exactly once, so per-process sums (confusion matrices) add up to the whole dataset."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = range(rank, length, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def per_process_batch_size(world_batch: int, world_size: int) -> int:
    """The batch size of each process; the world batch must split evenly across processes."""
    if world_size < 1 or world_batch < 1:
        raise UsageError(f"batch size ({world_batch}) and number of processes ({world_size}) must be positive")
    if world_batch % world_size:
        raise UsageError(
            f"the world batch size {world_batch} does not divide across {world_size} processes; "
            f"use a multiple of {world_size} (e.g. {world_size * max(1, round(world_batch / world_size))})"
        )
    return world_batch // world_size


def collate_val(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate a validation batch of one item: each view gets a leading batch dimension ([1, 3, h, w]).

    The other fields stay as in the item: ``flip`` (list of bool), ``ori_shape`` ((H0, W0)),
    ``filename`` (str) and ``gt`` (uint8 [H0, W0]).
    """
    if len(batch) != 1:
        raise UsageError(f"validation batches hold one image (its views differ in size), got {len(batch)}; "
                         "use batch_size=1")
    item = batch[0]
    return {**item, "im": [view.unsqueeze(0) for view in item["im"]]}


def seed_worker(worker_id: int) -> None:
    """Set up a loader worker: OpenCV single-threaded, Python's and NumPy's global generators seeded.

    ``cv2.setNumThreads(0)``: the pipelines' resizes and colour conversions are OpenCV's, whose thread
    pool defaults to one thread per core in every process; with N workers that would be N x cores
    threads competing for the cores (and a pool inherited across fork). Each worker runs its kernels
    in its own thread instead, as DataLoader already does for torch (one intra-op thread per worker);
    the parallelism comes from the workers. The generators are seeded from torch's per-worker seed;
    the datasets never use them, this only makes third-party code in a worker deterministic.
    """
    cv2.setNumThreads(0)
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


class SegmentationLoader(DataLoader):
    """A DataLoader with ``set_position``, forwarded to its training sampler: call it at the start of every
    epoch, with ``skip`` > 0 to start after the first ``skip`` samples (a stopped epoch)."""

    def set_position(self, epoch: int, skip: int) -> None:
        self.sampler.set_position(epoch, skip)


def _process_group() -> tuple[int, int]:
    if not is_distributed():
        raise UsageError("distributed=True needs an initialised torch.distributed process group; "
                         "start with torchrun (or srun) and initialise it first, or pass distributed=False")
    return dist.get_world_size(), dist.get_rank()


def loader_settings(num_workers: int, seed: int, rank: int, pin_memory: bool) -> dict[str, Any]:
    """DataLoader settings every loader of the project shares: seeded, persistent workers."""
    return {
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        "worker_init_fn": seed_worker,
        "generator": torch.Generator().manual_seed(derive_seed(seed, rank)),
        "persistent_workers": num_workers > 0,
    }


def create_loader(dataset: SegmentationDataset, batch_size: int, *, num_workers: int = 0, distributed: bool = False,
                  shuffle: bool | None = None, seed: int = 0, drop_last: bool = False,
                  pin_memory: bool | None = None) -> SegmentationLoader:
    """A loader over ``dataset`` with the per-process ``batch_size``.

    Training (``dataset.split == "train"``) samples through :class:`EpochSampler`, shuffled unless
    ``shuffle=False``; validation keeps the dataset order (unless ``shuffle=True``), takes batches of
    one and collates with :func:`collate_val`. ``distributed`` splits the data across the processes of
    the initialised process group: training as DistributedSampler does (padded to equal shares),
    validation in disjoint shards without repeats (:class:`ShardSampler`). Workers persist between epochs and seed their global generators;
    memory is pinned only when CUDA is available unless ``pin_memory`` says otherwise.
    """
    training = dataset.split == "train"
    shuffle = training if shuffle is None else shuffle
    world_size, rank = _process_group() if distributed else (1, 0)
    if training:
        sampler: DistributedSampler | None = EpochSampler(dataset, world_size, rank, shuffle=shuffle, seed=seed)
        collate = None
    else:
        if batch_size != 1:
            raise UsageError(f"validation loaders take batch_size=1 (got {batch_size}): views differ in size")
        sampler = ShardSampler(len(dataset), world_size, rank) if distributed else None
        collate = collate_val
    return SegmentationLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        collate_fn=collate,
        drop_last=drop_last,
        **loader_settings(num_workers, seed, rank, torch.cuda.is_available() if pin_memory is None else pin_memory),
    )
