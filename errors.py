"""The one-line form of an exception, for the one-line errors the scripts print
(cli.exit_with_error)."""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The first non-empty line of ``str(error)``, or the exception's type name where it has
    no message (libraries often put details, tracebacks or advice on later lines)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
