"""The reference model server as a real process, and clients that load it, for tests."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .conftest import BIN, Cli


class ModelServer:
    """``deltaship-agent serve`` in its own process; stopped with SIGTERM."""

    def __init__(self, cli: Cli, model_dir: Path, *extra: object) -> None:
        self.pidfile = model_dir.parent / f"{model_dir.name}-server-{id(self)}.pid"
        self.log = model_dir.parent / f"{model_dir.name}-server-{id(self)}.log"
        self._log = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(BIN / "deltaship-agent"), "serve", "--model-dir", str(model_dir), "--port", "0",
             "--pidfile", str(self.pidfile), "--poll-interval", "0.5", *map(str, extra)],
            env=cli.env(), stdout=subprocess.PIPE, stderr=self._log, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        found = re.search(r"http://\S+", line)
        if not found:
            self.stop()
            raise AssertionError(f"server did not start: {line!r}\n{self.log.read_text()}")
        self.url = found[0]

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

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

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=20)
        finally:
            self._log.close()
        return code


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
