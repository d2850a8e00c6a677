"""Device reports: after every cycle the agent says what it did (docs/FORMAT.md §15).

A report (:class:`manifest.report.DeviceReport`: state, live and target version, last error,
failed versions, bytes of the last update, when the cycle ran, the agent's version) goes to
the store as ``reports/<device-id>.json`` (``report = "store"``: the device needs write access
to that one key, README "Running a fleet") and/or by POST to ``report_url`` (JSON body,
``Content-Type: application/json``). Off by default.

A report never blocks or fails an update: it is sent after the cycle's outcome is recorded,
all its writes together within ``report_deadline`` seconds (one try each), and a failure is
logged, never raised. The newest report not delivered is kept in the agent state
(``report_pending``) and delivered with the next cycle's (a report URL gets the kept one
first, then the new one; the store only the new one, which replaces it). A POST follows a
redirect only to the same scheme, host and port, and only a 307 or 308 (which keep the method
and body): a report never goes to another host than the one configured.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urljoin, urlsplit

from manifest.constants import report_key
from manifest.errors import DeltashipError, TransportError
from manifest.report import DeviceReport
from manifest.storage.source import Source

from .config import AgentConfig
from .state import AgentState

__all__ = ["MAX_REDIRECTS", "CycleOutcome", "Reporter", "agent_version", "post_report"]

log = logging.getLogger("deltaship.agent")

MAX_REDIRECTS = 3
_KEEP_METHOD = (307, 308)  # the redirects that keep a POST a POST (with its body)


def agent_version() -> str:
    """The installed ``deltaship`` package's version (``unknown`` outside an install)."""
    import importlib.metadata  # only when a report is made

    try:
        return importlib.metadata.version("deltaship")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class CycleOutcome:
    """What one cycle did, as a report tells it."""

    state: str  # "ok", "failed", "pinned" or "skipped" (manifest.report.STATES)
    current: str | None  # the version live on the device after the cycle
    target: str | None  # the version the store asked this device to run (None: not known)
    error: str | None
    started: datetime
    finished: datetime


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        port = None
    return parts.scheme, parts.hostname, port


async def post_report(url: str, data: bytes, deadline: float) -> None:
    """POST ``data`` (JSON) to ``url``; a 2xx answer is delivery. Redirects: 307/308 to the
    same origin only, at most :data:`MAX_REDIRECTS`. Failures are ``TransportError``."""
    import aiohttp  # only when a report is posted: importing it costs more than a cycle

    timeout = aiohttp.ClientTimeout(total=deadline)
    headers = {"Content-Type": "application/json"}
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for _ in range(MAX_REDIRECTS + 1):
                async with session.post(url, data=data, headers=headers,
                                        allow_redirects=False) as resp:
                    if 200 <= resp.status < 300:
                        return
                    location = resp.headers.get("Location")
                    if resp.status not in _KEEP_METHOD or not location:
                        raise TransportError(f"POST {url} answered HTTP {resp.status}")
                    target = urljoin(url, location)
                    if _origin(target) != _origin(url):
                        raise TransportError(f"POST {url} was redirected to another host or "
                                             f"port ({target[:200]}): not followed")
                    url = target
            raise TransportError(f"POST {url} was redirected more than {MAX_REDIRECTS} times")
    except (aiohttp.ClientError, ValueError) as e:
        raise TransportError(f"POST {url} failed: {' '.join(str(e).split()) or e!r}") from e


class Reporter:
    """Builds a cycle's report and delivers it (with the one kept from before)."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg

    @property
    def enabled(self) -> bool:
        """Configured, and the device has an id (a configuration from before device ids were
        checked may have none: its reports would have no key)."""
        wanted = self.cfg.report == "store" or self.cfg.report_url is not None
        return wanted and bool(self.cfg.device_id)

    def build(self, repository_id: str, state: AgentState, outcome: CycleOutcome
              ) -> DeviceReport:
        return DeviceReport.bounded(
            device_id=self.cfg.device_id, repository_id=repository_id,
            channel=self.cfg.channel, state=outcome.state, current=outcome.current,
            target=outcome.target, last_error=outcome.error,
            failed_versions=state.failed_versions,
            last_update_bytes=state.bytes_last_update, started_at=outcome.started,
            finished_at=outcome.finished, agent_version=agent_version())

    async def deliver(self, source: Source, report: DeviceReport,
                      pending: dict[str, object] | None) -> dict[str, object] | None:
        """Send ``report`` (and, to a report URL, the ``pending`` one first) within the
        deadline; returns what to keep pending (None: all delivered). Never raises."""
        data = report.to_bytes()
        try:
            async with asyncio.timeout(self.cfg.report_deadline):
                await self._send(source, data, pending)
        except TimeoutError:
            log.warning("device report not sent within its %g s deadline: kept for the next "
                        "cycle", self.cfg.report_deadline)
        except DeltashipError as e:
            log.warning("device report not sent (kept for the next cycle): %s", e)
        except Exception as e:  # a report must never fail an update
            log.warning("device report not sent (kept for the next cycle): %r", e)
        else:
            return None
        kept: dict[str, object] = json.loads(data)
        return kept

    async def _send(self, source: Source, data: bytes, pending: dict[str, object] | None
                    ) -> None:
        cfg = self.cfg
        if cfg.report == "store":
            await source.put_small(report_key(cfg.device_id), data, cfg.report_deadline)
        if cfg.report_url is not None:
            old = _kept(pending)
            if old is not None and old != data:
                await post_report(cfg.report_url, old, cfg.report_deadline)
            await post_report(cfg.report_url, data, cfg.report_deadline)


def _kept(pending: dict[str, object] | None) -> bytes | None:
    """The kept report's bytes, re-checked (None: none, or not a report any more)."""
    if pending is None:
        return None
    try:
        return DeviceReport.from_bytes(json.dumps(pending).encode(), "kept report").to_bytes()
    except (DeltashipError, ValueError) as e:
        log.warning("dropping the kept device report: %s", e)
        return None
