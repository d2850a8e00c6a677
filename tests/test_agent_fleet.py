"""Channels and staged rollouts on real devices (docs/FORMAT.md §5.1, §5.2; issue 11).

Every device is the real ``deltaship-agent`` in a subprocess (``run --once``) against a store
directory, or the same directory over plain HTTP (:class:`tests._served_store.ServedStore`);
the documents are signed in the test (:class:`tests._fleet_store.FleetStore`). Which device
takes a candidate is computed here from the formula of §5.1 (:func:`manifest.rollout.bucket`)
and compared with what each device installed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from manifest.constants import manifest_key
from manifest.rollout import bucket

from ._fleet_store import AgentDevice, FleetStore, rollout, run_all
from ._served_store import ServedStore
from ._signed_docs import REPO_ID


def fleet_store(tmp_path: Path) -> FleetStore:
    return FleetStore(tmp_path / "store")


def ok(p: subprocess.CompletedProcess[str]) -> None:
    assert p.returncode == 0, (p.stdout, p.stderr)


# -- channels ----------------------------------------------------------------------------------


@pytest.mark.parametrize("over", ["directory", "http"])
def test_channels_are_isolated_on_the_device(tmp_path: Path, over: str) -> None:
    """A stable and a beta device each follow their own manifest; a mirror that serves beta's
    manifest at stable's key is refused (exit 3) and nothing moves."""
    store = fleet_store(tmp_path)
    v1, v2 = store.index("v1"), store.index("v2")
    store.manifest(v1)
    store.manifest(v2, channel="beta")
    with ServedStore(store.path) as served:
        url = served.url if over == "http" else str(store.path)
        trust = store.signed_roots[0]
        stable = AgentDevice(tmp_path / "stable", url, trust, "dev-stable")
        beta = AgentDevice(tmp_path / "beta", url, trust, "dev-beta", channel="beta")
        for p in run_all([stable, beta], "run", "--once"):
            ok(p)
        assert (stable.current, beta.current) == ("v1", "v2")
        assert beta.model_text == "the model of v2\n"
        assert (stable.status()["channel"], beta.status()["channel"]) == ("stable", "beta")
        if over == "http":
            paths = {r.path.split("/store/", 1)[1] for r in served.server.requests}
            assert "manifest.json" in paths and "channels/beta/manifest.json" in paths

        # The mirror copies beta's manifest (a newer sequence, validly signed) over stable's.
        store.manifest(v2, channel="beta", key=manifest_key("stable"))
        p = stable.agent("run", "--once")
        assert p.returncode == 3, p.stderr
        assert "channel 'beta', not 'stable'" in p.stderr and "Traceback" not in p.stderr
        assert stable.current == "v1" and stable.status()["last_result"] == "failed"


def test_changing_channel_forgets_the_other_channels_floors(tmp_path: Path) -> None:
    """stable is at sequence 5, beta at 1: a device moved to beta (its configuration) takes
    beta's manifest instead of refusing it as a replay, and moving back works too."""
    store = fleet_store(tmp_path)
    v1, v2 = store.index("v1"), store.index("v2")
    for _ in range(5):
        store.manifest(v1)
    store.manifest(v2, channel="beta")
    dev = AgentDevice(tmp_path / "dev", str(store.path), store.signed_roots[0], "dev-1")
    ok(dev.agent("run", "--once"))
    assert dev.current == "v1"
    dev.configure(channel="beta")
    ok(dev.agent("run", "--once"))
    assert dev.current == "v2" and dev.status()["highest_sequence"] == 1
    dev.configure(channel="stable")
    ok(dev.agent("run", "--once"))
    assert dev.current == "v1" and dev.status()["highest_sequence"] == 5


# -- staged rollouts ---------------------------------------------------------------------------


@pytest.mark.slow  # scheduled first (tests/conftest.py)
def test_rollout_membership_halt_and_complete_on_16_devices(tmp_path: Path) -> None:
    """25 % of v2: exactly the devices whose bucket is below 2500 take it, the others stay on
    the fallback v1. Halted: nobody new takes v2 (a device that was in but had not polled stays
    on v1), those on it stay. Completed (v2 current, no rollout): everyone runs v2.

    16 devices: 4 of these ids are in (one of them the late device), 12 out; the formula itself
    is checked over many ids in tests/test_fleet_formats.py."""
    store = fleet_store(tmp_path)
    v1, v2 = store.index("v1"), store.index("v2")
    store.manifest(v1)
    trust = store.signed_roots[0]
    devices = [AgentDevice(tmp_path / f"d{i:02d}", str(store.path), trust, f"edge-{i:05d}")
               for i in range(16)]
    for p in run_all(devices, "run", "--once"):
        ok(p)
    assert {d.current for d in devices} == {"v1"}

    share = 2500
    store.manifest(v1, rollout=rollout(v2, share), action="rollout")
    inside = {d.device_id for d in devices if bucket(REPO_ID, "v2", d.device_id) < share}
    # The formula spreads the ids (deterministic for these): the late device, and others on
    # both sides that poll.
    assert 2 <= len(inside) <= len(devices) - 2
    late = next(d for d in devices if d.device_id in inside)  # in, but does not poll yet
    polling = [d for d in devices if d is not late]
    for p in run_all(polling, "run", "--once"):
        ok(p)
    assert {d.device_id for d in polling if d.current == "v2"} == inside - {late.device_id}
    assert all(d.current == "v1" for d in polling if d.device_id not in inside)
    s = next(d for d in polling if d.device_id in inside).status()
    assert s["rollout"]["in"] is True and s["rollout"]["bucket"] < share
    assert s["rollout"]["candidate"] == "v2" and s["rollout"]["state"] == "active"
    s = next(d for d in polling if d.device_id not in inside).status()
    assert s["rollout"]["in"] is False and s["rollout"]["bucket"] >= share

    store.manifest(v1, rollout=rollout(v2, share, "halted"), action="rollout")
    for p in run_all(devices, "run", "--once"):
        ok(p)
    assert {d.device_id for d in devices if d.current == "v2"} == inside - {late.device_id}
    assert late.current == "v1" and late.status()["rollout"]["state"] == "halted"

    store.manifest(v2, action="rollout")  # complete: v2 is current for all
    for p in run_all(devices, "run", "--once"):
        ok(p)
    assert {d.current for d in devices} == {"v2"}
    assert devices[0].status()["rollout"] is None


