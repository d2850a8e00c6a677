"""When the service polls (pure): a spread first poll, jitter, backoff, the store's Retry-After.

A fleet that starts together (a power cut, a reboot wave, a release at 10:00) must not poll
together: a thousand devices on one interval hammer the store at the same second forever. So:

* the **first poll** of ``deltaship-agent run`` comes after a random delay in ``[0, interval)``
  (``run --once`` polls at once);
* after a **successful** cycle (or one that failed for another reason than the transport) the
  next poll comes after the interval times a random factor in ``[1 - JITTER, 1 + JITTER]``
  (±20 %);
* after the **n-th transport failure in a row** (``TransportError``: the store unreachable,
  failing, or lacking a key, once the source's own retries are spent) the wait is "full jitter"
  exponential backoff: uniform in ``[0, min(cap, base * 2**(n-1))]``, with ``base`` =
  ``min(interval / 8, 30 s)`` and ``cap`` = ``min(interval, MAX_BACKOFF = 6 h)``, and at least
  ``MIN_DELAY`` (1 s, or the cap if smaller): a failing store is retried sooner than the
  interval, but a fleet's retries spread out instead of arriving in waves;
* a store's **Retry-After** (429/503 answers of an HTTP or S3 store, in seconds or as an HTTP
  date) is a lower bound of the next wait, itself capped at ``MAX_RETRY_AFTER`` (6 h) so that a
  confused or hostile store cannot park a device for longer.

Randomness comes in as numbers (``rand`` uniform in [0, 1)), so tests need no clock and no
seed: :class:`PollSchedule` is a value, its methods are functions.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BACKOFF_BASE", "JITTER", "MAX_BACKOFF", "MAX_RETRY_AFTER", "MIN_DELAY",
           "PollSchedule"]

JITTER = 0.2  # each interval is 80 % .. 120 % of the configured one
BACKOFF_BASE = 30.0  # seconds: the backoff after a first failure is at most this
MAX_BACKOFF = 6 * 3600.0  # seconds: no backoff step is longer (nor the interval)
MAX_RETRY_AFTER = 6 * 3600.0  # a store cannot park a device for longer than this
MIN_DELAY = 1.0  # seconds: full jitter never turns into a tight loop


@dataclass(frozen=True)
class PollSchedule:
    """The delays between polls of one device polling every ``interval`` seconds."""

    interval: float
    jitter: float = JITTER

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError(f"poll interval must be positive, not {self.interval}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), not {self.jitter}")

    @property
    def backoff_base(self) -> float:
        return min(self.interval / 8, BACKOFF_BASE)

    @property
    def backoff_cap(self) -> float:
        return min(self.interval, MAX_BACKOFF)

    def first(self, rand: float) -> float:
        """The wait before the service's first poll: uniform in [0, interval)."""
        return self.interval * rand

    def after_success(self, rand: float) -> float:
        """The interval with ±``jitter``: ``rand`` 0 gives the shortest, 1 the longest."""
        return self.interval * (1 - self.jitter + 2 * self.jitter * rand)

    def after_failure(self, failures: int, rand: float) -> float:
        """Full-jitter backoff after the ``failures``-th transport failure in a row (1-based)."""
        exponent = min(max(failures - 1, 0), 64)
        ceiling = min(self.backoff_cap, self.backoff_base * 2.0**exponent)
        # At least MIN_DELAY (or the cap, if smaller): with a short interval the first
        # ceilings are under a second, and full jitter alone could make a tight loop.
        return max(min(MIN_DELAY, self.backoff_cap), ceiling * rand)

    def next(self, failures: int, retry_after: float | None, rand: float) -> float:
        """The wait before the next poll: ``failures`` transport failures in a row (0: the
        last cycle did not fail for the transport), and the store's Retry-After if it sent one:
        a lower bound, capped at :data:`MAX_RETRY_AFTER`."""
        delay = self.after_failure(failures, rand) if failures else self.after_success(rand)
        if retry_after is not None and retry_after > delay:
            delay = min(retry_after, max(delay, MAX_RETRY_AFTER))
        return delay
