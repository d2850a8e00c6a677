"""A version's weights as immutable tensors, and how group files are loaded into them.

A :class:`Weights` snapshot holds one version: the tensors its ``model.safetensors.index.json``
(:data:`manifest.constants.WEIGHT_INDEX_FILE`) maps, read from its group files with the strict
safetensors reader (:class:`manifest.safetensors_format.SafetensorsFile`). :func:`load_version`
builds one; :class:`~edge_agent.serving.live.LiveModel` swaps them when the agent switches
versions.

**Only changed groups are loaded.** A group file is identified by ``(st_dev, st_ino, st_size,
st_mtime_ns)``. Versions are hard links into the content-addressed ``objects/<sha256>`` and the
agent never rewrites a file in place, so a group unchanged between two versions is the same
inode in both and its :class:`Group` (and :class:`Tensor` objects) is reused as it is; new
content is always a new inode. A mapped file holds its inode, so the number cannot be reused
while a snapshot maps it; size and mtime guard :func:`read_group`, which holds nothing. The
release index's sha256 would name what the agent meant to link, not the file that is mapped
(after ``verify --repair`` relinks a damaged file the sha is the same, the inode is new), and
would tie serving code to the agent's private ``.deltaship/`` files.

**Memory.** :func:`map_group` (the default) maps each group file read-only and shared: tensors
are views of the page cache, one copy shared by every process serving the model, reclaimable
under pressure, never duplicated into the heap. A swap adds the changed groups' pages only
(``MAP_POPULATE`` reads them before the swap, so the first request on the new version does not
fault them in from disk); the old groups' pages are released when the last request holding the
old snapshot drops it. Measured (one process, warm page cache) on a 256 MiB model of 8 groups,
swapping 2 of them; RSS growth in MiB, file-backed + anonymous::

                                  after open   both snapshots held   old snapshot dropped
    map_group                     256 + 0      320 + 0               256 + 0
    map_group, full reload        256 + 0      512 + 0               256 + 0
    read_group                    0 + 272      0 + 336               0 + 336

Loading the two changed groups took 3 ms with ``map_group`` and 113 ms with ``read_group``.
A full reload maps the unchanged pages a second time: no new physical pages, but RSS (what
OOM killers and monitoring read) doubles. ``read_group`` puts the whole model in private heap
in every serving process (plus a page cache copy while reading), and the heap kept the freed
64 MiB after the swap; ``map_group``'s pages are the page cache itself, shared and evictable.
A mapping also keeps a pruned version's disk space until the last request holding it ends.
On Python < 3.13 each mapping keeps one file descriptor open: N group files, N descriptors.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from manifest.constants import SINGLE_WEIGHTS_FILE, WEIGHT_INDEX_FILE
from manifest.errors import ModelError
from manifest.safetensors_format import SafetensorsFile

from .dtypes import to_float32

__all__ = [
    "FileIdentity",
    "Group",
    "GroupLoader",
    "Tensor",
    "Weights",
    "load_version",
    "map_group",
    "read_group",
]

MAX_WEIGHT_INDEX_SIZE = 64 << 20

_NUMPY_DTYPES: Mapping[str, str] = {
    "BOOL": "?", "U8": "u1", "I8": "i1", "I16": "<i2", "U16": "<u2", "F16": "<f2",
    "I32": "<i4", "U32": "<u4", "F32": "<f4", "I64": "<i8", "U64": "<u8", "F64": "<f8",
}  # fmt: skip


@dataclass(frozen=True, slots=True, eq=False)
class Tensor:
    """One tensor: its little-endian bytes (read-only) with dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    raw: memoryview

    def numpy(self) -> npt.NDArray[Any]:
        """A read-only view for dtypes NumPy has; a new float32 array for BF16 and F8_*."""
        np_dtype = _NUMPY_DTYPES.get(self.dtype)
        if np_dtype is None:
            return to_float32(self.raw, self.dtype, self.shape)
        return np.frombuffer(self.raw, dtype=np_dtype).reshape(self.shape)


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """What a group file's content is known by: same identity, same bytes."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True, slots=True, eq=False)
class Group:
    """One group file of a version and its tensors."""

    file: str
    identity: FileIdentity
    tensors: Mapping[str, Tensor]


@dataclass(frozen=True, slots=True, eq=False)
class Weights:
    """An immutable snapshot of one version: take it once per request."""

    version: str
    path: Path  # the version's directory
    groups: Mapping[str, Group]  # group file name -> group
    tensors: Mapping[str, Tensor]


GroupLoader = Callable[[Path], Mapping[str, Tensor]]
"""Reads one group file's tensors (:func:`map_group` or :func:`read_group`)."""

