"""The storage seam: one small interface, a local-directory and an S3 implementation.

Keys are relative POSIX paths under the store's prefix (``manifest.json``, ``objects/<sha256>``).
Objects under ``objects/`` are immutable; only ``manifest.json`` is replaced, with
:meth:`Store.put_if` so that two writers cannot silently overwrite each other. Every
third-party exception is translated here into the tree of :mod:`manifest.errors`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from .errors import (
    ConflictError,
    MissingKeyError,
    OversizeError,
    StoreConfigError,
    TransportError,
)
from .storage.atomic import atomic_output, write_atomic

__all__ = ["LocalStore", "S3Store", "Store", "StoreOptions", "open_store"]


class Store(Protocol):
    url: str

    def get(self, key: str, max_size: int) -> bytes: ...

    def get_with_etag(self, key: str, max_size: int) -> tuple[bytes, str]: ...

    def exists(self, key: str) -> bool: ...

    def put(self, key: str, data: bytes) -> None: ...

    def put_file(self, key: str, path: str) -> None: ...

    def put_if(self, key: str, data: bytes, etag: str | None) -> None:
        """Write only if the current ETag is ``etag`` (None: only if the key is absent)."""
        ...

    def list(self, prefix: str) -> list[str]: ...

    def download(self, key: str, dest: str) -> None: ...


@dataclass(frozen=True)
class StoreOptions:
    endpoint_url: str | None = None
    region: str | None = None
    multipart_threshold: int = 64 * 1024 * 1024  # S3: larger objects go up in parts


def open_store(url: str, options: StoreOptions | None = None) -> Store:
    """``s3://bucket/prefix``, ``file:///abs/path`` or a plain directory path."""
    options = options or StoreOptions()
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreConfigError(f"store URL {url!r} has no bucket: use s3://BUCKET/PREFIX")
        return S3Store(parsed.netloc, parsed.path.strip("/"), options)
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme in ("", None) or len(parsed.scheme) == 1:  # plain path (or C:\ on Windows)
        return LocalStore(url)
    raise StoreConfigError(
        f"unsupported store URL {url!r}: use s3://bucket/prefix, file:///path or a directory"
    )


class LocalStore:
    """A directory with the store layout; the embedded default and the simplest mirror."""

    def __init__(self, root: str) -> None:
        self.root = Path(root).absolute()
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / key

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise StoreConfigError(
                f"store directory {self.root} does not exist: create it or fix --store"
            )

    def get(self, key: str, max_size: int) -> bytes:
        return self.get_with_etag(key, max_size)[0]

    def get_with_etag(self, key: str, max_size: int) -> tuple[bytes, str]:
        self._require_root()
        try:
            with open(self._path(key), "rb") as f:
                data = f.read(max_size + 1)
        except FileNotFoundError as e:
            raise MissingKeyError(f"{self.url}/{key} is missing from the store") from e
        if len(data) > max_size:
            raise OversizeError(f"{self.url}/{key} is larger than its {max_size}-byte cap")
        return data, hashlib.sha256(data).hexdigest()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def put(self, key: str, data: bytes) -> None:
        self._require_root()
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(p, data)

    def put_file(self, key: str, path: str) -> None:
        self._require_root()
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(p) as out, open(path, "rb") as src:
            while block := src.read(1 << 22):
                out.write(block)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def put_if(self, key: str, data: bytes, etag: str | None) -> None:
        self._require_root()
        with self._lock():
            try:
                current: str | None = hashlib.sha256(self._path(key).read_bytes()).hexdigest()
            except FileNotFoundError:
                current = None
            if current != etag:
                raise ConflictError(
                    f"{self.url}/{key} changed since it was read (another writer went first)"
                )
            self.put(key, data)

    def list(self, prefix: str) -> list[str]:
        self._require_root()
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root))
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )

    def download(self, key: str, dest: str) -> None:
        try:
            with open(self._path(key), "rb") as src, open(dest, "wb") as out:
                while block := src.read(1 << 22):
                    out.write(block)
        except FileNotFoundError as e:
            raise MissingKeyError(f"{self.url}/{key} is missing from the store") from e


