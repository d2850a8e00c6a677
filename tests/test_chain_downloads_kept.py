"""Held downloads (issue 12; found in review): the verified downloads of a chain of patches are
kept on disk when the chain's other downloads fail, as docs/FORMAT.md §10 promises ("a held
download is written to its partial file ... when the update fails before its group is
committed (the next try then finds it whole)").

``fetch_group`` gathers a chain's downloads; when one of them failed (a store down, the
update cancelled by a failing sibling group), the ones already finished and held in memory
were only given back to the budget, never written: the next try downloaded them again, while
the unfinished ones (spilled on cancellation) were resumed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from devtools.faulty_http import FaultyServer
from edge_agent.fetch import Held, fetch_group
from edge_agent.layout import DeviceLayout
from manifest.download_plan import GroupStep
from manifest.entries import ChainStep, GroupEntry
from manifest.errors import TransportError
from manifest.metadata import ObjectRef
from manifest.storage.source import Source

from ._served_store import faulty_http_store

MiB = 1 << 20


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
async def http_store(tmp_path: Path) -> AsyncIterator[tuple[FaultyServer, Source]]:
    async with faulty_http_store(tmp_path, attempts=3) as served:
        yield served


def _chain(server: FaultyServer, tmp_path: Path) -> tuple[GroupStep, bytes, bytes, DeviceLayout]:
    """A chain of two patches (their bytes need not be containers: nothing is built) and an
    empty device."""
    first, last = os.urandom(MiB + 5), os.urandom(2 * MiB)
    a = ObjectRef(_sha(first), len(first), "dspatch")
    b = ObjectRef(_sha(last), len(last), "dspatch")
    server.put(a.key, first)
    server.put(b.key, last)
    full = ObjectRef("f" * 64, 10, "dspatch")
    group = GroupEntry("g", "g.safetensors", "e" * 64, 10, (), full)
    step = GroupStep(group, "chain", b, "c" * 64, (ChainStep("c" * 64, "d" * 64, 10, a),))
    layout = DeviceLayout(tmp_path / "dev")
    layout.prepare()
    return step, first, last, layout


async def _fetch(layout: DeviceLayout, source: Source, step: GroupStep, held: Held) -> None:
    # One download at a time: the first patch is whole before the second is asked for.
    with ThreadPoolExecutor(1) as ex:
        await fetch_group(layout, source, asyncio.Semaphore(1), asyncio.Semaphore(1), step,
                          lambda n: None, ex, held)


async def test_a_finished_chain_download_is_kept_when_the_next_one_fails(
        http_store: tuple[FaultyServer, Source], tmp_path: Path) -> None:
    server, source = http_store
    step, first, _, layout = _chain(server, tmp_path)
    assert step.object is not None
    server.faults.only, server.faults.fail = step.object.sha256, 100  # the store fails it
    held = Held()
    with pytest.raises(TransportError):
        await _fetch(layout, source, step, held)
    assert held.used == 0
    a = step.chain[0].object
    assert layout.download_path(a.sha256).read_bytes() == first  # the next try finds it whole


async def test_a_finished_chain_download_is_kept_when_the_update_is_cancelled(
        http_store: tuple[FaultyServer, Source], tmp_path: Path) -> None:
    """A sibling group failed: the update cancels this one while its second patch is on the
    wire. The first patch, whole and verified, is on disk for the next try."""
    server, source = http_store
    step, first, _, layout = _chain(server, tmp_path)
    assert step.object is not None
    server.faults.only, server.faults.stalls = step.object.sha256, [60.0]
    held = Held()
    task = asyncio.ensure_future(_fetch(layout, source, step, held))
    while not any(step.object.sha256 in r.path for r in server.requests):
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert held.used == 0
    a = step.chain[0].object
    assert layout.download_path(a.sha256).read_bytes() == first
