"""TUF attack classes against ``manifest.trust``: each case names the attack and the exact error.

The documents come from the in-memory repository simulator in ``_signed_docs``; nothing here
does I/O or sleeps ("now" is passed in). ``manifest.json`` carries two layers of signatures
(docs/FORMAT.md §5): the timestamp role's over the timestamp (which embeds the manifest), and the
release role's over the manifest itself; the cases attack each layer. Release indexes are
unsigned: the sha256 and length a verified manifest pins are their only authentication.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manifest import trust
from manifest.canonical import canonical_json
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
from manifest.signing import PublicKey, SigningKey
from manifest.trust import (
    MAX_INDEX_SIZE,
    MAX_MANIFEST_SIZE,
    MAX_ROOT_SIZE,
    StreamVerifier,
    keys_changed,
    manifest_wire,
    peek_root_version,
    sign_document,
    verify_index,
    verify_manifest,
    verify_root,
    verify_successor,
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
    manifest_bytes,
    open_envelope,
    root_doc,
    sha,
    tamper,
)

K1, K2, K3, K4 = key(1), key(2), key(3), key(4)
R1, R2, R3 = key(11), key(12), key(13)
T1 = key(21)  # the timestamp key
OUTSIDER = key(99)
LAYERS = ["timestamp", "manifest"]  # the two signed layers of manifest.json


def raises(exc: type[Exception], *fragments: str) -> Any:
    """pytest.raises for ``exc`` whose message contains every fragment (in order)."""
    return pytest.raises(exc, match=".*".join(re.escape(f) for f in fragments))


def flip_sig(sig: dict[str, str]) -> dict[str, str]:
    raw = bytearray(bytes.fromhex(sig["sig"]))
    raw[5] ^= 0x01
    return {"keyid": sig["keyid"], "sig": raw.hex()}


def repo_() -> Repo:
    """A store whose release (R1) and timestamp (T1) keys differ."""
    return Repo(timestamp_keys=[T1])


# --- manifest.json, layer by layer ------------------------------------------------------


def open_manifest(data: bytes) -> tuple[dict[str, Any], list[Any], list[Any]]:
    """(the timestamp body, its signatures, the manifest's signatures)."""
    doc = json.loads(data)
    return doc["signed"], doc["signatures"], doc["manifest_signatures"]


def layer(data: bytes, which: str) -> tuple[dict[str, Any], list[Any]]:
    """The signed body and the signatures of one layer of ``manifest.json``."""
    ts, ts_sigs, m_sigs = open_manifest(data)
    return (ts, ts_sigs) if which == "timestamp" else (ts["manifest"], m_sigs)


def with_layer(data: bytes, which: str, body: dict[str, Any] | None = None,
               sigs: list[Any] | None = None, resign_timestamp: list[SigningKey] | None = None
               ) -> bytes:
    """``manifest.json`` with one layer's body and/or signatures replaced (no re-signing, unless
    ``resign_timestamp``: the timestamp keys sign the result, as a timestamp key holder could)."""
    ts, ts_sigs, m_sigs = open_manifest(data)
    ts = copy.deepcopy(ts)
    if which == "timestamp":
        ts = ts if body is None else body
        ts_sigs = ts_sigs if sigs is None else sigs
    else:
        ts["manifest"] = ts["manifest"] if body is None else body
        m_sigs = m_sigs if sigs is None else sigs
    if resign_timestamp is not None:
        ts_sigs = [k.sign(ts) for k in resign_timestamp]
    return manifest_wire(ts, ts_sigs, m_sigs)


def resign_layer(data: bytes, which: str, keys: list[SigningKey]) -> bytes:
    body, _ = layer(data, which)
    return with_layer(data, which, sigs=[k.sign(body) for k in keys])


def role_of(which: str) -> str:
    return "timestamp" if which == "timestamp" else "release"


def what_of(which: str) -> str:
    return "manifest timestamp" if which == "timestamp" else "manifest"


def signer_of(which: str) -> SigningKey:
    return T1 if which == "timestamp" else R1


# --- arbitrary installation: wrong signatures on either layer of the manifest ---------------


def _with_sigs(make: Callable[[dict[str, Any], list[Any], SigningKey], list[Any]]
               ) -> Callable[[bytes, str], bytes]:
    def apply(data: bytes, which: str) -> bytes:
        body, sigs = layer(data, which)
        return with_layer(data, which, sigs=make(body, sigs, signer_of(which)))

    return apply


OUT_KID = OUTSIDER.keyid[:16]
R1_KID = R1.keyid[:16]

WRONG_SIGNATURES = [
    pytest.param(
        lambda d, w: resign_layer(d, w, [OUTSIDER]),
        ("0 valid signature(s) of 1 required", f"signed by key {OUT_KID}", "'{role}' keys"),
        id="key-not-in-root",
    ),
    pytest.param(
        lambda d, w: resign_layer(d, w, [K1]),
        ("0 valid signature(s) of 1", f"signed by key {K1.keyid[:16]}, not one of its '{{role}}'"),
        id="root-role-key-signs-it",
    ),
    pytest.param(
        lambda d, w: resign_layer(d, w, [T1 if w == "manifest" else R1]),
        ("0 valid signature(s) of 1", "not one of its '{role}'"),
        id="the-other-layers-key-signs-it",
    ),
    pytest.param(
        _with_sigs(lambda s, sigs, k: [flip_sig(sigs[0])]),
        ("0 valid signature(s) of 1", "invalid signature by key {kid}"),
        id="signature-bit-flipped",
    ),
    pytest.param(
        _with_sigs(lambda s, sigs, k: []),
        ("0 valid signature(s) of 1 required from the trust root's '{role}' keys",),
        id="no-signatures",
    ),
    pytest.param(
        _with_sigs(lambda s, sigs, k: [{"keyid": k.keyid}]),
        ("0 valid signature(s) of 1", "invalid signature by key {kid}"),
        id="sig-missing",
    ),
    pytest.param(
        _with_sigs(lambda s, sigs, k: [{"keyid": k.keyid, "sig": "zz" * 64}]),
        ("0 valid signature(s) of 1", "invalid signature by key {kid}"),
        id="sig-not-hex",
    ),
    pytest.param(
        _with_sigs(lambda s, sigs, k: [{"keyid": k.keyid, "sig": sigs[0]["sig"][:-2]}]),
        ("0 valid signature(s) of 1", "invalid signature by key {kid}"),
        id="sig-truncated",
    ),
    pytest.param(
        _with_sigs(lambda s, sigs, k: [{"keyid": k.keyid, "sig": 12345}]),
        ("0 valid signature(s) of 1", "invalid signature by key {kid}"),
        id="sig-not-a-string",
    ),
    pytest.param(
        _with_sigs(lambda s, sigs, k: [{"keyid": k.keyid, "sig": OUTSIDER.sign(s)["sig"]}]),
        ("0 valid signature(s) of 1", "invalid signature by key {kid}"),
        id="outsider-sig-under-trusted-keyid",
    ),
    pytest.param(
        _with_sigs(lambda s, sigs, k: [{"keyid": k.keyid, "sig": k.sign({"other": 1})["sig"]}]),
        ("0 valid signature(s) of 1", "invalid signature by key {kid}"),
        id="trusted-sig-over-other-content",
    ),
]


@pytest.mark.parametrize("which", LAYERS)
@pytest.mark.parametrize(("attack", "message"), WRONG_SIGNATURES)
def test_wrong_signatures_are_refused(
    which: str, attack: Callable[[bytes, str], bytes], message: tuple[str, ...]
) -> None:
    repo = repo_()
    data = attack(repo.publish()[0], which)
    fill = {"role": role_of(which), "kid": signer_of(which).keyid[:16]}
    with raises(SignatureError, f"{what_of(which)} has ", *(m.format(**fill) for m in message)):
        verify_manifest(data, repo.root, now=NOW)


def test_content_modified_after_signing() -> None:
    """Edited without re-signing, either layer is refused; the timestamp key cannot change
    what the release keys signed (it re-signs its layer, the manifest's signature fails)."""
    repo = repo_()
    data = repo.publish()[0]
    ts, _ = layer(data, "timestamp")
    edited = {**ts, "sequence": ts["sequence"] + 100}
    with raises(SignatureError, "manifest timestamp has 0 valid signature(s) of 1",
                f"invalid signature by key {T1.keyid[:16]}"):
        verify_manifest(with_layer(data, "timestamp", body=edited), repo.root, now=NOW)
    inner, _ = layer(data, "manifest")
    edited = {**inner, "sequence": inner["sequence"] + 100}
    forged = with_layer(data, "manifest", body=edited, resign_timestamp=[T1])
    with raises(SignatureError, "manifest has 0 valid signature(s) of 1",
                f"invalid signature by key {R1_KID}"):
        verify_manifest(forged, repo.root, now=NOW)


def test_a_signed_document_with_a_repeated_key_is_refused() -> None:
    """A key repeated with the signed value last: a parser that keeps the last value sees the
    signed document and its signature verifies, one that keeps the first sees another
    sequence. No reading of such bytes is accepted."""
    repo = repo_()
    data = repo.publish()[0]
    assert data.startswith(b'{"manifest_signatures":')  # canonical: sorted keys
    twice = data.replace(b'"sequence":', b'"sequence":999999,"sequence":', 1)
    assert twice != data
    with raises(FormatError, "the key 'sequence' appears twice in one object"):
        verify_manifest(twice, repo.root, now=NOW)


def test_an_index_edited_after_pinning_is_refused() -> None:
    """An index has no signature: any change, of any length, is caught by the pin."""
    repo = repo_()
    _, index_bytes, pointer = repo.publish()
    edited = index_bytes.replace(hexof("a").encode(), hexof("f").encode())
    assert len(edited) == len(index_bytes) and edited != index_bytes
    with raises(HashMismatchError, "release index sha256", "differs from the manifest's"):
        verify_index(edited, pointer, repo.root)


@pytest.mark.parametrize("which", LAYERS)
@pytest.mark.parametrize(
    "entry",
    [
        pytest.param("not-an-object", id="string"),
        pytest.param({"sig": "00"}, id="no-keyid"),
        pytest.param({"keyid": 7, "sig": "00"}, id="keyid-not-string"),
    ],
)
def test_malformed_signature_entry(which: str, entry: Any) -> None:
    repo = repo_()
    data = _with_sigs(lambda s, sigs, k: [*sigs, entry])(repo.publish()[0], which)
    with raises(FormatError, f"{what_of(which)} has a malformed signature entry"):
        verify_manifest(data, repo.root, now=NOW)


@pytest.mark.parametrize("edit", [
    pytest.param(lambda doc: doc.pop("manifest_signatures"), id="no-manifest-signatures"),
    pytest.param(lambda doc: doc.update(manifest_signatures={}), id="signatures-object"),
    pytest.param(lambda doc: doc["signed"].pop("manifest"), id="no-manifest"),
    pytest.param(lambda doc: doc["signed"].update(manifest=[]), id="manifest-list"),
])
def test_a_timestamp_without_a_signed_manifest_inside(edit: Callable[[dict[str, Any]], Any]
                                                      ) -> None:
    repo = repo_()
    doc = json.loads(repo.publish()[0])
    edit(doc)
    doc["signatures"] = [T1.sign(doc["signed"])]
    with raises(FormatError, "manifest has no signed manifest inside its timestamp"):
        verify_manifest(canonical_json(doc), repo.root, now=NOW)


def test_genuine_documents_verify() -> None:
    repo = repo_()
    data, index_bytes, pointer = repo.publish()
    ts = verify_manifest(data, repo.root, now=NOW)
    assert ts.to_dict() == layer(data, "timestamp")[0]
    assert ts.manifest.to_dict() == layer(data, "manifest")[0]
    assert ts.current == ts.manifest.current == pointer and ts.root_version == 1
    index = verify_index(index_bytes, pointer, repo.root)
    assert index.to_dict() == json.loads(index_bytes)


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


@pytest.mark.parametrize("which", LAYERS)
@pytest.mark.parametrize(("spec", "valid"), THRESHOLD_CASES)
def test_manifest_two_of_three(which: str, spec: str, valid: int | None) -> None:
    """2-of-3 on the layer under test (keys K1-K3), 1-of-1 on the other."""
    repo = Repo(root_keys=[K4])
    if which == "timestamp":
        repo.root = root_doc([K4], [R1], timestamp_keys=[K1, K2, K3], timestamp_threshold=2)
    else:
        repo.root = root_doc([K4], [K1, K2, K3], release_threshold=2, timestamp_keys=[T1])
    pointer = repo.publish()[2]
    data = manifest_bytes(repo.manifest_doc(pointer), [R1, K1], [T1, K1])
    body, _ = layer(data, which)
    data = with_layer(data, which, sigs=_sigs_for(body, spec))
    if valid is None:
        assert verify_manifest(data, repo.root, now=NOW).current == pointer
    else:
        with raises(SignatureError,
                    f"{what_of(which)} has {valid} valid signature(s) of 2 required"):
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
        _delete("roles/timestamp"), FormatError, ("root has no 'timestamp' role",),
        id="no-timestamp-role",
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
    # Signatures by keys the *release* or *timestamp* role trusts do not count for the root.
    for other in (R1, T1):
        signed = root_doc([K1], [R1], timestamp_keys=[T1]).to_dict()
        with raises(SignatureError, "0 valid signature(s) of 1",
                    f"signed by key {other.keyid[:16]}"):
            verify_root(sign_document(signed, [other]), now=NOW)


@pytest.mark.parametrize(
    ("now", "grace", "ok"),
    [
        pytest.param(NOW + timedelta(days=365), timedelta(0), True, id="at-expiry"),
        pytest.param(NOW + timedelta(days=365, seconds=1), timedelta(0), False, id="1s-after"),
        pytest.param(NOW + timedelta(days=366), timedelta(days=2), True, id="within-grace"),
        pytest.param(NOW + timedelta(days=368), timedelta(days=2), False, id="past-grace"),
        pytest.param(None, timedelta(0), True, id="not-checked"),
    ],
)
def test_root_expiry(now: Any, grace: timedelta, ok: bool) -> None:
    data = sign_document(root_doc([K1]).to_dict(), [K1])
    if ok:
        verify_root(data, now=now, grace=grace)
    else:
        with raises(ExpiredError, "trust root version 1 expired at 2027-03-01 12:00:00Z",
                    "`deltaship-publish root`", "device clock"):
            verify_root(data, now=now, grace=grace)


def _rotated(version: int, signers: list[SigningKey], **kw: Any) -> bytes:
    new = root_doc([K3, K4], [R2], version=version, root_threshold=kw.get("threshold", 2),
                   expires=kw.get("expires", NOW + timedelta(days=365)))
    return sign_document(new.to_dict(), signers)


TRUSTED = root_doc([K1, K2], [R1], root_threshold=2)
_MIN34 = min(K3.keyid, K4.keyid)[:16]
_MIN12 = min(K1.keyid, K2.keyid)[:16]

ROTATIONS = [
    pytest.param(2, [K1, K2, K3, K4], None, (), id="old-and-new-threshold"),
    pytest.param(2, [K3, K4, K2, K1], None, (), id="any-signature-order"),
    pytest.param(
        2, [K3, K4], SignatureError,
        ("trust root version 2 (the old root's keys) has 0 valid signature(s) of 2",
         f"signed by key {_MIN34}, not one of its 'root' keys"),
        id="only-new-keys",
    ),
    pytest.param(
        2, [K1, K3, K4], SignatureError,
        ("trust root version 2 (the old root's keys) has 1 valid signature(s) of 2 required",),
        id="old-keys-below-threshold",
    ),
    pytest.param(
        2, [K1, K2], SignatureError,
        ("trust root version 2 (its own keys) has 0 valid signature(s) of 2 required",
         f"signed by key {_MIN12}, not one of its 'root' keys"),
        id="only-old-keys",
    ),
    pytest.param(
        2, [K1, K2, K3], SignatureError,
        ("trust root version 2 (its own keys) has 1 valid signature(s) of 2 required",),
        id="new-keys-below-threshold",
    ),
    pytest.param(
        3, [K1, K2, K3, K4], ReplayError,
        ("trust root version 2 says it is version 3: refused",),
        id="skips-a-version",
    ),
    pytest.param(
        1, [K1, K2, K3, K4], ReplayError,
        ("trust root version 2 says it is version 1: refused",),
        id="same-version",
    ),
    pytest.param(
        0, [K1, K2, K3, K4], ReplayError,
        ("trust root version 2 says it is version 0: refused",),
        id="older-version",
    ),
]


@pytest.mark.parametrize("how", ["verify_root", "verify_successor"])
@pytest.mark.parametrize(("version", "signers", "exc", "message"), ROTATIONS)
def test_root_rotation(
    how: str, version: int, signers: list[SigningKey], exc: type[Exception] | None,
    message: tuple[str, ...]
) -> None:
    data = _rotated(version, signers)

    def verify() -> Root:
        if how == "verify_root":
            return verify_root(data, now=NOW, trusted=TRUSTED)
        return verify_successor(data, TRUSTED)

    if exc is None:
        new = verify()
        assert new.version == 2 and set(new.keys) == {K3.keyid, K4.keyid, R2.keyid}
    else:
        with raises(exc, *message):
            verify()


def test_a_successor_is_verified_whatever_its_expiry() -> None:
    """TUF §5.3: an intermediate root may be expired (only the last one walked must not be);
    ``verify_root`` with a ``now`` still checks it."""
    data = _rotated(2, [K1, K2, K3, K4], expires=NOW - timedelta(days=5))
    assert verify_successor(data, TRUSTED).version == 2
    assert verify_root(data, now=None, trusted=TRUSTED).version == 2
    with raises(ExpiredError, "trust root version 2 expired"):
        verify_root(data, now=NOW, trusted=TRUSTED)


def test_rotated_root_is_then_the_only_trust() -> None:
    new = verify_root(_rotated(2, [K1, K2, K3, K4]), now=NOW, trusted=TRUSTED)
    old_repo, new_repo = Repo(root_keys=[K1, K2], release_keys=[R1]), Repo(release_keys=[R2])
    with raises(SignatureError, f"signed by key {R1_KID}, not one of its 'timestamp' keys"):
        verify_manifest(old_repo.publish()[0], new, now=NOW)
    verify_manifest(new_repo.publish()[0], new, now=NOW)
    # A root signed only by the rotated-out keys cannot follow the new one.
    v3 = sign_document(root_doc([K1, K2], version=3, root_threshold=2).to_dict(), [K1, K2])
    with raises(SignatureError, "(the old root's keys) has 0 valid signature(s) of 2"):
        verify_root(v3, now=NOW, trusted=new)


@pytest.mark.parametrize(("new", "changed"), [
    (root_doc([K1, K2], [R1], root_threshold=2), set()),
    (root_doc([K3], [R1], timestamp_keys=[R1]), {"root"}),
    (root_doc([K1, K2], [R2], root_threshold=2, timestamp_keys=[R1]), {"release"}),
    (root_doc([K1, K2], [R1], root_threshold=2, timestamp_keys=[T1]), {"timestamp"}),
    (root_doc([K1, K2], [R1, R2], root_threshold=2, timestamp_keys=[R1]), {"release"}),
    (root_doc([K1, K2], [R1, R2], root_threshold=2, release_threshold=2,
              timestamp_keys=[R1]), {"release"}),
    (root_doc([K1, K2], [R1], root_threshold=1), {"root"}),
    (root_doc([K2, K1], [R1], root_threshold=2, version=9), set()),  # order and version: no
], ids=["same", "root", "release", "timestamp", "key-added", "threshold-and-key",
        "threshold", "order-and-version"])
def test_keys_changed(new: Root, changed: set[str]) -> None:
    assert {r for r in Root.ROLES if keys_changed(TRUSTED, new, r)} == changed


@pytest.mark.parametrize(("data", "hint"), [
    pytest.param(None, 1, id="a-genuine-manifest"),
    pytest.param(b'{"signed": {"root_version": 7}}', 7, id="unsigned-but-readable"),
    pytest.param(b'{"signed": {"root_version": true}}', 0, id="bool"),
    pytest.param(b'{"signed": {"root_version": "7"}}', 0, id="string"),
    pytest.param(b'{"signed": {"root_version": -3}}', 0, id="negative"),
    pytest.param(b'{"signed": []}', 0, id="signed-not-an-object"),
    pytest.param(b'{"signatures": []}', 0, id="no-signed"),
    pytest.param(b"[]", 0, id="not-an-object"),
    pytest.param(b"\xff" * 10, 0, id="not-json"),
    pytest.param(b'{"signed": {"root_version": 7}, "x": "' + b"a" * MAX_MANIFEST_SIZE + b'"}',
                 0, id="over-the-manifest-cap"),
])
def test_peek_root_version_is_only_a_hint(data: bytes | None, hint: int) -> None:
    """Read before verification: never raises, 0 when nothing sensible is there."""
    if data is None:
        data = repo_().publish()[0]
    assert peek_root_version(data) == hint


# --- rollback / replay and indefinite freeze on the manifest ----------------------------


@pytest.mark.parametrize(
    ("sequence", "min_sequence", "ok"),
    [(7, 8, False), (0, 1, False), (7, 7, True), (8, 7, True), (0, 0, True)],
)
@pytest.mark.parametrize("which", ["content", "timestamp"])
def test_manifest_replay(which: str, sequence: int, min_sequence: int, ok: bool) -> None:
    """Two floors: the content's sequence (release keys) and the timestamp's (timestamp key);
    each is checked against its own."""
    repo = repo_()
    _, _, pointer = repo.publish()
    if which == "content":
        data = repo.sign_manifest(repo.manifest_doc(pointer, sequence=sequence), sequence=100)
        floors = {"min_sequence": min_sequence, "min_timestamp": 100}
    else:
        data = repo.sign_manifest(repo.manifest_doc(pointer, sequence=100), sequence=sequence)
        floors = {"min_sequence": 100, "min_timestamp": min_sequence}
    if ok:
        ts = verify_manifest(data, repo.root, now=NOW, **floors)
        assert (ts.manifest.sequence if which == "content" else ts.sequence) == sequence
    else:
        what = "manifest sequence" if which == "content" else "manifest timestamp sequence"
        with raises(ReplayError, f"{what} {sequence} is older than {min_sequence}"):
            verify_manifest(data, repo.root, now=NOW, **floors)


FREEZES = [
    (timedelta(0), timedelta(0), True),
    (timedelta(seconds=-1), timedelta(0), True),
    (timedelta(seconds=1), timedelta(0), False),
    (timedelta(hours=23), timedelta(days=1), True),
    (timedelta(days=1), timedelta(days=1), True),
    (timedelta(days=1, seconds=1), timedelta(days=1), False),
    (timedelta(days=400), timedelta(days=1), False),
]


@pytest.mark.parametrize(("after_expiry", "grace", "ok"), FREEZES)
@pytest.mark.parametrize("which", ["content", "timestamp"])
def test_manifest_freeze(which: str, after_expiry: timedelta, grace: timedelta,
                         ok: bool) -> None:
    """Both expiries are checked: the content's (renewed by the release keys) and the
    freshness (renewed by `deltaship-publish refresh` with the timestamp key)."""
    repo = repo_()
    _, _, pointer = repo.publish()
    expires = NOW + timedelta(days=30)
    later = NOW + timedelta(days=900)
    if which == "content":
        data = repo.sign_manifest(repo.manifest_doc(pointer, expires=expires), expires=later)
        message = ("manifest expired at 2026-03-31 12:00:00Z (now ",
                   "`deltaship-publish refresh --content`, or a release")
    else:
        data = repo.sign_manifest(repo.manifest_doc(pointer, expires=later), expires=expires)
        message = ("manifest timestamp expired at 2026-03-31 12:00:00Z (now ",
                   "re-sign it with `deltaship-publish refresh`, or the device clock is wrong")
    now = expires + after_expiry
    if ok:
        verify_manifest(data, repo.root, now=now, grace=grace)
    else:
        with raises(ExpiredError, *message):
            verify_manifest(data, repo.root, now=now, grace=grace)


@pytest.mark.parametrize("which", LAYERS)
def test_replay_is_checked_only_after_the_signatures(which: str) -> None:
    repo = repo_()
    data = resign_layer(repo.publish()[0], which, [OUTSIDER])
    with pytest.raises(SignatureError):
        verify_manifest(data, repo.root, now=NOW, min_sequence=10**9, min_timestamp=10**9)


# --- endless data ----------------------------------------------------------------------


def _padded(signed: dict[str, Any], keys: list[SigningKey], size: int) -> bytes:
    """A genuinely signed document padded (in an unknown field) to ``size`` bytes or more."""
    signed = {**signed, "padding": ""}
    base = len(sign_document(signed, keys))
    signed["padding"] = "x" * max(0, size - base)
    return sign_document(signed, keys)


def _padded_manifest(repo: Repo, size: int) -> bytes:
    """A genuine ``manifest.json`` padded (in an unknown timestamp field) to ``size`` bytes."""

    def wire(pad: str) -> bytes:
        data = repo.publish()[0]
        ts, _ = layer(data, "timestamp")
        body = {**ts, "padding": pad}
        return with_layer(data, "timestamp", body=body, sigs=[T1.sign(body)])

    return wire("x" * (size - len(wire(""))))


def test_oversize_root() -> None:
    data = _padded(root_doc([K1]).to_dict(), [K1], MAX_ROOT_SIZE + 1)
    assert len(data) == MAX_ROOT_SIZE + 1
    with raises(OversizeError, f"trust root is {MAX_ROOT_SIZE + 1} bytes, over its 524288-byte"):
        verify_root(data, now=NOW)
    at_cap = _padded(root_doc([K1]).to_dict(), [K1], MAX_ROOT_SIZE)
    assert len(at_cap) == MAX_ROOT_SIZE
    verify_root(at_cap, now=NOW)
    with raises(OversizeError, "trust root version 2 is"):
        verify_successor(_padded(root_doc([K1], version=2).to_dict(), [K1], MAX_ROOT_SIZE + 1),
                         root_doc([K1]))


def test_oversize_manifest() -> None:
    repo = repo_()
    data = _padded_manifest(repo, MAX_MANIFEST_SIZE + 1)
    assert len(data) == MAX_MANIFEST_SIZE + 1
    with raises(OversizeError, f"manifest is {MAX_MANIFEST_SIZE + 1} bytes, over its 65536-byte"):
        verify_manifest(data, repo.root, now=NOW)
    at_cap = _padded_manifest(repo, MAX_MANIFEST_SIZE)
    assert len(at_cap) == MAX_MANIFEST_SIZE
    verify_manifest(at_cap, repo.root, now=NOW)


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
    """The manifest names 1.0 and pins the bytes of an index for 1.1."""
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


def test_an_index_not_matching_its_pin_is_refused_whoever_wrote_it() -> None:
    """No signature makes an index acceptable: only the pin of a verified manifest does. An
    index wrapped in a genuine release-key envelope (the v2 form) is not an index at all."""
    repo = repo_()
    _, index_bytes, pointer = repo.publish()
    other = repo.sign_index(index_doc(deltas_from=("0.8",)))
    with raises(HashMismatchError, "differs from the manifest's"):
        verify_index(other, pointer, repo.root)
    wrapped = sign_document(json.loads(index_bytes), [R1])
    with raises(FormatError, "release index: missing field '_type'"):
        verify_index(wrapped, repo.pointer(wrapped, "1.0"), repo.root)


def test_index_with_unsafe_names_is_refused_even_when_pinned() -> None:
    """A release key (or a buggy publisher) must not be able to write outside the model dir."""
    repo = Repo()
    doc = json.loads(repo.sign_index(index_doc()))
    doc["files"][0]["path"] = "../../etc/cron.d/evil"
    index_bytes = canonical_json(doc)
    with raises(UnsafeNameError, "unsafe file name '../../etc/cron.d/evil'"):
        verify_index(index_bytes, repo.pointer(index_bytes, "1.0"), repo.root)


# --- wrong document type: one signed document presented as another -------------------


def test_root_presented_as_manifest_or_index() -> None:
    """With one key for every role (what ``init --key`` does) signatures cannot tell."""
    repo = Repo(root_keys=[K1], release_keys=[K1])
    with raises(FormatError, "manifest has no signed manifest inside its timestamp"):
        verify_manifest(repo.root_bytes, repo.root, now=NOW)
    pointer = repo.pointer(repo.root_bytes, "1.0")
    with raises(FormatError, "release index: missing field '_type'"):
        verify_index(repo.root_bytes, pointer, repo.root)


def test_documents_swapped() -> None:
    repo = Repo(root_keys=[K1], release_keys=[K1])
    manifest, index_bytes, _ = repo.publish()
    with raises(FormatError, "manifest is not a signed envelope"):
        verify_manifest(index_bytes, repo.root, now=NOW)
    with raises(FormatError, "release index: missing field '_type'"):
        verify_index(manifest, repo.pointer(manifest, "1.0"), repo.root)
    with raises(FormatError, "root has _type 'deltaship.timestamp', expected 'deltaship.root'"):
        verify_root(manifest, now=NOW)
    # The manifest signed as a timestamp (its own body in the outer layer):
    inner, m_sigs = layer(manifest, "manifest")
    fake = manifest_wire({**inner, "manifest": inner}, [K1.sign({**inner, "manifest": inner})],
                         m_sigs)
    with raises(FormatError, "timestamp has _type 'deltaship.manifest', expected "
                "'deltaship.timestamp'"):
        verify_manifest(fake, repo.root, now=NOW)


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
@pytest.mark.parametrize("kind", ["root", "successor", "manifest", "index"])
def test_malformed_envelopes(kind: str, data: bytes, message: str) -> None:
    repo = Repo()
    what = {"root": "trust root", "successor": "trust root version 2", "manifest": "manifest",
            "index": "release index"}[kind]
    if kind == "index" and "signed envelope" in message:  # an index is no envelope
        message = "missing field '_type'"
    with raises(FormatError, what, message):
        if kind == "root":
            verify_root(data, now=NOW)
        elif kind == "successor":
            verify_successor(data, repo.root)
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


@pytest.mark.parametrize("which", LAYERS)
def test_unknown_spec_version(which: str) -> None:
    repo = repo_()
    data = repo.publish()[0]
    body, _ = layer(data, which)
    body = {**body, "spec_version": 4}
    if which == "timestamp":
        data = with_layer(data, which, body=body, sigs=[T1.sign(body)])
    else:
        data = with_layer(data, which, body=body, sigs=[R1.sign(body)], resign_timestamp=[T1])
    where = "timestamp" if which == "timestamp" else "manifest"
    with raises(FormatError, f"{where} has spec_version 4; this deltaship understands 3: upgrade"):
        verify_manifest(data, repo.root, now=NOW)


def test_every_error_is_untrusted_data() -> None:
    for exc in (SignatureError, HashMismatchError, ReplayError, ExpiredError, OversizeError,
                MixAndMatchError, UnsafeNameError, FormatError):
        assert issubclass(exc, UntrustedDataError)


# --- forward compatibility: unknown fields ----------------------------------------------


@pytest.mark.parametrize("kind", ["root", "timestamp", "manifest", "index"])
def test_unknown_fields_are_kept_and_signed(kind: str) -> None:
    """Unknown fields are kept and written back; in a signed document they are signed (an
    edit or removal is refused), in an index they are pinned (the same)."""
    repo = repo_()
    extra = {"x_rollout": {"percent": 10, "cohorts": ["a", "b"]}, "zz_note": "hi"}
    manifest, index_bytes, pointer = repo.publish()
    if kind == "root":
        body = {**open_envelope(repo.root_bytes)[0], **extra}
        data = sign_document(body, [K1])
    elif kind == "index":
        body = {**json.loads(index_bytes), **extra}
        data = canonical_json(body)
        pointer = repo.pointer(data, "1.0")
    else:
        body = {**layer(manifest, kind)[0], **extra}
        signer = T1 if kind == "timestamp" else R1
        data = with_layer(manifest, kind, body=body, sigs=[signer.sign(body)],
                          resign_timestamp=None if kind == "timestamp" else [T1])

    def verify(d: bytes) -> Any:
        if kind == "root":
            return verify_root(d, now=NOW)
        if kind == "index":
            return verify_index(d, pointer, repo.root)
        ts = verify_manifest(d, repo.root, now=NOW)
        return ts if kind == "timestamp" else ts.manifest

    doc = verify(data)
    assert dict(doc.unrecognized) == extra
    assert doc.to_dict() == body
    assert type(doc).from_dict(doc.to_dict()) == doc

    def edited(edit: Callable[[dict[str, Any]], Any]) -> bytes:
        if kind == "root":
            return tamper(data, edit)
        new = copy.deepcopy(body)
        edit(new)
        if kind == "index":
            return canonical_json(new)
        return with_layer(data, kind, body=new,
                          resign_timestamp=None if kind == "timestamp" else [T1])

    for edit in (lambda s: s["x_rollout"].update(percent=100), lambda s: s.pop("zz_note")):
        if kind == "index":
            with raises(HashMismatchError, "release index", "the manifest"):
                verify(edited(edit))
        else:
            with raises(SignatureError, "0 valid signature(s) of 1", "invalid signature by key"):
                verify(edited(edit))


def test_group_helper_is_valid() -> None:
    assert group("a").file == "a.safetensors"
    assert isinstance(Root.from_dict(root_doc([K1]).to_dict()), Root)


# --- documents are bound to their repository (issue 9, point 1) -------------------------


def test_another_repositorys_manifest_is_refused_naming_both_ids() -> None:
    """Two stores with the same keys: B's manifest is valid everywhere but in A."""
    a, b = Repo(), Repo(repository_id=OTHER_REPO_ID)
    manifest_b, _, _ = b.publish()
    verify_manifest(manifest_b, b.root, now=NOW)
    with raises(MixAndMatchError, f"manifest timestamp belongs to repository {OTHER_REPO_ID}",
                f"not to the trusted root's repository {REPO_ID}", "another store"):
        verify_manifest(manifest_b, a.root, now=NOW, min_sequence=0)
    # A's timestamp carrying B's content (both genuinely signed with the shared keys):
    inner_b, sigs_b = layer(manifest_b, "manifest")
    mixed = with_layer(a.publish()[0], "manifest", body=inner_b, sigs=sigs_b,
                       resign_timestamp=a.release_keys)
    with raises(MixAndMatchError, f"manifest belongs to repository {OTHER_REPO_ID}"):
        verify_manifest(mixed, a.root, now=NOW)


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
        verify_manifest(b.publish()[0], a.root, now=NOW, min_sequence=50, min_timestamp=50)


def test_rotation_keeps_the_repository_id() -> None:
    """A successor root may change every key but not the repository it names."""
    same = root_doc([K3, K4], [R2], version=2, root_threshold=2)
    assert verify_root(sign_document(same.to_dict(), [K1, K2, K3, K4]), now=NOW,
                       trusted=TRUSTED).repository_id == TRUSTED.repository_id
    other = root_doc([K3, K4], [R2], version=2, root_threshold=2, repository_id=OTHER_REPO_ID)
    with raises(MixAndMatchError, f"trust root version 2 belongs to repository {OTHER_REPO_ID}"):
        verify_successor(sign_document(other.to_dict(), [K1, K2, K3, K4]), TRUSTED)


@pytest.mark.parametrize("kind", ["root", "timestamp", "manifest", "index"])
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
        pytest.param(lambda d: d.update(spec_version=2),
                     "has spec_version 2, an older format without a timestamp role or root "
                     "chain: re-initialise the store", id="format-v2"),
    ],
)
def test_a_document_without_a_valid_repository_id(kind: str, edit: Callable[[dict[str, Any]],
                                                  Any], message: str) -> None:
    repo = repo_()
    if kind == "root":
        signed = repo.root.to_dict()
        edit(signed)
        with raises(FormatError, message):
            verify_root(sign_document(signed, repo.root_keys), now=NOW)
        return
    manifest, index_bytes, _ = repo.publish()
    if kind == "index":
        doc = json.loads(index_bytes)
        edit(doc)
        data = canonical_json(doc)
        with raises(FormatError, message):
            verify_index(data, repo.pointer(data, "1.0"), repo.root)
        return
    body = copy.deepcopy(layer(manifest, kind)[0])
    edit(body)
    signer = T1 if kind == "timestamp" else R1
    data = with_layer(manifest, kind, body=body, sigs=[signer.sign(body)],
                      resign_timestamp=None if kind == "timestamp" else [T1])
    with raises(FormatError, message):
        verify_manifest(data, repo.root, now=NOW)


# --- the cost of signature junk (issue 9, point 10) -------------------------------------


class Costs:
    """Counts what verifying costs: canonicalisations and signature verifications."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.canonical = self.verified = 0
        canon, verify = trust.canonical_json, PublicKey.verify_bytes

        def counted_canonical(value: Any) -> bytes:
            self.canonical += 1
            return canon(value)

        def counted_verify(key: PublicKey, message: bytes, sig: str) -> bool:
            self.verified += 1
            return verify(key, message, sig)

        monkeypatch.setattr(trust, "canonical_json", counted_canonical)
        monkeypatch.setattr(PublicKey, "verify_bytes", counted_verify)

    def of(self, fn: Callable[[], Any]) -> tuple[int, int]:
        self.canonical = self.verified = 0
        fn()
        return self.canonical, self.verified


def _outcome(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except SignatureError:
        return "refused"
    return "accepted"


def _junk_manifest(repo: Repo, which: str,
                   signatures: Callable[[dict[str, str]], list[Any]]) -> bytes:
    """A manifest whose body is costly to canonicalise, with the given entries on ``which``."""
    data = repo.publish()[0]
    body, _ = layer(data, which)
    body = {**body, "x_padding": [0] * 5000}
    good = signer_of(which).sign(body)
    data = with_layer(data, which, body=body, sigs=signatures(good),
                      resign_timestamp=None if which == "timestamp" else [T1])
    assert len(data) <= MAX_MANIFEST_SIZE
    return data


@pytest.mark.parametrize("which", LAYERS)
@pytest.mark.parametrize("junk", ["copies of the good signature", "bad signatures first"])
def test_signature_junk_costs_about_one_verification(
        junk: str, which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hundreds of signature entries by the trusted key id cost what one does: each body is
    canonicalised once and only the first entry of a key id is checked (counted, not timed)."""
    repo = repo_()
    normal = _junk_manifest(repo, which, lambda g: [g])
    if junk == "copies of the good signature":
        stuffed = _junk_manifest(repo, which, lambda g: [g] * 240)
    else:
        stuffed = _junk_manifest(
            repo, which, lambda g: [{"keyid": g["keyid"], "sig": "00" * 64}] * 240 + [g])
    costs = Costs(monkeypatch)
    normal_cost = costs.of(lambda: verify_manifest(normal, repo.root, now=NOW))
    assert normal_cost == (2, 2)  # two layers: one body and one signature each
    stuffed_cost = costs.of(lambda: _outcome(lambda: verify_manifest(stuffed, repo.root,
                                                                     now=NOW)))
    assert stuffed_cost <= normal_cost, (stuffed_cost, normal_cost)
    expected = "accepted" if junk.startswith("copies") else "refused"
    assert _outcome(lambda: verify_manifest(stuffed, repo.root, now=NOW)) == expected


