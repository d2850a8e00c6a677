"""The agent's face of the storage layer against real servers: faulty HTTP, moto S3, directories.

Nothing sleeps for real between retries: sources get a fake ``sleep`` that records the delays.
Byte counts come from the server (what crossed the wire), not from the client.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

import boto3
import pytest

from devtools.faulty_http import Faults, FaultyServer
from manifest.errors import (
    HashMismatchError,
    MissingKeyError,
    OversizeError,
    StoreConfigError,
    TransportError,
)
from manifest.storage.retry import RetryPolicy, RetryState
from manifest.storage.source import (
    BLOCK,
    READ_SIZE,
    HttpSource,
    LocalSource,
    S3Source,
    Source,
    TransferLimits,
    open_source,
)

MiB = 1 << 20


class FakeSleep:
    """Records the delays a source asks for and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
def sleep() -> FakeSleep:
    return FakeSleep()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[FaultyServer]:
    (tmp_path / "http").mkdir()
    srv = FaultyServer(tmp_path / "http", "pre/fix")
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def http(server: FaultyServer, sleep: FakeSleep) -> AsyncIterator[Source]:
    source = open_source(server.url, sleep=sleep)
    yield source
    await source.close()


@dataclass
class Store:
    source: Source
    put: Callable[[str, bytes], None]
    server: FaultyServer | None = None


@pytest.fixture(params=["http", "s3", "local"])
async def store(request: pytest.FixtureRequest, server: FaultyServer, tmp_path: Path,
                sleep: FakeSleep) -> AsyncIterator[Store]:
    """The same store layout behind each kind of source."""
    if request.param == "http":
        s = Store(open_source(server.url, sleep=sleep), server.put, server)
    elif request.param == "s3":
        bucket = request.getfixturevalue("bucket")
        endpoint = request.getfixturevalue("s3_endpoint")
        client = boto3.client("s3", endpoint_url=endpoint)

        def put_s3(key: str, data: bytes) -> None:
            client.put_object(Bucket=bucket, Key=f"pre/fix/{key}", Body=data)

        s = Store(open_source(f"s3://{bucket}/pre/fix", endpoint_url=endpoint, sleep=sleep),
                  put_s3)
    else:
        root = tmp_path / "local"

        def put_local(key: str, data: bytes) -> None:
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            (root / key).write_bytes(data)

        root.mkdir()
        s = Store(open_source(f"file://{root}", sleep=sleep), put_local)
    yield s
    await s.source.close()


# --- every kind of source -------------------------------------------------------------------


async def test_get_small_is_conditional(store: Store) -> None:
    store.put("manifest.json", b"one")
    data, etag = await store.source.get_small("manifest.json", 100)
    assert data == b"one" and etag
    assert await store.source.get_small("manifest.json", 100, etag) == (None, etag)
    store.put("manifest.json", b"two!")
    data, etag2 = await store.source.get_small("manifest.json", 100, etag)
    assert data == b"two!" and etag2 not in (None, etag)
    if store.server:  # the unchanged poll was a 304 without a body
        wire = [(r.if_none_match, r.status, r.sent) for r in store.server.requests]
        assert wire == [(None, 200, 3), (etag, 304, 0), (etag, 200, 4)]


async def test_missing_and_oversized_are_not_retried(store: Store, sleep: FakeSleep,
                                                     tmp_path: Path) -> None:
    with pytest.raises(MissingKeyError, match="missing from the store"):
        await store.source.get_small("manifest.json", 100)
    with pytest.raises(MissingKeyError):
        await store.source.fetch("objects/none", tmp_path / "d", 10)
    store.put("manifest.json", b"x" * 101)
    with pytest.raises(OversizeError, match="100-byte cap"):
        await store.source.get_small("manifest.json", 100)
    assert (await store.source.get_small("manifest.json", 101))[0] == b"x" * 101
    assert sleep.delays == []


async def test_fetch_resumes_a_partial_file(store: Store, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 17)
    store.put("objects/a", data)
    dest = tmp_path / "partial"
    dest.write_bytes(data[: MiB + 7])  # left by an interrupted run
    got: list[int] = []
    await store.source.fetch("objects/a", dest, len(data), got.append)
    assert dest.read_bytes() == data
    assert sum(got) == len(data) - (MiB + 7)
    await store.source.fetch("objects/a", dest, len(data), got.append)  # complete: no request
    assert sum(got) == len(data) - (MiB + 7)
    if store.server:
        assert [r.range for r in store.server.requests] == [f"bytes={MiB + 7}-"]
        assert store.server.bytes_sent == len(data) - (MiB + 7)


