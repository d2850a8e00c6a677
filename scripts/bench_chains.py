#!/usr/bin/env python3
"""Benchmark far-behind devices; writes its section of docs/BENCHMARKS.md.

Eight releases after v1, each retraining two experts (and every router:
`devtools.modelgen.train_experts`), published with the real `deltaship-publish` into a local
store; a device that stayed at v1 then updates with a real `deltaship-agent run --once`.
Reports what it downloaded (the agent's own count, equal to the planner's), what the planner
would pick without chains, the sum of the eight releases' own patches for the groups the
device needs, and the full objects of those groups.

Usage: scripts/bench_chains.py [--work DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

from devtools import modelgen
from devtools.bench_report import intro, write_section
from manifest.canonical import loads_object
from manifest.constants import object_key, release_pointer_key
from manifest.download_plan import content_of, make_plan
from manifest.metadata import ReleaseIndex

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MB = 1e6


def run(*args: object) -> str:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True,
                          text=True).stdout


def index_of(store: Path, version: str) -> ReleaseIndex:
    record = loads_object((store / release_pointer_key(version)).read_bytes(), "record")
    sha = record["signed"]["index"]["sha256"]
    return ReleaseIndex.from_dict(loads_object((store / object_key(sha)).read_bytes(), "index"))


def own_patches(indexes: list[ReleaseIndex]) -> int:
    """Per release, per changed group, its patch from the release before (else its full)."""
    total = 0
    for prev, idx in itertools.pairwise(indexes):
        for g in idx.groups:
            before = prev.group(g.name)
            if before is not None and before.sha256 != g.sha256:
                total += min((p.object.length for p in g.patches
                              if p.base_sha256 == before.sha256), default=g.full.length)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench-work")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    cmd = ("scripts/bench_chains.py " + " ".join(sys.argv[1:])).strip()
    work = args.work / "chains"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = modelgen.MoEConfig(layers=4, experts=8, hidden=320, ffn=640, vocab=8000, seed=41)
    models = [modelgen.generate_moe(work / "m1", cfg)]
    rng = random.Random(41)
    pairs = [(layer, e) for layer in range(cfg.layers) for e in range(cfg.experts)]
    for i in range(2, 10):
        trained = rng.sample(pairs[:12], 2)  # a few experts again and again: long chains
        models.append(modelgen.train_experts(models[-1], work / f"m{i}", experts=trained,
                                             seed=i))
    store, key, root = work / "store", work / "keys" / "k.key", work / "root.json"
    store.mkdir()
    pub, agent = BIN / "deltaship-publish", BIN / "deltaship-agent"
    run(pub, "keygen", "--out", work / "keys", "--name", "k")
    run(pub, "init", "--store", store, "--key", key, "--out", root)
    versions = [f"v{i}" for i in range(1, 10)]

    def release(model: Path, version: str) -> None:
        run(pub, "release", model, "--store", store, "--version", version, "--key", key,
            "--cache-dir", work / "cache", "--json")

    release(models[0], "v1")
    config = work / "agent.toml"
    run(agent, "init", "--store", store, "--trust", root, "--model-dir", work / "device",
        "--config", config)
    run(agent, "run", "--once", "--config", config)
    for model, version in zip(models[1:], versions[1:], strict=True):
        release(model, version)
    run(agent, "run", "--once", "--config", config)
    status = json.loads(run(agent, "status", "--json", "--config", config))
    assert status["current"] == "v9", status
    indexes = [index_of(store, v) for v in versions]
    have = content_of(indexes[0])
    plan = make_plan(indexes[-1], have)
    unchained = dataclasses.replace(indexes[-1], groups=tuple(
        dataclasses.replace(g, chain=()) for g in indexes[-1].groups))
    without = make_plan(unchained, have).download_bytes
    got, patches = status["bytes_last_update"], own_patches(indexes)
    full = sum(s.group.full.length for s in plan.groups if s.kind != "have")
    kinds = {k: sum(1 for s in plan.groups if s.kind == k) for k in ("chain", "patch", "full")}
    size = (models[0] / "model.safetensors").stat().st_size
    row = (f"| MoE bf16 ({size / MB:.1f} MB), v1 -> v9 | {got / MB:.2f} MB "
           f"({got / patches:.2f}x) | {without / MB:.2f} MB | {patches / MB:.2f} MB | "
           f"{full / MB:.2f} MB | {kinds['chain']} / {kinds['patch']} / {kinds['full']} |")
    print(row, flush=True)
    assert got == plan.download_bytes, (got, plan.download_bytes)
    lines = [
        *intro("Far-behind devices (`scripts/bench_chains.py`)", cmd),
        "Eight releases after v1, each retraining two experts (drawn from 12) and every router;"
        " a device still at v1 updates with a real `deltaship-agent run --once` over a local "
        "store. Downloaded = the agent's count (equal to the planner's); the ratio is to the "
        "sum of the eight releases' own patches for the groups it needs.",
        "",
        "| update | agent downloaded | without chains | sum of the 8 releases' patches |"
        " full objects of those groups | groups by chain / patch / full |",
        "|---|---|---|---|---|---|",
        row,
    ]
    write_section(args.out, "bench_chains", "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
