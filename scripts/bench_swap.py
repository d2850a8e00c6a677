#!/usr/bin/env python3
"""Benchmark hot swaps under load, ours vs a naive full reload; writes its section of
docs/BENCHMARKS.md.

Method (everything is a real process on loopback, one run):

1. Generate a Mixtral-style MoE (bf16) and K successive versions, each training 2 experts (and
   every router) of the one before (``devtools/modelgen.py``). Publish them all with the real
   ``deltaship-publish`` into a ``file://`` store, and let a real ``deltaship-agent run --once``
   install each one (``--keep K+1``, so all stay retained). Switching between installed versions
   is then the agent's own atomic switch of ``current`` (``DeviceLayout.switch``).
2. For each mode, ours (``deltaship-agent serve``: converts only the changed groups) and the
   naive full reload (``serve --full-reload``: reloads and converts every group), one after the
   other on the same device directory: point ``current`` at v1, start the server, run C
   concurrent aiohttp clients posting ``/v1/forward`` in a loop (closed loop: each client sends
   its next request when the previous one is answered), each request timed with
   ``time.perf_counter`` and tagged with the version that answered it.
3. Steady state: after a warm-up second, a window of ``--steady`` seconds with no switch.
4. Swaps: switch ``current`` to v2, ..., v(K+1) while the clients keep running; ``t_switch`` is
   read right after ``switch()`` returns. The next switch comes ``--gap`` seconds after the
   clients first saw the new version.
5. Per swap, from the clients: time from ``t_switch`` to the first response tagged with the new
   version; from the server's ``/stats``: when the swap went live (``at``), how long building
   and probing the new model took (``seconds``; it starts after the group files are mapped),
   the groups loaded, and ``extra_bytes`` (peak RSS while both versions were held, above the
   level before). The server's resident memory (RssAnon, RssShmem, RssFile) is also sampled
   from ``/proc`` every 10 ms, to see what stays resident after the swaps, which
   ``extra_bytes`` (a difference) cannot see.
6. A request is "during a swap" when its [start, end] overlaps [t_switch, at + ``--margin``]
   of any swap; latency percentiles and throughput are computed over those requests and over
   the steady window's. Every failed request (HTTP error, timeout, connection error) is counted.
7. The share of the machine's CPU that other processes used during each mode (from
   ``/proc/stat`` minus the server's and this process's ticks) is reported: the machine may be
   shared.

Usage: scripts/bench_swap.py [--quick] [--layers 4 --experts 8 --hidden 1024 --ffn 2048
       --vocab 8192] [--versions 6] [--clients 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from devtools import modelgen
from devtools.bench_report import intro, write_section
from devtools.loadgen import Load, Request
from devtools.serveproc import ServeProcess
from edge_agent.layout import VERSIONS_DIR, DeviceLayout
from manifest.constants import WEIGHT_INDEX_FILE

ROOT = Path(__file__).resolve().parent.parent

BIN = Path(sys.executable).parent
MB = 1e6
MiB = 2**20
WALL0, PERF0 = time.time(), time.perf_counter()


def to_perf(wall: float) -> float:
    """A time.time() instant on the perf_counter scale (one reference pair per run)."""
    return PERF0 + (wall - WALL0)


@dataclass(frozen=True)
class Settings:
    model: modelgen.MoEConfig
    versions: int  # K: switches per mode
    clients: int
    prompt_tokens: int
    threads: int
    poll_interval: float
    warmup: float
    steady: float
    gap: float
    margin: float


# --------------------------------------------------------------------------- the fleet


def _run(*args: object) -> str:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args[:2]))} failed ({p.returncode}):\n{p.stderr}")
    return p.stdout


def build_versions(work: Path, s: Settings) -> list[Path]:
    """v1 and K successors, each with 2 experts (and every router) trained further."""
    cfg = s.model
    pairs = [(layer, e) for layer in range(cfg.layers) for e in range(cfg.experts)]
    rng = random.Random(cfg.seed)
    models = [modelgen.generate_moe(work / "models" / "v1", cfg)]
    for k in range(2, s.versions + 2):
        trained = rng.sample(pairs, 2)
        models.append(modelgen.train_experts(models[-1], work / "models" / f"v{k}", trained,
                                             seed=cfg.seed + k))
    return models


def install_all(work: Path, models: Sequence[Path]) -> Path:
    """Publish every version and let a real agent install each; returns the model directory."""
    store, keys = work / "store", work / "keys"
    store.mkdir()
    pub, agent = BIN / "deltaship-publish", BIN / "deltaship-agent"
    _run(pub, "keygen", "--out", keys, "--name", "k")
    key = keys / "k.key"
    _run(pub, "init", "--store", f"file://{store}", "--key", key, "--out", work / "root.json")
    model_dir, config = work / "device", work / "agent.toml"
    _run(agent, "init", "--store", f"file://{store}", "--trust", work / "root.json",
         "--model-dir", model_dir, "--config", config, "--keep", len(models))
    for k, model in enumerate(models, start=1):
        _run(pub, "release", model, "--store", f"file://{store}", "--version", f"v{k}",
             "--key", key, "--cache-dir", work / "cache")
        _run(agent, "run", "--once", "--config", config)
    layout = DeviceLayout(model_dir)
    missing = [f"v{k}" for k in range(1, len(models) + 1) if not layout.has_version(f"v{k}")]
    if missing:
        raise SystemExit(f"the agent did not retain {missing}")
    return model_dir


def group_files(version_dir: Path) -> list[Path]:
    index = json.loads((version_dir / WEIGHT_INDEX_FILE).read_text())
    return [version_dir / f for f in sorted(set(index["weight_map"].values()))]


# --------------------------------------------------------------------------- server, clients


@contextmanager
def serving(model_dir: Path, work: Path, s: Settings, *extra: str) -> Iterator[ServeProcess]:
    """``deltaship-agent serve`` on ``model_dir`` with the benchmark's threads and polling."""
    tag = "full-reload" if "--full-reload" in extra else "ours"
    server = ServeProcess(model_dir, work / f"serve-{tag}.pid", work / f"serve-{tag}.log",
                          "--threads", str(s.threads), "--poll-interval", str(s.poll_interval),
                          *extra)
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class Rss:
    at: float  # perf_counter
    anon: int  # bytes: the heap (activations, Python objects)
    shmem: int  # bytes: the float32 weights, each in its own anonymous mapping
    file: int  # bytes: mapped group files (page cache)

    @property
    def total(self) -> int:
        return self.anon + self.shmem + self.file


