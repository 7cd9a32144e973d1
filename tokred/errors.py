"""The one exception type for errors a user can cause and fix (a bad option, a model a method does not fit).

Command-line entry points turn exactly these into one ``error:`` line; anything else is a bug and keeps
its traceback. It derives from ``ValueError`` so that callers catching ``ValueError`` keep working.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A mistake in what was asked (an option, a path, a model), with a message that says how to fix it."""
