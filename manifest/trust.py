"""Pure verification of signed documents: bytes in, verified objects or a precise error out.

Nothing here does I/O or reads the clock: callers pass the bytes they fetched, what they already
trust, and "now". The agent's update loop decides what to do with each error (retry, fall back,
refuse); this module only says what is wrong. Size caps are checked before anything is parsed.

A document's ``signed`` part is canonicalised once, whatever the number of signatures, and only
the first signature entry of each key id is checked (docs/FORMAT.md §2): a manifest stuffed with
signatures costs no more to refuse than a normal one. Every document must name the
``repository_id`` of the trust root it is verified against (a store's documents are never
accepted by a device of another store that shares its keys).

Roles (docs/FORMAT.md §4): ``root`` signs roots and their successors, ``release`` signs the
manifest (what is current) and release records, ``timestamp`` signs the freshness document that
carries the manifest. A release index is unsigned: what pins its length and SHA-256 (a verified
manifest or release record) vouches for it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .canonical import canonical_json, loads_object
from .constants import DEFAULT_CHANNEL
from .entries import MAX_INDEX_SIZE
from .errors import (
    ExpiredError,
    FormatError,
    HashMismatchError,
    MixAndMatchError,
    OversizeError,
    ReplayError,
    SignatureError,
)
from .metadata import Manifest, ReleaseIndex, ReleasePointer, ReleaseRecord, Root, Timestamp
from .signing import SigningKey

__all__ = [
    "MAX_INDEX_SIZE",
    "MAX_MANIFEST_SIZE",
    "MAX_ROOT_ROTATIONS",
    "MAX_ROOT_SIZE",
    "StreamVerifier",
    "check_expiry",
    "check_threshold",
    "keys_changed",
    "manifest_wire",
    "open_envelope",
    "peek_root_version",
    "sign_document",
    "valid_signers",
    "verify_index",
    "verify_manifest",
    "verify_record",
    "verify_root",
    "verify_successor",
]

MAX_ROOT_SIZE = 512 * 1024
MAX_MANIFEST_SIZE = 64 * 1024
MAX_ROOT_ROTATIONS = 256  # successors a device walks per poll (python-tuf's max_root_rotations)


def sign_document(signed: dict[str, Any], keys: list[SigningKey]) -> bytes:
    """The wire bytes of an envelope holding ``signed`` and one signature per key."""
    envelope = {"signed": signed, "signatures": [k.sign(signed) for k in keys]}
    return canonical_json(envelope)


def manifest_wire(timestamp: dict[str, Any], timestamp_signatures: list[Any],
                  manifest_signatures: list[Any]) -> bytes:
    """The bytes of ``manifest.json``: the timestamp envelope (whose ``signed`` part embeds the
    manifest) with the manifest's own ``release`` signatures beside (docs/FORMAT.md §5)."""
    return canonical_json({"signed": timestamp, "signatures": timestamp_signatures,
                           "manifest_signatures": manifest_signatures})


def open_envelope(data: bytes, what: str, cap: int) -> tuple[dict[str, Any], list[Any]]:
    """The ``signed`` part and the signature entries of an envelope, within ``cap`` bytes."""
    signed, signatures, _ = _open(data, what, cap)
    return signed, signatures


def _open(data: bytes, what: str, cap: int) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    if len(data) > cap:
        raise OversizeError(f"{what} is {len(data)} bytes, over its {cap}-byte cap")
    doc = loads_object(data, what)
    signed, signatures = doc.get("signed"), doc.get("signatures")
    if not isinstance(signed, dict) or not isinstance(signatures, list):
        raise FormatError(f"{what} is not a signed envelope ({{'signed', 'signatures'}})")
    return signed, signatures, doc


