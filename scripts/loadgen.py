"""Keep a model server busy and record what it answered: concurrent clients until stopped.

    python scripts/loadgen.py http://127.0.0.1:8000 --clients 8 --summary load.json

Each client posts ``/v1/forward`` requests back to back. On SIGTERM or SIGINT the clients stop,
the summary (requests, failures, answers per version in the order versions first appeared,
latency percentiles) is written as JSON to ``--summary`` and printed as one line. Exit code 0
when no request failed, 1 otherwise. Used by ``scripts/demo.sh``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

PROMPTS = [[1, 2, 3, 4], [17, 42, 99], [5, 5, 5, 5, 5, 5], [300, 2, 71, 8, 12]]


async def run(url: str, clients: int) -> dict[str, Any]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    versions: dict[str, int] = {}
    failures: list[str] = []
    latencies: list[float] = []

    async def client(session: aiohttp.ClientSession, i: int) -> None:
        n = i
        while not stop.is_set():
            prompt = PROMPTS[n % len(PROMPTS)]
            n += 1
            t0 = time.perf_counter()
            try:
                async with session.post(url + "/v1/forward", json={"tokens": prompt}) as r:
                    body = await r.json()
                    if r.status != 200:
                        failures.append(f"HTTP {r.status}: {body}")
                        continue
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                failures.append(f"{type(e).__name__}: {e}")
                await asyncio.sleep(0.05)
                continue
            latencies.append(time.perf_counter() - t0)
            versions[body["version"]] = versions.get(body["version"], 0) + 1

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=clients)) as session:
        await asyncio.gather(*(client(session, i) for i in range(clients)))
    latencies.sort()

    def pct(p: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2) \
            if latencies else 0.0

    return {"requests": len(latencies) + len(failures), "failed": len(failures),
            "failures": failures[:10], "answers_per_version": versions,
            "latency_ms": {"p50": pct(0.50), "p99": pct(0.99)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--summary", type=Path)
    args = parser.parse_args()
    summary = asyncio.run(run(args.url.rstrip("/"), args.clients))
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=2))
    per = ", ".join(f"{v}: {n}" for v, n in summary["answers_per_version"].items())
    print(f"{summary['requests']} requests from {args.clients} clients, "
          f"{summary['failed']} failed; answers per version: {per}; latency p50 "
          f"{summary['latency_ms']['p50']} ms, p99 {summary['latency_ms']['p99']} ms")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
