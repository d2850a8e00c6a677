"""The service: run update cycles until stopped, and decide when the next one comes.

A cycle (:meth:`edge_agent.updater.Agent.cycle`) records its own outcome in the agent state
(and reports it, :mod:`edge_agent.report`); this loop only paces the cycles with a
:class:`~edge_agent.schedule.PollSchedule` (a random first delay, ±20 % jitter, full-jitter
backoff after transport failures, the store's Retry-After as a lower bound) and stops cleanly
on SIGTERM/SIGINT. ``run --once`` runs one cycle at once.

An unexpected exception in a cycle is a bug: the loop logs its traceback, records it in the
state (``status`` shows it as the last error) and tries again after the poll interval, instead
of dying and being restarted in a tight loop by systemd. ``run --once`` still exits 1 with the
traceback.

:func:`open_agent_source` opens the store with the configuration's transfer limits
(:class:`manifest.storage.source.TransferLimits`) and redirect hosts, for cycles and repairs.
Tests pass ``rand`` (uniform in [0, 1)) and ``pause`` (the wait between polls) to
:class:`Service`: the schedule is then observed without a clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import Awaitable, Callable

from manifest.errors import DeltashipError, TransportError
from manifest.metadata import format_time
from manifest.storage.retry import DEFAULT_RETRY, RetryPolicy
from manifest.storage.source import Source, TransferLimits, open_source

from .config import AgentConfig
from .schedule import PollSchedule
from .updater import Agent

__all__ = ["Service", "open_agent_source", "run_forever"]

log = logging.getLogger("deltaship.agent")


def open_agent_source(cfg: AgentConfig, retry: RetryPolicy | None = None) -> Source:
    """The store as the agent reads it: the configuration's rate cap, limits and redirects."""
    limits = TransferLimits(document_deadline=cfg.document_deadline, min_rate=cfg.min_rate,
                            rate_window=cfg.rate_window)
    return open_source(cfg.store, endpoint_url=cfg.endpoint_url, max_rate=cfg.max_rate,
                       retry=retry or DEFAULT_RETRY, limits=limits,
                       allow_redirect_hosts=cfg.allow_redirect_hosts)
def _record_bug(agent: Agent, error: Exception) -> None:
    """Record an unexpected error in the state, for ``status`` (best effort)."""
    try:
        with agent.holding_state(wait=30) as state:
            state.last_check = format_time(agent.now())
            state.last_result = "failed"
            state.last_error = f"unexpected error (a bug; the log has the traceback): {error!r}"
            agent.commit("cycle recorded")
    except Exception as why:
        log.warning("could not record the unexpected error in the agent state: %s", why)


class Service:
    """The service loop of one device. ``stop`` ends it between steps; ``pause(delay)``
    waits before the next poll (default: until ``delay`` passes or ``stop`` is set)."""

    def __init__(self, cfg: AgentConfig, *, once: bool = False,
                 retry: RetryPolicy | None = None,
                 rand: Callable[[], float] = random.random,
                 pause: Callable[[float], Awaitable[None]] | None = None) -> None:
        self.cfg = cfg
        self.once = once
        self.retry = retry
        self.rand = rand
        self.schedule = PollSchedule(cfg.interval)
        self.stop = asyncio.Event()
        self.pause = pause or self._wait
        self.delays: list[float] = []  # every wait between polls, in order (for tests, logs)

    async def _wait(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), timeout=delay)

    async def _sleep(self, delay: float) -> None:
        self.delays.append(delay)
        await self.pause(delay)

    async def run(self) -> int:
        """Poll until stopped; returns the exit code (``once``: after one cycle)."""
        agent = Agent(self.cfg)
        source = open_agent_source(self.cfg, self.retry)
        failures = 0  # transport failures in a row
        try:
            if not self.once:
                first = self.schedule.first(self.rand())
                log.info("first poll in %.0f s (a random delay within the interval)", first)
                await self._sleep(first)
            while not self.stop.is_set():
                task = asyncio.ensure_future(agent.cycle(source))
                stopper = asyncio.ensure_future(self.stop.wait())
                done, _ = await asyncio.wait({task, stopper},
                                             return_when=asyncio.FIRST_COMPLETED)
                if task not in done:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    log.info("stopped")
                    return 0
                stopper.cancel()
                retry_after = None
                try:
                    result = task.result()
                except DeltashipError as e:  # the cycle recorded it in the state
                    if self.once:
                        raise  # the command line prints it: one line on stderr
                    log.error("update failed: %s", e)
                    if isinstance(e, TransportError):
                        failures += 1
                        retry_after = e.retry_after
                    else:
                        failures = 0
                except Exception as e:  # a bug: keep the traceback, record it, wait an interval
                    _record_bug(agent, e)
                    if self.once:
                        raise  # the traceback goes to stderr
                    log.exception("unexpected error in an update cycle (a bug)")
                    failures = 0
                else:
                    log.info("%s", result.message)
                    failures = 0
                    if self.once:
                        return 0
                delay = self.schedule.next(failures, retry_after, self.rand())
                log.info("next poll in %.0f s", delay)
                await self._sleep(delay)
            return 0
        finally:
            await source.close()


async def run_forever(cfg: AgentConfig, *, once: bool = False,
                      retry: RetryPolicy | None = None) -> int:
    """The service loop; returns the exit code. SIGTERM/SIGINT stop it between steps."""
    service = Service(cfg, once=once, retry=retry)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop.set)
    return await service.run()
