"""The command lines' one boundary for errors: one line on stderr and the error's exit code.

Both ``deltaship-publish`` and ``deltaship-agent`` wrap every command with
:func:`exit_on_errors`: a :class:`~manifest.errors.DeltashipError` (whose fault it is, and what
to do) becomes ``PROG: error: MESSAGE`` and its ``exit_code``; a full disk met outside the
code that translates it becomes a :class:`~manifest.errors.DiskFullError`; Ctrl-C exits 130.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from .errors import DeltashipError, disk_full

__all__ = ["exit_on_errors"]

F = TypeVar("F", bound=Callable[..., Any])


def exit_on_errors(prog: str) -> Callable[[F], F]:
    """Decorate a click command so expected failures are one line and an exit code."""

    def fail(error: DeltashipError) -> NoReturn:
        click.echo(f"{prog}: error: {error}", err=True)
        sys.exit(error.exit_code)

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except DeltashipError as e:
                fail(e)
            except OSError as e:
                full = disk_full(e, e.filename or "the working directory")
                if full is None:
                    raise
                fail(full)
            except KeyboardInterrupt:
                click.echo(f"{prog}: interrupted", err=True)
                sys.exit(130)

        return wrapper  # type: ignore[return-value]

    return decorate
