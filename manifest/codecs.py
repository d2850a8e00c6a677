"""Lossless per-chunk tensor codecs. Pure functions: bytes in, bytes out.

A tensor's bytes are cut into chunks (see :func:`chunk_ranges`); each chunk is coded on its own
so that work runs in parallel and memory stays bounded. Codecs (docs/FORMAT.md has the exact
byte layout):

``same``    the chunk equals the base chunk at the same offset; no payload.
``delta``   d = new - base over unsigned integers of the element width (wrapping), zigzag of d
            read as signed, elements reordered by the base's magnitude class (see
            :func:`_magnitude_order`), split into byte planes (plane i = byte i of every
            element, little endian), one zstd frame per plane.
``delta-sparse``  the same reordered zigzag values when at most half are non-zero: one frame
            of the non-zero bitmap (``numpy.packbits``, big-endian bit order), then the byte
            planes of the non-zero values only.
``planes``  the new bytes split into byte planes, one zstd frame per plane.
``planes-rot``  ``planes`` of every element rotated left by one bit within its width: the
            sign moves to bit 0, so the top plane of BF16 and F32 is exactly the exponent (the
            only compressible part of a float) instead of sign + 7 exponent bits. The encoder
            uses it instead of ``planes`` for widths >= 2; ``planes`` still decodes.
``zstd``    one zstd frame of the new bytes.

Dtypes are only element widths (1, 2, 4, 8): BF16 and F8 values are never interpreted, only
their bit patterns, so every codec is bit-exact for every dtype.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import zstandard

from .errors import FormatError

__all__ = [
    "BASED_CODECS",
    "CHUNK_BYTES",
    "CODECS",
    "chunk_ranges",
    "decode_chunk",
    "decode_chunk_into",
    "encode_chunk",
    "frame_count",
]

CHUNK_BYTES = 4 * 1024 * 1024
CODECS = ("same", "delta", "delta-sparse", "planes", "planes-rot", "zstd")
BASED_CODECS = frozenset({"same", "delta", "delta-sparse"})  # need the base's bytes
# When delta coding saves less than this, planes and plain zstd are tried too.
_RETRY_RATIO = 0.6
# Alternatives to a chunk's primary codec are first coded on this many leading bytes of the
# chunk, and coded in full only if their sample is at most _SAMPLE_MARGIN larger than the
# primary's (see _worth_trying). On the bench models it skips nearly every plain-zstd attempt,
# the most expensive part of coding a full object, for the same bytes within 0.1 %. 64 KiB
# samples make the same choices as 256 KiB ones on every bench pair and the 2.19 GB model
# (byte-identical objects) for a quarter of the sampling: a fresh release of that model takes
# 3.8 instead of 4.1-4.3 CPU s.
_SAMPLE_BYTES = 64 * 1024
_SAMPLE_MARGIN = 0.03
# Bitmaps are an eighth of a plane and gain ~2 % from a slower level at little cost.
_BITMAP_LEVEL = 9
# Byte planes of tensors (exponents, mantissas, zigzag deltas) are nearly free of long repeats:
# at zstd's fast levels LZ matches there cost more than they save and split Huffman blocks.
# Below this level plane frames use a near-literal profile (fast strategy, 6-bit hash, minimum
# match 7): 3-6 % smaller planes than level 3 and 2-4x faster (measured on the bench models).
# From this level on, plane frames use zstd's own level (optimal parsers price matches).
_PLANE_PROFILE_BELOW = 10

_UINT: dict[int, type[np.unsignedinteger[Any]]] = {
    1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64,
}
Frame = bytes | memoryview  # a zstd frame as decoding takes it (a slice of a held download)
_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
# What the encoder reads chunks from: any C-contiguous buffer (only read, never kept).
Buffer = bytes | bytearray | memoryview | np.ndarray
_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = _local.__dict__.setdefault("c", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=False)
    return cache[level]  # type: ignore[no-any-return]


def _plane_compressor(level: int) -> zstandard.ZstdCompressor:
    """The compressor for byte-plane frames (see :data:`_PLANE_PROFILE_BELOW`)."""
    if level >= _PLANE_PROFILE_BELOW:
        return _compressor(level)
    cache = _local.__dict__.setdefault("p", {})
    if level not in cache:
        params = zstandard.ZstdCompressionParameters(
            strategy=zstandard.STRATEGY_FAST, window_log=17, chain_log=6, hash_log=6,
            search_log=1, min_match=7, target_length=0, write_checksum=False,
        )
        cache[level] = zstandard.ZstdCompressor(compression_params=params)
    return cache[level]  # type: ignore[no-any-return]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "d"):
        _local.d = zstandard.ZstdDecompressor()
    return _local.d  # type: ignore[no-any-return]


def chunk_ranges(nbytes: int, overlap: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each chunk: [0, overlap) and [overlap, nbytes) are cut separately."""
    for lo, hi in ((0, overlap), (overlap, nbytes)):
        for start in range(lo, hi, chunk):
            yield start, min(start + chunk, hi)


