"""What a store's HTTP answer says (Retry-After, Content-Range), and exception text on one line.

Shared by the HTTP and S3 backends; pure functions, no I/O.
"""

from __future__ import annotations

import email.utils
import re
import time

from ..errors import RetryableError

__all__ = ["content_range", "one_line", "retry_after_seconds"]


def one_line(e: BaseException) -> str:
    """The text of ``e`` with its white space folded: error messages are one line."""
    return " ".join(str(e).split()) or type(e).__name__


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date; None if unreadable.

    ``now`` (seconds since the epoch) defaults to the clock.
    """
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def content_range(value: str, where: str) -> tuple[int, int | None]:
    """The first byte and the object's total length (None for ``*``) of a Content-Range."""
    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", value.strip())
    if m is None:
        raise RetryableError(f"GET {where} answered with a malformed Content-Range {value!r}")
    return int(m[1]), None if m[2] == "*" else int(m[2])
