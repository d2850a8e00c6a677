"""Bounded work for the reference server: how many requests compute at once, how many may
wait, how long one may take, and no work for clients that have gone.

``threads`` requests compute at once (in the executor); at most ``max_queue`` more wait, in
arrival order; a request that would wait beyond that is refused at once with
:class:`Overloaded` (the server answers 503 with ``Retry-After``). Every request has
``timeout`` seconds from its arrival to its answer, waiting included. A request whose handler
is cancelled (its client disconnected, its time ran out) leaves the queue at once; one
already computing is told to stop through its ``stop`` event (generation checks it between
tokens) and keeps its thread only until then. :meth:`WorkQueue.close` (SIGTERM) refuses what
waits and lets what computes finish.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

__all__ = ["Overloaded", "WorkQueue"]

T = TypeVar("T")


class Overloaded(Exception):
    """The server cannot answer this request now; ``retry_after`` seconds is a fair wait."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class WorkQueue:
    def __init__(self, executor: Executor, threads: int, max_queue: int,
                 timeout: float) -> None:
        self.executor, self.threads = executor, max(1, threads)
        self.max_queue, self.timeout = max_queue, timeout
        self.running = self.waiting = 0
        self.rejected = self.abandoned = self.timed_out = 0
        self.closed = False
        self._free = self.threads
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()
        self._seconds = 0.0  # a moving average of the compute time per request

    def stats(self) -> dict[str, Any]:
        return {"running": self.running, "waiting": self.waiting, "max_queue": self.max_queue,
                "request_timeout": self.timeout, "rejected": self.rejected,
                "abandoned": self.abandoned, "timed_out": self.timed_out}

    def retry_after(self) -> int:
        """Whole seconds until the work ahead is likely done (at least 1)."""
        backlog = (self.running + self.waiting + 1) * self._seconds / self.threads
        return max(1, min(math.ceil(backlog), math.ceil(self.timeout)))

    async def run(self, fn: Callable[[threading.Event], T]) -> T:
        """``fn(stop)`` in the executor once a thread is free; raises :class:`Overloaded` when
        the queue is full, the server is stopping or the time is up."""
        if self.closed:
            raise Overloaded("the server is stopping", 1)
        if self._free == 0 and self.waiting >= self.max_queue:
            self.rejected += 1
            raise Overloaded(f"{self.waiting} requests are already waiting (--max-queue)",
                             self.retry_after())
        try:
            async with asyncio.timeout(self.timeout):
                await self._acquire()
                return await self._compute(fn)
        except TimeoutError:
            self.timed_out += 1
            raise Overloaded(f"no answer within {self.timeout:g} s (--request-timeout)",
                             self.retry_after()) from None
        except asyncio.CancelledError:
            self.abandoned += 1  # the client went away (or the server stops)
            raise

    async def _acquire(self) -> None:
        if self._free > 0 and not self._queue:
            self._free -= 1
            return
        slot = asyncio.get_running_loop().create_future()
        self._queue.append(slot)
        self.waiting += 1
        try:
            await slot  # a slot handed over by _release, or Overloaded from close()
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled() and slot.exception() is None:
                self._release()  # handed a slot just as we were cancelled: pass it on
            raise
        finally:
            self.waiting -= 1

    def _release(self) -> None:
        while self._queue:
            slot = self._queue.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        self._free += 1

    async def _compute(self, fn: Callable[[threading.Event], T]) -> T:
        stop = threading.Event()
        started = time.monotonic()
        self.running += 1

        def done(_: object) -> None:  # the thread is free only when fn has returned
            self.running -= 1
            took = time.monotonic() - started
            self._seconds = took if not self._seconds else 0.8 * self._seconds + 0.2 * took
            self._release()

        work = asyncio.get_running_loop().run_in_executor(self.executor, fn, stop)
        work.add_done_callback(done)
        try:
            return await asyncio.shield(work)
        except BaseException:
            stop.set()
            raise

    def close(self) -> int:
        """Refuse new and waiting requests (the server stops); the number refused."""
        self.closed = True
        refused = 0
        while self._queue:
            slot = self._queue.popleft()
            if not slot.done():
                slot.set_exception(Overloaded("the server is stopping", 1))
                refused += 1
        return refused
