"""S3 for both faces: one client configuration and one table from botocore errors to ours.

:class:`S3Settings` is everything that shapes the client, as a value; :meth:`S3Settings.resolve`
fills in the endpoint from the environment when a store is opened (never at import):

* endpoint: the explicit option (``--endpoint-url``), else ``AWS_ENDPOINT_URL_S3``, else
  ``AWS_ENDPOINT_URL``, else AWS S3. Path-style addressing whenever an endpoint is set (MinIO,
  Ceph and local servers rarely resolve virtual-host names).
* profile and region: the explicit options, else boto3's own chain (``AWS_PROFILE``,
  ``AWS_REGION``/``AWS_DEFAULT_REGION``, the AWS config files). ``AWS_PROFILE`` is not copied
  into the settings: an explicit ``profile_name`` makes botocore ignore credentials in the
  environment, which ``AWS_PROFILE`` does not.
* retries: the publisher lets botocore retry (standard mode, ``AWS_MAX_ATTEMPTS`` honoured); the
  agent turns botocore's retries off (one try per call) and its
  :class:`~manifest.storage.retry.RetryPolicy` decides.

:func:`make_client` builds the client; a setup failure (an unknown profile, a broken config
file, a malformed endpoint) is one :class:`~manifest.errors.StoreConfigError` line.
:func:`s3_error` is the one translation of a failed call (docs/ERRORS.md has the table).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from ..errors import (
    ConflictError,
    DeltashipError,
    MissingKeyError,
    RangeNotSatisfiableError,
    RetryableError,
    StoreConfigError,
)
from ._wire import one_line, retry_after_seconds

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["S3Settings", "make_client", "s3_error", "s3_key"]


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3. None means "the default": AWS S3, boto3's profile and region chain."""

    endpoint_url: str | None = None
    profile: str | None = None
    region: str | None = None
    botocore_retries: bool = True  # False: one try per call; the caller's RetryPolicy decides
    connect_timeout: float = 10
    read_timeout: float = 60
    max_pool_connections: int = 16

    def resolve(self, environ: Mapping[str, str]) -> S3Settings:
        """These settings with the endpoint taken from ``environ`` when none is given."""
        endpoint = (self.endpoint_url or environ.get("AWS_ENDPOINT_URL_S3")
                    or environ.get("AWS_ENDPOINT_URL") or None)
        return replace(self, endpoint_url=endpoint)

    @property
    def endpoint_name(self) -> str:
        """The endpoint, for messages."""
        return self.endpoint_url or "AWS S3"


def s3_key(prefix: str, key: str) -> str:
    """The S3 object key of store key ``key`` under ``prefix``."""
    return f"{prefix}/{key}" if prefix else key


def make_client(settings: S3Settings, url: str) -> S3Client:
    """A boto3 S3 client for the store at ``url``; a setup failure is a StoreConfigError."""
    import boto3
    import botocore.config
    import botocore.exceptions as bx

    retries: dict[str, object] = {"mode": "standard"}
    if not settings.botocore_retries:
        retries["total_max_attempts"] = 1
    config = botocore.config.Config(
        retries=retries,  # type: ignore[arg-type]
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        s3={"addressing_style": "path" if settings.endpoint_url else "auto"},
        max_pool_connections=settings.max_pool_connections,
    )
    try:
        session = boto3.session.Session(profile_name=settings.profile,
                                        region_name=settings.region)
        return session.client("s3", endpoint_url=settings.endpoint_url, config=config)
    except bx.ProfileNotFound as e:
        profile = e.kwargs.get("profile", settings.profile)
        raise StoreConfigError(f"AWS profile {profile!r} not found in the AWS config files: "
                               "fix AWS_PROFILE or ~/.aws/config") from e
    except (bx.BotoCoreError, ValueError) as e:  # ValueError: botocore's "Invalid endpoint"
        raise StoreConfigError(f"cannot set up S3 for {url}: {one_line(e)}: check the endpoint "
                               "URL and the AWS configuration") from e


Outcome = Literal["unchanged", "no-bucket", "missing", "conflict", "range", "denied", "retry"]

# The S3 error code decides; where it says nothing we know, the HTTP status (0: no answer).
_BY_CODE: dict[str, Outcome] = {
    "304": "unchanged", "NotModified": "unchanged",
    "NoSuchBucket": "no-bucket",
    "NoSuchKey": "missing", "404": "missing", "NotFound": "missing",
    "PreconditionFailed": "conflict", "412": "conflict", "ConditionalRequestConflict": "conflict",
    "InvalidRange": "range",
    "AccessDenied": "denied", "403": "denied", "InvalidAccessKeyId": "denied",
    "SignatureDoesNotMatch": "denied",
    "SlowDown": "retry", "RequestTimeout": "retry",
}
_BY_STATUS: dict[int, Outcome] = {
    304: "unchanged", 404: "missing", 409: "conflict", 412: "conflict", 416: "range",
    403: "denied", 0: "retry", 408: "retry", 429: "retry",
}


def s3_error(e: Exception, where: str, bucket: str, endpoint: str) -> DeltashipError | None:
    """Our error for botocore's ``e`` from a call on ``where``; None for 304 Not Modified.

    Retryable conditions are :class:`RetryableError`: the agent's retry loop retries them, the
    publisher (botocore retried already) ends with :func:`~manifest.storage.retry.give_up`.
    """
    import botocore.exceptions as bx

    if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError):
        return StoreConfigError("no S3 credentials found: set AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    if isinstance(e, bx.ProfileNotFound):
        return StoreConfigError(f"AWS profile not found: {one_line(e)}: fix AWS_PROFILE")
    if isinstance(e, bx.ConnectionError):  # refused, unresolvable, connect timeout, proxy
        return RetryableError(f"cannot reach the store at {endpoint} for {where}: "
                              f"{one_line(e)}")
    if not isinstance(e, bx.ClientError):  # read timeouts, bodies cut short
        return RetryableError(f"S3 request for {where} failed: {one_line(e)}")
    error = e.response.get("Error", {})
    code = str(error.get("Code", ""))
    meta = e.response.get("ResponseMetadata", {})
    status = int(meta.get("HTTPStatusCode", 0))
    outcome = _BY_CODE.get(code) or _BY_STATUS.get(status)
    if outcome is None and status >= 500:
        outcome = "retry"
    said = code or str(status)
    match outcome:
        case "unchanged":
            return None
        case "no-bucket":
            return StoreConfigError(f"bucket {bucket!r} does not exist at {endpoint}: create it "
                                    "or fix the store URL")
        case "missing":
            return MissingKeyError(f"{where} is missing from the store ({said}): the store is "
                                   "incomplete or still being published; retry later")
        case "conflict":
            return ConflictError(f"{where} changed since it was read (another writer went "
                                 "first)")
        case "range":
            return RangeNotSatisfiableError(f"GET {where}: range not satisfiable ({said})")
        case "denied":
            return StoreConfigError(f"access to {where} denied ({said}): check the S3 "
                                    "credentials and the bucket policy")
        case "retry":
            retry_after = retry_after_seconds(meta.get("HTTPHeaders", {}).get("retry-after"))
            return RetryableError(f"S3 request for {where} failed: {said}", retry_after)
    return StoreConfigError(f"S3 refused the request for {where}: {said} "
                            f"{error.get('Message', '')}".rstrip())
