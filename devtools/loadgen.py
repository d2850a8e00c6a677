"""Keep a model server busy and record what it answered: concurrent clients until stopped.

    python -m devtools.loadgen http://127.0.0.1:8000 --clients 8 --summary load.json

Each client posts ``/v1/forward`` requests back to back. On SIGTERM or SIGINT the clients stop,
the summary (requests, failures, answers per version in the order versions first appeared,
latency percentiles) is written as JSON to ``--summary`` and printed as one line. Exit code 0
when no request failed, 1 otherwise. Used by ``scripts/demo.sh``.

:class:`Load` is the load client of ``scripts/bench_swap.py`` and of the tests
(``tests/test_serve_load.py``) too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

PROMPTS = [[1, 2, 3, 4], [17, 42, 99], [5, 5, 5, 5, 5, 5], [300, 2, 71, 8, 12]]


@dataclass(frozen=True)
class Request:
    """One request as a client saw it; ``version`` is None when it failed."""

    client: int
    prompt: int  # index into the prompts
    start: float  # perf_counter
    end: float
    version: str | None
    logits_sha256: str = ""
    header_version: str = ""  # X-Deltaship-Version

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass
class Load:
    """``clients`` closed-loop clients posting /v1/forward until stopped, in their own thread."""

    url: str
    prompts: Sequence[Sequence[int]] = tuple(PROMPTS)
    clients: int = 8
    requests: list[Request] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    first_seen: dict[str, float] = field(default_factory=dict)  # version -> perf_counter
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def answers(self) -> list[Request]:
        """The requests that were answered."""
        return [r for r in self.requests if r.version is not None]

    def per_client(self) -> dict[int, list[Request]]:
        out: dict[int, list[Request]] = {}
        for r in self.answers:
            out.setdefault(r.client, []).append(r)
        return out

    def start(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)

    def wait_for(self, version: str, timeout: float) -> bool:
        """Whether a response from ``version`` arrived within ``timeout`` seconds."""
        deadline = time.perf_counter() + timeout
        while version not in self.first_seen:
            if time.perf_counter() > deadline:
                return False
            time.sleep(0.005)
        return True

    async def _main(self) -> None:
        conn = aiohttp.TCPConnector(limit=self.clients)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
            await asyncio.gather(*(self._client(session, i) for i in range(self.clients)))

    async def _client(self, session: aiohttp.ClientSession, i: int) -> None:
        n = i
        while not self._stop.is_set():
            prompt = n % len(self.prompts)
            n += 1
            start = time.perf_counter()
            version, sha, header = None, "", ""
            try:
                async with session.post(self.url + "/v1/forward",
                                        json={"tokens": list(self.prompts[prompt])}) as r:
                    body = await r.json()
                    if r.status == 200:
                        version, sha = body["version"], body["logits_sha256"]
                        header = r.headers.get("X-Deltaship-Version", "")
                    else:
                        self.failures.append(f"client {i}: HTTP {r.status} {body}")
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as e:
                self.failures.append(f"client {i}: {type(e).__name__}: {e}")
                await asyncio.sleep(0.05)  # a server that is down: do not spin
            end = time.perf_counter()
            self.requests.append(Request(i, prompt, start, end, version, sha, header))
            if version is not None and version not in self.first_seen:
                self.first_seen[version] = end


def summarize(load: Load) -> dict[str, Any]:
    latencies = sorted(r.latency for r in load.answers)
    versions: dict[str, int] = {}
    for r in load.answers:
        assert r.version is not None
        versions[r.version] = versions.get(r.version, 0) + 1

    def pct(p: float) -> float:
        if not latencies:
            return 0.0
        return round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2)

    return {"requests": len(load.requests), "failed": len(load.failures),
            "failures": load.failures[:10], "answers_per_version": versions,
            "latency_ms": {"p50": pct(0.50), "p99": pct(0.99)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--summary", type=Path)
    args = parser.parse_args()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    load = Load(args.url.rstrip("/"), clients=args.clients).start()
    while not stop.wait(0.5):
        pass
    load.stop()
    summary = summarize(load)
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=2))
    per = ", ".join(f"{v}: {n}" for v, n in summary["answers_per_version"].items())
    print(f"{summary['requests']} requests from {args.clients} clients, "
          f"{summary['failed']} failed; answers per version: {per}; latency p50 "
          f"{summary['latency_ms']['p50']} ms, p99 {summary['latency_ms']['p99']} ms")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
