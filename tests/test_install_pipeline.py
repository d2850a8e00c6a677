"""The agent's install pipeline: the parallel proof of local objects, a decode whose hashing
and writing overlap (a writer thread) must fail exactly as a serial one would, and downloads
hashed while they are received (not fsynced; a damaged partial file is fetched again).

Structure only, never timing: the speed is measured by scripts/bench_agent.py against the
machine's limit in the same run.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from devtools.faulty_http import FaultyServer
from edge_agent.fetch import Held, _damaged_objects, download, keep, release
from edge_agent.layout import DeviceLayout
from manifest.container import apply_container
from manifest.errors import FormatError, HashMismatchError, LocalError
from manifest.metadata import ObjectRef
from manifest.storage._partial_file import Digest
from manifest.storage.source import Source
from publisher.encode import EncodeTask, encode_all, hash_groups, layout_group
from publisher.model_dir import open_model

from ._served_store import faulty_http_store


def _layout_with_objects(root: Path, n: int) -> tuple[DeviceLayout, list[str]]:
    layout = DeviceLayout(root)
    layout.prepare()
    shas = []
    for i in range(n):
        data = f"object {i}".encode() * (1000 + i)
        sha = hashlib.sha256(data).hexdigest()
        layout.object_path(sha).write_bytes(data)
        shas.append(sha)
    return layout, shas


def test_parallel_proof_finds_exactly_the_damaged_and_missing_objects(tmp_path: Path) -> None:
    layout, shas = _layout_with_objects(tmp_path / "dev", 6)
    corrupt, missing = shas[1], shas[4]
    path = layout.object_path(corrupt)
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    layout.object_path(missing).unlink()
    reused, bases = set(shas[:3]), set(shas[3:])

    bad = _damaged_objects(layout, reused, bases)

    assert bad == {corrupt, missing}
    serial = DeviceLayout(tmp_path / "dev").damaged_objects(reused, bases)
    assert serial == bad
    layout.save_stamps()  # the intact ones were recorded as proven, the others were not
    recorded = set(json.loads(layout.stamps_file.read_text()))
    assert recorded == set(shas) - {corrupt, missing}


def test_parallel_proof_of_one_object(tmp_path: Path) -> None:
    layout, shas = _layout_with_objects(tmp_path / "dev", 1)
    assert _damaged_objects(layout, set(), {shas[0]}) == set()
    layout.object_path(shas[0]).write_bytes(b"other")
    assert _damaged_objects(layout, set(), {shas[0]}) == {shas[0]}


@pytest.fixture(scope="module")
def full_object(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, int]:
    """A full object (container with no base) of a 3-tensor group of several chunks."""
    work = tmp_path_factory.mktemp("obj")
    rng = np.random.default_rng(3)
    save_file({f"t{i}": rng.standard_normal((300, 257)).astype(np.float32) for i in range(3)},
              str(work / "model.safetensors"))
    with open_model(work) as model, ThreadPoolExecutor(2) as ex:
        layout = layout_group("g", [model.tensors[t] for t in sorted(model.tensors)])
        (sha,) = hash_groups([layout], ex)
        task = EncodeTask(layout, sha, None, None, str(work / "obj"))
        list(encode_all([task], ex, chunk_bytes=64 * 1024))
    return work / "obj", sha, layout.length


class _FailingOut:
    """A file that fails with ENOSPC once ``room`` bytes were written."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.written = bytearray()

    def write(self, data: bytes) -> int:
        if len(self.written) + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += data
        return len(data)


@pytest.mark.parametrize("held", [False, True], ids=["file", "held"])
@pytest.mark.parametrize("workers", [None, 1, 2])
def test_decode_writes_every_byte_in_order(
    full_object: tuple[Path, str, int], tmp_path: Path, workers: int | None, held: bool
) -> None:
    path, sha, length = full_object
    obj: Path | bytes = path.read_bytes() if held else path  # a download held in memory
    out = _FailingOut(length)
    if workers is None:
        got = apply_container(obj, None, out, expected=(sha, length))  # type: ignore[arg-type]
    else:
        with ThreadPoolExecutor(workers) as ex:
            got = apply_container(obj, None, out, executor=ex,  # type: ignore[arg-type]
                                  expected=(sha, length))
    assert got == sha
    assert hashlib.sha256(out.written).hexdigest() == sha


