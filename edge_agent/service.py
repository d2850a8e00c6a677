"""The service: run update cycles until stopped, and decide when the next one comes.

A cycle (:meth:`edge_agent.updater.Agent.cycle`) records its own outcome in the agent state;
this loop only paces the cycles (the poll interval with jitter, the retry policy's backoff
after a transport failure, the store's Retry-After) and stops cleanly on SIGTERM/SIGINT.

An unexpected exception in a cycle is a bug: the loop logs its traceback, records it in the
state (``status`` shows it as the last error) and tries again after the poll interval, instead
of dying and being restarted in a tight loop by systemd. ``run --once`` still exits 1 with the
traceback.

:func:`open_agent_source` opens the store with the configuration's transfer limits
(:class:`manifest.storage.source.TransferLimits`) and redirect hosts, for cycles and repairs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal

from manifest.errors import DeltashipError, TransportError
from manifest.metadata import format_time
from manifest.storage.retry import RetryPolicy, RetryState
from manifest.storage.source import Source, TransferLimits, open_source

from .config import AgentConfig
from .updater import Agent

__all__ = ["MAX_RETRY_AFTER", "next_poll_delay", "open_agent_source", "run_forever"]

log = logging.getLogger("deltaship.agent")

MAX_RETRY_AFTER = 3600.0  # a store cannot park a device for longer than this


def next_poll_delay(interval: float, backoff: float | None, retry_after: float | None) -> float:
    """Seconds until the next poll after a transport failure (pure).

    The retry backoff while it lasts, else the (jittered) poll interval; never sooner than the
    store's Retry-After, capped at :data:`MAX_RETRY_AFTER`.
    """
    delay = backoff if backoff is not None else interval
    if retry_after is not None and retry_after > delay:
        delay = min(retry_after, max(delay, MAX_RETRY_AFTER))
    return delay


def open_agent_source(cfg: AgentConfig) -> Source:
    """The store as the agent reads it: the configuration's rate cap, limits and redirects."""
    limits = TransferLimits(document_deadline=cfg.document_deadline, min_rate=cfg.min_rate,
                            rate_window=cfg.rate_window)
    return open_source(cfg.store, endpoint_url=cfg.endpoint_url, max_rate=cfg.max_rate,
                       limits=limits, allow_redirect_hosts=cfg.allow_redirect_hosts)


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


async def run_forever(
    cfg: AgentConfig, *, once: bool = False, retry: RetryPolicy | None = None
) -> int:
    """The service loop; returns the exit code. SIGTERM/SIGINT stop it between steps."""
    agent = Agent(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    policy = retry or RetryPolicy()
    failures = RetryState(policy)
    source = open_agent_source(cfg)
    try:
        while not stop.is_set():
            delay = cfg.interval * random.uniform(0.8, 1.2)
            task = asyncio.ensure_future(agent.cycle(source))
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                log.info("stopped")
                return 0
            stopper.cancel()
            try:
                result = task.result()
            except DeltashipError as e:  # the cycle recorded it in the state
                if once:
                    raise  # the command line prints it: one line on stderr
                log.error("update failed: %s", e)
                if isinstance(e, TransportError):
                    delay = next_poll_delay(delay, failures.failed(e, e.retry_after),
                                            e.retry_after)
            except Exception as e:  # a bug: keep the traceback, record it, wait a full interval
                _record_bug(agent, e)
                if once:
                    raise  # the traceback goes to stderr
                log.exception("unexpected error in an update cycle (a bug); next try in "
                              "%.0f s", delay)
            else:
                log.info("%s", result.message)
                failures = RetryState(policy)
                if once:
                    return 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
        return 0
    finally:
        await source.close()
