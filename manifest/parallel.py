"""Bounded, order-preserving parallel map over a thread pool.

zstd, hashlib and numpy release the GIL on large buffers, so threads give real parallelism for
the codecs; at most ``in_flight`` results are held at once, which bounds memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

__all__ = ["ordered_map"]

A = TypeVar("A")
R = TypeVar("R")


def ordered_map(
    fn: Callable[[A], R], items: Iterable[A], executor: ThreadPoolExecutor | None, in_flight: int
) -> Iterator[R]:
    """``map(fn, items)`` computed ahead by ``executor``, yielding in input order."""
    if executor is None:
        yield from map(fn, items)
        return
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(executor.submit(fn, item))
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