@pytest.mark.parametrize("room", [0, 100, 200_000])
def test_a_failing_write_is_raised_not_lost(
    full_object: tuple[Path, str, int], room: int
) -> None:
    obj, sha, length = full_object
    out = _FailingOut(room)
    with ThreadPoolExecutor(2) as ex, pytest.raises(OSError) as info:
        apply_container(obj, None, out, executor=ex, expected=(sha, length))  # type: ignore[arg-type]
    assert info.value.errno == errno.ENOSPC
    assert len(out.written) <= room


@pytest.mark.parametrize("cut", [1, 1000, 100_000])
def test_a_held_container_cut_short_is_refused(
    full_object: tuple[Path, str, int], cut: int
) -> None:
    """The bytes of a held download are bounds-checked as a file's reads are."""
    path, sha, length = full_object
    data = path.read_bytes()[:-cut]
    with pytest.raises(FormatError, match="shorter than its header says"):
        apply_container(data, None, _FailingOut(length),  # type: ignore[arg-type]
                        expected=(sha, length))


# --- downloads: hashed while received, never fsynced, a damaged partial file fetched again ----


@pytest.fixture
async def http_store(tmp_path: Path) -> AsyncIterator[tuple[FaultyServer, Source]]:
    async with faulty_http_store(tmp_path, attempts=4) as served:
        yield served


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_fetch_returns_the_sha256_of_the_file_it_wrote(
        http_store: tuple[FaultyServer, Source], tmp_path: Path) -> None:
    """Fresh, cut off and resumed (the prefix on disk is hashed once, then the rest as it
    arrives), already complete, longer than pinned, and empty: the digest is always the
    file's, and the file holds exactly the object."""
    server, source = http_store
    data = os.urandom(3 * 2**20 + 123)
    server.put("objects/a", data)
    server.put("objects/e", b"")
    dest = tmp_path / "d"

    assert await source.fetch("objects/a", dest, len(data)) == _sha(data)
    assert dest.read_bytes() == data

    dest.write_bytes(data[:2**20 + 7])  # a partial file from an earlier run
    server.faults.truncations = [2**20]  # and this run is cut off once more
    assert await source.fetch("objects/a", dest, len(data)) == _sha(data)
    assert dest.read_bytes() == data
    assert [r.range for r in server.requests[-2:]] == [f"bytes={2**20 + 7}-",
                                                        f"bytes={2 * 2**20 + 7}-"]

    n = len(server.requests)
    assert await source.fetch("objects/a", dest, len(data)) == _sha(data)  # complete
    assert len(server.requests) == n

    dest.write_bytes(data + b"extra")  # longer than pinned: downloaded again
    assert await source.fetch("objects/a", dest, len(data)) == _sha(data)
    assert dest.read_bytes() == data

    dest.write_bytes(b"junk")
    assert await source.fetch("objects/e", dest, 0) == _sha(b"")
    assert dest.read_bytes() == b""


def test_digest_follows_the_file_it_covers(tmp_path: Path) -> None:
    path = tmp_path / "p"
    path.write_bytes(b"abcdef")
    d = Digest()
    d.catch_up(path, 4)
    assert d.size == 4 and d.hexdigest() == _sha(b"abcd")
    d.update([b"ef", b"gh"])
    assert d.size == 8 and d.hexdigest() == _sha(b"abcdefgh")
    d.catch_up(path, 3)  # the file was cut below what the digest covers: start over
    assert d.size == 3 and d.hexdigest() == _sha(b"abc")
    with pytest.raises(LocalError, match="shorter"):
        d.catch_up(path, 10)


def _last_byte_flipped(data: bytes) -> bytes:
    """Other bytes of the same length, always (``data[:-1] + b"!"`` equals ``data`` when random
    data happens to end in "!": 1 run in 256)."""
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def _served_object(server: FaultyServer, tmp_path: Path, data: bytes,
                   served: bytes | None = None) -> tuple[ObjectRef, DeviceLayout]:
    """An object pinned as ``data`` that the store serves as ``served`` (default ``data``),
    and an empty device layout."""
    ref = ObjectRef(_sha(data), len(data), "dspatch")
    server.put(ref.key, data if served is None else served)
    layout = DeviceLayout(tmp_path / "dev")
    layout.prepare()
    return ref, layout


