"""The agent's face of the storage layer against a hostile mirror, and its pure parts in tables.

:class:`devtools.hostile_http.HostileServer` answers what no honest store would: 304s to
unconditional requests, absurd ``Content-Range`` and ``Content-Length`` headers, redirects to
anywhere, bodies dripped byte by byte. Each is one failed try (``RetryableError``), retried and
then a ``TransportError`` (exit 4), or refused at once (a redirect elsewhere); never another
exception. Retries do not sleep for real (a fake ``sleep``); pacing does, briefly.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devtools.hostile_http import HostileServer, Misbehaviour
from manifest.errors import MissingKeyError, RetryableError, TransportError
from manifest.storage._http_source import MAX_REDIRECTS
from manifest.storage._pace import Pace
from manifest.storage._wire import content_range, redirect_target
from manifest.storage.retry import DEFAULT_RETRY
from manifest.storage.source import TransferLimits, open_source

TRIES = DEFAULT_RETRY.attempts
BODY = bytes(range(256)) * 40  # 10240 bytes


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[HostileServer]:
    root = tmp_path / "store"
    (root / "objects").mkdir(parents=True)
    (root / "objects" / "a").write_bytes(BODY)
    (root / "manifest.json").write_bytes(b'{"m": 1}')
    srv = HostileServer(root, "pre")
    await srv.start()
    yield srv
    await srv.stop()


async def _small(server: HostileServer, key: str, etag: str | None = None,
                 **kw: object) -> tuple[bytes | None, str | None]:
    source = open_source(server.url, sleep=FakeSleep(), **kw)  # type: ignore[arg-type]
    try:
        return await source.get_small(key, 1 << 20, etag)
    finally:
        await source.close()


async def _fetch(server: HostileServer, dest: Path, **kw: object) -> None:
    source = open_source(server.url, sleep=FakeSleep(), **kw)  # type: ignore[arg-type]
    try:
        await source.fetch("objects/a", dest, len(BODY))
    finally:
        await source.close()


# -- answers that make no sense --------------------------------------------------------------

HUGE_RANGE = {"Content-Range": "bytes 0-9/" + "9" * 5000}
NONSENSE = {
    "304-unconditional": (Misbehaviour(status=304), "304 Not Modified to a request that was not"),
    "206-5000-digits": (Misbehaviour(status=206, headers=HUGE_RANGE), "malformed Content-Range"),
    "206-end-past-total": (Misbehaviour(status=206, headers={"Content-Range": "bytes 0-10/10"}),
                           "malformed Content-Range"),
    "content-length-5000-digits": (Misbehaviour(headers={"Content-Length": "9" * 5000}), "failed"),
    "content-length-short": (Misbehaviour(headers={"Content-Length": "3"}), "failed"),
    "content-length-long": (Misbehaviour(headers={"Content-Length": "20000"}, body=BODY),
                            "broke off|is 20000 bytes"),
}


@pytest.mark.parametrize("case", NONSENSE)
@pytest.mark.parametrize("how", ["get_small", "fetch"])
async def test_nonsense_is_retried_then_a_transport_error(server: HostileServer, tmp_path: Path,
                                                          case: str, how: str) -> None:
    what, says = NONSENSE[case]
    server.misbehave("", what)
    with pytest.raises(Exception) as raised:
        if how == "get_small":
            await _small(server, "objects/a")
        else:
            await _fetch(server, tmp_path / "d")
    error = raised.value
    if case == "content-length-long" and how == "fetch":  # declared more than the index pins
        assert type(error).__name__ == "OversizeError", error
        return
    assert type(error) is TransportError, repr(error)
    assert f"gave up after {TRIES} tries" in str(error) and "\n" not in str(error)
    assert re.search(says, str(error)), error
    assert len(server.requests) == TRIES


async def test_conditional_304_is_still_unchanged(server: HostileServer) -> None:
    data, etag = await _small(server, "manifest.json")
    assert data == b'{"m": 1}'
    assert await _small(server, "manifest.json", etag) == (None, etag)


async def test_206_elsewhere_for_a_document(server: HostileServer) -> None:
    server.misbehave("", Misbehaviour(status=206,
                                      headers={"Content-Range": f"bytes 5-9/{len(BODY)}"}))
    with pytest.raises(TransportError, match="asked for the whole document and got bytes 5-"):
        await _small(server, "objects/a")


# -- redirects -------------------------------------------------------------------------------


async def test_redirect_within_the_origin_is_followed(server: HostileServer) -> None:
    server.misbehave("manifest", Misbehaviour(redirect="/pre/objects/a"))
    data, _ = await _small(server, "manifest.json")
    assert data == BODY
    assert [r.status for r in server.requests] == [302, 200]


async def test_redirect_elsewhere_is_refused_unless_allowed(server: HostileServer,
                                                            tmp_path: Path) -> None:
    other = HostileServer(server.root, "pre")
    await other.start()
    try:
        server.misbehave("manifest", Misbehaviour(redirect=f"{other.url}/{{key}}"))
        with pytest.raises(TransportError) as raised:
            await _small(server, "manifest.json")
        assert not isinstance(raised.value, RetryableError)
        assert f"redirected to {other.url}/manifest.json" in str(raised.value)
        assert other.requests == [] and len(server.requests) == 1
        data, _ = await _small(server, "manifest.json",
                               allow_redirect_hosts=(f"127.0.0.1:{other.port}",))
        assert data == b'{"m": 1}' and len(other.requests) == 1
        with pytest.raises(TransportError, match="another host"):  # another port: not allowed
            await _small(server, "manifest.json", allow_redirect_hosts=("127.0.0.1:1",))
    finally:
        await other.stop()


async def test_redirect_loop_ends(server: HostileServer) -> None:
    server.misbehave("manifest", Misbehaviour(redirect="/pre/manifest.json"))
    with pytest.raises(TransportError, match=f"redirected more than {MAX_REDIRECTS} times"):
        await _small(server, "manifest.json")


async def test_redirect_to_another_scheme_is_refused(server: HostileServer) -> None:
    server.misbehave("manifest", Misbehaviour(redirect="file:///etc/passwd"))
    with pytest.raises(TransportError, match="not an http"):
        await _small(server, "manifest.json")


async def test_missing_after_a_redirect_is_missing(server: HostileServer) -> None:
    server.misbehave("manifest", Misbehaviour(redirect="/pre/nothing"))
    with pytest.raises(MissingKeyError):
        await _small(server, "manifest.json")


# -- slow mirrors ----------------------------------------------------------------------------


async def test_document_deadline(server: HostileServer) -> None:
    server.misbehave("manifest", Misbehaviour(drip=(1, 0.2)))
    limits = TransferLimits(document_deadline=0.5)
    t0 = time.monotonic()
    with pytest.raises(TransportError, match=r"took longer than its 0\.5 s deadline"):
        await _small(server, "manifest.json", limits=limits)
    took = time.monotonic() - t0
    assert len(server.requests) == TRIES
    assert took < TRIES * (0.5 + limits.timeout), took  # never the per-read timeout


async def test_slow_object_keeps_its_bytes_but_is_no_progress(server: HostileServer,
                                                              tmp_path: Path) -> None:
    server.misbehave("objects", Misbehaviour(drip=(4, 0.05)))  # 80 bytes/s
    limits = TransferLimits(min_rate=1000, rate_window=0.5)
    dest = tmp_path / "d"
    with pytest.raises(TransportError, match="too slow"):
        await _fetch(server, dest, limits=limits)
    assert len(server.requests) == TRIES  # slow tries did not reset the budget
    assert 0 < dest.stat().st_size < len(BODY)
    server.behave()
    await _fetch(server, dest, limits=limits)
    assert dest.read_bytes() == BODY
    last = server.requests[-1]
    assert last.status == 206 and last.range is not None  # resumed, not started again


async def test_own_rate_cap_is_not_slowness(server: HostileServer, tmp_path: Path) -> None:
    """max_rate under min_rate: the agent's own throttling does not count against the store."""
    limits = TransferLimits(min_rate=100_000, rate_window=0.2)
    dest = tmp_path / "d"
    await _fetch(server, dest, limits=limits, max_rate=20_000.0)
    assert dest.read_bytes() == BODY and len(server.requests) == 1