def _u8(buf: Buffer) -> np.ndarray:
    """``buf`` as a flat uint8 array, without a copy."""
    return np.frombuffer(buf, dtype=np.uint8)


def _split_planes(values: np.ndarray, width: int, slot: str) -> list[np.ndarray]:
    """Byte planes of ``values`` (unsigned, ``width`` bytes), in this thread's scratch ``slot``.

    The planes are views of a buffer reused from chunk to chunk (see :func:`_scratch`): they
    must be compressed before this thread splits the next chunk. Width 1 is ``values`` itself.
    """
    if width == 1:
        return [values.view(np.uint8)]
    count = len(values)
    planes = _scratch(slot, count * width).reshape(width, count)
    if width == 2:  # BF16 and F16: a truncating cast and a shift, no strided copies
        np.copyto(planes[0], values, casting="unsafe")
        np.right_shift(values, np.uint16(8), out=planes[1], casting="unsafe")
    else:
        cols = values.view(np.uint8).reshape(count, width)
        for i in range(width):
            np.copyto(planes[i], cols[:, i])
    return list(planes)


def _rotl1_planes(values: np.ndarray, width: int) -> list[np.ndarray]:
    """Byte planes of every element rotated left by one bit (sign to bit 0): the
    ``planes-rot`` transform, in this thread's scratch buffers (see :func:`_split_planes`)."""
    count = len(values)
    if width == 2:  # plane 0 = (v << 1 | v >> 15) & 0xFF, plane 1 = (v >> 7) & 0xFF
        planes = _scratch("enc-planes", 2 * count).reshape(2, count)
        sign = _scratch("enc-tmp", count)
        np.left_shift(values, np.uint16(1), out=planes[0], casting="unsafe")
        np.right_shift(values, np.uint16(15), out=sign, casting="unsafe")
        np.bitwise_or(planes[0], sign, out=planes[0])
        np.right_shift(values, np.uint16(7), out=planes[1], casting="unsafe")
        return list(planes)
    u = _UINT[width]
    rotated = _scratch("enc-rot", count * width).view(u)
    low = _scratch("enc-tmp", count * width).view(u)
    np.left_shift(values, u(1), out=rotated)
    np.right_shift(values, u(8 * width - 1), out=low)
    np.bitwise_or(rotated, low, out=rotated)
    return _split_planes(rotated, width, "enc-planes")


def _zigzag(new: Buffer, base: Buffer, width: int) -> np.ndarray:
    """Zigzag of ``new - base`` (wrapping), in this thread's scratch slot ``enc-zigzag``."""
    u = _UINT[width]
    b = np.frombuffer(base, dtype=u)
    d = _scratch("enc-zigzag", b.nbytes).view(u)
    np.subtract(np.frombuffer(new, dtype=u), b, out=d)  # wraps
    sign = _scratch("enc-tmp", b.nbytes).view(u)
    np.right_shift(d.view(_INT[width]), 8 * width - 1, out=sign.view(_INT[width]))
    np.left_shift(d, u(1), out=d)
    np.bitwise_xor(d, sign, out=d)
    return d


