"""The agent's durable state as typed records: JSON bytes in, JSON bytes out, no I/O.

It holds what must survive a restart or a power cut: the two floors of replay protection (the
highest content sequence and the highest timestamp sequence ever verified) and the keys that
set them (fast-forward recovery, :meth:`AgentState.follow_root`), the manifest's ETag, whether
an operator pinned the device, the versions that failed and must not be retried, the plan in
progress, a switch whose verdict is pending, the last update and the history of switches.
Where it lives is :class:`edge_agent.layout.DeviceLayout`'s business; the update loop loads it
once per cycle and saves it at named commit points (:meth:`edge_agent.updater.Agent.commit`).

The file is one JSON object whose shape does not change between versions of the agent: every
record reads what older agents wrote (a missing field takes its default) and keeps the fields
it does not know in ``unrecognized``, written back as they were. A wrong type is a
:class:`~manifest.errors.LocalError` that names the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from manifest.constants import DEFAULT_CHANNEL
from manifest.download_plan import Plan
from manifest.errors import LocalError
from manifest.metadata import FieldReader, Role, Root

__all__ = [
    "FLOOR_ROLES",
    "HISTORY_KEPT",
    "AgentState",
    "FilePlan",
    "GroupPlan",
    "PendingSwitch",
    "PlanRecord",
    "SwitchEvent",
    "UpdateRecord",
    "live_stack",
    "rollback_target",
]

HISTORY_KEPT = 50  # switch events a saved state keeps (the newest)
ROLLBACK = "rollback"  # the reason of an operator's switch
HEALTH_FAILED = "health check failed"  # the reason of a switch back after a failed check
FLOOR_ROLES = ("release", "timestamp")  # the roles whose signatures set the floors


class _Malformed(ValueError):
    pass


def _reader(d: object, where: str) -> FieldReader:
    """A field reader whose faults are local: a broken ``state.json`` is the device's."""
    return FieldReader(d, where, error=_Malformed)


@dataclass(frozen=True)
class GroupPlan:
    kind: str  # "have", "patch" or "full"
    bytes: int
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, d: object, where: str) -> GroupPlan:
        r = _reader(d, where)
        return cls(r.take("kind", str), r.take("bytes", int, 0), r.rest())

    def to_dict(self) -> dict[str, Any]:
        return {**self.unrecognized, "kind": self.kind, "bytes": self.bytes}


@dataclass(frozen=True)
class FilePlan:
    bytes: int
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, d: object, where: str) -> FilePlan:
        r = _reader(d, where)
        return cls(r.take("bytes", int, 0), r.rest())

    def to_dict(self) -> dict[str, Any]:
        return {**self.unrecognized, "bytes": self.bytes}


@dataclass(frozen=True)
class PlanRecord:
    """What the update in progress downloads (``status`` shows it until the switch)."""

    version: str
    download_bytes: int
    full_bytes: int
    groups: Mapping[str, GroupPlan] = field(default_factory=dict)
    files: Mapping[str, FilePlan] = field(default_factory=dict)
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)
    done_bytes: int = 0  # downloaded so far (saved every few seconds while it runs)

    @classmethod
    def of(cls, plan: Plan) -> PlanRecord:
        return cls(
            plan.version, plan.download_bytes, plan.full_bytes,
            {s.group.name: GroupPlan(s.kind, s.download) for s in plan.groups},
            {s.file.path: FilePlan(s.download) for s in plan.files},
        )

    @property
    def groups_changed(self) -> int:
        return sum(1 for g in self.groups.values() if g.kind != "have")

    @classmethod
    def from_dict(cls, d: object, where: str) -> PlanRecord:
        r = _reader(d, where)
        groups, files = r.take("groups", dict, {}), r.take("files", dict, {})
        return cls(
            r.take("version", str), r.take("download_bytes", int, 0), r.take("full_bytes", int, 0),
            {k: GroupPlan.from_dict(v, f"{where}.groups.{k}") for k, v in groups.items()},
            {k: FilePlan.from_dict(v, f"{where}.files.{k}") for k, v in files.items()},
            done_bytes=r.take("done_bytes", int, 0),
            unrecognized=r.rest(),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.unrecognized,
            "version": self.version,
            "download_bytes": self.download_bytes,
            "full_bytes": self.full_bytes,
            "groups": {k: g.to_dict() for k, g in self.groups.items()},
            "files": {k: f.to_dict() for k, f in self.files.items()},
            # only once bytes arrived: a state an older agent wrote is written back unchanged
            **({"done_bytes": self.done_bytes} if self.done_bytes else {}),
        }


