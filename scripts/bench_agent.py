#!/usr/bin/env python3
"""Benchmark the edge agent; writes its section of docs/BENCHMARKS.md.

Measures, in one run, with a real `deltaship-agent run --once` process against a real HTTP
server over a local store (bytes counted at the server):

* bytes downloaded per update vs a full download and vs `zstd -19 --long=27 --patch-from` on
  the same pair (the MoE family of bench_publish: two experts trained, dense fine-tune);
* on a generated model of at least 2 GB: apply throughput (MB of model materialised per second
  of wall time) and peak RSS of the agent, for a fresh install and for updates;
* the cost of an unchanged poll: requests and bytes.

Usage: scripts/bench_agent.py [--big-gb 2.0] [--work DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devtools import modelgen
from devtools.bench_report import intro, write_section
from devtools.faulty_http import FaultyServer

ROOT = Path(__file__).resolve().parent.parent

BIN = Path(sys.executable).parent
MB = 1e6


@contextmanager
def http_server(root: Path) -> Iterator[FaultyServer]:
    """The store directory over HTTP on 127.0.0.1, in a thread with its own event loop."""
    loop = asyncio.new_event_loop()
    server = FaultyServer(root, "store")
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    ready.wait()
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        t.join()


class Fleet:
    """A local store with the real publisher, and one device running the real agent."""

    def __init__(self, work: Path, name: str) -> None:
        self.work = work / name
        shutil.rmtree(self.work, ignore_errors=True)
        self.store = self.work / "store"
        self.store.mkdir(parents=True)
        self.key = self.work / "keys" / "k.key"
        self._pub("keygen", "--out", self.work / "keys", "--name", "k")
        self._pub("init", "--store", self.store, "--key", self.key,
                  "--out", self.work / "root.json")

    def _pub(self, *args: object) -> str:
        p = subprocess.run([str(BIN / "deltaship-publish"), *map(str, args)], check=True,
                           capture_output=True, text=True)
        return p.stdout

    def release(self, model: Path, version: str) -> dict[str, object]:
        out = self._pub("release", model, "--store", self.store, "--version", version, "--key",
                        self.key, "--cache-dir", self.work / "cache", "--json")
        result: dict[str, object] = json.loads(out)
        return result

    def device(self, url: str) -> Path:
        config = self.work / "agent.toml"
        subprocess.run([str(BIN / "deltaship-agent"), "init", "--store", url, "--trust",
                        self.work / "root.json", "--model-dir", self.work / "device",
                        "--config", config], check=True, capture_output=True)
        return config

    def run_agent(self, config: Path) -> tuple[float, int]:
        """One `run --once`: wall seconds and peak RSS in bytes."""
        t0 = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-f", "%M", str(BIN / "deltaship-agent"), "run",
                            "--once", "--config", config], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"agent failed: {p.stderr}")
        return seconds, int(p.stderr.strip().splitlines()[-1]) * 1024


def objects_sent(server: FaultyServer, since: int) -> int:
    return sum(r.sent for r in server.requests[since:] if "/objects/" in r.path)


def zstd19(old: Path, new: Path, work: Path) -> int:
    out = work / "p.zst"
    subprocess.run(["zstd", "-q", "-f", "-T1", "-19", "--long=27", f"--patch-from={old}",
                    str(new), "-o", str(out)], check=True, capture_output=True)
    return out.stat().st_size


def small_pairs(work: Path) -> list[str]:
    cfg = modelgen.MoEConfig(layers=4, experts=8, hidden=320, ffn=640, vocab=8000, seed=11)
    v1 = work / "moe-v1"
    if not v1.exists():
        modelgen.generate_moe(v1, cfg)
    v2, v3 = work / "agent-moe-v2", work / "agent-moe-v3"
    if not v2.exists():
        modelgen.train_experts(v1, v2, experts=[(0, 1), (0, 5)], seed=12)
    if not v3.exists():
        modelgen.dense_finetune(v2, v3, seed=13)
    fleet = Fleet(work, "agent-small")
    rows = []
    with http_server(fleet.store) as server:
        config = fleet.device(server.url)
        fleet.release(v1, "v1")
        fleet.run_agent(config)
        for version, model, prev, label in (("v2", v2, v1, "2 experts + routers trained"),
                                            ("v3", v3, v2, "dense fine-tune")):
            summary = fleet.release(model, version)
            mark = len(server.requests)
            fleet.run_agent(config)
            got = objects_sent(server, mark)
            full = int(summary["full_download_bytes"])  # type: ignore[call-overload]
            z19 = zstd19(prev / "model.safetensors", model / "model.safetensors", fleet.work)
            size = (model / "model.safetensors").stat().st_size
            rows.append(f"| MoE bf16 ({size / MB:.1f} MB), {label} | {got / MB:.2f} MB | "
                        f"{full / MB:.2f} MB"
                        f" | {z19 / MB:.2f} MB | {got / z19:.2f}x |")
            print(rows[-1], flush=True)
    return rows


def big_runs(work: Path, gb: float) -> tuple[list[str], list[str], int]:
    hidden, ffn, vocab, experts = 1024, 4096, 32000, 16
    layers = max(1, int(gb * 1e9 / (experts * 3 * hidden * ffn * 2)) + 1)
    cfg = modelgen.MoEConfig(layers=layers, experts=experts, hidden=hidden, ffn=ffn,
                             vocab=vocab, shards=2, seed=31)
    v1, v2, v3 = work / "big-v1", work / "big-v2", work / "agent-big-v3"
    if not v1.exists():
        modelgen.generate_moe(v1, cfg)
    if not v2.exists():
        modelgen.train_experts(v1, v2, experts=[(0, 1), (layers - 1, 7)], seed=32)
    if not v3.exists():
        modelgen.dense_finetune(v2, v3, seed=33)
    size = sum(p.stat().st_size for p in v1.glob("*.safetensors"))
    largest = vocab * hidden * 2
    fleet = Fleet(work, "agent-big")
    rows = []
    with http_server(fleet.store) as server:
        config = fleet.device(server.url)
        for version, model, label in (("v1", v1, "fresh install"),
                                      ("v2", v2, "2 experts trained"),
                                      ("v3", v3, "dense fine-tune")):
            summary = fleet.release(model, version)
            mark = len(server.requests)
            seconds, rss = fleet.run_agent(config)
            got = objects_sent(server, mark)
            full = int(summary["full_download_bytes"])  # type: ignore[call-overload]
            rows.append(f"| {version}: {label} | {got / MB:.1f} MB of {full / MB:.1f} MB | "
                        f"{seconds:.1f} s | {size / MB / seconds:.0f} MB/s | "
                        f"{rss / 2**20:.0f} MiB |")
            print(rows[-1], flush=True)
        mark = len(server.requests)
        fleet.run_agent(config)
        polls = server.requests[mark:]
        poll = [f"| unchanged poll | {len(polls)} request(s): "
                + ", ".join(f"{r.path.rsplit('/', 1)[-1]} -> {r.status}" for r in polls)
                + f" | {sum(r.sent for r in polls)} body bytes |"]
    return rows, poll, largest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench-work")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    ap.add_argument("--big-gb", type=float, default=2.0)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cmd = ("scripts/bench_agent.py " + " ".join(sys.argv[1:])).strip()
    small = small_pairs(args.work)
    big, poll, largest = big_runs(args.work, args.big_gb)
    bound = 256 * 2**20 + 4 * largest
    lines = [
        *intro("Edge agent (`scripts/bench_agent.py`)", cmd),
        "A real `deltaship-agent run --once` process per update, against a real HTTP server over"
        " a local store; downloaded bytes are counted at the server: the bodies of every"
        " `objects/` request (patches, full objects, files and the signed release index, which"
        " the publisher's summary does not count).",
        "",
        "### Bytes downloaded per update",
        "",
        "| update | agent downloaded | full download | zstd -19 --long=27 --patch-from |"
        " agent / zstd-19 pf |",
        "|---|---|---|---|---|",
        *small,
        "",
        f"### A model of at least {args.big_gb:g} GB",
        "",
        f"Generated MoE (bf16, 16 experts per layer, 2 shards). Largest tensor "
        f"{largest / MB:.1f} MB, so the memory bound 256 MiB + 4 x largest is "
        f"{bound / 2**20:.0f} MiB. Throughput = model size / wall time of the agent process "
        "(verify, download, patch, hash, fsync, switch); peak RSS by `/usr/bin/time -f %M`.",
        "",
        "| update | downloaded | wall time | model materialised per second | peak RSS |",
        "|---|---|---|---|---|",
        *big,
        "",
        "### Cost of an unchanged poll",
        "",
        "| | requests | bytes |",
        "|---|---|---|",
        *poll,
    ]
    write_section(args.out, "bench_agent", "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
