"""Click options shared by every command (declared once here) and the command class that parses them.

``--selected-layers`` takes one or more integers (``--selected-layers 1 5``), as the reference's
commands do; ``Command`` rewrites such runs into repeated options before click parses them.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Sequence

import click

from segm.model.token_reduction import PATCH_TYPES, apply_token_reduction

MULTI_VALUE_OPTIONS = ("--selected-layers",)


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def expand_multi_value_options(args: Sequence[str], names: Sequence[str] = MULTI_VALUE_OPTIONS) -> list[str]:
    """``--opt 1 5 7`` -> ``--opt 1 --opt 5 --opt 7`` for the given option names."""
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        out.append(token)
        i += 1
        if token in names and i < len(args):
            out.append(args[i])
            i += 1
            while i < len(args) and _is_int(args[i]):
                out.extend([token, args[i]])
                i += 1
    return out


class Command(click.Command):
    """A click command accepting several values after ``--selected-layers``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_multi_value_options(args))


def compose(*decorators: Callable) -> Callable:
    """Apply several click decorators in the order they are listed (top first, as when stacked)."""

    def wrap(func: Callable) -> Callable:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return wrap


algm_options = compose(
    click.option("--selected-layers", type=int, multiple=True,
                 help="Blocks (from 1) where tokens are merged, e.g. --selected-layers 1 5; the first runs "
                      "CLAP, the others GBM. Default: 1 5 (1 7 for 24-block encoders)."),
    click.option("--merging-window-size", type=int, nargs=2, default=(2, 2), show_default=True,
                 help="CLAP window (height width) in patches."),
    click.option("--threshold", type=float, default=0.88, show_default=True,
                 help="CLAP cosine-similarity threshold."),
)

token_reduction_options = compose(
    click.option("--patch-type", type=click.Choice(PATCH_TYPES), default="pure", show_default=True,
                 help="Token reduction applied to the encoder."),
    algm_options,
)


def apply_token_reduction_options(model: Any, options: dict[str, Any], trace_source: bool = False) -> list[int] | None:
    """Patch ``model`` from the values of ``token_reduction_options``; returns the selected layers used."""
    return apply_token_reduction(
        model,
        options["patch_type"],
        selected_layers=options["selected_layers"] or None,
        window_size=options["merging_window_size"],
        threshold=options["threshold"],
        trace_source=trace_source,
    )


def fail_cleanly(func: Callable) -> Callable:
    """Turn errors a user can cause (bad paths, names, shapes) into one ``error:`` line and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (FileNotFoundError, ValueError, ConnectionError) as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)

    return wrapper


def resolve_device(name: str | None) -> "torch.device":
    """``cuda`` when available and nothing is asked, else the request; CUDA asked but absent is an error."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was requested but CUDA is not available on this machine; use --device cpu")
    return device


device_option = click.option(
    "--device", type=str, default=None, help="cuda, cuda:N or cpu (default: cuda when available, else cpu)."
)
root_option = click.option(
    "--root", type=click.Path(path_type=str), default=None, help="Dataset root (overrides $DATASET)."
)
