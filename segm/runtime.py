"""How a model runs: the autocast dtype by name (``--dtype``, ``--amp``), the compiled path (``--compile``) and
how freed CPU memory is kept for reuse.

Autocast wraps the whole forward of every patch type; the merge decisions inside stay fp32
(``tokred.precision``). ``compile_model`` wraps a model in ``torch.compile``: merge counts that depend
on the image (ALGM's thresholds, ACT's clusters, Expedite's ties) are read with ``int(tensor)``, where
the graph breaks, and the graphs after such a break see a token dimension that changes from image to
image. Automatic dynamic shapes recompile those graphs once, with that dimension symbolic, the first
time it changes; after that no image triggers a compilation.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from typing import Callable

import torch
import torch._dynamo
import torch.nn as nn

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: torch.device, enabled: bool, dtype: torch.dtype | None
                     ) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts (or no-ops when AMP is off)."""
    if not enabled:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def dtype_autocast(device: torch.device, name: str) -> Callable[[], contextlib.AbstractContextManager]:
    """The autocast context factory of a ``--dtype`` name (a no-op one for fp32)."""
    dtype = DTYPES[name]
    return autocast_context(device, dtype is not None, dtype)


RECOMPILE_LIMIT = 64  # graphs kept per function: a static and a dynamic one for every block that breaks


def compile_model(model: nn.Module, backend: str | Callable = "inductor") -> nn.Module:
    """``model`` compiled with automatic dynamic shapes; attributes and parameters read through to ``model``.

    The frames after a graph break (``run_block`` and the methods' reduction steps) are shared by every
    block and specialise on it, so each may hold two graphs per breaking block; the recompile limit
    is raised to ``RECOMPILE_LIMIT`` so that none silently falls back to eager. Patching the model
    afterwards (another patch type) is seen by the compiled one: its guards fail and it compiles the
    new forward once, keeping the earlier graphs for when the first patch type returns.
    """
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(model, backend=backend, dynamic=None)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters
KEPT_TOP_BYTES = 2**31 - 1  # free memory at the top of the heap beyond this goes back to the OS
USER_TUNABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed CPU memory for the next allocation; whether it was applied.

    By default glibc unmaps every freed block above its mmap threshold (at most 32 MB), so each forward
    page-faults its large tensors anew: the class masks upsampled for a 512 x 512 batch of 2 alone are
    315 MB, about 80 000 faults per forward of ViT-S on CPU (``benchmarks/cpu_memory.py``). Serving all
    blocks from the heap and not trimming it does for the CPU what CUDA's caching allocator does for the
    GPU; the process keeps its peak memory instead. Nothing changes outside glibc, or when the environment
    sets glibc's own tunables for this (any of ``USER_TUNABLES``: setting one opts out).
    """
    if platform.libc_ver()[0] != "glibc" or any(name in os.environ for name in USER_TUNABLES):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEPT_TOP_BYTES))
