"""Staged rollouts (pure): which devices take a candidate release, decided on each device.

A manifest may carry a ``rollout`` (docs/FORMAT.md §5.1): a candidate release, a share of the
fleet in basis points (optionally a linear ramp over time) and a state. A device is in the
rollout when ``bucket(repository id, candidate version, device id)`` is below the share: the
same device always answers the same for one candidate, a different random-looking tenth of the
fleet goes first for each release, and no server decides. Devices outside run the manifest's
``current`` (the fallback).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ._fields import FieldReader, format_time, parse_time
from .entries import ReleasePointer
from .errors import FormatError

__all__ = ["BASIS_POINTS", "STATES", "Ramp", "Rollout", "Target", "bucket", "target_for"]

BASIS_POINTS = 10_000  # 100 %
STATES = ("active", "halted", "revoked")


def bucket(repository_id: str, version: str, device_id: str) -> int:
    """A device's place in a candidate's rollout: 0 .. 9999.

    The first 8 bytes of SHA-256(``repository_id`` "\\n" ``version`` "\\n" ``device_id``, UTF-8)
    as a big-endian integer, modulo 10000.
    """
    h = hashlib.sha256(f"{repository_id}\n{version}\n{device_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") % BASIS_POINTS


def _bp(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= BASIS_POINTS:
        raise FormatError(f"{where} must be basis points between 0 and {BASIS_POINTS}")
    return v


@dataclass(frozen=True)
class Ramp:
    """A linear widening from ``start_bp`` at ``start`` to ``end_bp`` at ``end``."""

    start: datetime
    end: datetime
    start_bp: int
    end_bp: int

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Ramp:
        r = FieldReader(d, where)
        ramp = cls(parse_time(r.get("start", str), f"{where}.start"),
                   parse_time(r.get("end", str), f"{where}.end"),
                   _bp(r.get("start_basis_points", int), f"{where}.start_basis_points"),
                   _bp(r.get("end_basis_points", int), f"{where}.end_basis_points"))
        if ramp.end <= ramp.start:
            raise FormatError(f"{where}: end must be after start")
        return ramp

    def to_dict(self) -> dict[str, Any]:
        return {"start": format_time(self.start), "end": format_time(self.end),
                "start_basis_points": self.start_bp, "end_basis_points": self.end_bp}

    def at(self, now: datetime) -> int:
        if now <= self.start:
            return self.start_bp
        if now >= self.end:
            return self.end_bp
        span = (self.end - self.start).total_seconds()
        done = (now - self.start).total_seconds()
        return self.start_bp + int((self.end_bp - self.start_bp) * done / span)


@dataclass(frozen=True)
class Rollout:
    """``manifest.rollout``: the candidate, its share and its state."""

    candidate: ReleasePointer
    basis_points: int
    state: str = "active"  # "active", "halted" or "revoked"
    ramp: Ramp | None = None
    unrecognized: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest.rollout") -> Rollout:
        r = FieldReader(d, where)
        candidate = ReleasePointer.from_dict(r.get("candidate", dict), f"{where}.candidate")
        bp = _bp(r.get("basis_points", int), f"{where}.basis_points")
        state = r.get("state", str)
        if state not in STATES:
            raise FormatError(f"{where}.state {state!r} is not one of {', '.join(STATES)}")
        ramp_d = r.take("ramp", dict, None)
        ramp = Ramp.from_dict(ramp_d, f"{where}.ramp") if ramp_d is not None else None
        return cls(candidate, bp, state, ramp, r.rest())

    def to_dict(self) -> dict[str, Any]:
        return {**self.unrecognized, "candidate": self.candidate.to_dict(),
                "basis_points": self.basis_points, "state": self.state,
                "ramp": self.ramp.to_dict() if self.ramp else None}

    def share(self, now: datetime) -> int:
        """Basis points in the rollout at ``now`` (the ramp's, when there is one)."""
        return self.ramp.at(now) if self.ramp is not None else self.basis_points


@dataclass(frozen=True)
class Target:
    """What one device should run: ``pointer``, and why (for status and reports)."""

    pointer: ReleasePointer
    reason: str  # "current", "candidate", "outside-rollout", "halted", "revoked"
    revoked: str | None = None  # a revoked candidate to record as failed


def target_for(current: ReleasePointer, rollout: Rollout | None, *, repository_id: str,
               device_id: str, running: str | None, now: datetime) -> Target:
    """The release a device runs (docs/FORMAT.md §5.1).

    No rollout: ``current``. Active: the candidate when the device's bucket is below the
    share, else ``current``. Halted: the candidate only for a device already running it.
    Revoked: ``current``, and the candidate is to be recorded as failed.
    """
    if rollout is None:
        return Target(current, "current")
    cand = rollout.candidate
    if rollout.state == "revoked":
        return Target(current, "revoked", revoked=cand.version)
    if rollout.state == "halted":
        if running == cand.version:
            return Target(cand, "halted")
        return Target(current, "halted")
    if bucket(repository_id, cand.version, device_id) < rollout.share(now):
        return Target(cand, "candidate")
    return Target(current, "outside-rollout")
