"""Crash-safe checkpoint files (written to a temporary file in the same folder, flushed, then renamed),
the random states an exact resume restores, and the run folder they go to."""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segm.utils import distributed
from tokred.errors import UsageError


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside ``obj`` (nested dicts, lists, tuples): about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` so that a crash never leaves a truncated file under that name.

    A full disk is one line (free and needed space); the previous file under ``path`` is left intact.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if getattr(err, "errno", None) != errno.ENOSPC and "No space left" not in str(err):
            raise
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free / 2**20
        raise UsageError(f"could not write {path.name}: no space left on device (free {free:.0f} MB, needed "
                         f"{tensor_bytes(obj) / 2**20:.0f} MB); the previous {path.name} is intact") from None
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


def gather_objects(env: distributed.DistEnv, obj: Any) -> list[Any]:
    """``obj`` of every process (index = rank); the process's own in a single-process run."""
    if not env.distributed:
        return [obj]
    gathered: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def gather_rng_states(env: distributed.DistEnv) -> list[Any]:
    """Random states of every process (index = rank), for an exact resume."""
    return gather_objects(env, rng_states())


def prepare_log_dir(log_dir: Path) -> None:
    """Create ``log_dir`` and make sure files can be written there."""
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        probe = log_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"--log-dir {log_dir} is not writable ({err.strerror}); choose another folder") from None