async def test_a_damaged_partial_download_is_fetched_again_from_byte_0(
        http_store: tuple[FaultyServer, Source], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Partial downloads are not fsynced: after a power loss one may hold garbage (here: its
    length survived, its bytes did not). Its digest fails the pin, and the object is fetched
    again from byte 0, in the same update."""
    server, source = http_store
    data = os.urandom(2 * 2**20)
    ref, layout = _served_object(server, tmp_path, data)
    layout.download_path(ref.sha256).write_bytes(b"\0" * 2**20)  # zeroed blocks
    got: list[int] = []

    path = await download(layout, source, asyncio.Semaphore(1), ref, "g", got.append)

    assert path.read_bytes() == data
    assert [r.range for r in server.requests] == [f"bytes={2**20}-", None]
    assert sum(got) == 2**20 + len(data)  # wire bytes, the second fetch included
    assert "was damaged before this run" in caplog.text


async def test_a_download_that_fails_its_pin_is_refused_and_discarded(
        http_store: tuple[FaultyServer, Source], tmp_path: Path) -> None:
    server, source = http_store
    data = os.urandom(2**20)
    # The store serves other bytes of the same length.
    ref, layout = _served_object(server, tmp_path, data, _last_byte_flipped(data))
    with pytest.raises(HashMismatchError, match="object for g sha256"):
        await download(layout, source, asyncio.Semaphore(1), ref, "g", lambda n: None)
    assert not layout.download_path(ref.sha256).exists()
    assert len(server.requests) == 1  # a fresh download that fails is not fetched twice

    layout.download_path(ref.sha256).write_bytes(data[:1000])  # a resumed one is, once
    with pytest.raises(HashMismatchError):
        await download(layout, source, asyncio.Semaphore(1), ref, "g", lambda n: None)
    assert [r.range for r in server.requests[1:]] == ["bytes=1000-", None]
    assert not layout.download_path(ref.sha256).exists()


async def test_a_download_within_the_hold_budget_comes_back_as_bytes(
        http_store: tuple[FaultyServer, Source], tmp_path: Path) -> None:
    """Held downloads are never written to the device's disk; the budget bounds how many bytes
    are held at once, and one that does not fit is written as before."""
    server, source = http_store
    data = os.urandom(2 * 2**20)
    ref, layout = _served_object(server, tmp_path, data)
    held = Held(limit=3 * 2**20)

    obj = await download(layout, source, asyncio.Semaphore(1), ref, "g", lambda n: None, held)
    assert obj == data and held.used == len(data)
    assert not layout.download_path(ref.sha256).exists()

    # The budget is taken: a second one the same size goes to disk, whole and verified.
    second = await download(layout, source, asyncio.Semaphore(1), ref, "g", lambda n: None, held)
    assert isinstance(second, Path) and second.read_bytes() == data and held.used == len(data)
    release(held, obj)
    release(held, second)
    assert held.used == 0


async def test_a_held_download_that_fails_its_pin_gives_its_budget_back(
        http_store: tuple[FaultyServer, Source], tmp_path: Path) -> None:
    server, source = http_store
    data = os.urandom(2**20)
    ref, layout = _served_object(server, tmp_path, data, _last_byte_flipped(data))
    held = Held()
    with pytest.raises(HashMismatchError, match="object for g sha256"):
        await download(layout, source, asyncio.Semaphore(1), ref, "g", lambda n: None, held)
    assert held.used == 0 and not layout.download_path(ref.sha256).exists()


def test_a_held_download_is_kept_on_disk_when_its_update_fails(tmp_path: Path) -> None:
    """An update that fails after a download was verified (a full disk while building, a
    cancelled sibling) writes the held bytes to the partial file: the next try finds it
    whole and does not download it again."""
    data = os.urandom(2**20 + 3)
    ref = ObjectRef(_sha(data), len(data), "dspatch")
    layout = DeviceLayout(tmp_path / "dev")
    layout.prepare()
    keep(layout, ref, data)
    assert layout.download_path(ref.sha256).read_bytes() == data
    keep(layout, ref, layout.download_path(ref.sha256))  # a path: already on disk, untouched
    assert layout.download_path(ref.sha256).read_bytes() == data
