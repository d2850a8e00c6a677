"""A strict safetensors reader and a canonical writer.

The reader parses only the header and then hands out byte ranges: tensor data is read with
``os.pread`` by whoever needs it, so a file of any size costs a few kilobytes of memory. Every
rule of the format is checked (see docs/FORMAT.md and ../shared/FIELD.md §3):

* the 8-byte little-endian header length is at most :data:`MAX_HEADER_SIZE` and fits the file;
* the header is a UTF-8 JSON object; ``__metadata__`` (optional) maps strings to strings;
* every tensor has a known ``dtype``, a ``shape`` of non-negative ints and two ``data_offsets``;
* the product of the shape times the element width equals the byte length;
* tensors are contiguous when sorted by offset: no gaps, no overlaps, the first starts at 0 and
  the last ends exactly at the end of the file.

Dtypes are only element widths here: BF16 and F8 tensors are raw little-endian bytes.

The writer (:func:`build_header` for the header alone, :func:`write_safetensors` for a whole
file) lays tensors out back to back in the given order after a compact JSON header padded with
spaces to a multiple of 8: the bytes are a pure function of the input.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ._fields import short_repr
from .errors import SafetensorsError
from .storage.atomic import atomic_output

__all__ = [
    "DTYPE_WIDTHS",
    "MAX_HEADER_SIZE",
    "SafetensorsFile",
    "TensorData",
    "TensorInfo",
    "build_header",
    "parse_header",
    "write_safetensors",
]

MAX_HEADER_SIZE = 100_000_000

DTYPE_WIDTHS: Mapping[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: where its bytes are, relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def width(self) -> int:
        return DTYPE_WIDTHS[self.dtype]


def _fail(path: str, problem: str) -> SafetensorsError:
    return SafetensorsError(path, problem)


def parse_header(
    raw: bytes, data_length: int, path: str = "<bytes>"
) -> tuple[list[TensorInfo], dict[str, str]]:
    """Validate a header's JSON bytes against a data section of ``data_length`` bytes.

    Returns the tensors in offset order and the ``__metadata__`` map.
    """
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:  # ValueError: also an int over 4300 digits
        raise _fail(path, f"header is not UTF-8 JSON ({str(e)[:200]})") from e
    except RecursionError as e:
        raise _fail(path, "header JSON is nested too deeply") from e
    except _DuplicateKey as e:
        raise _fail(path, f"header names {short_repr(e.args[0])} twice") from e
    if not isinstance(doc, dict):
        raise _fail(path, "header is not a JSON object")
    metadata: dict[str, str] = {}
    tensors: list[TensorInfo] = []
    for name, entry in doc.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                raise _fail(path, "__metadata__ must map strings to strings")
            metadata = dict(entry)
            continue
        tensors.append(_parse_entry(name, entry, path))
    tensors.sort(key=lambda t: (t.begin, t.end))
    expected = 0
    for t in tensors:
        if t.begin != expected:
            what = "gap before" if t.begin > expected else "overlap at"
            raise _fail(path, f"tensor data not contiguous: {what} {short_repr(t.name)} "
                              f"(offset {short_repr(t.begin)})")
        expected = t.end
    if expected != data_length:
        raise _fail(path, f"tensor data ends at {short_repr(expected)} but the data section has "
                          f"{data_length} bytes")
    return tensors, metadata


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _parse_entry(name: str, entry: object, path: str) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _fail(path, f"entry for {short_repr(name)} is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_WIDTHS:
        raise _fail(path, f"tensor {short_repr(name)} has unknown dtype {short_repr(dtype)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _fail(path, f"tensor {short_repr(name)} has an invalid shape {short_repr(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _fail(path, f"tensor {short_repr(name)} has invalid data_offsets "
                          f"{short_repr(offsets)}")
    begin, end = offsets
    width = DTYPE_WIDTHS[dtype]
    bound = max(end - begin, 1 << 64)  # exact below 2**64, for the message
    expected = _nbytes(shape, width, bound)
    if expected != end - begin:
        size = f"{expected}" if expected is not None else f"more than {short_repr(bound)}"
        raise _fail(
            path,
            f"tensor {short_repr(name)}: shape {short_repr(shape)} x {width} bytes = {size}, "
            f"but data_offsets span {short_repr(end - begin)}",
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _nbytes(shape: list[int], width: int, bound: int) -> int | None:
    """The byte length of ``shape`` x ``width``, or None once it passes ``bound``: a header's
    shape may list millions of huge dimensions, whose full product costs quadratic time."""
    if 0 in shape:
        return 0
    n = width
    for d in shape:
        n *= d
        if n > bound:
            return None
    return n


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class SafetensorsFile:
    """An open safetensors file: validated header in memory, data read on demand with pread."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise _fail(self.path, f"cannot open ({e.strerror})") from e
        try:
            self._load_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _load_header(self) -> None:
        size = os.fstat(self._fd).st_size
        prefix = os.pread(self._fd, 8, 0)
        if len(prefix) < 8:
            raise _fail(self.path, f"file is {size} bytes, too short for the 8-byte header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_SIZE:
            raise _fail(self.path, f"header length {n} exceeds the {MAX_HEADER_SIZE}-byte cap")
        if 8 + n > size:
            raise _fail(self.path, f"header length {n} runs past the end of the {size}-byte file")
        raw = os.pread(self._fd, n, 8)
        self.data_start = 8 + n
        self.size = size
        self.header_bytes = prefix + raw
        tensors, self.metadata = parse_header(raw, size - self.data_start, self.path)
        self.tensors: dict[str, TensorInfo] = {t.name: t for t in tensors}

    def read(self, tensor: TensorInfo, offset: int = 0, length: int | None = None) -> bytes:
        """Read ``length`` bytes of a tensor's data starting ``offset`` bytes into it."""
        if length is None:
            length = tensor.nbytes - offset
        if offset < 0 or length < 0 or offset + length > tensor.nbytes:
            raise ValueError(f"range {offset}+{length} outside tensor {tensor.name!r}")
        out = bytearray()
        pos = self.data_start + tensor.begin + offset
        while len(out) < length:
            piece = os.pread(self._fd, min(length - len(out), 1 << 24), pos + len(out))
            if not piece:
                raise _fail(self.path, "file shrank while being read")
            out += piece
        return bytes(out)

    def read_into(self, tensor: TensorInfo, offset: int, out: memoryview) -> None:
        """Fill ``out`` (a writable byte buffer) with the tensor's data from ``offset`` on: the
        same bytes as :meth:`read`, without allocating (the caller reuses ``out``)."""
        length = out.nbytes
        if offset < 0 or offset + length > tensor.nbytes:
            raise ValueError(f"range {offset}+{length} outside tensor {tensor.name!r}")
        view = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        pos = self.data_start + tensor.begin + offset
        got = 0
        while got < length:
            n = os.preadv(self._fd, [view[got:]], pos + got)
            if not n:
                raise _fail(self.path, "file shrank while being read")
            got += n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_header(
    tensors: Iterable[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[TensorInfo]]:
    """The canonical header for tensors laid out in the given order, back to back.

    Returns the full prefix (8-byte length + JSON padded with spaces to a multiple of 8) and the
    tensors with their offsets. Keys are written in the given order; the official library and
    every loader accept this, and the bytes are a pure function of the input.
    """
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    infos: list[TensorInfo] = []
    offset = 0
    for name, dtype, shape in tensors:
        width = DTYPE_WIDTHS[dtype]
        end = offset + math.prod(shape) * width
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        infos.append(TensorInfo(name, dtype, tuple(shape), offset, end))
        offset = end
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, infos


Buffer = bytes | bytearray | memoryview
TensorData = Buffer | Iterable[Buffer]
"""A tensor's little-endian bytes: at once, or as chunks in order (read once, while writing)."""


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Sequence[tuple[str, str, tuple[int, ...], TensorData]],
    metadata: Mapping[str, str] | None = None,
) -> list[TensorInfo]:
    """Write ``(name, dtype, shape, data)`` tensors to ``path`` atomically, in the given order.

    The header is :func:`build_header`'s. Chunked data is streamed to the file as it comes, so
    a file of any size is written with one chunk in memory at a time. Raises ``ValueError`` when
    a tensor's data is not exactly its shape's byte length (``path`` is then left as it was).
    Returns the tensors with their offsets.
    """
    prefix, infos = build_header(((n, d, tuple(s)) for n, d, s, _ in tensors), metadata)
    with atomic_output(path) as f:
        f.write(prefix)
        for info, (*_, data) in zip(infos, tensors, strict=True):
            chunks = (data,) if isinstance(data, bytes | bytearray | memoryview) else data
            written = 0
            for chunk in chunks:
                written += memoryview(chunk).nbytes
                if written > info.nbytes:
                    break
                f.write(chunk)
            if written != info.nbytes:
                got = "more" if written > info.nbytes else str(written)
                raise ValueError(f"tensor {info.name!r}: {info.dtype} {list(info.shape)} takes "
                                 f"{info.nbytes} bytes, its data has {got}")
    return infos
