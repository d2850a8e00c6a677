"""Operator commands as library calls (edge_agent.operations): rollback, resume, status, verify.

A device is laid out in-process by the agent's own DeviceLayout: release indexes from the
in-memory repository simulator with the pins a verified manifest gave them, objects,
hard-linked versions, a pinned root and a state with the switch history an agent would have
written. Nothing is fetched (these commands work
offline), so the store is a path that does not exist.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path

import pytest

from edge_agent.config import AgentConfig
from edge_agent.layout import DeviceLayout
from edge_agent.operations import Operator
from edge_agent.state import PendingSwitch, SwitchEvent
from manifest.errors import HashMismatchError, HookError, NotFoundError
from manifest.metadata import GroupEntry, ObjectRef, ReleaseIndex, TensorEntry

from ._signed_docs import NOW, Repo

AT = "2026-03-01T11:00:00Z"


class Device:
    def __init__(self, model_dir: Path, hooks: dict[str, object] | None = None) -> None:
        self.repo = Repo()
        self.layout = DeviceLayout(model_dir)
        self.layout.prepare()
        self.layout.pin_root(self.repo.root_bytes)
        self.cfg = AgentConfig(store=str(model_dir.parent / "no-store"), model_dir=model_dir,
                               device_id="dev-1", hooks=hooks or {})

    def operator(self) -> Operator:
        return Operator(self.cfg, now=lambda: NOW)

    def install(self, version: str) -> None:
        data = f"weights of {version}".encode()
        sha = hashlib.sha256(data).hexdigest()
        if not self.layout.has_object(sha):
            with self.layout.staged_object() as tmp:
                tmp.write_bytes(data)
                self.layout.commit_object(tmp, sha)
        group = GroupEntry("g", "g.safetensors", sha, len(data),
                           (TensorEntry("g.weight", "BF16", (4,)),), ObjectRef(sha, 9, "dspatch"))
        index = ReleaseIndex(version, NOW, (group,), (), repository_id=self.repo.repository_id)
        data = self.repo.sign_index(index)
        self.layout.save_index(version, data, self.repo.pointer(data, version).index)
        self.layout.build_version(index, {"g"}, {})

    def updates(self, *versions: str) -> None:
        """Install and switch through ``versions`` as update cycles would have."""
        state = self.layout.read_state()
        for v in versions:
            self.install(v)
            state.history.append(SwitchEvent.switch(AT, self.layout.current(), v))
            self.layout.switch(v)
        self.layout.write_state(state)

    def state(self) -> dict[str, object]:
        return json.loads(self.layout.state_file.read_text())  # type: ignore[no-any-return]


@pytest.fixture
def dev(tmp_path: Path) -> Device:
    return Device(tmp_path / "model")


def test_rollback_goes_back_one_version_at_a_time_and_pins(dev: Device) -> None:
    dev.updates("v1", "v2", "v3")
    op = dev.operator()
    result = op.rollback()
    assert (result.previous, result.version, result.unhealthy) == ("v3", "v2", None)
    assert dev.layout.current() == "v2"
    assert op.rollback().version == "v1"  # further back, not back to v3
    with pytest.raises(NotFoundError, match="no previous version is retained"):
        op.rollback()
    state = dev.state()
    assert state["pinned"] == "v1"
    assert state["history"][-1] == {  # type: ignore[index]
        "at": "2026-03-01T12:00:00Z", "event": "switch", "from": "v2", "to": "v1",
        "reason": "rollback"}
    report = op.status()
    assert (report.current, report.state.pinned, report.retained) == ("v1", "v1",
                                                                       ["v1", "v2", "v3"])
    assert report.to_dict()["pinned"] == "v1" and report.device_id == "dev-1"

    assert op.resume() == "v1"
    assert dev.state()["pinned"] is None
    assert op.resume() is None


def test_rollback_to_a_named_version_and_what_it_refuses(dev: Device) -> None:
    dev.updates("v1", "v2", "v3")
    op = dev.operator()
    with pytest.raises(NotFoundError, match=r"v9 is not retained .*\(retained: v1, v2, v3\)"):
        op.rollback("v9")
    victim = dev.layout.version_dir("v1") / "g.safetensors"
    victim.chmod(0o644)
    victim.write_bytes(b"bit rot")
    with pytest.raises(HashMismatchError, match="version v1 is damaged"):
        op.rollback("v1")
    assert dev.layout.current() == "v3" and dev.state()["pinned"] is None
    assert op.rollback("v2").version == "v2"


def test_rollback_replaces_a_pending_switch_and_skips_failed_versions(dev: Device) -> None:
    dev.updates("v1", "v2", "v3")
    state = dev.layout.read_state()
    state.failed_versions = ["v2"]
    state.pending_switch = PendingSwitch("v2", "v3")
    dev.layout.write_state(state)
    assert dev.operator().rollback().version == "v1"
    assert dev.state()["pending_switch"] is None
    assert dev.operator().resume() == "v1" and dev.state()["failed_versions"] == []


def test_a_failed_health_check_after_a_rollback_is_reported_and_the_rollback_stands(
        tmp_path: Path) -> None:
    dev = Device(tmp_path / "model",
                 {"health": {"kind": "command", "argv": ["false"], "attempts": 1}})
    dev.updates("v1", "v2")
    result = dev.operator().rollback()
    assert result.version == "v1" and isinstance(result.unhealthy, HookError)
    assert str(result.unhealthy).startswith(
        "rolled back to v1, but the model server is not healthy on it: false exited 1")
    assert dev.layout.current() == "v1" and dev.state()["pinned"] == "v1"


def test_verify_reports_damage_without_repairing(dev: Device) -> None:
    op = dev.operator()
    with pytest.raises(NotFoundError, match="no version is installed yet"):
        op.verify()
    dev.updates("v1")
    assert op.verify().damaged == ()
    os.unlink(dev.layout.version_dir("v1") / "g.safetensors")
    result = op.verify()
    assert (result.version, result.damaged, result.repaired) == ("v1", ("g.safetensors",), False)


@pytest.mark.parametrize("damage", ["index", "pin"])
def test_a_saved_index_that_no_longer_matches_its_pin_is_refused(dev: Device,
                                                                 damage: str) -> None:
    """Release indexes are unsigned: a retained one is re-verified against the sha256 and
    length the verified manifest pinned when it was installed (rollback, verify, repair)."""
    dev.updates("v1", "v2")
    index = dev.layout.indexes / "v1.json"
    if damage == "index":  # edited on disk: another group sha256, still valid JSON
        index.write_bytes(index.read_bytes().replace(b'"g.safetensors"', b'"h.safetensors"'))
    else:  # the pin names other content
        pin = dev.layout.indexes / "v1.pin.json"
        pin.write_text(json.dumps({"sha256": "ab" * 32, "length": 10}))
    with pytest.raises(HashMismatchError, match="the pin saved at its install"):
        dev.operator().rollback("v1")
    assert dev.layout.current() == "v2"
    (dev.layout.indexes / "v2.pin.json").unlink()
    assert not dev.layout.has_version("v2")  # a version without its pin is not retained


def test_status_shows_every_expiry_and_warns_when_one_is_near(dev: Device) -> None:
    """The pinned root (version and expiry), the release content (the manifest's) and the
    freshness (the timestamp's), from the last verified manifest; a line starting `warning:`
    when one is near (manifest.expiry.WARN_BEFORE) or past, naming what renews it."""
    index = dev.repo.sign_index(_index("v1", dev))
    pointer = dev.repo.pointer(index, "v1")
    manifest = dev.repo.manifest_doc(pointer, expires=NOW + timedelta(days=60))
    dev.layout.save_manifest(dev.repo.sign_manifest(manifest, expires=NOW + timedelta(days=20)))
    info = dev.operator().status().to_dict()
    assert info["root_version"] == 1
    assert {k: v["expires"] for k, v in info["expires"].items()} == {
        "root": "2027-03-01T12:00:00Z", "content": "2026-04-30T12:00:00Z",
        "freshness": "2026-03-21T12:00:00Z"}
    assert [v["warning"] for v in info["expires"].values()] == [None, None, None]

    def warnings_at(days: float) -> list[str]:
        return Operator(dev.cfg, now=lambda: NOW + timedelta(days=days)).status().warnings

    assert warnings_at(0) == []
    soon = warnings_at(7)
    assert soon == ["warning: the freshness expires at 2026-03-21T12:00:00Z (in 13 days): run "
                    "`deltaship-publish refresh` (the timestamp key; weekly from a timer)"]
    late = warnings_at(31)
    assert [w.split(" expire")[0] for w in late] == [
        "warning: the release content", "warning: the freshness"]
    assert "expired at 2026-03-21T12:00:00Z" in late[1]
    assert "`deltaship-publish refresh --content`" in late[0]
    root = warnings_at(340)
    assert root[0].startswith("warning: the trust root expires at 2027-03-01T12:00:00Z (in 25 "
                              "days): the root key holders")
    assert "`deltaship-publish root" in root[0]


def _index(version: str, dev: Device) -> ReleaseIndex:
    return ReleaseIndex(version, NOW, (), (), repository_id=dev.repo.repository_id)

def test_status_of_a_fresh_device(dev: Device) -> None:
    report = dev.operator().status()
    assert report.to_dict() == {
        "device_id": "dev-1", "channel": "stable", "current": None, "retained": [],
        "rollout": None, "pinned": None,
        "failed_versions": [], "highest_sequence": 0, "highest_timestamp": 0, "last_check": None,
        "last_result": None, "last_error": None, "bytes_last_update": 0, "bytes_total": 0,
        "plan": None, "last_update": None, "report": "off", "report_pending": False,
        "root_version": 1,
        "expires": {"root": {"expires": "2027-03-01T12:00:00Z", "days_left": 365,
                             "warning": None}},
        "store": dev.cfg.store, "model_dir": str(dev.cfg.model_dir)}


def test_an_agent_holds_one_state_and_saves_it_only_at_commit_points(dev: Device) -> None:
    agent = dev.operator().agent
    with pytest.raises(RuntimeError, match="no agent state is held"):
        agent.state  # noqa: B018
    with agent.holding_state() as state:
        assert agent.state is state
        state.pinned = "v1"
        assert dev.layout.read_state().pinned is None  # not saved before a commit point
        agent.commit("test")
        assert dev.layout.read_state().pinned == "v1"
    with pytest.raises(RuntimeError):
        agent.state  # noqa: B018