def read_rss(pid: int) -> Rss:
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    return Rss(time.perf_counter(), fields["RssAnon"], fields.get("RssShmem", 0),
               fields["RssFile"])


@dataclass
class RssSampler:
    """The server's resident memory, read from /proc every ``interval`` seconds."""

    pid: int
    interval: float = 0.01
    samples: list[Rss] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(read_rss(self.pid))
            except (OSError, KeyError):
                return
            self._stop.wait(self.interval)

    def last_before(self, t: float) -> Rss:
        return max((r for r in self.samples if r.at <= t), key=lambda r: r.at)

    def peak(self, start: float, end: float) -> int:
        return max(r.total for r in self.samples if start <= r.at <= end)


def cpu_ticks(pids: Sequence[int]) -> tuple[int, int]:
    """(busy ticks of the whole machine, utime + stime ticks of ``pids``), from /proc."""
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    busy = sum(cpu[:8]) - cpu[3] - cpu[4]  # all but idle and iowait (guest is in user)
    ours = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ours += int(fields[11]) + int(fields[12])
    return busy, ours


def others_share(start: tuple[float, int, int], end: tuple[float, int, int]) -> float:
    """The machine's CPU used by other processes between two (time, busy, ours) readings."""
    seconds = end[0] - start[0]
    other = (end[1] - start[1]) - (end[2] - start[2])
    return max(0.0, other / (seconds * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)))


# --------------------------------------------------------------------------- one mode


@dataclass
class Result:
    mode: str
    steady: list[Request]
    steady_seconds: float
    during: list[Request]
    during_seconds: float  # total length of the swap windows
    completed_during: int
    to_live: list[float]  # t_switch -> swap live ("at"), seconds
    to_first: list[float]  # t_switch -> first response from the new version
    build: list[float]  # server's build + probe seconds
    loaded: list[int]
    groups: int
    extra: list[int]
    changed_bytes: list[int]
    rss_before: Rss  # sampled just before the first switch
    rss_peak: int  # sampled, over all swap windows
    rss_after: Rss  # sampled at the end, after the last swap and its gap
    private: int
    others_cpu: float  # share of the machine's CPU used by other processes
    failures: list[str]
    total: int


