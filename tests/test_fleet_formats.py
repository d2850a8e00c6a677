"""The fleet formats, pure: channels, rollout membership and targets, device reports."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest

from manifest.constants import manifest_key, release_record_key, report_key
from manifest.errors import FormatError, MixAndMatchError, OversizeError
from manifest.metadata import Manifest, ObjectRef, ReleasePointer, check_channel
from manifest.report import MAX_ERROR_CHARS, MAX_FAILED, MAX_REPORT_SIZE, DeviceReport
from manifest.rollout import Ramp, Rollout, bucket, target_for
from manifest.trust import verify_manifest

from ._signed_docs import NOW, REPO_ID, Repo, hexof

V1 = ReleasePointer("v1", ObjectRef(hexof("1"), 100, "json"))
V2 = ReleasePointer("v2", ObjectRef(hexof("2"), 100, "json"))
IDS = [f"edge-{i:05d}" for i in range(2000)]


def test_channel_keys() -> None:
    assert manifest_key() == manifest_key("stable") == "manifest.json"
    assert manifest_key("beta") == "channels/beta/manifest.json"
    assert release_record_key("v2", "beta") == "channels/beta/releases/v2.json"
    assert release_record_key("v2") == "releases/v2.json"
    assert report_key("edge-1") == "reports/edge-1.json"
    for bad in ("", "Beta", "../x", "a/b", "-x", "x" * 65):
        with pytest.raises(FormatError):
            check_channel(bad)


@pytest.mark.parametrize("percent", [1, 10, 50])
def test_membership_matches_the_share_within_binomial_bounds(percent: int) -> None:
    n, p = len(IDS), percent / 100
    inside = sum(bucket(REPO_ID, "v2", d) < percent * 100 for d in IDS)
    spread = 4 * math.sqrt(n * p * (1 - p))  # four standard deviations
    assert abs(inside - n * p) <= spread, (inside, n * p, spread)


def test_each_candidate_reshuffles_who_goes_first() -> None:
    first = {d for d in IDS if bucket(REPO_ID, "v2", d) < 1000}
    second = {d for d in IDS if bucket(REPO_ID, "v3", d) < 1000}
    # Independent 10 % samples overlap in about 1 % of the fleet, not 10 %.
    assert len(first & second) < 0.05 * len(IDS)
    assert {d for d in IDS if bucket(REPO_ID, "v2", d) < 1000} == first  # deterministic
    assert bucket("0" * 32, "v2", IDS[0]) != bucket(REPO_ID, "v2", IDS[0]) or \
        bucket("0" * 32, "v2", IDS[1]) != bucket(REPO_ID, "v2", IDS[1])


def test_ramp_is_linear_and_clamped() -> None:
    ramp = Ramp(NOW, NOW + timedelta(hours=10), 100, 10_000)
    assert ramp.at(NOW - timedelta(hours=1)) == 100
    assert ramp.at(NOW + timedelta(hours=5)) == 100 + (9_900 // 2)
    assert ramp.at(NOW + timedelta(days=2)) == 10_000
    r = Rollout(V2, 0, ramp=ramp)
    assert Rollout.from_dict(r.to_dict()) == r


def test_targets_by_state() -> None:
    inside = next(d for d in IDS if bucket(REPO_ID, "v2", d) < 1000)
    outside = next(d for d in IDS if bucket(REPO_ID, "v2", d) >= 1000)
    kw = {"repository_id": REPO_ID, "now": NOW}
    active = Rollout(V2, 1000)
    assert target_for(V1, active, device_id=inside, running="v1", **kw).pointer == V2
    assert target_for(V1, active, device_id=outside, running="v1", **kw).pointer == V1
    halted = Rollout(V2, 1000, "halted")
    assert target_for(V1, halted, device_id=inside, running="v2", **kw).pointer == V2
    assert target_for(V1, halted, device_id=inside, running="v1", **kw).pointer == V1
    revoked = target_for(V1, Rollout(V2, 1000, "revoked"), device_id=inside, running="v2", **kw)
    assert revoked.pointer == V1 and revoked.revoked == "v2"
    assert target_for(V1, None, device_id=inside, running=None, **kw).pointer == V1


@pytest.mark.parametrize("bad", [
    {"basis_points": 10_001}, {"basis_points": -1}, {"basis_points": True},
    {"state": "paused"},
    {"ramp": {"start": "2026-03-02T00:00:00Z", "end": "2026-03-01T00:00:00Z",
              "start_basis_points": 0, "end_basis_points": 1}},
])
def test_malformed_rollouts_are_refused(bad: dict) -> None:
    d = {**Rollout(V2, 100).to_dict(), **bad}
    with pytest.raises(FormatError):
        Rollout.from_dict(d)


def test_the_manifest_carries_its_channel_and_rollout_and_devices_check_the_channel() -> None:
    repo = Repo()
    m = Manifest(1, NOW + timedelta(days=30), NOW, V1, "rollout", repository_id=REPO_ID,
                 channel="beta", rollout=Rollout(V2, 500))
    assert Manifest.from_dict(m.to_dict()) == m
    data = repo.sign_manifest(m)
    assert verify_manifest(data, repo.root, now=NOW, channel="beta").manifest == m
    with pytest.raises(MixAndMatchError, match="for channel 'beta', not 'stable'"):
        verify_manifest(data, repo.root, now=NOW)
    legacy = {k: v for k, v in Manifest(1, NOW, NOW, V1, repository_id=REPO_ID).to_dict().items()
              if k != "channel"}
    assert Manifest.from_dict(legacy).channel == "stable"


def _report(**kw: object) -> DeviceReport:
    base: dict[str, object] = {
        "device_id": "edge-1", "repository_id": REPO_ID, "channel": "stable", "state": "ok",
        "current": "v1", "target": "v2", "last_error": None, "failed_versions": (),
        "last_update_bytes": 1234, "started_at": NOW, "finished_at": NOW,
        "agent_version": "0.1"}
    base.update(kw)
    return DeviceReport.bounded(**base)


def test_reports_round_trip_and_are_bounded() -> None:
    r = _report(state="failed", last_error="x" * 5000,
                failed_versions=tuple(f"v{i}" for i in range(100)))
    assert len(r.last_error or "") == MAX_ERROR_CHARS
    assert r.failed_versions[-1] == "v99" and len(r.failed_versions) == MAX_FAILED
    data = r.to_bytes()
    assert len(data) <= MAX_REPORT_SIZE
    assert DeviceReport.from_bytes(data) == r


@pytest.mark.parametrize("edit", [
    lambda d: d.update(device_id="../evil"), lambda d: d.update(state="great"),
    lambda d: d.update(current="no/slash"), lambda d: d.update(last_error="y" * 2000),
])
def test_malformed_reports_are_refused(edit: object) -> None:
    import json

    d = json.loads(_report().to_bytes())
    edit(d)  # type: ignore[operator]
    with pytest.raises(FormatError):
        DeviceReport.from_bytes(json.dumps(d).encode())
    with pytest.raises(OversizeError):
        DeviceReport.from_bytes(b" " * (MAX_REPORT_SIZE + 1))