def check_threshold(
    root: Root, role_name: str, body: bytes, signatures: list[Any], what: str
) -> set[str]:
    """A threshold of ``role_name``'s keys signed ``body`` (the canonical ``signed`` part);
    returns the key ids whose signatures are valid.

    Only the first entry of each key id is checked: later ones by the same key id are ignored
    (they can neither add a signature nor cost a verification).
    """
    role = root.roles[role_name]
    valid, unknown, bad = _tally(root, role_name, body, signatures, what)
    if len(valid) >= role.threshold:
        return valid
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


def valid_signers(root: Root, role_name: str, body: bytes, signatures: list[Any],
                  what: str) -> set[str]:
    """The key ids of ``role_name`` whose signature of ``body`` verifies (first entry per key id
    only, as :func:`check_threshold` counts them), whether or not they reach the threshold."""
    return _tally(root, role_name, body, signatures, what)[0]


def _tally(
    root: Root, role_name: str, body: bytes, signatures: list[Any], what: str
) -> tuple[set[str], set[str], set[str]]:
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
    return valid, unknown, bad


def _check_repository(repository_id: str, root: Root, what: str) -> None:
    if repository_id != root.repository_id:
        raise MixAndMatchError(
            f"{what} belongs to repository {repository_id}, not to the trusted root's "
            f"repository {root.repository_id}: the store serves another store's documents "
            "(signed with the same key)"
        )


def check_expiry(expires: datetime, now: datetime, grace: timedelta, what: str,
                 fix: str = "the publisher must re-sign it") -> None:
    """``expires`` has not passed (allowing ``grace`` for a bad clock)."""
    if now - grace > expires:  # not expires + grace: that overflows for the year 9999
        raise ExpiredError(
            f"{what} expired at {expires:%Y-%m-%d %H:%M:%S}Z (now {now:%Y-%m-%d %H:%M:%S}Z): "
            f"{fix}, or the device clock is wrong"
        )


def verify_root(
    data: bytes,
    *,
    now: datetime | None,
    trusted: Root | None = None,
    grace: timedelta = timedelta(0),
) -> Root:
    """Verify a trust root: self-signed by a threshold of its ``root`` keys and, unless ``now``
    is None, not expired.

    With ``trusted`` (rotation) it must be that root's successor (:func:`verify_successor`).
    """
    if trusted is not None:
        root = verify_successor(data, trusted)
    else:
        signed, signatures = open_envelope(data, "trust root", MAX_ROOT_SIZE)
        root = Root.from_dict(signed)
        check_threshold(root, "root", canonical_json(signed), signatures, "trust root")
    if now is not None:
        check_expiry(root.expires, now, grace, f"trust root version {root.version}",
                     "the root key holders must sign a new version (`deltaship-publish root`)")
    return root


def verify_successor(data: bytes, trusted: Root) -> Root:
    """Verify ``trusted``'s successor (TUF §5.3.4-5.3.5), whatever its expiry: exactly the next
    version, the same repository, signed by a threshold of the trusted root's ``root`` keys and
    by a threshold of its own."""
    what = f"trust root version {trusted.version + 1}"
    signed, signatures = open_envelope(data, what, MAX_ROOT_SIZE)
    body = canonical_json(signed)
    check_threshold(trusted, "root", body, signatures, f"{what} (the old root's keys)")
    root = Root.from_dict(signed)
    if root.version != trusted.version + 1:
        raise ReplayError(
            f"{what} says it is version {root.version}: refused (a root may only be followed "
            "by the next version)"
        )
    _check_repository(root.repository_id, trusted, what)
    check_threshold(root, "root", body, signatures, f"{what} (its own keys)")
    return root


def keys_changed(old: Root, new: Root, role: str) -> bool:
    """Whether ``role``'s keys or threshold differ between two roots (fast-forward recovery:
    a device then forgets the sequence floors that role's old keys set)."""
    a, b = old.roles[role], new.roles[role]
    return set(a.keyids) != set(b.keyids) or a.threshold != b.threshold


