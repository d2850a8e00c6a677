"""An in-memory repository simulator: builds and signs roots, manifests and release indexes.

Everything is bytes in memory (like python-tuf's ``RepositorySimulator``): tests publish
documents, tamper with them (edit the signed part without re-signing, replace signatures,
swap bytes) and hand the result to ``manifest.trust``. Keys come from fixed seeds, so runs are
reproducible.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from manifest.canonical import canonical_json, loads_object
from manifest.metadata import (
    FileEntry,
    GroupEntry,
    Manifest,
    ObjectRef,
    PatchRef,
    ReleaseIndex,
    ReleasePointer,
    ReleaseRecord,
    Role,
    Root,
    TensorEntry,
    Timestamp,
)
from manifest.signing import SigningKey
from manifest.trust import manifest_wire, sign_document

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
REPO_ID = "5e1ec7ed" * 4  # the repository id of the simulated store
OTHER_REPO_ID = "0badc0de" * 4  # another store's


def key(n: int) -> SigningKey:
    """A deterministic key: seed ``n`` repeated."""
    return SigningKey(bytes([n]) * 32, f"key{n}")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hexof(c: str) -> str:
    return c * 64


def envelope(signed: dict[str, Any], signatures: list[Any]) -> bytes:
    """Wire bytes with arbitrary (possibly bogus) signature entries."""
    return canonical_json({"signed": signed, "signatures": signatures})


def open_envelope(data: bytes) -> tuple[dict[str, Any], list[Any]]:
    doc = loads_object(data, "test document")
    return doc["signed"], doc["signatures"]


def tamper(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """Apply ``edit`` to the signed part and keep the old signatures (no re-signing)."""
    signed, sigs = open_envelope(data)
    signed = copy.deepcopy(signed)
    edit(signed)
    return envelope(signed, sigs)


def resign(data: bytes, keys: Iterable[SigningKey]) -> bytes:
    signed, _ = open_envelope(data)
    return sign_document(signed, list(keys))


def root_doc(
    root_keys: list[SigningKey],
    release_keys: list[SigningKey] | None = None,
    *,
    version: int = 1,
    root_threshold: int = 1,
    release_threshold: int = 1,
    expires: datetime = NOW + timedelta(days=365),
    repository_id: str = REPO_ID,
    timestamp_keys: list[SigningKey] | None = None,
    timestamp_threshold: int = 1,
) -> Root:
    release_keys = root_keys if release_keys is None else release_keys
    timestamp_keys = release_keys if timestamp_keys is None else timestamp_keys
    keys = {k.keyid: k.public_key for k in [*root_keys, *release_keys, *timestamp_keys]}
    return Root(
        version,
        expires,
        keys,
        {
            "root": Role(tuple(k.keyid for k in root_keys), root_threshold),
            "release": Role(tuple(k.keyid for k in release_keys), release_threshold),
            "timestamp": Role(tuple(k.keyid for k in timestamp_keys), timestamp_threshold),
        },
        repository_id=repository_id,
    )


def manifest_bytes(
    manifest: Manifest,
    release_keys: list[SigningKey],
    timestamp_keys: list[SigningKey],
    *,
    sequence: int | None = None,
    expires: datetime = NOW + timedelta(days=28),
    root_version: int = 1,
) -> bytes:
    """``manifest.json``: ``manifest`` signed by ``release_keys`` inside a timestamp signed by
    ``timestamp_keys`` (sequence defaults to the manifest's)."""
    ts = Timestamp(manifest.sequence if sequence is None else sequence, expires, root_version,
                   manifest, repository_id=manifest.repository_id)
    body, inner = ts.to_dict(), manifest.to_dict()
    return manifest_wire(body, [k.sign(body) for k in timestamp_keys],
                         [k.sign(inner) for k in release_keys])


def record_bytes(record: ReleaseRecord, keys: list[SigningKey]) -> bytes:
    return sign_document(record.to_dict(), keys)


def group(name: str, n: int = 1, *, tensors: tuple[str, ...] | None = None) -> GroupEntry:
    """A valid group entry; ``n`` varies its hashes."""
    h = f"{n % 16:x}"
    names = tensors if tensors is not None else (f"{name}.weight",)
    return GroupEntry(
        name,
        f"{name}.safetensors",
        hexof(h),
        1000 + n,
        tuple(TensorEntry(t, "BF16", (4, 8)) for t in names),
        ObjectRef(hexof("a"), 500 + n, "dspatch"),
        (PatchRef("0.9", hexof("b"), ObjectRef(hexof("c"), 40 + n, "dspatch")),),
    )


def file_entry(path: str, n: int = 1) -> FileEntry:
    return FileEntry(path, hexof("d"), 10 + n, ObjectRef(hexof("e"), 8 + n, "zstd"))


def index_doc(version: str = "1.0", **kw: Any) -> ReleaseIndex:
    return ReleaseIndex(
        version,
        kw.get("released_at", NOW),
        kw.get("groups", (group("layers.0"), group("layers.1", 2))),
        kw.get("files", (file_entry("config.json"), file_entry("tokenizer/vocab.txt", 2))),
        kw.get("deltas_from", ("0.9",)),
        repository_id=kw.get("repository_id", REPO_ID),
    )


@dataclass
class Repo:
    """A publisher in memory: one trust root, release keys, and the documents it published."""

    root_keys: list[SigningKey] = field(default_factory=lambda: [key(1)])
    release_keys: list[SigningKey] = field(default_factory=lambda: [key(11)])
    root_threshold: int = 1
    release_threshold: int = 1
    sequence: int = 0
    repository_id: str = REPO_ID
    timestamp_keys: list[SigningKey] | None = None  # None: the release keys

    def __post_init__(self) -> None:
        if self.timestamp_keys is None:
            self.timestamp_keys = list(self.release_keys)
        self.root = root_doc(
            self.root_keys,
            self.release_keys,
            root_threshold=self.root_threshold,
            release_threshold=self.release_threshold,
            repository_id=self.repository_id,
            timestamp_keys=self.timestamp_keys,
        )
        self.root_bytes = sign_document(self.root.to_dict(), self.root_keys)

    def sign_index(self, index: ReleaseIndex, keys: list[SigningKey] | None = None) -> bytes:
        """The stored bytes of a release index: unsigned canonical JSON (``keys`` is ignored:
        kept so older call sites read the same)."""
        return canonical_json(index.to_dict())

    def sign_manifest(self, manifest: Manifest, *, release_keys: list[SigningKey] | None = None,
                      timestamp_keys: list[SigningKey] | None = None, **kw: Any) -> bytes:
        assert self.timestamp_keys is not None
        return manifest_bytes(
            manifest, self.release_keys if release_keys is None else release_keys,
            self.timestamp_keys if timestamp_keys is None else timestamp_keys,
            root_version=kw.pop("root_version", self.root.version), **kw)

    def pointer(self, index_bytes: bytes, version: str) -> ReleasePointer:
        return ReleasePointer(version, ObjectRef(sha(index_bytes), len(index_bytes), "json"))

    def manifest_doc(
        self,
        pointer: ReleasePointer,
        *,
        sequence: int | None = None,
        expires: datetime | None = None,
    ) -> Manifest:
        if sequence is None:
            self.sequence += 1
            sequence = self.sequence
        return Manifest(
            sequence, expires or NOW + timedelta(days=30), NOW, pointer, "release",
            repository_id=self.repository_id,
        )

    def publish(
        self, version: str = "1.0", **index_kw: Any
    ) -> tuple[bytes, bytes, ReleasePointer]:
        """Sign an index and a manifest pointing at it: (manifest bytes, index bytes, pointer)."""
        index_kw.setdefault("repository_id", self.repository_id)
        index_bytes = self.sign_index(index_doc(version, **index_kw))
        pointer = self.pointer(index_bytes, version)
        return self.sign_manifest(self.manifest_doc(pointer)), index_bytes, pointer
