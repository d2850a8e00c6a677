"""Helpers for the safetensors, codec and container tests: raw files and random tensors."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from manifest.safetensors_format import build_header

# numpy dtype -> safetensors dtype name, for the dtypes numpy can represent.
NUMPY_DTYPES: dict[str, str] = {
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
}


def raw_file(header: bytes | str | dict[str, Any], data: bytes = b"", *,
             declared: int | None = None) -> bytes:
    """A safetensors-shaped file: u64 header length (``declared`` or the real one), header, data.

    ``header`` may be a dict (serialised as JSON), a str (encoded as UTF-8) or raw bytes, so that
    malformed headers of every kind can be written.
    """
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    n = len(header) if declared is None else declared
    return struct.pack("<Q", n) + header + data


def entry(dtype: str, shape: list[Any], begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def random_array(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Random values of a numpy dtype, including NaNs and infinities for floats."""
    n = int(np.prod(shape, dtype=np.int64))
    if dtype == "bool":
        return np.asarray(rng.random(n) < 0.5).reshape(shape)
    raw = np.frombuffer(rng.bytes(n * np.dtype(dtype).itemsize), dtype=dtype)
    return raw.reshape(shape).copy()


def write_raw_tensors(
    path: str, tensors: list[tuple[str, str, tuple[int, ...], bytes]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file from raw bytes per tensor (any dtype, BF16 and F8 included)."""
    prefix, infos = build_header(((n, d, s) for n, d, s, _ in tensors), metadata)
    for info, (_, _, _, data) in zip(infos, tensors, strict=True):
        assert info.nbytes == len(data), (info, len(data))
    with open(path, "wb") as f:
        f.write(prefix)
        for *_, data in tensors:
            f.write(data)
