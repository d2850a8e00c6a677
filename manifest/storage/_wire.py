"""What a store's HTTP answer says (Retry-After, Content-Range, a redirect's Location), and
exception text on one line.

Shared by the HTTP and S3 backends; pure functions, no I/O. A header a server got wrong is the
server's failure of one try (:class:`RetryableError`), never a crash: numbers longer than
:data:`MAX_DIGITS` digits are refused before Python converts them.
"""

from __future__ import annotations

import email.utils
import re
import time
from urllib.parse import urljoin, urlsplit

from ..errors import RetryableError, TransportError

__all__ = ["MAX_DIGITS", "content_range", "one_line", "redirect_target", "retry_after_seconds"]

MAX_DIGITS = 19  # a byte count of up to 10**19 - 1: more than any object, less than int64


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
    d = rf"(\d{{1,{MAX_DIGITS}}})"
    m = re.fullmatch(rf"bytes {d}-{d}/({d[1:-1]}|\*)", value.strip())
    if m is None or int(m[2]) < int(m[1]) or (m[3] != "*" and int(m[3]) <= int(m[2])):
        shown = value if len(value) <= 80 else f"{value[:60]}... ({len(value)} characters)"
        raise RetryableError(f"GET {where} answered with a malformed Content-Range {shown!r}")
    return int(m[1]), None if m[3] == "*" else int(m[3])


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:  # a port that is not a number
        port = None
    return parts.scheme, (parts.hostname or ""), port


def redirect_target(url: str, location: str | None, allowed_hosts: tuple[str, ...],
                    where: str) -> str:
    """Where a redirect from ``url`` to ``location`` leads, if it may be followed.

    Same origin (scheme, host and port) always; another host only when ``allowed_hosts`` names
    it (``host`` or ``host:port``) and the scheme is not downgraded from https to http.
    Anything else is a :class:`TransportError` naming the target (not retried).
    """
    if not location:
        raise RetryableError(f"GET {where} was redirected without a Location")
    target = urljoin(url, location.strip())
    scheme, host, port = _origin(target)
    if scheme not in ("http", "https") or not host or port is None:
        raise TransportError(f"GET {where} was redirected to {target[:200]!r}: not an http(s) "
                             "URL, not followed")
    if (scheme, host, port) == _origin(url):
        return target
    downgrade = urlsplit(url).scheme == "https" and scheme == "http"
    allowed = any(h.lower() in (host, f"{host}:{port}") for h in allowed_hosts)
    if allowed and not downgrade:
        return target
    why = ("from https to http" if allowed else
           "another host or port than the store's; allow it with allow_redirect_hosts "
           "(`deltaship-agent init --allow-redirect-host HOST[:PORT]`) if it is a mirror you "
           "trust")
    raise TransportError(f"GET {where} was redirected to {target[:200]}, {why}: not followed")
