"""A model directory as the publisher reads it: safetensors shards plus other files.

Single-file (``*.safetensors``) and sharded (``model.safetensors.index.json``) layouts are both
read. Every safetensors header is validated strictly; tensor data is never loaded here, only
located (see :class:`manifest.safetensors_format.SafetensorsFile`).

What is read, and from where (the same rule for tensor files and other files):

* every file is named by a relative path inside the directory: a ``weight_map`` entry that is
  absolute or climbs out with ``..`` is refused;
* a file may be a symlink to a regular file anywhere (a Hugging Face cache snapshot links every
  file to ``../../blobs/<hash>``): it is followed, and its content ships under its own name;
* a symlink to a directory, a dangling symlink, a FIFO, device or socket is refused, never
  skipped in silence;
* hidden files and directories (``.gitattributes``, ``.cache/``) are skipped and listed in
  :attr:`ModelDir.skipped_files`, so a release can report everything it left out;
* other files matching an ``exclude`` pattern (``release --exclude``: shell-style, on the
  relative POSIX path, a pattern ending in ``/`` meaning everything under that directory, as
  the Hugging Face Hub's ``ignore_patterns``) are left out and listed in
  :attr:`ModelDir.excluded_files`; a pattern matching a tensor file is refused.
"""

from __future__ import annotations

import fnmatch
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from manifest.constants import WEIGHT_INDEX_FILE as INDEX_NAME
from manifest.errors import ModelError, UnsafeNameError
from manifest.metadata import check_file_path
from manifest.safetensors_format import SafetensorsFile, TensorInfo

__all__ = ["INDEX_NAME", "ModelDir", "ModelFiles", "SourceTensor", "open_model"]


@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: SafetensorsFile
    info: TensorInfo

    def read(self, offset: int, length: int) -> bytes:
        return self.file.read(self.info, offset, length)

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the tensor's bytes from ``offset`` on (no allocation)."""
        self.file.read_into(self.info, offset, out)


@dataclass(frozen=True)
class ModelFiles:
    """What a release reads and ships from a model directory (relative POSIX paths)."""

    tensor_files: tuple[str, ...]  # read; their tensors ship as group files
    other_files: tuple[str, ...]  # shipped as they are
    skipped_files: tuple[str, ...]  # hidden, not shipped (a directory ends with "/")
    excluded_files: tuple[str, ...] = ()  # matched an exclude pattern, not shipped


@dataclass
class ModelDir:
    path: Path
    tensors: dict[str, SourceTensor]
    other_files: list[str] = field(default_factory=list)  # relative POSIX paths, shipped
    shards: list[SafetensorsFile] = field(default_factory=list)
    tensor_files: list[str] = field(default_factory=list)  # relative POSIX paths, read
    skipped_files: list[str] = field(default_factory=list)  # hidden: not shipped ("dir/")
    excluded_files: list[str] = field(default_factory=list)  # matched an exclude pattern

    def listing(self) -> ModelFiles:
        return ModelFiles(tuple(self.tensor_files), tuple(self.other_files),
                          tuple(self.skipped_files), tuple(self.excluded_files))

    def close(self) -> None:
        for s in self.shards:
            s.close()

    def __enter__(self) -> ModelDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _model_file(root: Path, rel: str, what: str) -> Path:
    """``root/rel``, checked to be a readable regular file named inside the model directory.

    ``rel`` must be relative without ``..``; every directory on the way must be a real one;
    the file itself may be a symlink to a regular file (followed, wherever it points).
    """
    try:
        check_file_path(rel)
    except UnsafeNameError as e:
        raise ModelError(
            f"{what} {rel!r}, which is not a relative path inside the model directory {root}: "
            "refusing to read outside it"
        ) from e
    parent = root
    for part in rel.split("/")[:-1]:
        parent = parent / part
        if parent.is_symlink():
            raise ModelError(f"{root}: {rel!r} goes through {parent.name!r}, a symlink to a "
                             "directory: not followed (copy the directory in instead)")
    path = root / rel
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as e:
        link = " (a dangling symlink)" if path.is_symlink() else ""
        raise ModelError(f"{what} {rel!r}, which does not exist{link}") from e
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror}") from e
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, device or socket"
        raise ModelError(f"{path} is {kind}, not a regular file: refusing to ship it")
    if not os.access(path, os.R_OK):
        raise ModelError(f"cannot read {path}: permission denied")
    return path


