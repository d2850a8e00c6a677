"""TUF attack classes against ``manifest.trust``: each case names the attack and the exact error.

The documents come from the in-memory repository simulator in ``_signed_docs``; nothing here
does I/O or sleeps ("now" is passed in).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manifest.errors import (
    ExpiredError,
    FormatError,
    HashMismatchError,
    MixAndMatchError,
    OversizeError,
    ReplayError,
    SignatureError,
    UnsafeNameError,
    UntrustedDataError,
)
from manifest.metadata import Root
from manifest.signing import SigningKey
from manifest.trust import (
    MAX_INDEX_SIZE,
    MAX_MANIFEST_SIZE,
    MAX_ROOT_SIZE,
    StreamVerifier,
    sign_document,
    verify_index,
    verify_manifest,
    verify_root,
)

from ._signed_docs import (
    NOW,
    OTHER_REPO_ID,
    REPO_ID,
    Repo,
    envelope,
    group,
    hexof,
    index_doc,
    key,
    open_envelope,
    resign,
    root_doc,
    sha,
    tamper,
)

K1, K2, K3, K4 = key(1), key(2), key(3), key(4)
R1, R2, R3 = key(11), key(12), key(13)
OUTSIDER = key(99)


def raises(exc: type[Exception], *fragments: str) -> Any:
    """pytest.raises for ``exc`` whose message contains every fragment (in order)."""
    return pytest.raises(exc, match=".*".join(re.escape(f) for f in fragments))


def flip_sig(sig: dict[str, str]) -> dict[str, str]:
    raw = bytearray(bytes.fromhex(sig["sig"]))
    raw[5] ^= 0x01
    return {"keyid": sig["keyid"], "sig": raw.hex()}


# --- arbitrary installation: wrong signatures on manifests and indexes -------------------


def _verify_as(kind: str, data: bytes, repo: Repo) -> Any:
    if kind == "manifest":
        return verify_manifest(data, repo.root, now=NOW)
    signed, _ = open_envelope(data)
    return verify_index(data, repo.pointer(data, signed["version"]), repo.root)


def _signed(kind: str, repo: Repo) -> bytes:
    manifest_bytes, index_bytes, _ = repo.publish()
    return manifest_bytes if kind == "manifest" else index_bytes


def _with_sigs(make: Callable[[dict[str, Any], list[Any]], list[Any]]) -> Callable[[bytes], bytes]:
    def apply(data: bytes) -> bytes:
        signed, sigs = open_envelope(data)
        return envelope(signed, make(signed, sigs))

    return apply


OUT_KID = OUTSIDER.keyid[:16]
R1_KID = R1.keyid[:16]

WRONG_SIGNATURES = [
    pytest.param(
        lambda d: resign(d, [OUTSIDER]),
        ("0 valid signature(s) of 1 required", f"signed by key {OUT_KID}", "'release' keys"),
        id="key-not-in-root",
    ),
    pytest.param(
        lambda d: resign(d, [K1]),
        ("0 valid signature(s) of 1", f"signed by key {K1.keyid[:16]}, not one of its 'release'"),
        id="root-role-key-signs-release-doc",
    ),
    pytest.param(
        _with_sigs(lambda s, sigs: [flip_sig(sigs[0])]),
        ("0 valid signature(s) of 1", f"invalid signature by key {R1_KID}"),
        id="signature-bit-flipped",
    ),
    pytest.param(
        _with_sigs(lambda s, sigs: []),
        ("0 valid signature(s) of 1 required from the trust root's 'release' keys",),
        id="no-signatures",
    ),
    pytest.param(
        _with_sigs(lambda s, sigs: [{"keyid": R1.keyid}]),
        ("0 valid signature(s) of 1", f"invalid signature by key {R1_KID}"),
        id="sig-missing",
    ),
    pytest.param(
        _with_sigs(lambda s, sigs: [{"keyid": R1.keyid, "sig": "zz" * 64}]),
        ("0 valid signature(s) of 1", f"invalid signature by key {R1_KID}"),
        id="sig-not-hex",
    ),
    pytest.param(
        _with_sigs(lambda s, sigs: [{"keyid": R1.keyid, "sig": sigs[0]["sig"][:-2]}]),
        ("0 valid signature(s) of 1", f"invalid signature by key {R1_KID}"),
        id="sig-truncated",
    ),
    pytest.param(
        _with_sigs(lambda s, sigs: [{"keyid": R1.keyid, "sig": 12345}]),
        ("0 valid signature(s) of 1", f"invalid signature by key {R1_KID}"),
        id="sig-not-a-string",
    ),
    pytest.param(
        _with_sigs(lambda s, sigs: [{"keyid": R1.keyid, "sig": OUTSIDER.sign(s)["sig"]}]),
        ("0 valid signature(s) of 1", f"invalid signature by key {R1_KID}"),
        id="outsider-sig-under-trusted-keyid",
    ),
    pytest.param(
        _with_sigs(lambda s, sigs: [{"keyid": R1.keyid, "sig": R1.sign({"other": 1})["sig"]}]),
        ("0 valid signature(s) of 1", f"invalid signature by key {R1_KID}"),
        id="trusted-sig-over-other-content",
    ),
]


@pytest.mark.parametrize("kind", ["manifest", "index"])
@pytest.mark.parametrize(("attack", "message"), WRONG_SIGNATURES)
def test_wrong_signatures_are_refused(
    kind: str, attack: Callable[[bytes], bytes], message: tuple[str, ...]
) -> None:
    repo = Repo()
    data = attack(_signed(kind, repo))
    what = "manifest" if kind == "manifest" else "release index"
    with raises(SignatureError, f"{what} has ", *message):
        _verify_as(kind, data, repo)


@pytest.mark.parametrize("kind", ["manifest", "index"])
def test_signed_content_modified_after_signing(kind: str) -> None:
    repo = Repo()

    def edit(signed: dict[str, Any]) -> None:
        if kind == "manifest":
            signed["sequence"] += 100
        else:
            signed["groups"][0]["full"]["sha256"] = hexof("f")

    data = tamper(_signed(kind, repo), edit)
    with raises(SignatureError, "0 valid signature(s) of 1", f"invalid signature by key {R1_KID}"):
        _verify_as(kind, data, repo)


@pytest.mark.parametrize("kind", ["manifest", "index"])
@pytest.mark.parametrize(
    "entry",
    [
        pytest.param("not-an-object", id="string"),
        pytest.param({"sig": "00"}, id="no-keyid"),
        pytest.param({"keyid": 7, "sig": "00"}, id="keyid-not-string"),
    ],
)
def test_malformed_signature_entry(kind: str, entry: Any) -> None:
    repo = Repo()
    data = _with_sigs(lambda s, sigs: [*sigs, entry])(_signed(kind, repo))
    with raises(FormatError, "has a malformed signature entry"):
        _verify_as(kind, data, repo)


@pytest.mark.parametrize("kind", ["manifest", "index"])
def test_genuine_documents_verify(kind: str) -> None:
    repo = Repo()
    data = _signed(kind, repo)
    doc = _verify_as(kind, data, repo)
    assert doc.to_dict() == open_envelope(data)[0]


# --- key compromise below threshold: k-of-n ---------------------------------------------


def _sigs_for(signed: dict[str, Any], spec: str) -> list[Any]:
    """``spec`` like "1,2,2,3!,x": key numbers (1-3 trusted), "!" = corrupted, "x" = outsider."""
    keys = {"1": K1, "2": K2, "3": K3, "x": OUTSIDER}
    out = []
    for part in filter(None, spec.split(",")):
        sig = keys[part.rstrip("!")].sign(signed)
        out.append(flip_sig(sig) if part.endswith("!") else sig)
    return out


THRESHOLD_CASES = [
    pytest.param("1", 1, id="one-of-two-required"),
    pytest.param("1,1", 1, id="same-key-twice-counts-once"),
    pytest.param("1,1,1,1", 1, id="same-key-four-times-counts-once"),
    pytest.param("1,2!", 1, id="second-signature-corrupted"),
    pytest.param("1,x", 1, id="second-signature-from-outsider"),
    pytest.param("x,x", 0, id="only-outsiders"),
    pytest.param("", 0, id="unsigned"),
    pytest.param("1,2", None, id="two-valid"),
    pytest.param("1,3", None, id="two-valid-other-pair"),
    pytest.param("1,2,3", None, id="all-three"),
    pytest.param("1,2!,3", None, id="two-valid-one-corrupted"),
    pytest.param("x,2,1", None, id="two-valid-one-outsider"),
    pytest.param("2,2,3", None, id="duplicate-plus-another"),
]


@pytest.mark.parametrize(("spec", "valid"), THRESHOLD_CASES)
def test_root_two_of_three(spec: str, valid: int | None) -> None:
    root = root_doc([K1, K2, K3], root_threshold=2)
    signed = root.to_dict()
    data = envelope(signed, _sigs_for(signed, spec))
    if valid is None:
        assert verify_root(data, now=NOW) == root
    else:
        with raises(SignatureError, f"trust root has {valid} valid signature(s) of 2 required"):
            verify_root(data, now=NOW)


@pytest.mark.parametrize(("spec", "valid"), THRESHOLD_CASES)
def test_manifest_two_of_three(spec: str, valid: int | None) -> None:
    repo = Repo(release_keys=[K1, K2, K3], release_threshold=2, root_keys=[K4])
    pointer = repo.publish()[2]
    signed = repo.manifest_doc(pointer).to_dict()
    data = envelope(signed, _sigs_for(signed, spec))
    if valid is None:
        assert verify_manifest(data, repo.root, now=NOW).current == pointer
    else:
        with raises(SignatureError, f"manifest has {valid} valid signature(s) of 2 required"):
            verify_manifest(data, repo.root, now=NOW)


def test_threshold_error_names_the_offending_keys() -> None:
    root = root_doc([K1, K2, K3], root_threshold=3)
    signed = root.to_dict()
    data = envelope(signed, _sigs_for(signed, "1,2!,x"))
    with raises(
        SignatureError,
        "1 valid signature(s) of 3",
        f"invalid signature by key {K2.keyid[:16]}",
        f"signed by key {OUTSIDER.keyid[:16]}",
    ):
        verify_root(data, now=NOW)


# --- trust root: self-signature, expiry, keys, rotation ---------------------------------


def _root_edit(edit: Callable[[dict[str, Any]], None], keys: list[SigningKey]) -> bytes:
    signed = root_doc([K1, K2], [R1]).to_dict()
    edit(signed)
    return sign_document(signed, keys)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        for p in parents:
            d = d[p]
        d[last] = value

    return edit


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        for p in parents:
            d = d[p]
        del d[last]

    return edit


BAD_ROOTS = [
    pytest.param(
        _set("roles/release/keyids", [OUTSIDER.keyid]),
        FormatError,
        ("root role 'release' names unknown key", OUTSIDER.keyid),
        id="role-names-unknown-key",
    ),
    pytest.param(
        _set(f"keys/{K1.keyid}/public", K2.public_key.public.hex()),
        FormatError,
        (f"root key {K1.keyid} does not match its key id",),
        id="keyid-not-hash-of-public-key",
    ),
    pytest.param(
        _set(f"keys/{K1.keyid}/public", K1.public_key.public.hex()[:-2]),
        FormatError,
        (f"root key {K1.keyid} does not match its key id",),
        id="public-key-truncated",
    ),
    pytest.param(
        _set(f"keys/{K1.keyid}/public", "not hex"),
        FormatError,
        (f"root key {K1.keyid} is not hex",),
        id="public-key-not-hex",
    ),
    pytest.param(
        _set(f"keys/{K1.keyid}/scheme", "rsa"),
        FormatError,
        (f"root key {K1.keyid} uses an unknown scheme",),
        id="unknown-key-scheme",
    ),
    pytest.param(
        _delete("roles/release"), FormatError, ("root has no 'release' role",), id="no-release-role"
    ),
    pytest.param(
        _delete("roles/root"), FormatError, ("root has no 'root' role",), id="no-root-role"
    ),
    pytest.param(
        _set("roles/root/threshold", 0),
        FormatError,
        ("root.roles.root: threshold 0 is not between 1 and its keys",),
        id="threshold-zero",
    ),
    pytest.param(
        _set("roles/root/threshold", 3),
        FormatError,
        ("root.roles.root: threshold 3 is not between 1 and its keys",),
        id="threshold-above-key-count",
    ),
    pytest.param(
        _set("roles/release", {"keyids": [R1.keyid, R1.keyid], "threshold": 2}),
        FormatError,
        ("root.roles.release: threshold 2 is not between 1 and its keys",),
        id="threshold-met-by-listing-one-key-twice",
    ),
    pytest.param(
        _set("roles/root/keyids", ["ABC"]),
        FormatError,
        ("root.roles.root.keyids[0] is not a key id",),
        id="keyid-not-hex64",
    ),
    pytest.param(
        _set("roles/root/keyids", [K1.keyid + "\n"]),
        FormatError,
        ("root.roles.root.keyids[0] is not a key id",),
        id="keyid-trailing-newline",
    ),
    pytest.param(
        _set("version", -1), FormatError, ("root.version must not be negative",), id="version<0"
    ),
    pytest.param(
        _set("version", True), FormatError, ("root.version has the wrong type",), id="version-bool"
    ),
    pytest.param(
        _set("expires", "2027-01-01"),
        FormatError,
        ("root expires is not a time like 2026-01-31T12:00:00Z: '2027-01-01'",),
        id="expires-not-a-time",
    ),
]


@pytest.mark.parametrize(("edit", "exc", "message"), BAD_ROOTS)
def test_malformed_roots(
    edit: Callable[[dict[str, Any]], None], exc: type[Exception], message: tuple[str, ...]
) -> None:
    with raises(exc, *message):
        verify_root(_root_edit(edit, [K1, K2]), now=NOW)


def test_root_self_signature_threshold() -> None:
    signed = root_doc([K1, K2], root_threshold=2).to_dict()
    with raises(SignatureError, "trust root has 1 valid signature(s) of 2 required", "'root'"):
        verify_root(sign_document(signed, [K1]), now=NOW)
    # Signatures by keys the *release* role trusts do not count for the root role.
    signed = root_doc([K1], [R1]).to_dict()
    with raises(SignatureError, "0 valid signature(s) of 1", f"signed by key {R1_KID}"):
        verify_root(sign_document(signed, [R1]), now=NOW)


@pytest.mark.parametrize(
    ("now", "grace", "ok"),
    [
        pytest.param(NOW + timedelta(days=365), timedelta(0), True, id="at-expiry"),
        pytest.param(NOW + timedelta(days=365, seconds=1), timedelta(0), False, id="1s-after"),
        pytest.param(NOW + timedelta(days=366), timedelta(days=2), True, id="within-grace"),
        pytest.param(NOW + timedelta(days=368), timedelta(days=2), False, id="past-grace"),
    ],
)
def test_root_expiry(now: Any, grace: timedelta, ok: bool) -> None:
    data = sign_document(root_doc([K1]).to_dict(), [K1])
    if ok:
        verify_root(data, now=now, grace=grace)
    else:
        with raises(ExpiredError, "trust root expired at 2027-03-01 12:00:00Z", "device clock"):
            verify_root(data, now=now, grace=grace)


def _rotated(version: int, signers: list[SigningKey], **kw: Any) -> bytes:
    new = root_doc([K3, K4], [R2], version=version, root_threshold=kw.get("threshold", 2))
    return sign_document(new.to_dict(), signers)


TRUSTED = root_doc([K1, K2], [R1], root_threshold=2)

ROTATIONS = [
    pytest.param(2, [K1, K2, K3, K4], None, (), id="old-and-new-threshold"),
    pytest.param(2, [K3, K4, K2, K1], None, (), id="any-signature-order"),
    pytest.param(
        2, [K3, K4], SignatureError,
        ("new trust root (old keys) has 0 valid signature(s) of 2",
         f"signed by key {min(K3.keyid, K4.keyid)[:16]}, not one of its 'root' keys"),
        id="only-new-keys",
    ),
    pytest.param(
        2, [K1, K3, K4], SignatureError,
        ("new trust root (old keys) has 1 valid signature(s) of 2 required",),
        id="old-keys-below-threshold",
    ),
    pytest.param(
        2, [K1, K2], SignatureError,
        ("trust root has 0 valid signature(s) of 2 required",
         f"signed by key {min(K1.keyid, K2.keyid)[:16]}, not one of its 'root' keys"),
        id="only-old-keys",
    ),
    pytest.param(
        2, [K1, K2, K3], SignatureError,
        ("trust root has 1 valid signature(s) of 2 required",),
        id="new-keys-below-threshold",
    ),
    pytest.param(
        3, [K1, K2, K3, K4], ReplayError,
        ("trust root version 3 does not follow trusted 1",),
        id="skips-a-version",
    ),
    pytest.param(
        1, [K1, K2, K3, K4], ReplayError,
        ("trust root version 1 does not follow trusted 1",),
        id="same-version",
    ),
    pytest.param(
        0, [K1, K2, K3, K4], ReplayError,
        ("trust root version 0 does not follow trusted 1",),
        id="older-version",
    ),
]


@pytest.mark.parametrize(("version", "signers", "exc", "message"), ROTATIONS)
def test_root_rotation(
    version: int, signers: list[SigningKey], exc: type[Exception] | None, message: tuple[str, ...]
) -> None:
    data = _rotated(version, signers)
    if exc is None:
        new = verify_root(data, now=NOW, trusted=TRUSTED)
        assert new.version == 2 and set(new.keys) == {K3.keyid, K4.keyid, R2.keyid}
    else:
        with raises(exc, *message):
            verify_root(data, now=NOW, trusted=TRUSTED)


def test_rotated_root_is_then_the_only_trust() -> None:
    new = verify_root(_rotated(2, [K1, K2, K3, K4]), now=NOW, trusted=TRUSTED)
    old_repo, new_repo = Repo(root_keys=[K1, K2], release_keys=[R1]), Repo(release_keys=[R2])
    with raises(SignatureError, f"signed by key {R1_KID}, not one of its 'release' keys"):
        verify_manifest(old_repo.publish()[0], new, now=NOW)
    verify_manifest(new_repo.publish()[0], new, now=NOW)
    # A root signed only by the rotated-out keys cannot follow the new one.
    v3 = sign_document(root_doc([K1, K2], version=3, root_threshold=2).to_dict(), [K1, K2])
    with raises(SignatureError, "new trust root (old keys) has 0 valid signature(s) of 2"):
        verify_root(v3, now=NOW, trusted=new)


# --- rollback / replay and indefinite freeze on the manifest ----------------------------


@pytest.mark.parametrize(
    ("sequence", "min_sequence", "ok"),
    [(7, 8, False), (0, 1, False), (7, 7, True), (8, 7, True), (0, 0, True)],
)
def test_manifest_replay(sequence: int, min_sequence: int, ok: bool) -> None:
    repo = Repo()
    _, _, pointer = repo.publish()
    data = sign_document(repo.manifest_doc(pointer, sequence=sequence).to_dict(), [R1])
    if ok:
        assert verify_manifest(data, repo.root, now=NOW, min_sequence=min_sequence).sequence == (
            sequence
        )
    else:
        with raises(ReplayError, f"manifest sequence {sequence} is older than {min_sequence}"):
            verify_manifest(data, repo.root, now=NOW, min_sequence=min_sequence)


@pytest.mark.parametrize(
    ("after_expiry", "grace", "ok"),
    [
        (timedelta(0), timedelta(0), True),
        (timedelta(seconds=-1), timedelta(0), True),
        (timedelta(seconds=1), timedelta(0), False),
        (timedelta(hours=23), timedelta(days=1), True),
        (timedelta(days=1), timedelta(days=1), True),
        (timedelta(days=1, seconds=1), timedelta(days=1), False),
        (timedelta(days=400), timedelta(days=1), False),
    ],
)
def test_manifest_freeze(after_expiry: timedelta, grace: timedelta, ok: bool) -> None:
    repo = Repo()
    _, _, pointer = repo.publish()
    expires = NOW + timedelta(days=30)
    data = sign_document(repo.manifest_doc(pointer, expires=expires).to_dict(), [R1])
    now = expires + after_expiry
    if ok:
        verify_manifest(data, repo.root, now=now, grace=grace)
    else:
        with raises(ExpiredError, "manifest expired at 2026-03-31 12:00:00Z (now ", "re-sign"):
            verify_manifest(data, repo.root, now=now, grace=grace)


def test_replay_is_checked_only_after_the_signature() -> None:
    repo = Repo()
    data = resign(repo.publish()[0], [OUTSIDER])
    with pytest.raises(SignatureError):
        verify_manifest(data, repo.root, now=NOW, min_sequence=10**9)


# --- endless data ----------------------------------------------------------------------


def _padded(signed: dict[str, Any], keys: list[SigningKey], size: int) -> bytes:
    """A genuinely signed document padded (in an unknown field) to ``size`` bytes or more."""
    signed = {**signed, "padding": ""}
    base = len(sign_document(signed, keys))
    signed["padding"] = "x" * max(0, size - base)
    return sign_document(signed, keys)


def test_oversize_root() -> None:
    data = _padded(root_doc([K1]).to_dict(), [K1], MAX_ROOT_SIZE + 1)
    assert len(data) == MAX_ROOT_SIZE + 1
    with raises(OversizeError, f"trust root is {MAX_ROOT_SIZE + 1} bytes, over its 524288-byte"):
        verify_root(data, now=NOW)
    at_cap = _padded(root_doc([K1]).to_dict(), [K1], MAX_ROOT_SIZE)
    assert len(at_cap) == MAX_ROOT_SIZE
    verify_root(at_cap, now=NOW)


def test_oversize_manifest() -> None:
    repo = Repo()
    signed = repo.manifest_doc(repo.publish()[2]).to_dict()
    data = _padded(signed, [R1], MAX_MANIFEST_SIZE + 1)
    with raises(OversizeError, f"manifest is {MAX_MANIFEST_SIZE + 1} bytes, over its 65536-byte"):
        verify_manifest(data, repo.root, now=NOW)
    verify_manifest(_padded(signed, [R1], MAX_MANIFEST_SIZE), repo.root, now=NOW)


@pytest.mark.parametrize(
    ("what", "cap", "verify"),
    [
        ("trust root", MAX_ROOT_SIZE, lambda d, r: verify_root(d, now=NOW)),
        ("manifest", MAX_MANIFEST_SIZE, lambda d, r: verify_manifest(d, r, now=NOW)),
    ],
)
def test_oversize_is_refused_before_parsing(what: str, cap: int, verify: Any) -> None:
    garbage = b"\xff" * (cap + 1)  # would be a FormatError if anything parsed it
    with raises(OversizeError, f"{what} is {cap + 1} bytes"):
        verify(garbage, Repo().root)
    with raises(FormatError, f"{what} is not valid UTF-8 JSON"):
        verify(garbage[:cap], Repo().root)


def test_oversize_index_before_hashing_or_parsing() -> None:
    repo = Repo()
    data = b"\xff" * (MAX_INDEX_SIZE + 1)
    pointer = repo.pointer(data, "1.0")  # even a manifest that pins it cannot make it acceptable
    with raises(OversizeError, f"release index is {MAX_INDEX_SIZE + 1} bytes, over its cap"):
        verify_index(data, pointer, repo.root)


def _chunks(data: bytes, n: int) -> list[bytes]:
    return [data[i : i + n] for i in range(0, len(data), n)] or [b""]


BLOB = bytes(range(256)) * 4
OTHER = BLOB[:-1] + b"\x00"

STREAMS = [
    pytest.param(BLOB, 7, None, (), id="exact-in-odd-chunks"),
    pytest.param(BLOB, len(BLOB), None, (), id="exact-one-chunk"),
    pytest.param(BLOB + b"x", 7, OversizeError, ("blob is longer than the 1024 bytes",),
                 id="one-byte-too-many"),
    pytest.param(BLOB * 64, 4096, OversizeError, ("blob is longer than the 1024 bytes",),
                 id="endless"),
    pytest.param(BLOB[:-1], 7, HashMismatchError, ("blob has 1023 bytes, the index pins 1024",),
                 id="one-byte-short"),
    pytest.param(b"", 7, HashMismatchError, ("blob has 0 bytes, the index pins 1024",),
                 id="empty"),
    pytest.param(OTHER, 100, HashMismatchError,
                 (f"blob sha256 {sha(OTHER)[:16]}... differs from the pinned "
                  f"{sha(BLOB)[:16]}...", "tampered"),
                 id="same-length-other-content"),
]


@pytest.mark.parametrize(("received", "chunk", "exc", "message"), STREAMS)
def test_stream_verifier(
    received: bytes, chunk: int, exc: type[Exception] | None, message: tuple[str, ...]
) -> None:
    v = StreamVerifier(sha(BLOB), len(BLOB), "blob")
    if exc is OversizeError:
        with raises(OversizeError, *message):
            for c in _chunks(received, chunk):
                v.update(c)
        assert v.received <= len(BLOB) + chunk  # stopped at the first chunk past the pin
        return
    for c in _chunks(received, chunk):
        v.update(c)
    if exc is None:
        v.finish()
    else:
        with raises(exc, *message):
            v.finish()


def test_stream_verifier_empty_object() -> None:
    v = StreamVerifier(sha(b""), 0)
    v.update(b"")
    v.finish()
    with raises(OversizeError, "object is longer than the 0 bytes the index pins"):
        v.update(b"\x00")


# --- mix-and-match ---------------------------------------------------------------------


MIX_MESSAGE = "release index is for version '1.1' but the manifest names '1.0'"


def test_index_of_another_version_under_a_pinned_hash() -> None:
    """A release key signs an index for 1.1 while the manifest names 1.0 (and pins those bytes)."""
    repo = Repo()
    index_bytes = repo.sign_index(index_doc("1.1"))
    pointer = repo.pointer(index_bytes, "1.0")
    with raises(MixAndMatchError, MIX_MESSAGE):
        verify_index(index_bytes, pointer, repo.root)


def test_index_bytes_of_another_release() -> None:
    repo = Repo()
    _, index_a, pointer_a = repo.publish("1.1")
    _, index_b, _ = repo.publish("1.2")
    assert len(index_a) == len(index_b)  # so that only the hash can tell them apart
    with raises(
        HashMismatchError,
        f"release index sha256 {sha(index_b)[:16]}... differs from the manifest's "
        f"{pointer_a.index.sha256[:16]}...",
    ):
        verify_index(index_b, pointer_a, repo.root)


@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_index_length_mismatch(delta: int) -> None:
    repo = Repo()
    _, index_bytes, pointer = repo.publish()
    data = index_bytes[:delta] if delta < 0 else index_bytes + b" " * delta
    with raises(
        HashMismatchError,
        f"release index is {len(data)} bytes, the manifest pins {len(index_bytes)}",
    ):
        verify_index(data, pointer, repo.root)


def test_index_signed_by_outsider_even_when_pinned() -> None:
    """A pinned hash is not a signature: the index itself must carry the release threshold."""
    repo = Repo()
    index_bytes = repo.sign_index(index_doc(), [OUTSIDER])
    with raises(SignatureError, "release index has 0 valid signature(s) of 1"):
        verify_index(index_bytes, repo.pointer(index_bytes, "1.0"), repo.root)


def test_index_with_unsafe_names_is_refused_even_when_signed() -> None:
    """A release key (or a buggy publisher) must not be able to write outside the model dir."""
    repo = Repo()

    def edit(signed: dict[str, Any]) -> None:
        signed["files"][0]["path"] = "../../etc/cron.d/evil"

    index_bytes = resign(tamper(repo.sign_index(index_doc()), edit), [R1])
    with raises(UnsafeNameError, "unsafe file name '../../etc/cron.d/evil'"):
        verify_index(index_bytes, repo.pointer(index_bytes, "1.0"), repo.root)


# --- wrong document type: one signed document presented as another -------------------


def test_root_presented_as_manifest_or_index() -> None:
    """With one key for both roles (what ``init`` does by default) signatures cannot tell."""
    repo = Repo(root_keys=[K1], release_keys=[K1])
    with raises(FormatError, "manifest has _type 'deltaship.root', expected 'deltaship.manifest'"):
        verify_manifest(repo.root_bytes, repo.root, now=NOW)
    pointer = repo.pointer(repo.root_bytes, "1.0")
    with raises(FormatError, "release index has _type 'deltaship.root', expected"):
        verify_index(repo.root_bytes, pointer, repo.root)


def test_manifest_and_index_swapped() -> None:
    repo = Repo(root_keys=[K1], release_keys=[K1])
    manifest_bytes, index_bytes, _ = repo.publish()
    with raises(FormatError, "manifest has _type 'deltaship.release', expected"):
        verify_manifest(index_bytes, repo.root, now=NOW)
    with raises(FormatError, "release index has _type 'deltaship.manifest', expected"):
        verify_index(manifest_bytes, repo.pointer(manifest_bytes, "1.0"), repo.root)
    with raises(FormatError, "root has _type 'deltaship.manifest', expected 'deltaship.root'"):
        verify_root(manifest_bytes, now=NOW)


# --- format: envelopes and values ------------------------------------------------------

ENVELOPES = [
    pytest.param(b"", "is not valid UTF-8 JSON", id="empty"),
    pytest.param(b"not json", "is not valid UTF-8 JSON", id="not-json"),
    pytest.param(b"\xfe\xff{}", "is not valid UTF-8 JSON", id="not-utf8"),
    pytest.param(b'{"signed": {}, "signatures": []', "is not valid UTF-8 JSON", id="truncated"),
    pytest.param(b"[]", "is not a JSON object", id="array"),
    pytest.param(b'"signed"', "is not a JSON object", id="string"),
    pytest.param(b"null", "is not a JSON object", id="null"),
    pytest.param(b'{"signatures": []}', "is not a signed envelope", id="no-signed"),
    pytest.param(b'{"signed": {}}', "is not a signed envelope", id="no-signatures"),
    pytest.param(b'{"signed": [], "signatures": []}', "is not a signed envelope", id="signed-list"),
    pytest.param(b'{"signed": {}, "signatures": {}}', "is not a signed envelope",
                 id="signatures-object"),
    pytest.param(b'{"signed": {"a": NaN}, "signatures": []}', "NaN is not valid JSON", id="NaN"),
    pytest.param(b'{"signed": {"a": Infinity}, "signatures": []}', "Infinity is not valid JSON",
                 id="Infinity"),
    pytest.param(b'{"signed": {"a": -Infinity}, "signatures": []}',
                 "-Infinity is not valid JSON", id="-Infinity"),
    pytest.param(b'{"signed": ' + b"[" * 5000 + b"]" * 5000 + b', "signatures": []}',
                 "is nested too deeply", id="deep-nesting"),
]


@pytest.mark.parametrize(("data", "message"), ENVELOPES)
@pytest.mark.parametrize("kind", ["root", "manifest", "index"])
def test_malformed_envelopes(kind: str, data: bytes, message: str) -> None:
    repo = Repo()
    what = {"root": "trust root", "manifest": "manifest", "index": "release index"}[kind]
    with raises(FormatError, what, message):
        if kind == "root":
            verify_root(data, now=NOW)
        elif kind == "manifest":
            verify_manifest(data, repo.root, now=NOW)
        else:
            verify_index(data, repo.pointer(data, "1.0"), repo.root)


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "literal", "message"),
    [
        pytest.param(1.5, b"1.5", "$.extra: floats are not allowed", id="float"),
        pytest.param([0, 1.0], b"[0,1.0]", "$.extra[1]: floats are not allowed",
                     id="float-in-list"),
        pytest.param({"x": 1e400}, b'{"x":1e400}', "$.extra.x: floats are not allowed",
                     id="overflowing-literal"),
        pytest.param(
            "\ud800", b'"\\ud800"', "not valid Unicode (lone surrogate", id="lone-surrogate"
        ),
        pytest.param(
            _nested(66),
            b"[" * 66 + b"0" + b"]" * 66,
            "nested more than 64 levels deep",
            id="deeper-than-any-signed-document",
        ),
    ],
)
def test_unsignable_values_in_signed_documents(value: Any, literal: bytes, message: str) -> None:
    """The signer refuses them, and a document carrying them fails as a format error."""
    repo = Repo()
    signed = {**repo.manifest_doc(repo.publish()[2]).to_dict(), "extra": value}
    with raises(FormatError, message):
        sign_document(signed, [R1])
    sig = R1.sign({"extra": 0})
    raw = b'{"signatures":[{"keyid":"%s","sig":"%s"}],"signed":{"extra":%s}}' % (
        sig["keyid"].encode(),
        sig["sig"].encode(),
        literal,
    )
    with raises(FormatError, message):
        verify_manifest(raw, repo.root, now=NOW)


def test_unknown_spec_version() -> None:
    repo = Repo()
    _, _, pointer = repo.publish()
    signed = {**repo.manifest_doc(pointer).to_dict(), "spec_version": 3}
    with raises(FormatError, "manifest has spec_version 3; this deltaship understands 2: upgrade"):
        verify_manifest(sign_document(signed, [R1]), repo.root, now=NOW)


def test_every_error_is_untrusted_data() -> None:
    for exc in (SignatureError, HashMismatchError, ReplayError, ExpiredError, OversizeError,
                MixAndMatchError, UnsafeNameError, FormatError):
        assert issubclass(exc, UntrustedDataError)


# --- forward compatibility: unknown fields ----------------------------------------------


@pytest.mark.parametrize("kind", ["root", "manifest", "index"])
def test_unknown_fields_are_kept_and_signed(kind: str) -> None:
    repo = Repo()
    extra = {"x_rollout": {"percent": 10, "cohorts": ["a", "b"]}, "zz_note": "hi"}
    manifest_bytes, index_bytes, _ = repo.publish()
    source = {"root": repo.root_bytes, "manifest": manifest_bytes, "index": index_bytes}[kind]
    signers = [K1] if kind == "root" else [R1]
    data = sign_document({**open_envelope(source)[0], **extra}, signers)

    def verify(d: bytes) -> Any:
        if kind == "root":
            return verify_root(d, now=NOW)
        if kind == "manifest":
            return verify_manifest(d, repo.root, now=NOW)
        return verify_index(d, repo.pointer(d, "1.0"), repo.root)

    doc = verify(data)
    assert dict(doc.unrecognized) == extra
    assert doc.to_dict() == open_envelope(data)[0]
    assert type(doc).from_dict(doc.to_dict()) == doc

    def edit(signed: dict[str, Any]) -> None:
        signed["x_rollout"]["percent"] = 100

    with raises(SignatureError, "0 valid signature(s) of 1", "invalid signature by key"):
        verify(tamper(data, edit))

    def drop(signed: dict[str, Any]) -> None:
        del signed["zz_note"]

    with raises(SignatureError, "0 valid signature(s) of 1", "invalid signature by key"):
        verify(tamper(data, drop))


def test_group_helper_is_valid() -> None:
    assert group("a").file == "a.safetensors"
    assert isinstance(Root.from_dict(root_doc([K1]).to_dict()), Root)


# --- documents are bound to their repository (issue 9, point 1) -------------------------


def test_another_repositorys_manifest_is_refused_naming_both_ids() -> None:
    """Two stores with the same release key: B's manifest is valid everywhere but in A."""
    a, b = Repo(), Repo(repository_id=OTHER_REPO_ID)
    manifest_b, _, _ = b.publish()
    verify_manifest(manifest_b, b.root, now=NOW)
    with raises(MixAndMatchError, f"manifest belongs to repository {OTHER_REPO_ID}",
                f"not to the trusted root's repository {REPO_ID}", "another store"):
        verify_manifest(manifest_b, a.root, now=NOW, min_sequence=0)


