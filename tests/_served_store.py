"""A store directory served over plain HTTP to real agent processes (tests only).

:class:`ServedStore` runs a :class:`devtools.faulty_http.FaultyServer` on its own event loop in a
daemon thread, so that tests can start ``deltaship-agent`` subprocesses against it while they
keep reading the server's request log. In front of the server sits :class:`WireCounter`, a
TCP proxy that counts every byte in both directions (headers included) and every connection:
``url`` goes through the proxy, ``direct_url`` does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from devtools.faulty_http import Faults, FaultyServer, Served
from manifest.storage.retry import RetryPolicy
from manifest.storage.source import Source, open_source

T = TypeVar("T")


@dataclass
class Wire:
    """Raw TCP traffic through the proxy."""

    connections: int = 0
    up: int = 0  # client -> server bytes (requests)
    down: int = 0  # server -> client bytes (responses, headers included)

    @property
    def total(self) -> int:
        return self.up + self.down


class WireCounter:
    """A TCP proxy from 127.0.0.1:<port> to ``upstream_port`` that counts bytes.

    It relays a server's reset as a reset (abort) and an end of stream as an end of stream, so
    the client sees the faults the server injects.
    """

    def __init__(self, upstream_port: int, up_rate: float | None = None) -> None:
        self.upstream_port = upstream_port
        self.up_rate = up_rate  # bytes per second client -> server per connection (None: any)
        self.wire = Wire()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        if self.up_rate is not None:
            # A small receive window, as a slow link's: what the client has sent but the
            # server has not yet taken stays small (on loopback the kernel would buffer MBs).
            for sock in self._server.sockets:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()  # the pumps see the end and return
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(cwriter)
        self.wire.connections += 1
        swriter = None
        try:
            sreader, swriter = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            self._writers.add(swriter)
            await asyncio.gather(self._pump(creader, swriter, "up"),
                                 self._pump(sreader, cwriter, "down"))
        except OSError:
            pass
        finally:
            for w in (cwriter, swriter):
                if w is not None:
                    w.transport.abort()
                    self._writers.discard(w)
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    way: str) -> None:
        rate = self.up_rate if way == "up" else None
        try:
            while data := await reader.read(65536 if rate is None else 8192):
                setattr(self.wire, way, getattr(self.wire, way) + len(data))
                writer.write(data)
                await writer.drain()
                if rate is not None:  # a slow uplink: the client's sends back up behind it
                    await asyncio.sleep(len(data) / rate)
        except (ConnectionError, OSError):
            writer.transport.abort()  # a reset stays a reset
            return
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()  # an end of stream stays an end of stream


class ServedStore:
    """``with ServedStore(store_dir, "fleet/a") as s: ... s.url ...``"""

    def __init__(self, root: Path, prefix: str = "store") -> None:
        self.server = FaultyServer(root, prefix)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="served-store")
        self.proxy: WireCounter | None = None
        self.url = ""
        self.direct_url = ""

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def __enter__(self) -> ServedStore:
        self._thread.start()
        self.direct_url = self._call(self.server.start())
        assert self.server._runner is not None
        port = self.server._runner.addresses[0][1]
        self.proxy = WireCounter(port)
        proxy_port = self._call(self.proxy.start())
        self.url = f"http://127.0.0.1:{proxy_port}/{self.server.prefix}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proxy is not None:
            self._call(self.proxy.stop())
        self._call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    # -- what the tests look at -----------------------------------------------------------

    def set_faults(self, faults: Faults | None = None) -> None:
        """Replace the fault knobs (set them only while no agent is running)."""
        self.server.faults = faults or Faults()

    def mark(self) -> tuple[int, Wire]:
        """A point in the request log and the wire counters, for :meth:`since`."""
        assert self.proxy is not None
        w = self.proxy.wire
        return len(self.server.requests), Wire(w.connections, w.up, w.down)

    def since(self, mark: tuple[int, Wire]) -> tuple[list[Served], Wire]:
        """Requests logged and raw traffic since ``mark``."""
        assert self.proxy is not None
        n, w0 = mark
        w = self.proxy.wire
        return (list(self.server.requests[n:]),
                Wire(w.connections - w0.connections, w.up - w0.up, w.down - w0.down))


class SlowUplink:
    """``with SlowUplink(port, rate) as proxy: ... proxy.port ... proxy.wire.up``: a
    :class:`WireCounter` to 127.0.0.1:``port`` on its own event loop in a daemon thread, each
    connection sending at most ``rate`` bytes per second to the server (a publisher's slow,
    metered uplink), answers unthrottled."""

    def __init__(self, upstream_port: int, rate: float) -> None:
        self.proxy = WireCounter(upstream_port, up_rate=rate)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="slow-uplink")

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def __enter__(self) -> WireCounter:
        self._thread.start()
        self._call(self.proxy.start())
        return self.proxy

    def __exit__(self, *exc: object) -> None:
        self._call(self.proxy.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@contextlib.asynccontextmanager
async def faulty_http_store(root: Path, attempts: int
                            ) -> AsyncIterator[tuple[FaultyServer, Source]]:
    """A :class:`FaultyServer` over ``root/http`` on the running loop, and a source reading it
    that retries ``attempts`` times without waiting (in-process download tests)."""
    (root / "http").mkdir()
    srv = FaultyServer(root / "http", "store")
    await srv.start()
    source = open_source(srv.url, retry=RetryPolicy(attempts=attempts, base=0.0, cap=0.0))
    try:
        yield srv, source
    finally:
        await source.close()
        await srv.stop()
