"""Where token reduction computes in fp32 under autocast, stated once.

The published methods take their decisions (similarities, thresholds, top-k, hashes, distances, CTS's
policy network) and ACT its centroid sums in fp32. Functions that compute such a quantity are wrapped in ``fp32_island``:
inside, autocast is off, so a matmul on fp32 inputs stays fp32 instead of being narrowed to the autocast
dtype and widened back. Everything else (tokens, sizes, index maps) keeps the dtype it flows in, so a
forward converts tensors a fixed number of times whatever the depth (``tests/test_precision.py`` counts).
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def fp32_island(fn: F) -> F:
    """Run ``fn`` with autocast off on the device of its first tensor argument (its float work stays fp32)."""
    @functools.wraps(fn)
    def island(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)
    return island  # type: ignore[return-value]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layers fed by ``x`` compute in: the autocast dtype when autocast is on for its device."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype
