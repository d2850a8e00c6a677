"""Drafts: documents awaiting signatures from key holders on separate machines (pure, no I/O).

A draft file (``_type: deltaship.draft``, docs/FORMAT.md §14) holds the documents one publisher
command will write, each with the role whose threshold it needs and the signatures gathered so
far, plus the trust root it was drafted against. ``deltaship-publish release --draft`` (and
``revert``, ``refresh``, ``promote``, ``rollout``, ``root edit``) write one; ``sign`` adds one
key's signatures to every document that key may sign; ``publish`` checks every threshold
against the store's current root and writes the documents. Signing changes only ``signatures``:
the ``signed`` parts are fixed when the draft is made, so key holders can sign in any order.

A key holder's ``sign`` verifies nothing about the store (it may have no access to it); it signs
the bytes it is shown, and ``publish`` refuses a draft whose trusted root is not the store's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._fields import SPEC_VERSION, FieldReader, check_header, check_repository_id
from .canonical import canonical_json, loads_object
from .errors import FormatError, OversizeError, SignatureError, TrustError
from .metadata import Root
from .signing import SigningKey
from .trust import check_threshold, manifest_wire, valid_signers, verify_root

__all__ = ["KINDS", "MAX_DRAFT_SIZE", "Draft", "DraftDocument"]

MAX_DRAFT_SIZE = 32 * 1024 * 1024
KINDS = ("release", "revert", "refresh", "promote", "rollout", "root")
_ROLES = ("root", "release", "timestamp")
# The role that signs each document (FORMAT §4, §5, §9): fixed, not the draft file's choice.
_ROLE_OF = {"record": "release", "manifest": "release", "timestamp": "timestamp",
            "root": "root"}


@dataclass
class DraftDocument:
    """One document of a draft: where it goes (``key``), which role signs it (``role``), what
    is signed and the signatures so far. ``name`` says what it is: ``record``, ``manifest``,
    ``timestamp`` or ``root``."""

    name: str
    key: str
    role: str
    signed: dict[str, Any]
    signatures: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> DraftDocument:
        r = FieldReader(d, where)
        doc = cls(r.get("name", str), r.get("key", str), r.get("role", str),
                  r.get("signed", dict), list(r.get("signatures", list)))
        if doc.role not in _ROLES:
            raise FormatError(f"{where}.role {doc.role!r} is not one of {', '.join(_ROLES)}")
        expected = _ROLE_OF.get(doc.name)
        if expected is not None and doc.role != expected:
            raise FormatError(f"{where}: the {doc.name} document is signed by the "
                              f"{expected!r} role, not {doc.role!r}")
        for s in doc.signatures:
            if not isinstance(s, dict) or not isinstance(s.get("keyid"), str) \
                    or not isinstance(s.get("sig"), str):
                raise FormatError(f"{where} has a malformed signature entry")
        return doc

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "role": self.role, "signed": self.signed,
                "signatures": self.signatures}

    @property
    def body(self) -> bytes:
        return canonical_json(self.signed)

    def envelope(self) -> bytes:
        return canonical_json({"signed": self.signed, "signatures": self.signatures})

    def signed_by(self) -> set[str]:
        return {s["keyid"] for s in self.signatures}


@dataclass
class Draft:
    """A draft file. ``trusted_root`` is the envelope of the root it was drafted against;
    ``base`` what it builds on (for the conditional write at ``publish``); ``store`` the URL it
    was made for (informational: ``publish --store`` decides)."""

    TYPE = "deltaship.draft"

    kind: str
    repository_id: str
    store: str
    trusted_root: bytes
    documents: list[DraftDocument]
    base: Mapping[str, Any] = field(default_factory=dict)
    unrecognized: Mapping[str, Any] = field(default_factory=dict)
    _root: Root | None = field(default=None, init=False, repr=False, compare=False)

    # -- the file --------------------------------------------------------------------------

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "draft") -> Draft:
        if len(data) > MAX_DRAFT_SIZE:
            raise OversizeError(f"{where} is {len(data)} bytes, over its {MAX_DRAFT_SIZE} cap")
        r = FieldReader(loads_object(data, where), where)
        check_header(r, cls.TYPE)
        kind = r.get("kind", str)
        if kind not in KINDS:
            raise FormatError(f"{where}.kind {kind!r} is not one of {', '.join(KINDS)}")
        repository_id = check_repository_id(r.get("repository_id", str),
                                            f"{where} repository_id")
        store = r.get("store", str)
        trusted_root = canonical_json(r.get("trusted_root", dict))
        docs = [DraftDocument.from_dict(d, f"{where}.documents[{i}]")
                for i, d in enumerate(r.get("documents", list))]
        names = [d.name for d in docs]
        if len(set(names)) != len(names):
            raise FormatError(f"{where} lists a document twice")
        base = r.take("base", dict, {})
        draft = cls(kind, repository_id, store, trusted_root, docs, base, r.rest())
        draft.root()  # a draft whose root does not parse is refused at once
        return draft

    def to_bytes(self) -> bytes:
        return canonical_json({
            **self.unrecognized,
            "_type": self.TYPE,
            "spec_version": SPEC_VERSION,
            "kind": self.kind,
            "repository_id": self.repository_id,
            "store": self.store,
            "trusted_root": loads_object(self.trusted_root, "trusted root"),
            "base": dict(self.base),
            "documents": [d.to_dict() for d in self.documents],
        })

    # -- roots -----------------------------------------------------------------------------

    def root(self) -> Root:
        """The root the draft was made against (self-signature checked once, expiry not)."""
        if self._root is None:
            self._root = verify_root(self.trusted_root, now=None)
        return self._root

    def new_root(self) -> Root | None:
        """The successor a ``root`` draft proposes (unsigned parts parsed, nothing verified)."""
        doc = self.get("root")
        return Root.from_dict(doc.signed) if doc is not None else None

    def get(self, name: str) -> DraftDocument | None:
        for d in self.documents:
            if d.name == name:
                return d
        return None

    def document(self, name: str) -> DraftDocument:
        d = self.get(name)
        if d is None:
            raise FormatError(f"the {self.kind} draft has no {name!r} document")
        return d

    def signers(self, doc: DraftDocument) -> set[str]:
        """Key ids whose signature ``doc`` needs: its role's keys in the trusted root, and for
        a new root also the new root's ``root`` keys (TUF §5.3.4: both thresholds)."""
        ids = set(self.root().roles[doc.role].keyids)
        if doc.name == "root":
            new = self.new_root()
            assert new is not None
            ids |= set(new.roles["root"].keyids)
        return ids

    # -- signing and checking --------------------------------------------------------------

    def sign(self, keys: Iterable[SigningKey]) -> list[tuple[str, str]]:
        """Add each key's signature to every document it may sign that lacks it; returns
        (document name, key id) for each signature added. A key that may sign none of them
        is a :class:`TrustError` (the signer's input: wrong key, wrong draft; exit 2)."""
        added: list[tuple[str, str]] = []
        for k in keys:
            useful = False
            for doc in self.documents:
                if k.keyid not in self.signers(doc):
                    continue
                useful = True
                if k.keyid in doc.signed_by():
                    continue
                doc.signatures.append(k.sign(doc.signed))
                added.append((doc.name, k.keyid))
            if not useful:
                raise TrustError(
                    f"key {k.keyid[:16]} ({k.name or 'unnamed'}) is not a key of any role this "
                    f"{self.kind} draft needs ({', '.join(self._needs())}): wrong key or wrong "
                    "draft"
                )
        return added

    def _needs(self) -> list[str]:
        return sorted({d.role for d in self.documents})

    def missing(self) -> list[str]:
        """One line per document that lacks a threshold of valid signatures (empty: ready)."""
        out = []
        root = self.root()
        for doc in self.documents:
            what = f"{doc.name} ({doc.key})"
            checks = [(root, f"{doc.role} keys of trust root v{root.version}")]
            if doc.name == "root":
                new = self.new_root()
                assert new is not None
                checks.append((new, f"root keys of the new trust root v{new.version}"))
            for r, label in checks:
                try:
                    check_threshold(r, doc.role, doc.body, doc.signatures, what)
                except SignatureError:
                    have = len(valid_signers(r, doc.role, doc.body, doc.signatures, what))
                    bad = len(set(r.roles[doc.role].keyids) & doc.signed_by()) - have
                    out.append(f"{what}: {have} of {r.roles[doc.role].threshold} signatures "
                               f"from the {label}"
                               + (f" ({bad} more that do not verify: signed other bytes or "
                                  "tampered with)" if bad else ""))
        return out

    def status(self) -> list[dict[str, Any]]:
        """Per document: its role and how many valid signatures of how many it needs."""
        root = self.root()
        rows = []
        for doc in self.documents:
            role = root.roles[doc.role]
            valid = valid_signers(root, doc.role, doc.body, doc.signatures, doc.name)
            rows.append({"name": doc.name, "key": doc.key, "role": doc.role,
                         "signatures": len(valid),
                         "threshold": role.threshold})
        return rows

    # -- the bytes publish writes ----------------------------------------------------------

    def wire(self, name: str) -> bytes:
        """The bytes to store for document ``name``; ``timestamp`` gives ``manifest.json``
        (the timestamp envelope with the manifest's signatures beside)."""
        if name == "timestamp":
            ts, m = self.document("timestamp"), self.document("manifest")
            if ts.signed.get("manifest") != m.signed:
                raise FormatError("the draft's timestamp does not carry its manifest")
            return manifest_wire(ts.signed, ts.signatures, m.signatures)
        return self.document(name).envelope()

