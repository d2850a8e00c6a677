"""A download's partial file: appended to in blocks by worker threads, kept across restarts.

A block is written when it reaches :data:`BLOCK` bytes or :data:`FLUSH_SECONDS` after the last
write, so a killed agent loses at most that much of a download, also on a slow link. Failures
of the local disk are :class:`~manifest.errors.DiskFullError` or
:class:`~manifest.errors.LocalError` naming the file.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from ..errors import LocalError, disk_full

__all__ = ["BLOCK", "FLUSH_SECONDS", "PartialFile", "fsync_file", "size_of"]

BLOCK = 1024 * 1024  # bytes gathered before a write to the partial file
FLUSH_SECONDS = 0.5  # ...or seconds since the last write (slow links)


class PartialFile:
    """A download's partial file, cut at ``start`` and appended to in blocks by a thread."""

    def __init__(self, path: Path, start: int) -> None:
        self.path = path
        self.size = start
        self._buf = bytearray()
        self._fd = -1
        self._flushed = time.monotonic()

    async def __aenter__(self) -> PartialFile:
        self._fd = await asyncio.to_thread(_open_at, self.path, self.size)
        return self

    async def append(self, chunk: bytes) -> None:
        self._buf += chunk
        self.size += len(chunk)
        if len(self._buf) >= BLOCK or time.monotonic() - self._flushed >= FLUSH_SECONDS:
            await self._flush()

    async def _flush(self) -> None:
        self._flushed = time.monotonic()
        data, self._buf = self._buf, bytearray()
        if data:
            await asyncio.to_thread(_write_all, self._fd, data, self.path)

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._flush()  # keep what arrived, also when the transfer failed
        finally:
            os.close(self._fd)


def _disk_error(e: OSError, path: Path) -> LocalError:
    return disk_full(e, path) or LocalError(f"cannot write {path}: {e.strerror or e}")


def _open_at(path: Path, start: int) -> int:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError as e:
        raise _disk_error(e, path) from e
    try:
        os.ftruncate(fd, start)
        os.lseek(fd, start, os.SEEK_SET)
    except OSError as e:
        os.close(fd)
        raise _disk_error(e, path) from e
    return fd


def _write_all(fd: int, data: bytearray, path: Path) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        raise _disk_error(e, path) from e


def fsync_file(path: Path) -> None:
    """Make ``path`` durable; creates it empty if missing (a zero-length object)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise _disk_error(e, path) from e


def size_of(path: Path) -> int:
    """The length of the partial file, 0 if there is none."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