def measure_mode(mode: str, extra: Sequence[str], model_dir: Path, work: Path, s: Settings,
                 prompts: Sequence[Sequence[int]]) -> Result:
    layout = DeviceLayout(model_dir)
    layout.switch("v1")
    targets = [f"v{k}" for k in range(2, s.versions + 2)]
    with serving(model_dir, work, s, *extra) as server:
        pids = [server.proc.pid, os.getpid()]
        sampler = RssSampler(server.proc.pid).start()
        load = Load(server.url, prompts, s.clients).start()
        cpu0 = (time.perf_counter(), *cpu_ticks(pids))
        try:
            time.sleep(s.warmup)
            t0 = time.perf_counter()
            time.sleep(s.steady)
            t1 = time.perf_counter()
            switches: list[float] = []
            for version in targets:
                layout.switch(version)
                switches.append(to_perf(time.time()))
                if not load.wait_for(version, timeout=120):
                    raise SystemExit(f"no response from {version} within 120 s")
                time.sleep(s.gap)
            cpu1 = (time.perf_counter(), *cpu_ticks(pids))
        finally:
            load.stop()
            sampler.stop()
        stats = server.get("/stats")[1]
    swaps = stats["swaps"]
    if [w["to"] for w in swaps] != targets:
        raise SystemExit(f"{mode}: the server swapped {[w['to'] for w in swaps]}, not {targets}")
    windows = [(t, to_perf(w["at"]) + s.margin) for t, w in zip(switches, swaps, strict=True)]
    done = [r for r in load.requests if r.version is not None]
    during = [r for r in done if any(r.start < b and r.end > a for a, b in windows)]
    v = model_dir / VERSIONS_DIR
    return Result(
        mode=mode,
        steady=[r for r in done if r.start >= t0 and r.end <= t1],
        steady_seconds=t1 - t0,
        during=during,
        during_seconds=sum(b - a for a, b in windows),
        completed_during=sum(1 for r in done if any(a <= r.end <= b for a, b in windows)),
        to_live=[to_perf(w["at"]) - t for t, w in zip(switches, swaps, strict=True)],
        to_first=[load.first_seen[w["to"]] - t for t, w in zip(switches, swaps, strict=True)],
        build=[w["seconds"] for w in swaps],
        loaded=[len(w["groups_loaded"]) for w in swaps],
        groups=len(swaps[0]["groups_loaded"]) + swaps[0]["groups_shared"],
        extra=[w["extra_bytes"] for w in swaps],
        changed_bytes=[sum((v / w["to"] / f).stat().st_size for f in w["groups_loaded"])
                       for w in swaps],
        rss_before=sampler.last_before(switches[0]),
        rss_peak=max(sampler.peak(a, b) for a, b in windows),
        rss_after=sampler.samples[-1],
        private=stats["model_private_bytes"],
        others_cpu=others_share(cpu0, cpu1),
        failures=load.failures,
        total=len(load.requests),
    )


# --------------------------------------------------------------------------- report


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def ms(values: Sequence[float], q: float) -> str:
    return f"{pct(values, q) * 1000:.0f} ms"


def med_max(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} s / {max(values):.2f} s"


