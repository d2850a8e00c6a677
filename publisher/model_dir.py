"""A model directory as the publisher reads it: safetensors shards plus other files.

Single-file (``*.safetensors``) and sharded (``model.safetensors.index.json``) layouts are both
read. Every safetensors header is validated strictly; tensor data is never loaded here, only
located (see :class:`manifest.safetensors_format.SafetensorsFile`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from manifest.constants import WEIGHT_INDEX_FILE as INDEX_NAME
from manifest.errors import ModelError, UnsafeNameError
from manifest.metadata import check_file_path
from manifest.safetensors_format import SafetensorsFile, TensorInfo

__all__ = ["INDEX_NAME", "ModelDir", "SourceTensor", "open_model"]



@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: SafetensorsFile
    info: TensorInfo

    def read(self, offset: int, length: int) -> bytes:
        return self.file.read(self.info, offset, length)


@dataclass
class ModelDir:
    path: Path
    tensors: dict[str, SourceTensor]
    other_files: list[str] = field(default_factory=list)  # relative POSIX paths
    shards: list[SafetensorsFile] = field(default_factory=list)

    def close(self) -> None:
        for s in self.shards:
            s.close()

    def __enter__(self) -> ModelDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shard_names(root: Path) -> tuple[list[str], dict[str, str] | None]:
    index = root / INDEX_NAME
    if index.is_file():
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
    names = sorted(p.name for p in root.glob("*.safetensors") if p.is_file())
    return names, None


def open_model(path: str | os.PathLike[str]) -> ModelDir:
    root = Path(path)
    if not root.is_dir():
        raise ModelError(f"model directory {root} does not exist or is not a directory")
    names, weight_map = _shard_names(root)
    if not names:
        raise ModelError(f"{root} holds no *.safetensors files: is this a model directory?")
    model = ModelDir(root, {})
    try:
        for name in names:
            p = root / name
            if not p.is_file():
                raise ModelError(f"{root / INDEX_NAME} names {name}, which does not exist")
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
        model.other_files = _other_files(root, set(names) | {INDEX_NAME})
    except BaseException:
        model.close()
        raise
    return model


def _other_files(root: Path, skip: set[str]) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            rel = Path(dirpath, fn).relative_to(root).as_posix()
            if fn.startswith(".") or rel in skip or Path(dirpath, fn).is_symlink():
                continue
            try:
                out.append(check_file_path(rel))
            except UnsafeNameError as e:
                raise ModelError(f"{root}: cannot ship file {rel!r}: {e}") from e
    return out
