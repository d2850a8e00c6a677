"""What every source of the agent's face shares: capped reads, resumable downloads, retries, rate.

A backend implements only :meth:`SourceBase._open` (GET a key from a byte on, or None for "not
modified") and, if it holds connections, :meth:`SourceBase.close`. Everything else is here:

* :meth:`SourceBase.get_small` stops reading past its cap;
* :meth:`SourceBase.fetch` appends to a partial file (:mod:`._partial_file`) and resumes it with
  ``Range: bytes=N-``; objects are content-addressed and immutable, so no ``If-Range`` is
  needed. It checks lengths, not content: it returns the SHA-256 of the finished file, computed
  while the bytes arrive (a resumed file's prefix is read once), and the caller compares it
  with the pinned one and deletes the file on a mismatch. Nothing is fsynced: a download is
  worth nothing until it matches its pin, which a file damaged by a power loss does not;
* a :class:`RetryableError` is retried with the source's :class:`RetryPolicy`, whose budget
  resets whenever the partial file grows beyond its longest length yet; once the tries are
  spent, :func:`~manifest.storage.retry.give_up` gives the final ``TransportError``;
* ``max_rate`` caps the bytes per second of all downloads of one source together;
* every try is paced (:mod:`._pace`, :class:`TransferLimits`): a try slower than ``min_rate``
  over ``rate_window`` seconds, or a document try longer than ``document_deadline``, is ended
  as a :class:`RetryableError` (the partial file keeps its bytes; a try ended as too slow does
  not count as progress for the retry budget, so a drip cannot keep it full forever);
* an answer that makes no sense for the request (304 to an unconditional GET, a body that does
  not start where it was asked to) is the store's failure of one try, a ``RetryableError``;
* a store that asks, with Retry-After, for a longer wait than the policy's ``cap`` is not
  retried within the request: the final ``TransportError`` carries the Retry-After, and the
  service waits at least that long before its next poll (:mod:`edge_agent.schedule`).

The one write of the agent's face, :meth:`SourceBase.put_small` (a device report,
docs/FORMAT.md §15), is small (at most :data:`MAX_PUT_SIZE` bytes), tried once and bounded by
a deadline: a backend implements :meth:`SourceBase._put` (a read-only source refuses it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..errors import (
    HashMismatchError,
    OversizeError,
    RangeNotSatisfiableError,
    RetryableError,
    StoreConfigError,
    TransportError,
    UntrustedDataError,
)
from ._pace import DEFAULT_LIMITS, Pace, TransferLimits
from ._partial_file import HOLD_SECONDS, Digest, PartialFile, empty_file, size_of
from .location import check_key
from .retry import RetryPolicy, RetryState, give_up

__all__ = ["MAX_PUT_SIZE", "READ_SIZE", "Body", "Sleep", "SourceBase", "TransferLimits"]

log = logging.getLogger("manifest.storage")

READ_SIZE = 1024 * 1024  # the most bytes asked of a socket or file at once
MAX_PUT_SIZE = 64 * 1024  # the most bytes put_small writes (a device report is at most 16 KiB)
T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


@dataclass
class Body:
    """An open response: where its bytes start in the object and how to read them."""

    start: int  # offset of the first byte (0 when the store ignored Range)
    total: int | None  # length of the whole object, when the store says
    etag: str | None
    read: Callable[[int], Awaitable[bytes]]  # at most n bytes; b"" at the end


class _Bandwidth:
    """A token bucket shared by all downloads of a source: ``rate`` bytes/s on average.

    Each caller takes tokens for the bytes it received and sleeps off any debt, so concurrent
    downloads share the rate. It starts empty and saves at most a quarter second of tokens.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = 0.0
        self._last = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self._tokens = min(self.rate / 4, self._tokens + (now - self._last) * self.rate) - n
        self._last = now
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)


class _TooSlow(RetryableError):
    """A try ended by its pace: too slow, or past its deadline."""


class _Try:
    """The pace of one try, and the timeout that ends it when the pace says so."""

    def __init__(self, pace: Pace, timeout: asyncio.Timeout, bandwidth: _Bandwidth | None):
        self._pace = pace
        self._timeout = timeout
        self._bandwidth = bandwidth
        self._loop = asyncio.get_running_loop()

    async def got(self, n: int) -> None:
        """``n`` body bytes arrived: move the end of the try, then apply the rate cap."""
        self._pace.received(n, self._loop.time())
        if self._bandwidth is not None:
            self._timeout.reschedule(None)  # our own cap is not the server's slowness
            t0 = self._loop.time()
            await self._bandwidth.take(n)
            self._pace.paused(self._loop.time() - t0)
        self._timeout.reschedule(self._pace.ends_at(self._loop.time()))


