"""One exception tree for deltaship, arranged by whose fault a failure is.

::

    DeltashipError
    ├── UntrustedDataError        the store (or someone between us and it) sent bad data:
    │   │                         never retried as-is, never written into a live model
    │   ├── SignatureError        bad, unknown-key or below-threshold signatures
    │   ├── HashMismatchError     sha256 or length differs from what a signed document pins
    │   ├── ReplayError           a signed document older than one already seen
    │   ├── ExpiredError          a signed document past its expiry
    │   ├── OversizeError         metadata or an object larger than its cap (endless data)
    │   ├── MixAndMatchError      documents that do not belong together
    │   ├── UnsafeNameError       a group or file name that could escape its directory
    │   └── FormatError           a malformed document or patch container
    ├── TransportError            the store could not be reached, failed, or lacks a key: retry
    │   │                         later (exit 4)
    │   ├── MissingKeyError       the store lacks a key (HTTP 404/410, S3 NoSuchKey, no file)
    │   └── RetryableError        one failed try of a request; the retry loop decides
    │       └── RangeNotSatisfiableError  HTTP 416: restart the download from byte 0
    ├── ConflictError             someone else changed the store first: re-run (exit 5)
    ├── HookError                 a hook or health check failed after a switch (exit 6)
    └── LocalError                bad local input or configuration: the user must act
        ├── ModelError            a missing or malformed model directory / safetensors file
        │   └── SafetensorsError  a safetensors file that breaks the spec
        ├── KeyFileError          a missing, malformed or unusable signing key
        ├── TrustError            keys that the trust root does not accept
        ├── StoreConfigError      bad store URL, missing bucket, missing credentials
        ├── NotFoundError         a release, version or object that does not exist
        ├── AlreadyExistsError    refusing to overwrite (released version, key file, root)
        └── DiskFullError         no space left on the local disk

Third-party exceptions are translated into these at one boundary (the storage layer, the key
loader) with ``raise ... from e``; a full disk or an exceeded quota (ENOSPC, EDQUOT) is
translated by :func:`disk_errors` / :func:`disk_full` only. The command-line layers print
``str(error)`` as one line and exit with :attr:`DeltashipError.exit_code`.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

__all__ = [
    "EXIT_CODES",
    "AlreadyExistsError",
    "ConflictError",
    "DeltashipError",
    "DiskFullError",
    "ExpiredError",
    "FormatError",
    "HashMismatchError",
    "HookError",
    "KeyFileError",
    "LocalError",
    "MissingKeyError",
    "MixAndMatchError",
    "ModelError",
    "NotFoundError",
    "OversizeError",
    "RangeNotSatisfiableError",
    "ReplayError",
    "RetryableError",
    "SafetensorsError",
    "SignatureError",
    "StoreConfigError",
    "TransportError",
    "TrustError",
    "UnsafeNameError",
    "UntrustedDataError",
    "disk_errors",
    "disk_full",
]

# The one table of exit codes: both command lines render it into their --help; README.md and
# docs/ERRORS.md repeat it word for word (tests/test_hardening_config.py compares them).
EXIT_CODES: dict[int, str] = {
    0: "success (the agent: up to date or updated)",
    1: "a bug, or anything unexpected (with a traceback)",
    2: "local input or configuration: the user must act",
    3: "untrusted data from the store: not used",
    4: "transport: the store is unreachable, failing, or lacks a key; retry later",
    5: "conflict: another writer changed the store first, or another agent process holds the "
       "model directory longer than `--wait`; re-run",
    6: "a hook or health check failed; the agent switched back",
    130: "interrupted (Ctrl-C)",
}


class DeltashipError(Exception):
    """Base of every error deltaship raises on purpose."""

    exit_code = 1


class UntrustedDataError(DeltashipError):
    """Data from the store failed verification; it was not used."""

    exit_code = 3


class SignatureError(UntrustedDataError):
    pass


class HashMismatchError(UntrustedDataError):
    pass


class ReplayError(UntrustedDataError):
    pass


class ExpiredError(UntrustedDataError):
    pass


class OversizeError(UntrustedDataError):
    pass


class MixAndMatchError(UntrustedDataError):
    pass


class UnsafeNameError(UntrustedDataError):
    pass


class FormatError(UntrustedDataError):
    pass


class TransportError(DeltashipError):
    """The store is unreachable or failed; the same request may succeed later."""

    exit_code = 4
    retry_after: float | None = None  # seconds the store asked us to wait (HTTP Retry-After)


class MissingKeyError(TransportError):
    """The store lacks a key (HTTP 404/410, S3 NoSuchKey, no such file).

    The storage layer raises this for every missing key, on both sides. A key that a signed
    document names but the store lacks is the store's fault (a release still being uploaded, a
    CDN not yet filled, a broken mirror): it may heal, so "retry later", exit 4. Callers that
    know a missing key is the user's mistake (``revert --to`` a version never released, a store
    never initialised) translate it into :class:`NotFoundError` or :class:`StoreConfigError`.
    """


class RetryableError(TransportError):
    """One failed try of a request; the retry loop decides whether to try again."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RangeNotSatisfiableError(RetryableError):
    """HTTP 416: the partial file is not shorter than the object. Start again from zero."""


class ConflictError(DeltashipError):
    """The store changed under us (a concurrent release); re-run to build on the new state."""

    exit_code = 5


class HookError(DeltashipError):
    """A notification hook or the health check failed: the new version is not healthy."""

    exit_code = 6


class LocalError(DeltashipError):
    """Local input or configuration is wrong; the user must act."""

    exit_code = 2


class ModelError(LocalError):
    pass


class SafetensorsError(ModelError):
    """A safetensors file breaks the format; the message names the file and the problem."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: not a valid safetensors file: {problem}")
        self.path = path
        self.problem = problem


class KeyFileError(LocalError):
    pass


class TrustError(LocalError):
    pass


class StoreConfigError(LocalError):
    pass


class NotFoundError(LocalError):
    pass


class AlreadyExistsError(LocalError):
    pass


class DiskFullError(LocalError):
    pass


class CancelledError(DeltashipError):
    """An operation stopped because its caller asked it to (Ctrl-C, or another part of the
    same command failed): the caller reports why, this error is never the news."""


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(e: OSError, where: str | os.PathLike[str]) -> DiskFullError | None:
    """The :class:`DiskFullError` for a full disk or exceeded quota, else None."""
    if e.errno not in _DISK_FULL:
        return None
    what = "quota exceeded" if e.errno == errno.EDQUOT else "no space left"
    return DiskFullError(f"{what} on the disk holding {os.fspath(where)}: free some space, "
                         "then retry")


@contextlib.contextmanager
def disk_errors(where: str | os.PathLike[str]) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT raised inside into :class:`DiskFullError` naming ``where``."""
    try:
        yield
    except OSError as e:
        full = disk_full(e, where)
        if full is None:
            raise
        raise full from e
