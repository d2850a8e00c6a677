"""The publisher's face of the storage layer: a synchronous :class:`Store` that reads and writes.

Keys are relative POSIX paths under the store's prefix (``manifest.json``, ``objects/<sha256>``;
docs/FORMAT.md §1). Objects under ``objects/`` are immutable; only ``manifest.json`` is
replaced, with :meth:`Store.put_if`, so that two writers cannot silently overwrite each other.
:func:`open_store` picks the backend from the URL (:mod:`manifest.storage.location`):
:class:`S3Store` (``s3://bucket/prefix``) or :class:`LocalStore` (``file:///path`` or a
directory); an ``http(s)://`` store is read-only and refused.

Every failure is an error of :mod:`manifest.errors`, translated by the tables the agent's face
uses too (docs/ERRORS.md). This face does not retry: botocore already retried S3 calls, so a
retryable condition ends as a plain :class:`~manifest.errors.TransportError` (exit 4). A key
the store lacks is :class:`~manifest.errors.MissingKeyError` (exit 4); callers that know it is
the user's mistake translate it.
"""

from __future__ import annotations

import builtins
import threading
from dataclasses import dataclass
from typing import Protocol

from ._listing import StoredObject
from ._local_store import LocalStore
from ._s3_store import S3Store
from .location import parse_store_url

__all__ = ["LocalStore", "S3Store", "Store", "StoreOptions", "StoredObject", "open_store"]


class Store(Protocol):
    url: str

    def get(self, key: str, max_size: int) -> bytes: ...

    def get_with_etag(self, key: str, max_size: int) -> tuple[bytes, str]: ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int:
        """The object's length in bytes, read without its content (HEAD, ``stat``)."""
        ...

    def put(self, key: str, data: bytes) -> None: ...

    def put_file(self, key: str, path: str, cancel: threading.Event | None = None) -> None:
        """Store the file at ``path`` as ``key``. Once ``cancel`` is set, an upload in
        progress stops at its next block with :class:`~manifest.errors.CancelledError` (an S3
        multipart upload is aborted); a local copy or link finishes."""
        ...

    def put_if(self, key: str, data: bytes, etag: str | None) -> None:
        """Write only if the current ETag is ``etag`` (None: only if the key is absent)."""
        ...

    def list(self, prefix: str) -> list[str]: ...

    def list_objects(self, prefix: str) -> builtins.list[StoredObject]:
        """Like :meth:`list`, with each key's size and last-modified time."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; a key already gone is not an error (S3 ``DeleteObject``)."""
        ...

    def download(self, key: str, dest: str, max_size: int | None = None) -> None:
        """Write the object to ``dest``; more than ``max_size`` bytes stop the transfer with
        :class:`~manifest.errors.OversizeError` (``dest`` then holds at most that much)."""
        ...


@dataclass(frozen=True)
class StoreOptions:
    """What the command line says about the store; the rest comes from the AWS environment."""

    endpoint_url: str | None = None  # S3 endpoint; None: AWS_ENDPOINT_URL(_S3), else AWS
    region: str | None = None  # None: boto3's chain (AWS_REGION, AWS_DEFAULT_REGION, profile)
    multipart_threshold: int = 64 * 1024 * 1024  # S3: larger objects go up in parts
    profile: str | None = None  # None: boto3's chain (AWS_PROFILE, else the default profile)


def open_store(url: str, options: StoreOptions | None = None) -> Store:
    """``s3://bucket/prefix``, ``file:///abs/path`` or a plain directory path."""
    location = parse_store_url(url, for_writing=True)
    if location.kind == "s3":
        return S3Store(location.bucket, location.prefix, options or StoreOptions())
    assert location.path is not None
    return LocalStore(location.path)
