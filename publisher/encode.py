"""Lay groups out as canonical safetensors files, hash them, and encode patch containers.

All chunk work of all groups flows through one bounded, order-preserving pipeline
(:func:`manifest.parallel.ordered_map`), so a model of any size is encoded with memory bounded
by ``workers x in_flight x chunk`` and every core busy, whether the model has many small expert
groups or one huge embedding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from manifest.codecs import CHUNK_BYTES, chunk_ranges, encode_chunk
from manifest.container import ContainerBuilder
from manifest.errors import disk_errors
from manifest.parallel import ordered_map
from manifest.safetensors_format import SafetensorsFile, TensorInfo, build_header

from .model_dir import SourceTensor

__all__ = ["EncodeResult", "EncodeTask", "GroupLayout", "encode_all", "hash_groups", "layout_group"]

# Groups whose container is being written while the next ones are coded, each by a thread of
# its own (each holds its payload: up to the builder's 32 MiB in memory).
_FINISHING = 2
# Chunks coded ahead of the writer, at most (by bytes; in_flight bounds their number): with 4 a
# worker often waited for the oldest chunk to come back before it got a new one (a fresh
# 2.19 GB release used 1.7-1.8 of 2 cores; with 8, 1.9).
_AHEAD = 8
# The canonical group file's safetensors metadata: transformers refuses files without it.
GROUP_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class GroupLayout:
    """A group as its canonical file: prefix (length + header), then tensors in name order."""

    name: str
    prefix: bytes
    tensors: tuple[tuple[TensorInfo, SourceTensor], ...]

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(t.nbytes for t, _ in self.tensors)

    @property
    def file(self) -> str:
        return f"{self.name}.safetensors"


def layout_group(name: str, tensors: list[SourceTensor]) -> GroupLayout:
    prefix, infos = build_header(
        ((t.name, t.info.dtype, t.info.shape) for t in tensors), GROUP_METADATA
    )
    return GroupLayout(name, prefix, tuple(zip(infos, tensors, strict=True)))


_local = threading.local()


def _buffer(slot: str, nbytes: int) -> memoryview:
    """A byte buffer of ``nbytes`` owned by this thread, reused from chunk to chunk: reading
    every chunk into fresh memory made the kernel zero new pages for each (measured: most of a
    release's system time)."""
    bufs: dict[str, bytearray] = _local.__dict__.setdefault("bufs", {})
    buf = bufs.get(slot)
    if buf is None or len(buf) < nbytes:
        buf = bufs[slot] = bytearray(nbytes)
    return memoryview(buf)[:nbytes]


def _hash_one(
    layout: GroupLayout, on_bytes: Callable[[int], None], read_block: int = 1 << 22
) -> str:
    h = hashlib.sha256(layout.prefix)
    for info, src in layout.tensors:
        for start in range(0, info.nbytes, read_block):
            n = min(read_block, info.nbytes - start)
            block = _buffer("hash", n)
            src.read_into(start, block)
            h.update(block)
            on_bytes(n)
    return h.hexdigest()


def hash_groups(
    layouts: list[GroupLayout],
    executor: ThreadPoolExecutor,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> list[str]:
    """sha256 of every canonical group file, without writing it (hashlib releases the GIL)."""
    return list(executor.map(lambda layout: _hash_one(layout, on_bytes), layouts))


@dataclass(frozen=True)
class EncodeTask:
    """Encode ``layout`` (whose file hashes to ``sha256``) against ``base`` or from nothing.

    With ``sha256`` None the group file is hashed from the chunks as they are read for
    encoding (one read of the model); its result's task carries the hash."""

    layout: GroupLayout
    sha256: str | None
    base: SafetensorsFile | None
    base_sha256: str | None
    out_path: str


@dataclass(frozen=True)
class EncodeResult:
    task: EncodeTask
    length: int
    sha256: str
    codec_bytes: dict[str, int]


class _ChainHash:
    """The sha256 of a group file fed by workers in any order: whichever worker hands in the
    next chunk in file order absorbs it, and those after it that are waiting (a group's hash
    is sequential, different groups' are not). Chunks are lent from ``pool`` until absorbed."""

    def __init__(self, prefix: bytes, pool: list[bytearray]) -> None:
        self._h = hashlib.sha256(prefix)
        self._pool = pool
        self._next = 0
        self._waiting: dict[int, tuple[bytearray, int]] = {}
        self._lock = threading.Lock()
        self._draining = False

    def offer(self, seq: int, buf: bytearray, n: int) -> None:
        """Chunk ``seq`` (0, 1, ...) is the first ``n`` bytes of ``buf``, which goes back to the
        pool once absorbed."""
        with self._lock:
            self._waiting[seq] = (buf, n)
            if self._draining:
                return  # the draining worker absorbs it
            self._draining = True
        while True:
            with self._lock:
                item = self._waiting.pop(self._next, None)
                if item is None:
                    self._draining = False
                    return
                self._next += 1
            self._h.update(memoryview(item[0])[:item[1]])  # releases the GIL
            self._pool.append(item[0])

    def hexdigest(self) -> str:
        """Once every chunk was offered (and every :meth:`offer` returned)."""
        assert not self._waiting and not self._draining
        return self._h.hexdigest()


@dataclass(frozen=True)
class _Chunk:
    src: SourceTensor
    base_file: SafetensorsFile | None
    base: TensorInfo | None
    start: int
    end: int
    hasher: _ChainHash | None = None
    seq: int = 0


def _base_tensor(info: TensorInfo, base: SafetensorsFile | None) -> tuple[TensorInfo | None, int]:
    """The base tensor a new tensor is coded against, and how many leading bytes overlap.

    Same dtype width and the same shape past the first dimension: the first dimension may have
    grown or shrunk (vocabulary expansion), so the rows they share are a common prefix.
    """
    if base is None or info.name not in base.tensors:
        return None, 0
    b = base.tensors[info.name]
    if b.width != info.width or b.shape[1:] != info.shape[1:] or len(b.shape) != len(info.shape):
        return None, 0
    overlap = min(b.nbytes, info.nbytes)
    return (b, overlap) if overlap else (None, 0)


def _events(tasks: list[EncodeTask], chunk_bytes: int, pool: list[bytearray]) -> Iterator[Any]:
    for task in tasks:
        hasher = _ChainHash(task.layout.prefix, pool) if task.sha256 is None else None
        seq = 0
        yield ("group", task)
        for info, src in task.layout.tensors:
            bt, overlap = _base_tensor(info, task.base)
            yield ("tensor", (info.name, bt.name if bt else None, overlap))
            for start, end in chunk_ranges(info.nbytes, overlap, chunk_bytes):
                in_base = bt is not None and start < overlap
                yield _Chunk(src, task.base, bt if in_base else None, start, end, hasher, seq)
                seq += 1
        yield ("end", (task, hasher))


def encode_all(
    tasks: list[EncodeTask],
    executor: ThreadPoolExecutor | None,
    *,
    level: int = 3,
    chunk_bytes: int = CHUNK_BYTES,
    in_flight: int = 16,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> Iterator[EncodeResult]:
    """Encode every task; yields the results in task order, each once its container is written.

    Up to ``in_flight`` chunks, holding at most ``_AHEAD x chunk_bytes`` of tensor data, are
    coded ahead of the writer: small chunks keep every core busy, large ones stay few. A task
    without ``sha256`` is hashed from the same reads (:class:`_ChainHash`), in buffers lent
    from a pool that holds at most the chunks ahead of the writer plus one per worker.
    """
    pool: list[bytearray] = []  # chunk buffers of hashed groups, back once hashed

    def work(ev: Any) -> Any:
        if not isinstance(ev, _Chunk):
            return ev
        n = ev.end - ev.start
        lent = None
        if ev.hasher is not None:
            lent = pool.pop() if pool else bytearray(chunk_bytes)
            new = memoryview(lent)[:n]
        else:
            new = _buffer("new", n)
        ev.src.read_into(ev.start, new)
        base = None
        if ev.base is not None and ev.base_file is not None:
            base = _buffer("base", n)
            ev.base_file.read_into(ev.base, ev.start, base)
        # The frames never refer to the buffers, which are reused for later chunks.
        coded = encode_chunk(new, base, ev.src.info.width, level)
        if ev.hasher is not None:
            assert lent is not None
            ev.hasher.offer(ev.seq, lent, n)
        return coded, n

    def weight(ev: Any) -> int:
        return ev.end - ev.start if isinstance(ev, _Chunk) else 0

    builder: ContainerBuilder | None = None
    events = _events(tasks, chunk_bytes, pool)
    # Finished groups' containers are written (and hashed) by threads of their own while the
    # next groups' chunks are coded: at most _FINISHING groups at once, yielded in order.
    with ThreadPoolExecutor(_FINISHING) as finisher:
        finishing: deque[Future[EncodeResult]] = deque()
        for ev in ordered_map(work, events, executor, in_flight, weight, _AHEAD * chunk_bytes):
            if isinstance(ev, tuple) and ev[0] == "group":
                task = ev[1]
                base_ref = None
                if task.base is not None:
                    base_ref = (task.base_sha256 or "", task.base.size)
                # A large group's payload waits on the staging disk, not in /tmp (tmpfs).
                staging = os.path.dirname(task.out_path)
                builder = ContainerBuilder(base_ref, chunk_bytes, level, spill_dir=staging)
                builder.set_prefix(task.layout.prefix)
            elif isinstance(ev, tuple) and ev[0] == "tensor":
                assert builder is not None
                builder.add_tensor(*ev[1])
            elif isinstance(ev, tuple) and ev[0] == "end":
                assert builder is not None
                task, hasher = ev[1]
                if hasher is not None:  # every chunk of the group came back: all offered
                    task = dataclasses.replace(task, sha256=hasher.hexdigest())
                while len(finishing) >= _FINISHING:
                    yield finishing.popleft().result()
                finishing.append(finisher.submit(_finish, task, builder))
                builder = None
            else:
                (codec, frames), n = ev
                assert builder is not None
                with disk_errors(staging):  # past 32 MiB the frames go to the staging disk
                    builder.add_chunk(codec, frames)
                on_bytes(n)
        while finishing:
            yield finishing.popleft().result()


def _finish(task: EncodeTask, builder: ContainerBuilder) -> EncodeResult:
    assert task.sha256 is not None
    # A full disk names the staging directory (the publisher cache), not the working one.
    with disk_errors(os.path.dirname(task.out_path)):
        h = HashingWriter(task.out_path)
        try:
            length = builder.finish(task.sha256, task.layout.length, h)
        finally:
            h.close()
    return EncodeResult(task, length, h.hexdigest(), dict(builder.codec_bytes))


class HashingWriter:
    """A write-only staged file that hashes and counts what passes through it (group
    containers here, non-tensor file objects in ship_files.py)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._h = hashlib.sha256()
        self.length = 0

    def write(self, data: bytes) -> int:
        self._h.update(data)
        self.length += len(data)
        return self._f.write(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def close(self) -> None:
        # No fsync: staged objects are uploaded, then deleted; a crash means re-running.
        self._f.close()