@pytest.mark.parametrize("which", LAYERS)
def test_only_the_first_signature_of_a_key_id_counts(which: str) -> None:
    repo = repo_()
    data = repo.publish()[0]
    _, (good,) = layer(data, which)
    bad = flip_sig(good)
    kid = signer_of(which).keyid

    def check(sigs: list[Any]) -> None:
        verify_manifest(with_layer(data, which, sigs=sigs), repo.root, now=NOW)

    check([good, bad, bad])
    with raises(SignatureError, f"invalid signature by key {kid[:16]}"):
        check([bad, good])
    # Junk of other shapes by the trusted key id is not verified either.
    check([good, {"keyid": kid, "sig": "zz" * 5000}])
    with raises(SignatureError, "invalid signature by key"):
        check([{"keyid": kid, "sig": "ab" * 10}])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["good-r1", "bad-r1", "good-r2", "bad-r2", "outsider"]),
                max_size=12))
def test_outcome_depends_on_the_first_entry_of_each_key_id(entries: list[str]) -> None:
    """Property: with a 2-of-2 release role, a manifest verifies exactly when the first entry
    of each of the two key ids is a good signature; repeats never change the outcome."""
    repo = Repo(release_keys=[R1, R2], release_threshold=2, timestamp_keys=[T1])
    data = repo.publish()[0]
    signed, _ = layer(data, "manifest")
    sigs = {"good-r1": R1.sign(signed), "good-r2": R2.sign(signed),
            "outsider": OUTSIDER.sign(signed)}
    sigs["bad-r1"], sigs["bad-r2"] = flip_sig(sigs["good-r1"]), flip_sig(sigs["good-r2"])
    data = with_layer(data, "manifest", sigs=[sigs[e] for e in entries])
    first = {}
    for e in entries:
        first.setdefault(e.split("-")[-1], e)
    ok = first.get("r1") == "good-r1" and first.get("r2") == "good-r2"
    assert _outcome(lambda: verify_manifest(data, repo.root, now=NOW)) == (
        "accepted" if ok else "refused")
