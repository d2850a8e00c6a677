"""The publisher's S3 store: ``s3://bucket/prefix`` through boto3 (AWS S3, MinIO, Ceph, R2).

The client comes from :func:`manifest.storage.s3.make_client` with botocore's standard
retries; failures go through :func:`manifest.storage.s3.s3_error`, and what is retryable there
ends here as a plain :class:`~manifest.errors.TransportError` (botocore retried already).
``manifest.json`` is replaced with conditional PUTs (``If-Match`` / ``If-None-Match: *``).
"""

from __future__ import annotations

import builtins
import contextlib
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..errors import (
    CancelledError,
    MissingKeyError,
    OversizeError,
    RetryableError,
    TransportError,
)
from ._listing import StoredObject
from .location import check_key, check_prefix
from .retry import give_up
from .s3 import S3Settings, make_client, s3_error, s3_key

if TYPE_CHECKING:
    from .store import StoreOptions

__all__ = ["S3Store"]

MiB = 1024 * 1024


class S3Store:
    """``s3://bucket/prefix`` through boto3 (AWS S3, MinIO, Ceph, R2)."""

    def __init__(self, bucket: str, prefix: str, options: StoreOptions) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}".rstrip("/")
        settings = S3Settings(endpoint_url=options.endpoint_url, profile=options.profile,
                              region=options.region).resolve(os.environ)
        self.endpoint = settings.endpoint_name
        self.multipart_threshold = options.multipart_threshold
        self._client = make_client(settings, self.url)
        self._client.meta.events.register_first("needs-retry.s3", _no_retry_once_cancelled)

    def _key(self, key: str) -> str:
        return s3_key(self.prefix, check_key(key))

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        import botocore.exceptions as bx

        where = f"{self.url}/{key}"
        try:
            yield
        except (bx.BotoCoreError, bx.ClientError) as e:
            error = s3_error(e, where, self.bucket, self.endpoint)
            if error is None:  # no request of this face is conditional on an ETag
                error = TransportError(f"S3 answered 304 Not Modified for {where}")
            elif isinstance(error, RetryableError):
                error = give_up(error)
            raise error from e

    def get(self, key: str, max_size: int) -> bytes:
        return self.get_with_etag(key, max_size)[0]

    def get_with_etag(self, key: str, max_size: int) -> tuple[bytes, str]:
        with self._errors(key):
            r = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            with contextlib.closing(r["Body"]) as body:
                if r.get("ContentLength", 0) > max_size:
                    raise OversizeError(f"{self.url}/{key} is larger than its {max_size}-byte "
                                        "cap")
                data = body.read(max_size + 1)
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

    def size(self, key: str) -> int:
        with self._errors(key):
            r = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        return int(r["ContentLength"])

    def put(self, key: str, data: bytes) -> None:
        with self._errors(key):
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, path: str, cancel: threading.Event | None = None) -> None:
        import botocore.exceptions as bx
        from boto3.s3.transfer import TransferConfig

        def sent(_n: int) -> None:  # called as the body is read to be sent
            if cancel is not None and cancel.is_set():
                raise CancelledError(f"upload of {key} stopped")

        # Parts in flight are held in memory: 2 x 8 MiB per upload keeps the publisher small.
        cfg = TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=max(5 * MiB, min(8 * MiB, self.multipart_threshold // 4)),
            max_concurrency=2,
        )
        with self._errors(key):
            try:
                self._client.upload_file(path, self.bucket, self._key(key), Config=cfg,
                                         Callback=sent if cancel is not None else None)
            except Exception as e:  # boto3's S3UploadFailedError wraps the ClientError
                if cancel is not None and cancel.is_set():  # botocore wraps ours: unwrapped
                    raise CancelledError(f"upload of {key} stopped") from e
                cause = e.__cause__ or e.__context__
                if isinstance(cause, bx.ClientError | bx.BotoCoreError):
                    raise cause from e
                raise

    def put_if(self, key: str, data: bytes, etag: str | None) -> None:
        with self._errors(key):
            if etag is None:
                self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                        IfNoneMatch="*")
            else:
                self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                        IfMatch=etag)

    def list(self, prefix: str) -> list[str]:
        return [o.key for o in self.list_objects(prefix)]

    def list_objects(self, prefix: str) -> builtins.list[StoredObject]:
        out: builtins.list[StoredObject] = []
        strip = len(s3_key(self.prefix, ""))
        with self._errors(prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=s3_key(self.prefix, check_prefix(prefix))
            )
            for page in pages:
                out.extend(StoredObject(o["Key"][strip:], int(o["Size"]), o["LastModified"])
                           for o in page.get("Contents", []))
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        with self._errors(key):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def download(self, key: str, dest: str, max_size: int | None = None) -> None:
        received = 0

        def count(n: int) -> None:  # an exception here stops the transfer and is re-raised
            nonlocal received
            received += n
            if max_size is not None and received > max_size:
                raise OversizeError(f"{self.url}/{key} is larger than its {max_size}-byte cap")

        with self._errors(key):
            self._client.download_file(self.bucket, self._key(key), dest,
                                       Callback=None if max_size is None else count)


def _no_retry_once_cancelled(caught_exception: BaseException | None = None,
                             **_: object) -> None:
    """botocore's ``needs-retry`` hook: a request that failed because its upload was cancelled
    (``put_file``'s callback raised, and botocore wrapped that in HTTPClientError, which its
    standard mode retries with backoff) ends now, with the CancelledError."""
    error = getattr(caught_exception, "kwargs", {}).get("error")
    if isinstance(error, CancelledError):
        raise error
