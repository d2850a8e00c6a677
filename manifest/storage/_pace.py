"""How long one try of a request may take: a deadline and a floor on the transfer rate (pure).

:class:`TransferLimits` is the value a source is configured with. :class:`Pace` watches one try:
fed the body bytes as they arrive and the time the agent itself spent throttling (its own
``max_rate``, which must not count against the server), it says until when the try may go on
(:meth:`Pace.ends_at`) and, once it is over, why (:meth:`Pace.verdict`). Time is passed in, so
the rules are tested without clocks.

* every try: at least ``min_rate`` bytes/s on average over the last ``rate_window`` seconds,
  judged once the try has lasted a full window (connecting and the headers count as time with
  no bytes, so a server dripping its headers is cut off too);
* documents (the manifest, a release index): also ``document_deadline`` seconds in all, from
  the request to the last byte.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["DEFAULT_LIMITS", "Pace", "TransferLimits"]


@dataclass(frozen=True)
class TransferLimits:
    """Time limits of the agent's requests (docs/ERRORS.md, "Slow stores")."""

    timeout: float = 30.0  # connecting, and each wait for data
    document_deadline: float = 300.0  # one try of a manifest or index, start to end
    min_rate: float = 1024.0  # bytes/s on average over rate_window, else the try is too slow
    rate_window: float = 60.0

    def __post_init__(self) -> None:
        for name in ("timeout", "document_deadline", "min_rate", "rate_window"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")


DEFAULT_LIMITS = TransferLimits()


class Pace:
    """One try of a request, started at ``start`` (seconds of some monotonic clock)."""

    def __init__(self, limits: TransferLimits, start: float, document: bool) -> None:
        self.limits = limits
        self._start = start
        self._paused = 0.0
        self._deadline = limits.document_deadline if document else None
        self._need = limits.min_rate * limits.rate_window  # bytes per window
        self._samples: deque[tuple[float, int]] = deque()  # (active seconds, bytes)
        self.received_bytes = 0

    def _active(self, now: float) -> float:
        return now - self._start - self._paused

    def received(self, n: int, now: float) -> None:
        active = self._active(now)
        self._samples.append((active, n))
        self.received_bytes += n
        while self._samples and self._samples[0][0] <= active - self.limits.rate_window:
            self._samples.popleft()

    def paused(self, seconds: float) -> None:
        """The agent held the transfer back itself (its bandwidth cap) for ``seconds``."""
        self._paused += seconds

    def _floor_ends(self) -> float:
        """The active second at which the window would hold too few bytes, if none come."""
        window = self.limits.rate_window
        acc = 0
        for t, n in reversed(self._samples):
            acc += n
            if acc >= self._need:  # enough until this sample leaves the window
                return max(window, t + window)
        return window

    def ends_at(self, now: float) -> float:
        """Until when (same clock as ``now``) the try may go on if no further byte arrives."""
        end = self._floor_ends()
        if self._deadline is not None:
            end = min(end, self._deadline)
        return now + (end - self._active(now))

    def verdict(self, now: float) -> str:
        """Why the try was ended at ``now``."""
        if self._deadline is not None and self._active(now) >= self._deadline - 1e-6:
            return (f"took longer than its {self._deadline:g} s deadline "
                    f"({self.received_bytes} bytes received)")
        window, rate = self.limits.rate_window, self.limits.min_rate
        got = sum(n for t, n in self._samples if t > self._active(now) - window)
        return (f"is too slow: {got} bytes in the last {window:g} s, under the minimum of "
                f"{rate:g} bytes/s")