def peek_root_version(data: bytes) -> int:
    """The ``root_version`` a manifest claims, BEFORE it is verified (0 when unreadable).

    Only a hint for which successors to fetch (each is verified on its own); within the
    manifest's size cap, so nothing unbounded is parsed.
    """
    if len(data) > MAX_MANIFEST_SIZE:
        return 0
    try:
        signed = loads_object(data, "manifest").get("signed")
    except FormatError:
        return 0
    v = signed.get("root_version") if isinstance(signed, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def verify_manifest(
    data: bytes,
    root: Root,
    *,
    now: datetime,
    min_sequence: int = 0,
    min_timestamp: int = 0,
    grace: timedelta = timedelta(0),
    channel: str = DEFAULT_CHANNEL,
) -> Timestamp:
    """Verify ``manifest.json`` (docs/FORMAT.md §13, steps 6-9).

    The timestamp: a threshold of the ``timestamp`` role, the root's repository, sequence not
    below ``min_timestamp``, not expired. The manifest it carries: a threshold of the
    ``release`` role (a timestamp key alone can only re-attest content the release keys
    signed), the root's repository and ``channel``, sequence not below ``min_sequence``, not
    expired.
    """
    signed, signatures, doc = _open(data, "manifest", MAX_MANIFEST_SIZE)
    check_threshold(root, "timestamp", canonical_json(signed), signatures, "manifest timestamp")
    inner, inner_sigs = signed.get("manifest"), doc.get("manifest_signatures")
    if not isinstance(inner, dict) or not isinstance(inner_sigs, list):
        if signed.get("_type") == Manifest.TYPE:  # an older format's bare manifest: say so
            Manifest.from_dict(signed)
        raise FormatError("manifest has no signed manifest inside its timestamp "
                          "({'signed': {'manifest'}, 'manifest_signatures'})")
    check_threshold(root, "release", canonical_json(inner), inner_sigs, "manifest")
    ts = Timestamp.from_dict(signed)
    _check_repository(ts.repository_id, root, "manifest timestamp")
    _check_repository(ts.manifest.repository_id, root, "manifest")
    if ts.manifest.channel != channel:
        raise MixAndMatchError(
            f"manifest is for channel {ts.manifest.channel!r}, not {channel!r}: the store "
            "serves another channel's manifest at this channel's key"
        )
    if ts.sequence < min_timestamp:
        raise ReplayError(
            f"manifest timestamp sequence {ts.sequence} is older than {min_timestamp} already "
            "seen: the store is serving an old (replayed) manifest"
        )
    if ts.manifest.sequence < min_sequence:
        raise ReplayError(
            f"manifest sequence {ts.manifest.sequence} is older than {min_sequence} already "
            "seen: the store is serving an old (replayed) manifest"
        )
    check_expiry(ts.manifest.expires, now, grace, "manifest",
                 "the release key holders must re-sign it (`deltaship-publish refresh "
                 "--content`, or a release)")
    check_expiry(ts.expires, now, grace, "manifest timestamp",
                 "the publisher must re-sign it with `deltaship-publish refresh`")
    return ts


def verify_record(data: bytes, root: Root, version: str, what: str) -> ReleaseRecord:
    """Verify a release record (``releases/<version>.json``): ``release``-role threshold, the
    root's repository, and the version its key names (a record copied over another one is
    refused)."""
    signed, signatures = open_envelope(data, what, ReleaseRecord.MAX_SIZE)
    check_threshold(root, "release", canonical_json(signed), signatures, what)
    record = ReleaseRecord.from_dict(signed, what)
    _check_repository(record.repository_id, root, what)
    if record.version != version:
        raise MixAndMatchError(
            f"{what} is signed for version {record.version!r}: the record was copied from "
            "another release; restore or remove it"
        )
    return record


def verify_index(
    data: bytes, pointer: ReleasePointer, root: Root, *, named_by: str = "the manifest"
) -> ReleaseIndex:
    """Verify a release index against the signed pointer that names it (``named_by``, for
    messages): length and sha256 first, then the root's repository and the version."""
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
    index = ReleaseIndex.from_dict(loads_object(data, "release index"))
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
