"""Progress bars that appear only where someone watches: the main process, on a terminal."""

from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm import tqdm


def progress(iterable: Iterable, enabled: bool = True, **kwargs: Any) -> Iterable:
    """A tqdm bar when ``enabled`` (the main process) and stderr is a terminal; the bare iterable otherwise."""
    if not (enabled and sys.stderr.isatty()):
        return iterable
    return tqdm(iterable, dynamic_ncols=True, **kwargs)
