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
    ├── TransportError            the store could not be reached or failed: retry later
    ├── ConflictError             someone else changed the store first: re-run
    └── LocalError                bad local input or configuration: the user must act
        ├── ModelError            a missing or malformed model directory / safetensors file
        │   └── SafetensorsError  a safetensors file that breaks the spec
        ├── KeyFileError          a missing, malformed or unusable signing key
        ├── TrustError            keys that the trust root does not accept
        ├── StoreConfigError      bad store URL, missing bucket, missing credentials
        ├── NotFoundError         a release, version or object that does not exist
        ├── AlreadyExistsError    refusing to overwrite (released version, key file, root)
        └── DiskFullError         no space left on the local disk

Third-party exceptions are translated into these at one boundary (the store adapters, the key
loader) with ``raise ... from e``; the command-line layers print ``str(error)`` as one line and
exit with :attr:`DeltashipError.exit_code`.
"""

from __future__ import annotations

__all__ = [
    "AlreadyExistsError",
    "ConflictError",
    "DeltashipError",
    "DiskFullError",
    "ExpiredError",
    "FormatError",
    "HashMismatchError",
    "KeyFileError",
    "LocalError",
    "MixAndMatchError",
    "ModelError",
    "NotFoundError",
    "OversizeError",
    "ReplayError",
    "SafetensorsError",
    "SignatureError",
    "StoreConfigError",
    "TransportError",
    "TrustError",
    "UnsafeNameError",
    "UntrustedDataError",
]


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


class ConflictError(DeltashipError):
    """The store changed under us (a concurrent release); re-run to build on the new state."""

    exit_code = 5


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
