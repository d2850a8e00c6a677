"""Progress of a long job in bytes: done of total, speed and time left (publisher and agent).

On a terminal, one line redrawn in place (at most five times a second) and ended at
:meth:`Progress.close`. Elsewhere (a log file, the journal), one line every ``interval``
seconds while the job runs, through ``line`` (e.g. a logger) or else on the stream; a job that
ends sooner prints nothing. :meth:`Progress.advance` may be called from worker threads.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["LINE_INTERVAL", "Progress", "human_bytes"]

LINE_INTERVAL = 5.0  # seconds between progress lines where there is no terminal
_REDRAW = 0.2  # seconds between redraws of the terminal line


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


class Progress:
    """``enabled``: True draws the terminal line, False shows nothing, None (the default)
    draws it on a terminal and writes periodic lines elsewhere."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None,
                 enabled: bool | None = None, *, interval: float = LINE_INTERVAL,
                 line: Callable[[str], None] | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        tty = self.stream.isatty()
        self.mode = "off" if enabled is False else "bar" if enabled or tty else "lines"
        self.enabled = self.mode == "bar"
        self.interval = interval
        self._line = line
        self._start = time.monotonic()
        self._last = 0.0 if self.mode == "bar" else self._start
        self._lock = threading.Lock()

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self.mode == "bar" and (now - self._last > _REDRAW or self.done >= self.total):
                self._last = now
                self.stream.write(f"\r{self.text(now)} ")
                self.stream.flush()
            elif self.mode == "lines" and now - self._last >= self.interval:
                self._last = now
                self._emit(self.text(now))

    def text(self, now: float | None = None) -> str:
        """``label: 42.0% 1.2 MB/2.9 MB 310.5 kB/s ETA 6s``"""
        elapsed = max((time.monotonic() if now is None else now) - self._start, 1e-6)
        speed = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        remaining = max(self.total - self.done, 0)
        # Nothing moved yet (a stalled store): the time left is unknown, not zero.
        eta = f"{remaining / speed:4.0f}s" if speed > 0 else "   0s" if not remaining else "    ?"
        return (f"{self.label}: {pct:5.1f}% {human_bytes(self.done)}/{human_bytes(self.total)} "
                f"{human_bytes(speed)}/s ETA {eta}")

    def _emit(self, text: str) -> None:
        if self._line is not None:
            self._line(text)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self.mode == "bar":
                self.stream.write("\n")
                self.stream.flush()
            elif self.mode == "lines" and self._last > self._start:  # it printed before
                self._emit(self.text())