def _magnitude_order(base: Buffer, width: int) -> np.ndarray:
    """Stable order of elements by the 8 bits below the sign bit of each base element.

    For BF16 and F32 those bits are the exponent (for F16: exponent and top mantissa bits; for
    width 1 the 7 bits below the sign are used): a fine-tune moves each weight by about
    the same absolute amount, so its change in units in the last place depends on the
    exponent. Coding the deltas grouped by it lets zstd's per-block entropy tables fit each
    group. The order is a pure function of the base bytes; it costs a radix sort.
    """
    if width == 1:
        key = np.frombuffer(base, dtype=np.uint8) & np.uint8(0x7F)
    else:
        u = _UINT[width]
        key = ((np.frombuffer(base, dtype=u) >> u(8 * width - 9)) & u(0xFF)).astype(np.uint8)
    order: np.ndarray = np.argsort(key, kind="stable")  # a radix sort for uint8 keys
    return order


def _compress_planes(parts: list[np.ndarray], level: int) -> list[bytes]:
    c = _plane_compressor(level)
    return [c.compress(p.data) for p in parts]


def _encode_delta(new: Buffer, base: Buffer, width: int, level: int) -> tuple[str, list[bytes]]:
    zs = _zigzag(new, base, width)
    ordered = _scratch("enc-ordered", zs.nbytes).view(zs.dtype)
    np.take(zs, _magnitude_order(base, width), out=ordered)
    nonzero = ordered != 0
    if 2 * int(np.count_nonzero(nonzero)) <= len(ordered):
        bitmap = _compressor(max(level, _BITMAP_LEVEL)).compress(np.packbits(nonzero).data)
        planes = _compress_planes(_split_planes(ordered[nonzero], width, "enc-planes"), level)
        return "delta-sparse", [bitmap, *planes]
    return "delta", _compress_planes(_split_planes(ordered, width, "enc-planes"), level)


def _encode_full(codec: str, new: np.ndarray, width: int, level: int) -> list[bytes]:
    """The frames of ``new`` (uint8) under a codec that needs no base (``planes-rot`` or
    ``zstd``)."""
    if codec == "planes-rot":
        return _compress_planes(_rotl1_planes(new.view(_UINT[width]), width), level)
    return [_compressor(level).compress(new.data)]


def _worth_trying(codec: str, new: np.ndarray, base: np.ndarray | None, width: int, level: int,
                  primary: str) -> bool:
    """Whether the full ``codec`` attempt may beat ``primary``, judged on a sample.

    Both are coded on the chunk's first :data:`_SAMPLE_BYTES`; ``codec`` is worth coding in
    full only if its sample is at most :data:`_SAMPLE_MARGIN` larger than ``primary``'s (the
    sample predicts the whole chunk's ratio well on tensors; the margin keeps the near ties).
    """
    n = _SAMPLE_BYTES - _SAMPLE_BYTES % width
    sample = new[:n]
    if primary in BASED_CODECS:
        assert base is not None
        mine = sum(map(len, _encode_delta(sample, base[:n], width, level)[1]))
    else:
        mine = sum(map(len, _encode_full(primary, sample, width, level)))
    theirs = sum(map(len, _encode_full(codec, sample, width, level)))
    return theirs <= mine * (1 + _SAMPLE_MARGIN)


def _same(new: Buffer, base: Buffer) -> bool:
    if isinstance(new, bytes) and isinstance(base, bytes):
        return new == base
    return _u8(new).data == _u8(base).data


