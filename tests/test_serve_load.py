"""The reference server under load while a real agent updates, rolls back and is rolled back.

Everything is a real process on loopback: moto's S3 server, ``deltaship-publish``,
``deltaship-agent run --once`` (with a SIGHUP notify hook and an HTTP health check against the
server) and ``deltaship-agent serve``; 32 clients post forward passes the whole time.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from devtools import modelgen
from devtools.loadgen import Load
from edge_agent.layout import CURRENT_LINK, VERSIONS_DIR, DeviceLayout
from edge_agent.serving.server import load_reference
from manifest.constants import WEIGHT_INDEX_FILE

from ._model_server import ModelServer, is_subsequence, serving
from .conftest import Cli
from .test_agent_e2e import Device, _release

# 32 busy clients: keep the timing-calibrated SIGKILL trials off this worker (scripts/test.sh
# runs xdist with --dist loadgroup).
pytestmark = pytest.mark.xdist_group("timing")

PROMPTS = [[1, 2, 3], [7, 7, 7, 7, 7], [200, 13, 99, 4, 0, 180], list(range(0, 256, 9))]
BAD_TENSOR = "model.layers.0.block_sparse_moe.gate.weight"


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """v1..v7: experts retrained, a dense fine-tune, and v6 whose router diverged (NaN)."""
    d = tmp_path_factory.mktemp("serve-family")
    cfg = modelgen.MoEConfig(layers=2, experts=8, hidden=64, ffn=128, vocab=256, seed=11)
    v: dict[str, Path] = {"v1": modelgen.generate_moe(d / "v1", cfg)}
    v["v2"] = modelgen.train_experts(v["v1"], d / "v2", [(0, 1), (1, 3)], seed=2)
    v["v3"] = modelgen.train_experts(v["v2"], d / "v3", [(0, 5), (1, 6)], seed=3)
    v["v4"] = modelgen.dense_finetune(v["v3"], d / "v4", seed=4)
    v["v5"] = modelgen.train_experts(v["v4"], d / "v5", [(0, 7), (1, 2)], seed=5)
    v["v6"] = modelgen.diverge(v["v5"], d / "v6", [BAD_TENSOR])
    v["v7"] = modelgen.train_experts(v["v5"], d / "v7", [(0, 0), (1, 1)], seed=7)
    return v


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _changed_groups(model_dir: Path, a: str, b: str) -> list[str]:
    """Group files whose bytes differ between two retained versions (hashed, not by inode)."""
    va, vb = model_dir / VERSIONS_DIR / a, model_dir / VERSIONS_DIR / b
    files = set(json.loads((vb / WEIGHT_INDEX_FILE).read_text())["weight_map"]
                .values())
    return sorted(f for f in files if _sha(va / f) != _sha(vb / f))


def _with_hooks(dev: Device, server: ModelServer) -> None:
    """Both notify kinds a server process can take: its HTTP reload API (with the body
    template) and SIGHUP to the process in its pid file; then the HTTP health check."""
    with open(dev.config, "a") as f:
        f.write(f'\n[hooks]\nnotify = [{{kind = "http", url = "{server.url}/v1/reload", '
                """body = '{"version": "{version}", "path": "{path}"}'}, """
                f'{{kind = "signal", pidfile = "{server.pidfile}"}}]\n'
                f'health = {{kind = "http", url = "{server.url}/healthz", expect_version = true,'
                " timeout = 5, attempts = 50, interval = 0.1}\n")


def test_updates_and_rollbacks_under_load_drop_no_request(
        cli: Cli, bucket: str, release_key: Path, family: dict[str, Path],
        tmp_path: Path) -> None:
    store = f"s3://{bucket}/serve"
    cli.publish("init", "--store", store, "--key", release_key, "--out", tmp_path / "root.json")
    _release(cli, store, family["v1"], "v1", release_key)
    dev = Device(cli, tmp_path / "root.json", store, tmp_path / "dev", "--keep", "3")
    dev.agent("run", "--once")
    expected_changes: dict[tuple[str, str], list[str]] = {}
    with serving(cli, dev.model_dir) as server:
        _with_hooks(dev, server)
        load = Load(server.url, PROMPTS, clients=32).start()
        try:
            time.sleep(0.5)
            previous = "v1"
            for v in ("v2", "v3", "v4", "v5"):
                _release(cli, store, family[v], v, release_key)
                dev.agent("run", "--once")  # exit 0 only once the health check saw v
                assert server.get("/version")[1]["version"] == v
                expected_changes[(previous, v)] = _changed_groups(dev.model_dir, previous, v)
                previous = v
                time.sleep(0.3)
            # A release whose router diverged: the server refuses it before serving a request,
            # its health check fails, and the agent switches back by itself.
            _release(cli, store, family["v6"], "v6", release_key)
            p = dev.agent("run", "--once", check=False)
            assert p.returncode == 6, p.stderr
            assert "v6 failed after the switch" in p.stderr and "switched back to v5" in p.stderr
            assert dev.status()["failed_versions"] == ["v6"]
            assert server.get("/healthz") == (200, {"status": "ok", "version": "v5"})
            time.sleep(0.3)
            _release(cli, store, family["v7"], "v7", release_key)
            dev.agent("run", "--once")
            expected_changes[("v5", "v7")] = _changed_groups(dev.model_dir, "v5", "v7")
            time.sleep(0.3)
            # An operator rolls the device back by hand.
            dev.agent("rollback")
            server.wait_version("v5")
            expected_changes[("v7", "v5")] = _changed_groups(dev.model_dir, "v7", "v5")
            time.sleep(0.5)
        finally:
            load.stop()
        server.wait_swaps(len(expected_changes))
        stats = server.stats()

    assert load.failures == []
    assert len(load.answers) >= 32 * 20
    per_client = load.per_client()
    assert sorted(per_client) == list(range(32))
    # Versions seen by every client follow the order they went live in; backwards only across
    # the manual rollback (v7 -> v5); v6 never answered.
    timeline = ["v1", "v2", "v3", "v4", "v5", "v7", "v5"]
    for client, answers in per_client.items():
        seen = [a.version for a in answers]
        assert is_subsequence(seen, timeline), (client, seen)
    assert {a.version for a in load.answers} == {"v1", "v2", "v3", "v4", "v5", "v7"}
    assert all(a.version == a.header_version for a in load.answers)
    # Every answer equals what a fresh load of its version computes, bit for bit.
    want = {}
    for v in {a.version for a in load.answers}:
        model = load_reference(family[v])
        want.update({(v, i): model.forward(p).logits_sha256 for i, p in enumerate(PROMPTS)})
    assert len(set(want.values())) == len(want)  # the versions really answer differently
    wrong = [a for a in load.answers if a.logits_sha256 != want[(a.version, a.prompt)]]
    assert wrong == []
    # Each swap loaded exactly the groups whose bytes changed, and shared all the others.
    swaps = {(s["from"], s["to"]): s for s in stats["swaps"]}
    assert list(swaps) == list(expected_changes)
    for key, changed in expected_changes.items():
        assert swaps[key]["groups_loaded"] == changed, key
        assert 0 < len(changed) < swaps[key]["groups_shared"] or key == ("v3", "v4")


def test_a_two_expert_swap_costs_two_experts_of_memory_not_a_second_model(
        cli: Cli, tmp_path: Path) -> None:
    """Measured in the server process (peak RSS while both versions are held), side by side
    with a server doing the naive full reload of the same switch."""
    cfg = modelgen.MoEConfig(layers=2, experts=8, hidden=512, ffn=1024, vocab=1024, seed=3)
    v1 = modelgen.generate_moe(tmp_path / "v1", cfg)
    v2 = modelgen.train_experts(v1, tmp_path / "v2", [(0, 2), (1, 5)], seed=4)
    store = f"file://{tmp_path / 'store'}"
    (tmp_path / "store").mkdir()
    key = tmp_path / "keys" / "k.key"
    cli.publish("keygen", "--out", key.parent, "--name", "k")
    cli.publish("init", "--store", store, "--key", key, "--out", tmp_path / "root.json")
    _release(cli, store, v1, "v1", key)
    dev = Device(cli, tmp_path / "root.json", store, tmp_path / "dev")
    dev.agent("run", "--once")
    _release(cli, store, v2, "v2", key)
    with serving(cli, dev.model_dir) as ours, serving(cli, dev.model_dir, "--full-reload") as naive:
        rss_at_start = ours.stats()["rss_bytes"]
        dev.agent("run", "--once")
        ours.wait_version("v2")
        naive.wait_version("v2")
        swap, naive_swap = ours.wait_swaps(1)[0], naive.wait_swaps(1)[0]
        full_private = ours.stats()["model_private_bytes"]
        # Seen from outside the server: the group files its process has mapped.
        mapped, naive_mapped = _mapped(ours, dev.model_dir), _mapped(naive, dev.model_dir)
        # Back and forth a few times: what a swap frees goes back to the OS, so resident
        # memory does not creep up swap after swap.
        layout = DeviceLayout(dev.model_dir)
        for v in ("v1", "v2", "v1", "v2", "v1"):
            layout.switch(v)
            ours.wait_version(v)
        time.sleep(0.5)
        rss_at_end = ours.stats()["rss_bytes"]
    live = dev.model_dir / CURRENT_LINK
    model_bytes = sum(f.stat().st_size for f in live.glob("*.safetensors"))
    copy = model_bytes + full_private  # mapped bf16 files + their float32 conversion
    changed = _changed_groups(dev.model_dir, "v1", "v2")
    changed_bytes = sum((live / f).stat().st_size for f in changed)
    assert swap["groups_loaded"] == changed and len(changed) == 4  # 2 experts + 2 routers
    groups = _group_files(dev)
    assert sorted(f for v, f in mapped) == groups  # each group mapped once
    assert sorted(f for v, f in mapped if v == "v2") == changed  # only those were re-read
    assert all(v == "v1" for v, f in mapped if f not in changed)  # the rest is v1's, shared
    assert sorted(naive_mapped) == [("v2", f) for f in groups]  # the naive one re-read all
    assert naive_swap["groups_loaded"] == sorted(changed + [f for f in _group_files(dev)
                                                            if f not in changed])
    # Ours: the changed groups, mapped and converted (3x their bf16 size), plus slack.
    assert swap["extra_bytes"] < 3 * changed_bytes + (8 << 20), (swap, changed_bytes)
    assert swap["extra_bytes"] < copy / 4, (swap, copy)
    # The naive full reload, measured the same way in the same run, holds most of a second copy.
    assert naive_swap["extra_bytes"] > copy / 2, (naive_swap, copy)
    assert swap["extra_bytes"] < naive_swap["extra_bytes"] / 3
    assert rss_at_end - rss_at_start < changed_bytes + (8 << 20), (rss_at_start, rss_at_end)


def _mapped(server: ModelServer, model_dir: Path) -> list[tuple[str, str]]:
    """(version, group file) of every file of the model directory the server has mapped."""
    prefix = str(model_dir / VERSIONS_DIR) + "/"
    found = set()
    for line in Path(f"/proc/{server.proc.pid}/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1] if len(line.split()) >= 6 else ""
        if path.startswith(prefix) and path.endswith(".safetensors"):
            version, file = path[len(prefix):].split("/", 1)
            found.add((version, file))
    return sorted(found)


def _group_files(dev: Device) -> list[str]:
    index = json.loads((dev.live / WEIGHT_INDEX_FILE).read_text())
    return sorted(set(index["weight_map"].values()))


def test_serve_refuses_clearly_without_a_model(cli: Cli, tmp_path: Path) -> None:
    p = cli.run("deltaship-agent", "serve", "--model-dir", tmp_path / "nothing", "--port", "0",
                check=False)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "does not name a version" in p.stderr
