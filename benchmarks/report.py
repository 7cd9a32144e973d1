"""Output of the benchmark scripts: a Markdown report printed, and written to a file when asked."""

from __future__ import annotations

from pathlib import Path

import click


def emit(text: str, out: Path | None) -> None:
    """Print ``text`` and, with ``out``, write it there (creating the folder)."""
    click.echo(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text.rstrip("\n") + "\n")