_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_UNTRACKED_FD: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}


def map_group(path: Path) -> Mapping[str, Tensor]:
    """Tensors as views of a read-only shared mapping of the file (see the module docstring)."""
    with SafetensorsFile(path) as st:
        infos, start, size = list(st.tensors.values()), st.data_start, st.size
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size != size:
            raise ModelError(f"{path}: the file changed while being opened")
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | _POPULATE,
                           prot=mmap.PROT_READ, **_UNTRACKED_FD)
    view = memoryview(mapped)  # unmapped when the last tensor view of it is dropped
    return {t.name: Tensor(t.name, t.dtype, t.shape, view[start + t.begin:start + t.end])
            for t in infos}


def read_group(path: Path) -> Mapping[str, Tensor]:
    """Tensors read into private memory (for filesystems that cannot be mapped)."""
    with SafetensorsFile(path) as st:
        return {t.name: Tensor(t.name, t.dtype, t.shape, memoryview(st.read(t)))
                for t in st.tensors.values()}


def load_version(
    version_dir: Path, previous: Weights | None = None, loader: GroupLoader = map_group
) -> Weights:
    """Load a version's weights, reusing ``previous``'s groups whose file identity is unchanged.

    ``version_dir`` holds ``model.safetensors.index.json`` (as the agent writes it) or, for a
    plain checkpoint directory, a single ``model.safetensors``.

    Raises :class:`ModelError` for a missing or malformed index or group file.
    """
    try:
        declared, weight_map = _read_weight_index(version_dir)
        groups: dict[str, Group] = {}
        for file in sorted(set(weight_map.values())):
            path = version_dir / _relative(file)
            identity = FileIdentity.of(os.stat(path))
            old = previous.groups.get(file) if previous is not None else None
            if old is not None and old.identity == identity:
                groups[file] = old
            else:
                groups[file] = Group(file, identity, MappingProxyType(dict(loader(path))))
    except OSError as e:
        raise _os_error(e) from e
    tensors: dict[str, Tensor] = {}
    for name, file in weight_map.items():
        tensor = groups[file].tensors.get(name)
        if tensor is None:
            raise ModelError(f"{version_dir / file}: no tensor {name!r}, which "
                             f"{WEIGHT_INDEX_FILE} maps to it")
        tensors[name] = tensor
    return Weights(declared or version_dir.name, version_dir, MappingProxyType(groups),
                   MappingProxyType(tensors))


def _read_weight_index(version_dir: Path) -> tuple[str | None, dict[str, str]]:
    path = version_dir / WEIGHT_INDEX_FILE
    single = version_dir / SINGLE_WEIGHTS_FILE
    if not path.exists() and single.is_file():
        with SafetensorsFile(single) as st:  # a plain one-file checkpoint
            return None, dict.fromkeys(st.tensors, SINGLE_WEIGHTS_FILE)
    with open(path, "rb") as f:
        raw = f.read(MAX_WEIGHT_INDEX_SIZE + 1)
    if len(raw) > MAX_WEIGHT_INDEX_SIZE:
        raise ModelError(f"{path}: larger than {MAX_WEIGHT_INDEX_SIZE} bytes")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not JSON ({e})") from e
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    metadata = doc.get("metadata", {}) if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ModelError(f"{path}: weight_map must map tensor names to file names")
    version = metadata.get("deltaship_version") if isinstance(metadata, dict) else None
    if version is not None and not isinstance(version, str):
        raise ModelError(f"{path}: metadata.deltaship_version must be a string")
    return version, weight_map


def _relative(file: str) -> str:
    p = PurePosixPath(file)
    if p.is_absolute() or ".." in p.parts or "\\" in file or not p.parts:
        raise ModelError(f"{WEIGHT_INDEX_FILE} names a file outside the version: {file!r}")
    return file


def _os_error(e: OSError) -> ModelError:
    if e.errno in (errno.EMFILE, errno.ENFILE):
        return ModelError(f"too many open files while mapping the model ({e.filename}): raise "
                          "the open-file limit (ulimit -n, LimitNOFILE=) above its group count")
    return ModelError(f"cannot load {e.filename}: {e.strerror}")
