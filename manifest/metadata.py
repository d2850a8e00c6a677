"""Typed documents: the trust root, the timestamp and manifest, the release index and record.

Each class validates in ``from_dict`` and serialises with ``to_dict``; fields this version does
not know are kept in ``unrecognized`` and written back, so newer publishers can add fields that
older devices tolerate. Every document carries ``_type``, ``spec_version`` and the
``repository_id`` of the store it belongs to (fixed in the first trust root, checked by
:mod:`manifest.trust`). Signed ones travel in an envelope
``{"signed": {...}, "signatures": [{"keyid": hex, "sig": hex}]}``: the root (role ``root``),
the release record ``releases/<version>.json`` and the manifest (role ``release``), and the
timestamp around the manifest (role ``timestamp``). The release index is unsigned canonical
JSON: the signed manifest and release record pin its length and SHA-256. See docs/FORMAT.md.

The entries of an index (:mod:`manifest.entries`) and the field rules (times, names, versions)
are re-exported here, so ``from manifest.metadata import X`` reaches every format class.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ._fields import (
    HEX64,
    SPEC_VERSION,
    FieldReader,
    check_channel,
    check_device_id,
    check_file_path,
    check_group_name,
    check_repository_id,
    check_version,
    document_header,
    format_time,
    parse_list,
    parse_time,
    read_document_header,
)
from .constants import DEFAULT_CHANNEL, WEIGHT_INDEX_FILE
from .entries import (
    FileEntry,
    GroupEntry,
    ObjectRef,
    PatchRef,
    ReleasePointer,
    TensorEntry,
    folder_clash,
    index_dict,
    index_ref,
)
from .errors import FormatError, UnsafeNameError
from .rollout import Rollout
from .signing import PublicKey

__all__ = [
    "SPEC_VERSION",
    "FieldReader",
    "FileEntry",
    "GroupEntry",
    "Manifest",
    "ObjectRef",
    "PatchRef",
    "ReleaseIndex",
    "ReleasePointer",
    "ReleaseRecord",
    "Role",
    "Rollout",
    "Root",
    "TensorEntry",
    "Timestamp",
    "check_channel",
    "check_device_id",
    "check_file_path",
    "check_group_name",
    "check_repository_id",
    "check_version",
    "format_time",
    "parse_time",
]


@dataclass(frozen=True)
class ReleaseIndex:
    """Everything a device needs to build one released version (``_type: deltaship.release``)."""

    TYPE = "deltaship.release"

    version: str
    released_at: datetime
    groups: tuple[GroupEntry, ...]
    files: tuple[FileEntry, ...]
    deltas_from: tuple[str, ...] = ()
    unrecognized: Mapping[str, Any] = field(default_factory=dict)
    repository_id: str = field(kw_only=True)  # the store's, as in its trust root

    @classmethod
    def from_dict(cls, d: Any) -> ReleaseIndex:
        r = FieldReader(d, "release index")
        repository_id = read_document_header(r, cls.TYPE)
        version = check_version(r.get("version", str))
        released_at = parse_time(r.get("released_at", str), "release index released_at")
        groups = tuple(parse_list(r.get("groups", list), "groups", GroupEntry.from_dict))
        files = tuple(parse_list(r.get("files", list), "files", FileEntry.from_dict))
        deltas_from = tuple(
            check_version(v, "deltas_from")
            for v in parse_list(r.optional("deltas_from", []), "deltas_from", lambda v, w: v)
        )
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise FormatError("release index lists a group twice")
        paths = {f.path for f in files} | {g.file for g in groups}
        if len(paths) != len(files) + len(groups):
            raise FormatError("release index lists a file twice")
        if WEIGHT_INDEX_FILE in paths:
            raise UnsafeNameError(f"release index ships {WEIGHT_INDEX_FILE}, which devices write")
        clash = folder_clash(paths)
        if clash is not None:
            raise UnsafeNameError(f"release index uses {clash!r} as a file and a folder")
        tensor_names = [t.name for g in groups for t in g.tensors]
        if len(set(tensor_names)) != len(tensor_names):
            raise FormatError("release index lists a tensor in two groups")
        return cls(version, released_at, groups, files, deltas_from, r.rest(),
                   repository_id=repository_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            **document_header(self.TYPE, self.repository_id, self.unrecognized),
            "version": self.version,
            "released_at": format_time(self.released_at),
            "deltas_from": list(self.deltas_from),
            "groups": [g.to_dict() for g in self.groups],
            "files": [f.to_dict() for f in self.files],
        }

    def group(self, name: str) -> GroupEntry | None:
        for g in self.groups:
            if g.name == name:
                return g
        return None

    @property
    def total_size(self) -> int:
        """Sum of the group files' lengths (what a full, unpatched copy holds)."""
        return sum(g.length for g in self.groups)


@dataclass(frozen=True)
class ReleaseRecord:
    """``releases/<version>.json`` (``_type: deltaship.release-record``, docs/FORMAT.md §9).

    When a version was released (at which manifest sequence) and which index it is, signed by
    the ``release`` role in the same pass as the manifest that made it current. The publisher
    reads it to list releases, to revert and to find delta bases; devices never read it.
    """

    TYPE = "deltaship.release-record"
    MAX_SIZE = 64 * 1024

    version: str
    sequence: int
    released_at: datetime
    index: ObjectRef
    unrecognized: Mapping[str, Any] = field(default_factory=dict)
    repository_id: str = field(kw_only=True)

    @property
    def pointer(self) -> ReleasePointer:
        return ReleasePointer(self.version, self.index)

    @classmethod
    def from_dict(cls, d: Any, where: str = "release record") -> ReleaseRecord:
        r = FieldReader(d, where)
        repository_id = read_document_header(r, cls.TYPE)
        return cls(
            check_version(r.get("version", str), f"{where}.version"),
            r.count("sequence"),
            parse_time(r.get("released_at", str), f"{where} released_at"),
            index_ref(r.get("index", dict), f"{where}.index"),
            r.rest(),
            repository_id=repository_id,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **document_header(self.TYPE, self.repository_id, self.unrecognized),
            "version": self.version,
            "sequence": self.sequence,
            "released_at": format_time(self.released_at),
            "index": index_dict(self.index),
        }


ACTIONS = ("release", "revert", "promote", "rollout")


def _action(v: Any) -> str:
    if v not in ACTIONS:
        raise FormatError(f"manifest.action {v!r} is not one of {', '.join(ACTIONS)}")
    return str(v)


@dataclass(frozen=True)
class Manifest:
    """What is current (``_type: deltaship.manifest``), signed by the ``release`` role.

    It travels inside the :class:`Timestamp` (``manifest.json``), which the online
    ``timestamp`` role re-signs to attest freshness without changing it.
    """

    TYPE = "deltaship.manifest"

    sequence: int
    expires: datetime
    published_at: datetime
    current: ReleasePointer  # with a rollout: the fallback, what devices outside it run
    action: str = "release"  # "release", "revert", "promote" or "rollout"
    unrecognized: Mapping[str, Any] = field(default_factory=dict)
    repository_id: str = field(kw_only=True)  # the store's, as in its trust root
    channel: str = field(default=DEFAULT_CHANNEL, kw_only=True)
    rollout: Rollout | None = field(default=None, kw_only=True)
    # The ``signed`` object this manifest was parsed from (None: built here). Re-attesting it
    # (``refresh``: a new timestamp, the release signatures kept) must carry these exact
    # fields, not a re-serialisation: an older writer's (no ``channel``) or a newer one's
    # (fields this version does not write) differs from :meth:`to_dict`.
    source: Mapping[str, Any] | None = field(default=None, kw_only=True, compare=False,
                                             repr=False)

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        r = FieldReader(d, "manifest")
        repository_id = read_document_header(r, cls.TYPE)
        seq = r.count("sequence")
        expires = parse_time(r.get("expires", str), "manifest expires")
        published = parse_time(r.get("published_at", str), "manifest published_at")
        current = ReleasePointer.from_dict(r.get("current", dict), "manifest.current")
        action = _action(r.optional("action", "release"))
        channel = check_channel(r.take("channel", str, DEFAULT_CHANNEL), "manifest.channel")
        rollout_d = r.take("rollout", dict, None)
        rollout = Rollout.from_dict(rollout_d) if rollout_d is not None else None
        return cls(seq, expires, published, current, action, r.rest(),
                   repository_id=repository_id, channel=channel, rollout=rollout,
                   source=copy.deepcopy(d))

    def signed_dict(self) -> dict[str, Any]:
        """What the release keys signed: the parsed document exactly as it was (so its kept
        signatures still verify), or :meth:`to_dict` for a manifest built here."""
        return copy.deepcopy(dict(self.source)) if self.source is not None else self.to_dict()

    def to_dict(self) -> dict[str, Any]:
        d = {
            **document_header(self.TYPE, self.repository_id, self.unrecognized),
            "channel": self.channel,
            "sequence": self.sequence,
            "expires": format_time(self.expires),
            "published_at": format_time(self.published_at),
            "current": self.current.to_dict(),
            "action": self.action,
        }
        if self.rollout is not None:
            d["rollout"] = self.rollout.to_dict()
        return d


