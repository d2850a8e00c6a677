"""Typed signed documents: the trust root, the manifest and the release index.

Each class validates in ``from_dict`` and serialises with ``to_dict``; fields this version does
not know are kept in ``unrecognized`` and written back, so newer publishers can add fields that
older devices tolerate. Every signed document carries ``_type`` and ``spec_version``. The wire
form is an envelope ``{"signed": {...}, "signatures": [{"keyid": hex, "sig": hex}]}``; see
docs/FORMAT.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from .constants import WEIGHT_INDEX_FILE, object_key
from .errors import FormatError, UnsafeNameError
from .signing import PublicKey

__all__ = [
    "SPEC_VERSION",
    "FileEntry",
    "GroupEntry",
    "Manifest",
    "ObjectRef",
    "PatchRef",
    "ReleaseIndex",
    "ReleasePointer",
    "Role",
    "Root",
    "TensorEntry",
    "check_file_path",
    "check_group_name",
    "format_time",
    "parse_time",
]

SPEC_VERSION = 1
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# \Z, not $: "$" also matches before a trailing newline, which would let "name\n" through.
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}\Z")
_PATH_PART = re.compile(r"^[^/\\\x00-\x1f\x7f]{1,255}\Z")
_VERSION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}\Z")

T = TypeVar("T")


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime(_TIME_FORMAT)


def parse_time(s: object, where: str) -> datetime:
    if not isinstance(s, str):
        raise FormatError(f"{where} must be a time string like 2026-01-31T12:00:00Z")
    try:
        return datetime.strptime(s, _TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError as e:
        raise FormatError(f"{where} is not a time like 2026-01-31T12:00:00Z: {s!r}") from e


def check_group_name(name: str) -> str:
    """Group names become file names on devices: a conservative alphabet, no dot-dot."""
    if not isinstance(name, str) or not _GROUP_NAME.match(name) or ".." in name:
        raise UnsafeNameError(f"unsafe group name {name!r}")
    return name


def check_file_path(path: str) -> str:
    """A relative POSIX path that cannot escape the model directory."""
    if not isinstance(path, str) or not path or len(path) > 1024 or path.startswith("/"):
        raise UnsafeNameError(f"unsafe file name {path!r}")
    for part in path.split("/"):
        if part in ("", ".", "..") or not _PATH_PART.match(part):
            raise UnsafeNameError(f"unsafe file name {path!r}")
    return path


def check_version(v: object, where: str = "version") -> str:
    if not isinstance(v, str) or not _VERSION.match(v):
        raise FormatError(
            f"{where} {v!r} is not a valid version (letters, digits, '.', '_', '+', '-')"
        )
    return v


class _Reader:
    """Pops typed fields from a dict; what is left over is ``unrecognized``."""

    def __init__(self, d: object, where: str) -> None:
        if not isinstance(d, dict):
            raise FormatError(f"{where} must be a JSON object")
        self.d: dict[str, Any] = dict(d)
        self.where = where

    def get(self, key: str, kind: type[T] | tuple[type, ...]) -> Any:
        if key not in self.d:
            raise FormatError(f"{self.where}: missing field {key!r}")
        v = self.d.pop(key)
        if (isinstance(v, bool) and kind is int) or not isinstance(v, kind):
            raise FormatError(f"{self.where}.{key} has the wrong type")
        return v

    def count(self, key: str) -> int:
        v: int = self.get(key, int)
        if v < 0:
            raise FormatError(f"{self.where}.{key} must not be negative")
        return v

    def sha256(self, key: str = "sha256") -> str:
        v: str = self.get(key, str)
        if not _HEX64.match(v):
            raise FormatError(f"{self.where}.{key} is not a lowercase hex sha256")
        return v

    def optional(self, key: str, default: Any) -> Any:
        return self.d.pop(key, default)

    def rest(self) -> dict[str, Any]:
        return self.d


def _check_header(r: _Reader, type_name: str) -> None:
    t = r.get("_type", str)
    if t != type_name:
        raise FormatError(f"{r.where} has _type {t!r}, expected {type_name!r}")
    v = r.get("spec_version", int)
    if v != SPEC_VERSION:
        raise FormatError(
            f"{r.where} has spec_version {v}; this deltaship understands {SPEC_VERSION}: upgrade"
        )


def _list(value: Any, where: str, parse: Callable[[Any, str], T]) -> list[T]:
    if not isinstance(value, list):
        raise FormatError(f"{where} must be a list")
    return [parse(v, f"{where}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class ObjectRef:
    """A content-addressed object in the store: key ``objects/<sha256>``."""

    sha256: str
    length: int
    encoding: str  # "dspatch" (a patch container) or "zstd" (one zstd frame)
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def key(self) -> str:
        return object_key(self.sha256)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ObjectRef:
        r = _Reader(d, where)
        enc = r.get("encoding", str)
        if enc not in ("dspatch", "zstd"):
            raise FormatError(f"{where}.encoding {enc!r} is unknown")
        return cls(r.sha256(), r.count("length"), enc, r.rest())

    def to_dict(self) -> dict[str, Any]:
        return {**self.unrecognized, "sha256": self.sha256, "length": self.length,
                "encoding": self.encoding}


@dataclass(frozen=True)
class PatchRef:
    """A patch turning the group content ``base_sha256`` (from ``base_version``) into this one."""

    base_version: str
    base_sha256: str
    object: ObjectRef
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> PatchRef:
        r = _Reader(d, where)
        return cls(
            check_version(r.get("base_version", str), f"{where}.base_version"),
            r.sha256("base_sha256"),
            ObjectRef.from_dict(r.get("object", dict), f"{where}.object"),
            r.rest(),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.unrecognized,
            "base_version": self.base_version,
            "base_sha256": self.base_sha256,
            "object": self.object.to_dict(),
        }


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TensorEntry:
        r = _Reader(d, where)
        shape = r.get("shape", list)
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape):
            raise FormatError(f"{where}.shape must be a list of non-negative integers")
        return cls(r.get("name", str), r.get("dtype", str), tuple(shape), r.rest())

    def to_dict(self) -> dict[str, Any]:
        return {**self.unrecognized, "name": self.name, "dtype": self.dtype,
                "shape": list(self.shape)}


@dataclass(frozen=True)
class GroupEntry:
    """One group: its canonical safetensors file, how to get it in full, and patches to it."""

    name: str
    file: str
    sha256: str
    length: int
    tensors: tuple[TensorEntry, ...]
    full: ObjectRef
    patches: tuple[PatchRef, ...] = ()
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> GroupEntry:
        r = _Reader(d, where)
        name = check_group_name(r.get("name", str))
        file = check_file_path(r.get("file", str))
        if file != f"{name}.safetensors":
            raise UnsafeNameError(f"{where}: group {name!r} has file {file!r}")
        return cls(
            name,
            file,
            r.sha256(),
            r.count("length"),
            tuple(_list(r.get("tensors", list), f"{where}.tensors", TensorEntry.from_dict)),
            ObjectRef.from_dict(r.get("full", dict), f"{where}.full"),
            tuple(_list(r.optional("patches", []), f"{where}.patches", PatchRef.from_dict)),
            r.rest(),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.unrecognized,
            "name": self.name,
            "file": self.file,
            "sha256": self.sha256,
            "length": self.length,
            "tensors": [t.to_dict() for t in self.tensors],
            "full": self.full.to_dict(),
            "patches": [p.to_dict() for p in self.patches],
        }


@dataclass(frozen=True)
class FileEntry:
    """A non-tensor file of the model (config.json, tokenizer files, ...), shipped whole."""

    path: str
    sha256: str
    length: int
    object: ObjectRef
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> FileEntry:
        r = _Reader(d, where)
        return cls(
            check_file_path(r.get("path", str)),
            r.sha256(),
            r.count("length"),
            ObjectRef.from_dict(r.get("object", dict), f"{where}.object"),
            r.rest(),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.unrecognized,
            "path": self.path,
            "sha256": self.sha256,
            "length": self.length,
            "object": self.object.to_dict(),
        }


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

    @classmethod
    def from_dict(cls, d: Any) -> ReleaseIndex:
        r = _Reader(d, "release index")
        _check_header(r, cls.TYPE)
        version = check_version(r.get("version", str))
        released_at = parse_time(r.get("released_at", str), "release index released_at")
        groups = tuple(_list(r.get("groups", list), "groups", GroupEntry.from_dict))
        files = tuple(_list(r.get("files", list), "files", FileEntry.from_dict))
        deltas_from = tuple(
            check_version(v, "deltas_from")
            for v in _list(r.optional("deltas_from", []), "deltas_from", lambda v, w: v)
        )
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise FormatError("release index lists a group twice")
        paths = {f.path for f in files} | {g.file for g in groups}
        if len(paths) != len(files) + len(groups):
            raise FormatError("release index lists a file twice")
        if WEIGHT_INDEX_FILE in paths:
            raise UnsafeNameError(f"release index ships {WEIGHT_INDEX_FILE}, which devices write")
        folders = {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)}
        if folders & paths:
            raise UnsafeNameError(
                f"release index uses {sorted(folders & paths)[0]!r} as a file and a folder"
            )
        tensor_names = [t.name for g in groups for t in g.tensors]
        if len(set(tensor_names)) != len(tensor_names):
            raise FormatError("release index lists a tensor in two groups")
        return cls(version, released_at, groups, files, deltas_from, r.rest())

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.unrecognized,
            "_type": self.TYPE,
            "spec_version": SPEC_VERSION,
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
class ReleasePointer:
    """The current release named by a manifest: a version and its index object."""

    version: str
    index: ObjectRef

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ReleasePointer:
        r = _Reader(d, where)
        version = check_version(r.get("version", str), f"{where}.version")
        ir = _Reader(r.get("index", dict), f"{where}.index")
        return cls(version, ObjectRef(ir.sha256(), ir.count("length"), "json"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "index": {"sha256": self.index.sha256, "length": self.index.length},
        }


def _action(v: Any) -> str:
    if v not in ("release", "revert"):
        raise FormatError(f"manifest.action {v!r} is not 'release' or 'revert'")
    return str(v)


@dataclass(frozen=True)
class Manifest:
    """The one mutable, signed document per store prefix (``_type: deltaship.manifest``)."""

    TYPE = "deltaship.manifest"

    sequence: int
    expires: datetime
    published_at: datetime
    current: ReleasePointer
    action: str = "release"  # "release" or "revert"
    unrecognized: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        r = _Reader(d, "manifest")
        _check_header(r, cls.TYPE)
        return cls(
            r.count("sequence"),
            parse_time(r.get("expires", str), "manifest expires"),
            parse_time(r.get("published_at", str), "manifest published_at"),
            ReleasePointer.from_dict(r.get("current", dict), "manifest.current"),
            _action(r.optional("action", "release")),
            r.rest(),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.unrecognized,
            "_type": self.TYPE,
            "spec_version": SPEC_VERSION,
            "sequence": self.sequence,
            "expires": format_time(self.expires),
            "published_at": format_time(self.published_at),
            "current": self.current.to_dict(),
            "action": self.action,
        }


@dataclass(frozen=True)
class Role:
    keyids: tuple[str, ...]
    threshold: int

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Role:
        r = _Reader(d, where)
        keyids = tuple(_list(r.get("keyids", list), f"{where}.keyids", _keyid))
        threshold = r.count("threshold")
        if threshold < 1 or threshold > len(set(keyids)):
            raise FormatError(f"{where}: threshold {threshold} is not between 1 and its keys")
        return cls(keyids, threshold)

    def to_dict(self) -> dict[str, Any]:
        return {"keyids": list(self.keyids), "threshold": self.threshold}


def _keyid(v: Any, where: str) -> str:
    if not isinstance(v, str) or not _HEX64.match(v):
        raise FormatError(f"{where} is not a key id")
    return v


@dataclass(frozen=True)
class Root:
    """The trust root (``_type: deltaship.root``): keys and which of them sign what.

    Role ``root`` signs the root itself (and, later, its successor); role ``release`` signs
    manifests and release indexes.
    """

    TYPE = "deltaship.root"
    ROLES = ("root", "release")

    version: int
    expires: datetime
    keys: Mapping[str, PublicKey]
    roles: Mapping[str, Role]
    unrecognized: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> Root:
        r = _Reader(d, "root")
        _check_header(r, cls.TYPE)
        version = r.count("version")
        expires = parse_time(r.get("expires", str), "root expires")
        keys: dict[str, PublicKey] = {}
        for kid, kd in r.get("keys", dict).items():
            kr = _Reader(kd, f"root.keys.{kid}")
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
        return cls(version, expires, keys, roles, r.rest())

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.unrecognized,
            "_type": self.TYPE,
            "spec_version": SPEC_VERSION,
            "version": self.version,
            "expires": format_time(self.expires),
            "keys": {
                kid: {"scheme": "ed25519", "public": k.public.hex(), "name": k.name}
                for kid, k in self.keys.items()
            },
            "roles": {name: role.to_dict() for name, role in self.roles.items()},
        }
