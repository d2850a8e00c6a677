"""The agent's face of the storage layer: an async :class:`Source`, read-only but for reports.

A :class:`Source` reads the store layout of docs/FORMAT.md §1 (keys such as ``manifest.json`` or
``objects/<sha256>``, relative to the store's prefix). :func:`open_source` picks the backend
from the URL (:mod:`manifest.storage.location`): :class:`HttpSource` (``http(s)://host/prefix``:
plain GETs, for a CDN or a public bucket), :class:`S3Source` (``s3://bucket/prefix``: boto3 in
worker threads) or :class:`LocalSource` (``file:///path`` or a directory). The shared logic
(capped reads, resumable downloads, retries, the bandwidth cap) is in :mod:`._source_base`.

Everything streams and every limit is enforced while streaming: :meth:`Source.get_small` stops
reading past its cap, :meth:`Source.fetch` past the length the signed index pins. ``fetch``
appends to a partial file that survives restarts and resumes it with a range request. The one
write, :meth:`Source.put_small`, is a device's report (S3 and directories only).

Errors, from :mod:`manifest.errors`, by whose fault (the full table: docs/ERRORS.md):

* ``TransportError``: the store could not be reached or failed (refused or reset connections,
  timeouts, bodies cut short, HTTP 408/429/5xx), once the retry budget is spent: retry later.
  :class:`MissingKeyError` (a ``TransportError``) when the store lacks a key; it is raised at
  once, without retries.
* ``OversizeError`` / ``HashMismatchError``: the store declared or sent more than the cap, or
  another length than the index pins. The partial file is deleted.
* ``StoreConfigError``: a bad URL, a missing bucket or directory, an unknown AWS profile, missing
  or refused credentials (HTTP 401/403). ``DiskFullError`` / ``LocalError``: the partial file
  could not be written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import MissingKeyError
from ._local_source import LocalSource
from ._pace import DEFAULT_LIMITS, TransferLimits
from ._partial_file import BLOCK, FLUSH_SECONDS
from ._source_base import MAX_PUT_SIZE, READ_SIZE, Sleep
from .location import parse_store_url
from .retry import DEFAULT_RETRY, RetryPolicy

if TYPE_CHECKING:
    from ._http_source import HttpSource
    from ._s3_source import S3Source

__all__ = [
    "BLOCK",
    "DEFAULT_LIMITS",
    "DEFAULT_RETRY",
    "FLUSH_SECONDS",
    "MAX_PUT_SIZE",
    "READ_SIZE",
    "HttpSource",
    "LocalSource",
    "MissingKeyError",
    "S3Source",
    "Source",
    "TransferLimits",
    "open_source",
]


def __getattr__(name: str) -> Any:
    """``HttpSource`` and ``S3Source`` on first use: their modules import aiohttp and botocore's
    table, which a directory store never needs."""
    if name == "HttpSource":
        from ._http_source import HttpSource

        return HttpSource
    if name == "S3Source":
        from ._s3_source import S3Source

        return S3Source
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    ) -> str:
        """Download exactly ``length`` bytes into ``dest``, resuming a partial file; returns
        the SHA-256 (hex) of the file, hashed as it was written (it is not fsynced).

        ``on_bytes`` gets the size of every chunk received, restarts included (wire bytes).
        """
        ...

    async def fetch_held(
        self, key: str, dest: Path, length: int, on_bytes: Callable[[int], None] = ...
    ) -> tuple[str, bytes | None]:
        """:meth:`fetch`, holding a download from byte 0 in memory for at most
        ``HOLD_SECONDS`` (then it is written to ``dest`` and goes on as :meth:`fetch`);
        returns the SHA-256 and the bytes, or None when the object is in ``dest``."""
        ...

    async def put_small(self, key: str, data: bytes, deadline: float) -> None:
        """Write a small object (a device report: at most ``MAX_PUT_SIZE`` bytes), one try,
        within ``deadline`` seconds. S3 and directories; an HTTP store is read-only
        (``StoreConfigError``)."""
        ...

    async def close(self) -> None: ...


def open_source(
    url: str,
    *,
    endpoint_url: str | None = None,
    profile: str | None = None,
    region: str | None = None,
    max_rate: float | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    limits: TransferLimits = DEFAULT_LIMITS,
    allow_redirect_hosts: tuple[str, ...] = (),
    sleep: Sleep = asyncio.sleep,
) -> Source:
    """``s3://bucket/prefix``, ``http(s)://host/prefix``, ``file:///path`` or a directory.

    ``endpoint_url``, ``profile`` and ``region`` are for S3 (None: from the AWS environment);
    ``max_rate`` caps bytes per second over all downloads of the source; ``limits`` bound
    connecting, each wait for data, the whole of a document and the slowest transfer rate
    (:class:`TransferLimits`); ``allow_redirect_hosts``: hosts (``host`` or ``host:port``) an
    HTTP store may redirect to besides its own origin; ``sleep`` waits between retries (tests
    pass a fake).
    """
    if max_rate is not None and max_rate <= 0:
        raise ValueError(f"max_rate must be positive, not {max_rate}")
    location = parse_store_url(url)
    # A backend's module is imported when a store of its kind is opened: aiohttp alone takes
    # longer to import than an up-to-date cycle on a directory store.
    if location.kind == "s3":
        from ._s3_source import S3Source

        return S3Source(location.bucket, location.prefix, endpoint_url=endpoint_url,
                        profile=profile, region=region, retry=retry, max_rate=max_rate,
                        limits=limits, sleep=sleep)
    if location.kind == "http":
        from ._http_source import HttpSource

        return HttpSource(location.url, retry=retry, max_rate=max_rate, limits=limits,
                          allow_redirect_hosts=allow_redirect_hosts, sleep=sleep)
    assert location.path is not None
    return LocalSource(location.path, retry=retry, max_rate=max_rate, limits=limits,
                       sleep=sleep)