class SourceBase:
    """What all sources share: capped reads, resumable downloads, retries, the rate cap."""

    def __init__(self, url: str, retry: RetryPolicy, max_rate: float | None, sleep: Sleep,
                 limits: TransferLimits = DEFAULT_LIMITS):
        self.url = url
        self._retry = retry
        self._sleep = sleep
        self._bandwidth = _Bandwidth(max_rate) if max_rate else None
        # Under a rate cap, a read is at most a quarter second of it: the cap stays smooth.
        self._read_size = (max(16 * 1024, min(READ_SIZE, int(max_rate / 4))) if max_rate
                           else READ_SIZE)
        self._limits = limits

    def _open(
        self, key: str, start: int, etag: str | None
    ) -> AbstractAsyncContextManager[Body | None]:
        """GET ``key`` from byte ``start`` on; None when ``etag`` still matches (304)."""
        raise NotImplementedError

    async def close(self) -> None:
        pass

    async def _put(self, key: str, data: bytes, deadline: float) -> None:
        """Write ``data`` at ``key`` (one try; ``deadline``: seconds a blocking call may take)."""
        raise StoreConfigError(f"{self.url} is read-only for devices: reports go to an S3 or "
                               "directory store, or by POST (report_url)")

    async def put_small(self, key: str, data: bytes, deadline: float) -> None:
        """Write a small object (at most :data:`MAX_PUT_SIZE` bytes), one try, within
        ``deadline`` seconds (else a ``TransportError``)."""
        where = self._where(key)
        if len(data) > MAX_PUT_SIZE:
            raise OversizeError(f"PUT {where}: {len(data)} bytes, over the {MAX_PUT_SIZE}-byte "
                                "cap of a device's write")
        try:
            async with asyncio.timeout(deadline):
                await self._put(key, data, deadline)
        except TimeoutError as e:
            raise TransportError(f"PUT {where} took longer than its {deadline:g} s "
                                 "deadline") from e

    def _where(self, key: str) -> str:
        return f"{self.url}/{check_key(key)}"

    @asynccontextmanager
    async def _paced(self, where: str, document: bool) -> AsyncIterator[_Try]:
        """One try of a request, ended as too slow (``_TooSlow``) when its pace says so."""
        loop = asyncio.get_running_loop()
        pace = Pace(self._limits, loop.time(), document)
        timeout = asyncio.timeout_at(pace.ends_at(loop.time()))
        try:
            async with timeout:
                yield _Try(pace, timeout, self._bandwidth)
        except TimeoutError as e:
            if not timeout.expired():
                raise RetryableError(f"GET {where} timed out") from e
            raise _TooSlow(f"GET {where} {pace.verdict(loop.time())}") from e

    async def _retrying(self, attempt: Callable[[RetryState], Awaitable[T]]) -> T:
        state = RetryState(self._retry)
        while True:
            try:
                return await attempt(state)
            except RetryableError as e:
                delay = state.failed(e, e.retry_after)
                if e.retry_after is not None and e.retry_after > self._retry.cap:
                    delay = None  # the service waits that long before its next poll
                if delay is None:
                    raise give_up(e, state.failures) from e
                log.warning("%s; try %d of %d in %.1f s", e, state.failures + 1,
                            self._retry.attempts, delay)
                await self._sleep(delay)

    async def get_small(
        self, key: str, max_size: int, etag: str | None = None
    ) -> tuple[bytes | None, str | None]:
        where = self._where(key)

        async def attempt(state: RetryState) -> tuple[bytes | None, str | None]:
            async with self._paced(where, document=True) as pace, \
                    self._open(key, 0, etag) as body:
                if body is None:
                    if etag is None:
                        raise RetryableError(f"GET {where} answered 304 Not Modified to a "
                                             "request that was not conditional")
                    return None, etag
                if body.start != 0:
                    raise RetryableError(f"GET {where} asked for the whole document and got "
                                         f"bytes {body.start}-")
                if body.total is not None and body.total > max_size:
                    raise OversizeError(f"{where} is {body.total} bytes, over its "
                                        f"{max_size}-byte cap")
                data = bytearray()
                while chunk := await body.read(min(self._read_size, max_size + 1 - len(data))):
                    data += chunk
                    if len(data) > max_size:
                        raise OversizeError(f"{where} is larger than its {max_size}-byte cap")
                    await pace.got(len(chunk))
            # Stores without ETags (directories, some servers) get one from the content.
            tag = body.etag or hashlib.sha256(data).hexdigest()
            return (None, tag) if tag == etag else (bytes(data), tag)

        return await self._retrying(attempt)

    async def fetch(
        self, key: str, dest: Path, length: int, on_bytes: Callable[[int], None] = lambda n: None
    ) -> str:
        """Download exactly ``length`` bytes of ``key`` into ``dest`` (resuming a partial
        file); returns the SHA-256 (hex) of the whole file, hashed while it was written."""
        sha, _ = await self._fetch(key, dest, length, on_bytes, hold=False)
        return sha

    async def fetch_held(
        self, key: str, dest: Path, length: int, on_bytes: Callable[[int], None] = lambda n: None
    ) -> tuple[str, bytes | None]:
        """:meth:`fetch`, but a download from byte 0 is held in memory (see
        :mod:`._partial_file`): returns the SHA-256 and the object's bytes, or None for them
        when the download was (or had been) written to ``dest``."""
        return await self._fetch(key, dest, length, on_bytes, hold=True)

    async def _fetch(
        self, key: str, dest: Path, length: int, on_bytes: Callable[[int], None], hold: bool
    ) -> tuple[str, bytes | None]:
        where = self._where(key)
        hold_until = time.monotonic() + HOLD_SECONDS if hold else None
        held: bytes | None = None
        dest = Path(dest)
        digest = Digest()  # across tries: the bytes on disk are hashed once
        # Progress means a partial file longer than ever before: a server that ignores Range
        # and drops every connection at the same point cannot keep the budget full forever.
        best = min(size_of(dest), length)

        async def attempt(state: RetryState) -> None:
            nonlocal best, held
            have = size_of(dest)
            if have > length:
                log.warning("%s: partial file %s holds %d bytes, more than the %d expected: "
                            "downloading it again", where, dest, have, length)
                have = 0
            if have == length:
                await asyncio.to_thread(_whole, dest, length, digest)
                return
            if have:
                log.info("%s: resuming at byte %d of %d", where, have, length)
            grew = slow = False
            try:
                async with self._paced(where, document=False) as pace, \
                        self._open(key, have, None) as body:
                    if body is None:  # no ETag was sent: a 304 makes no sense
                        raise RetryableError(f"GET {where} answered 304 Not Modified to a "
                                             "request that was not conditional")
                    start = _check_body(body, have, length, where)
                    async with PartialFile(dest, start, digest, hold_until, length) as out:
                        while chunk := await body.read(min(self._read_size, length - out.size + 1)):
                            if out.size + len(chunk) > length:
                                raise OversizeError(f"{where} sent more than the {length} bytes "
                                                    "the index pins")
                            await out.append(chunk)
                            on_bytes(len(chunk))
                            if out.size > best:
                                best = out.size
                                grew = True
                            await pace.got(len(chunk))
            except RangeNotSatisfiableError:
                await asyncio.to_thread(dest.unlink, missing_ok=True)
                raise
            except _TooSlow:
                slow = True  # its bytes stay in the partial file, but it is no progress
                raise
            finally:
                if grew and not slow:
                    state.progress()
            if out.size < length:
                raise RetryableError(f"GET {where} ended after {out.size} of {length} bytes")
            held = out.data

        try:
            await self._retrying(attempt)
        except UntrustedDataError:
            await asyncio.to_thread(dest.unlink, missing_ok=True)
            raise
        assert digest.size == length
        return digest.hexdigest(), held


def _whole(dest: Path, length: int, digest: Digest) -> None:
    """The digest of a partial file that is already complete (a zero-length one is created)."""
    if length == 0:
        empty_file(dest)
    digest.catch_up(dest, length)


def _check_body(body: Body, have: int, length: int, where: str) -> int:
    """Where the body starts writing into the partial file; refuses a wrong declared length."""
    if body.start != have:
        if body.start != 0:
            raise RetryableError(f"GET {where} asked for bytes {have}- and got {body.start}-")
        log.warning("%s: the store ignored the Range request and sent the whole object: "
                    "downloading it again from byte 0 (discarding %d bytes); a store that "
                    "supports Range would resume", where, have)
    if body.total is not None and body.total != length:
        error = OversizeError if body.total > length else HashMismatchError
        raise error(f"{where} is {body.total} bytes, the index pins {length}")
    return body.start