# -- the pure parts --------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("bytes 0-9/10", (0, 10)),
    ("bytes 5-9/*", (5, None)),
    (" bytes 7-7/8 ", (7, 8)),
    (f"bytes 0-1/{'9' * 19}", (0, int("9" * 19))),
])
def test_content_range_good(value: str, expected: tuple[int, int | None]) -> None:
    assert content_range(value, "k") == expected


@pytest.mark.parametrize("value", [
    "", "bytes", "bytes 0-9/" + "9" * 20, "bytes 0-9/" + "9" * 5000, "bytes 9-0/10",
    "bytes 0-10/10", "bytes -1-9/10", "items 0-9/10", "bytes 0-9/10, bytes 1-2/10",
])
def test_content_range_bad(value: str) -> None:
    with pytest.raises(RetryableError, match="malformed Content-Range"):
        content_range(value, "k")


@pytest.mark.parametrize(("url", "location", "allowed", "expected"), [
    ("http://a/p/k", "/p/x", (), "http://a/p/x"),
    ("http://a/p/k", "x", (), "http://a/p/x"),
    ("http://a:80/p/k", "http://A/p/x", (), "http://A/p/x"),
    ("https://a/p/k", "https://cdn/x", ("cdn",), "https://cdn/x"),
    ("https://a/p/k", "https://cdn:8443/x", ("cdn:8443",), "https://cdn:8443/x"),
    ("http://a/p/k", "https://cdn/x", ("CDN",), "https://cdn/x"),
])
def test_redirect_followed(url: str, location: str, allowed: tuple[str, ...],
                           expected: str) -> None:
    assert redirect_target(url, location, allowed, "k") == expected