@dataclass(frozen=True)
class UpdateRecord:
    """The last update that went live, and what it downloaded."""

    version: str
    from_: str | None
    at: str
    downloaded_bytes: int = 0
    planned_bytes: int = 0
    full_bytes: int = 0
    groups_changed: int = 0
    groups: int = 0
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, d: object, where: str) -> UpdateRecord:
        r = _reader(d, where)
        return cls(
            r.take("version", str), r.take("from", str, None), r.take("at", str, ""),
            downloaded_bytes=r.take("downloaded_bytes", int, 0),
            planned_bytes=r.take("planned_bytes", int, 0),
            full_bytes=r.take("full_bytes", int, 0),
            groups_changed=r.take("groups_changed", int, 0),
            groups=r.take("groups", int, 0),
            unrecognized=r.rest(),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.unrecognized,
            "version": self.version, "from": self.from_, "at": self.at,
            "downloaded_bytes": self.downloaded_bytes, "planned_bytes": self.planned_bytes,
            "full_bytes": self.full_bytes, "groups_changed": self.groups_changed,
            "groups": self.groups,
        }


@dataclass(frozen=True)
class PendingSwitch:
    """A switch whose hooks and health check have not given their verdict yet.

    Saved before ``current`` moves; a restart finishes the check (or switches back) first.
    ``failed``: the check failed and the switch back was under way.
    """

    from_: str | None
    to: str
    failed: str | None = None
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, d: object, where: str) -> PendingSwitch:
        r = _reader(d, where)
        return cls(r.take("from", str, None), r.take("to", str), r.take("failed", str, None),
                   r.rest())

    def to_dict(self) -> dict[str, Any]:
        failed = {} if self.failed is None else {"failed": self.failed}
        return {**self.unrecognized, "from": self.from_, "to": self.to, **failed}


@dataclass(frozen=True)
class SwitchEvent:
    """One entry of the history: ``current`` moved from ``from_`` to ``to``."""

    at: str
    event: str  # "switch"
    from_: str | None
    to: str | None
    reason: str | None = None  # None (an update), ROLLBACK or HEALTH_FAILED
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def switch(cls, at: str, from_: str | None, to: str, reason: str | None = None) -> SwitchEvent:
        return cls(at, "switch", from_, to, reason)

    @classmethod
    def from_dict(cls, d: object, where: str) -> SwitchEvent:
        r = _reader(d, where)
        return cls(r.take("at", str, ""), r.take("event", str), r.take("from", str, None),
                   r.take("to", str, None), r.take("reason", str, None), r.rest())

    def to_dict(self) -> dict[str, Any]:
        reason = {} if self.reason is None else {"reason": self.reason}
        return {**self.unrecognized, "at": self.at, "event": self.event, "from": self.from_,
                "to": self.to, **reason}


def _role_dict(role: Role) -> dict[str, Any]:
    # The set of key ids (a root may list one twice; the threshold counts distinct ones).
    return {"keyids": sorted(set(role.keyids)), "threshold": role.threshold}


