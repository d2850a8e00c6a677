"""Pure verification of signed documents: bytes in, verified objects or a precise error out.

Nothing here does I/O or reads the clock: callers pass the bytes they fetched, what they already
trust, and "now". The agent's update loop decides what to do with each error (retry, fall back,
refuse); this module only says what is wrong. Size caps are checked before anything is parsed.

A document's ``signed`` part is canonicalised once, whatever the number of signatures, and only
the first signature entry of each key id is checked (docs/FORMAT.md §2): a manifest stuffed with
signatures costs no more to refuse than a normal one. Every manifest and release index must name
the ``repository_id`` of the trust root it is verified against (a store's documents are never
accepted by a device of another store that shares its keys).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .canonical import canonical_json, loads_object
from .errors import (
    ExpiredError,
    FormatError,
    HashMismatchError,
    MixAndMatchError,
    OversizeError,
    ReplayError,
    SignatureError,
)
from .metadata import Manifest, ReleaseIndex, ReleasePointer, Root
from .signing import SigningKey

__all__ = [
    "MAX_INDEX_SIZE",
    "MAX_MANIFEST_SIZE",
    "MAX_ROOT_SIZE",
    "StreamVerifier",
    "sign_document",
    "verify_index",
    "verify_manifest",
    "verify_root",
]

MAX_ROOT_SIZE = 512 * 1024
MAX_MANIFEST_SIZE = 64 * 1024
MAX_INDEX_SIZE = 16 * 1024 * 1024


def sign_document(signed: dict[str, Any], keys: list[SigningKey]) -> bytes:
    """The wire bytes of an envelope holding ``signed`` and one signature per key."""
    envelope = {"signed": signed, "signatures": [k.sign(signed) for k in keys]}
    return canonical_json(envelope)


def _open_envelope(data: bytes, what: str, cap: int) -> tuple[dict[str, Any], list[Any]]:
    if len(data) > cap:
        raise OversizeError(f"{what} is {len(data)} bytes, over its {cap}-byte cap")
    doc = loads_object(data, what)
    signed, signatures = doc.get("signed"), doc.get("signatures")
    if not isinstance(signed, dict) or not isinstance(signatures, list):
        raise FormatError(f"{what} is not a signed envelope ({{'signed', 'signatures'}})")
    return signed, signatures


def _check_threshold(
    root: Root, role_name: str, body: bytes, signatures: list[Any], what: str
) -> None:
    """A threshold of ``role_name``'s keys signed ``body`` (the canonical ``signed`` part).

    Only the first entry of each key id is checked: later ones by the same key id are ignored
    (they can neither add a signature nor cost a verification).
    """
    role = root.roles[role_name]
    valid: set[str] = set()
    unknown: set[str] = set()
    bad: set[str] = set()
    seen: set[str] = set()
    for s in signatures:
        if not isinstance(s, dict) or not isinstance(s.get("keyid"), str):
            raise FormatError(f"{what} has a malformed signature entry")
        kid, sig = s["keyid"], s.get("sig")
        if kid in seen:
            continue
        seen.add(kid)
        if kid not in role.keyids:
            unknown.add(kid)
        elif isinstance(sig, str) and root.keys[kid].verify_bytes(body, sig):
            valid.add(kid)
        else:
            bad.add(kid)
    if len(valid) >= role.threshold:
        return
    detail = []
    if bad:
        detail.append(f"invalid signature by key {sorted(bad)[0][:16]}")
    if unknown:
        detail.append(f"signed by key {sorted(unknown)[0][:16]}, not one of its {role_name!r} keys")
    reason = f" ({'; '.join(detail)})" if detail else ""
    raise SignatureError(
        f"{what} has {len(valid)} valid signature(s) of {role.threshold} required "
        f"from the trust root's {role_name!r} keys{reason}"
    )


def _check_repository(repository_id: str, root: Root, what: str) -> None:
    if repository_id != root.repository_id:
        raise MixAndMatchError(
            f"{what} belongs to repository {repository_id}, not to the trusted root's "
            f"repository {root.repository_id}: the store serves another store's documents "
            "(signed with the same key)"
        )


def _check_expiry(expires: datetime, now: datetime, grace: timedelta, what: str) -> None:
    if now - grace > expires:  # not expires + grace: that overflows for the year 9999
        raise ExpiredError(
            f"{what} expired at {expires:%Y-%m-%d %H:%M:%S}Z (now {now:%Y-%m-%d %H:%M:%S}Z): "
            "the publisher must re-sign it, or the device clock is wrong"
        )


def verify_root(
    data: bytes,
    *,
    now: datetime,
    trusted: Root | None = None,
    grace: timedelta = timedelta(0),
) -> Root:
    """Verify a trust root: self-signed by a threshold of its ``root`` keys, not expired.

    With ``trusted`` (rotation), it must also carry a threshold of the trusted root's keys and
    have exactly the next version.
    """
    signed, signatures = _open_envelope(data, "trust root", MAX_ROOT_SIZE)
    root = Root.from_dict(signed)
    body = canonical_json(signed)
    if trusted is not None:
        _check_threshold(trusted, "root", body, signatures, "new trust root (old keys)")
        if root.version != trusted.version + 1:
            raise ReplayError(
                f"trust root version {root.version} does not follow trusted {trusted.version}"
            )
        _check_repository(root.repository_id, trusted, "new trust root")
    _check_threshold(root, "root", body, signatures, "trust root")
    _check_expiry(root.expires, now, grace, "trust root")
    return root


def verify_manifest(
    data: bytes,
    root: Root,
    *,
    now: datetime,
    min_sequence: int = 0,
    grace: timedelta = timedelta(0),
) -> Manifest:
    """Verify the manifest: release-role threshold, the root's repository, sequence not below
    ``min_sequence``, expiry."""
    signed, signatures = _open_envelope(data, "manifest", MAX_MANIFEST_SIZE)
    _check_threshold(root, "release", canonical_json(signed), signatures, "manifest")
    manifest = Manifest.from_dict(signed)
    _check_repository(manifest.repository_id, root, "manifest")
    if manifest.sequence < min_sequence:
        raise ReplayError(
            f"manifest sequence {manifest.sequence} is older than {min_sequence} already seen: "
            "the store is serving an old (replayed) manifest"
        )
    _check_expiry(manifest.expires, now, grace, "manifest")
    return manifest


def verify_index(
    data: bytes, pointer: ReleasePointer, root: Root, *, named_by: str = "the manifest"
) -> ReleaseIndex:
    """Verify a release index against the pointer that names it (``named_by``, for messages):
    length, sha256, signature, the root's repository, version."""
    if len(data) > MAX_INDEX_SIZE:
        raise OversizeError(f"release index is {len(data)} bytes, over its cap {MAX_INDEX_SIZE}")
    if len(data) != pointer.index.length:
        raise HashMismatchError(
            f"release index is {len(data)} bytes, {named_by} pins {pointer.index.length}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != pointer.index.sha256:
        raise HashMismatchError(
            f"release index sha256 {digest[:16]}... differs from {named_by}'s "
            f"{pointer.index.sha256[:16]}..."
        )
    signed, signatures = _open_envelope(data, "release index", MAX_INDEX_SIZE)
    _check_threshold(root, "release", canonical_json(signed), signatures, "release index")
    index = ReleaseIndex.from_dict(signed)
    _check_repository(index.repository_id, root, "release index")
    if index.version != pointer.version:
        raise MixAndMatchError(
            f"release index is for version {index.version!r} but {named_by} names "
            f"{pointer.version!r}"
        )
    return index


@dataclass
class StreamVerifier:
    """Checks an object's length and sha256 while it streams, before anything parses it."""

    expected_sha256: str
    expected_length: int
    what: str = "object"

    def __post_init__(self) -> None:
        self._hash = hashlib.sha256()
        self.received = 0

    def update(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.expected_length:
            raise OversizeError(
                f"{self.what} is longer than the {self.expected_length} bytes the index pins"
            )
        self._hash.update(chunk)

    def finish(self) -> None:
        if self.received != self.expected_length:
            raise HashMismatchError(
                f"{self.what} has {self.received} bytes, the index pins {self.expected_length}"
            )
        digest = self._hash.hexdigest()
        if digest != self.expected_sha256:
            raise HashMismatchError(
                f"{self.what} sha256 {digest[:16]}... differs from the pinned "
                f"{self.expected_sha256[:16]}...: it was corrupted or tampered with"
            )