def test_another_repositorys_index_is_refused() -> None:
    a, b = Repo(), Repo(repository_id=OTHER_REPO_ID)
    _, index_b, pointer_b = b.publish()
    with raises(MixAndMatchError, f"release index belongs to repository {OTHER_REPO_ID}",
                REPO_ID):
        verify_index(index_b, pointer_b, a.root)


def test_the_repository_is_checked_before_the_sequence() -> None:
    """B's higher sequence is refused as B's, never remembered as a replay bar for A."""
    a, b = Repo(), Repo(repository_id=OTHER_REPO_ID, sequence=40)
    with raises(MixAndMatchError, "belongs to repository"):
        verify_manifest(b.publish()[0], a.root, now=NOW, min_sequence=50)


def test_rotation_keeps_the_repository_id() -> None:
    """A successor root may change every key but not the repository it names."""
    same = root_doc([K3, K4], [R2], version=2, root_threshold=2)
    assert verify_root(sign_document(same.to_dict(), [K1, K2, K3, K4]), now=NOW,
                       trusted=TRUSTED).repository_id == TRUSTED.repository_id
    other = root_doc([K3, K4], [R2], version=2, root_threshold=2, repository_id=OTHER_REPO_ID)
    with raises(MixAndMatchError, f"new trust root belongs to repository {OTHER_REPO_ID}"):
        verify_root(sign_document(other.to_dict(), [K1, K2, K3, K4]), now=NOW, trusted=TRUSTED)


