"""Fleet (found in review): what counts as a device failing a rollout's candidate.

A device whose cycle failed before it learnt its target (the store unreachable, the manifest
expired or not verifiable) reports ``state: failed`` with ``target: null`` and ``current``
what it runs (edge_agent/updater.py: the report of a cycle that raised). When it runs the
candidate, that failure says nothing about the candidate: a store outage or a forgotten
``refresh`` must not halt, or with ``--revoke-on-failure`` revoke, a healthy candidate."""

from __future__ import annotations

from datetime import timedelta

from manifest.metadata import Manifest, ObjectRef, ReleasePointer
from manifest.rollout import Rollout
from publisher.fleet import AdvancePolicy, ReportSet, candidate_health, decide_advance

from ._fleet_helpers import report
from ._signed_docs import NOW, REPO_ID, hexof

V1 = ReleasePointer("v1", ObjectRef(hexof("1"), 100, "json"))
V2 = ReleasePointer("v2", ObjectRef(hexof("2"), 100, "json"))
POLICY = AdvancePolicy((100, 500, 2500, 10_000), timedelta(hours=6), 200, 20,
                       revoke_on_failure=True)


def _manifest() -> Manifest:
    return Manifest(3, NOW + timedelta(days=300), NOW - timedelta(hours=7), V1,
                    repository_id=REPO_ID, rollout=Rollout(V2, 100))


def test_a_store_outage_seen_by_devices_running_the_candidate_is_not_its_failure() -> None:
    outage = "the store did not answer: HTTP 503"
    rs = tuple(report(f"d{i}", REPO_ID, state="failed", current="v2", target=None,
                      error=outage) for i in range(30))
    h = candidate_health("v2", rs)
    assert (h.reporting, h.failed) == (30, 0)
    d = decide_advance(_manifest(), ReportSet(rs), POLICY, NOW, "stable")
    assert d.action == "widen", d.reason


def test_moving_back_to_the_fallback_and_failing_is_not_the_candidates_failure() -> None:
    # A device outside a narrowed share runs the candidate and fails to move to the fallback.
    rs = tuple(report(f"d{i}", REPO_ID, state="failed", current="v2", target="v1",
                      error="disk full") for i in range(30))
    assert candidate_health("v2", rs).failed == 0


def test_failing_the_candidate_still_counts() -> None:
    rs = (report("a", REPO_ID, state="failed", current="v1", target="v2", error="boom"),
          report("b", REPO_ID, state="skipped", current="v1", target="v2", failed=("v2",)),
          report("c", REPO_ID, state="failed", current="v2", target=None, failed=("v2",)),
          report("d", REPO_ID, current="v2", target="v2"))
    h = candidate_health("v2", rs)
    assert (h.reporting, h.failed) == (4, 3)


def test_an_every_past_the_year_9999_waits_instead_of_crashing() -> None:
    rs = tuple(report(f"d{i}", REPO_ID, current="v2", target="v2") for i in range(30))
    long = AdvancePolicy(POLICY.stages, timedelta(days=3_000_000), 200, 20)
    d = decide_advance(_manifest(), ReportSet(rs), long, NOW, "stable")
    assert d.action == "wait" and "9999" in d.reason, d.reason
    assert "\n" not in d.reason
