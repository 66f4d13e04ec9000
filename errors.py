"""The project's user-error type, and the one-line form of an exception.

A `UserError` is bad input from the user: a flag, a config field, a file, a folder, a
checkpoint, an environment variable of the launch. The scripts print it as one line and exit
1 (`cli.run`). Everything else that a run raises, a ValueError from JAX, NumPy, orbax or
our own code included, is a bug: it keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user, with a one-line message naming the value and what was
    expected. A ValueError, so that callers that catch ValueError (as for argument checks of
    the library API) keep working."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of ``str(error)``, or the exception's type name where it has
    no message (libraries often put details, tracebacks or advice on later lines)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
