"""What a listing with metadata returns (both backends of the publisher's face)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

__all__ = ["StoredObject"]


@dataclass(frozen=True)
class StoredObject:
    """A key of the store, its size and when it was last written (UTC)."""

    key: str
    size: int
    modified: datetime
