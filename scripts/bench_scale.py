#!/usr/bin/env python3
"""Scale curve of the publisher and the agent; writes its section of docs/BENCHMARKS.md.

For generated bf16 MoE models of each size (``devtools.bench_models.scaled_moe``: layers and
experts grow with the size, the largest tensor stays the same), in one run:

* `deltaship-publish release` of v1 (fresh) and of v2 (two experts and the routers retrained)
  into a local directory store;
* `deltaship-agent run --once` against that store served by nginx on 127.0.0.1: a fresh
  install of v1, then the update to v2;

each a real process, its wall time and peak RSS by `/usr/bin/time -f %M`. Then a least-squares
line (seconds = fixed + per-GB x size) per step, how far the points lie from it, the peak RSS
beside the memory bound, and at which size a release on this machine passes 10 minutes.

Models are cached under WORK/models and reused by later runs; each size's store, caches and
device directory are deleted after it is measured unless --keep.

Usage: scripts/bench_scale.py [--sizes 0.5,1,2,4] [--work DIR] [--out FILE] [--keep]
                              [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from devtools import modelgen
from devtools.bench_models import (
    Timed,
    cached_model,
    model_bytes,
    moe_bytes,
    run_timed,
    scaled_moe,
    serve_store,
    settle,
    warm_imports,
)
from devtools.bench_report import intro, write_section

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PUBLISH, AGENT = str(BIN / "deltaship-publish"), str(BIN / "deltaship-agent")
GB, MIB = 1e9, 2**20
LIMIT_S = 600.0  # "one machine stops being enough": a release longer than this
STEPS = ("release v1 (fresh)", "release v2 (2 experts retrained)",
         "agent: fresh install of v1", "agent: update to v2")


@dataclass(frozen=True)
class Model:
    target_gb: float
    cfg: modelgen.MoEConfig
    v1: Path
    v2: Path
    nbytes: int
    largest: int

    @property
    def gb(self) -> float:
        return self.nbytes / GB

    @property
    def bound(self) -> int:
        """The memory bound BENCHMARKS states: 256 MiB + 4 x the largest tensor."""
        return 256 * 2**20 + 4 * self.largest


@dataclass(frozen=True)
class Row:
    model: Model
    step: str
    groups: int
    seconds: float
    peak_rss: int


@dataclass(frozen=True)
class Fit:
    per_gb: float  # seconds per GB (slope)
    fixed: float  # seconds at 0 GB (intercept)
    r2: float | None  # None: fewer than 3 points, a line fits exactly
    max_dev: float  # largest |measured - fitted| / fitted

    def seconds(self, gb: float) -> float:
        return self.fixed + self.per_gb * gb

    def gb_at(self, seconds: float) -> float:
        return (seconds - self.fixed) / self.per_gb


def fit_line(xs: list[float], ys: list[float]) -> Fit:
    """Least squares y = fixed + per_gb * x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    fixed = my - slope * mx
    fitted = [fixed + slope * x for x in xs]
    ss_res = sum((y - f) ** 2 for y, f in zip(ys, fitted, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = None if n < 3 else 1 - ss_res / ss_tot if ss_tot else 1.0
    dev = max(abs(y - f) / f for y, f in zip(ys, fitted, strict=True))
    return Fit(slope, fixed, r2, dev)


def progress(msg: str, t0: float) -> None:
    print(f"[{time.monotonic() - t0:6.0f} s] {msg}", flush=True)


def model_home(work: Path, cfg: modelgen.MoEConfig) -> Path:
    """Where the v1/v2 pair of ``cfg`` is cached: named by everything that shapes it."""
    return work / "models" / (f"moe-{cfg.layers}x{cfg.experts}-h{cfg.hidden}-f{cfg.ffn}-"
                              f"v{cfg.vocab}-s{cfg.shards}-seed{cfg.seed}")


def prepare(work: Path, gb: float, t0: float) -> Model:
    """The v1/v2 pair of about ``gb`` GB, generated once under ``work/models``."""
    cfg = scaled_moe(gb)
    nbytes, largest = moe_bytes(cfg)
    home = model_home(work, cfg)
    home.mkdir(parents=True, exist_ok=True)
    shape = f"{cfg.layers} x {cfg.experts} experts, {nbytes / GB:.2f} GB"
    if not (home / "v1").exists():
        progress(f"{gb:g} GB: generating v1 ({shape})", t0)
    v1 = cached_model(home / "v1", lambda out: modelgen.generate_moe(out, cfg))
    trained = [(0, min(1, cfg.experts - 1)), (cfg.layers - 1, cfg.experts - 1)]
    if not (home / "v2").exists():
        progress(f"{gb:g} GB: generating v2 (experts {trained} retrained)", t0)
    v2 = cached_model(home / "v2", lambda out: modelgen.train_experts(v1, out, trained,
                                                                      seed=cfg.seed + 1))
    return Model(gb, cfg, v1, v2, model_bytes(v1), largest)


def measure(model: Model, run: Path, workers: int | None, t0: float) -> list[Row]:
    """Release v1, install it, release v2, update to it: four timed processes."""
    shutil.rmtree(run, ignore_errors=True)
    store, key, cache = run / "store", run / "keys" / "k.key", run / "publisher-cache"
    store.mkdir(parents=True)
    # Keep the publisher's known-stores list and any default cache inside the run directory.
    env = {**os.environ, "XDG_CONFIG_HOME": str(run / "config"),
           "XDG_CACHE_HOME": str(run / "xdg-cache")}

    def setup(*cmd: str | Path) -> None:
        subprocess.run(list(map(str, cmd)), check=True, capture_output=True, env=env)

    def timed(label: str, inputs: tuple[Path, ...], *cmd: str | Path) -> Timed:
        # The same memory state for every step: earlier writes flushed, page cache dropped,
        # this step's inputs read once, the program's code warm (as bench_agent/bench_publish).
        settle(*inputs)
        warm_imports("publisher.cli", "publisher.release", "edge_agent.cli",
                     "edge_agent.updater", "manifest.container", "nacl")
        r = run_timed(cmd, env)
        progress(f"{model.target_gb:g} GB: {label}: {r.seconds:.1f} s, "
                 f"{model.nbytes / 1e6 / r.seconds:.0f} MB/s, peak RSS "
                 f"{r.peak_rss / MIB:.0f} MiB", t0)
        return r

    def release(label: str, model_dir: Path, version: str) -> Timed:
        return timed(label, (model_dir, cache), PUBLISH, "release", model_dir, "--store", store,
                     "--version", version, "--key", key, "--cache-dir", cache, "--json",
                     *(["--workers", str(workers)] if workers else []))

    setup(PUBLISH, "keygen", "--out", key.parent, "--name", key.stem)
    setup(PUBLISH, "init", "--store", store, "--key", key, "--out", run / "root.json")
    with serve_store(store) as server:
        config = run / "agent.toml"
        setup(AGENT, "init", "--store", server.url, "--trust", run / "root.json", "--model-dir",
              run / "device", "--config", config)
        release_v1 = release(STEPS[0], model.v1, "v1")
        install_v1 = timed(STEPS[2], (store,), AGENT, "run", "--once", "--config", config)
        release_v2 = release(STEPS[1], model.v2, "v2")
        update_v2 = timed(STEPS[3], (store, run / "device"), AGENT, "run", "--once",
                          "--config", config)
    groups = int(json.loads(release_v1.stdout)["groups_total"])
    timings = (release_v1, release_v2, install_v1, update_v2)  # in the order of STEPS
    return [Row(model, label, groups, t.seconds, t.peak_rss)
            for label, t in zip(STEPS, timings, strict=True)]


def disk_needed(models: list[tuple[float, bool]], keep: bool) -> float:
    """Bytes a run may need at its peak: the models not cached yet (v1 and v2), plus a size's
    run directory (about 3x the model: store, publisher staging, device) for the largest size
    or, with --keep, for every size."""
    fresh = sum(2 * gb for gb, cached in models if not cached)
    runs = [3 * gb for gb, _ in models]
    return (fresh + (sum(runs) if keep else max(runs))) * GB


def fits_table(rows: list[Row]) -> tuple[list[str], dict[str, Fit]]:
    """Per step: the line through its times, and its peak RSS from the smallest model to the
    largest beside the memory bound."""
    small, large = rows[0].model, rows[-1].model
    lines = ["| step | per GB | fixed | R² | max deviation from the line | peak RSS, "
             f"{small.gb:.2f} GB → {large.gb:.2f} GB model | highest peak / memory bound |",
             "|---|---|---|---|---|---|---|"]
    fits: dict[str, Fit] = {}
    for label in STEPS:
        mine = [r for r in rows if r.step == label]
        fit = fits[label] = fit_line([r.model.gb for r in mine], [r.seconds for r in mine])
        first, last = mine[0].peak_rss, mine[-1].peak_rss
        top = max(mine, key=lambda r: r.peak_rss / r.model.bound)
        r2, dev = (("exact (2 points)", "–") if fit.r2 is None else
                   (f"{fit.r2:.4f}", f"{fit.max_dev:.1%}"))
        lines.append(f"| {label} | {fit.per_gb:.2f} s | {fit.fixed:+.2f} s | {r2} | {dev} | "
                     f"{first / MIB:.0f} → {last / MIB:.0f} MiB ({last / first - 1:+.0%}) | "
                     f"{top.peak_rss / top.model.bound:.2f} |")
    lines += ["", f"The model grows {large.gb / small.gb:.1f}x from the smallest size to the"
              " largest. *fixed* is the line's time at 0 GB (process start-up and the work that"
              " does not grow with the model); *max deviation* is the largest"
              " |measured - line| / line over the sizes."]
    return lines, fits


def where_one_machine_stops(fits: dict[str, Fit], rows: list[Row]) -> list[str]:
    fresh, update, install = fits[STEPS[0]], fits[STEPS[1]], fits[STEPS[2]]
    peak = max(r.peak_rss for r in rows if r.step in STEPS[:2]) / MIB
    size = max(r.model.gb for r in rows)

    def at_limit(f: Fit) -> str:
        return (f"about {f.gb_at(LIMIT_S):.0f} GB" if f.per_gb > 0 else
                "no size (the time did not grow)")

    return [
        "### Where one machine stops being enough",
        "",
        f"On this machine ({os.cpu_count()} cores), extrapolating the lines above beyond the"
        f" {size:.1f} GB measured: at {fresh.per_gb:.1f} s per GB, a fresh release passes"
        f" {LIMIT_S / 60:.0f} minutes at {at_limit(fresh)} of bf16 weights."
        f" A release that retrains two experts costs {update.per_gb:.1f} s per GB (it hashes"
        f" every group but encodes only the changed ones), so it passes {LIMIT_S / 60:.0f}"
        f" minutes only at {at_limit(update)}; a device's fresh install"
        f" ({install.per_gb:.1f} s per GB) passes it at {at_limit(install)}. The publisher's"
        f" peak RSS is at most {peak:.0f} MiB at every size measured: what runs out is time"
        " (and disk, for the model, its compressed objects staged before the upload, and the"
        " store), not memory.",
        "",
        "What deltaship supports today: one `deltaship-publish release` process reads the whole"
        " model directory and writes one signed release index. Publishing disjoint group sets"
        " from several machines into one release is **not supported**: two `release` processes"
        " on one store race for the manifest, exactly one wins and the other exits 5. What"
        " works for a model past that size:",
        "",
        "* a machine with more cores: hashing and encoding run on `--workers` threads (default:"
        " every core); the release section above has one against two workers on this machine;",
        "* the publisher next to the store (a machine in the bucket's region, or on the storage"
        " host for a directory or MinIO store): a fresh release uploads the whole compressed"
        " model, which this local benchmark does not pay;",
        "* a fresh release is paid once per model: later releases of fine-tunes of it cost the"
        " hashing of the model plus the encoding of the changed groups only (the v2 row);",
        "* `--level 1` instead of the default 3 trades some bytes for encoding time (not measured"
        " here).",
    ]


def write_report(rows: list[Row], out: Path, cmd: str, workers: int | None) -> None:
    table = ["| model (layers x experts) | groups | step | wall time | MB/s | s per GB | peak RSS"
             " | memory bound |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r.model
        table.append(
            f"| {m.gb:.2f} GB ({m.cfg.layers} x {m.cfg.experts}) | {r.groups} | {r.step}"
            f" | {r.seconds:.1f} s | {m.nbytes / 1e6 / r.seconds:.0f} | {r.seconds / m.gb:.1f} |"
            f" {r.peak_rss / MIB:.0f} MiB | {m.bound / MIB:.0f} MiB |")
    fit_lines, fits = fits_table(rows)
    largest = sorted({r.model.largest for r in rows})
    lines = [
        *intro("Scale curve (`scripts/bench_scale.py`)", cmd,
               f", publisher workers: {workers or 'default (all cores)'}."),
        "Generated bf16 MoE models (`devtools/bench_models.py`: hidden 1024, expert ffn 4096,"
        " 2 layers per GB, as many experts per layer as fill the size, one shard per GB; v2"
        " retrains two experts and every router). Each step is one real process, timed by"
        f" `/usr/bin/time -f %M` (wall time, peak RSS): `release` into a local directory store,"
        " `deltaship-agent run --once` against that store served by nginx on 127.0.0.1 (a CDN"
        " stand-in in its own processes, sending files with sendfile). MB/s and s per GB are of"
        " the whole model, also for the updates."
        f" Largest tensor (the embedding): {', '.join(f'{b / 1e6:.1f} MB' for b in largest)};"
        " memory bound = 256 MiB + 4 x largest tensor. Every step starts from the same memory"
        " state (`settle`: earlier writes flushed, page cache dropped, the step's inputs read"
        " once: the model and the publisher's cache for a release, the store and the device's"
        " files for the agent).",
        "",
        *table,
        "",
        "### Linear fit: wall time = fixed + per GB x size",
        "",
        *fit_lines,
        "",
        *where_one_machine_stops(fits, rows),
    ]
    write_section(out, "bench_scale", "\n".join(lines))


def parse_sizes(text: str) -> list[float]:
    try:
        sizes = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes in GB like 0.5,1,2,4, got {text!r}"
                                         ) from None
    if len(sizes) < 2 or any(not 0.05 <= s <= 64 for s in sizes) or len(set(sizes)) < len(sizes):
        raise argparse.ArgumentTypeError("need at least two different sizes between 0.05 and 64"
                                         f" GB, got {text!r}")
    return sorted(sizes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=parse_sizes, default=parse_sizes("0.5,1,2,4"),
                    help="model sizes in GB, comma-separated (default 0.5,1,2,4)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-work")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    ap.add_argument("--keep", action="store_true", help="keep each size's store and device")
    ap.add_argument("--workers", type=int, help="publisher threads (default: all cores)")
    args = ap.parse_args()
    if args.workers is not None and args.workers < 1:
        ap.error("--workers must be at least 1")
    args.work.mkdir(parents=True, exist_ok=True)
    cached = [(gb, (model_home(args.work, scaled_moe(gb)) / "v2").exists())
              for gb in args.sizes]
    need, free = disk_needed(cached, args.keep), shutil.disk_usage(args.work).free
    if need > free:
        ap.error(f"needs about {need / GB:.0f} GB free under {args.work}, "
                 f"has {free / GB:.0f} GB")
    cmd = ("scripts/bench_scale.py " + " ".join(sys.argv[1:])).strip()
    t0 = time.monotonic()
    rows: list[Row] = []
    for gb in args.sizes:
        model = prepare(args.work, gb, t0)
        run = args.work / f"scale-{gb:g}GB"
        rows += measure(model, run, args.workers, t0)
        if not args.keep:
            shutil.rmtree(run, ignore_errors=True)
    write_report(rows, args.out, cmd, args.workers)
    progress(f"wrote {args.out}", t0)


if __name__ == "__main__":
    main()
