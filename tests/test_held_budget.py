"""Held downloads (issue 12; found in review): the hold budget (``edge_agent.fetch.Held``) is
given back on every failure path of :func:`edge_agent.fetch.download`.

A damaged partial file is fetched again from byte 0 once. When the first fetch had come back
held (a store that ignored the Range and sent its whole object, whose SHA-256 then failed),
its bytes stayed in ``data`` while the second fetch ran: if that one failed or was cancelled,
``download`` saw ``data`` set and never gave the budget back, so every later download of the
install had less room to be held in (a leak for the rest of the install).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devtools.faulty_http import FaultyServer
from edge_agent.fetch import Held, download
from edge_agent.layout import DeviceLayout
from manifest.metadata import ObjectRef
from manifest.storage.source import Source

from ._served_store import faulty_http_store

MiB = 1 << 20


@pytest.fixture
async def http_store(tmp_path: Path) -> AsyncIterator[tuple[FaultyServer, Source]]:
    async with faulty_http_store(tmp_path, attempts=3) as served:
        yield served


async def test_the_budget_comes_back_when_the_second_fetch_of_a_damaged_download_is_cancelled(
        http_store: tuple[FaultyServer, Source], tmp_path: Path) -> None:
    server, source = http_store
    data = os.urandom(MiB)
    ref = ObjectRef(hashlib.sha256(data).hexdigest(), len(data), "dspatch")
    server.put(ref.key, data[:-1] + bytes([data[-1] ^ 0xFF]))  # the store's bytes are wrong
    server.faults.ignore_range = True  # ... and it sends them whole, whatever was asked
    server.faults.stalls = [0.0, 60.0]  # the second fetch hangs until it is cancelled
    layout = DeviceLayout(tmp_path / "dev")
    layout.prepare()
    layout.download_path(ref.sha256).write_bytes(data[:1000])  # a partial file of a past run
    held = Held()
    task = asyncio.ensure_future(
        download(layout, source, asyncio.Semaphore(1), ref, "g", lambda n: None, held))
    while len(server.requests) < 2:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [r.range for r in server.requests] == ["bytes=1000-", None]  # the case under test
    assert held.used == 0
