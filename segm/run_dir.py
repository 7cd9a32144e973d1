"""A training run's folder: owned by one run at a time, never wiped, and checked before any work starts.

- ``RunLock``: an exclusive OS file lock on ``<log dir>/.lock`` (``fcntl.flock``), released on any exit,
  so a lock left by a dead process is free again; a second run on the folder stops at once, naming the
  holder's PID and host.
- ``move_aside``: ``--overwrite`` moves the files of an earlier run (or an evaluation's earlier images) to
  ``old-<timestamp>/``, never deletes.
- ``remove_stale_temporaries``: partial checkpoint files of processes that died while writing.
- ``check_free_space``: room for two checkpoints (the estimate is the model and optimizer state).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

from tokred.errors import UsageError

LOCK_NAME = ".lock"
RUN_FILES = ("checkpoint.pth", "best_checkpoint.pth", "log.txt", "variant.yml")


class RunLock:
    """Exclusive ownership of a run folder for the life of the process (or until ``release``)."""

    def __init__(self, log_dir: Path):
        self.path = log_dir / LOCK_NAME
        self.handle = None

    def acquire(self) -> "RunLock":
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "an unknown process"
            handle.close()
            raise UsageError(f"{self.path.parent} is in use by another training run ({holder}); wait for it to "
                             "finish or choose another --log-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def earlier_run_files(log_dir: Path, names: tuple[str, ...] = RUN_FILES) -> list[Path]:
    """The entries ``names`` (by default an earlier run's files) that exist in ``log_dir``."""
    return [log_dir / name for name in names if (log_dir / name).exists()]


def move_aside(log_dir: Path, names: tuple[str, ...] = RUN_FILES) -> Path | None:
    """Move the entries ``names`` (by default an earlier run's files) of ``log_dir`` into ``old-<timestamp>/``
    inside it, never deleting anything; returns that folder, or None when there was nothing to move."""
    files = earlier_run_files(log_dir, names)
    if not files:
        return None
    target = log_dir / time.strftime("old-%Y%m%d-%H%M%S")
    suffix = 1
    while target.exists():
        target = log_dir / f"{target.name.split('.')[0]}.{suffix}"
        suffix += 1
    target.mkdir()
    for path in files:
        shutil.move(str(path), target / path.name)
    return target


def remove_stale_temporaries(log_dir: Path) -> list[Path]:
    """Delete partial checkpoint files (``.<name>.tmp-<pid>``) whose writer is no longer alive."""
    removed = []
    for path in log_dir.glob(".*.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_free_space(log_dir: Path, needed: int) -> None:
    """A one-line error unless ``log_dir``'s file system has ``needed`` bytes free."""
    free = shutil.disk_usage(log_dir).free
    if free < needed:
        raise UsageError(f"{log_dir} has {free / 2**20:.0f} MB free but a run needs about {needed / 2**20:.0f} MB "
                         "for two checkpoints; free some space or choose another --log-dir")
