"""Held downloads (issue 12; found in review): a held download spilled to its partial file must
be written whole whatever the number of chunks it arrived in.

A held download keeps every chunk as it was received (no join). An HTTP body arrives in as
many chunks as the socket gave reads: on a real link (TCP segments, TLS records, a dripping
mirror) that is thousands for a few MiB. Spilling them with one ``writev`` of more than
IOV_MAX (1024 on Linux) buffers failed with EINVAL: the try ended in a LocalError ("cannot
write ...: Invalid argument") instead of a partial file the next try resumes, and every
cycle over such a link failed the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devtools.hostile_http import HostileServer, Misbehaviour
from manifest.storage import _partial_file
from manifest.storage._partial_file import Digest, PartialFile
from manifest.storage.source import open_source

KiB = 1024
MiB = 1024 * KiB
PIECE = 256  # bytes per network read of a dripping mirror


class _Clock:
    """``time`` for :mod:`manifest.storage._partial_file`: a monotonic clock the test sets."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    c = _Clock()
    monkeypatch.setattr(_partial_file, "time", c)
    return c


def _pieces(data: bytes) -> list[bytes]:
    return [data[i:i + PIECE] for i in range(0, len(data), PIECE)]


async def test_a_broken_held_download_of_many_chunks_is_spilled_whole(
        tmp_path: Path, clock: _Clock) -> None:
    """The try breaks (here: an error inside the ``async with``) after 3000 chunks: the
    partial file holds exactly those bytes, and the digest covers exactly them."""
    data = os.urandom(3000 * PIECE)
    path, digest = tmp_path / "partial", Digest()
    with pytest.raises(ConnectionResetError):
        async with PartialFile(path, 0, digest, hold_until=clock.now + 2, length=4 * MiB) as out:
            for piece in _pieces(data):
                await out.append(piece)
            raise ConnectionResetError("the connection broke")
    assert path.read_bytes() == data
    assert digest.size == len(data) and digest.hexdigest() == hashlib.sha256(data).hexdigest()


async def test_a_held_download_of_many_chunks_past_its_hold_time_is_spilled_whole(
        tmp_path: Path, clock: _Clock) -> None:
    """3000 chunks held, then the hold time passes: the spill writes them all, and the bytes
    after it follow them in the file."""
    data = os.urandom(4000 * PIECE)
    path, digest = tmp_path / "partial", Digest()
    async with PartialFile(path, 0, digest, hold_until=clock.now + 2, length=len(data)) as out:
        for i, piece in enumerate(_pieces(data)):
            if i == 3000:
                clock.now += 3  # a slow link: past HOLD_SECONDS
            await out.append(piece)
    assert out.data is None  # spilled: the object is in the file
    assert path.read_bytes() == data
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.fixture
async def mirror(tmp_path: Path) -> AsyncIterator[HostileServer]:
    (tmp_path / "store" / "objects").mkdir(parents=True)
    srv = HostileServer(tmp_path / "store")
    await srv.start()
    yield srv
    await srv.stop()


async def test_a_dripped_body_cut_short_is_spilled_and_resumed_over_http(
        mirror: HostileServer, tmp_path: Path) -> None:
    """A real HTTP mirror sends 1 MiB of a 2 MiB object in 256-byte pieces and closes the
    connection: the held download is spilled and the next try resumes it with Range."""
    data = os.urandom(2 * MiB)
    sha = hashlib.sha256(data).hexdigest()
    (mirror.root / "objects" / sha).write_bytes(data)
    mirror.misbehave("objects/", Misbehaviour(body=data[:MiB], drip=(PIECE, 0.0),
                                              headers={"Content-Length": str(len(data))},
                                              times=1))
    source = open_source(mirror.url)
    chunks: list[int] = []
    try:
        got, held = await source.fetch_held(f"objects/{sha}", tmp_path / "d", len(data),
                                            chunks.append)
    finally:
        await source.close()
    assert got == sha and held is None
    assert (tmp_path / "d").read_bytes() == data
    first, second = mirror.requests
    assert first.range is None and second.range == f"bytes={MiB}-"
    # What makes this test meaningful: the first try's bytes came in more reads than one
    # writev takes buffers (IOV_MAX, 1024 on Linux).
    assert len(chunks) > 1024 + 1


async def test_a_held_download_cancelled_as_it_ends_is_spilled(tmp_path: Path) -> None:
    """The cancellation (a sibling group failed) comes as the last byte arrived, while the
    held download is being finished (hashed, joined): what it held is written, as for any
    cancelled held download, instead of being lost with the try."""
    from devtools.faulty_http import FaultyServer

    (tmp_path / "http").mkdir()
    server = FaultyServer(tmp_path / "http", "store")
    await server.start()
    data = os.urandom(3 * MiB + 5)
    server.put("objects/a", data)
    source = open_source(server.url)
    dest = tmp_path / "d"
    got = [0]

    def on_bytes(n: int) -> None:
        got[0] += n
        if got[0] == len(data):
            task.cancel()

    try:
        task = asyncio.ensure_future(source.fetch_held("objects/a", dest, len(data), on_bytes))
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await source.close()
        await server.stop()
    assert got[0] == len(data)
    assert dest.read_bytes() == data  # the next try finds it whole
