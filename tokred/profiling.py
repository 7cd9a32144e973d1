"""Named profiler ranges around token-reduction bookkeeping (matching, merging, clustering, unmerging).

``section("merge")`` is ``torch.profiler.record_function("tokred::merge")`` while a profiler runs and a
no-op otherwise, so the forward pays nothing for it; under a profiler the ranges give the share of a
forward spent on reduction bookkeeping rather than on the model's own layers.
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd import profiler

PREFIX = "tokred::"
_IDLE = contextlib.nullcontext()


def section(name: str, prefix: str = PREFIX) -> contextlib.AbstractContextManager:
    """A profiler range named ``<prefix><name>`` (``tokred::<name>``) when a profiler is recording, else a
    no-op context; callers outside the bookkeeping pass their own prefix (``segm::upsample``)."""
    if not profiler._is_profiler_enabled:
        return _IDLE
    return torch.profiler.record_function(prefix + name)
