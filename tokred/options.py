"""Typed, validated options of the patch types, declared once and used by the Python API and the CLIs.

An ``Option`` names a keyword of a method, its default, a one-line help and a ``check`` that turns a
value into its canonical form or raises a one-line ``UsageError`` naming the option, the value and the
valid range. The command-line layer reads ``nargs`` / ``value_type`` / ``flag`` to build its flags and
``from_cli`` to turn the parsed values into the Python value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable, Sequence

from tokred.errors import UsageError


@dataclass(frozen=True)
class Option:
    """One keyword option of a patch type.

    ``nargs`` is how many command-line values it takes (1, 2 or ``"+"`` for one or more); ``value_type``
    the type of each (``int``, ``float``, ``str`` or ``bool`` for an on/off flag); ``flag`` overrides the
    generated ``--<patch-type>-<name>``; ``choices`` restricts a ``str``; ``from_cli`` maps the parsed
    command-line value to the Python value (default: a 1-value option is its value, others a list);
    ``measure_default``, when set, replaces the default in FLOP counts and benchmarks (a fixed seed);
    ``derived`` marks an option computed from the others and only checked when given, so a recorded
    value is not reused as a base that other options then contradict.
    """

    name: str
    default: Any
    help: str
    check: Callable[[Any], Any]
    value_type: type = float
    nargs: int | str = 1
    flag: str | None = None
    choices: tuple[str, ...] | None = None
    from_cli: Callable[[Any], Any] | None = None
    measure_default: Any = None
    derived: bool = False

    def cli_value(self, parsed: Any) -> Any:
        """The Python value of what the command line parsed for this option."""
        if self.from_cli is not None:
            return self.from_cli(parsed)
        return list(parsed) if self.nargs != 1 else parsed


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A finite real number that is not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def integer(name: str, low: int | None = None, high: int | None = None) -> Callable[[Any], int]:
    """A check for an int in ``[low, high]`` (either bound may be open-ended)."""
    span = f"in {low}..{high}" if low is not None and high is not None else (f">= {low}" if low is not None else f"<= {high}")

    def check(value: Any) -> int:
        if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
            raise UsageError(f"{name} must be an integer {span}, got {value!r}")
        return int(value)

    return check


def real(name: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[Any], float]:
    """A check for a finite number in an interval written like ``(0, 1]``."""
    span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(value: Any) -> float:
        ok = is_real(value)
        if ok:
            ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not ok:
            raise UsageError(f"{name} must be a number in {span}, got {value!r}")
        return float(value)

    return check


def boolean(name: str) -> Callable[[Any], bool]:
    """A check for ``True`` / ``False``."""

    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise UsageError(f"{name} must be True or False, got {value!r}")
        return value

    return check


def one_of(name: str, choices: Sequence[str], allow_none: bool = False) -> Callable[[Any], str | None]:
    """A check for one of a few names (or ``None`` when allowed)."""

    def check(value: Any) -> str | None:
        if value is None and allow_none:
            return None
        if value not in choices:
            raise UsageError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        return value

    return check


def block_numbers(name: str, allow_none: bool = False) -> Callable[[Any], list[int] | None]:
    """A check for a non-empty, strictly increasing list of block numbers; ``check_depth`` checks the range."""

    def check(value: Any) -> list[int] | None:
        if value is None and allow_none:
            return None
        layers = list(value) if isinstance(value, (list, tuple)) else None
        if not layers or not all(is_int(i) for i in layers):
            raise UsageError(f"{name} must be a non-empty list of block numbers counted from 1, got {value!r}")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise UsageError(f"{name} must be strictly increasing, got {layers}")
        return [int(i) for i in layers]

    return check


def check_depth(name: str, layers: Sequence[int], depth: int) -> None:
    """Raise unless every 1-based block number of ``layers`` exists in an encoder of ``depth`` blocks."""
    if layers and (min(layers) < 1 or max(layers) > depth):
        raise UsageError(f"{name} {list(layers)} out of range: blocks are numbered 1..{depth}")
