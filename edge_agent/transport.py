"""The agent's read-only, async view of a store: small documents and resumable downloads.

A :class:`Source` reads the store layout of docs/FORMAT.md §1 (keys such as ``manifest.json`` or
``objects/<sha256>``, relative to the store's prefix). :func:`open_source` picks the
implementation from the URL: :class:`HttpSource` (``http(s)://host/prefix``: plain GETs, for a
CDN or a public bucket), :class:`S3Source` (``s3://bucket/prefix``: boto3 in worker threads) or
:class:`LocalSource` (``file:///path`` or a directory).

Everything streams and every limit is enforced while streaming: :meth:`Source.get_small` stops
reading past its cap, :meth:`Source.fetch` past the length the signed index pins. ``fetch``
appends to a partial file that survives restarts and resumes it with ``Range: bytes=N-``;
objects are content-addressed and immutable, so no ``If-Range`` is needed. It checks lengths,
not content: the caller hashes the finished file (:class:`manifest.trust.StreamVerifier`) and
deletes it on a mismatch. Transport failures are retried with a :class:`RetryPolicy` whose
budget resets whenever the partial file grows beyond its longest length yet. An optional
``max_rate`` caps the bytes per second of all downloads of one source together.

Errors, from :mod:`manifest.errors`, by whose fault:

* ``TransportError``: the store could not be reached or failed (refused or reset connections,
  timeouts, bodies cut short, HTTP 408/429/5xx), once the retry budget is spent: retry later.
  :class:`MissingKeyError` (a ``TransportError``) when the store lacks a key; it is raised at
  once, without retries.
* ``OversizeError`` / ``HashMismatchError``: the store declared or sent more than the cap, or
  another length than the index pins. The partial file is deleted.
* ``StoreConfigError``: a bad URL, a missing bucket or directory, missing or refused
  credentials (HTTP 401/403). ``DiskFullError`` / ``LocalError``: the partial file could not be
  written.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import hashlib
import logging
import os
import re
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import quote, urlparse

import aiohttp

from manifest.errors import (
    DeltashipError,
    FormatError,
    HashMismatchError,
    LocalError,
    MissingKeyError,
    OversizeError,
    RangeNotSatisfiableError,
    RetryableError,
    StoreConfigError,
    TransportError,
    UntrustedDataError,
    disk_full,
)

from .retry import RetryPolicy, RetryState

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import GetObjectOutputTypeDef

__all__ = [
    "DEFAULT_RETRY",
    "HttpSource",
    "LocalSource",
    "MissingKeyError",
    "S3Source",
    "Source",
    "open_source",
]

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024  # the most bytes asked of a socket or file at once
BLOCK = 1024 * 1024  # bytes gathered before a write to the partial file
FLUSH_SECONDS = 0.5  # ...or seconds since the last write (slow links)
DEFAULT_RETRY = RetryPolicy()
T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


class Source(Protocol):
    url: str

    async def get_small(
        self, key: str, max_size: int, etag: str | None = None
    ) -> tuple[bytes | None, str | None]:
        """The whole object, refused past ``max_size`` bytes while streaming, and its ETag.

        With ``etag``, a conditional GET: ``(None, etag)`` when the object is unchanged.
        """
        ...

    async def fetch(
        self, key: str, dest: Path, length: int, on_bytes: Callable[[int], None] = ...
    ) -> None:
        """Download exactly ``length`` bytes into ``dest``, resuming a partial file; fsync.

        ``on_bytes`` gets the size of every chunk received, restarts included (wire bytes).
        """
        ...

    async def close(self) -> None: ...


def open_source(
    url: str,
    *,
    endpoint_url: str | None = None,
    max_rate: float | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    timeout: float = 30,
    sleep: Sleep = asyncio.sleep,
) -> Source:
    """``s3://bucket/prefix``, ``http(s)://host/prefix``, ``file:///path`` or a directory.

    ``max_rate`` caps bytes per second over all downloads of the source; ``timeout`` bounds
    connecting and each wait for data; ``sleep`` waits between retries (tests pass a fake).
    """
    if max_rate is not None and max_rate <= 0:
        raise ValueError(f"max_rate must be positive, not {max_rate}")
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreConfigError(f"store URL {url!r} has no bucket: use s3://BUCKET/PREFIX")
        return S3Source(parsed.netloc, parsed.path.strip("/"), endpoint_url=endpoint_url,
                        retry=retry, max_rate=max_rate, timeout=timeout, sleep=sleep)
    if parsed.scheme in ("http", "https"):
        if not parsed.netloc:
            raise StoreConfigError(f"store URL {url!r} has no host: use https://HOST/PREFIX")
        return HttpSource(url, retry=retry, max_rate=max_rate, timeout=timeout, sleep=sleep)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StoreConfigError(f"store URL {url!r} names a remote host: use file:///PATH")
        return LocalSource(parsed.path, retry=retry, max_rate=max_rate, sleep=sleep)
    if not parsed.scheme:
        return LocalSource(url, retry=retry, max_rate=max_rate, sleep=sleep)
    raise StoreConfigError(
        f"unsupported store URL {url!r}: use s3://bucket/prefix, https://host/prefix, "
        "file:///path or a directory"
    )


@dataclass
class _Body:
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


class _Source:
    """What all sources share: capped reads, resumable downloads, retries, the rate cap."""

    def __init__(self, url: str, retry: RetryPolicy, max_rate: float | None, sleep: Sleep):
        self.url = url
        self._retry = retry
        self._sleep = sleep
        self._bandwidth = _Bandwidth(max_rate) if max_rate else None

    def _open(
        self, key: str, start: int, etag: str | None
    ) -> AbstractAsyncContextManager[_Body | None]:
        """GET ``key`` from byte ``start`` on; None when ``etag`` still matches (304)."""
        raise NotImplementedError

    async def close(self) -> None:
        pass

    def _where(self, key: str) -> str:
        parts = key.split("/")
        if key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"not a store key: {key!r}")
        return f"{self.url}/{key}"

    async def _throttle(self, n: int) -> None:
        if self._bandwidth is not None:
            await self._bandwidth.take(n)

    async def _retrying(self, attempt: Callable[[RetryState], Awaitable[T]]) -> T:
        state = RetryState(self._retry)
        while True:
            try:
                return await attempt(state)
            except RetryableError as e:
                delay = state.failed(e, e.retry_after)
                if delay is None:
                    gave_up = TransportError(
                        f"{e}; gave up after {state.failures} tries in a row: check the network "
                        "and the store URL, then retry later"
                    )
                    gave_up.retry_after = e.retry_after  # the next poll waits at least that
                    raise gave_up from e
                log.warning("%s; try %d of %d in %.1f s", e, state.failures + 1,
                            self._retry.attempts, delay)
                await self._sleep(delay)

    async def get_small(
        self, key: str, max_size: int, etag: str | None = None
    ) -> tuple[bytes | None, str | None]:
        where = self._where(key)

        async def attempt(state: RetryState) -> tuple[bytes | None, str | None]:
            async with self._open(key, 0, etag) as body:
                if body is None:
                    return None, etag
                if body.total is not None and body.total > max_size:
                    raise OversizeError(f"{where} is {body.total} bytes, over its "
                                        f"{max_size}-byte cap")
                data = bytearray()
                while chunk := await body.read(min(READ_SIZE, max_size + 1 - len(data))):
                    data += chunk
                    if len(data) > max_size:
                        raise OversizeError(f"{where} is larger than its {max_size}-byte cap")
                    await self._throttle(len(chunk))
            # Stores without ETags (directories, some servers) get one from the content.
            tag = body.etag or hashlib.sha256(data).hexdigest()
            return (None, tag) if tag == etag else (bytes(data), tag)

        return await self._retrying(attempt)

    async def fetch(
        self, key: str, dest: Path, length: int, on_bytes: Callable[[int], None] = lambda n: None
    ) -> None:
        where = self._where(key)
        dest = Path(dest)
        # Progress means a partial file longer than ever before: a server that ignores Range
        # and drops every connection at the same point cannot keep the budget full forever.
        best = min(_size(dest), length)

        async def attempt(state: RetryState) -> None:
            nonlocal best
            have = _size(dest)
            if have > length:
                log.warning("%s: partial file %s holds %d bytes, more than the %d expected: "
                            "downloading it again", where, dest, have, length)
                have = 0
            if have == length:
                return
            if have:
                log.info("%s: resuming at byte %d of %d", where, have, length)
            try:
                async with self._open(key, have, None) as body:
                    assert body is not None  # no ETag sent, so no 304
                    async with _PartialFile(dest, _check_body(body, have, length, where)) as out:
                        while chunk := await body.read(min(READ_SIZE, length - out.size + 1)):
                            if out.size + len(chunk) > length:
                                raise OversizeError(f"{where} sent more than the {length} bytes "
                                                    "the index pins")
                            await out.append(chunk)
                            on_bytes(len(chunk))
                            if out.size > best:
                                best = out.size
                                state.progress()
                            await self._throttle(len(chunk))
            except RangeNotSatisfiableError:
                await asyncio.to_thread(dest.unlink, missing_ok=True)
                raise
            if out.size < length:
                raise RetryableError(f"GET {where} ended after {out.size} of {length} bytes")

        try:
            await self._retrying(attempt)
        except UntrustedDataError:
            await asyncio.to_thread(dest.unlink, missing_ok=True)
            raise
        await asyncio.to_thread(_fsync, dest)


def _check_body(body: _Body, have: int, length: int, where: str) -> int:
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


class _PartialFile:
    """A download's partial file, cut at ``start`` and appended to in blocks by a thread.

    A block is written when it reaches ``BLOCK`` bytes or ``FLUSH_SECONDS`` after the last
    write, so a killed agent loses at most that much of a download, also on a slow link.
    """

    def __init__(self, path: Path, start: int) -> None:
        self.path = path
        self.size = start
        self._buf = bytearray()
        self._fd = -1
        self._flushed = time.monotonic()

    async def __aenter__(self) -> _PartialFile:
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


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)  # creates a zero-length object
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise _disk_error(e, path) from e


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _content_range(value: str, where: str) -> tuple[int, int | None]:
    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", value.strip())
    if m is None:
        raise RetryableError(f"GET {where} answered with a malformed Content-Range {value!r}")
    return int(m[1]), None if m[2] == "*" else int(m[2])


class HttpSource(_Source):
    """Plain GETs under ``http(s)://host/prefix``: a web server, a CDN, a public bucket."""

    def __init__(self, url: str, *, retry: RetryPolicy = DEFAULT_RETRY,
                 max_rate: float | None = None, timeout: float = 30,
                 sleep: Sleep = asyncio.sleep) -> None:
        super().__init__(url.rstrip("/"), retry, max_rate, sleep)
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                              sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:  # created lazily: aiohttp wants a running event loop
            # Byte offsets must be those of the stored object: no transparent decompression.
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, auto_decompress=False,
                headers={"Accept-Encoding": "identity"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @asynccontextmanager
    async def _open(self, key: str, start: int, etag: str | None) -> AsyncIterator[_Body | None]:
        where = self._where(key)
        headers: dict[str, str] = {}
        if start:
            headers["Range"] = f"bytes={start}-"
        if etag:
            headers["If-None-Match"] = etag
        try:
            resp = await self._client().get(f"{self.url}/{quote(key)}", headers=headers)
        except aiohttp.ClientConnectorCertificateError as e:
            raise StoreConfigError(f"the TLS certificate of {where} is not trusted: "
                                   f"{_one_line(e)}; check the URL, the CA certificates and "
                                   "the device clock") from e
        except aiohttp.ClientConnectorError as e:
            raise RetryableError(f"cannot reach {where}: {_one_line(e)}") from e
        except (aiohttp.ClientError, TimeoutError) as e:
            raise RetryableError(f"GET {where} failed: {_one_line(e)}") from e
        done = False
        try:
            yield _http_body(resp, where)
            done = True
        finally:
            if done:
                resp.release()  # read to the end: the connection can be reused
            else:
                resp.close()


def _http_body(resp: aiohttp.ClientResponse, where: str) -> _Body | None:
    status = resp.status
    if status == 304:
        return None
    if status == 200:
        start, total = 0, resp.content_length
    elif status == 206:
        start, total = _content_range(resp.headers.get("Content-Range", ""), where)
    elif status in (404, 410):
        raise MissingKeyError(f"{where} is missing from the store (HTTP {status}): the store is "
                              "incomplete or still being published; retry later")
    elif status == 416:
        raise RangeNotSatisfiableError(f"GET {where}: range not satisfiable (HTTP 416)")
    elif status in (408, 429) or status >= 500:
        raise RetryableError(f"GET {where} failed: HTTP {status} {resp.reason or ''}".rstrip(),
                         _retry_after(resp.headers.get("Retry-After")))
    elif status in (401, 403):
        raise StoreConfigError(f"access to {where} denied (HTTP {status}): the store must be "
                               "readable without credentials; check the store URL")
    else:
        raise StoreConfigError(f"GET {where} answered HTTP {status}: check the store URL")

    async def read(n: int) -> bytes:
        try:
            return await resp.content.read(n)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise RetryableError(f"GET {where} broke off: {_one_line(e)}") from e

    return _Body(start, total, resp.headers.get("ETag"), read)


class S3Source(_Source):
    """``s3://bucket/prefix`` through boto3 (AWS S3, MinIO, Ceph, R2), in worker threads.

    Endpoints and credentials as :class:`manifest.stores.S3Store`: the standard AWS settings,
    ``AWS_ENDPOINT_URL(_S3)`` honoured, path-style addressing when an endpoint is set.
    botocore's own retries are off: the :class:`RetryPolicy` decides.
    """

    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str | None = None,
                 retry: RetryPolicy = DEFAULT_RETRY, max_rate: float | None = None,
                 timeout: float = 30, sleep: Sleep = asyncio.sleep) -> None:
        import boto3
        import botocore.config
        import botocore.exceptions

        super().__init__(f"s3://{bucket}/{prefix}".rstrip("/"), retry, max_rate, sleep)
        self.bucket = bucket
        self.prefix = prefix
        endpoint = (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL"))
        self.endpoint = endpoint or "AWS S3"
        config = botocore.config.Config(
            retries={"total_max_attempts": 1},
            connect_timeout=timeout,
            read_timeout=timeout,
            s3={"addressing_style": "path" if endpoint else "auto"},
            max_pool_connections=32,
        )
        try:
            self._client: S3Client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint, config=config
            )
        except botocore.exceptions.BotoCoreError as e:
            raise StoreConfigError(f"cannot set up S3 for {self.url}: {_one_line(e)}") from e

    @asynccontextmanager
    async def _open(self, key: str, start: int, etag: str | None) -> AsyncIterator[_Body | None]:
        import botocore.exceptions as bx

        where = self._where(key)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": f"{self.prefix}/{key}".lstrip("/")}
        if start:
            args["Range"] = f"bytes={start}-"
        if etag:
            args["IfNoneMatch"] = etag
        r: GetObjectOutputTypeDef | None = None
        try:
            r = await asyncio.to_thread(functools.partial(self._client.get_object, **args))
        except (bx.BotoCoreError, bx.ClientError) as e:
            error = self._translate(e, where)
            if error is not None:
                raise error from e
        if r is None:
            yield None  # 304: unchanged
            return
        stream = r["Body"]
        try:
            yield _s3_body(r, where)
        finally:
            stream.close()

    def _translate(self, e: Exception, where: str) -> DeltashipError | None:
        """The error for a failed GetObject; None for 304 Not Modified."""
        import botocore.exceptions as bx

        if isinstance(e, bx.NoCredentialsError):
            return StoreConfigError(
                "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE)"
            )
        if isinstance(e, bx.EndpointConnectionError | bx.ConnectionError):
            return RetryableError(f"cannot reach the store at {self.endpoint} for {where}: "
                              f"{_one_line(e)}")
        if not isinstance(e, bx.ClientError):
            return RetryableError(f"GET {where} failed: {_one_line(e)}")
        code = str(e.response.get("Error", {}).get("Code", ""))
        meta = e.response.get("ResponseMetadata", {})
        status = int(meta.get("HTTPStatusCode", 0))
        if status == 304 or code in ("304", "NotModified"):
            return None
        if code == "NoSuchBucket":
            return StoreConfigError(f"bucket {self.bucket!r} does not exist at {self.endpoint}: "
                                    "create it or fix the store URL")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return MissingKeyError(f"{where} is missing from the store ({code or 404}): the "
                                   "store is incomplete or still being published; retry later")
        if code == "InvalidRange" or status == 416:
            return RangeNotSatisfiableError(f"GET {where}: range not satisfiable ({code})")
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId",
                                     "SignatureDoesNotMatch"):
            return StoreConfigError(f"access to {where} denied ({code}): check the S3 "
                                    "credentials and the bucket policy")
        if status >= 500 or status in (0, 408, 429) or code in ("SlowDown", "RequestTimeout"):
            retry_after = _retry_after(meta.get("HTTPHeaders", {}).get("retry-after"))
            return RetryableError(f"GET {where} failed: {code or status}", retry_after)
        return StoreConfigError(f"S3 refused GET {where}: {code} "
                                f"{e.response.get('Error', {}).get('Message', '')}".rstrip())