@dataclass(frozen=True)
class Timestamp:
    """The freshness document (``_type: deltaship.timestamp``), signed by the ``timestamp`` role.

    ``manifest.json`` is this document's envelope with the release-signed :class:`Manifest`
    embedded in it and the manifest's own signatures beside (docs/FORMAT.md §5). ``sequence``
    goes up with every write of ``manifest.json`` (release, revert, refresh); ``root_version``
    names the newest trust root (``roots/<N>.json``) so devices learn of a rotation from the
    document they poll anyway.
    """

    TYPE = "deltaship.timestamp"

    sequence: int
    expires: datetime
    root_version: int
    manifest: Manifest
    unrecognized: Mapping[str, Any] = field(default_factory=dict)
    repository_id: str = field(kw_only=True)

    @classmethod
    def from_dict(cls, d: Any) -> Timestamp:
        r = FieldReader(d, "timestamp")
        repository_id = read_document_header(r, cls.TYPE)
        sequence = r.count("sequence")
        expires = parse_time(r.get("expires", str), "timestamp expires")
        root_version = r.count("root_version")
        if root_version < 1:
            raise FormatError("timestamp.root_version must be at least 1")
        manifest = Manifest.from_dict(r.get("manifest", dict))
        return cls(sequence, expires, root_version, manifest, r.rest(),
                   repository_id=repository_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            **document_header(self.TYPE, self.repository_id, self.unrecognized),
            "sequence": self.sequence,
            "expires": format_time(self.expires),
            "root_version": self.root_version,
            "manifest": self.manifest.signed_dict(),
        }

    # What callers of the old single-document manifest read, kept as shortcuts.
    @property
    def current(self) -> ReleasePointer:
        return self.manifest.current


@dataclass(frozen=True)
class Role:
    keyids: tuple[str, ...]
    threshold: int
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Role:
        r = FieldReader(d, where)
        keyids = tuple(parse_list(r.get("keyids", list), f"{where}.keyids", _keyid))
        threshold = r.count("threshold")
        if threshold < 1 or threshold > len(set(keyids)):
            raise FormatError(f"{where}: threshold {threshold} is not between 1 and its keys")
        return cls(keyids, threshold, r.rest())

    def to_dict(self) -> dict[str, Any]:
        return {**self.unrecognized, "keyids": list(self.keyids), "threshold": self.threshold}


def _keyid(v: Any, where: str) -> str:
    if not isinstance(v, str) or not HEX64.match(v):
        raise FormatError(f"{where} is not a key id")
    return v


@dataclass(frozen=True)
class Root:
    """The trust root (``_type: deltaship.root``): keys and which of them sign what.

    Role ``root`` signs the root itself and its successor (``roots/<version+1>.json``); role
    ``release`` signs manifests and release records; role ``timestamp`` (online) re-signs the
    freshness of a manifest. ``repository_id`` names the store: chosen at random by
    ``init`` in version 1 and carried unchanged by every later version (whatever its keys), so
    a document signed for another store with the same keys is told apart.
    """

    TYPE = "deltaship.root"
    ROLES = ("root", "release", "timestamp")

    version: int
    expires: datetime
    keys: Mapping[str, PublicKey]
    roles: Mapping[str, Role]
    unrecognized: Mapping[str, Any] = field(default_factory=dict)
    repository_id: str = field(kw_only=True)
    # Per key id, the fields of its ``keys`` entry this version does not know (kept, §2).
    key_fields: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, kw_only=True,
                                                        compare=False)

    @classmethod
    def from_dict(cls, d: Any) -> Root:
        r = FieldReader(d, "root")
        repository_id = read_document_header(r, cls.TYPE)
        version = r.count("version")
        expires = parse_time(r.get("expires", str), "root expires")
        keys: dict[str, PublicKey] = {}
        key_fields: dict[str, Mapping[str, Any]] = {}
        for kid, kd in r.get("keys", dict).items():
            kr = FieldReader(kd, f"root.keys.{kid}")
            if kr.get("scheme", str) != "ed25519":
                raise FormatError(f"root key {kid} uses an unknown scheme")
            try:
                public = bytes.fromhex(kr.get("public", str))
            except ValueError as e:
                raise FormatError(f"root key {kid} is not hex") from e
            key = PublicKey(public, str(kr.optional("name", "")))
            if len(public) != 32 or key.keyid != kid:
                raise FormatError(f"root key {kid} does not match its key id")
            keys[kid] = key
            if kr.rest():
                key_fields[kid] = kr.rest()
        roles = {
            name: Role.from_dict(rd, f"root.roles.{name}")
            for name, rd in r.get("roles", dict).items()
        }
        for name in cls.ROLES:
            if name not in roles:
                raise FormatError(f"root has no {name!r} role")
            missing = [k for k in roles[name].keyids if k not in keys]
            if missing:
                raise FormatError(f"root role {name!r} names unknown key {missing[0]}")
        return cls(version, expires, keys, roles, r.rest(), repository_id=repository_id,
                   key_fields=key_fields)

    def to_dict(self) -> dict[str, Any]:
        return {
            **document_header(self.TYPE, self.repository_id, self.unrecognized),
            "version": self.version,
            "expires": format_time(self.expires),
            "keys": {
                kid: {**self.key_fields.get(kid, {}), "scheme": "ed25519",
                      "public": k.public.hex(), "name": k.name}
                for kid, k in self.keys.items()
            },
            "roles": {name: role.to_dict() for name, role in self.roles.items()},
        }
