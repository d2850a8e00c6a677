"""A real HTTP server over a store directory that fails on demand (tests and benchmarks).

``FaultyServer(root, prefix)`` serves ``root/<key>`` at ``/<prefix>/<key>`` on 127.0.0.1 with a
strong ETag (the file's sha256), If-None-Match (304) and one ``bytes=N-`` or ``bytes=N-M`` range
(206, 416). Set :class:`Faults` knobs before a request to break the next ones. Every request is
logged with the body bytes actually written to the socket, so tests assert on what crossed the
wire, not on what the client says it received.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

WRITE = 64 * 1024
ENDLESS_LIMIT = 256 * 1024 * 1024  # an "endless" body still ends, in case a client never stops


@dataclass
class Faults:
    fail: int = 0  # answer the next N requests with fail_status
    fail_status: int = 500
    retry_after: str | None = None  # Retry-After header of those answers
    resets: list[int] = field(default_factory=list)  # per request: K body bytes, then TCP RST
    truncations: list[int] = field(default_factory=list)  # per request: K bytes, then FIN
    stalls: list[float] = field(default_factory=list)  # per request: wait S s after the headers
    ignore_range: bool = False  # always 200 with the whole object
    endless: bool = False  # 200, chunked, a body that never ends
    only: str | None = None  # a regex: the faults apply only to keys it matches (re.search)


@dataclass
class Served:
    path: str
    range: str | None
    if_none_match: str | None
    status: int = 0
    sent: int = 0  # body bytes written to the socket
    at: float = field(default_factory=time.monotonic)  # when the request arrived


class FaultyServer:
    def __init__(self, root: Path, prefix: str = "store") -> None:
        self.root = root
        self.prefix = prefix.strip("/")
        self.faults = Faults()
        self.requests: list[Served] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    @property
    def bytes_sent(self) -> int:
        return sum(r.sent for r in self.requests)

    def put(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get(f"/{self.prefix}/{{key:.+}}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/{self.prefix}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        log = Served(request.path, request.headers.get("Range"),
                     request.headers.get("If-None-Match"))
        self.requests.append(log)
        key = request.match_info["key"]
        f = self.faults
        if f.only is not None and not re.search(f.only, key):
            f = Faults()  # this key is spared: no faults
        if f.fail:
            f.fail -= 1
            log.status = f.fail_status
            headers = {"Retry-After": f.retry_after} if f.retry_after else {}
            return web.Response(status=f.fail_status, headers=headers, text="injected failure")
        path = self.root / key
        if ".." in key.split("/") or not path.is_file():
            log.status = 404
            return web.Response(status=404)
        data = path.read_bytes()
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        if log.if_none_match == etag:
            log.status = 304
            return web.Response(status=304, headers={"ETag": etag})
        if f.endless:
            return await self._endless(request, log)

        status, start, end = 200, 0, len(data)
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", log.range or "")
        if m and not f.ignore_range:
            start = int(m[1])
            end = min(len(data), int(m[2]) + 1) if m[2] else len(data)
            if start >= len(data):
                log.status = 416
                return web.Response(status=416,
                                    headers={"Content-Range": f"bytes */{len(data)}"})
            status = 206
        headers = {"ETag": etag}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        if not f.ignore_range:
            headers["Accept-Ranges"] = "bytes"
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = end - start
        log.status = status
        await resp.prepare(request)
        if f.stalls:
            await asyncio.sleep(f.stalls.pop(0))
        reset = f.resets.pop(0) if f.resets else None
        cut = reset if reset is not None else f.truncations.pop(0) if f.truncations else None
        body = data[start:end] if cut is None else data[start:min(end, start + cut)]
        for i in range(0, len(body), WRITE):
            await resp.write(body[i:i + WRITE])
            log.sent += len(body[i:i + WRITE])
        if cut is None:
            await resp.write_eof()
            return resp
        await asyncio.sleep(0.05)  # let the client read what was sent, as on a link that dies
        transport = request.transport
        assert transport is not None
        if reset is not None:  # SO_LINGER 0: close() sends RST instead of FIN
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.close()
        raise asyncio.CancelledError  # nothing more can be written on this connection

    async def _endless(self, request: web.Request, log: Served) -> web.StreamResponse:
        resp = web.StreamResponse(status=200)  # no Content-Length: chunked, no end in sight
        log.status = 200
        await resp.prepare(request)
        block = b"\xa5" * WRITE
        try:
            while log.sent < ENDLESS_LIMIT:
                await resp.write(block)
                log.sent += len(block)
        except (ConnectionError, OSError):
            pass  # the client hung up, as it should
        return resp
