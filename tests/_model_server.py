"""The reference model server as a real process, and clients that load it, for tests."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from devtools.serveproc import ServeProcess

from .conftest import Cli


class ModelServer(ServeProcess):
    """The server on ``model_dir``, polling every 0.5 s; helpers to wait for its swaps."""

    def __init__(self, cli: Cli, model_dir: Path, *extra: object) -> None:
        name = f"{model_dir.name}-server-{id(self)}"
        super().__init__(model_dir, model_dir.parent / f"{name}.pid",
                         model_dir.parent / f"{name}.log", "--poll-interval", "0.5",
                         *map(str, extra), env=cli.env())

    def stats(self) -> dict[str, Any]:
        return self.get("/stats")[1]

    def wait_version(self, version: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.get("/version")[1]["version"] != version:
            if time.monotonic() > deadline:
                raise AssertionError(f"server still serves {self.get('/version')[1]}")
            time.sleep(0.05)

    def wait_swaps(self, n: int, timeout: float = 30) -> list[dict[str, Any]]:
        """The first ``n`` swap records (written just after a swap goes live)."""
        deadline = time.monotonic() + timeout
        while len(swaps := self.stats()["swaps"]) < n:
            assert time.monotonic() < deadline, f"only {len(swaps)} swaps recorded"
            time.sleep(0.02)
        return list(swaps[:n])


def is_subsequence(seen: Sequence[str], timeline: Sequence[str]) -> bool:
    """Whether ``seen`` (consecutive repeats collapsed) occurs in order within ``timeline``."""
    collapsed = [v for k, v in enumerate(seen) if k == 0 or seen[k - 1] != v]
    it: Iterator[str] = iter(timeline)
    return all(any(v == t for t in it) for v in collapsed)


@contextlib.contextmanager
def serving(cli: Cli, model_dir: Path, *extra: object) -> Iterator[ModelServer]:
    server = ModelServer(cli, model_dir, *extra)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log.read_text()
