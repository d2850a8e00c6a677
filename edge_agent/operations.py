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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from manifest.errors import HookError, LocalError, NotFoundError
from manifest.metadata import format_time
from manifest.trust import verify_root

from .config import AgentConfig, save_config
from .repair import repair_version
from .state import ROLLBACK, AgentState, SwitchEvent, rollback_target
from .updater import Agent, utcnow

__all__ = ["DEFAULT_WAIT", "Operator", "RollbackResult", "StatusReport", "VerifyResult"]


# The saved state's fields `status` shows, in the order it shows them.
_STATUS_FIELDS = ("pinned", "failed_versions", "highest_sequence", "last_check", "last_result",
                  "last_error", "bytes_last_update", "bytes_total", "plan", "last_update")


@dataclass(frozen=True)
class StatusReport:
    device_id: str
    current: str | None  # None: nothing installed (or `current` names no directory)
    retained: list[str]
    state: AgentState  # as last saved (pin, failures, last check, plan in progress, ...)
    store: str
    model_dir: str

    def to_dict(self) -> dict[str, Any]:
        """``status --json``: these keys, in this order."""
        saved = self.state.to_dict()
        return {"device_id": self.device_id, "current": self.current, "retained": self.retained,
                **{k: saved[k] for k in _STATUS_FIELDS},
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
        ``config_path`` and record the device id; returns where the root is pinned."""
        try:
            root_bytes = trust.read_bytes()
        except OSError as e:
            raise LocalError(f"cannot read the trust root {trust}: {e.strerror}") from e
        verify_root(root_bytes, now=self.agent.now())
        layout = self.agent.layout
        layout.pin_root(root_bytes)
        save_config(self.cfg, config_path)
        with self.agent.holding_state(self.wait) as state:
            state.device_id = self.cfg.device_id
            self.agent.commit("device id")
        return layout.root_file

    def status(self) -> StatusReport:
        """What the device runs and what the agent last did (read without waiting for a
        running cycle: the state file is always whole)."""
        layout = self.agent.layout
        state = layout.read_state()
        return StatusReport(state.device_id or self.cfg.device_id, layout.live_version(),
                            layout.retained(), state, self.cfg.store, str(self.cfg.model_dir))

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
        current = agent.layout.current()
        if current is None:
            raise NotFoundError("no version is installed yet")
        bad = agent.damaged(current, agent.root())
        if not bad or not repair:
            return VerifyResult(current, tuple(bad))
        with agent.layout.lock(self.wait):
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
