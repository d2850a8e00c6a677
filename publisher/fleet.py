"""Fleet operations, pure: rollout changes, what device reports say, and when to widen or halt.

No I/O here (:mod:`publisher.fleet_admin` reads the store and writes the manifests): manifests,
reports and "now" in, values out, so every decision is testable without a store or a clock.

::

    flag text              --parse_percent/_duration/_stages-->  basis points, timedelta
    Manifest, RolloutChange --apply_change-->   (current, rollout) of the next manifest
    Manifest, ReportSet    --fleet_status-->    FleetStatus  (devices per version and state,
                                                              failures, stale, stage)
    Manifest, ReportSet    --decide_advance-->  Decision     (halt, revoke, widen, complete,
                                                              wait, none: one line why)
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from itertools import pairwise
from typing import Any

from manifest.errors import AlreadyExistsError, LocalError, NotFoundError
from manifest.metadata import Manifest, ReleasePointer, Rollout, format_time
from manifest.report import DeviceReport
from manifest.rollout import BASIS_POINTS, Ramp, target_for

__all__ = [
    "AdvancePolicy",
    "CandidateHealth",
    "Decision",
    "FleetStatus",
    "ReportSet",
    "RolloutChange",
    "RolloutStage",
    "VersionFailures",
    "apply_change",
    "candidate_health",
    "decide_advance",
    "fleet_status",
    "parse_duration",
    "parse_percent",
    "parse_stages",
    "percent_text",
]

# -- flag values ------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_percent(text: str, what: str) -> int:
    """``5``, ``0.5`` or ``12.25%`` -> basis points (500, 50, 1225); 0..100, at most two
    decimals (a basis point is the finest share a manifest can say)."""
    raw = text.strip().removesuffix("%").strip()
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise LocalError(f"{what} {text!r} is not a percentage (e.g. 5, 0.5 or 12.25%)") from None
    if not value.is_finite() or not 0 <= value <= 100:
        raise LocalError(f"{what} {text!r} is out of range: a percentage from 0 to 100")
    bp = value * 100
    if bp != bp.to_integral_value():
        raise LocalError(f"{what} {text!r} is finer than a basis point (0.01 %): use at most "
                         "two decimals")
    return int(bp)


def percent_text(bp: int) -> str:
    """Basis points as a percentage for people: 500 -> ``5%``, 50 -> ``0.5%``."""
    text = f"{Decimal(bp) / 100:.2f}"
    return text.rstrip("0").rstrip(".") + "%"


def parse_duration(text: str, what: str) -> timedelta:
    """``90s``, ``30m``, ``6h``, ``2d``, ``1w`` or a sum like ``1h30m``; more than zero."""
    s = text.strip().lower()
    parts = _DURATION.findall(s)
    if not parts or "".join(n + u for n, u in parts) != s:
        raise LocalError(f"{what} {text!r} is not a duration (e.g. 90s, 30m, 6h, 2d, 1h30m)")
    seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise LocalError(f"{what} {text!r} must be longer than zero")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise LocalError(f"{what} {text!r} is too long") from None


def parse_stages(text: str) -> tuple[int, ...]:
    """``1,5,25,100`` -> basis points, each above the one before, each above 0."""
    stages = tuple(parse_percent(p, "--stages") for p in text.split(",") if p.strip())
    if not stages or any(s <= 0 for s in stages) \
            or any(b <= a for a, b in pairwise(stages)):
        raise LocalError(f"--stages {text!r} must be increasing percentages above 0, e.g. "
                         "1,5,25,100")
    return stages


# -- changes to a rollout ---------------------------------------------------------------------

OPS = ("percent", "ramp", "halt", "complete", "revoke")


@dataclass(frozen=True)
class RolloutChange:
    """One ``rollout`` command: ``op`` is one of :data:`OPS`; ``basis_points`` for
    ``percent``; ``ramp`` (duration), ``start_bp`` (None: the share now) and ``end_bp`` for
    ``ramp``."""

    op: str
    basis_points: int = 0
    ramp: timedelta | None = None
    start_bp: int | None = None
    end_bp: int = BASIS_POINTS


def apply_change(manifest: Manifest, change: RolloutChange, now: datetime, where: str
                 ) -> tuple[ReleasePointer, Rollout | None]:
    """``current`` and ``rollout`` of the manifest that makes ``change`` (``where`` names the
    channel and store in messages)."""
    r = manifest.rollout
    if r is None:
        raise NotFoundError(
            f"{where} has no rollout in progress ({manifest.current.version} is current for "
            f"every device): start one with `deltaship-publish release --rollout PERCENT` or "
            "`deltaship-publish promote --rollout PERCENT`")
    cand = r.candidate.version
    if r.state == "revoked":
        raise LocalError(f"the rollout of {cand} in {where} was revoked (devices recorded it "
                         "as failed and will not take it again): release a new version")
    if change.op == "complete":
        return r.candidate, None
    if change.op == "revoke":
        return manifest.current, replace(r, state="revoked", basis_points=r.share(now),
                                          ramp=None)
    if change.op == "halt":
        if r.state == "halted":
            raise AlreadyExistsError(f"the rollout of {cand} in {where} is already halted")
        return manifest.current, replace(r, state="halted", basis_points=r.share(now),
                                          ramp=None)
    if change.op == "percent":
        return manifest.current, replace(r, state="active", basis_points=change.basis_points,
                                          ramp=None)
    if change.op == "ramp":
        assert change.ramp is not None
        start_bp = r.share(now) if change.start_bp is None else change.start_bp
        if change.end_bp <= start_bp:
            raise LocalError(f"a ramp must widen: --to {percent_text(change.end_bp)} is not "
                             f"above --from {percent_text(start_bp)}")
        try:
            ramp = Ramp(now, now + change.ramp, start_bp, change.end_bp)
        except OverflowError:
            raise LocalError("that ramp ends after the year 9999: choose a shorter one") from None
        return manifest.current, replace(r, state="active", basis_points=start_bp, ramp=ramp)
    raise ValueError(change.op)


# -- reports ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportSet:
    """The device reports of one channel of one repository, and what else ``reports/`` held:
    ``malformed`` (key, why) for every report that could not be used (never fatal),
    ``other_channels`` the count of well-formed reports of other channels."""

    reports: tuple[DeviceReport, ...]
    malformed: tuple[tuple[str, str], ...] = ()
    other_channels: int = 0


@dataclass(frozen=True)
class CandidateHealth:
    """Of the devices that reported for ``candidate`` (its target, running it, or listing it
    as failed), how many failed it (state ``failed`` with the candidate their target, or it is
    among their failed versions). A device running the candidate whose cycle failed before it
    learnt its target (``target`` null: the store unreachable, the manifest expired) or while
    it moved to another target did not fail the candidate: a store outage must not halt it."""

    candidate: str
    reporting: int
    failed: int

    def over(self, max_bp: int) -> bool:
        return self.failed * BASIS_POINTS > max_bp * self.reporting

    @property
    def rate_text(self) -> str:
        if not self.reporting:
            return "no reports"
        return f"{self.failed}/{self.reporting} failed ({100 * self.failed / self.reporting:.1f}%)"


def candidate_health(candidate: str, reports: tuple[DeviceReport, ...]) -> CandidateHealth:
    mine = [r for r in reports
            if candidate in (r.target, r.current) or candidate in r.failed_versions]
    failed = sum(1 for r in mine if (r.state == "failed" and r.target == candidate)
                 or candidate in r.failed_versions)
    return CandidateHealth(candidate, len(mine), failed)


@dataclass(frozen=True)
class VersionFailures:
    version: str
    devices: int
    errors: tuple[tuple[str, int], ...]  # the most common error lines, with their counts


@dataclass(frozen=True)
class RolloutStage:
    candidate: str
    fallback: str
    state: str
    share_bp: int  # now
    ramp: Ramp | None
    covered: int  # reporting devices whose target is the candidate (bucket, state)
    health: CandidateHealth

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "fallback": self.fallback, "state": self.state,
                "share_basis_points": self.share_bp, "share": percent_text(self.share_bp),
                "ramp": self.ramp.to_dict() if self.ramp else None,
                "covered_devices": self.covered, "reporting_for_candidate":
                self.health.reporting, "failed": self.health.failed}


@dataclass(frozen=True)
class FleetStatus:
    channel: str
    current: str | None  # the channel's current (fallback) version
    sequence: int
    devices: int  # well-formed reports of this channel
    by_version: dict[str, dict[str, int]]  # running version ("none") -> state -> devices
    failures: tuple[VersionFailures, ...]
    stale: tuple[str, ...]  # device ids not seen for longer than ``stale_after``
    stale_after: timedelta
    rollout: RolloutStage | None
    malformed: tuple[tuple[str, str], ...] = ()
    other_channels: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "channel": self.channel, "current": self.current, "sequence": self.sequence,
            "devices": self.devices, "by_version": self.by_version,
            "failures": [{"version": f.version, "devices": f.devices,
                          "errors": [{"error": e, "devices": n} for e, n in f.errors]}
                         for f in self.failures],
            "stale": list(self.stale), "stale_after_seconds": int(self.stale_after.total_seconds()),
            "rollout": self.rollout.to_dict() if self.rollout else None,
            "malformed": [{"key": k, "error": why} for k, why in self.malformed],
            "other_channels": self.other_channels,
        }


def _last_seen(r: DeviceReport) -> datetime | None:
    return r.finished_at or r.started_at


def fleet_status(manifest: Manifest | None, reports: ReportSet, repository_id: str,
                 now: datetime, stale_after: timedelta, channel: str, top_errors: int = 3
                 ) -> FleetStatus:
    """What the reports of ``channel`` say (``manifest`` None: the channel has no release)."""
    rs = reports.reports
    by_version: dict[str, Counter[str]] = {}
    for r in rs:
        by_version.setdefault(r.current or "none", Counter())[r.state] += 1
    failing: dict[str, set[str]] = {}
    errors: dict[str, Counter[str]] = {}
    for r in rs:
        versions = set(r.failed_versions)
        if r.state == "failed" and r.target:
            versions.add(r.target)
        for v in versions:
            failing.setdefault(v, set()).add(r.device_id)
        if r.last_error and r.target in versions:
            errors.setdefault(r.target, Counter())[r.last_error.splitlines()[0]] += 1
    failures = tuple(
        VersionFailures(v, len(ids), tuple(errors.get(v, Counter()).most_common(top_errors)))
        for v, ids in sorted(failing.items(), key=lambda kv: (-len(kv[1]), kv[0])))
    stale = tuple(sorted(r.device_id for r in rs
                         if (seen := _last_seen(r)) is None or now - seen > stale_after))
    stage = None
    if manifest is not None and manifest.rollout is not None:
        ro = manifest.rollout
        covered = sum(1 for r in rs if target_for(
            manifest.current, ro, repository_id=repository_id, device_id=r.device_id,
            running=r.current, now=now).pointer == ro.candidate)
        stage = RolloutStage(ro.candidate.version, manifest.current.version, ro.state,
                             ro.share(now), ro.ramp, covered,
                             candidate_health(ro.candidate.version, rs))
    return FleetStatus(
        channel, manifest.current.version if manifest else None,
        manifest.sequence if manifest else 0, len(rs),
        {v: dict(sorted(c.items())) for v, c in sorted(by_version.items())}, failures, stale,
        stale_after, stage, reports.malformed, reports.other_channels)


# -- automatic advance ------------------------------------------------------------------------


@dataclass(frozen=True)
class AdvancePolicy:
    stages: tuple[int, ...]  # basis points, increasing
    every: timedelta  # at least this long at a stage (since the manifest's published_at)
    max_failure_bp: int  # halt above this failure rate (basis points)
    min_devices: int  # devices that must have reported for the candidate to judge it
    revoke_on_failure: bool = False


ACTIONS = ("halt", "revoke", "widen", "complete", "wait", "none")


@dataclass(frozen=True)
class Decision:
    """What ``rollout --advance`` does: ``action`` one of :data:`ACTIONS`; ``reason`` one line
    for people; ``new_bp`` the share after ``widen``."""

    action: str
    reason: str
    candidate: str | None = None
    share_bp: int | None = None
    new_bp: int | None = None
    health: CandidateHealth | None = None
    next_check: datetime | None = None

    @property
    def changes(self) -> bool:
        return self.action in ("halt", "revoke", "widen", "complete")

    def change(self) -> RolloutChange:
        if self.action == "widen":
            assert self.new_bp is not None
            return RolloutChange("percent", self.new_bp)
        return RolloutChange(self.action)

    def to_dict(self) -> dict[str, Any]:
        h = self.health
        return {"decision": self.action, "reason": self.reason, "candidate": self.candidate,
                "share_basis_points": self.share_bp, "new_basis_points": self.new_bp,
                "reporting": h.reporting if h else None, "failed": h.failed if h else None,
                "not_before": format_time(self.next_check) if self.next_check else None}


def decide_advance(manifest: Manifest | None, reports: ReportSet, policy: AdvancePolicy,
                   now: datetime, where: str) -> Decision:
    """Halt (or revoke) a candidate whose reported failure rate is over the threshold with at
    least ``min_devices`` reporting; else widen to the next stage (the last one, or 100 %:
    complete) once ``every`` has passed since the manifest was published and enough devices
    reported; else nothing, and why."""
    if manifest is None:
        return Decision("none", f"{where} has no release yet: nothing to advance")
    r = manifest.rollout
    if r is None:
        return Decision("none", f"no rollout in progress in {where} "
                        f"({manifest.current.version} is current for every device)")
    cand, share = r.candidate.version, r.share(now)
    if r.state != "active":
        return Decision("none", f"the rollout of {cand} is {r.state}: nothing to advance"
                        + (" (resume with `rollout --percent P`)" if r.state == "halted" else ""),
                        cand, share)
    health = candidate_health(cand, reports.reports)
    if health.reporting >= policy.min_devices and health.over(policy.max_failure_bp):
        action = "revoke" if policy.revoke_on_failure else "halt"
        return Decision(action, f"{cand}: {health.rate_text}, over the "
                        f"{percent_text(policy.max_failure_bp)} limit",
                        cand, share, health=health)
    try:
        due = manifest.published_at + policy.every
    except OverflowError:  # an --every that ends after the year 9999: never due
        due = datetime.max.replace(tzinfo=manifest.published_at.tzinfo)
    if now < due:
        return Decision("wait", f"{cand} at {percent_text(share)} ({health.rate_text}): next "
                        f"stage not before {format_time(due)}", cand, share, health=health,
                        next_check=due)
    if health.reporting < policy.min_devices:
        return Decision("wait", f"{cand} at {percent_text(share)}: {health.reporting} of the "
                        f"{policy.min_devices} devices needed have reported for it",
                        cand, share, health=health)
    if r.ramp is not None and share < r.ramp.end_bp:
        return Decision("wait", f"{cand} is ramping to {percent_text(r.ramp.end_bp)} (now "
                        f"{percent_text(share)}, {health.rate_text}): the ramp widens it",
                        cand, share, health=health)
    nxt = next((s for s in policy.stages if s > share), None)
    if nxt is None and share < BASIS_POINTS:
        return Decision("none", f"{cand} is at {percent_text(share)}, the last of --stages "
                        f"({health.rate_text}): complete it with `rollout --complete`",
                        cand, share, health=health)
    if nxt is None or nxt >= BASIS_POINTS:
        return Decision("complete", f"{cand} at {percent_text(share)} ({health.rate_text}) "
                        "becomes current for every device", cand, share,
                        BASIS_POINTS, health)
    return Decision("widen", f"{cand}: {health.rate_text}; {percent_text(share)} -> "
                    f"{percent_text(nxt)} of devices", cand, share, nxt, health)
