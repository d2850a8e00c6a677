"""How store requests are retried: a policy value with a pure backoff, and a budget.

:class:`RetryPolicy` is an immutable value (like urllib3's ``Retry``): how many tries, how long to
wait. :meth:`RetryPolicy.delay` is a pure function of the attempt number, the server's
Retry-After and a random number, so it is tested with tables, not clocks. :class:`RetryState`
counts the consecutive failures of one request and resets the count whenever new bytes arrive, so
a long download over a flaky link keeps going as long as it makes progress. Nothing here sleeps:
the caller sleeps for the returned delay. :func:`give_up` is the error a caller raises once the
tries are spent: a plain :class:`~manifest.errors.TransportError` (exit 4, "retry later").

The agent's sources use these; the publisher's stores leave retries to botocore.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import RetryableError, TransportError

__all__ = ["DEFAULT_RETRY", "RetryPolicy", "RetryState", "give_up"]


@dataclass(frozen=True)
class RetryPolicy:
    """Retry a failing request ``attempts`` times in all, waiting longer after each failure.

    ``base`` is the wait after the first failure, doubled after each further one; no wait exceeds
    ``cap`` (a server's Retry-After included). ``jitter`` is the fraction of each wait that is
    random: 0 waits exactly, 0.5 waits between half and all of the backoff.
    """

    attempts: int = 6
    base: float = 0.5
    cap: float = 60.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry attempts must be at least 1, not {self.attempts}")
        if self.base < 0 or self.cap < 0:
            raise ValueError("retry delays must not be negative")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"retry jitter must be between 0 and 1, not {self.jitter}")

    def delay(self, attempt: int, retry_after: float | None, rand: float) -> float:
        """Seconds to wait after the ``attempt``-th consecutive failure (1-based).

        ``rand`` is uniform in [0, 1). A Retry-After longer than the backoff replaces it, capped
        at ``cap`` so that a hostile or confused server cannot park the device for a day.
        """
        exponent = min(max(attempt - 1, 0), 64)
        backoff = min(self.cap, self.base * 2.0**exponent) * (1.0 - self.jitter * rand)
        if retry_after is not None and retry_after > backoff:
            return min(retry_after, self.cap)
        return backoff


@dataclass
class RetryState:
    """The retry budget of one request: consecutive failures since bytes last arrived."""

    policy: RetryPolicy
    rand: Callable[[], float] = field(default=random.random, repr=False)
    failures: int = 0
    last_error: BaseException | None = None

    def progress(self) -> None:
        """New bytes arrived: the link works, so the budget starts again."""
        self.failures = 0

    def failed(self, err: BaseException, retry_after: float | None = None) -> float | None:
        """Record a failure; the seconds to wait before the next try, None when out of tries."""
        self.failures += 1
        self.last_error = err
        if self.failures >= self.policy.attempts:
            return None
        return self.policy.delay(self.failures, retry_after, self.rand())


DEFAULT_RETRY = RetryPolicy()


def give_up(error: RetryableError, tries: int | None = None) -> TransportError:
    """The final error once the tries of a request are spent (``tries``: how many were made).

    It keeps the store's Retry-After, so that the next poll waits at least that long.
    """
    after = f"; gave up after {tries} tries in a row" if tries else ""
    final = TransportError(f"{error}{after}: check the network and the store URL, then retry "
                           "later")
    final.retry_after = error.retry_after
    return final
