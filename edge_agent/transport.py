"""Compatibility re-export; removed when the architecture branches merge.

The agent's source is now :mod:`manifest.storage.source`.
"""

from manifest.storage.source import (
    BLOCK,
    DEFAULT_RETRY,
    FLUSH_SECONDS,
    READ_SIZE,
    HttpSource,
    LocalSource,
    MissingKeyError,
    S3Source,
    Source,
    open_source,
)

__all__ = [
    "BLOCK",
    "DEFAULT_RETRY",
    "FLUSH_SECONDS",
    "READ_SIZE",
    "HttpSource",
    "LocalSource",
    "MissingKeyError",
    "S3Source",
    "Source",
    "open_source",
]
