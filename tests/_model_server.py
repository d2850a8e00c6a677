"""The reference model server as a real process, and clients that load it, for tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

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


@dataclass
class Answer:
    client: int
    prompt: int
    version: str
    logits_sha256: str
    header_version: str


@dataclass
class Load:
    """``clients`` concurrent clients posting /v1/forward in a loop until stopped."""

    url: str
    prompts: Sequence[Sequence[int]]
    clients: int = 32
    answers: list[Answer] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=60)

    def per_client(self) -> dict[int, list[Answer]]:
        out: dict[int, list[Answer]] = {}
        for a in self.answers:
            out.setdefault(a.client, []).append(a)
        return out

    async def _main(self) -> None:
        conn = aiohttp.TCPConnector(limit=self.clients)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
            await asyncio.gather(*(self._client(session, i) for i in range(self.clients)))

    async def _client(self, session: aiohttp.ClientSession, i: int) -> None:
        n = i
        while not self._stop.is_set():
            prompt = n % len(self.prompts)
            n += 1
            try:
                async with session.post(self.url + "/v1/forward",
                                        json={"tokens": list(self.prompts[prompt])}) as r:
                    body = await r.json()
                    if r.status != 200:
                        self.failures.append(f"client {i}: HTTP {r.status} {body}")
                        continue
                    self.answers.append(Answer(i, prompt, body["version"],
                                               body["logits_sha256"],
                                               r.headers["X-Deltaship-Version"]))
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                self.failures.append(f"client {i}: {type(e).__name__}: {e}")


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