@pytest.mark.parametrize(("url", "location", "allowed", "says"), [
    ("http://a/p/k", "http://b/x", (), "another host"),
    ("http://a/p/k", "http://a:81/x", (), "another host"),
    ("http://a/p/k", "https://a/x", (), "another host"),
    ("https://a/p/k", "http://cdn/x", ("cdn",), "from https to http"),
    ("https://a/p/k", "https://cdn:1/x", ("cdn:2",), "another host"),
    ("http://a/p/k", "ftp://a/x", ("a",), "not an http"),
    ("http://a/p/k", "http://a:notaport/x", (), "not an http"),
])
def test_redirect_refused(url: str, location: str, allowed: tuple[str, ...], says: str) -> None:
    with pytest.raises(TransportError, match=says) as raised:
        redirect_target(url, location, allowed, "k")
    assert not isinstance(raised.value, RetryableError)


def test_pace_floor_and_deadline() -> None:
    limits = TransferLimits(min_rate=100, rate_window=10, document_deadline=25)
    obj = Pace(limits, start=0.0, document=False)
    assert obj.ends_at(0.0) == 10.0  # a full window before judging
    obj.received(600, now=3.0)
    obj.received(400, now=8.0)
    assert obj.ends_at(8.0) == 13.0  # 1000 bytes until the first sample leaves the window
    obj.received(5000, now=12.0)
    assert obj.ends_at(12.0) == 22.0
    obj.paused(4.0)  # the agent's own throttling: the clock stops for the window
    assert obj.ends_at(16.0) == 26.0
    assert "too slow: 0 bytes in the last 10 s" in obj.verdict(40.0)
    doc = Pace(limits, start=100.0, document=True)
    for t in range(100, 130):
        doc.received(10_000, now=float(t))
    assert doc.ends_at(129.0) == 125.0  # the deadline wins over a fast transfer
    assert "took longer than its 25 s deadline" in doc.verdict(125.0)


@pytest.mark.parametrize("field", ["timeout", "document_deadline", "min_rate", "rate_window"])
def test_limits_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TransferLimits(**{field: 0})  # type: ignore[arg-type]
