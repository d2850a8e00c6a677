"""The patch container (``DSPATCH1``): how one group file is rebuilt, from a base or from nothing.

Layout (all integers little endian; docs/FORMAT.md is the reference)::

    0       8  magic b"DSPATCH1"
    8       8  u64 H, the header length (1 <= H <= 16 MiB)
    16      H  canonical JSON header (_type "deltaship.patch")
    16+H       payload: zstd frames back to back, in header order

The header names the base and target group files (sha256, length), the chunk size, the stored
length of the zstd frame holding the target's safetensors prefix (8-byte length + header JSON),
and per tensor of the target, in file order: the base tensor it is coded against (or null), the
overlap (bytes coded against the base), and per chunk its codec and frame lengths. Decoding
writes the target file front to back, so it streams with memory bounded by a few chunks.

A full object is a container with ``base: null``. Containers are only parsed after their
sha256 was checked against a signed index, but parsing is strict all the same, and every size
field is capped before anything is allocated or written: ``chunk_bytes`` at
:data:`MAX_CHUNK_BYTES`, each frame at what zstd can need for its chunk, the prefix frame at the
target's length, and the output at the length the signed index declares (the caller passes it:
a container cannot make a device write more than its index says, whatever its own header says).
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import struct
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import numpy as np
import zstandard

from ._fields import short_repr
from .canonical import canonical_json, loads_object
from .codecs import BASED_CODECS, CODECS, chunk_ranges, decode_chunk_into, frame_count
from .errors import FormatError, HashMismatchError, OversizeError, SafetensorsError
from .parallel import ordered_map
from .safetensors_format import MAX_HEADER_SIZE, SafetensorsFile, TensorInfo, parse_header

__all__ = [
    "MAGIC",
    "MAX_CHUNK_BYTES",
    "ContainerBuilder",
    "ContainerHeader",
    "apply_container",
    "max_frame_length",
    "read_header",
]

MAGIC = b"DSPATCH1"
MAX_CONTAINER_HEADER = 16 * 1024 * 1024
# The largest chunk a decoder accepts (publishers write 4 MiB, codecs.CHUNK_BYTES): decoding
# holds a few chunks in memory, so this bounds a device's memory whatever a container says.
MAX_CHUNK_BYTES = 16 * 1024 * 1024
# A builder holds this much payload in memory, then spills it to a temporary file.
_HELD_BYTES = 32 * 1024 * 1024
TYPE = "deltaship.patch"


def max_frame_length(size: int) -> int:
    """The longest zstd frame that can hold ``size`` bytes (zstd's ZSTD_COMPRESSBOUND, plus
    room for a frame header and checksum)."""
    small = (128 * 1024 - size) >> 11 if size < 128 * 1024 else 0
    return size + (size >> 8) + small + 64


class Writer(Protocol):
    def write(self, data: bytes, /) -> int: ...


@dataclass
class _TensorRecord:
    name: str
    base: str | None
    overlap: int
    chunks: list[list[Any]] = field(default_factory=list)


class ContainerBuilder:
    """Collects frames (kept as they are up to 32 MiB, then in a temporary file in
    ``spill_dir``), then writes the container in one pass.

    The header, which lists every frame's length, comes first in a container, so the payload
    waits until the last chunk is coded. ``spill_dir`` should be on the disk the container is
    written to: the system's temporary directory is often a small tmpfs (RAM), and a dense
    model's groups are hundreds of MB each."""

    def __init__(self, base: tuple[str, int] | None, chunk_bytes: int, level: int,
                 spill_dir: str | None = None) -> None:
        self.base = base
        self.chunk_bytes = chunk_bytes
        self.level = level
        self.spill_dir = spill_dir
        # The frames as zstd returned them (no copy) up to _HELD_BYTES, then a temporary file.
        self._frames: list[bytes] = []
        self._held = 0
        self._spill: IO[bytes] | None = None
        self._prefix_len = 0
        self._tensors: list[_TensorRecord] = []
        self.codec_bytes: dict[str, int] = {}

    def _write(self, frame: bytes) -> None:
        if self._spill is None and self._held + len(frame) > _HELD_BYTES:
            self._spill = tempfile.TemporaryFile(dir=self.spill_dir)  # noqa: SIM115 - closed in finish/close
            self._spill.writelines(self._frames)
            self._frames = []
        if self._spill is not None:
            self._spill.write(frame)
        else:
            self._frames.append(frame)
        self._held += len(frame)

    def set_prefix(self, prefix: bytes) -> None:
        frame = zstandard.ZstdCompressor(level=self.level).compress(prefix)
        self._write(frame)
        self._prefix_len = len(frame)

    def add_tensor(self, name: str, base: str | None, overlap: int) -> None:
        self._tensors.append(_TensorRecord(name, base, overlap))

    def add_chunk(self, codec: str, frames: list[bytes]) -> None:
        self._tensors[-1].chunks.append([codec, [len(f) for f in frames]])
        for f in frames:
            self._write(f)
        self.codec_bytes[codec] = self.codec_bytes.get(codec, 0) + sum(map(len, frames))

    def header(self, target_sha256: str, target_length: int) -> dict[str, Any]:
        return {
            "_type": TYPE,
            "spec_version": 1,
            "base": None
            if self.base is None
            else {"sha256": self.base[0], "length": self.base[1]},
            "target": {"sha256": target_sha256, "length": target_length},
            "chunk_bytes": self.chunk_bytes,
            "prefix": self._prefix_len,
            "tensors": [
                {"name": t.name, "base": t.base, "overlap": t.overlap, "chunks": t.chunks}
                for t in self._tensors
            ],
        }

    def finish(self, target_sha256: str, target_length: int, out: Writer) -> int:
        """Write the container to ``out``; returns its length."""
        raw = canonical_json(self.header(target_sha256, target_length))
        out.write(MAGIC + struct.pack("<Q", len(raw)) + raw)
        for frame in self._frames:
            out.write(frame)
        if self._spill is not None:
            self._spill.seek(0)
            while block := self._spill.read(1 << 20):
                out.write(block)
        self.close()
        return 16 + len(raw) + self._held

    def close(self) -> None:
        self._frames = []
        if self._spill is not None:
            self._spill.close()


