"""A hostile HTTP mirror of a store directory: it misbehaves on purpose, per key (tests).

``HostileServer(root, prefix)`` serves ``root/<key>`` at ``/<prefix>/<key>`` on 127.0.0.1 like
an honest server (strong ETag = sha256, If-None-Match -> 304, one ``bytes=N-`` range -> 206)
until :meth:`HostileServer.misbehave` gives a key pattern a :class:`Misbehaviour`:

* ``status``: answer that status, whatever was asked: without a body (e.g. 304 to an
  unconditional GET) unless ``body`` is given; 206 sends the file from ``Range`` (or 0) on;
* ``headers``: add or override headers (an odd ``Content-Range``, a lying ``Content-Length``);
* ``body``: send these bytes instead of the file's;
* ``drip``: send the body ``n`` bytes every ``s`` seconds (a slow mirror);
* ``redirect``: answer ``302`` with this ``Location`` (``{key}`` is replaced);
* ``hold_until``: send the headers, then hold the body until this wall-clock time;
* ``times``: misbehave only on the next N matching requests.

It speaks raw HTTP/1.1 over asyncio streams (``Connection: close``), so nothing between the test
and the socket corrects a lie. Every request is logged (:class:`devtools.faulty_http.Served`).
:class:`ThreadedServer` runs it on its own event loop for tests that start agent processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .faulty_http import Served

__all__ = ["HostileServer", "Misbehaviour", "ThreadedServer"]

T = TypeVar("T")
REASONS = {200: "OK", 206: "Partial Content", 302: "Found", 304: "Not Modified",
           404: "Not Found", 416: "Range Not Satisfiable"}


@dataclass
class Misbehaviour:
    status: int | None = None  # answer this status, no body
    headers: dict[str, str] = field(default_factory=dict)  # added, or replacing ours
    body: bytes | None = None  # sent instead of the file's bytes
    drip: tuple[int, float] | None = None  # (n bytes, every s seconds)
    redirect: str | None = None  # 302 to this Location ({key} replaced)
    hold_until: float | None = None  # wall-clock time (time.time()) before the body is sent
    times: int | None = None  # only the next N matching requests (None: all)


class HostileServer:
    def __init__(self, root: Path, prefix: str = "store") -> None:
        self.root = root
        self.prefix = prefix.strip("/")
        self.rules: list[tuple[re.Pattern[str], Misbehaviour]] = []
        self.requests: list[Served] = []
        self.url = ""
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    def misbehave(self, key_pattern: str, what: Misbehaviour) -> None:
        """Requests for keys matching ``key_pattern`` (re.search) get ``what`` from now on."""
        self.rules.append((re.compile(key_pattern), what))

    def behave(self) -> None:
        self.rules.clear()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/{self.prefix}"
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        # Handlers still dripping or holding a body end here, not when the loop is closed
        # (asyncio would log "Task was destroyed but it is pending!" into another test).
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def _rule(self, key: str) -> Misbehaviour | None:
        for pattern, what in self.rules:
            if pattern.search(key) and what.times != 0:
                if what.times is not None:
                    what.times -= 1
                return what
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            log = Served(path, headers.get("range"), headers.get("if-none-match"))
            self.requests.append(log)
            await self._answer(path, log, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, IndexError,
                asyncio.CancelledError):
            pass  # the client hung up, or the server stops
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _answer(self, path: str, log: Served, writer: asyncio.StreamWriter) -> None:
        path = path.split("?", 1)[0]
        key = path.removeprefix(f"/{self.prefix}/")
        file = self.root / key
        if ".." in key.split("/") or not file.is_file() or path == key:
            return await self._send(writer, log, 404, {}, b"")
        data = file.read_bytes()
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        what = self._rule(key)
        if what is not None and what.redirect is not None:
            return await self._send(writer, log, 302,
                                    {"Location": what.redirect.replace("{key}", key)}, b"")
        if what is not None and what.status is not None and what.status != 206:
            return await self._send(writer, log, what.status, {"ETag": etag, **what.headers},
                                    what.body or b"")
        if log.if_none_match == etag:
            return await self._send(writer, log, 304, {"ETag": etag}, b"")
        status, start = 200, 0
        m = re.fullmatch(r"bytes=(\d+)-", log.range or "")
        if what is not None and what.status == 206:
            status = 206  # whatever was asked
        elif m:
            start = int(m[1])
            if start >= len(data):
                return await self._send(writer, log, 416,
                                        {"Content-Range": f"bytes */{len(data)}"}, b"")
            status = 206
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if what is not None:
            headers.update(what.headers)
            body = what.body if what.body is not None else body
        await self._send(writer, log, status, headers, body,
                         what.drip if what is not None else None,
                         what.hold_until if what is not None else None)

    async def _send(self, writer: asyncio.StreamWriter, log: Served, status: int,
                    headers: dict[str, str], body: bytes,
                    drip: tuple[int, float] | None = None,
                    hold_until: float | None = None) -> None:
        log.status = status
        lower = {k.lower() for k in headers}
        head = {"Connection": "close", **headers}
        if "content-length" not in lower and status not in (304,):
            head["Content-Length"] = str(len(body))
        text = f"HTTP/1.1 {status} {REASONS.get(status, 'Whatever')}\r\n"
        text += "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
        writer.write(text.encode("latin-1"))
        await writer.drain()
        if hold_until is not None:
            await asyncio.sleep(max(0.0, hold_until - time.time()))
        step, every = drip or (len(body) or 1, 0.0)
        for i in range(0, len(body), step):
            if drip and i:
                await asyncio.sleep(every)
            writer.write(body[i:i + step])
            await writer.drain()
            log.sent += len(body[i:i + step])
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()
        await asyncio.sleep(0.05)  # let the client read it before the connection goes


class ThreadedServer:
    """``with ThreadedServer(HostileServer(store)) as s: ... s.server.url ...``"""

    def __init__(self, server: HostileServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="hostile-http")

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        self._call(self.server.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def misbehave(self, key_pattern: str, what: Misbehaviour) -> None:
        self.server.misbehave(key_pattern, what)  # a list append: safe across threads

    def behave(self) -> None:
        self.server.behave()

    @property
    def url(self) -> str:
        return self.server.url

    def since(self, start: float) -> list[Served]:
        return [r for r in list(self.server.requests) if r.at >= start]
