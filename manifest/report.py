"""Device reports (``reports/<device-id>.json``, docs/FORMAT.md §15): what a device last did.

Unsigned and advisory: a device writes its own (to the store with write credentials scoped to
its key, or by POST to a report URL), and ``deltaship-publish fleet status`` and ``rollout
--advance`` count them. Nothing a device installs depends on a report. Bounded: at most
``MAX_REPORT_SIZE`` bytes, an error line of at most ``MAX_ERROR_CHARS`` characters, at most
``MAX_FAILED`` failed versions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ._fields import (
    SPEC_VERSION,
    FieldReader,
    check_channel,
    check_device_id,
    check_header,
    check_repository_id,
    check_version,
    format_time,
    parse_time,
)
from .canonical import canonical_json, loads_object
from .errors import FormatError, OversizeError

__all__ = ["MAX_ERROR_CHARS", "MAX_FAILED", "MAX_REPORT_SIZE", "STATES", "DeviceReport"]

MAX_REPORT_SIZE = 16 * 1024
MAX_ERROR_CHARS = 1000
MAX_FAILED = 32
# "ok": up to date or updated; "failed": the last cycle failed (last_error says why);
# "pinned": an operator pinned it; "skipped": the target failed before and is not retried.
STATES = ("ok", "failed", "pinned", "skipped")


def _opt_version(r: FieldReader, key: str) -> str | None:
    v = r.take(key, str, None)
    return check_version(v, f"report.{key}") if v is not None else None


def _opt_time(r: FieldReader, key: str) -> datetime | None:
    v = r.take(key, str, None)
    return parse_time(v, f"report.{key}") if v is not None else None


@dataclass(frozen=True)
class DeviceReport:
    TYPE = "deltaship.device-report"

    device_id: str
    repository_id: str
    channel: str
    state: str
    current: str | None  # the version live on the device
    target: str | None  # the version the device was asked to run (candidate or current)
    last_error: str | None
    failed_versions: tuple[str, ...]
    last_update_bytes: int
    started_at: datetime | None  # of the last cycle
    finished_at: datetime | None
    agent_version: str
    unrecognized: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise FormatError(f"report.state {self.state!r} is not one of {', '.join(STATES)}")

    @classmethod
    def bounded(cls, **kw: Any) -> DeviceReport:
        """A report with its error line and failed versions cut to their bounds."""
        err = kw.get("last_error")
        if err is not None and len(err) > MAX_ERROR_CHARS:
            kw["last_error"] = err[: MAX_ERROR_CHARS - 3] + "..."
        kw["failed_versions"] = tuple(kw.get("failed_versions", ()))[-MAX_FAILED:]
        return cls(**kw)

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "report") -> DeviceReport:
        if len(data) > MAX_REPORT_SIZE:
            raise OversizeError(f"{where} is {len(data)} bytes, over its {MAX_REPORT_SIZE} cap")
        r = FieldReader(loads_object(data, where), where)
        check_header(r, cls.TYPE)
        failed = r.strings("failed_versions")
        if len(failed) > MAX_FAILED:
            raise FormatError(f"{where} lists more than {MAX_FAILED} failed versions")
        err = r.take("last_error", str, None)
        if err is not None and len(err) > MAX_ERROR_CHARS:
            raise FormatError(f"{where}.last_error is longer than {MAX_ERROR_CHARS} characters")
        return cls(
            check_device_id(r.get("device_id", str), f"{where}.device_id"),
            check_repository_id(r.get("repository_id", str), f"{where}.repository_id"),
            check_channel(r.get("channel", str), f"{where}.channel"),
            r.get("state", str),
            _opt_version(r, "current"),
            _opt_version(r, "target"),
            err,
            tuple(check_version(v, f"{where}.failed_versions") for v in failed),
            r.count("last_update_bytes"),
            _opt_time(r, "started_at"),
            _opt_time(r, "finished_at"),
            r.get("agent_version", str)[:64],
            r.rest(),
        )

    def to_bytes(self) -> bytes:
        data = canonical_json({
            **self.unrecognized,
            "_type": self.TYPE,
            "spec_version": SPEC_VERSION,
            "device_id": self.device_id,
            "repository_id": self.repository_id,
            "channel": self.channel,
            "state": self.state,
            "current": self.current,
            "target": self.target,
            "last_error": self.last_error,
            "failed_versions": list(self.failed_versions),
            "last_update_bytes": self.last_update_bytes,
            "started_at": format_time(self.started_at) if self.started_at else None,
            "finished_at": format_time(self.finished_at) if self.finished_at else None,
            "agent_version": self.agent_version,
        })
        if len(data) > MAX_REPORT_SIZE:
            raise OversizeError(f"report is {len(data)} bytes, over its {MAX_REPORT_SIZE} cap")
        return data
