"""The command lines' one boundary for errors: one line on stderr and the error's exit code.

Both ``deltaship-publish`` and ``deltaship-agent`` wrap every command with
:func:`exit_on_errors`: a :class:`~manifest.errors.DeltashipError` (whose fault it is, and what
to do) becomes ``PROG: error: MESSAGE`` and its ``exit_code``; a full disk met outside the
code that translates it becomes a :class:`~manifest.errors.DiskFullError`, a local path that
cannot be written or read (permission, read-only file system, a file where a directory should
be) a :class:`~manifest.errors.LocalError`; Ctrl-C exits 130. Anything else is a bug and keeps
its traceback. Bad flags (click's usage errors) are one line too (:class:`OneLineGroup`), and
both ``--help`` texts end with the one table of exit codes (:func:`exit_codes_help`).
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from .errors import EXIT_CODES, DeltashipError, LocalError, disk_full

__all__ = ["OneLineGroup", "exit_codes_help", "exit_on_errors"]

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
                if full is not None:
                    fail(full)
                local = _local_path_error(e)
                if local is None:
                    raise
                fail(local)
            except KeyboardInterrupt:
                click.echo(f"{prog}: interrupted", err=True)
                sys.exit(130)

        return wrapper  # type: ignore[return-value]

    return decorate


# A local path the user must fix; translated only when the error names the path.
_LOCAL_PATH_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR)


def _local_path_error(e: OSError) -> LocalError | None:
    if e.errno not in _LOCAL_PATH_ERRNOS or not e.filename:
        return None
    return LocalError(f"{e.filename}: {e.strerror}: check the path and its permissions")


def exit_codes_help(notes: str = "") -> str:
    """The exit-code table of :data:`manifest.errors.EXIT_CODES` for a command's ``--help``."""
    rows = "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items())
    return f"\b\nExit codes:\n{rows}\n\n{notes}{' ' if notes else ''}Details: docs/ERRORS.md."


class OneLineGroup(click.Group):
    """A command group whose usage errors (a bad or missing flag) are one line, like the
    others: ``PROG: error: MESSAGE (see `PROG COMMAND --help`)``, exit 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("standalone_mode", True) is False:
            return super().main(*args, **kwargs)
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as e:  # a group alone: its help, as is
            click.echo(e.format_message(), err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            prog = (e.ctx.find_root().info_name if isinstance(e, click.UsageError) and e.ctx
                    else None) or kwargs.get("prog_name") or os.path.basename(sys.argv[0])
            see = (f" (see `{e.ctx.command_path} --help`)"
                   if isinstance(e, click.UsageError) and e.ctx else "")
            click.echo(f"{prog}: error: {e.format_message()}{see}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