async def test_fetch_of_an_empty_object_needs_no_request(store: Store, tmp_path: Path) -> None:
    await store.source.fetch("objects/empty", tmp_path / "d", 0)
    assert (tmp_path / "d").read_bytes() == b""
    if store.server:
        assert store.server.requests == []


async def test_fetch_refuses_another_length(store: Store, tmp_path: Path) -> None:
    store.put("objects/a", b"x" * 1000)
    dest = tmp_path / "d"
    with pytest.raises(OversizeError, match="1000 bytes, the index pins 999"):
        await store.source.fetch("objects/a", dest, 999)
    assert not dest.exists()
    with pytest.raises(HashMismatchError, match="1000 bytes, the index pins 1001"):
        await store.source.fetch("objects/a", dest, 1001)
    assert not dest.exists()
    dest.write_bytes(b"x" * 1000)  # a stale partial file as long as the object: 416, restart
    with pytest.raises(HashMismatchError):
        await store.source.fetch("objects/a", dest, 1001)
    assert not dest.exists()


# --- HTTP faults -----------------------------------------------------------------------------


async def test_endless_metadata_is_cut_at_the_cap(server: FaultyServer, http: Source) -> None:
    server.put("manifest.json", b"{}")
    server.faults.endless = True
    tracemalloc.start()
    try:
        with pytest.raises(OversizeError, match="larger than its 1048576-byte cap"):
            await http.get_small("manifest.json", MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MiB + BLOCK + READ_SIZE  # the cap, a block of buffers, not the endless body
    assert len(server.requests) == 1


async def test_endless_object_is_cut_at_its_length(server: FaultyServer, http: Source,
                                                   tmp_path: Path) -> None:
    server.put("objects/a", b"a")
    server.faults.endless = True
    dest = tmp_path / "d"
    with pytest.raises(OversizeError, match="more than the 2097152 bytes"):
        await http.fetch("objects/a", dest, 2 * MiB)
    assert not dest.exists() and len(server.requests) == 1


async def test_fetch_resumes_after_a_connection_reset(server: FaultyServer, http: Source,
                                                      sleep: FakeSleep, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    server.put("objects/a", data)
    server.faults.resets = [MiB]
    got: list[int] = []
    await http.fetch("objects/a", tmp_path / "d", len(data), got.append)
    assert (tmp_path / "d").read_bytes() == data and sum(got) == len(data)
    first, second = server.requests
    assert first.range is None and first.sent == MiB
    assert second.status == 206 and second.range is not None
    resumed_at = int(second.range.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= MiB  # a reset may lose what was in flight, never more
    assert server.bytes_sent <= len(data) + MiB  # far from twice the file
    assert len(sleep.delays) == 1


async def test_truncated_body_is_resumed_exactly(server: FaultyServer, http: Source,
                                                 tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    server.put("objects/a", data)
    server.faults.truncations = [MiB + 5]
    await http.fetch("objects/a", tmp_path / "d", len(data))
    assert (tmp_path / "d").read_bytes() == data
    assert [r.range for r in server.requests] == [None, f"bytes={MiB + 5}-"]
    assert server.bytes_sent == len(data)


async def test_server_ignoring_range_restarts_from_zero(
    server: FaultyServer, http: Source, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(2 * MiB)
    server.put("objects/a", data)
    dest = tmp_path / "d"
    dest.write_bytes(data[:MiB])
    server.faults.ignore_range = True
    with caplog.at_level(logging.WARNING, logger="manifest.storage"):
        await http.fetch("objects/a", dest, len(data))
    assert dest.read_bytes() == data
    assert [(r.range, r.status) for r in server.requests] == [(f"bytes={MiB}-", 200)]
    assert "ignored the Range request" in caplog.text


async def test_server_ignoring_range_after_a_reset(server: FaultyServer, http: Source,
                                                   tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    server.put("objects/a", data)
    server.faults = Faults(ignore_range=True, resets=[MiB])
    await http.fetch("objects/a", tmp_path / "d", len(data))
    assert (tmp_path / "d").read_bytes() == data
    assert [r.status for r in server.requests] == [200, 200]
    assert server.bytes_sent == MiB + len(data)


async def test_no_endless_loop_when_range_is_ignored_and_links_drop(
    server: FaultyServer, http: Source, tmp_path: Path
) -> None:
    server.put("objects/a", os.urandom(MiB))
    server.faults = Faults(ignore_range=True, resets=[256 * 1024] * 20)
    with pytest.raises(TransportError, match="gave up after 6 tries"):
        await http.fetch("objects/a", tmp_path / "d", MiB)
    assert 6 <= len(server.requests) <= 8  # restarts that get no further are not progress


@pytest.mark.parametrize(
    ("status", "error", "requests"),
    [
        (500, None, 4),
        (502, None, 4),
        (503, None, 4),
        (429, None, 4),
        (408, None, 4),
        (400, StoreConfigError, 1),
        (401, StoreConfigError, 1),
        (403, StoreConfigError, 1),
    ],
)
async def test_status_codes(server: FaultyServer, http: Source, sleep: FakeSleep, tmp_path: Path,
                            status: int, error: type[Exception] | None, requests: int) -> None:
    server.put("objects/a", b"abc")
    server.faults = Faults(fail=3, fail_status=status)
    if error is None:
        await http.fetch("objects/a", tmp_path / "d", 3)
        assert (tmp_path / "d").read_bytes() == b"abc"
    else:
        with pytest.raises(error, match=f"HTTP {status}"):
            await http.fetch("objects/a", tmp_path / "d", 3)
    assert len(server.requests) == requests and len(sleep.delays) == requests - 1


@pytest.mark.parametrize(
    ("header", "low", "high"),
    [
        ("7", 7.0, 7.0),
        ("60", 60.0, 60.0),  # up to the policy's cap: waited within the request (longer ends
        # the request at once, for the next poll to wait: tests/test_agent_schedule.py)
        ("an HTTP date 30 s ahead", 28.0, 30.0),
        ("soon", 0.25, 1.0),  # unreadable: plain backoff
    ],
)
async def test_retry_after_is_honoured(server: FaultyServer, http: Source, sleep: FakeSleep,
                                       header: str, low: float, high: float) -> None:
    if header.startswith("an HTTP date"):
        header = formatdate(time.time() + 30, usegmt=True)
    server.put("manifest.json", b"{}")
    server.faults = Faults(fail=2, fail_status=503, retry_after=header)
    assert (await http.get_small("manifest.json", 100))[0] == b"{}"
    assert len(sleep.delays) == 2 and all(low <= d <= high for d in sleep.delays)


async def test_retry_after_outlives_the_request(server: FaultyServer, http: Source,
                                                sleep: FakeSleep) -> None:
    """When the tries run out, the error keeps the store's Retry-After for the next poll."""
    server.put("manifest.json", b"{}")
    server.faults = Faults(fail=100, fail_status=503, retry_after="42")
    with pytest.raises(TransportError, match="gave up") as raised:
        await http.get_small("manifest.json", 100)
    assert raised.value.retry_after == 42.0
    assert RetryState(RetryPolicy()).failed(raised.value, raised.value.retry_after) == 42.0


async def test_retries_exhausted(server: FaultyServer, http: Source, sleep: FakeSleep,
                                 tmp_path: Path) -> None:
    server.put("objects/a", b"abc")
    server.faults.fail = 100
    with pytest.raises(TransportError) as raised:
        await http.fetch("objects/a", tmp_path / "d", 3)
    message = str(raised.value)
    assert type(raised.value) is TransportError and "\n" not in message
    assert f"{server.url}/objects/a" in message and "HTTP 500" in message
    assert "gave up after 6 tries" in message and "retry later" in message
    assert len(server.requests) == 6
    assert len(sleep.delays) == 5 and sleep.delays == sorted(sleep.delays)


async def test_unreachable_host(sleep: FakeSleep) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    source = open_source(f"http://127.0.0.1:{port}/store", sleep=sleep)
    try:
        with pytest.raises(TransportError) as raised:
            await source.get_small("manifest.json", 100)
    finally:
        await source.close()
    message = str(raised.value)
    assert "\n" not in message and message.startswith(
        f"cannot reach http://127.0.0.1:{port}/store/manifest.json")
    assert len(sleep.delays) == 5


async def test_stalled_server_times_out_and_is_retried(server: FaultyServer, sleep: FakeSleep,
                                                       tmp_path: Path) -> None:
    server.put("objects/a", b"abc")
    server.faults.stalls = [1.0]
    source = open_source(server.url, limits=TransferLimits(timeout=0.2), sleep=sleep)
    try:
        await source.fetch("objects/a", tmp_path / "d", 3)
    finally:
        await source.close()
    assert (tmp_path / "d").read_bytes() == b"abc"
    assert len(server.requests) == 2 and len(sleep.delays) == 1


@pytest.mark.parametrize("files", [1, 2])
async def test_max_rate_is_shared_by_all_downloads(server: FaultyServer, sleep: FakeSleep,
                                                   tmp_path: Path, files: int) -> None:
    size, rate = 1_000_000, 4_000_000.0
    blobs = [os.urandom(size // files) for _ in range(files)]
    for i, blob in enumerate(blobs):
        server.put(f"objects/{i}", blob)
    source = open_source(server.url, max_rate=rate, sleep=sleep)
    try:
        start = time.monotonic()
        await asyncio.gather(*(source.fetch(f"objects/{i}", tmp_path / str(i), len(blob))
                               for i, blob in enumerate(blobs)))
        elapsed = time.monotonic() - start
    finally:
        await source.close()
    assert elapsed >= 0.8 * size / rate  # a lower bound only: slow machines are fine
    assert all((tmp_path / str(i)).read_bytes() == b for i, b in enumerate(blobs))


# --- S3 and local specifics --------------------------------------------------------------------


async def test_s3_resume_sends_a_range_request(bucket: str, s3_endpoint: str,
                                               tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(Bucket=bucket, Key="p/objects/a",
                                                            Body=data)
    source = open_source(f"s3://{bucket}/p", endpoint_url=s3_endpoint)
    assert isinstance(source, S3Source)
    sent: list[str | None] = []

    def record(request: Any, **kwargs: Any) -> None:
        sent.append(request.headers.get("Range"))

    source._client.meta.events.register("before-send.s3.GetObject", record)
    dest = tmp_path / "d"
    dest.write_bytes(data[:12345])
    await source.fetch("objects/a", dest, len(data))
    await source.close()
    assert dest.read_bytes() == data
    assert [r.decode() if isinstance(r, bytes) else r for r in sent] == ["bytes=12345-"]


async def test_s3_missing_bucket(s3_endpoint: str) -> None:
    source = open_source("s3://no-such-bucket-here/p", endpoint_url=s3_endpoint)
    with pytest.raises(StoreConfigError, match="does not exist"):
        await source.get_small("manifest.json", 100)


async def test_local_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreConfigError, match="does not exist"):
        await open_source(str(tmp_path / "nowhere")).get_small("manifest.json", 100)


async def test_keys_cannot_escape_the_prefix(tmp_path: Path) -> None:
    source = open_source(str(tmp_path))
    for key in ("../x", "/etc/passwd", "objects//a", "a/./b", ""):
        with pytest.raises(ValueError, match="not a store key"):
            await source.get_small(key, 10)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://cdn.example/models/", (HttpSource, "https://cdn.example/models")),
        ("http://127.0.0.1:8080/s", (HttpSource, "http://127.0.0.1:8080/s")),
        ("s3://bkt/a/b/", (S3Source, "s3://bkt/a/b")),
        ("file:///srv/store", (LocalSource, "file:///srv/store")),
        ("/srv/store", (LocalSource, "file:///srv/store")),
        ("s3:///prefix", "no bucket"),
        ("https:///prefix", "no host"),
        ("file://elsewhere/x", "remote host"),
        ("ftp://host/x", "unsupported store URL"),
    ],
)
def test_store_urls(url: str, expected: tuple[type, str] | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(StoreConfigError, match=expected):
            open_source(url)
        return
    source = open_source(url, endpoint_url="http://127.0.0.1:9")
    assert isinstance(source, expected[0]) and source.url == expected[1]


async def _killed_on_a_slow_link(server: FaultyServer, dest: Path, method: str) -> int:
    """Start a real process downloading 1 MiB at 128 KiB/s with ``Source.<method>`` into
    ``dest``, SIGKILL it once ``dest`` holds 128 KiB; return the length ``dest`` kept."""
    import signal
    import subprocess
    import sys

    server.put("objects/a", os.urandom(MiB))
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from manifest.storage.source import open_source\n"
        "async def main():\n"
        f"    s = open_source({server.url!r}, max_rate=128 * 1024)\n"
        f"    await s.{method}('objects/a', Path({str(dest)!r}), {MiB})\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while (not dest.exists() or dest.stat().st_size < 128 * 1024) and proc.poll() is None:
            assert time.monotonic() < deadline, "nothing was written to the partial file"
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return dest.stat().st_size


async def test_a_killed_download_on_a_slow_link_keeps_what_arrived(
        server: FaultyServer, tmp_path: Path) -> None:
    """The partial file is written every FLUSH_SECONDS too, not only per 1 MiB block: a
    SIGKILLed process (a real one) loses at most that much of a slow download."""
    kept = await _killed_on_a_slow_link(server, tmp_path / "partial", "fetch")
    assert 128 * 1024 <= kept < MiB


# --- held downloads: kept in memory while they are fast, spilled to disk when they are not ----


async def test_a_held_download_comes_back_as_bytes_and_writes_nothing(
        server: FaultyServer, http: Source, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 17)
    server.put("objects/a", data)
    got: list[int] = []
    sha, held = await http.fetch_held("objects/a", tmp_path / "d", len(data), got.append)
    assert held == data and sha == hashlib.sha256(data).hexdigest()
    assert not (tmp_path / "d").exists()  # never written, so never read back nor deleted
    assert sum(got) == len(data) and len(server.requests) == 1


async def test_a_held_download_past_its_hold_time_is_spilled_to_disk(
        server: FaultyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow link: once the download runs past HOLD_SECONDS its bytes go to the partial file
    (where a restart resumes them) and the rest follows them there."""
    monkeypatch.setattr("manifest.storage._source_base.HOLD_SECONDS", 0.2)
    data = os.urandom(MiB)
    server.put("objects/a", data)
    source = open_source(server.url, max_rate=2 * MiB)  # about half a second
    try:
        sha, held = await source.fetch_held("objects/a", tmp_path / "d", len(data))
    finally:
        await source.close()
    assert held is None and sha == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "d").read_bytes() == data and len(server.requests) == 1


@pytest.mark.parametrize("fault", ["reset", "truncation"])
async def test_a_broken_held_download_is_spilled_and_resumed_with_range(
        server: FaultyServer, http: Source, tmp_path: Path, fault: str) -> None:
    data = os.urandom(3 * MiB)
    server.put("objects/a", data)
    if fault == "reset":
        server.faults.resets = [MiB]
    else:
        server.faults.truncations = [MiB + 5]
    sha, held = await http.fetch_held("objects/a", tmp_path / "d", len(data))
    assert sha == hashlib.sha256(data).hexdigest()
    assert held is None and (tmp_path / "d").read_bytes() == data  # resumed on disk
    first, second = server.requests
    assert first.range is None and second.status == 206 and second.range is not None
    resumed_at = int(second.range.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= MiB + 5
    assert server.bytes_sent <= len(data) + MiB


async def test_a_cancelled_held_download_keeps_what_arrived(
        server: FaultyServer, tmp_path: Path) -> None:
    """A try cancelled mid-way (the agent stopping, a sibling download failing) writes what
    it held, so that the next run resumes it instead of starting over."""
    data = os.urandom(2 * MiB)
    server.put("objects/a", data)
    source = open_source(server.url, max_rate=MiB)
    dest = tmp_path / "d"
    got: list[int] = []
    try:
        task = asyncio.ensure_future(source.fetch_held("objects/a", dest, len(data), got.append))
        while sum(got) < 256 * 1024:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await source.close()
    kept = dest.read_bytes()
    assert len(kept) >= 256 * 1024 and kept == data[:len(kept)]


async def test_a_killed_held_download_on_a_slow_link_loses_at_most_its_hold_time(
        server: FaultyServer, tmp_path: Path) -> None:
    """SIGKILL (a real one) can cost a held download only what arrived before it was spilled:
    past HOLD_SECONDS the partial file holds the bytes, as for a written download."""
    from manifest.storage._partial_file import HOLD_SECONDS

    kept = await _killed_on_a_slow_link(server, tmp_path / "partial", "fetch_held")
    # Spilled at HOLD_SECONDS (128 KiB/s: about 2 s of bytes at once), then written as it came.
    assert int(128 * 1024 * HOLD_SECONDS * 0.5) <= kept < MiB
