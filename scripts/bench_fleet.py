#!/usr/bin/env python3
"""A fleet of 1,000 devices behind nginx; writes its section of docs/BENCHMARKS.md.

nginx (Debian's ``nginx-light``, started here on 127.0.0.1 with a generated configuration)
serves a local store as the CDN stand-in. Every device is the real agent code (the library
API: ``Operator.init``, then ``Agent.cycle`` against its own ``Source``), many devices per
process in waves, each with its own small model directory. Everything is counted from nginx's
access log:

* an unchanged poll: requests and bytes per device;
* a release that retrains two experts reaching every device: bytes served against devices x
  the plan of one device, failures, time;
* with rollouts (``rollout``), a 10 % rollout of a candidate (devices updated against 10 % +/-
  the binomial spread), halt, revoke, and ``fleet status`` against the truth.

Usage: scripts/bench_fleet.py [--devices 1000] [--wave 100] [--work DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from devtools import modelgen
from devtools.bench_models import settle
from devtools.bench_report import intro, write_section
from devtools.nginx import Nginx, free_port
from edge_agent.config import AgentConfig
from edge_agent.layout import DeviceLayout
from edge_agent.operations import Operator
from edge_agent.service import open_agent_source
from edge_agent.updater import Agent
from manifest.constants import report_key
from manifest.report import MAX_REPORT_SIZE, DeviceReport
from manifest.rollout import bucket
from manifest.storage.atomic import write_atomic

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


class Collector:
    """The fleet's report endpoint: devices POST their reports, it files each as
    ``reports/<device-id>.json`` in the store (what ``fleet status`` reads)."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.loop = asyncio.new_event_loop()
        self.port = free_port()
        self.received = 0
        self._runner: web.AppRunner | None = None

    async def _post(self, request: web.Request) -> web.Response:
        data = await request.content.read(MAX_REPORT_SIZE + 1)
        report = DeviceReport.from_bytes(data)
        path = self.store / report_key(report.device_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        self.received += 1
        return web.Response(status=204)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/report", self._post)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def __enter__(self) -> Collector:
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/report"


@dataclass
class Phase:
    name: str
    seconds: float
    requests: int
    body_bytes: int
    wire_bytes: int
    failures: int
    outcomes: Counter[str]
    by_uri: dict[str, int]  # body bytes per URI


class FleetBench:
    def __init__(self, work: Path, devices: int, wave: int) -> None:
        self.work, self.n, self.wave = work, devices, wave
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        self.store = work / "www" / "store"
        self.store.mkdir(parents=True)
        self.keys = work / "keys"

    def pub(self, *args: object) -> str:
        p = subprocess.run([str(BIN / "deltaship-publish"), *map(str, args)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"deltaship-publish {args[0]} failed: {p.stderr}")
        return p.stdout

    def models(self) -> tuple[Path, Path, Path]:
        cfg = modelgen.MoEConfig(layers=2, experts=8, hidden=64, ffn=128, vocab=512, seed=5)
        v1 = modelgen.generate_moe(self.work / "m1", cfg)
        v2 = modelgen.train_experts(v1, self.work / "m2", experts=[(0, 2), (1, 5)], seed=6)
        v3 = modelgen.train_experts(v2, self.work / "m3", experts=[(0, 3), (1, 6)], seed=7)
        return v1, v2, v3

    def release(self, model: Path, version: str, *extra: object) -> dict[str, object]:
        out = self.pub("release", model, "--store", self.store, "--version", version,
                       "--key", self.keys / "k.key", "--cache-dir", self.work / "cache",
                       "--json", *extra)
        result: dict[str, object] = json.loads(out)
        return result

    def devices(self, url: str, report_url: str) -> list[AgentConfig]:
        cfgs = []
        for i in range(self.n):
            d = self.work / "devices" / f"edge-{i:04d}"
            cfg = AgentConfig(store=url, model_dir=d / "model", device_id=f"edge-{i:04d}",
                              report_url=report_url)
            Operator(cfg).init(self.work / "root.json", d / "agent.toml")
            cfgs.append(cfg)
        return cfgs

    async def _cycle(self, cfg: AgentConfig) -> str:
        source = open_agent_source(cfg)
        try:
            result = await Agent(cfg).cycle(source)
            return result.outcome
        except Exception as e:  # a failure is counted, the rest of the fleet goes on
            return f"failed: {type(e).__name__}: {e}"
        finally:
            await source.close()

    async def _all(self, cfgs: list[AgentConfig]) -> list[str]:
        out: list[str] = []
        for i in range(0, len(cfgs), self.wave):
            out += await asyncio.gather(*(self._cycle(c) for c in cfgs[i:i + self.wave]))
        return out

    def poll_all(self, name: str, cfgs: list[AgentConfig], nginx: Nginx) -> Phase:
        settle(self.store, self.work / "devices")  # every phase from the same memory state
        mark = nginx.mark()
        t0 = time.perf_counter()
        outcomes = asyncio.run(self._all(cfgs))
        seconds = time.perf_counter() - t0
        time.sleep(0.2)  # nginx writes its log line after the response
        reqs = nginx.since(mark)
        failures = sum(1 for o in outcomes if o.startswith("failed"))
        by_uri: dict[str, int] = Counter()
        for r in reqs:
            by_uri[r[1]] += r[3]
        return Phase(name, seconds, len(reqs), sum(r[3] for r in reqs), sum(r[4] for r in reqs),
                     failures, Counter(o.split(":")[0] for o in outcomes), dict(by_uri))

    def status_check(self, when: str, cfgs: list[AgentConfig]) -> str:
        """``fleet status --json`` against what the devices' model directories hold."""
        status = json.loads(self.pub("fleet", "status", "--store", self.store, "--json"))
        truth = dict(Counter(DeviceLayout(c.model_dir).current() or "none" for c in cfgs))
        reported = {v: sum(states.values()) for v, states in status["by_version"].items()}
        failed = {f["version"]: f["devices"] for f in status["failures"]}
        return (f"{when}: {status['devices']} devices reported, per version "
                f"{dict(sorted(reported.items()))}, the truth {dict(sorted(truth.items()))}: "
                f"equal {reported == truth}; failures per version {failed}")

    def index_uris(self) -> set[str]:
        """The URIs of the current release index in every form the manifest names (raw, zstd,
        deltas), to tell them from the objects of a plan."""
        doc = json.loads((self.store / "manifest.json").read_bytes())
        ref = doc["signed"]["manifest"]["current"]["index"]
        shas = {ref["sha256"], *(f["sha256"] for f in [ref.get("zstd"), *ref.get("deltas", [])]
                                 if f)}
        return {f"/store/objects/{sha}" for sha in shas}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--wave", type=int, default=100)
    ap.add_argument("--work", type=Path, default=ROOT / "bench-work" / "fleet")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    b = FleetBench(args.work, args.devices, args.wave)
    v1, v2, _v3 = b.models()
    b.pub("keygen", "--out", b.keys, "--name", "k")
    b.pub("init", "--store", b.store, "--key", b.keys / "k.key", "--out", b.work / "root.json")
    b.release(v1, "v1")
    phases: list[Phase] = []
    checks: list[str] = []
    n = args.devices
    with Nginx(b.work, b.store.parent) as nginx, Collector(b.store) as collector:
        url = f"http://127.0.0.1:{nginx.port}/store"
        cfgs = b.devices(url, collector.url)
        phases.append(b.poll_all("first install of v1", cfgs, nginx))
        phases.append(b.poll_all("unchanged poll", cfgs, nginx))
        summary = b.release(v2, "v2")
        plan = next(int(str(x["download_bytes"])) for x in summary["bases"]  # type: ignore[union-attr]
                    if x["version"] == "v1")  # type: ignore[index]
        phases.append(b.poll_all("two retrained experts (v2)", cfgs, nginx))
        index_uris = b.index_uris()
        b.release(_v3, "v3", "--rollout", "10")
        phases.append(b.poll_all("v3 as a 10 % rollout", cfgs, nginx))
        repo_id = json.loads((b.work / "root.json").read_bytes())["signed"]["repository_id"]
        expected = {c.device_id for c in cfgs if bucket(repo_id, "v3", c.device_id) < 1000}
        on_v3 = {c.device_id for c in cfgs if DeviceLayout(c.model_dir).current() == "v3"}
        sigma = math.sqrt(n * 0.1 * 0.9)
        checks.append(f"10 % rollout: {len(on_v3)} devices took v3 (expected {n // 10} +/- "
                      f"{2 * sigma:.0f} at two standard deviations); exactly the devices whose "
                      f"bucket is below 1000: {on_v3 == expected}")
        b.pub("rollout", "--store", b.store, "--halt", "--key", b.keys / "k.key")
        phases.append(b.poll_all("halt", cfgs, nginx))
        still = {c.device_id for c in cfgs if DeviceLayout(c.model_dir).current() == "v3"}
        checks.append(f"halt: {len(still)} devices still on v3 (the same ones: {still == on_v3})")
        checks.append(b.status_check("fleet status after the halt", cfgs))
        b.pub("rollout", "--store", b.store, "--revoke", "--key", b.keys / "k.key")
        phases.append(b.poll_all("revoke", cfgs, nginx))
        back = [c for c in cfgs if DeviceLayout(c.model_dir).current() == "v2"]
        checks.append(f"revoke: {len(back)} of {n} devices on v2 afterwards")
        checks.append(b.status_check("fleet status after the revoke", cfgs))
        checks.append(f"reports received by the collector: {collector.received}")
    cmd = f"scripts/bench_fleet.py --devices {n} --wave {args.wave}"
    nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    lines = [*intro("A fleet behind nginx (`scripts/bench_fleet.py`)", cmd, machine=""),
             f"{n} devices, the real agent code in one process, {args.wave} cycles at a time, "
             f"each device with its own model directory; {nginx_v.replace('nginx version: ', '')}"
             " serving the store on 127.0.0.1 (bytes and requests from its access log); devices "
             "POST their reports to a collector that files them in the store. Every phase starts"
             " from the same memory state (`settle`: earlier writes flushed, page cache dropped,"
             " the store and the devices' files read once).", "",
             "| phase | time | requests | per device | body bytes | per device | failures |",
             "|---|---|---|---|---|---|---|"]
    for p in phases:
        lines.append(f"| {p.name} | {p.seconds:.1f} s | {p.requests} | {p.requests / n:.2f} | "
                     f"{p.body_bytes} | {p.body_bytes / n:.0f} | {p.failures} |")
    v2_phase = phases[2]
    index = sum(v for u, v in v2_phase.by_uri.items() if u in index_uris)
    objects = sum(v for u, v in v2_phase.by_uri.items()
                  if u.startswith("/store/objects/") and u not in index_uris)
    manifest = v2_phase.body_bytes - objects - index
    lines += ["", f"The v2 plan of one device at v1 (the release summary): {plan} bytes of "
              f"objects. Served for v2: {objects} bytes of objects = {objects / (n * plan):.4f}"
              f" x devices x plan, plus {manifest} bytes of manifest ({manifest / n:.0f} per"
              f" device) and {index} bytes of release index ({index / n:.0f} per device, the"
              " form each device fetched: a delta from the index it holds).", ""]
    lines += [f"* {c}" for c in checks]
    text = "\n".join(lines)
    print(text)
    write_section(args.out, "bench_fleet", text)


if __name__ == "__main__":
    main()
