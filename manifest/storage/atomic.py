"""Atomic, durable writes of local files (huggingface_hub's ``_download_to_tmp_and_move``).

A unique temp file in the same directory, write, fsync, ``os.replace``, fsync the directory,
clean up in ``finally``: a reader (or a crash) sees the old content or the new, never a mix.
A full disk or quota raises :class:`manifest.errors.DiskFullError`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from ..errors import disk_errors

__all__ = ["atomic_output", "fsync_dir", "write_atomic"]


def fsync_dir(d: str | os.PathLike[str]) -> None:
    """Make a rename or a new name in directory ``d`` durable."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], mode: int = 0o644) -> Iterator[BinaryIO]:
    """A file to write that appears at ``path`` (fsynced, ``mode``) only if the block succeeds."""
    path = os.fspath(path)
    d = os.path.dirname(path) or "."
    with disk_errors(d):
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fchmod(f.fileno(), mode)
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = ""
            fsync_dir(d)
        finally:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically and durably."""
    with atomic_output(path, mode) as f:
        f.write(data)