@dataclass(frozen=True)
class ContainerHeader:
    base_sha256: str | None
    base_length: int
    target_sha256: str
    target_length: int
    chunk_bytes: int
    prefix: int
    tensors: list[dict[str, Any]]
    payload_start: int


def _int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise FormatError(f"patch container: {what} must be a non-negative integer")
    return v


def _ref(v: Any, what: str) -> tuple[str, int]:
    if not isinstance(v, dict) or not isinstance(v.get("sha256"), str):
        raise FormatError(f"patch container: {what} must be {{sha256, length}}")
    return v["sha256"], _int(v.get("length"), f"{what}.length")


def read_header(f: IO[bytes], size: int) -> ContainerHeader:
    """Parse and check a container's header; ``f`` is positioned at the payload afterwards."""
    head = f.read(16)
    if len(head) != 16 or head[:8] != MAGIC:
        raise FormatError("not a deltaship patch container (bad magic)")
    (n,) = struct.unpack("<Q", head[8:])
    if not 1 <= n <= MAX_CONTAINER_HEADER or 16 + n > size:
        raise OversizeError(f"patch container header length {n} is out of bounds")
    doc = loads_object(f.read(n), "patch container header")
    if doc.get("_type") != TYPE or doc.get("spec_version") != 1:
        raise FormatError("patch container header has the wrong _type or spec_version")
    base = doc.get("base")
    base_sha, base_len = (None, 0) if base is None else _ref(base, "base")
    target_sha, target_len = _ref(doc.get("target"), "target")
    tensors = doc.get("tensors")
    if not isinstance(tensors, list):
        raise FormatError("patch container: tensors must be a list")
    chunk = _int(doc.get("chunk_bytes"), "chunk_bytes")
    if chunk == 0 or chunk % 8:
        raise FormatError("patch container: chunk_bytes must be a positive multiple of 8")
    if chunk > MAX_CHUNK_BYTES:
        raise OversizeError(
            f"patch container chunk_bytes {chunk} is over the cap {MAX_CHUNK_BYTES}"
        )
    prefix = _int(doc.get("prefix"), "prefix")
    if prefix > size - 16 - n:
        raise FormatError("patch container payload is shorter than its header says")
    return ContainerHeader(
        base_sha, base_len, target_sha, target_len, chunk, prefix, tensors, 16 + n,
    )


@dataclass(frozen=True)
class _Job:
    codec: str
    frames: list[tuple[int, int]]  # (offset in the container, length) of each frame
    base: TensorInfo | None
    start: int
    length: int
    width: int