def encode_chunk(
    new: Buffer, base: Buffer | None, width: int, level: int = 3
) -> tuple[str, list[bytes]]:
    """Code one chunk; returns the codec name and its frames. ``base`` has the same length.

    ``new`` and ``base`` are any C-contiguous buffers (bytes, a numpy array, a memoryview);
    they are only read, and the frames never refer to them or to this thread's scratch
    buffers, so the caller may reuse both as soon as this returns.

    Which codec wins is decided by coding: the chunk's primary codec (``delta`` against a base,
    else ``planes-rot``; plain ``zstd`` for width 1) is always coded in full; the others (when a
    delta saves less than :data:`_RETRY_RATIO`, or besides ``planes-rot``) only if they come
    close on a sample of the chunk (:func:`_worth_trying`), or on every chunk too small to
    sample. The smallest coding is kept.
    """
    data = _u8(new)
    ref = None
    if base is not None:
        ref = _u8(base)
        if _same(new, base):
            return "same", []
        best = _encode_delta(data, ref, width, level)
        size = sum(map(len, best[1]))
        if size <= _RETRY_RATIO * len(data):
            return best
        # Rotated planes rather than plain planes for every width >= 2: on the bench models
        # they are 0.2-1.2 % smaller in total and the plain ones are not worth a second try.
        others = ["planes-rot", "zstd"] if width > 1 else ["zstd"]
    else:
        first = "planes-rot" if width > 1 else "zstd"
        best = (first, _encode_full(first, data, width, level))
        size = sum(map(len, best[1]))
        others = ["zstd"] if width > 1 else []
    sampled = len(data) >= 2 * _SAMPLE_BYTES
    for codec in others:
        if sampled and not _worth_trying(codec, data, ref, width, level, best[0]):
            continue
        frames = _encode_full(codec, data, width, level)
        if sum(map(len, frames)) < size:
            best, size = (codec, frames), sum(map(len, frames))
    return best


def frame_count(codec: str, width: int) -> int:
    """How many zstd frames a chunk coded with ``codec`` has."""
    if codec == "same":
        return 0
    planes = 1 if codec == "zstd" else width
    return planes + 1 if codec == "delta-sparse" else planes


def _scratch(slot: str, nbytes: int) -> np.ndarray:
    """A uint8 buffer of ``nbytes`` owned by this thread, reused from chunk to chunk.

    Coding is a few passes over buffers of a chunk's size; fresh arrays for each pass would
    make the kernel zero new pages for every chunk (measured: most of a fresh install's
    system time). A thread keeps at most a few buffers of the largest chunk it coded, which
    the container format caps (``MAX_CHUNK_BYTES``)."""
    bufs: dict[str, np.ndarray] = _local.__dict__.setdefault("s", {})
    buf = bufs.get(slot)
    if buf is None or buf.nbytes < nbytes:
        buf = bufs[slot] = np.empty(nbytes, dtype=np.uint8)
    return buf[:nbytes]


def _unpack_into(d: zstandard.ZstdDecompressor, frame: Frame, out: np.ndarray,
                 codec: str) -> None:
    """Decompress one frame into ``out`` (uint8, contiguous), which it must fill exactly."""
    size = out.nbytes
    try:
        declared = zstandard.frame_content_size(frame)
        if declared not in (-1, size):
            raise FormatError(f"{codec} frame declares {declared} bytes, expected {size}")
        reader = d.stream_reader(frame)
        view = out.data.cast("B")
        got = 0
        while got < size:
            n = reader.readinto(view[got:])
            if not n:
                break
            got += n
        extra = reader.read(1) if got == size else b""
    except zstandard.ZstdError as e:
        raise FormatError(f"corrupt zstd frame in a {codec} chunk: {e}") from e
    if got != size or extra:
        more = "more than " if extra else ""
        raise FormatError(f"{codec} frame decodes to {more}{got} bytes, expected {size}")