@pytest.mark.parametrize("kind", ["root", "manifest", "index"])
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        pytest.param(lambda d: d.pop("repository_id"), "missing field 'repository_id'",
                     id="missing"),
        pytest.param(lambda d: d.update(repository_id=REPO_ID.upper()),
                     "is not a repository id", id="uppercase"),
        pytest.param(lambda d: d.update(repository_id=7), "has the wrong type", id="int"),
        pytest.param(lambda d: (d.pop("repository_id"), d.update(spec_version=1)),
                     "has spec_version 1, an older format whose documents do not name their "
                     "repository: re-initialise the store", id="older-format"),
    ],
)
def test_a_document_without_a_valid_repository_id(kind: str, edit: Callable[[dict[str, Any]],
                                                  Any], message: str) -> None:
    repo = Repo()
    if kind == "root":
        signed = repo.root.to_dict()
        edit(signed)
        with raises(FormatError, message):
            verify_root(sign_document(signed, repo.root_keys), now=NOW)
        return
    data = _signed(kind, repo)
    signed, _ = open_envelope(data)
    edit(signed)
    with raises(FormatError, message):
        _verify_as(kind, sign_document(signed, repo.release_keys), repo)


# --- the cost of signature junk (issue 9, point 10) -------------------------------------


def _padded_manifest(repo: Repo, signatures: Callable[[dict[str, str]], list[Any]]) -> bytes:
    """A manifest whose body is costly to canonicalise, with the given signature entries."""
    _, _, pointer = repo.publish()
    signed = {**repo.manifest_doc(pointer).to_dict(), "x_padding": [0] * 5000}
    good = R1.sign(signed)
    data = envelope(signed, signatures(good))
    assert len(data) <= MAX_MANIFEST_SIZE
    return data


