"""What an operator asks of a device, as library calls: init, status, rollback, resume, verify.

The command line (:mod:`edge_agent.cli`) maps flags onto :class:`~edge_agent.config.AgentConfig`,
calls these and prints what they return. Every call that changes the device holds the model
directory's lock and the agent state like an update cycle does
(:meth:`edge_agent.updater.Agent.holding_state`), so it never interleaves with one. After a
rollback or a repair the model server is told and checked, like after any switch; the change
stands when the check fails (the result carries the failure, as ``unhealthy``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from manifest.canonical import loads_object
from manifest.constants import DEFAULT_CHANNEL, manifest_key
from manifest.download_plan import check_include
from manifest.errors import (
    DeltashipError,
    HookError,
    LocalError,
    NotFoundError,
    TrustError,
    UntrustedDataError,
)
from manifest.expiry import Expiry, expiries
from manifest.metadata import ReleaseIndex, Root, Timestamp, format_time
from manifest.storage.atomic import write_atomic
from manifest.storage.location import parse_store_url
from manifest.storage.retry import RetryPolicy
from manifest.storage.source import TransferLimits, open_source
from manifest.trust import (
    MAX_MANIFEST_SIZE,
    verify_index,
    verify_manifest,
    verify_root,
)

from .config import AgentConfig, check_config, save_config
from .fleet import rollout_view
from .repair import repair_version
from .state import ROLLBACK, AgentState, SwitchEvent, rollback_target
from .updater import Agent, utcnow

__all__ = ["DEFAULT_WAIT", "Operator", "RollbackResult", "StatusReport", "VerifyResult"]

log = logging.getLogger("deltaship.agent")

# `init` looks at the store once, briefly: an unreachable store is checked by every `run`.
_INIT_PROBE = RetryPolicy(attempts=1)
_INIT_PROBE_TIMEOUT = 5.0


# The saved state's fields `status` shows, in the order it shows them.
_STATUS_FIELDS = ("pinned", "failed_versions", "highest_sequence", "highest_timestamp",
                  "last_check", "last_result", "last_error", "bytes_last_update", "bytes_total",
                  "plan", "last_update")


@dataclass(frozen=True)
class StatusReport:
    device_id: str
    current: str | None  # None: nothing installed (or `current` names no directory)
    retained: list[str]
    state: AgentState  # as last saved (pin, failures, last check, plan in progress, ...)
    store: str
    model_dir: str
    root_version: int | None = None  # the pinned trust root's (None: none or unreadable)
    # The pinned root's, and the last verified manifest's content and freshness expiries.
    expiries: tuple[Expiry, ...] = ()
    channel: str = DEFAULT_CHANNEL
    # The last verified manifest's rollout as this device sees it (edge_agent.fleet), or None.
    rollout: dict[str, Any] | None = None
    report: str = "off"  # where reports go: "off", "store", the URL, or both

    @property
    def warnings(self) -> list[str]:
        """One line (``warning: ...``) per expiry that is near or past."""
        return [f"warning: {e.warning}" for e in self.expiries if e.warning]

    def to_dict(self) -> dict[str, Any]:
        """``status --json``: these keys, in this order."""
        saved = self.state.to_dict()
        return {"device_id": self.device_id, "channel": self.channel, "current": self.current,
                "retained": self.retained, "rollout": self.rollout,
                **{k: saved[k] for k in _STATUS_FIELDS},
                "report": self.report, "report_pending": saved["report_pending"] is not None,
                "root_version": self.root_version,
                "expires": {e.name: e.to_dict() for e in self.expiries},
                "store": self.store, "model_dir": self.model_dir}


@dataclass(frozen=True)
class RollbackResult:
    previous: str | None  # what was live
    version: str  # what is live now, pinned
    unhealthy: HookError | None = None  # the model server failed its check on it


@dataclass(frozen=True)
class VerifyResult:
    version: str  # the live version
    damaged: tuple[str, ...]  # its files that did not match their signed sha256
    repaired: bool = False  # they were fetched again and match now
    unhealthy: HookError | None = None  # after the repair, the model server failed its check


DEFAULT_WAIT = 30.0  # seconds a command waits for a running cycle (the lock), then gives up


class Operator:
    """``wait``: the most seconds a command that changes the device waits for the model
    directory's lock (an update cycle in progress); then ``ConflictError`` (exit 5)."""

    def __init__(self, cfg: AgentConfig, now: Callable[[], datetime] = utcnow,
                 wait: float | None = DEFAULT_WAIT) -> None:
        self.cfg = cfg
        self.agent = Agent(cfg, now)
        self.wait = wait

    def init(self, trust: Path, config_path: Path) -> Path:
        """Pin the trust root ``trust`` (verified first), write the configuration to
        ``config_path`` and record the device id; returns where the root is pinned.

        Everything is checked before anything is written: the settings, the root, and (when the
        store answers at once) that every ``include`` pattern matches a group of the current
        release. The configuration and the pinned root are written as a pair: the
        configuration first, the root last; if anything fails after the configuration was
        written, it is put back as it was, so a failed ``init`` leaves neither.
        """
        check_config(self.cfg)
        location = parse_store_url(self.cfg.store)  # a bad URL: StoreConfigError (exit 2)
        if self.cfg.report == "store" and location.kind == "http":
            raise LocalError("--report store needs write access to the store: an s3:// or "
                             "directory store (an http(s) store is read-only); use "
                             "--report-url to POST reports instead")
        try:
            root_bytes = trust.read_bytes()
        except OSError as e:
            raise LocalError(f"cannot read the trust root {trust}: {e.strerror}") from e
        try:
            root = verify_root(root_bytes, now=self.agent.now())
        except UntrustedDataError as e:  # a local file: the user gave the wrong one
            raise TrustError(f"{trust} is not a usable trust root: {e}") from e
        self._check_include_at_store(root)
        layout = self.agent.layout
        was = self._pinned_repository()
        with _restored_on_failure(config_path):
            save_config(self.cfg, config_path)
            try:
                with self.agent.holding_state(self.wait) as state:
                    state.device_id = self.cfg.device_id
                    if was != root.repository_id:  # another store: its floors mean nothing
                        state.forget_store()
                        layout.drop_manifest()
                    self.agent.commit("device id")
                    layout.pin_root(root_bytes)  # last: a failed init pins nothing
            except OSError as e:  # a full disk is a DiskFullError already
                raise LocalError(f"cannot write the model directory {self.cfg.model_dir}: "
                                 f"{e.strerror}") from e
        return layout.root_file

    def _pinned_repository(self) -> str | None:
        """The repository of the root pinned now (None: none, or unreadable; an unusable model
        directory is reported when `init` writes to it)."""
        try:
            return self.agent.root().repository_id
        except (DeltashipError, OSError):
            return None

    def _check_include_at_store(self, root: Root) -> None:
        """Refuse ``include`` patterns that match no group of the store's current release,
        if the store answers at once (else the first `run` refuses them)."""
        if not self.cfg.include:
            return
        try:
            index = asyncio.run(self._current_index(root))
        except (DeltashipError, OSError) as e:  # e.g. no release yet: `run` checks each time
            log.info("could not check --include against the store now: %s", e)
            return
        check_include(index, self.cfg.include, fix="fix --include")

    async def _current_index(self, root: Root) -> ReleaseIndex:
        cfg = self.cfg
        limits = TransferLimits(timeout=_INIT_PROBE_TIMEOUT,
                                document_deadline=_INIT_PROBE_TIMEOUT)
        source = open_source(cfg.store, endpoint_url=cfg.endpoint_url, retry=_INIT_PROBE,
                             limits=limits, allow_redirect_hosts=cfg.allow_redirect_hosts)
        try:
            data, _ = await source.get_small(manifest_key(cfg.channel), MAX_MANIFEST_SIZE, None)
            assert data is not None
            manifest = verify_manifest(data, root, now=self.agent.now(), grace=self.agent.grace,
                                       channel=cfg.channel)
            pointer = manifest.current
            return verify_index(await self.agent.fetch_index(source, pointer), pointer, root)
        finally:
            await source.close()

    def status(self) -> StatusReport:
        """What the device runs and what the agent last did (read without waiting for a
        running cycle: the state file is always whole)."""
        layout, cfg = self.agent.layout, self.cfg
        state = layout.read_state()
        root, ts = self._trusted()
        live = layout.live_version()
        device_id = state.device_id or cfg.device_id
        rollout = None
        if root is not None and ts is not None and ts.manifest.channel == cfg.channel:
            rollout = rollout_view(ts.manifest, repository_id=root.repository_id,
                                   device_id=device_id, running=live, now=self.agent.now())
        sinks = [s for s in (cfg.report if cfg.report != "off" else None, cfg.report_url) if s]
        return StatusReport(device_id, live, layout.retained(), state, cfg.store,
                            str(cfg.model_dir), None if root is None else root.version,
                            tuple(expiries(root, ts, self.agent.now())), cfg.channel, rollout,
                            " and ".join(sinks) or "off")

    def _trusted(self) -> tuple[Root | None, Timestamp | None]:
        """The pinned root and the last verified manifest, for their expiries and rollout;
        what is missing or unreadable is None (``status`` must always answer)."""
        try:
            root: Root | None = self.agent.root()
        except (DeltashipError, OSError):
            root = None
        try:  # verified when it was saved: only read here (it may have expired since)
            signed = loads_object(self.agent.layout.load_manifest(), "manifest")["signed"]
            ts: Timestamp | None = Timestamp.from_dict(signed)
        except (DeltashipError, OSError, KeyError):
            ts = None
        return root, ts

    def rollback(self, to: str | None = None) -> RollbackResult:
        """Switch to a retained version (re-verified first) and pin the device there; works
        offline. ``to`` None: the version live before the current one (repeated rollbacks go
        further back), skipping versions that failed their health check."""
        agent, layout = self.agent, self.agent.layout
        with agent.holding_state(self.wait) as state:
            current = layout.current()
            if to is None:
                to = rollback_target(state, current, layout.has_version)
                if to is None:
                    raise NotFoundError("no previous version is retained on this device")
            if not layout.has_version(to):
                raise NotFoundError(f"version {to} is not retained on this device "
                                    f"(retained: {', '.join(layout.retained()) or 'none'})")
            agent.verify_version(to, agent.root())
            layout.switch(to)
            state.pinned = to
            state.pending_switch = None  # the operator's decision replaces any unfinished check
            state.history.append(SwitchEvent.switch(format_time(agent.now()), current, to,
                                                    ROLLBACK))
            agent.commit("rolled back")
            # Tell the model server, like after any switch; the operator's choice stands.
            unhealthy = self._check_server(to, f"rolled back to {to}")
        return RollbackResult(current, to, unhealthy)

    def resume(self) -> str | None:
        """Unpin the device and forget failed versions; returns the version it was pinned at."""
        with self.agent.holding_state(self.wait) as state:
            was = state.pinned
            state.pinned = None
            state.failed_versions = []
            self.agent.commit("resumed")
        return was

    def verify(self, repair: bool = False) -> VerifyResult:
        """Re-hash the live version against its signed index; with ``repair``, fetch what is
        damaged again and put it in place (then tell the model server, which maps it)."""
        agent = self.agent
        while True:
            current = agent.layout.current()
            if current is None:
                raise NotFoundError("no version is installed yet")
            bad = agent.damaged(current, agent.root())
            if not bad or not repair:
                return VerifyResult(current, tuple(bad))
            with agent.layout.lock(self.wait):
                # An update cycle may have switched (and pruned) while this waited for the
                # lock: repair, and tell the model server about, only what is live now.
                if agent.layout.current() != current:
                    continue
                asyncio.run(repair_version(agent, current, bad))
                unhealthy = self._check_server(current, f"repaired {current}")
            return VerifyResult(current, tuple(bad), repaired=True, unhealthy=unhealthy)

    def _check_server(self, version: str, done: str) -> HookError | None:
        """Run the hooks and health check for ``version``, which stays live either way."""
        try:
            asyncio.run(self.agent.hooks.after_switch(version,
                                                      self.agent.layout.version_dir(version)))
        except HookError as e:
            failure = HookError(f"{done}, but the model server is not healthy on it: {e}")
            failure.__cause__ = e
            return failure
        return None


@contextlib.contextmanager
def _restored_on_failure(path: Path) -> Iterator[None]:
    """If the block fails, put ``path`` back as it was (its content, or no file and none of
    the directories the block created for it)."""
    before = path.read_bytes() if path.is_file() else None
    missing = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            if before is not None:
                write_atomic(path, before)
            else:
                path.unlink(missing_ok=True)
                for d in missing:  # deepest first
                    d.rmdir()
        raise