def _join_planes_into(d: zstandard.ZstdDecompressor, frames: Sequence[Frame], width: int,
                      out: np.ndarray, codec: str) -> None:
    """Decompress ``width`` byte-plane frames and interleave them into ``out`` (unsigned
    integers of ``width`` bytes, little endian: plane i is byte i of every element)."""
    count = len(out)
    if width == 1:
        _unpack_into(d, frames[0], out, codec)
        return
    planes = _scratch("planes", count * width).reshape(width, count)
    for i, frame in enumerate(frames):
        _unpack_into(d, frame, planes[i], codec)
    if width == 2:  # BF16 and F16, nearly every byte of an LLM: two passes, no strides
        np.left_shift(planes[1], 8, out=out, dtype=np.uint16)
        np.bitwise_or(out, planes[0], out=out)
        return
    cols = out.view(np.uint8).reshape(count, width)
    for i in range(width):
        cols[:, i] = planes[i]


def _rotr1_inplace(arr: np.ndarray, width: int) -> None:
    """Undo the ``planes-rot`` rotation (:func:`_rotl1_planes`) in place."""
    u = _UINT[width]
    low = _scratch("tmp", arr.nbytes).view(u)
    np.right_shift(arr, u(1), out=low)
    np.left_shift(arr, u(8 * width - 1), out=arr)
    np.bitwise_or(arr, low, out=arr)


def decode_chunk(
    codec: str, frames: Sequence[Frame], base: bytes | None, width: int, length: int
) -> bytes:
    """Invert :func:`encode_chunk`; every frame's output is capped at its expected size."""
    return bytes(decode_chunk_into(codec, frames, base, width, length,
                                   np.empty(length, dtype=np.uint8)))


def decode_chunk_into(
    codec: str, frames: Sequence[Frame], base: bytes | None, width: int, length: int,
    out: np.ndarray,
) -> memoryview:
    """:func:`decode_chunk` into ``out`` (a uint8 array of at least ``length`` bytes, which the
    caller may reuse once it is done with the result); returns a view of the chunk's bytes:
    of ``out``, or of ``base`` for ``same``."""
    if codec not in CODECS:
        raise FormatError(f"unknown chunk codec {codec!r}")
    if len(frames) != frame_count(codec, width):
        raise FormatError(
            f"{codec} chunk has {len(frames)} frames, expected {frame_count(codec, width)}"
        )
    if length % width:
        raise FormatError(f"{codec} chunk of {length} bytes is not whole elements")
    if codec in BASED_CODECS and (base is None or len(base) != length):
        raise FormatError(f"{codec} chunk without a matching base range")
    if codec == "same":
        assert base is not None
        return memoryview(base)
    d = _decompressor()
    dst = out[:length]
    result = dst.data
    u = _UINT[width]
    values = dst.view(u)
    count = length // width
    if codec == "zstd":
        _unpack_into(d, frames[0], dst, codec)
        return result
    if codec in ("planes", "planes-rot"):
        _join_planes_into(d, frames, width, values, codec)
        if codec == "planes-rot":
            _rotr1_inplace(values, width)
        return result
    assert base is not None
    zs = _scratch("zigzag", length).view(u)
    if codec == "delta":
        _join_planes_into(d, frames, width, zs, codec)
    else:
        mask = _scratch("mask", (count + 7) // 8)
        _unpack_into(d, frames[0], mask, codec)
        nonzero = np.unpackbits(mask, count=count).view(bool)
        k = int(np.count_nonzero(nonzero))
        packed = _scratch("packed", k * width).view(u)
        _join_planes_into(d, frames[1:], width, packed, codec)
        zs.fill(0)
        zs[nonzero] = packed
    values[_magnitude_order(base, width)] = zs
    # Undo the zigzag and add the base, in place: d = (z >> 1) ^ -(z & 1); new = d + base.
    sign = _scratch("tmp", length).view(u)
    np.bitwise_and(values, u(1), out=sign)
    np.subtract(u(0), sign, out=sign)
    np.right_shift(values, u(1), out=values)
    np.bitwise_xor(values, sign, out=values)
    np.add(values, np.frombuffer(base, dtype=u), out=values)
    return result