def _s3_body(r: GetObjectOutputTypeDef, where: str) -> _Body:
    import botocore.exceptions as bx

    stream = r["Body"]
    if r.get("ContentRange"):
        start, total = _content_range(r["ContentRange"], where)
    else:
        start, total = 0, r.get("ContentLength")

    async def read(n: int) -> bytes:
        try:
            return await asyncio.to_thread(stream.read, n)
        except (bx.BotoCoreError, OSError) as e:
            raise RetryableError(f"GET {where} broke off: {_one_line(e)}") from e

    return _Body(start, total, r.get("ETag"), read)


def _open_regular(path: Path, where: str) -> Any:
    """Open a store file for reading; refuse devices, pipes and sockets (endless data).

    O_NONBLOCK so that opening a pipe without a writer cannot hang the agent.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError(
                f"{where} is not a regular file (a device, pipe or socket): refusing to read it"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class LocalSource(_Source):
    """A directory with the store layout (``file:///path``): reads in worker threads."""

    def __init__(self, root: str, *, retry: RetryPolicy = DEFAULT_RETRY,
                 max_rate: float | None = None, sleep: Sleep = asyncio.sleep) -> None:
        self.root = Path(root).absolute()
        super().__init__(f"file://{self.root}", retry, max_rate, sleep)

    @asynccontextmanager
    async def _open(self, key: str, start: int, etag: str | None) -> AsyncIterator[_Body | None]:
        where = self._where(key)
        try:
            f = await asyncio.to_thread(_open_regular, self.root / key, where)
        except FileNotFoundError as e:
            if not self.root.is_dir():
                raise StoreConfigError(f"store directory {self.root} does not exist: create it "
                                       "or fix the store URL") from e
            raise MissingKeyError(f"{where} is missing from the store: it is incomplete or "
                                  "still being published; retry later") from e
        except PermissionError as e:
            raise StoreConfigError(f"cannot read {where}: permission denied") from e
        except OSError as e:
            raise RetryableError(f"cannot read {where}: {e.strerror or e}") from e
        try:
            size = os.fstat(f.fileno()).st_size
            if start and start >= size:
                raise RangeNotSatisfiableError(
                    f"{where} has only {size} bytes, not more than {start}")
            f.seek(start)

            async def read(n: int) -> bytes:
                try:
                    return await asyncio.to_thread(f.read, n)
                except OSError as e:
                    raise RetryableError(f"cannot read {where}: {e.strerror or e}") from e

            yield _Body(start, size, None, read)
        finally:
            f.close()
