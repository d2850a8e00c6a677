#!/usr/bin/env python3
"""Benchmark the CLIs' start-up: how long a command with nothing to do takes, beside anchors;
writes its section of docs/BENCHMARKS.md.

Method (one run, real processes, the installed console scripts):

1. Generate a tiny MoE (``devtools/modelgen.py``; its size does not matter here), publish it
   as v1 into a directory store with ``deltaship-publish``, and install it on two devices with
   ``deltaship-agent run --once``: one reading the store directory, one reading it over plain
   HTTP (nginx on 127.0.0.1, ``devtools.bench_models.serve_store``: ETags, 304 on
   If-None-Match).
2. Commands, each run ``--runs`` times, round robin (so that a busy spell of a shared machine
   touches every command alike): ``python -c pass`` and ``python -c "import aiohttp"`` (the
   anchors: the interpreter alone and the HTTP client alone), ``deltaship-agent --help``,
   ``deltaship-agent run --once`` up to date on each device, ``deltaship-agent status`` and
   ``deltaship-publish --help``. Each run's wall time is taken around the whole process
   (``time.perf_counter``), its CPU time (user + system) from ``os.wait4``; the table shows
   the medians and the fastest wall time. Bytecode is cached as after any installation: the
   commands run without ``PYTHONDONTWRITEBYTECODE``, and a first run of each, not counted,
   writes what ``__pycache__`` lacks.
3. One more run of each with ``PYTHONPROFILEIMPORTTIME=1`` counts the modules it imports and
   names the heavy packages among them (aiohttp, boto3, botocore, numpy, zstandard, nacl,
   watchdog).

Usage: scripts/bench_startup.py [--runs 21] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from devtools import modelgen
from devtools.bench_models import publish_store, serve_store
from devtools.bench_report import intro, write_section

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HEAVY = ("aiohttp", "boto3", "botocore", "numpy", "zstandard", "nacl", "watchdog")
TARGET = 0.5  # seconds: issue 12, `run --once` with nothing to do


@dataclass(frozen=True)
class Command:
    name: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class Result:
    command: Command
    times: list[float]
    cpu: list[float]
    modules: int
    heavy: list[str]

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, **extra}


def timed(argv: Sequence[str], cwd: Path) -> tuple[float, float]:
    """Run ``argv`` to its end: (wall seconds, CPU seconds); exits on a failure."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"{argv} failed ({p.returncode})")
    return wall, usage.ru_utime + usage.ru_stime


def _run(*argv: object, cwd: Path) -> str:
    p = subprocess.run([str(a) for a in argv], cwd=cwd, text=True, capture_output=True,
                       timeout=300)
    if p.returncode != 0:
        sys.exit(f"{argv} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p.stdout


def setup(work: Path) -> Path:
    """A directory store with v1 published; returns the store."""
    model = modelgen.generate_moe(work / "m1", modelgen.MoEConfig(
        layers=2, experts=4, hidden=64, ffn=128, vocab=256, seed=1))
    return publish_store(work, model)


def device(work: Path, store_url: str, name: str) -> Path:
    """A device on ``store_url`` with v1 installed; returns its configuration file."""
    config = work / f"{name}.toml"
    agent = BIN / "deltaship-agent"
    _run(agent, "init", "--store", store_url, "--trust", work / "store" / "root.json",
         "--model-dir", work / name, "--device-id", name, "--config", config, cwd=work)
    out = _run(agent, "run", "--once", "--config", config, cwd=work)
    assert "-> v1" in out, out
    out = _run(agent, "run", "--once", "--config", config, cwd=work)
    assert out.strip() == "up to date at v1", out
    return config


def imports(cmd: Command, cwd: Path) -> tuple[int, list[str]]:
    p = subprocess.run(cmd.argv, cwd=cwd, env=_env(PYTHONPROFILEIMPORTTIME="1"), text=True,
                       capture_output=True, timeout=300)
    names = [line.rsplit("|", 1)[1].strip() for line in p.stderr.splitlines()
             if line.startswith("import time:") and "|" in line]
    names = [n for n in names if n != "imported package"]  # the header line
    return len(names), sorted({n.split(".")[0] for n in names} & set(HEAVY))


def measure(commands: Sequence[Command], runs: int, cwd: Path) -> list[Result]:
    for c in commands:  # warm-up: bytecode written, files in the page cache
        timed(c.argv, cwd)
    times: dict[str, list[float]] = {c.name: [] for c in commands}
    cpu: dict[str, list[float]] = {c.name: [] for c in commands}
    for _ in range(runs):
        for c in commands:
            wall, used = timed(c.argv, cwd)
            times[c.name].append(wall)
            cpu[c.name].append(used)
    return [Result(c, times[c.name], cpu[c.name], *imports(c, cwd)) for c in commands]


def report(results: list[Result], runs: int, cmd: str) -> str:
    base = next(r for r in results if r.command.name.startswith("`python -c pass`")).median
    lines = [*intro("Start-up (`scripts/bench_startup.py`)", cmd, machine=""),
             f"Wall time of whole processes (the installed console scripts, {runs} runs each, "
             "round robin); a tiny model, v1 installed, so `run --once` has nothing to do "
             "(one conditional GET on HTTP, one read of `manifest.json` on a directory). "
             "Modules: imported by one run (`PYTHONPROFILEIMPORTTIME=1`).", "",
             "| command | wall, median | wall, fastest | above `python -c pass` | CPU, median | "
             "modules | heavy packages imported |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.command.name} | {r.median:.3f} s | {min(r.times):.3f} s | "
                     f"{r.median - base:+.3f} s | {statistics.median(r.cpu):.3f} s | "
                     f"{r.modules} | {', '.join(r.heavy) or '-'} |")
    once = [r for r in results if "run --once" in r.command.name]
    worst = max(r.median for r in once)
    lines += ["", f"Target (issue 12): `run --once` with nothing to do under {TARGET} s: "
              f"{'met' if worst < TARGET else 'NOT met'} (slowest median {worst:.3f} s)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    agent, pub, py = str(BIN / "deltaship-agent"), str(BIN / "deltaship-publish"), sys.executable
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        store = setup(work)
        with serve_store(store) as server:
            url = server.url
            dir_cfg = device(work, str(store), "dir-device")
            http_cfg = device(work, url, "http-device")
            commands = [
                Command("`python -c pass` (anchor)", (py, "-c", "pass")),
                Command("`python -c \"import aiohttp\"` (anchor)", (py, "-c", "import aiohttp")),
                Command("`deltaship-agent --help`", (agent, "--help")),
                Command("`deltaship-agent run --once`, up to date, directory store",
                        (agent, "run", "--once", "--config", str(dir_cfg))),
                Command("`deltaship-agent run --once`, up to date, HTTP store",
                        (agent, "run", "--once", "--config", str(http_cfg))),
                Command("`deltaship-agent status`", (agent, "status", "--config", str(dir_cfg))),
                Command("`deltaship-publish --help`", (pub, "--help")),
            ]
            results = measure(commands, args.runs, work)
    cmd = "scripts/bench_startup.py" + (f" --runs {args.runs}" if args.runs != 21 else "")
    text = report(results, args.runs, cmd)
    print(text)
    write_section(args.out, "bench_startup", text)


if __name__ == "__main__":
    main()