def table(ours: Result, naive: Result, file_bytes: int) -> list[str]:
    def row(label: str, fn: Callable[[Result], str]) -> str:
        return f"| {label} | {fn(ours)} | {fn(naive)} |"

    def lat(reqs: list[Request], q: float) -> str:
        return ms([r.latency for r in reqs], q)

    def mib(n: float) -> str:
        return f"{n / MiB:.0f} MiB"

    def signed_mib(n: float) -> str:
        return f"{n / MiB:+.0f} MiB"

    copy = file_bytes + ours.private
    return [
        "| | ours (changed groups only) | naive full reload |",
        "|---|---|---|",
        row("steady state: requests / throughput",
            lambda r: f"{len(r.steady)} / {len(r.steady) / r.steady_seconds:.1f} req/s"),
        row("steady state: latency p50 / p99",
            lambda r: f"{lat(r.steady, 50)} / {lat(r.steady, 99)}"),
        row("during swaps: requests / throughput",
            lambda r: f"{len(r.during)} / {r.completed_during / r.during_seconds:.1f} req/s"),
        row("during swaps: latency p50 / p99 / max",
            lambda r: f"{lat(r.during, 50)} / {lat(r.during, 99)} / {lat(r.during, 100)}"),
        row("switch → first response from the new version (median / max)",
            lambda r: med_max(r.to_first)),
        row("switch → new version live, server's `at` (median / max)",
            lambda r: med_max(r.to_live)),
        row("build + probe, server's `seconds` (median / max)", lambda r: med_max(r.build)),
        row("groups loaded per swap (of the model's)",
            lambda r: f"{statistics.median(r.loaded):.0f} of {r.groups}"),
        row("bf16 bytes of the loaded groups per swap (median)",
            lambda r: f"{statistics.median(r.changed_bytes) / MB:.1f} MB"),
        row("server's `extra_bytes`: first swap / median / max",
            lambda r: f"{mib(r.extra[0])} ({r.extra[0] / copy:.0%} of a model copy) / "
                      f"{mib(statistics.median(r.extra))} / {mib(max(r.extra))}"),
        row("sampled RSS before the first switch (heap + float32 weights + mapped files)",
            lambda r: f"{mib(r.rss_before.total)} ({mib(r.rss_before.anon)} + "
                      f"{mib(r.rss_before.shmem)} + {mib(r.rss_before.file)})"),
        row("sampled peak RSS during the swaps, above that",
            lambda r: f"+{mib(r.rss_peak - r.rss_before.total)} "
                      f"({(r.rss_peak - r.rss_before.total) / copy:.0%} of a model copy)"),
        row("sampled RSS after the last swap, above that (heap / float32 weights / files)",
            lambda r: f"{signed_mib(r.rss_after.anon - r.rss_before.anon)} / "
                      f"{signed_mib(r.rss_after.shmem - r.rss_before.shmem)} / "
                      f"{signed_mib(r.rss_after.file - r.rss_before.file)}"),
        row("failed requests (of all sent)", lambda r: f"**{len(r.failures)}** of {r.total}"),
        row("CPU used by other processes on the machine meanwhile",
            lambda r: f"{r.others_cpu:.0%}"),
    ]


