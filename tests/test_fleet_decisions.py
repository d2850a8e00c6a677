"""The publisher's fleet decisions, pure (publisher/fleet.py): flag values, rollout changes and
``rollout --advance``, table-driven with a fixed "now"."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manifest.errors import AlreadyExistsError, LocalError, NotFoundError
from manifest.metadata import Manifest, ObjectRef, ReleasePointer
from manifest.rollout import Ramp, Rollout
from publisher.fleet import (
    AdvancePolicy,
    ReportSet,
    RolloutChange,
    apply_change,
    candidate_health,
    decide_advance,
    parse_duration,
    parse_percent,
    parse_stages,
    percent_text,
)

from ._fleet_helpers import report
from ._signed_docs import NOW, REPO_ID, hexof

V1 = ReleasePointer("v1", ObjectRef(hexof("1"), 100, "json"))
V2 = ReleasePointer("v2", ObjectRef(hexof("2"), 100, "json"))
POLICY = AdvancePolicy((100, 500, 2500, 10_000), timedelta(hours=6), 200, 20)


def _manifest(rollout: Rollout | None, published_ago: timedelta = timedelta(hours=7)
              ) -> Manifest:
    return Manifest(3, NOW + timedelta(days=300), NOW - published_ago, V1,
                    repository_id=REPO_ID, rollout=rollout)


def _reports(ok: int, failed: int, version: str = "v2") -> ReportSet:
    return ReportSet(tuple(
        [report(f"ok-{i}", REPO_ID, current=version, target=version) for i in range(ok)]
        + [report(f"bad-{i}", REPO_ID, state="failed", current="v1", target=version,
                  error="boom") for i in range(failed)]))


@pytest.mark.parametrize("text,bp", [("5", 500), ("0.5", 50), ("12.25%", 1225), ("100", 10_000),
                                     ("0", 0), (" 1 % ", 100)])
def test_percent(text: str, bp: int) -> None:
    assert parse_percent(text, "--percent") == bp


@pytest.mark.parametrize("text", ["", "x", "101", "-0.01", "0.001", "nan", "inf", "1e9"])
def test_percent_refused(text: str) -> None:
    with pytest.raises(LocalError):
        parse_percent(text, "--percent")


@given(st.integers(0, 10_000))
def test_percent_text_round_trips(bp: int) -> None:
    assert parse_percent(percent_text(bp), "x") == bp


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("30m", 1800), ("6h", 21600),
                                          ("2d", 172800), ("1w", 604800), ("1h30m", 5400)])
def test_duration(text: str, seconds: int) -> None:
    assert parse_duration(text, "--every") == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "6", "h", "0h", "-1h", "1.5h", "6 h x", "1y"])
def test_duration_refused(text: str) -> None:
    with pytest.raises(LocalError):
        parse_duration(text, "--every")


def test_stages() -> None:
    assert parse_stages("1,5,25,100") == (100, 500, 2500, 10_000)
    assert parse_stages("0.5, 2") == (50, 200)
    for bad in ("", "5,1", "1,1", "0,5", "1,200"):
        with pytest.raises(LocalError):
            parse_stages(bad)


def test_changes() -> None:
    active = Rollout(V2, 100)
    m = _manifest(active)
    assert apply_change(m, RolloutChange("percent", 700), NOW, "s") == (V1, Rollout(V2, 700))
    assert apply_change(m, RolloutChange("complete"), NOW, "s") == (V2, None)
    cur, halted = apply_change(m, RolloutChange("halt"), NOW, "s")
    assert (cur, halted) == (V1, Rollout(V2, 100, "halted"))
    with pytest.raises(AlreadyExistsError):
        apply_change(_manifest(halted), RolloutChange("halt"), NOW, "s")
    _, ramped = apply_change(m, RolloutChange("ramp", ramp=timedelta(hours=2)), NOW, "s")
    assert ramped is not None and ramped.ramp == Ramp(NOW, NOW + timedelta(hours=2), 100, 10_000)
    assert ramped.share(NOW + timedelta(hours=1)) == 100 + 9900 // 2
    with pytest.raises(LocalError, match="must widen"):
        apply_change(m, RolloutChange("ramp", ramp=timedelta(hours=2), end_bp=100), NOW, "s")
    # A halt freezes a ramp where it stands.
    _, frozen = apply_change(_manifest(ramped), RolloutChange("halt"),
                             NOW + timedelta(hours=1), "s")
    assert frozen == Rollout(V2, 5050, "halted")
    _, revoked = apply_change(m, RolloutChange("revoke"), NOW, "s")
    assert revoked is not None and revoked.state == "revoked"
    for op in ("percent", "complete", "halt", "revoke", "ramp"):
        with pytest.raises(LocalError, match="revoked"):
            apply_change(_manifest(revoked), RolloutChange(op, ramp=timedelta(hours=1)), NOW,
                         "s")
        with pytest.raises(NotFoundError, match="no rollout in progress"):
            apply_change(_manifest(None), RolloutChange(op), NOW, "s")


def test_candidate_health_counts_only_reports_about_the_candidate() -> None:
    rs = (report("a", REPO_ID, current="v2", target="v2"),
          report("b", REPO_ID, state="failed", current="v1", target="v2"),
          report("c", REPO_ID, state="skipped", current="v1", target="v1", failed=("v2",)),
          report("d", REPO_ID, state="failed", current="v1", target="v1"),  # not about v2
          report("e", REPO_ID, current="v1", target="v1"))
    h = candidate_health("v2", rs)
    assert (h.reporting, h.failed) == (3, 2)


@pytest.mark.parametrize("rollout,ago,ok,failed,action,new_bp", [
    (None, timedelta(hours=7), 30, 0, "none", None),
    (Rollout(V2, 100, "halted"), timedelta(hours=7), 30, 0, "none", None),
    (Rollout(V2, 100, "revoked"), timedelta(hours=7), 30, 0, "none", None),
    (Rollout(V2, 100), timedelta(hours=1), 30, 0, "wait", None),  # not due
    (Rollout(V2, 100), timedelta(hours=7), 19, 0, "wait", None),  # too few reports
    (Rollout(V2, 100), timedelta(hours=7), 19, 1, "halt", None),  # 5 % > 2 %, 20 devices
    (Rollout(V2, 100), timedelta(hours=1), 19, 1, "halt", None),  # halting does not wait
    (Rollout(V2, 100), timedelta(hours=7), 5, 5, "wait", None),  # 50 %, but only 10 devices
    (Rollout(V2, 100), timedelta(hours=7), 49, 1, "widen", 500),  # 2 % is not over 2 %
    (Rollout(V2, 300), timedelta(hours=7), 30, 0, "widen", 500),  # the next stage above
    (Rollout(V2, 2500), timedelta(hours=7), 30, 0, "complete", 10_000),
    (Rollout(V2, 10_000), timedelta(hours=7), 30, 0, "complete", 10_000),
])
def test_advance_decisions(rollout: Rollout | None, ago: timedelta, ok: int, failed: int,
                           action: str, new_bp: int | None) -> None:
    d = decide_advance(_manifest(rollout, ago), _reports(ok, failed), POLICY, NOW, "stable")
    assert (d.action, d.new_bp) == (action, new_bp), d.reason
    assert "\n" not in d.reason


def test_advance_revokes_when_asked_and_leaves_ramps_and_last_stages_alone() -> None:
    revoking = AdvancePolicy(POLICY.stages, POLICY.every, 200, 20, revoke_on_failure=True)
    d = decide_advance(_manifest(Rollout(V2, 100)), _reports(10, 10), revoking, NOW, "s")
    assert d.action == "revoke" and d.change() == RolloutChange("revoke")
    ramp = Ramp(NOW - timedelta(hours=7), NOW + timedelta(hours=1), 100, 5000)
    d = decide_advance(_manifest(Rollout(V2, 100, ramp=ramp)), _reports(30, 0), POLICY, NOW,
                       "s")
    assert d.action == "wait" and "ramp" in d.reason
    short = AdvancePolicy((100, 500), POLICY.every, 200, 20)
    d = decide_advance(_manifest(Rollout(V2, 500)), _reports(30, 0), short, NOW, "s")
    assert d.action == "none" and "rollout --complete" in d.reason
    assert decide_advance(None, ReportSet(()), POLICY, NOW, "s").action == "none"
