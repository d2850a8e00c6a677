"""The agent's S3 source: ``s3://bucket/prefix`` through boto3, in worker threads.

The client comes from :func:`manifest.storage.s3.make_client` with botocore's retries off: one
try per call, the source's :class:`~manifest.storage.retry.RetryPolicy` decides. Failures go
through :func:`manifest.storage.s3.s3_error`, the table the publisher's face uses too.
The one write (a device report) has its own client whose connect and read timeouts are the
write's deadline: a hung endpoint cannot keep a worker thread (and the process) past it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from ..errors import RetryableError
from ._pace import DEFAULT_LIMITS, TransferLimits
from ._source_base import Body, Sleep, SourceBase
from ._wire import content_range, one_line
from .retry import DEFAULT_RETRY, RetryPolicy
from .s3 import S3Settings, make_client, s3_error, s3_key

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import GetObjectOutputTypeDef

__all__ = ["S3Source"]


class S3Source(SourceBase):
    """``s3://bucket/prefix`` through boto3 (AWS S3, MinIO, Ceph, R2), in worker threads.

    Endpoint, profile and region as for :class:`manifest.storage.store.S3Store`
    (:class:`~manifest.storage.s3.S3Settings`); botocore's own retries are off: ``retry``
    decides. ``limits.timeout`` bounds connecting and each read.
    """

    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str | None = None,
                 profile: str | None = None, region: str | None = None,
                 retry: RetryPolicy = DEFAULT_RETRY, max_rate: float | None = None,
                 limits: TransferLimits = DEFAULT_LIMITS,
                 sleep: Sleep = asyncio.sleep) -> None:
        super().__init__(f"s3://{bucket}/{prefix}".rstrip("/"), retry, max_rate, sleep, limits)
        timeout = limits.timeout
        self.bucket = bucket
        self.prefix = prefix
        settings = S3Settings(endpoint_url=endpoint_url, profile=profile, region=region,
                              botocore_retries=False, connect_timeout=timeout,
                              read_timeout=timeout, max_pool_connections=32).resolve(os.environ)
        self.endpoint = settings.endpoint_name
        self._settings = settings
        self._client = make_client(settings, self.url)
        self._put_client: S3Client | None = None

    async def _put(self, key: str, data: bytes, deadline: float) -> None:
        import botocore.exceptions as bx

        if self._put_client is None:
            settings = dataclasses.replace(self._settings, connect_timeout=deadline,
                                           read_timeout=deadline, max_pool_connections=2)
            self._put_client = make_client(settings, self.url)
        put = functools.partial(self._put_client.put_object, Bucket=self.bucket,
                                Key=s3_key(self.prefix, key), Body=data,
                                ContentType="application/json")
        try:
            await asyncio.to_thread(put)
        except (bx.BotoCoreError, bx.ClientError) as e:
            error = s3_error(e, self._where(key), self.bucket, self.endpoint)
            raise (error or RetryableError(f"PUT {self._where(key)} failed")) from e

    @asynccontextmanager
    async def _open(self, key: str, start: int, etag: str | None) -> AsyncIterator[Body | None]:
        import botocore.exceptions as bx

        where = self._where(key)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": s3_key(self.prefix, key)}
        if start:
            args["Range"] = f"bytes={start}-"
        if etag:
            args["IfNoneMatch"] = etag
        r: GetObjectOutputTypeDef | None = None
        try:
            r = await asyncio.to_thread(functools.partial(self._client.get_object, **args))
        except (bx.BotoCoreError, bx.ClientError) as e:
            error = s3_error(e, where, self.bucket, self.endpoint)
            if error is not None:
                raise error from e
        if r is None:
            yield None  # 304: unchanged
            return
        stream = r["Body"]
        try:
            yield _s3_body(r, where)
        finally:
            stream.close()


def _s3_body(r: GetObjectOutputTypeDef, where: str) -> Body:
    import botocore.exceptions as bx

    stream = r["Body"]
    if r.get("ContentRange"):
        start, total = content_range(r["ContentRange"], where)
    else:
        start, total = 0, r.get("ContentLength")

    async def read(n: int) -> bytes:
        try:
            return await asyncio.to_thread(stream.read, n)
        except (bx.BotoCoreError, OSError) as e:
            raise RetryableError(f"GET {where} broke off: {one_line(e)}") from e

    return Body(start, total, r.get("ETag"), read)
