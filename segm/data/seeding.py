"""Seeds derived from integer keys, so that every random draw is a pure function of (seed, epoch, index...).

No global random state is read or written: a sample's augmentations come from a
``torch.Generator`` seeded with :func:`derive_seed`, which makes runs reproducible regardless
of the number of loader workers or whether they are persistent.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of the non-negative integer ``keys`` (SeedSequence hashing)."""
    if any(key < 0 for key in keys):
        raise ValueError(f"seed keys must be non-negative integers, got {keys}")
    state = np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def generator(*keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``keys``."""
    return torch.Generator().manual_seed(derive_seed(*keys))
