"""When what a device trusts expires, and when to warn (pure; shared by ``deltaship-publish
history`` and ``deltaship-agent status``).

Three clocks run out independently (docs/FORMAT.md §4-5): the trust root (renewed by a root
rotation), the release content (renewed by a release, revert or ``refresh --content``) and its
freshness (renewed by ``refresh``, weekly). A warning is due when fewer than ``WARN_BEFORE``
of a clock remain: for freshness that is two missed weekly refreshes of the default 28 days.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from .metadata import Root, Timestamp, format_time

__all__ = ["WARN_BEFORE", "Expiry", "expiries"]

WARN_BEFORE = {
    "root": timedelta(days=30),
    "content": timedelta(days=30),
    "freshness": timedelta(days=14),
}
_LABEL = {"root": "trust root", "content": "release content", "freshness": "freshness"}
_FIX = {
    "root": "the root key holders must publish a new root version (`deltaship-publish root "
            "edit`, `root sign`, `root publish`)",
    "content": "release, revert, or re-sign it with the release keys (`deltaship-publish "
               "refresh --content`)",
    "freshness": "run `deltaship-publish refresh` (the timestamp key; weekly from a timer)",
}


@dataclass(frozen=True)
class Expiry:
    name: str  # "root", "content" or "freshness"
    at: datetime
    now: datetime

    @property
    def label(self) -> str:
        return _LABEL[self.name]

    @property
    def at_text(self) -> str:
        return format_time(self.at)

    @property
    def days_left(self) -> int:
        return (self.at - self.now).days

    @property
    def warning(self) -> str | None:
        """One line when this clock has run out or soon will; None otherwise."""
        if self.at <= self.now:
            return f"the {self.label} expired at {self.at_text}: {_FIX[self.name]}"
        if self.at - self.now < WARN_BEFORE[self.name]:
            return (f"the {self.label} expires at {self.at_text} (in {self.days_left} days): "
                    f"{_FIX[self.name]}")
        return None

    def to_dict(self) -> dict[str, object]:
        return {"expires": self.at_text, "days_left": self.days_left, "warning": self.warning}


def expiries(root: Root | None, timestamp: Timestamp | None, now: datetime) -> list[Expiry]:
    """The clocks known: the root's, and with a manifest its content's and freshness'."""
    out = []
    if root is not None:
        out.append(Expiry("root", root.expires, now))
    if timestamp is not None:
        out.append(Expiry("content", timestamp.manifest.expires, now))
        out.append(Expiry("freshness", timestamp.expires, now))
    return out
