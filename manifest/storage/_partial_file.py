"""A download's partial file: appended to in blocks by worker threads, kept across restarts,
hashed while it is written.

A block is written when it reaches :data:`BLOCK` bytes or :data:`FLUSH_SECONDS` after the last
write, so a killed agent loses at most that much of a download, also on a slow link. The
chunks of a block are written as they arrived (``writev``, no join) and fed to a SHA-256 in the
same worker thread, so a finished download never needs to be read again to be checked.

A download may instead be *held* (``hold_until``): its chunks are hashed as they arrive but kept
in memory, never written, and the finished object is handed to the caller as bytes (a device
then never writes, reads back and deletes a download it builds from at once: on a fresh install
that is 40 % of the bytes it would write to its flash). A held download is *spilled* to its
partial file, and goes on as a written one, as soon as it runs past ``hold_until`` (a slow
link), or when its try ends without the whole object (a broken connection, a cancellation), so
that the next try or the next run resumes it. What a SIGKILL or power loss can cost is therefore
at most :data:`HOLD_SECONDS` of a held download, or :data:`FLUSH_SECONDS` of a written one.

A partial file is never fsynced: it is checked against the length and SHA-256 the index pins
before anything parses it, so after a power loss a partial file whose bytes were lost or
garbled fails that check and is fetched again from byte 0 (:mod:`edge_agent.fetch`). Failures
of the local disk are :class:`~manifest.errors.DiskFullError` or
:class:`~manifest.errors.LocalError` naming the file.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

from ..errors import LocalError, disk_full

__all__ = ["BLOCK", "FLUSH_SECONDS", "HOLD_SECONDS", "Digest", "PartialFile", "empty_file",
           "size_of"]

BLOCK = 1024 * 1024  # bytes gathered before a write to the partial file
FLUSH_SECONDS = 0.5  # ...or seconds since the last write (slow links)
HOLD_SECONDS = 2.0  # the longest a download is held in memory before it is spilled to disk
_IOV_MAX = 512  # the most buffers given to one writev (Linux refuses more than 1024)
_READ_BLOCK = 4 * 1024 * 1024  # reading a resumed download's prefix to hash it


class Digest:
    """The SHA-256 of a partial file's first :attr:`size` bytes, kept across tries of one
    download so that the bytes already on disk are read (and hashed) once."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0

    def catch_up(self, path: Path, start: int) -> None:
        """Make the digest cover the file's first ``start`` bytes (blocking: reads what the
        digest has not seen, from disk; starts over when the file was cut below it)."""
        if start < self.size:
            self._hash, self.size = hashlib.sha256(), 0
        if start == self.size:
            return
        try:
            with open(path, "rb", buffering=0) as f:
                f.seek(self.size)
                buf = bytearray(_READ_BLOCK)
                view = memoryview(buf)
                while self.size < start:
                    n = f.readinto(view[:min(_READ_BLOCK, start - self.size)])
                    if not n:
                        raise LocalError(f"{path} is shorter than the {start} bytes it held")
                    self._hash.update(view[:n])
                    self.size += n
        except OSError as e:
            raise LocalError(f"cannot read {path}: {e.strerror or e}") from e

    def update(self, chunks: list[bytes]) -> None:
        for c in chunks:
            self._hash.update(c)
            self.size += len(c)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class PartialFile:
    """A download's partial file, cut at ``start`` and appended to in blocks by a thread;
    ``digest`` (covering at most the first ``start`` bytes) is brought up to ``start`` when it
    opens and follows every byte written.

    With ``hold_until`` (a :func:`time.monotonic` time) and ``length`` (the object's), a
    download from byte 0 is held in memory instead (see the module's docstring): when the try
    ends with all ``length`` bytes, :attr:`data` holds them and nothing was written."""

    def __init__(self, path: Path, start: int, digest: Digest,
                 hold_until: float | None = None, length: int = 0) -> None:
        self.path = path
        self.size = start
        self.digest = digest
        self.data: bytes | None = None  # the whole object, when it was held to the end
        self._chunks: list[bytes] = []
        self._pending = 0
        self._fd = -1
        self._flushed = time.monotonic()
        self._writing: asyncio.Future[None] | None = None
        self._hold_until = hold_until
        self._length = length
        # Every chunk of a held download (hashed or still pending), None once written.
        self._kept: list[bytes] | None = [] if hold_until is not None and start == 0 else None

    async def __aenter__(self) -> PartialFile:
        if self._kept is None:
            self._fd = await asyncio.to_thread(self._open)
        else:
            self.digest.catch_up(self.path, 0)  # starts over; reads nothing
        return self

    def _open(self) -> int:
        fd = _open_at(self.path, self.size)
        try:
            self.digest.catch_up(self.path, self.size)
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def append(self, chunk: bytes) -> None:
        if self._kept is not None:
            assert self._hold_until is not None
            self._kept.append(chunk)
            if time.monotonic() >= self._hold_until:
                self._chunks.append(chunk)
                self._pending += len(chunk)
                self.size += len(chunk)
                await self._spill()
                return
        self._chunks.append(chunk)  # kept as received: no copy
        self._pending += len(chunk)
        self.size += len(chunk)
        if (self._pending >= BLOCK or len(self._chunks) >= _IOV_MAX
                or time.monotonic() - self._flushed >= FLUSH_SECONDS):
            await self._flush()

    async def _flush(self) -> None:
        self._flushed = time.monotonic()
        chunks, self._chunks, self._pending = self._chunks, [], 0
        if chunks:
            # Shielded: a try ended by its pace (a timeout cancels it) leaves the write to
            # finish in its thread; __aexit__ waits for it, so writes never overlap and the
            # digest follows the file's bytes in order.
            work = self._hash if self._kept is not None else self._write
            self._writing = asyncio.ensure_future(asyncio.to_thread(work, chunks))
            await asyncio.shield(self._writing)

    def _write(self, chunks: list[bytes]) -> None:
        _write_all(self._fd, chunks, self.path)
        self.digest.update(chunks)  # only what is on disk: a failed write is read back later

    def _hash(self, chunks: list[bytes]) -> None:
        self.digest.update(chunks)  # a held download: hashed now, written only if spilled

    async def _spill(self) -> None:
        """Write what a held download holds to its partial file and go on writing."""
        await self._flush()  # every kept chunk is hashed
        kept, self._kept = self._kept, None
        assert kept is not None
        # Opened here, not in the thread: a cancellation can never leave it open unseen.
        self._fd = _open_at(self.path, 0)
        self._writing = asyncio.ensure_future(
            asyncio.to_thread(_write_all, self._fd, kept, self.path))
        await asyncio.shield(self._writing)

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self._kept is not None:
                if self._writing is not None and not self._writing.done():
                    await asyncio.wait([self._writing])  # a cancelled try's hashing
                if exc[0] is None and self.size == self._length:
                    try:
                        await self._flush()
                        self.data = await asyncio.to_thread(b"".join, self._kept)
                    except BaseException:  # cancelled while finishing: spilled like any
                        if self._writing is not None and not self._writing.done():
                            await asyncio.wait([self._writing])  # its hashing
                        await self._spill()
                        raise
                    self._kept = None
                    return
                await self._spill()  # the next try, or the next run, resumes it from disk
                return
            if self._writing is not None and not self._writing.done():
                await asyncio.wait([self._writing])  # a cancelled try's write, still running
            if self._writing is None or self._writing.exception() is None:
                await self._flush()  # keep what arrived, also when the transfer failed
            # else: the disk failed; the next try resumes from what the file holds (the
            # digest reads back the bytes it did not see).
        finally:
            fd, writing = self._fd, self._writing
            if fd < 0:
                pass  # held to the end, or a spill that could not open the file
            elif writing is not None and not writing.done():  # cancelled again meanwhile
                writing.add_done_callback(lambda _: os.close(fd))  # never a reused number
            else:
                os.close(fd)


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


def _write_all(fd: int, chunks: list[bytes], path: Path) -> None:
    """Write ``chunks`` in order, at most :data:`_IOV_MAX` buffers per ``writev`` (a spilled
    held download can be thousands of chunks: one network read each; past IOV_MAX the
    kernel refuses the whole call with EINVAL)."""
    views = [memoryview(c) for c in chunks if c]
    i = 0  # views[:i] are written
    try:
        while i < len(views):
            n = os.writev(fd, views[i:i + _IOV_MAX])
            while i < len(views) and n >= len(views[i]):
                n -= len(views[i])
                i += 1
            if n:
                views[i] = views[i][n:]
    except OSError as e:
        raise _disk_error(e, path) from e


def empty_file(path: Path) -> None:
    """Make ``path`` an empty file (a zero-length object: nothing to download)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
    except OSError as e:
        raise _disk_error(e, path) from e


def size_of(path: Path) -> int:
    """The length of the partial file, 0 if there is none."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
