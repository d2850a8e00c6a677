"""Pid files, written and read without following links or blocking.

The server writes its pid file with :func:`write_pidfile`: a new file renamed over the path,
so a symbolic link (or a FIFO) put there is replaced, never written through. The agent's
signal hook and the server's clean-up read one with :func:`read_pidfile`: opened with
``O_NOFOLLOW | O_NONBLOCK``, a regular file not writable by every user, owner and type taken
from the open descriptor, at most :data:`PIDFILE_MAX` bytes. Both block on disk I/O only: call
them off the event loop where that matters.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from manifest.storage.atomic import write_atomic

__all__ = ["PIDFILE_MAX", "PidFileRefused", "read_pidfile", "write_pidfile"]

PIDFILE_MAX = 32  # bytes read: a decimal pid and a newline fit many times over


class PidFileRefused(ValueError):
    """The path holds something a pid file must not be (the message says what)."""


def write_pidfile(path: Path, pid: int) -> None:
    """Write ``pid`` to ``path`` atomically, replacing whatever the path names (a symbolic
    link is replaced, not followed). Raises OSError."""
    write_atomic(path, f"{pid}\n".encode(), 0o644)


def read_pidfile(path: str | os.PathLike[str]) -> tuple[str, int]:
    """The stripped text of the pid file at ``path`` and the uid that owns it.

    Raises :class:`PidFileRefused` for a symbolic link, anything but a regular file, a file
    every user may write, or more than :data:`PIDFILE_MAX` bytes; OSError when it cannot be
    opened or read.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PidFileRefused("is a symbolic link (not followed)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PidFileRefused("is not a regular file")
        if st.st_mode & stat.S_IWOTH:
            raise PidFileRefused("is writable by every user")
        data = os.read(fd, PIDFILE_MAX + 1)
    finally:
        os.close(fd)
    if len(data) > PIDFILE_MAX:
        raise PidFileRefused(f"holds more than {PIDFILE_MAX} bytes")
    return data.decode("ascii", errors="replace").strip(), st.st_uid
