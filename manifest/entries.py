"""The entries of a release index: object references, patches, chain steps, tensors, groups and
files.

Each validates in ``from_dict`` and keeps fields it does not know in ``unrecognized`` (written
back by ``to_dict``, and ignored by ``==``), so a newer publisher can add fields that older
devices carry along. See docs/FORMAT.md §6.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._fields import (
    HEX64,
    FieldReader,
    check_file_path,
    check_group_name,
    check_version,
    parse_list,
)
from .constants import object_key
from .errors import FormatError, OversizeError, UnsafeNameError

__all__ = [
    "MAX_CONTENT_LENGTH",
    "MAX_GROUP_CHAIN",
    "MAX_GROUP_TENSORS",
    "MAX_INDEX_DELTAS",
    "MAX_INDEX_SIZE",
    "MAX_TENSOR_RANK",
    "ChainStep",
    "FileEntry",
    "GroupEntry",
    "IndexDelta",
    "IndexPacking",
    "ObjectRef",
    "PackedIndex",
    "PatchRef",
    "ReleasePointer",
    "TensorEntry",
    "folder_clash",
    "index_dict",
    "index_ref",
]

# Caps on the size fields of an index (docs/FORMAT.md §6), checked while parsing: generous for
# any real model, but they keep a signed index from naming sizes a device cannot handle.
MAX_CONTENT_LENGTH = 1 << 40  # bytes of one object, group file or file (1 TiB)
MAX_GROUP_TENSORS = 1 << 16  # tensors in one group
MAX_TENSOR_RANK = 16  # dimensions of one tensor
MAX_GROUP_CHAIN = 256  # chain steps of one group (publishers write at most 16)
MAX_INDEX_SIZE = 16 * 1024 * 1024  # bytes of a release index (and of each packed form of it)
MAX_INDEX_DELTAS = 8  # delta forms one index reference lists


def _length(r: FieldReader, key: str = "length") -> int:
    n = r.count(key)
    if n > MAX_CONTENT_LENGTH:
        raise OversizeError(f"{r.where}.{key} {n} is over the cap {MAX_CONTENT_LENGTH}")
    return n


@dataclass(frozen=True)
class ObjectRef:
    """A content-addressed object in the store: key ``objects/<sha256>``."""

    sha256: str
    length: int
    encoding: str  # "dspatch" (a patch container) or "zstd" (one zstd frame)
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)
    # A release index's packed forms (index references only; ignored by ``==``: they are
    # how the index travels, not what it is).
    packing: IndexPacking = field(default_factory=lambda: IndexPacking(), compare=False,
                                  kw_only=True)

    @property
    def key(self) -> str:
        return object_key(self.sha256)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ObjectRef:
        r = FieldReader(d, where)
        enc = r.get("encoding", str)
        if enc not in ("dspatch", "zstd"):
            raise FormatError(f"{where}.encoding {enc!r} is unknown")
        return cls(r.sha256(), _length(r), enc, r.rest())

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
        r = FieldReader(d, where)
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
class ChainStep:
    """A patch an earlier release published: it turns the group content ``base_sha256`` into
    the intermediate content ``sha256`` of ``length`` bytes (docs/FORMAT.md §6)."""

    base_sha256: str
    sha256: str
    length: int
    object: ObjectRef
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ChainStep:
        r = FieldReader(d, where)
        step = cls(r.sha256("base_sha256"), r.sha256(), _length(r),
                   ObjectRef.from_dict(r.get("object", dict), f"{where}.object"), r.rest())
        if step.object.encoding != "dspatch" or step.base_sha256 == step.sha256:
            raise FormatError(f"{where} is not a patch from one content to another")
        return step

    def to_dict(self) -> dict[str, Any]:
        return {**self.unrecognized, "base_sha256": self.base_sha256, "sha256": self.sha256,
                "length": self.length, "object": self.object.to_dict()}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TensorEntry:
        r = FieldReader(d, where)
        shape = r.get("shape", list)
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape):
            raise FormatError(f"{where}.shape must be a list of non-negative integers")
        if len(shape) > MAX_TENSOR_RANK:
            raise OversizeError(f"{where}.shape has more than {MAX_TENSOR_RANK} dimensions")
        return cls(r.get("name", str), r.get("dtype", str), tuple(shape), r.rest())

    def to_dict(self) -> dict[str, Any]:
        return {**self.unrecognized, "name": self.name, "dtype": self.dtype,
                "shape": list(self.shape)}


@dataclass(frozen=True)
class GroupEntry:
    """One group: its canonical safetensors file, how to get it in full, patches to it, and
    the ``chain`` of earlier patches that lead to the bases of those patches (empty: none)."""

    name: str
    file: str
    sha256: str
    length: int
    tensors: tuple[TensorEntry, ...]
    full: ObjectRef
    patches: tuple[PatchRef, ...] = ()
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)
    chain: tuple[ChainStep, ...] = ()

    @classmethod
    def from_dict(cls, d: Any, where: str) -> GroupEntry:
        r = FieldReader(d, where)
        name = check_group_name(r.get("name", str))
        file = check_file_path(r.get("file", str))
        if file != f"{name}.safetensors":
            raise UnsafeNameError(f"{where}: group {name!r} has file {file!r}")
        sha256, length = r.sha256(), _length(r)
        tensors = r.get("tensors", list)
        if len(tensors) > MAX_GROUP_TENSORS:
            raise OversizeError(f"{where}.tensors lists more than {MAX_GROUP_TENSORS} tensors")
        entries = tuple(parse_list(tensors, f"{where}.tensors", TensorEntry.from_dict))
        chain = r.optional("chain", [])
        if isinstance(chain, list) and len(chain) > MAX_GROUP_CHAIN:
            raise OversizeError(f"{where}.chain lists more than {MAX_GROUP_CHAIN} steps")
        return cls(
            name,
            file,
            sha256,
            length,
            entries,
            ObjectRef.from_dict(r.get("full", dict), f"{where}.full"),
            tuple(parse_list(r.optional("patches", []), f"{where}.patches", PatchRef.from_dict)),
            r.rest(),
            tuple(parse_list(chain, f"{where}.chain", ChainStep.from_dict)),
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
            **({"chain": [c.to_dict() for c in self.chain]} if self.chain else {}),
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
        r = FieldReader(d, where)
        return cls(
            check_file_path(r.get("path", str)),
            r.sha256(),
            _length(r),
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


def _check_packed(sha256: Any, length: Any, where: str) -> None:
    if not isinstance(sha256, str) or not HEX64.match(sha256):
        raise FormatError(f"{where}.sha256 is not a lowercase hex sha256")
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise FormatError(f"{where}.length must be a positive integer")
    if length > MAX_INDEX_SIZE:
        raise OversizeError(f"{where}.length {length} is over the index cap {MAX_INDEX_SIZE}")


@dataclass(frozen=True)
class PackedIndex:
    """The index as one zstd frame, stored at ``objects/<sha256>`` (docs/FORMAT.md §5)."""

    sha256: str
    length: int
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _check_packed(self.sha256, self.length, "index.zstd")

    @property
    def key(self) -> str:
        return object_key(self.sha256)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> PackedIndex:
        r = FieldReader(d, where)
        return cls(r.sha256(), r.count("length"), r.rest())

    def to_dict(self) -> dict[str, Any]:
        return {**self.unrecognized, "sha256": self.sha256, "length": self.length}


@dataclass(frozen=True)
class IndexDelta:
    """The index as one zstd frame coded with the index whose SHA-256 is ``base`` (JSON
    ``from``) as a raw-content dictionary, stored at ``objects/<sha256>``."""

    base: str
    sha256: str
    length: int
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.base, str) or not HEX64.match(self.base):
            raise FormatError("index.deltas[].from is not a lowercase hex sha256")
        _check_packed(self.sha256, self.length, "index.deltas[]")

    @property
    def key(self) -> str:
        return object_key(self.sha256)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> IndexDelta:
        r = FieldReader(d, where)
        return cls(r.sha256("from"), r.sha256(), r.count("length"), r.rest())

    def to_dict(self) -> dict[str, Any]:
        return {**self.unrecognized, "from": self.base, "sha256": self.sha256,
                "length": self.length}


@dataclass(frozen=True)
class IndexPacking:
    """The packed forms of a release index a pointer offers besides the raw object: at most
    :data:`MAX_INDEX_DELTAS` deltas, sorted by ``from`` (each base once)."""

    zstd: PackedIndex | None = None
    deltas: tuple[IndexDelta, ...] = ()

    def __post_init__(self) -> None:
        if len(self.deltas) > MAX_INDEX_DELTAS:
            raise OversizeError(f"index.deltas lists {len(self.deltas)} deltas, more than "
                                f"{MAX_INDEX_DELTAS}")
        bases = [d.base for d in self.deltas]
        if bases != sorted(set(bases)):
            raise FormatError("index.deltas must be sorted by 'from', each base once")

    def __bool__(self) -> bool:
        return self.zstd is not None or bool(self.deltas)

    def delta_from(self, base_sha256: str) -> IndexDelta | None:
        return next((d for d in self.deltas if d.base == base_sha256), None)

    def objects(self) -> list[str]:
        """The sha256 of every packed object named here."""
        return ([self.zstd.sha256] if self.zstd else []) + [d.sha256 for d in self.deltas]


def index_ref(d: Any, where: str) -> ObjectRef:
    """``{"sha256", "length"}`` of a release index object (its encoding is implicitly JSON),
    with its optional packed forms ``zstd`` and ``deltas`` (:class:`IndexPacking`)."""
    r = FieldReader(d, where)
    sha256, length = r.sha256(), r.count("length")
    zstd = r.take("zstd", dict, None)
    deltas = r.take("deltas", list, [])
    if len(deltas) > MAX_INDEX_DELTAS:
        raise OversizeError(f"{where}.deltas lists more than {MAX_INDEX_DELTAS} deltas")
    packing = IndexPacking(
        None if zstd is None else PackedIndex.from_dict(zstd, f"{where}.zstd"),
        tuple(parse_list(deltas, f"{where}.deltas", IndexDelta.from_dict)))
    return ObjectRef(sha256, length, "json", r.rest(), packing=packing)


def index_dict(ref: ObjectRef) -> dict[str, Any]:
    d = {**ref.unrecognized, "sha256": ref.sha256, "length": ref.length}
    if ref.packing.zstd is not None:
        d["zstd"] = ref.packing.zstd.to_dict()
    if ref.packing.deltas:
        d["deltas"] = [x.to_dict() for x in ref.packing.deltas]
    return d


@dataclass(frozen=True)
class ReleasePointer:
    """A version and its release index object: what a manifest names as current."""

    version: str
    index: ObjectRef

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ReleasePointer:
        r = FieldReader(d, where)
        version = check_version(r.get("version", str), f"{where}.version")
        return cls(version, index_ref(r.get("index", dict), f"{where}.index"))

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "index": index_dict(self.index)}


def folder_clash(paths: Iterable[str]) -> str | None:
    """The first path (in sorted order) that another path uses as a folder, if any.

    By sorted lookups, not by listing every folder of every path: a 1 KB path has ~500
    folders of ~500 characters, so listing them takes ~250 KB per path (a 16 MiB index of
    such paths: gigabytes)."""
    ordered = sorted(paths)
    for p in ordered:
        i = bisect.bisect_left(ordered, p + "/")
        if i < len(ordered) and ordered[i].startswith(p + "/"):
            return p
    return None
