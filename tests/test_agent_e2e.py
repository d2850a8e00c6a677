"""The edge agent end to end: real agent processes against moto's S3 server and a real store."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from safetensors import safe_open

from manifest.constants import WEIGHT_INDEX_FILE

from ._agent_checks import raw_tensors
from .conftest import Cli, MoEFamily

_raw = raw_tensors  # every tensor's bytes, through our strict reader


def _official(model_dir: Path) -> dict[str, tuple[str, list[int]]]:
    """Every tensor of a device copy, opened through its index with the official library."""
    index = json.loads((model_dir / WEIGHT_INDEX_FILE).read_text())
    out = {}
    for name, file in index["weight_map"].items():
        with safe_open(model_dir / file, framework="numpy") as st:
            sl = st.get_slice(name)
            out[name] = (sl.get_dtype(), sl.get_shape())
    return out


class Device:
    def __init__(self, cli: Cli, root: Path, store: str, model_dir: Path,
                 *extra: object) -> None:
        self.cli, self.config = cli, model_dir.parent / f"{model_dir.name}.toml"
        self.model_dir = model_dir
        cli.run("deltaship-agent", "init", "--store", store, "--trust", root, "--model-dir",
                model_dir, "--config", self.config, "--device-id", "dev-1", *extra)

    def agent(self, *args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cli.run("deltaship-agent", *args, "--config", self.config, check=check)

    def status(self) -> dict:
        return json.loads(self.agent("status", "--json").stdout)

    @property
    def live(self) -> Path:
        return self.model_dir / "current"


@pytest.fixture
def published(cli: Cli, bucket: str, release_key: Path, moe_family: MoEFamily,
              tmp_path: Path) -> tuple[str, Path]:
    store = f"s3://{bucket}/fleet"
    cli.publish("init", "--store", store, "--key", release_key, "--out", tmp_path / "root.json")
    return store, tmp_path / "root.json"


def _release(cli: Cli, store: str, model: Path, version: str, key: Path) -> dict:
    return json.loads(cli.publish("release", model, "--store", store, "--version", version,
                                  "--key", key, "--json", "--cache-dir",
                                  cli.cwd / "cache").stdout)


@pytest.mark.slow  # scheduled first (tests/conftest.py)
def test_install_update_skip_and_rollback(cli: Cli, published: tuple[str, Path],
                                          release_key: Path, moe_family: MoEFamily,
                                          tmp_path: Path) -> None:
    store, root = published
    _release(cli, store, moe_family.v1, "v1", release_key)
    dev = Device(cli, root, store, tmp_path / "dev")
    dev.agent("run", "--once")
    assert _raw(dev.live) == _raw(moe_family.v1)
    assert set(_official(dev.live)) == set(_raw(moe_family.v1))
    assert (dev.live / "config.json").read_bytes() == (moe_family.v1 / "config.json").read_bytes()
    st = dev.status()
    assert st["current"] == "v1" and st["highest_sequence"] == 1

    # v2: only the trained experts and routers are downloaded, as patches.
    s2 = _release(cli, store, moe_family.v2, "v2", release_key)
    dev.agent("run", "--once")
    assert _raw(dev.live) == _raw(moe_family.v2)
    st = dev.status()
    assert st["current"] == "v2" and st["bytes_last_update"] == s2["bases"][0]["download_bytes"]
    assert st["retained"] == ["v1", "v2"]
    last = st["last_update"]
    assert (last["from"], last["version"]) == ("v1", "v2") and st["plan"] is None
    assert last["downloaded_bytes"] == last["planned_bytes"] == st["bytes_last_update"]
    assert last["full_bytes"] == s2["full_download_bytes"]
    assert last["groups_changed"] == s2["groups_changed"] and last["groups"] == s2["groups_total"]
    assert "v1 -> v2 at " in dev.agent("status").stdout

    # Up to date: exit 0, nothing downloaded.
    out = dev.agent("run", "--once")
    assert "up to date" in out.stdout

    # Rollback (offline, verified, pinned) and resume.
    out = dev.agent("rollback")
    assert "v2 -> v1" in out.stdout
    assert _raw(dev.live) == _raw(moe_family.v1)
    _release(cli, store, moe_family.v3, "v3", release_key)
    out = dev.agent("run", "--once")
    assert "pinned at v1" in out.stdout and dev.status()["current"] == "v1"
    dev.agent("resume")
    dev.agent("run", "--once")
    assert _raw(dev.live) == _raw(moe_family.v3)

    # A second device skips from v1 straight to v4.
    s4 = _release(cli, store, moe_family.v4, "v4", release_key)
    other = Device(cli, root, store, tmp_path / "dev2")
    dev.agent("run", "--once")
    assert _raw(dev.live) == _raw(moe_family.v4)
    assert dev.status()["bytes_last_update"] == s4["bases"][0]["download_bytes"]
    other.agent("run", "--once")
    assert _raw(other.live) == _raw(moe_family.v4)
    assert other.status()["bytes_last_update"] == s4["full_download_bytes"]
    # Only `keep` (2) previous versions stay.
    assert len(dev.status()["retained"]) <= 3


def test_selective_sync_with_include(cli: Cli, published: tuple[str, Path], release_key: Path,
                                     moe_family: MoEFamily, tmp_path: Path) -> None:
    store, root = published
    _release(cli, store, moe_family.v1, "v1", release_key)
    dev = Device(cli, root, store, tmp_path / "dev", "--include", "layers.0.experts.*",
                 "--include", "embeddings")
    dev.agent("run", "--once")
    files = sorted(p.name for p in dev.live.glob("*.safetensors"))
    assert files == ["embeddings.safetensors"] + [
        f"layers.0.experts.{e}.safetensors" for e in range(4)]
    want = {k: v for k, v in _raw(moe_family.v1).items()
            if ".layers.0.block_sparse_moe.experts." in k or "embed_tokens" in k}
    assert _raw(dev.live) == want
    assert set(_official(dev.live)) == set(want)


def test_fleet_revert_is_followed(cli: Cli, published: tuple[str, Path], release_key: Path,
                                  moe_family: MoEFamily, tmp_path: Path) -> None:
    store, root = published
    _release(cli, store, moe_family.v1, "v1", release_key)
    _release(cli, store, moe_family.v2, "v2", release_key)
    dev = Device(cli, root, store, tmp_path / "dev")
    dev.agent("run", "--once")
    assert dev.status()["current"] == "v2"
    cli.publish("revert", "--store", store, "--to", "v1", "--key", release_key)
    dev.agent("run", "--once")
    st = dev.status()
    assert st["current"] == "v1" and st["highest_sequence"] == 3
    assert _raw(dev.live) == _raw(moe_family.v1)


def test_verify_and_repair(cli: Cli, published: tuple[str, Path], release_key: Path,
                           moe_family: MoEFamily, tmp_path: Path) -> None:
    store, root = published
    _release(cli, store, moe_family.v1, "v1", release_key)
    dev = Device(cli, root, store, tmp_path / "dev")
    dev.agent("run", "--once")
    assert "matches" in dev.agent("verify").stdout
    victim = dev.live / "layers.1.experts.2.safetensors"
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    bad = dev.agent("verify", check=False)
    assert bad.returncode != 0 and "layers.1.experts.2.safetensors" in bad.stderr
    dev.agent("verify", "--repair")
    assert _raw(dev.live) == _raw(moe_family.v1)
    assert "matches" in dev.agent("verify").stdout


def test_verify_and_repair_the_generated_weight_index(
        cli: Cli, published: tuple[str, Path], release_key: Path, moe_family: MoEFamily,
        tmp_path: Path) -> None:
    """``model.safetensors.index.json`` is not a store object but made from the index at
    install; model servers read it first. Damaged, `verify` names it (exit 2) and `verify
    --repair` writes it again, byte for byte as the install did."""
    store, root = published
    _release(cli, store, moe_family.v1, "v1", release_key)
    dev = Device(cli, root, store, tmp_path / "dev")
    dev.agent("run", "--once")
    victim = dev.live / "model.safetensors.index.json"
    good = victim.read_bytes()
    victim.write_bytes(good.replace(b'"weight_map"', b'"weight_mop"'))
    bad = dev.agent("verify", check=False)
    assert bad.returncode == 2 and "model.safetensors.index.json" in bad.stderr, bad.stderr
    dev.agent("verify", "--repair")
    assert victim.read_bytes() == good
    assert (victim.stat().st_mode & 0o777) == 0o644
    assert "matches" in dev.agent("verify").stdout


def test_service_polls_and_stops_cleanly_on_sigterm(cli: Cli, published: tuple[str, Path],
                                                    release_key: Path, moe_family: MoEFamily,
                                                    tmp_path: Path) -> None:
    """`run` as a service: installs, follows a new release on its next poll, stops on SIGTERM."""
    import signal
    import time

    from .conftest import BIN

    store, root = published
    _release(cli, store, moe_family.v1, "v1", release_key)
    dev = Device(cli, root, store, tmp_path / "dev", "--interval", "1")
    proc = subprocess.Popen([str(BIN / "deltaship-agent"), "run", "--config", str(dev.config)],
                            env=cli.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        def wait_for(version: str) -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if dev.live.exists() and dev.status()["current"] == version:
                    return
                time.sleep(0.2)
            raise AssertionError(f"the service did not reach {version}")

        wait_for("v1")
        _release(cli, store, moe_family.v2, "v2", release_key)
        wait_for("v2")
        assert _raw(dev.live) == _raw(moe_family.v2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "switched to v2" in err and "Traceback" not in err
