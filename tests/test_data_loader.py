"""Loaders: reproducible epochs independent of workers, distributed partitions, batch sizes, val collation."""

from __future__ import annotations

import pytest
import torch

from segm.data import EpochSampler, collate_val, create_dataset, create_loader, per_process_batch_size


@pytest.fixture(scope="module")
def train_set():
    return create_dataset("synthetic", "train", max_images=6, crop_size=32, seed=1)


def batches(loader, epoch: int) -> list[dict[str, torch.Tensor]]:
    loader.set_position(epoch, 0)
    return list(loader)


def same(first, second) -> bool:
    return len(first) == len(second) and all(
        torch.equal(a["im"], b["im"]) and torch.equal(a["segmentation"], b["segmentation"])
        for a, b in zip(first, second)
    )


def test_per_process_batch_size():
    assert per_process_batch_size(8, 2) == 4
    assert per_process_batch_size(8, 1) == 8
    with pytest.raises(ValueError, match="world batch size 8 does not divide across 3 processes"):
        per_process_batch_size(8, 3)


def test_sampler_is_a_function_of_seed_and_epoch(train_set):
    def pairs(epoch: int, seed: int = 0, **kwargs) -> list[tuple[int, int]]:
        sampler = EpochSampler(train_set, seed=seed, **kwargs)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert pairs(0) == pairs(0)
    assert pairs(0) != pairs(1)
    assert pairs(0) != pairs(0, seed=1)
    assert sorted(index for index, _ in pairs(3)) == list(range(6))
    assert [index for index, _ in pairs(0, shuffle=False)] == list(range(6))


def test_distributed_partition_covers_the_epoch(train_set):
    parts = []
    for rank in range(4):
        sampler = EpochSampler(train_set, num_replicas=4, rank=rank, seed=5)
        sampler.set_epoch(2)
        parts.append(list(sampler))
    assert all(len(part) == 2 for part in parts)
    indices = [index for part in parts for index, _ in part]
    seeds = [seed for part in parts for _, seed in part]
    assert set(indices) == set(range(6)) and len(set(seeds)) == 8


def test_epochs_do_not_depend_on_workers(train_set):
    single = create_loader(train_set, 3, num_workers=0, seed=2)
    workers = create_loader(train_set, 3, num_workers=2, seed=2)
    for epoch in (0, 1):
        assert same(batches(single, epoch), batches(workers, epoch))
    assert not same(batches(single, 0), batches(single, 1))
    fresh = create_loader(train_set, 3, num_workers=2, seed=2)
    assert same(batches(fresh, 1), batches(single, 1))


def test_train_batches_have_the_reference_shapes(train_set):
    batch = next(iter(create_loader(train_set, 2)))
    assert batch["im"].shape == (2, 3, 32, 32) and batch["im"].dtype == torch.float32
    assert batch["segmentation"].shape == (2, 32, 32) and batch["segmentation"].dtype == torch.int64


def test_val_loader_keeps_the_order_and_the_views():
    val = create_dataset("synthetic", "val", max_images=3, multiscale=True)
    loader = create_loader(val, 1)
    items = list(loader)
    assert [item["filename"] for item in items] == ["val_000000.jpg", "val_000001.jpg", "val_000002.jpg"]
    assert len(items[0]["im"]) == 12 and items[0]["im"][0].shape == (1, 3, 64, 64)
    assert items[0]["gt"].shape == (128, 128) and items[0]["ori_shape"] == (128, 128)
    with pytest.raises(ValueError, match="batch_size=1"):
        create_loader(val, 2)
    with pytest.raises(ValueError, match="batch_size=1"):
        collate_val([val[0], val[1]])


def test_distributed_needs_a_process_group(train_set):
    with pytest.raises(ValueError, match="process group"):
        create_loader(train_set, 2, distributed=True)


def test_pin_memory_follows_cuda(train_set):
    assert create_loader(train_set, 2).pin_memory == torch.cuda.is_available()
    assert create_loader(train_set, 2, pin_memory=False).pin_memory is False
