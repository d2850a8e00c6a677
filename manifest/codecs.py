"""Lossless per-chunk tensor codecs. Pure functions: bytes in, bytes out.

A tensor's bytes are cut into chunks (see :func:`chunk_ranges`); each chunk is coded on its own
so that work runs in parallel and memory stays bounded. Codecs (docs/FORMAT.md has the exact
byte layout):

``same``    the chunk equals the base chunk at the same offset; no payload.
``delta``   d = new - base over unsigned integers of the element width (wrapping), zigzag of d
            read as signed, split into byte planes (plane i = byte i of every element, little
            endian), one zstd frame per plane.
``planes``  the new bytes split into byte planes, one zstd frame per plane.
``zstd``    one zstd frame of the new bytes.

Dtypes are only element widths (1, 2, 4, 8): BF16 and F8 values are never interpreted, only
their bit patterns, so every codec is bit-exact for every dtype.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import zstandard

from .errors import FormatError

__all__ = [
    "CHUNK_BYTES",
    "CODECS",
    "chunk_ranges",
    "decode_chunk",
    "encode_chunk",
]

CHUNK_BYTES = 4 * 1024 * 1024
CODECS = ("same", "delta", "planes", "zstd")
# When delta coding saves less than this, planes and plain zstd are tried too.
_RETRY_RATIO = 0.6

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = _local.__dict__.setdefault("c", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=False)
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


def _split_planes(arr: np.ndarray, width: int) -> list[bytes]:
    if width == 1:
        return [arr.tobytes()]
    b = arr.view(np.uint8).reshape(-1, width)
    return [b[:, i].tobytes() for i in range(width)]


def _join_planes(planes: list[bytes], width: int, count: int) -> np.ndarray:
    out = np.empty((count, width), dtype=np.uint8)
    for i, p in enumerate(planes):
        out[:, i] = np.frombuffer(p, dtype=np.uint8)
    return out.reshape(-1).view(_UINT[width])


def _zigzag(new: bytes, base: bytes, width: int) -> np.ndarray:
    u = _UINT[width]
    d = np.frombuffer(new, dtype=u) - np.frombuffer(base, dtype=u)  # wraps
    s = d.view(_INT[width])
    z: np.ndarray = (d << u(1)) ^ (s >> (8 * width - 1)).view(u)
    return z


def _unzigzag_add(z: np.ndarray, base: bytes, width: int) -> bytes:
    u = _UINT[width]
    d = (z >> u(1)) ^ (u(0) - (z & u(1)))
    out = d + np.frombuffer(base, dtype=u)
    return out.tobytes()


def _compress_all(parts: list[bytes], level: int) -> list[bytes]:
    c = _compressor(level)
    return [c.compress(p) for p in parts]


def encode_chunk(
    new: bytes, base: bytes | None, width: int, level: int = 3
) -> tuple[str, list[bytes]]:
    """Code one chunk; returns the codec name and its frames. ``base`` has the same length."""
    if base is not None:
        if new == base:
            return "same", []
        frames = _compress_all(_split_planes(_zigzag(new, base, width), width), level)
        size = sum(map(len, frames))
        if size <= _RETRY_RATIO * len(new):
            return "delta", frames
        best: tuple[str, list[bytes]] = ("delta", frames)
    else:
        best = ("", [])
        size = len(new) + 1
    for codec in ("planes", "zstd"):
        if codec == "planes" and width == 1:
            continue
        if codec == "planes":
            parts = _split_planes(np.frombuffer(new, dtype=_UINT[width]), width)
        else:
            parts = [new]
        frames = _compress_all(parts, level)
        if not best[0] or sum(map(len, frames)) < size:
            best, size = (codec, frames), sum(map(len, frames))
    return best


def frame_sizes(codec: str, length: int, width: int) -> list[int]:
    """The decompressed size of each frame of a chunk of ``length`` bytes."""
    if codec == "same":
        return []
    if codec == "zstd" or width == 1:
        return [length]
    return [length // width] * width


def decode_chunk(
    codec: str, frames: list[bytes], base: bytes | None, width: int, length: int
) -> bytes:
    """Invert :func:`encode_chunk`; output is capped at ``length`` bytes and checked."""
    if codec not in CODECS:
        raise FormatError(f"unknown chunk codec {codec!r}")
    sizes = frame_sizes(codec, length, width)
    if len(frames) != len(sizes):
        raise FormatError(f"{codec} chunk has {len(frames)} frames, expected {len(sizes)}")
    if codec in ("same", "delta") and (base is None or len(base) != length):
        raise FormatError(f"{codec} chunk without a matching base range")
    if codec == "same":
        assert base is not None
        return base
    d = _decompressor()
    parts = []
    for frame, size in zip(frames, sizes, strict=True):
        try:
            declared = zstandard.frame_content_size(frame)
            if declared not in (-1, size):
                raise FormatError(f"{codec} frame declares {declared} bytes, expected {size}")
            part = d.decompress(frame, max_output_size=size)
        except zstandard.ZstdError as e:
            raise FormatError(f"corrupt zstd frame in a {codec} chunk: {e}") from e
        if len(part) != size:
            raise FormatError(f"{codec} frame decodes to {len(part)} bytes, expected {size}")
        parts.append(part)
    if codec == "zstd":
        return parts[0]
    count = length // width
    if codec == "planes":
        return _join_planes(parts, width, count).tobytes()
    assert base is not None
    return _unzigzag_add(_join_planes(parts, width, count), base, width)
