"""The storage layer: how a store is reached, from both sides, over the same backends.

* :mod:`.location`: a store URL parsed once (s3, http(s), file, a directory); store keys checked.
* :mod:`.s3`: one S3 client configuration and one botocore error table for both faces.
* :mod:`.store`: the publisher's synchronous face, :class:`Store` (read and write):
  :class:`LocalStore`, :class:`S3Store`, :func:`open_store`.
* :mod:`.source`: the agent's asynchronous face, :class:`Source` (reads, resumable,
  retried; one small bounded write for device reports): :class:`HttpSource`, :class:`S3Source`,
  :class:`LocalSource`, :func:`open_source`.
* :mod:`.retry`: the retry policy of the agent's face; :mod:`.atomic`: atomic local writes.

Errors and exit codes: docs/ERRORS.md. Importing this package imports neither boto3 nor aiohttp:
the names below are loaded from their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .atomic import atomic_output, fsync_dir, write_atomic
    from .location import StoreLocation, check_key, parse_store_url
    from .retry import DEFAULT_RETRY, RetryPolicy, RetryState
    from .s3 import S3Settings
    from .source import HttpSource, LocalSource, S3Source, Source, TransferLimits, open_source
    from .store import LocalStore, S3Store, Store, StoreOptions, open_store

__all__ = [
    "DEFAULT_RETRY",
    "HttpSource",
    "LocalSource",
    "LocalStore",
    "RetryPolicy",
    "RetryState",
    "S3Settings",
    "S3Source",
    "S3Store",
    "Source",
    "Store",
    "StoreLocation",
    "StoreOptions",
    "TransferLimits",
    "atomic_output",
    "check_key",
    "fsync_dir",
    "open_source",
    "open_store",
    "parse_store_url",
    "write_atomic",
]

_HOME = {
    **dict.fromkeys(["atomic_output", "fsync_dir", "write_atomic"], "atomic"),
    **dict.fromkeys(["StoreLocation", "check_key", "parse_store_url"], "location"),
    **dict.fromkeys(["DEFAULT_RETRY", "RetryPolicy", "RetryState"], "retry"),
    "S3Settings": "s3",
    **dict.fromkeys(["HttpSource", "LocalSource", "S3Source", "Source", "TransferLimits",
                      "open_source"], "source"),
    **dict.fromkeys(["LocalStore", "S3Store", "Store", "StoreOptions", "open_store"], "store"),
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