def _shard_names(root: Path) -> tuple[list[str], dict[str, str] | None]:
    index = root / INDEX_NAME
    if index.exists() or index.is_symlink():
        _model_file(root, INDEX_NAME, "the model directory holds")
        try:
            doc = json.loads(index.read_text("utf-8"))
            weight_map = doc["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise TypeError("weight_map must map tensor names to file names")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"{index}: malformed sharded-checkpoint index: {e}") from e
        return sorted(set(weight_map.values())), weight_map
    names = sorted(p.name for p in root.glob("*.safetensors"))
    return names, None


def open_model(path: str | os.PathLike[str], exclude: Sequence[str] = ()) -> ModelDir:
    """Open the model directory at ``path``; ``exclude``: patterns of other files to leave
    out (see the module doc)."""
    root = Path(path)
    patterns = [p + "*" if p.endswith("/") else p for p in exclude]
    if not root.is_dir():
        raise ModelError(f"model directory {root} does not exist or is not a directory")
    names, weight_map = _shard_names(root)
    if not names:
        raise ModelError(f"{root} holds no *.safetensors files: is this a model directory?")
    what = f"{root / INDEX_NAME} names" if weight_map is not None else "the model directory holds"
    read = names + ([INDEX_NAME] if weight_map is not None else [])
    for pat, given in zip(patterns, exclude, strict=True):
        hit = [n for n in read if fnmatch.fnmatchcase(n, pat)]
        if hit:
            raise ModelError(f"--exclude {given!r} matches {hit[0]}, which the release reads "
                             "for its tensors: exclude only other files")
    paths = [_model_file(root, name, what) for name in names]
    model = ModelDir(root, {}, tensor_files=list(names))
    try:
        for name, p in zip(names, paths, strict=True):
            shard = SafetensorsFile(p)
            model.shards.append(shard)
            for t in shard.tensors.values():
                if t.name in model.tensors:
                    raise ModelError(f"tensor {t.name!r} appears in two files ({name} and "
                                     f"{Path(model.tensors[t.name].file.path).name})")
                if weight_map is not None and weight_map.get(t.name) != name:
                    raise ModelError(
                        f"{INDEX_NAME} maps {t.name!r} to {weight_map.get(t.name)!r}, "
                        f"but it is in {name}"
                    )
                model.tensors[t.name] = SourceTensor(t.name, shard, t)
        if weight_map is not None:
            missing = set(weight_map) - set(model.tensors)
            if missing:
                raise ModelError(f"{INDEX_NAME} lists {sorted(missing)[0]!r}, found in no shard")
        shipped, model.skipped_files = _other_files(root, set(names) | {INDEX_NAME})
        for rel in shipped:
            out = any(fnmatch.fnmatchcase(rel, pat) for pat in patterns)
            (model.excluded_files if out else model.other_files).append(rel)
    except BaseException:
        model.close()
        raise
    return model


def _walk_error(e: OSError) -> None:
    raise ModelError(f"cannot list {e.filename}: {e.strerror}") from e


def _other_files(root: Path, skip: set[str]) -> tuple[list[str], list[str]]:
    """The files to ship besides the tensor files, and the hidden ones left out."""
    out: list[str] = []
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_walk_error):
        here = Path(dirpath)
        for d in sorted(dirnames):
            rel = (here / d).relative_to(root).as_posix()
            if d.startswith("."):
                skipped.append(rel + "/")
            elif (here / d).is_symlink():
                raise ModelError(f"{root}: {rel!r} is a symlink to a directory: not followed "
                                 "(copy the directory in instead, or remove the link)")
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and not (here / d).is_symlink())
        for fn in sorted(filenames):
            rel = (here / fn).relative_to(root).as_posix()
            if fn.startswith("."):
                skipped.append(rel)
            elif rel not in skip:
                try:
                    check_file_path(rel)
                except UnsafeNameError as e:
                    raise ModelError(f"{root}: cannot ship file {rel!r}: {e}") from e
                _model_file(root, rel, "the model directory holds")
                out.append(rel)
    return out, skipped
