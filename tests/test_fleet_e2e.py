"""A small fleet end to end: real publisher and agent processes, reports in the store.

A candidate whose training diverged fails its health check on the devices that try it;
`rollout --advance` reads their reports and halts the rollout by itself; `fleet status` then
counts what the devices really run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from devtools import modelgen
from manifest.rollout import bucket

from .conftest import BIN, Cli, MoEFamily

DEVICES = 4  # two inside the 50 % share of the candidate, two outside


def _live(model_dir: Path) -> str | None:
    try:
        return os.readlink(model_dir / "current").rsplit("/", 1)[-1]
    except FileNotFoundError:
        return None


@pytest.mark.slow  # scheduled first (tests/conftest.py)
def test_a_bad_candidate_is_halted_by_the_reports_and_fleet_status_counts_the_truth(
        cli: Cli, release_key: Path, moe_family: MoEFamily, tmp_path: Path) -> None:
    bad = modelgen.diverge(moe_family.v2, tmp_path / "bad",
                           tensors=["model.layers.1.block_sparse_moe.gate.weight"])
    store = tmp_path / "store"
    store.mkdir()
    root = tmp_path / "root.json"
    cli.publish("init", "--store", store, "--key", release_key, "--out", root)

    def release(model: Path, version: str, *extra: str) -> None:
        cli.publish("release", model, "--store", store, "--version", version, "--key",
                    release_key, "--cache-dir", tmp_path / "cache", *extra)

    release(moe_family.v1, "v1")
    # The store's repository id decides who is in; pick ids so that both sides have three.
    repo_id = json.loads(root.read_bytes())["signed"]["repository_id"]
    pool = [f"edge-{i:03d}" for i in range(200)]
    inside = [d for d in pool if bucket(repo_id, "v2", d) < 5000][:DEVICES // 2]
    outside = [d for d in pool if bucket(repo_id, "v2", d) >= 5000][:DEVICES // 2]
    probe = f"{BIN / 'python'} -m devtools.probe {{path}}"
    devices = []
    for device_id in inside + outside:
        d = tmp_path / device_id
        cli.run("deltaship-agent", "init", "--store", store, "--trust", root, "--model-dir", d,
                "--config", f"{d}.toml", "--device-id", device_id, "--report", "store",
                "--health-command", probe, "--health-attempts", "1")  # a NaN stays a NaN
        devices.append(d)

    def poll() -> None:
        for d in devices:
            cli.run("deltaship-agent", "run", "--once", "--config", f"{d}.toml", check=False)

    poll()
    assert {_live(d) for d in devices} == {"v1"}
    release(bad, "v2", "--rollout", "50")
    poll()
    tried = set(inside)
    # Every device that tried v2 failed its health check and switched back by itself.
    assert {_live(d) for d in devices} == {"v1"}
    out = cli.publish("rollout", "--advance", "--store", store, "--stages", "50,100", "--every",
                      "1s", "--max-failure-rate", "10%", "--min-devices", "1", "--key",
                      release_key, "--json")
    decision = json.loads(out.stdout)
    assert decision["decision"] == "halt", decision
    assert decision["failed"] == len(tried) and decision["reporting"] == len(tried)
    manifest = json.loads((store / "manifest.json").read_bytes())["signed"]["manifest"]
    assert manifest["rollout"]["state"] == "halted"
    poll()  # halted: no new device takes v2
    assert {_live(d) for d in devices} == {"v1"}
    status = json.loads(cli.publish("fleet", "status", "--store", store, "--json").stdout)
    assert status["devices"] == DEVICES
    assert {v: sum(s.values()) for v, s in status["by_version"].items()} == {"v1": DEVICES}
    failures = {f["version"]: f["devices"] for f in status["failures"]}
    assert failures == {"v2": len(tried)}
    assert status["rollout"]["state"] == "halted"