class S3Store:
    """``s3://bucket/prefix`` through boto3 (AWS S3, MinIO, Ceph, R2)."""

    def __init__(self, bucket: str, prefix: str, options: StoreOptions) -> None:
        import boto3
        import botocore.config

        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}".rstrip("/")
        endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL"
        )
        self.endpoint = endpoint or "AWS S3"
        self.multipart_threshold = options.multipart_threshold
        config = botocore.config.Config(
            retries={"mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            s3={"addressing_style": "path" if endpoint else "auto"},
            max_pool_connections=16,
        )
        session = boto3.session.Session()
        self._client = session.client(
            "s3", endpoint_url=endpoint, region_name=options.region, config=config
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        import botocore.exceptions as bx

        where = f"{self.url}/{key}"
        try:
            yield
        except bx.NoCredentialsError as e:
            raise StoreConfigError(
                "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE)"
            ) from e
        except (bx.EndpointConnectionError, bx.ConnectionError, bx.ConnectTimeoutError) as e:
            raise TransportError(
                f"cannot reach the store at {self.endpoint}: {e}; check --endpoint-url and "
                "the network, then retry"
            ) from e
        except bx.ClientError as e:
            raise self._translate(e, where) from e
        except bx.BotoCoreError as e:
            raise TransportError(f"S3 request for {where} failed: {e}") from e

    def _translate(self, e: Any, where: str) -> Exception:
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code == "NoSuchBucket":
            return StoreConfigError(
                f"bucket {self.bucket!r} does not exist at {self.endpoint}: "
                "create it or fix --store"
            )
        if code in ("NoSuchKey", "404", "NotFound"):
            return MissingKeyError(f"{where} is missing from the store")
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict") or status in (
            409, 412,
        ):
            return ConflictError(f"{where} changed since it was read (another writer went first)")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") or (
            status == 403
        ):
            return StoreConfigError(
                f"access to {where} denied ({code}): check the S3 credentials and bucket policy"
            )
        if status >= 500 or status == 0:
            return TransportError(f"the store failed for {where} ({code or status}): retry later")
        message = err.get("Message", "")
        return StoreConfigError(f"S3 refused the request for {where}: {code} {message}")

    def get(self, key: str, max_size: int) -> bytes:
        return self.get_with_etag(key, max_size)[0]

    def get_with_etag(self, key: str, max_size: int) -> tuple[bytes, str]:
        with self._errors(key):
            r = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            if r.get("ContentLength", 0) > max_size:
                r["Body"].close()
                raise OversizeError(f"{self.url}/{key} is larger than its {max_size}-byte cap")
            data = r["Body"].read(max_size + 1)
            if len(data) > max_size:
                raise OversizeError(f"{self.url}/{key} is larger than its {max_size}-byte cap")
            return data, str(r["ETag"])

    def exists(self, key: str) -> bool:
        try:
            with self._errors(key):
                self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except MissingKeyError:
            return False
        return True

    def put(self, key: str, data: bytes) -> None:
        with self._errors(key):
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, path: str) -> None:
        from boto3.s3.transfer import TransferConfig

        # Parts in flight are held in memory: 2 x 8 MiB per upload keeps the publisher small.
        cfg = TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=max(5 * 1024 * 1024, min(8 * 1024 * 1024,
                                                         self.multipart_threshold // 4)),
            max_concurrency=2,
        )
        with self._errors(key):
            try:
                self._client.upload_file(path, self.bucket, self._key(key), Config=cfg)
            except Exception as e:  # boto3's S3UploadFailedError wraps the ClientError
                cause = e.__cause__ or e.__context__
                import botocore.exceptions as bx

                if isinstance(cause, bx.ClientError | bx.BotoCoreError):
                    raise cause from e
                raise

    def put_if(self, key: str, data: bytes, etag: str | None) -> None:
        with self._errors(key):
            if etag is None:
                self._client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*"
                )
            else:
                self._client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=data, IfMatch=etag
                )

    def list(self, prefix: str) -> list[str]:
        out: list[str] = []
        strip = len(self._key(""))
        with self._errors(prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix)
            )
            for page in pages:
                out.extend(o["Key"][strip:] for o in page.get("Contents", []))
        return sorted(out)

    def download(self, key: str, dest: str) -> None:
        with self._errors(key):
            self._client.download_file(self.bucket, self._key(key), dest)
