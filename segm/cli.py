"""Click options shared by every command (declared once here), the token-reduction options generated from
the registry of patch types, and the command class that parses them.

Every option of every patch type becomes a flag, ``--<patch-type>-<option>`` (``--tome-r 8``,
``--tome-prop-attn/--no-tome-prop-attn``) unless the method names its own (ALGM keeps the reference's
``--selected-layers``, ``--merging-window-size`` and ``--threshold``). Options that take several values
accept them after one flag (``--selected-layers 1 5``, ``--tome-r 16 -1.0``): ``Command`` rewrites such
runs into repeated options before click parses them. A flag of a method other than the selected one
is an error. Without ``--patch-type``, a command on a checkpoint uses the patch type and settings that
its ``variant.yml`` records.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import click
import torch

from segm.model.token_reduction import PATCH_TYPES, apply_token_reduction, measurement_options, variant_token_reduction
from segm.runtime import DTYPES, keep_freed_memory
from tokred.errors import UsageError
from tokred.options import Option

NUMBER = re.compile(r"^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


@dataclass(frozen=True)
class ReductionFlag:
    """One command-line flag of a patch-type option: its method, option, flag text and click parameter name."""

    patch_type: str
    option: Option

    @property
    def flag(self) -> str:
        return self.option.flag or f"--{self.patch_type}-{self.option.name}".replace("_", "-")

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    def click_option(self) -> Callable:
        """The click decorator of this flag; its value is ``None`` (or empty) when not given."""
        option = self.option
        default = option.default if not isinstance(option.default, (list, tuple)) else " ".join(map(str, option.default))
        text = f"[{self.patch_type}] {option.help}" + ("" if option.default is None else f" (default: {default})")
        if option.value_type is bool:
            return click.option(f"{self.flag}/--no-{self.flag[2:]}", self.dest, default=None, help=text)
        kind = click.Choice(option.choices) if option.choices else option.value_type
        if option.nargs == "+":
            return click.option(self.flag, self.dest, type=kind, multiple=True, help=text)
        return click.option(self.flag, self.dest, type=kind, nargs=option.nargs, default=None, help=text)


def reduction_flags(patch_types: Iterable[str] | None = None) -> list[ReductionFlag]:
    """The flags of every option of the given patch types (default: all registered)."""
    names = list(PATCH_TYPES) if patch_types is None else list(patch_types)
    return [ReductionFlag(name, option) for name in names for option in PATCH_TYPES[name].options]


def multi_value_flags() -> tuple[str, ...]:
    """Flags that take one or more values after a single flag."""
    return tuple(f.flag for f in reduction_flags() if f.option.nargs == "+")


def expand_multi_value_options(args: Sequence[str], names: Sequence[str] | None = None) -> list[str]:
    """``--opt 1 5 7`` -> ``--opt=1 --opt=5 --opt=7`` for the given flags (default: every multi-value flag).

    Numbers following such a flag (negative ones included) are its values.
    """
    names = multi_value_flags() if names is None else names
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token in names and i < len(args):
            out.append(f"{token}={args[i]}")
            i += 1
            while i < len(args) and NUMBER.match(args[i]):
                out.append(f"{token}={args[i]}")
                i += 1
        else:
            out.append(token)
    return out


class Command(click.Command):
    """A click command accepting several values after a multi-value flag (``--selected-layers 1 5``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_multi_value_options(args))


def compose(*decorators: Callable) -> Callable:
    """Apply several click decorators in the order they are listed (top first, as when stacked)."""

    def wrap(func: Callable) -> Callable:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return wrap


def method_options(patch_type: str, names: Sequence[str] | None = None) -> Callable:
    """The click options of one patch type (all, or those named), e.g. ALGM's for a tool that reads them."""
    flags = [f for f in reduction_flags([patch_type]) if names is None or f.option.name in names]
    return compose(*(f.click_option() for f in flags))


def patch_type_help() -> str:
    return "Token reduction applied to the encoder: " + "; ".join(
        f"{name}: {cls.summary}" for name, cls in PATCH_TYPES.items()
    ) + ". Default: the one variant.yml records, else pure."


token_reduction_options = compose(
    click.option("--patch-type", type=click.Choice(list(PATCH_TYPES)), default=None, help=patch_type_help()),
    *(f.click_option() for f in reduction_flags()),
)


