"""Crash-safe checkpoint files (written to a temporary file in the same folder, flushed, then renamed),
the random states an exact resume restores, and the run folder they go to."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segm.utils import distributed
from tokred.errors import UsageError


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` so that a crash never leaves a truncated file under that name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def rng_states() -> dict[str, Any]:
    """The random states of torch (CPU and CUDA), numpy and Python, for an exact resume.

    Held as tensors, tuples and numbers only, so that checkpoints stay loadable with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what ``rng_states`` returned (CUDA states only where CUDA is available)."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def gather_rng_states(env: distributed.DistEnv) -> list[Any]:
    """Random states of every process (index = rank), for an exact resume."""
    if not env.distributed:
        return [rng_states()]
    states: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(states, rng_states())
    return states


def prepare_log_dir(log_dir: Path) -> None:
    """Create ``log_dir`` and make sure files can be written there."""
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        probe = log_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"--log-dir {log_dir} is not writable ({err.strerror}); choose another folder") from None