def _plan(
    hdr: ContainerHeader, targets: list[TensorInfo], base: SafetensorsFile | None,
    pos: int, payload_left: int,
) -> Iterator[_Job]:
    """Walk the header against the target's tensors; each chunk's frames start at ``pos``,
    the offset in the container after the previous chunk's (the workers read them)."""
    if len(hdr.tensors) != len(targets):
        raise FormatError("patch container does not list every tensor of its target")
    for rec, t in zip(hdr.tensors, targets, strict=True):
        if not isinstance(rec, dict) or rec.get("name") != t.name:
            raise FormatError(f"patch container tensors out of order at {short_repr(t.name)}")
        base_name = rec.get("base")
        overlap = _int(rec.get("overlap"), "overlap")
        bt: TensorInfo | None = None
        if base_name is not None:
            if base is None or not isinstance(base_name, str) or base_name not in base.tensors:
                raise FormatError("patch container names a missing base tensor "
                                  f"{short_repr(base_name)}")
            bt = base.tensors[base_name]
            if bt.width != t.width or overlap > min(bt.nbytes, t.nbytes) or overlap % t.width:
                raise FormatError(f"patch container: bad overlap for {short_repr(t.name)}")
        elif overlap:
            raise FormatError(f"patch container: overlap without a base for {short_repr(t.name)}")
        chunks = rec.get("chunks")
        # Counted, not listed: a list of a big tensor's ranges at 8-byte chunks would take 16x
        # the tensor's size in memory before the (header-bounded) chunk list is compared.
        count = -(-overlap // hdr.chunk_bytes) + -(-(t.nbytes - overlap) // hdr.chunk_bytes)
        if not isinstance(chunks, list) or len(chunks) != count:
            raise FormatError(f"patch container: wrong chunk count for {short_repr(t.name)}")
        ranges = chunk_ranges(t.nbytes, overlap, hdr.chunk_bytes)
        for (start, end), ch in zip(ranges, chunks, strict=True):
            if (
                not isinstance(ch, list)
                or len(ch) != 2
                or ch[0] not in CODECS
                or not isinstance(ch[1], list)
            ):
                raise FormatError("patch container: malformed chunk entry for "
                                  f"{short_repr(t.name)}")
            codec, lens = ch[0], [_int(x, "frame length") for x in ch[1]]
            # same/delta(-sparse) need the base; planes/zstd are allowed anywhere, since the encoder
            # falls back to them inside the overlap when delta coding does not pay off.
            needs_base = codec in BASED_CODECS
            if needs_base and start >= overlap:
                raise FormatError(f"patch container: {codec} chunk outside the base overlap")
            if len(lens) != frame_count(codec, t.width):
                raise FormatError(f"patch container: wrong frame count for {short_repr(t.name)}")
            if any(n > max_frame_length(end - start) for n in lens):
                raise OversizeError(
                    f"patch container: a frame of {short_repr(t.name)} is longer than its chunk "
                    "can need"
                )
            if sum(lens) > payload_left:
                raise FormatError("patch container payload is shorter than its header says")
            payload_left -= sum(lens)
            frames = []
            for n in lens:
                frames.append((pos, n))
                pos += n
            yield _Job(codec, frames, bt if needs_base else None, start, end - start, t.width)
    if payload_left:
        raise FormatError("patch container has trailing bytes after its payload")


def apply_container(
    container: str | os.PathLike[str] | bytes,
    base: SafetensorsFile | None,
    out: IO[bytes],
    *,
    executor: ThreadPoolExecutor | None = None,
    in_flight: int = 6,
    expected: tuple[str, int] | None = None,
) -> str:
    """Decode a container onto ``out``, return the sha256 of what was written.

    The caller has verified the container's and the base file's sha256 against a signed index;
    the result is checked against the container's target sha256 and length here.
    ``expected``: the (sha256, length) the signed index declares for the output. A container
    whose target differs is refused before anything is written, and writing stops before the
    output could pass that length (a device checks its free space against it).
    ``container`` is a file's path, or the container's bytes (a download held in memory).
    """
    held = container if isinstance(container, bytes) else None
    with io.BytesIO(held) if held is not None else open(container, "rb") as f:
        size = len(held) if held is not None else os.fstat(f.fileno()).st_size
        hdr = read_header(f, size)
        limit = hdr.target_length
        if expected is not None:
            if (hdr.target_sha256, hdr.target_length) != expected:
                raise HashMismatchError(
                    f"patch container rebuilds {hdr.target_length} bytes with sha256 "
                    f"{hdr.target_sha256[:16]}..., which differs from the release index "
                    f"({expected[1]} bytes with sha256 {expected[0][:16]}...)"
                )
            limit = expected[1]
        if (hdr.base_sha256 is None) != (base is None):
            raise FormatError("patch container and base do not match (one is missing)")
        if base is not None and base.size != hdr.base_length:
            raise FormatError("base file length differs from the patch container's base")
        if hdr.prefix > max_frame_length(min(limit, 8 + MAX_HEADER_SIZE)):
            raise OversizeError("patch container prefix frame is longer than its target")
        frame = f.read(hdr.prefix)
        prefix = _decompress_capped(frame, min(limit, 8 + MAX_HEADER_SIZE))
        if len(prefix) < 8 or len(prefix) > hdr.target_length:
            raise FormatError("patch container prefix is malformed")
        (n,) = struct.unpack("<Q", prefix[:8])
        if 8 + n != len(prefix):
            raise FormatError("patch container prefix length does not match its header")
        try:
            targets, _ = parse_header(prefix[8:], hdr.target_length - len(prefix), "patch target")
        except SafetensorsError as e:  # the container's fault, not a local file's
            raise FormatError(f"patch container target header is malformed: {e.problem}") from e
        digest = hashlib.sha256(prefix)
        out.write(prefix)
        written = len(prefix)
        payload_left = size - hdr.payload_start - hdr.prefix

        view = None if held is None else memoryview(held)
        fd = -1 if held is not None else f.fileno()

        def frame_at(at: int, n: int) -> bytes | memoryview:
            if view is None:
                return _pread(fd, n, at)
            if at + n > size:
                raise FormatError("patch container payload is shorter than its header says")
            return view[at:at + n]  # no copy

        # Output buffers of one chunk each, reused once their chunk is hashed and written:
        # at most in_flight + 3 exist (decoding, waiting, being written).
        free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()

        def decode(job: _Job) -> tuple[memoryview, np.ndarray]:
            frames = [frame_at(at, n) for at, n in job.frames]
            base_bytes = None
            if job.base is not None:
                assert base is not None
                base_bytes = base.read(job.base, job.start, job.length)
            try:
                buf = free.get_nowait()
            except queue.Empty:
                buf = np.empty(hdr.chunk_bytes, dtype=np.uint8)
            data = decode_chunk_into(job.codec, frames, base_bytes, job.width, job.length, buf)
            return data, buf

        def write(data: memoryview, buf: np.ndarray) -> None:
            out.write(data)
            free.put(buf)

        jobs = _plan(hdr, targets, base, hdr.payload_start + hdr.prefix, payload_left)
        # Hashing (here) and writing (a thread of its own) overlap: both release the GIL, so
        # the ordered consumer, the one serial stage, costs max(hash, write) per chunk.
        with ThreadPoolExecutor(1) as writer:
            writes: deque[Future[None]] = deque()
            for data, buf in ordered_map(decode, jobs, executor, in_flight):
                if written + len(data) > limit:  # the target header bounds it; never trust it
                    raise OversizeError(f"patch container output passes its {limit} bytes")
                digest.update(data)
                writes.append(writer.submit(write, data, buf))
                written += len(data)
                while len(writes) > 2:
                    writes.popleft().result()
            for w in writes:
                w.result()
    if written != hdr.target_length or digest.hexdigest() != hdr.target_sha256:
        raise HashMismatchError(
            "patched group file does not match the target sha256 its patch names"
        )
    return digest.hexdigest()


def _pread(fd: int, n: int, at: int) -> bytes:
    data = os.pread(fd, n, at)
    if len(data) != n:
        raise FormatError("patch container payload is shorter than its header says")
    return data


def _decompress_capped(frame: bytes, cap: int) -> bytes:
    try:
        declared = zstandard.frame_content_size(frame)
        if declared > cap:
            raise OversizeError(f"zstd frame declares {declared} bytes, over the cap {cap}")
        out: bytes = zstandard.ZstdDecompressor().decompress(frame, max_output_size=cap)
        return out
    except zstandard.ZstdError as e:
        raise FormatError(f"corrupt zstd frame: {e}") from e
