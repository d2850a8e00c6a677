"""Where a store is: a store URL parsed once into a :class:`StoreLocation`, and store keys checked.

Store URLs:

* ``s3://BUCKET/PREFIX``: an S3 bucket (AWS S3, MinIO, Ceph, R2); the prefix may be empty.
* ``http(s)://HOST/PREFIX``: plain GETs (a web server, a CDN, a public bucket). Read-only: the
  agent reads such stores, the publisher refuses them (``for_writing=True``).
* ``file:///PATH`` (or ``file://localhost/PATH``), or a plain directory path.

A bad URL is a :class:`~manifest.errors.StoreConfigError` (exit 2). A key is a relative POSIX
path under the prefix (``manifest.json``, ``objects/<sha256>``); :func:`check_key` refuses
absolute keys, ``.``, ``..`` and empty parts for every backend, so that no key leaves the
store. Keys come from :mod:`manifest.constants` and verified documents, so a bad key is a bug
of the caller: ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from ..errors import StoreConfigError

__all__ = ["StoreLocation", "check_key", "check_prefix", "parse_store_url"]

Kind = Literal["s3", "http", "file"]


@dataclass(frozen=True)
class StoreLocation:
    """A parsed store URL. ``url`` is canonical: no trailing slash, ``file://`` + absolute path."""

    kind: Kind
    url: str
    bucket: str = ""  # s3: the bucket
    prefix: str = ""  # s3: the key prefix, without leading or trailing slashes
    path: Path | None = None  # file: the store directory, absolute


def parse_store_url(url: str, *, for_writing: bool = False) -> StoreLocation:
    """Parse ``url``; ``for_writing`` refuses read-only (http) stores."""
    parsed = urlparse(url)
    scheme = parsed.scheme
    if scheme == "s3":
        if not parsed.netloc:
            raise StoreConfigError(f"store URL {url!r} has no bucket: use s3://BUCKET/PREFIX")
        prefix = parsed.path.strip("/")
        return StoreLocation("s3", f"s3://{parsed.netloc}/{prefix}".rstrip("/"),
                             bucket=parsed.netloc, prefix=prefix)
    if scheme in ("http", "https"):
        if for_writing:
            raise StoreConfigError(
                f"store URL {url!r}: http(s) stores are read-only; publish to s3://BUCKET/PREFIX "
                "or a directory, and serve that over HTTP to the devices"
            )
        if not parsed.netloc:
            raise StoreConfigError(f"store URL {url!r} has no host: use https://HOST/PREFIX")
        return StoreLocation("http", url.rstrip("/"))
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StoreConfigError(f"store URL {url!r} names a remote host: use file:///PATH")
        return _directory(parsed.path)
    if len(scheme) <= 1:  # a plain path (or C:\ on Windows)
        return _directory(url)
    https = "" if for_writing else "https://host/prefix, "
    raise StoreConfigError(
        f"unsupported store URL {url!r}: use s3://bucket/prefix, {https}file:///path or a "
        "directory"
    )


def _directory(path: str) -> StoreLocation:
    root = Path(path).absolute()
    return StoreLocation("file", f"file://{root}", path=root)


def check_key(key: str) -> str:
    """``key`` if it is a store key: relative, no ``.``/``..``, no empty parts."""
    if key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
        raise ValueError(f"not a store key: {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """``prefix`` if it is empty or a store key, optionally ending in ``/`` (``objects/``)."""
    if prefix:
        check_key(prefix.removesuffix("/"))
    return prefix
