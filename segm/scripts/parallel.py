"""Running a per-file conversion over many files, in worker processes, with a progress bar."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from multiprocessing import Pool
from typing import TypeVar

from tqdm import tqdm

Item = TypeVar("Item")


def run_parallel(function: Callable[[Item], None], items: Sequence[Item], nproc: int, desc: str) -> None:
    """Apply ``function`` to every item with ``nproc`` processes (in this process when ``nproc`` <= 1)."""
    progress = tqdm(total=len(items), desc=desc, disable=not sys.stderr.isatty())
    with progress:
        if nproc <= 1:
            for item in items:
                function(item)
                progress.update()
            return
        with Pool(nproc) as pool:
            for _ in pool.imap_unordered(function, items, chunksize=8):
                progress.update()