@pytest.mark.slow  # scheduled first (tests/conftest.py)
def test_revoke_sends_devices_back_and_is_not_retried(tmp_path: Path) -> None:
    """A candidate at 100 % is revoked: devices on it switch back to the fallback, every device
    records it as failed, and re-activating the same candidate does not bring it back (only a
    newer release or `resume` does)."""
    store = fleet_store(tmp_path)
    v1, v2 = store.index("v1"), store.index("v2")
    store.manifest(v1)
    trust = store.signed_roots[0]
    devices = [AgentDevice(tmp_path / f"d{i}", str(store.path), trust, f"edge-{i}")
               for i in range(4)]
    for p in run_all(devices, "run", "--once"):
        ok(p)
    store.manifest(v1, rollout=rollout(v2, 10000), action="rollout")
    for p in run_all(devices[:3], "run", "--once"):  # the fourth never took it
        ok(p)
    assert [d.current for d in devices] == ["v2", "v2", "v2", "v1"]

    store.manifest(v1, rollout=rollout(v2, 10000, "revoked"), action="rollout")
    for p in run_all(devices, "run", "--once"):
        ok(p)
    assert {d.current for d in devices} == {"v1"}
    assert all(d.model_text == "the model of v1\n" for d in devices)
    assert all(d.status()["failed_versions"] == ["v2"] for d in devices)

    store.manifest(v1, rollout=rollout(v2, 10000), action="rollout")  # the same candidate again
    for p in run_all(devices, "run", "--once"):
        ok(p)
    assert {d.current for d in devices} == {"v1"}
    ok(devices[0].agent("resume"))
    ok(devices[0].agent("run", "--once"))
    assert devices[0].current == "v2"


def test_status_shows_the_rollout_in_text(tmp_path: Path) -> None:
    store = fleet_store(tmp_path)
    v1, v2 = store.index("v1"), store.index("v2")
    store.manifest(v1, rollout=rollout(v2, 0), action="rollout")
    dev = AgentDevice(tmp_path / "dev", str(store.path), store.signed_roots[0], "edge-7")
    ok(dev.agent("run", "--once"))
    text = dev.agent("status").stdout
    b = bucket(REPO_ID, "v2", "edge-7")
    assert "channel" in text and "stable" in text
    assert f"v2 active at 0 % (fallback v1); bucket {b}: this device is not in, runs v1" in text


# -- configuration -----------------------------------------------------------------------------


def test_init_flags_for_the_fleet(tmp_path: Path) -> None:
    """`init --channel --report --report-url --report-deadline` write the configuration; wrong
    values are refused with one line naming the flag (exit 2) and nothing is written."""
    from edge_agent.config import load_config

    from ._agent_checks import BIN, agent_env

    store = fleet_store(tmp_path)
    trust = tmp_path / "root.json"
    trust.write_bytes(store.signed_roots[0])

    def init(config: Path, *flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "deltaship-agent"), "init", "--store", str(store.path),
                               "--trust", str(trust), "--model-dir", str(tmp_path / "m"),
                               "--config", str(config), "--device-id", "edge-9", *flags],
                              env=agent_env(), text=True, capture_output=True, timeout=60)

    p = init(tmp_path / "a.toml", "--channel", "beta", "--report", "store", "--report-url",
             "https://fleet.example/in", "--report-deadline", "3")
    ok(p)
    assert "channel beta" in p.stdout
    cfg = load_config(tmp_path / "a.toml")
    assert (cfg.channel, cfg.report, cfg.report_url, cfg.report_deadline) == (
        "beta", "store", "https://fleet.example/in", 3.0)
    for flags, says in [(("--channel", "Beta!"), "--channel"),
                        (("--report-url", "ftp://x/y"), "--report-url"),
                        (("--device-id", "bad id"), "must be a device id")]:
        p = init(tmp_path / "b.toml", *flags)
        assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert not (tmp_path / "b.toml").exists()