@dataclass
class ReductionRequest:
    """What a command line asked of token reduction: ``--patch-type`` (or None) and the method flags given."""

    patch_type: str | None
    given: dict[str, dict[str, Any]]
    flags: dict[str, list[str]]

    def settings_for(self, patch_type: str, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Options of ``patch_type``: ``base`` (e.g. a variant's settings) updated with the flags given."""
        return {**(base or {}), **self.given.get(patch_type, {})}

    def refuse_flags_outside(self, patch_types: Sequence[str], reason: str) -> None:
        """A ``UsageError`` naming every given flag that belongs to none of ``patch_types``."""
        stray = [(name, flag) for name, flags in self.flags.items() if name not in patch_types for flag in flags]
        if stray:
            listed = ", ".join(f"{flag} (an option of --patch-type {name})" for name, flag in stray)
            raise UsageError(f"{listed} given, but {reason}")


def reduction_request(opts: dict[str, Any]) -> ReductionRequest:
    """Take ``--patch-type`` and every generated flag out of a command's ``opts`` (in place)."""
    request = ReductionRequest(opts.pop("patch_type", None), {}, {})
    for flag in reduction_flags():
        value = opts.pop(flag.dest, None)
        if value is None or value == ():
            continue
        request.given.setdefault(flag.patch_type, {})[flag.option.name] = flag.option.cli_value(value)
        request.flags.setdefault(flag.patch_type, []).append(flag.flag)
    return request


def format_settings(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "no options"


def resolve_reduction(
    request: ReductionRequest, variant: Mapping[str, Any] | None = None, fallback: str = "pure"
) -> tuple[str, dict[str, Any], bool]:
    """``(patch type, options, from_variant)``: ``--patch-type`` if given, else the variant's, else ``fallback``.

    With the variant's patch type, its recorded settings are the base that given flags override.
    """
    recorded = variant_token_reduction(variant) if variant is not None else None
    if request.patch_type is not None:
        patch_type, base, from_variant = request.patch_type, {}, False
    elif recorded is not None:
        patch_type, base, from_variant = recorded[0], recorded[1], True
    else:
        patch_type, base, from_variant = fallback, {}, False
    source = " (recorded in variant.yml; --patch-type chooses another)" if from_variant else ""
    request.refuse_flags_outside([patch_type], f"the patch type is {patch_type}{source}")
    return patch_type, request.settings_for(patch_type, base), from_variant


def apply_requested_reduction(
    model: Any, request: ReductionRequest, variant: Mapping[str, Any] | None = None,
    trace_source: bool = False, announce: bool = True, measuring: bool = False,
) -> tuple[str, dict[str, Any]]:
    """Resolve and apply the token reduction a command asked for; returns the patch type and its settings.

    When the settings come from ``variant.yml``, one line on stderr says which are used. ``measuring``
    fixes the options that have a measurement default (a seed) unless given, and says so.
    """
    patch_type, options, from_variant = resolve_reduction(request, variant)
    fixed: dict[str, Any] = {}
    if measuring:
        options, fixed = measurement_options(patch_type, options)
    settings = apply_token_reduction(model, patch_type, trace_source=trace_source, **options)
    if from_variant and announce and patch_type != "pure":
        click.echo(f"note: using the patch type recorded in variant.yml: {patch_type} ({format_settings(settings)}); "
                   "--patch-type chooses another", err=True)
    if fixed and announce:
        flags = {f.option.name: f.flag for f in reduction_flags([patch_type])}
        click.echo("note: " + ", ".join(f"{name} fixed at {value}" for name, value in fixed.items())
                   + " so that the measurement is reproducible (" + ", ".join(flags[n] for n in fixed)
                   + " chooses another)", err=True)
    return patch_type, settings


def fail_cleanly(func: Callable) -> Callable:
    """Turn errors a user can cause (bad paths, options, checkpoints) into one ``error:`` line and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (UsageError, FileNotFoundError, ConnectionError) as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)

    return wrapper


def refuse_overwriting(reads: Iterable[Path], writes: Iterable[Path], what: str) -> None:
    """A ``UsageError`` when a file a command would write is one it reads (compared after resolving links)."""
    inputs = {Path(p).resolve(): Path(p) for p in reads}
    for path in writes:
        if Path(path).resolve() in inputs:
            raise UsageError(f"{what} would overwrite the input file {inputs[Path(path).resolve()]}; "
                             "choose another output")


def resolve_device(name: str | None) -> torch.device:
    """``cuda`` when available and nothing is asked, else the request; CUDA asked but absent is an error.

    A CPU run keeps freed memory for reuse (``segm.runtime.keep_freed_memory``).
    """
    if name is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UsageError(f"--device {name} is not a device; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {name} was requested but CUDA is not available on this machine; "
                             "use --device cpu")
    if device.type == "cpu":
        keep_freed_memory()
    return device


POSITIVE = click.IntRange(1)
PROBABILITY = click.FloatRange(0, 1)

window_options = compose(
    click.option("--window-size", type=POSITIVE, default=None,
                 help="Sliding window of the evaluation (default: the training crop; SegFormer on Cityscapes 1024)."),
    click.option("--window-stride", type=POSITIVE, default=None,
                 help="Sliding-window stride (default: the model family's published one for the dataset)."),
)


def window_batch_option(default: int) -> Callable:
    """``--window-batch-size``: windows per forward (adaptive merge counts are a minimum over each group)."""
    return click.option("--window-batch-size", type=POSITIVE, default=default, show_default=True,
                        help="Windows per forward; adaptive merge counts (ALGM) are a minimum over each group.")


def dtype_option(what: str) -> Callable:
    """``--dtype fp32|bf16|fp16``: the autocast dtype of ``what`` (merge decisions stay fp32)."""
    return click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="fp32", show_default=True,
                        help=f"Autocast dtype of {what}; merge decisions stay fp32.")


compile_option = click.option(
    "--compile", "compiled", is_flag=True, default=False,
    help="Run the model through torch.compile (dynamic token counts; the first forwards compile).",
)
device_option = click.option(
    "--device", type=str, default=None, help="cuda, cuda:N or cpu (default: cuda when available, else cpu)."
)
root_option = click.option(
    "--root", type=click.Path(path_type=str), default=None, help="Dataset root (overrides $DATASET)."
)
