"""The non-tensor files of a release (config, tokenizer, anything else beside the
safetensors) as zstd objects, each shipped whole.

A file a base release already has reuses its object. Files up to :data:`SMALL_FILE` are read
whole and coded at level 19 at least (they are small, and every device downloads them
whole); larger ones are hashed, then streamed to their object at the release's level in
bounded memory, and refused if they change between the two reads. A stop event set by the
release (Ctrl-C, a failure elsewhere) ends the shipping at the next 1 MiB block.

    start_ship_files(model, bases, staging, level, ex, stop) -> [Future[ShippedFile]]
    ship_file(src, rel, known, staged, level, stop) -> ShippedFile
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from manifest.errors import CancelledError, ModelError, disk_full
from manifest.metadata import FileEntry, ObjectRef, ReleaseIndex

from .encode import HashingWriter
from .model_dir import ModelDir
from .release_plan import ShippedFile

__all__ = ["FILE_BLOCK", "SMALL_FILE", "compress_file", "hash_file", "ship_file",
           "start_ship_files"]

# Non-tensor files up to this size are read whole and coded at zstd level 19 (a 9 MB
# tokenizer.json takes about 3 s of one core, overlapped with the tensors); larger ones are
# streamed at the release's level: level 19 runs at about 3 MB/s.
SMALL_FILE = 16 << 20
FILE_BLOCK = 1 << 20

def start_ship_files(
    model: ModelDir, bases: Sequence[ReleaseIndex], staging: Path, level: int,
    ex: ThreadPoolExecutor, stop: threading.Event | None = None,
) -> list[Future[ShippedFile]]:
    """Each non-tensor file as a zstd object, one task per file on ``ex``; a file a base
    already has reuses its object. Files up to :data:`SMALL_FILE` (config, tokenizer) are
    coded at level 19 at least; larger ones (a ``.pth`` or ``.gguf`` kept beside the
    safetensors) are streamed at the release's level, in bounded memory. Once ``stop`` is
    set, a file not begun is not shipped and a streamed one stops at its next block (its
    task raises :class:`~manifest.errors.CancelledError`)."""
    known = {f.sha256: f.object for idx in bases for f in idx.files}
    return [ex.submit(ship_file, model.path / rel, rel, known, staging / f"file-{i}", level,
                      stop)
            for i, rel in enumerate(model.other_files)]


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise CancelledError("shipping stopped: the release failed or was interrupted")


def ship_file(src: Path, rel: str, known: dict[str, ObjectRef], staged: Path,
               level: int, stop: threading.Event | None = None) -> ShippedFile:
    _check(stop)
    try:
        if os.stat(src).st_size <= SMALL_FILE:
            data = src.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            if sha in known:
                return ShippedFile(FileEntry(rel, sha, len(data), known[sha]), None)
            blob = zstandard.ZstdCompressor(level=max(level, 19)).compress(data)
            staged.write_bytes(blob)
            ref = ObjectRef(hashlib.sha256(blob).hexdigest(), len(blob), "zstd")
            return ShippedFile(FileEntry(rel, sha, len(data), ref), str(staged))
        sha, length = hash_file(src)
        if sha in known:
            return ShippedFile(FileEntry(rel, sha, length, known[sha]), None)
        _check(stop)
        ref, again = compress_file(src, staged, level, length, stop)
    except OSError as e:  # reading the model, or writing its object to the staging directory
        full = disk_full(e, staged.parent)
        if full is not None:
            raise full from e
        raise ModelError(f"cannot read {src}: {e.strerror or e}") from e
    except zstandard.ZstdError as e:  # the size differs from the one just hashed
        raise ModelError(f"{src} changed while it was read ({e}): release again once the "
                         "model directory is no longer being written") from e
    if again != sha:
        raise ModelError(f"{src} changed while it was read: release again once the model "
                         "directory is no longer being written")
    return ShippedFile(FileEntry(rel, sha, length, ref), str(staged))


def hash_file(src: Path) -> tuple[str, int]:
    h, length = hashlib.sha256(), 0
    with open(src, "rb") as f:
        while block := f.read(FILE_BLOCK):
            h.update(block)
            length += len(block)
    return h.hexdigest(), length


def compress_file(src: Path, staged: Path, level: int, length: int,
                   stop: threading.Event | None = None) -> tuple[ObjectRef, str]:
    """Stream ``src`` into ``staged`` as one zstd frame: (the frame's ref, sha256 of what
    was read); raises :class:`~manifest.errors.CancelledError` at the next block once
    ``stop`` is set."""
    plain = hashlib.sha256()
    out = HashingWriter(staged)
    try:
        with open(src, "rb") as f:
            z = zstandard.ZstdCompressor(level=level).stream_writer(
                cast(BinaryIO, out), size=length, closefd=False)  # it only writes
            while block := f.read(FILE_BLOCK):
                _check(stop)  # left unfinished (ending the frame codes what it holds)
                plain.update(block)
                z.write(block)
            z.flush(zstandard.FLUSH_FRAME)  # ends the frame
    finally:
        out.close()
    return ObjectRef(out.hexdigest(), out.length, "zstd"), plain.hexdigest()
