"""Two concurrent group installs (issue 12; found in review): a build cancelled because another
group failed ends before what it uses is cleaned up.

A build runs in a worker thread, which a cancellation cannot stop. With a bare
``asyncio.to_thread`` the cancelled install ran its exit handlers at once while its thread
went on writing the staged group file (unlinked, so its space stayed taken until the thread
ended): on a full disk (tests/test_agent_faults.py::test_disk_fills_up_during_the_update
[apply], which failed about one run in six) writing the held downloads back for the next try
then failed for want of the space that thread was still filling, and the next try downloaded
everything again.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from edge_agent.fetch import finish_in_thread


async def test_a_cancelled_build_ends_before_the_cancellation_is_seen() -> None:
    started, go = threading.Event(), threading.Event()
    finished: list[bool] = []

    def build() -> None:
        started.set()
        go.wait(timeout=60)
        finished.append(True)

    task = asyncio.ensure_future(finish_in_thread(build))
    while not started.is_set():
        await asyncio.sleep(0.001)
    task.cancel()
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done()  # still waiting for the thread, which is still building
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished == [True]


async def test_a_build_that_fails_after_the_cancellation_is_not_logged_as_unretrieved(
        caplog: pytest.LogCaptureFixture) -> None:
    started, go = threading.Event(), threading.Event()

    def build() -> None:
        started.set()
        go.wait(timeout=60)
        raise OSError("no space left on device")

    task = asyncio.ensure_future(finish_in_thread(build))
    while not started.is_set():
        await asyncio.sleep(0.001)
    task.cancel()
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "never retrieved" not in caplog.text


async def test_a_build_returns_its_result_and_raises_its_error() -> None:
    assert await finish_in_thread(lambda a, b: a + b, 2, b=3) == 5

    def fail() -> None:
        raise OSError("disk")

    with pytest.raises(OSError, match="disk"):
        await finish_in_thread(fail)