def _best_time(fn: Callable[[], Any], runs: int = 5) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _outcome(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except SignatureError:
        return "refused"
    return "accepted"


@pytest.mark.parametrize("junk", ["copies of the good signature", "bad signatures first"])
def test_signature_junk_costs_about_one_verification(junk: str) -> None:
    """Hundreds of signature entries by the trusted key id cost about what one does: the body
    is canonicalised once and only the first entry of a key id is checked. (Before, every
    entry re-canonicalised the body: about 240 times the cost of the normal manifest.)"""
    repo = Repo()
    normal = _padded_manifest(repo, lambda g: [g])
    if junk == "copies of the good signature":
        stuffed = _padded_manifest(repo, lambda g: [g] * 240)
    else:
        stuffed = _padded_manifest(
            repo, lambda g: [{"keyid": g["keyid"], "sig": "00" * 64}] * 240 + [g])
    normal_time = _best_time(lambda: verify_manifest(normal, repo.root, now=NOW))
    stuffed_time = _best_time(lambda: _outcome(
        lambda: verify_manifest(stuffed, repo.root, now=NOW)))
    assert stuffed_time < 4 * normal_time, (stuffed_time, normal_time)
    expected = "accepted" if junk.startswith("copies") else "refused"
    assert _outcome(lambda: verify_manifest(stuffed, repo.root, now=NOW)) == expected


def test_only_the_first_signature_of_a_key_id_counts() -> None:
    repo = Repo()
    data = _signed("manifest", repo)
    signed, (good,) = open_envelope(data)
    bad = flip_sig(good)
    verify_manifest(envelope(signed, [good, bad, bad]), repo.root, now=NOW)
    with raises(SignatureError, f"invalid signature by key {R1_KID}"):
        verify_manifest(envelope(signed, [bad, good]), repo.root, now=NOW)
    # Junk of other shapes by the trusted key id is not verified either.
    verify_manifest(envelope(signed, [good, {"keyid": R1.keyid, "sig": "zz" * 5000}]),
                    repo.root, now=NOW)
    with raises(SignatureError, "invalid signature by key"):
        verify_manifest(envelope(signed, [{"keyid": R1.keyid, "sig": "ab" * 10}]), repo.root,
                        now=NOW)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["good-r1", "bad-r1", "good-r2", "bad-r2", "outsider"]),
                max_size=12))
def test_outcome_depends_on_the_first_entry_of_each_key_id(entries: list[str]) -> None:
    """Property: with a 2-of-2 release role, a manifest verifies exactly when the first entry
    of each of the two key ids is a good signature; repeats never change the outcome."""
    repo = Repo(release_keys=[R1, R2], release_threshold=2)
    signed, _ = open_envelope(_signed("manifest", repo))
    sigs = {"good-r1": R1.sign(signed), "good-r2": R2.sign(signed),
            "outsider": OUTSIDER.sign(signed)}
    sigs["bad-r1"], sigs["bad-r2"] = flip_sig(sigs["good-r1"]), flip_sig(sigs["good-r2"])
    data = envelope(signed, [sigs[e] for e in entries])
    first = {}
    for e in entries:
        first.setdefault(e.split("-")[-1], e)
    ok = first.get("r1") == "good-r1" and first.get("r2") == "good-r2"
    assert _outcome(lambda: verify_manifest(data, repo.root, now=NOW)) == (
        "accepted" if ok else "refused")