@dataclass
class AgentState:
    device_id: str = ""
    highest_sequence: int = 0  # content floor: the release-signed manifest's sequence
    highest_timestamp: int = 0  # freshness floor: the timestamp's sequence
    # The release and timestamp keys (sorted key ids, threshold) the floors were set under;
    # empty until the first cycle of an agent that knows them.
    floor_keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    manifest_etag: str | None = None
    pinned: str | None = None  # version an operator rolled back to, until `resume`
    failed_versions: list[str] = field(default_factory=list)
    last_check: str | None = None
    last_result: str | None = None
    last_error: str | None = None
    bytes_last_update: int = 0
    bytes_total: int = 0
    plan: PlanRecord | None = None
    last_update: UpdateRecord | None = None
    pending_switch: PendingSwitch | None = None
    history: list[SwitchEvent] = field(default_factory=list)
    # The channel the floors and the manifest copy belong to (a state from before channels:
    # stable), and the last device report that could not be sent (edge_agent/report.py).
    channel: str = DEFAULT_CHANNEL
    report_pending: dict[str, Any] | None = None
    unrecognized: dict[str, Any] = field(default_factory=dict, compare=False)

    # -- transitions -----------------------------------------------------------------------

    def follow_root(self, root: Root) -> tuple[str, ...]:
        """Fast-forward recovery (TUF §5.3.11): forget the floors that keys no longer in
        ``root`` set; returns the roles whose keys or threshold changed.

        The ``release`` role's keys changed: both floors go (the content sequence, and the
        timestamp sequence that attested it); only the ``timestamp`` role's: the timestamp
        floor. Either way the ETag goes, so the caller drops its manifest copy. A state that
        recorded no keys yet (a fresh device, or one saved by an older agent) records them.
        """
        new = {r: _role_dict(root.roles[r]) for r in FLOOR_ROLES}
        if not self.floor_keys:
            self.floor_keys = new
            return ()
        changed = tuple(r for r in FLOOR_ROLES
                        if _keys_of(self.floor_keys.get(r)) != _keys_of(new[r]))
        if "release" in changed:
            self.highest_sequence = 0
            self.highest_timestamp = 0
        elif "timestamp" in changed:
            self.highest_timestamp = 0
        if changed:
            self.manifest_etag = None
        self.floor_keys = new
        return changed

    def follow_channel(self, channel: str) -> bool:
        """The device now follows ``channel``: the sequences and ETag of another channel's
        manifest mean nothing for it (each channel has its own, docs/FORMAT.md §5.2). Returns
        whether anything was forgotten (the caller drops its manifest copy)."""
        if channel == self.channel:
            return False
        self.channel = channel
        self.highest_sequence = 0
        self.highest_timestamp = 0
        self.manifest_etag = None
        return True

    def forget_store(self) -> None:
        """Another repository was pinned: nothing verified for the old one counts."""
        self.highest_sequence = 0
        self.highest_timestamp = 0
        self.floor_keys = {}
        self.manifest_etag = None
        self.failed_versions = []

    def mark_failed(self, version: str) -> None:
        if version not in self.failed_versions:
            self.failed_versions.append(version)

    def finish_update(self, target: str, previous: str | None, at: str) -> None:
        """``target`` went live (its check passed): record it and forget the plan."""
        self.history.append(SwitchEvent.switch(at, previous, target))
        plan = self.plan if self.plan is not None and self.plan.version == target else None
        self.last_update = UpdateRecord(
            target, previous, at,
            downloaded_bytes=self.bytes_last_update if plan else 0,
            planned_bytes=plan.download_bytes if plan else 0,
            full_bytes=plan.full_bytes if plan else 0,
            groups_changed=plan.groups_changed if plan else 0,
            groups=len(plan.groups) if plan else 0,
        )
        self.plan = None
        self.pending_switch = None

    # -- JSON ------------------------------------------------------------------------------

    @classmethod
    def from_json(cls, data: bytes, where: str) -> AgentState:
        """Parse a saved state; ``where`` (its path) names it in the error."""
        try:
            r = _reader(json.loads(data), "state")
            plan, last, pending = (r.take(k, dict, None)
                                   for k in ("plan", "last_update", "pending_switch"))
            history = r.take("history", list, [])
            return cls(
                device_id=r.take("device_id", str, ""),
                highest_sequence=r.take("highest_sequence", int, 0),
                highest_timestamp=r.take("highest_timestamp", int, 0),
                floor_keys=_floor_keys(r.take("floor_keys", dict, {})),
                manifest_etag=r.take("manifest_etag", str, None),
                pinned=r.take("pinned", str, None),
                failed_versions=r.strings("failed_versions"),
                last_check=r.take("last_check", str, None),
                last_result=r.take("last_result", str, None),
                last_error=r.take("last_error", str, None),
                bytes_last_update=r.take("bytes_last_update", int, 0),
                bytes_total=r.take("bytes_total", int, 0),
                plan=None if plan is None else PlanRecord.from_dict(plan, "plan"),
                last_update=None if last is None else UpdateRecord.from_dict(last, "last_update"),
                pending_switch=(None if pending is None
                                else PendingSwitch.from_dict(pending, "pending_switch")),
                history=[SwitchEvent.from_dict(h, f"history[{i}]") for i, h in enumerate(history)],
                channel=r.take("channel", str, DEFAULT_CHANNEL),
                report_pending=r.take("report_pending", dict, None),
                unrecognized=r.rest(),
            )
        except ValueError as e:  # bad UTF-8 or JSON, or _Malformed
            raise LocalError(f"agent state {where} is unreadable ({e}): fix or remove it") from e

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.unrecognized,
            "device_id": self.device_id,
            "highest_sequence": self.highest_sequence,
            "highest_timestamp": self.highest_timestamp,
            "floor_keys": self.floor_keys,
            "manifest_etag": self.manifest_etag,
            "pinned": self.pinned,
            "failed_versions": list(self.failed_versions),
            "last_check": self.last_check,
            "last_result": self.last_result,
            "last_error": self.last_error,
            "bytes_last_update": self.bytes_last_update,
            "bytes_total": self.bytes_total,
            "plan": None if self.plan is None else self.plan.to_dict(),
            "last_update": None if self.last_update is None else self.last_update.to_dict(),
            "pending_switch": (None if self.pending_switch is None
                               else self.pending_switch.to_dict()),
            "history": [h.to_dict() for h in self.history[-HISTORY_KEPT:]],
            "channel": self.channel,
            "report_pending": self.report_pending,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode() + b"\n"


