"""Bounded, order-preserving parallel map over a thread pool.

zstd, hashlib and numpy release the GIL on large buffers, so threads give real parallelism for
the codecs. At most ``in_flight`` items, and at most ``max_weight`` of their summed ``weight``
(bytes, for chunks), are submitted and not yet consumed at once, which bounds memory whatever
the sizes: many small chunks keep every core busy, a few large ones stay few.
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
    fn: Callable[[A], R],
    items: Iterable[A],
    executor: ThreadPoolExecutor | None,
    in_flight: int,
    weight: Callable[[A], int] = lambda item: 0,
    max_weight: int = 0,
) -> Iterator[R]:
    """``map(fn, items)`` computed ahead by ``executor``, yielding in input order."""
    if executor is None:
        yield from map(fn, items)
        return
    pending: deque[tuple[Future[R], int]] = deque()
    load = 0
    try:
        for item in items:
            w = weight(item)
            while pending and (
                len(pending) >= in_flight or (max_weight and load + w > max_weight)
            ):
                future, done_w = pending.popleft()
                load -= done_w
                yield future.result()
            pending.append((executor.submit(fn, item), w))
            load += w
        while pending:
            future, _ = pending.popleft()
            yield future.result()
    finally:
        for future, _ in pending:
            future.cancel()
