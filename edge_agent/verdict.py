"""The verdict on a switch: hooks and health check, switching back, a verdict left pending.

A mixin of :class:`edge_agent.updater.Agent` (which holds the state, the layout and the hooks):
after ``current`` moves, the model server is notified and checked; on failure the device
switches back and remembers the version as failed. ``state.pending_switch`` is saved before
each step, so a kill anywhere is finished by the next run (:meth:`finish_pending_switch`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from manifest.errors import HookError
from manifest.metadata import format_time

from .hooks import Hooks
from .layout import DeviceLayout
from .state import HEALTH_FAILED, AgentState, PendingSwitch, SwitchEvent

__all__ = ["SwitchVerdicts"]

log = logging.getLogger("deltaship.agent")


class SwitchVerdicts:
    """What :class:`~edge_agent.updater.Agent` does once ``current`` moved."""

    layout: DeviceLayout
    hooks: Hooks
    now: Callable[[], datetime]

    @property
    def state(self) -> AgentState:
        raise NotImplementedError

    def commit(self, point: str) -> None:
        raise NotImplementedError

    def prune(self, current: str) -> None:
        raise NotImplementedError

    def commit_switch(self, target: str, previous: str | None) -> None:
        """The new version passed its checks: record it, forget the plan, prune."""
        self.state.finish_update(target, previous, format_time(self.now()))
        self.commit("switch done")
        self.prune(target)

    async def finish_pending_switch(self, pending: PendingSwitch) -> None:
        """A previous run stopped before its switch's verdict was recorded: finish it now."""
        target, previous = pending.to, pending.from_
        if self.state.pinned:  # an operator decided since
            self.state.pending_switch = None
            self.commit("pending switch dropped: pinned")
            return
        if pending.failed is not None and previous is not None:
            log.warning("recording the interrupted switch back from %s to %s", target, previous)
            await self._switch_back(target, previous, HookError(pending.failed))
        if self.layout.current() != target:  # it never switched
            self.state.pending_switch = None
            self.commit("pending switch dropped: never switched")
            return
        log.warning("the check of %s was interrupted: checking it again", target)
        await self.check_health(target, previous)
        self.commit_switch(target, previous)

    async def check_health(self, target: str, previous: str | None) -> None:
        """Notify the model server and check it; on failure switch back and remember.

        Not on the first install: no model server can run before there is a model, and there
        is nothing to switch back to. Any exception from a hook counts as a failure; if the
        agent is stopped before the verdict is recorded, ``state.pending_switch`` makes the
        next run finish it (see :meth:`finish_pending_switch`).
        """
        if self.hooks.empty or previous is None:
            return
        try:
            await self.hooks.after_switch(target, self.layout.version_dir(target))
            return
        except Exception as e:
            failure = e if isinstance(e, HookError) else HookError(f"hook error: {e!r}")
        await self._switch_back(target, previous, failure)

    async def _switch_back(self, target: str, previous: str, failure: HookError) -> None:
        """Undo a failed switch and remember the failure; raises HookError. Idempotent: the
        failure is saved first, so a stop half-way is finished by the next run."""
        state = self.state
        state.pending_switch = PendingSwitch(previous, target, failed=str(failure))
        self.commit("switch failed")
        back = self.layout.has_version(previous)
        if back:
            if self.layout.current() != previous:
                self.layout.switch(previous)
            try:
                await self.hooks.after_switch(previous, self.layout.version_dir(previous))
            except Exception as e:
                log.error("the previous version %s is not healthy either: %s", previous, e)
        state.mark_failed(target)
        if back:
            state.history.append(SwitchEvent.switch(format_time(self.now()), target, previous,
                                                    HEALTH_FAILED))
        state.plan = None
        state.pending_switch = None
        self.commit("switched back")
        if not back:
            raise HookError(f"{target} failed after the switch ({failure}), and {previous} is "
                            "no longer on this device to switch back to: fix the model server "
                            "or release a fixed version") from failure
        self.prune(previous)  # the failed version's files go
        raise HookError(
            f"{target} failed after the switch ({failure}); switched back to "
            f"{previous} and will not retry {target} until a newer release or "
            "`deltaship-agent resume`"
        ) from failure
