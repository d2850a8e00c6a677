"""Staged rollouts, ``fleet status`` and ``rollout --advance`` through the real
``deltaship-publish`` processes (issue 11, items 2, 4, 5).

Device reports are written straight into ``reports/`` (``DeviceReport.to_bytes``): the counts
``fleet status`` and ``--advance`` print must equal the fleet written. "Six hours later" is a
manifest signed through the library with an earlier ``published_at``, never a sleep.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

from manifest.constants import MANIFEST_KEY, report_key
from manifest.rollout import bucket
from publisher.fleet import RolloutChange

from ._fleet_helpers import NOW, Fleet, one_line_error, report
from .conftest import Cli, MoEFamily


@pytest.fixture(params=["dir", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('bucket')}/m"
    (tmp_path / "store").mkdir()
    return str(tmp_path / "store")


@pytest.fixture
def dir_store(tmp_path: Path) -> str:
    (tmp_path / "store").mkdir()
    return str(tmp_path / "store")


def _staged(cli: Cli, url: str, moe: MoEFamily, percent: str = "1") -> Fleet:
    """v1 current, v2 the candidate for ``percent``."""
    f = Fleet.init(cli, url)
    f.release(moe.v1, "v1")
    f.release(moe.v2, "v2", "--rollout", percent)
    return f


@pytest.mark.slow  # scheduled first (tests/conftest.py)
def test_rollout_transitions(cli: Cli, any_store: str, moe_family: MoEFamily) -> None:
    f = _staged(cli, any_store, moe_family, "0.5")
    m = f.manifest()
    assert m.rollout is not None
    assert (m.current.version, m.rollout.candidate.version, m.rollout.basis_points,
            m.rollout.state, m.sequence) == ("v1", "v2", 50, "active", 2)
    hist = f.json("history", key=False)
    assert [r["version"] for r in hist["releases"]] == ["v1", "v2"] and hist["current"] == "v1"

    def step(*args: str) -> None:
        before = f.manifest().sequence
        out = f.json("rollout", *args)
        assert out["kind"] == "rollout" and out["sequence"] == before + 1

    step("--percent", "10")
    assert f.manifest().rollout.basis_points == 1000  # type: ignore[union-attr]
    rollout = f.manifest().rollout
    f.run("refresh", "--content")  # re-signing the content keeps the rollout as it is
    m = f.manifest()
    assert (m.current.version, m.rollout, m.action) == ("v1", rollout, "rollout")
    step("--ramp", "6h", "--to", "50")
    ro = f.manifest().rollout
    assert ro is not None and ro.ramp is not None
    assert (ro.ramp.start_bp, ro.ramp.end_bp, ro.ramp.end - ro.ramp.start) == \
        (1000, 5000, timedelta(hours=6))
    step("--halt")
    ro = f.manifest().rollout
    assert ro is not None and (ro.state, ro.ramp) == ("halted", None)
    assert 1000 <= ro.basis_points < 5000  # frozen where the ramp stood
    one_line_error(f.run("rollout", "--halt", check=False), 2, "already halted")
    step("--percent", "20")  # resumes
    ro = f.manifest().rollout
    assert ro is not None and (ro.state, ro.basis_points) == ("active", 2000)
    step("--revoke")
    assert f.manifest().rollout.state == "revoked"  # type: ignore[union-attr]
    for args in (["--percent", "30"], ["--complete"], ["--halt"]):
        one_line_error(f.run("rollout", *args, check=False), 2, "was revoked")
    # The next release is staged against the same fallback; completing makes it current.
    f.release(moe_family.v3, "v3", "--rollout", "5")
    m = f.manifest()
    assert m.rollout is not None
    assert (m.current.version, m.rollout.candidate.version) == ("v1", "v3")
    step("--complete")
    m = f.manifest()
    assert (m.current.version, m.rollout, m.action) == ("v3", None, "rollout")
    one_line_error(f.run("rollout", "--complete", check=False), 2, "no rollout in progress")
    # A revert ends a rollout too, and a release without --rollout replaces one.
    f.release(moe_family.v4, "v4", "--rollout", "1")
    f.run("revert", "--to", "v3")
    m = f.manifest()
    assert (m.current.version, m.rollout) == ("v3", None)


def _fleet_truth(f: Fleet, n: int = 60) -> dict[str, object]:
    """Write ``n`` reports of a known fleet (v1 current, v2 the candidate at 30 %), plus
    malformed and other-channel ones; return what ``fleet status`` must count."""
    rid = f.repository_id
    reports, stale = [], []
    for i in range(n):
        dev = f"edge-{i:03d}"
        inside = bucket(rid, "v2", dev) < 3000
        seen = NOW - timedelta(days=2) if i % 10 == 9 else NOW - timedelta(minutes=1)
        if seen < NOW - timedelta(hours=3):
            stale.append(dev)
        if inside and i % 4 == 0:
            r = report(dev, rid, state="failed", current="v1", target="v2", seen=seen,
                       error="health check failed: HTTP 503\nbody", failed=("v2",))
        elif inside and i % 4 == 1:
            r = report(dev, rid, state="failed", current="v1", target="v2", seen=seen,
                       error="disk full")
        elif inside:
            r = report(dev, rid, current="v2", target="v2", seen=seen)
        else:
            r = report(dev, rid, current="v1", target="v1", seen=seen)
        reports.append(r)
    f.write_reports(*reports, report("beta-1", rid, current="v9", channel="beta"))
    store = f.store
    store.put(report_key("junk"), b"{not json")
    store.put(report_key("big"), b" " * (20 * 1024))
    store.put(report_key("liar"), report("someone-else", rid, current="v1").to_bytes())
    store.put(report_key("foreign"), report("foreign", "0" * 32, current="v1").to_bytes())
    store.put("reports/notes.txt", b"hello")
    by_version: dict[str, Counter[str]] = {}
    for r in reports:
        by_version.setdefault(r.current or "none", Counter())[r.state] += 1
    failed_v2 = [r for r in reports if r.state == "failed"]
    return {
        "devices": n,
        "by_version": {v: dict(c) for v, c in by_version.items()},
        "failed_v2": len(failed_v2),
        "errors": Counter((r.last_error or "").splitlines()[0] for r in failed_v2),
        "stale": sorted(stale),
        "covered": sum(1 for r in reports if bucket(rid, "v2", r.device_id) < 3000),
        "malformed": sorted(f"reports/{k}" for k in
                            ("junk.json", "big.json", "liar.json", "foreign.json", "notes.txt")),
    }


def test_fleet_status_counts_equal_the_fleet_written(cli: Cli, any_store: str,
                                                     moe_family: MoEFamily) -> None:
    f = _staged(cli, any_store, moe_family, "30")
    truth = _fleet_truth(f)
    st = f.json("fleet status", "--poll-interval", "1h", "--stale", "3", key=False)
    assert st["devices"] == truth["devices"]
    assert st["by_version"] == truth["by_version"]
    assert st["stale"] == truth["stale"] and st["stale_after_seconds"] == 3 * 3600
    (v2,) = st["failures"]
    errors = truth["errors"]
    assert isinstance(errors, Counter)
    assert (v2["version"], v2["devices"]) == ("v2", truth["failed_v2"])
    assert {e["error"]: e["devices"] for e in v2["errors"]} == dict(errors)
    ro = st["rollout"]
    assert (ro["candidate"], ro["fallback"], ro["state"], ro["share"]) == \
        ("v2", "v1", "active", "30%")
    assert ro["covered_devices"] == truth["covered"]
    assert (ro["reporting_for_candidate"], ro["failed"]) == (truth["covered"], truth["failed_v2"])
    assert sorted(m["key"] for m in st["malformed"]) == truth["malformed"]
    assert st["other_channels"] == 1
    text = f.run("fleet status", key=False).stdout
    assert f"{truth['devices']} device(s) reported" in text
    assert f"{len(truth['stale'])} device(s): {truth['stale'][0]}" in text  # type: ignore[index]
    assert "health check failed: HTTP 503" in text and "reports/junk.json" in text
    # The beta channel's status counts only beta's report.
    f.release(moe_family.v3, "v3", "--channel", "beta")
    beta = f.json("fleet status", "--channel", "beta", key=False)
    assert (beta["devices"], beta["by_version"], beta["rollout"]) == (1, {"v9": {"ok": 1}}, None)


def _advance(f: Fleet, *args: str) -> dict[str, object]:
    p = f.run("rollout", "--advance", "--stages", "1,5,25,100", "--every", "6h",
              "--max-failure-rate", "2%", "--min-devices", "20", *args, "--json")
    assert p.stderr == "" and p.returncode == 0
    out: dict[str, object] = json.loads(p.stdout)
    return out


def _candidate_reports(f: Fleet, version: str, ok: int, failed: int, offset: int = 0) -> None:
    rid = f.repository_id
    f.write_reports(*(report(f"d-{offset + i}", rid, current=version, target=version)
                      for i in range(ok)),
                    *(report(f"d-{offset + ok + i}", rid, state="failed", current="v1",
                             target=version, error="health check failed") for i in range(failed)))


@pytest.mark.slow  # scheduled first (tests/conftest.py)
def test_advance_widens_when_healthy_and_waits_otherwise(cli: Cli, any_store: str,
                                                         moe_family: MoEFamily) -> None:
    f = _staged(cli, any_store, moe_family, "1")
    before = f.raw(MANIFEST_KEY)
    # Just published: wait, and write nothing.
    out = _advance(f)
    assert out["decision"] == "wait" and out["not_before"] is not None
    assert f.raw(MANIFEST_KEY) == before
    # Six hours later (signed so) but only 10 devices reported: still wait.
    f.set_rollout_at(NOW - timedelta(hours=7), RolloutChange("percent", 100))
    _candidate_reports(f, "v2", ok=10, failed=0)
    out = _advance(f)
    assert (out["decision"], out["reporting"], out["failed"]) == ("wait", 10, 0)
    # 24 reporting, 0 failed: widen 1 % -> 5 %.
    _candidate_reports(f, "v2", ok=14, failed=0, offset=10)
    out = _advance(f)
    assert (out["decision"], out["reporting"], out["new_basis_points"]) == ("widen", 24, 500)
    assert f.manifest().rollout.basis_points == 500  # type: ignore[union-attr]
    assert _advance(f)["decision"] == "wait"  # the new stage was just published
    # At 25 %, healthy and due: the next stage is 100 %, so the candidate is made current.
    f.set_rollout_at(NOW - timedelta(hours=7), RolloutChange("percent", 2500))
    out = _advance(f)
    assert out["decision"] == "complete"
    m = f.manifest()
    assert (m.current.version, m.rollout) == ("v2", None)
    out = _advance(f)
    assert out["decision"] == "none"
    text = f.run("rollout", "--advance").stdout.strip().splitlines()
    assert len(text) == 1 and text[0].startswith("none: no rollout in progress")


@pytest.mark.slow  # scheduled first (tests/conftest.py)
def test_advance_halts_or_revokes_a_failing_candidate(cli: Cli, any_store: str,
                                                      moe_family: MoEFamily) -> None:
    f = _staged(cli, any_store, moe_family, "5")
    # 19 ok and 1 failed of 20: 5 %, over 2 %, with enough devices: halt even before --every.
    _candidate_reports(f, "v2", ok=19, failed=1)
    out = _advance(f)
    assert (out["decision"], out["reporting"], out["failed"]) == ("halt", 20, 1)
    assert f.manifest().rollout.state == "halted"  # type: ignore[union-attr]
    assert _advance(f)["decision"] == "none"  # halted: nothing more to decide
    # Resumed by hand, the same reports with --revoke-on-failure revoke it.
    f.run("rollout", "--percent", "5")
    out = _advance(f, "--revoke-on-failure")
    assert out["decision"] == "revoke"
    m = f.manifest()
    assert m.rollout is not None and (m.current.version, m.rollout.state) == ("v1", "revoked")
    # Few devices, many failures: not judged yet (fewer than --min-devices).
    g = Fleet.init(cli, any_store + "-b" if "://" in any_store else _sibling(any_store))
    g.release(moe_family.v1, "v1")
    g.release(moe_family.v2, "v2", "--rollout", "5")
    _candidate_reports(g, "v2", ok=5, failed=5)
    out = _advance(g)
    assert (out["decision"], out["reporting"], out["failed"]) == ("wait", 10, 5)
    assert g.manifest().rollout.state == "active"  # type: ignore[union-attr]


def _sibling(path: str) -> str:
    p = Path(path).with_name("store-b")
    p.mkdir()
    return str(p)


def test_advance_needs_the_keys_even_when_it_would_wait(cli: Cli, dir_store: str,
                                                        moe_family: MoEFamily) -> None:
    f = _staged(cli, dir_store, moe_family)
    other = cli.cwd / "other"
    cli.publish("keygen", "--out", other, "--name", "x")
    one_line_error(f.publish("rollout", "--advance", "--store", dir_store, "--key",
                             other / "x.key", check=False), 2, "release")