def _keys_of(d: Mapping[str, Any] | None) -> tuple[Any, Any]:
    """A role's keys as compared: the set of key ids (listed twice or not) and the threshold."""
    if d is None:
        return (None, None)
    keyids = d.get("keyids")
    return (frozenset(keyids) if isinstance(keyids, list) else keyids, d.get("threshold"))


def _floor_keys(d: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The recorded keys of each floor role: ``{"keyids": [hex, ...], "threshold": n}``."""
    out = {}
    for role, v in d.items():
        r = _reader(v, f"floor_keys.{role}")
        keyids, threshold = sorted(r.strings("keyids")), r.take("threshold", int)
        out[role] = {**r.rest(), "keyids": keyids, "threshold": threshold}
    return out


def live_stack(history: Sequence[SwitchEvent]) -> list[str]:
    """The versions a rollback goes back through, oldest first (pure).

    An update pushes the version it switched to; a rollback, or a switch back after a failed
    health check, pops back to the version it switched to. So repeated rollbacks go further
    back instead of bouncing between the last two versions.
    """
    stack: list[str] = []
    for h in history:
        if h.event != "switch" or h.to is None:
            continue
        if h.reason in (ROLLBACK, HEALTH_FAILED) and h.to in stack:
            del stack[len(stack) - stack[::-1].index(h.to):]
            continue
        if not stack and h.from_ is not None:
            stack.append(h.from_)
        if not stack or stack[-1] != h.to:
            stack.append(h.to)
    return stack


def rollback_target(state: AgentState, current: str | None,
                    retained: Callable[[str], bool]) -> str | None:
    """The version ``deltaship-agent rollback`` goes to by default, or None (pure)."""
    for v in reversed(live_stack(state.history)):
        if v != current and v not in state.failed_versions and retained(v):
            return v
    return None
