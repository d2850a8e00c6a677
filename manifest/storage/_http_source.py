"""The agent's HTTP source: plain GETs under ``http(s)://host/prefix`` (a server, a CDN).

Read-only and credential-free. Answers are mapped by :func:`http_body` (docs/ERRORS.md): 304
"not modified"; 404/410 ``MissingKeyError``; 416 ``RangeNotSatisfiableError``; 408, 429 and 5xx
``RetryableError`` with the server's Retry-After; 401/403 and anything else unexpected
``StoreConfigError``. Refused connections, timeouts and bodies cut short are retryable; an
untrusted TLS certificate is a ``StoreConfigError``.

Redirects (301, 302, 303, 307, 308) are followed here, not by aiohttp, and only within the
store's origin (scheme, host, port) or to the hosts of ``allow_redirect_hosts``
(:func:`._wire.redirect_target`); a redirect elsewhere is a ``TransportError`` naming the
target, and more than :data:`MAX_REDIRECTS` in a row a ``RetryableError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import quote

import aiohttp

from ..errors import MissingKeyError, RangeNotSatisfiableError, RetryableError, StoreConfigError
from ._pace import DEFAULT_LIMITS, TransferLimits
from ._source_base import READ_SIZE, Body, Sleep, SourceBase
from ._wire import content_range, one_line, redirect_target, retry_after_seconds
from .retry import DEFAULT_RETRY, RetryPolicy

__all__ = ["MAX_REDIRECTS", "HttpSource"]

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)


class HttpSource(SourceBase):
    """Plain GETs under ``http(s)://host/prefix``: a web server, a CDN, a public bucket."""

    def __init__(self, url: str, *, retry: RetryPolicy = DEFAULT_RETRY,
                 max_rate: float | None = None, limits: TransferLimits = DEFAULT_LIMITS,
                 allow_redirect_hosts: tuple[str, ...] = (),
                 sleep: Sleep = asyncio.sleep) -> None:
        super().__init__(url.rstrip("/"), retry, max_rate, sleep, limits)
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=limits.timeout,
                                              sock_read=limits.timeout)
        self._allowed = tuple(h.lower() for h in allow_redirect_hosts)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:  # created lazily: aiohttp wants a running event loop
            # Byte offsets must be those of the stored object: no transparent decompression.
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, auto_decompress=False, read_bufsize=READ_SIZE,
                headers={"Accept-Encoding": "identity"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @asynccontextmanager
    async def _open(self, key: str, start: int, etag: str | None) -> AsyncIterator[Body | None]:
        where = self._where(key)
        headers: dict[str, str] = {}
        if start:
            headers["Range"] = f"bytes={start}-"
        if etag:
            headers["If-None-Match"] = etag
        url = f"{self.url}/{quote(key)}"
        for _ in range(MAX_REDIRECTS + 1):
            resp = await self._get(url, headers, where)
            if resp.status not in REDIRECTS:
                break
            resp.close()
            url = redirect_target(url, resp.headers.get("Location"), self._allowed, where)
        else:
            resp.close()
            raise RetryableError(f"GET {where} was redirected more than {MAX_REDIRECTS} times")
        done = False
        try:
            yield http_body(resp, where)
            done = True
        finally:
            if done:
                resp.release()  # read to the end: the connection can be reused
            else:
                resp.close()

    async def _get(self, url: str, headers: dict[str, str], where: str) -> aiohttp.ClientResponse:
        try:
            return await self._client().get(url, headers=headers, allow_redirects=False)
        except aiohttp.ClientConnectorCertificateError as e:
            raise StoreConfigError(f"the TLS certificate of {where} is not trusted: "
                                   f"{one_line(e)}; check the URL, the CA certificates and "
                                   "the device clock") from e
        except aiohttp.ClientConnectorError as e:
            raise RetryableError(f"cannot reach {where}: {one_line(e)}") from e
        except (aiohttp.ClientError, TimeoutError) as e:
            raise RetryableError(f"GET {where} failed: {one_line(e)}") from e


def http_body(resp: aiohttp.ClientResponse, where: str) -> Body | None:
    """The body of an answer to a GET of ``where``, None for 304; other statuses raise."""
    status = resp.status
    if status == 304:
        return None
    if status == 200:
        start, total = 0, resp.content_length
    elif status == 206:
        start, total = content_range(resp.headers.get("Content-Range", ""), where)
    elif status in (404, 410):
        raise MissingKeyError(f"{where} is missing from the store (HTTP {status}): the store is "
                              "incomplete or still being published; retry later")
    elif status == 416:
        raise RangeNotSatisfiableError(f"GET {where}: range not satisfiable (HTTP 416)")
    elif status in (408, 429) or status >= 500:
        raise RetryableError(f"GET {where} failed: HTTP {status} {resp.reason or ''}".rstrip(),
                             retry_after_seconds(resp.headers.get("Retry-After")))
    elif status in (401, 403):
        raise StoreConfigError(f"access to {where} denied (HTTP {status}): the store must be "
                               "readable without credentials; check the store URL")
    else:
        raise StoreConfigError(f"GET {where} answered HTTP {status}: check the store URL")

    async def read(n: int) -> bytes:
        try:
            if n >= READ_SIZE:  # no rate cap: the bytes as they arrived, not joined (a copy)
                while True:
                    data, end_of_http_chunk = await resp.content.readchunk()
                    if data or not end_of_http_chunk:
                        return data  # b"": the end of the body
            return await resp.content.read(n)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise RetryableError(f"GET {where} broke off: {one_line(e)}") from e

    return Body(start, total, resp.headers.get("ETag"), read)
