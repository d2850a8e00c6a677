"""Device side (found in review): `verify --repair` acts on the version live once it holds the
lock, not on the one it read before waiting for a running cycle."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from edge_agent.operations import VerifyResult

from .test_agent_operations import Device


class _Waiting(logging.Handler):
    """Set when the lock says it waits for another holder."""

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "waiting for another deltaship-agent" in record.getMessage():
            self.event.set()


def test_a_repair_that_waited_for_a_cycle_repairs_what_is_live_after_it(
        tmp_path: Path) -> None:
    """v1 is live and damaged; `verify --repair` sees that, then waits for a cycle that
    switches to v2. It must not repair v1 (no longer live) nor tell the model server to load
    v1: it looks again under the lock and finds v2 intact."""
    told = tmp_path / "told"
    dev = Device(tmp_path / "model", {"notify": [
        {"kind": "command", "argv": ["sh", "-c", f"echo {{version}} >> {told}"]}]})
    dev.updates("v2", "v1")  # v1 live, v2 retained
    os.unlink(dev.layout.version_dir("v1") / "g.safetensors")

    waiting = _Waiting()
    log = logging.getLogger("deltaship.agent")
    log.addHandler(waiting)
    results: list[VerifyResult | BaseException] = []

    def verify() -> None:
        try:
            results.append(dev.operator().verify(repair=True))
        except BaseException as e:
            results.append(e)

    try:
        with dev.layout.lock():  # the cycle
            t = threading.Thread(target=verify)
            t.start()
            assert waiting.event.wait(60), results
            dev.layout.switch("v2")
        t.join(60)
    finally:
        log.removeHandler(waiting)
    assert len(results) == 1
    result = results[0]
    assert isinstance(result, VerifyResult), result
    assert (result.version, result.damaged, result.repaired) == ("v2", (), False)
    assert not told.exists() or "v1" not in told.read_text()
    assert not (dev.layout.version_dir("v1") / "g.safetensors").exists()  # left as it was