def report(cmd: str, s: Settings, ours: Result, naive: Result, file_bytes: int) -> str:
    c = s.model
    copy = file_bytes + ours.private
    names = [f"v{k}" for k in range(1, s.versions + 2)]
    chain = " → ".join(names if len(names) <= 4 else [*names[:2], "...", names[-1]])
    lines = [
        *intro("Hot swap under load (`scripts/bench_swap.py`)", cmd,
               "; the clients run in the benchmark process, on the same cores as the server."),
        f"Model: generated Mixtral-style MoE, bf16, {c.layers} layers x {c.experts} experts, "
        f"hidden {c.hidden}, ffn {c.ffn}, vocab {c.vocab}: {file_bytes / MB:.0f} MB of bf16 "
        f"group files, {ours.private / MB:.0f} MB once converted to float32, so a model copy "
        f"(mapped files + float32 arrays) is {copy / MiB:.0f} MiB. {s.versions} successive "
        "versions each train 2 experts and every router further (`devtools/modelgen.py`), are "
        "published with `deltaship-publish` to a `file://` store and installed by "
        "`deltaship-agent run --once`, all retained; each swap is the agent's atomic switch of "
        "`current` (`DeviceLayout.switch`) between two installed versions.",
        "",
        f"Both modes run in the same run, one after the other, on the same device directory: "
        f"`deltaship-agent serve --threads {s.threads} --poll-interval {s.poll_interval:g}` "
        f"(watchdog events wake it at once), with `--full-reload` for the naive mode. "
        f"{s.clients} closed-loop aiohttp clients post `/v1/forward` with {s.prompt_tokens}-token "
        f"prompts the whole time. Steady state: {s.steady:g} s after {s.warmup:g} s of warm-up, "
        f"before any switch. Then {s.versions} switches ({chain}), "
        f"each {s.gap:g} s after the clients first saw the previous version. A request is "
        "*during a swap* when it overlaps [switch, swap live (`/stats` `at`) + "
        f"{s.margin:g} s]; throughput there = responses completed inside those windows / their "
        "total length. Latency is per request, measured by the client (`time.perf_counter`).",
        "",
        f"How to read it. The clients are a closed loop of {s.clients} on {s.threads} server "
        "threads, so latency is mostly queueing (about clients / throughput): a swap shows as "
        "the throughput its work takes from the forward passes. A request takes the live model "
        "when a server thread starts computing it, so *switch → first response* is *switch → "
        "live* plus about one forward pass. *build + probe* (server's `seconds`) starts after "
        "the new version's group files "
        "are mapped; *switch → live* covers everything (noticing the switch, mapping, "
        "converting, probing). `extra_bytes` is the server's own figure: peak RSS while the "
        "new model was built and probed (both versions held), above the level just before. "
        "The server keeps each float32 weight array in its own anonymous mapping, so the "
        "arrays of a dropped version go back to the OS (when they came from the malloc heap, "
        "resident memory grew by hundreds of MiB over six swaps and `extra_bytes` "
        "under-reported every swap after the first); the sampled rows check it. They read "
        "the server's `/proc/PID/status` (RssAnon = heap, RssShmem = float32 weights, "
        "RssFile = mapped group files) every 10 ms during the run.",
        "",
        *table(ours, naive, file_bytes),
    ]
    failures = ours.failures[:3] + naive.failures[:3]
    if failures:
        lines += ["", "First failures: " + "; ".join(f"`{f}`" for f in failures)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        model = modelgen.MoEConfig(layers=2, experts=4, hidden=128, ffn=256, vocab=512, seed=7)
        return Settings(model, versions=2, clients=8, prompt_tokens=args.prompt_tokens,
                        threads=args.threads, poll_interval=args.poll_interval, warmup=0.5,
                        steady=1.5, gap=1.5, margin=args.margin)
    model = modelgen.MoEConfig(layers=args.layers, experts=args.experts, hidden=args.hidden,
                               ffn=args.ffn, vocab=args.vocab, dtype="BF16", seed=args.seed)
    return Settings(model, versions=args.versions, clients=args.clients,
                    prompt_tokens=args.prompt_tokens, threads=args.threads,
                    poll_interval=args.poll_interval, warmup=args.warmup, steady=args.steady,
                    gap=args.gap, margin=args.margin)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny model, 2 swaps, short windows (smoke test; prints the section "
                         "unless --out is given)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--versions", type=int, default=6, help="swaps per mode (K)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="the server's --threads")
    ap.add_argument("--poll-interval", type=float, default=1.0, help="the server's")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--steady", type=float, default=10.0, help="steady-state window, seconds")
    ap.add_argument("--gap", type=float, default=3.0,
                    help="seconds after the new version first answers before the next switch")
    ap.add_argument("--margin", type=float, default=1.0,
                    help="a swap window ends this long after the swap went live")
    ap.add_argument("--work", type=Path, default=None,
                    help="parent of the temporary work directory (removed at the end)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: docs/BENCHMARKS.md (with --quick: print only)")
    args = ap.parse_args()
    s = settings(args)
    if s.gap < s.margin:
        ap.error("--gap must be longer than --margin, or swap windows overlap")
    out = args.out or (None if args.quick else ROOT / "docs" / "BENCHMARKS.md")
    cmd = ("scripts/bench_swap.py " + " ".join(sys.argv[1:])).strip()
    work = Path(tempfile.mkdtemp(prefix="bench-swap-", dir=args.work))
    try:
        t = time.perf_counter()
        models = build_versions(work, s)
        print(f"generated v1..v{len(models)} in {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()
        model_dir = install_all(work, models)
        print(f"published and installed in {time.perf_counter() - t:.1f} s", flush=True)
        shutil.rmtree(work / "models")  # the device directory is all the servers need
        file_bytes = sum(p.stat().st_size for p in group_files(model_dir / VERSIONS_DIR / "v1"))
        rng = random.Random(s.model.seed)
        prompts = [[rng.randrange(s.model.vocab) for _ in range(s.prompt_tokens)]
                   for _ in range(16)]
        results = []
        for mode, extra in (("ours", []), ("naive full reload", ["--full-reload"])):
            r = measure_mode(mode, extra, model_dir, work, s, prompts)
            print(f"{mode}: steady p50 {ms([q.latency for q in r.steady], 50)} p99 "
                  f"{ms([q.latency for q in r.steady], 99)}; during swaps p50 "
                  f"{ms([q.latency for q in r.during], 50)} p99 "
                  f"{ms([q.latency for q in r.during], 99)}; switch -> first new "
                  f"{med_max(r.to_first)}; extra {statistics.median(r.extra) / MiB:.0f} MiB; "
                  f"failures {len(r.failures)}", flush=True)
            results.append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    body = report(cmd, s, results[0], results[1], file_bytes)
    if out is None:
        print(body)
    else:
        write_section(out, "swap", body)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
