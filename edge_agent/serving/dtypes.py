"""Float32 arrays from the raw little-endian bytes of the float formats NumPy lacks.

NumPy has no bfloat16 or float8 dtype, so safetensors tensors of those dtypes stay raw bytes
(see ../shared/FIELD.md §3). :func:`to_float32` decodes them into a new float32 array. Every
value of these formats is exactly a float32 value, so the conversion is exact: signed zeros,
subnormals, infinities and NaN positions are kept.

* ``BF16``: the top half of a float32 (shift the 16 bits up by 16).
* ``F16``: IEEE binary16, through NumPy's ``float16``.
* ``F8_E4M3`` (OCP FP8, "e4m3fn"): bias 7, subnormals, no infinities, NaN only at
  ``S.1111.111``; the largest finite value is 448.
* ``F8_E5M2`` (OCP FP8): bias 15, IEEE-like: exponent 31 is infinity (mantissa 0) or NaN.
* ``F8_E8M0`` (OCP MX scales): ``2 ** (e - 127)``, no sign, no zero; ``0xFF`` is NaN.

The float8 formats decode through a 256-entry table built from those rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["FLOAT32_DTYPES", "to_float32"]

Float32Array = npt.NDArray[np.float32]


def _fp8_table(exponent_bits: int, mantissa_bits: int, bias: int, *, ieee: bool) -> Float32Array:
    """The value of every 8-bit pattern of a sign/exponent/mantissa format."""
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes >> 7, -1.0, 1.0)
    e = (codes >> mantissa_bits) & ((1 << exponent_bits) - 1)
    m = codes & ((1 << mantissa_bits) - 1)
    subnormal = m * 2.0 ** (1 - bias - mantissa_bits)
    normal = (m + (1 << mantissa_bits)) * np.exp2((e - bias - mantissa_bits).astype(np.float64))
    values = sign * np.where(e == 0, subnormal, normal)
    top = e == (1 << exponent_bits) - 1
    if ieee:
        values[top & (m == 0)] = sign[top & (m == 0)] * np.inf
        values[top & (m != 0)] = np.nan
    else:
        values[top & (m == (1 << mantissa_bits) - 1)] = np.nan
    return values.astype(np.float32)


def _e8m0_table() -> Float32Array:
    values = np.exp2(np.arange(256, dtype=np.float64) - 127)
    values[255] = np.nan
    return values.astype(np.float32)


_TABLES: dict[str, Float32Array] = {
    "F8_E4M3": _fp8_table(4, 3, 7, ieee=False),
    "F8_E5M2": _fp8_table(5, 2, 15, ieee=True),
    "F8_E8M0": _e8m0_table(),
}
_WIDTHS = {"BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}

FLOAT32_DTYPES: frozenset[str] = frozenset(_WIDTHS)
"""The safetensors dtypes :func:`to_float32` decodes."""


def to_float32(
    raw: bytes | bytearray | memoryview, dtype: str, shape: Sequence[int],
    out: Float32Array | None = None,
) -> Float32Array:
    """Decode the little-endian bytes of a ``dtype`` tensor of ``shape`` into a new array, or
    into ``out`` (a C-contiguous float32 array of that shape) without a temporary copy.

    Raises ``ValueError`` for a dtype outside :data:`FLOAT32_DTYPES`, a byte length that is
    not the shape's element count times the element width, or an unfit ``out``.
    """
    width = _WIDTHS.get(dtype)
    if width is None:
        raise ValueError(f"no float32 conversion for dtype {dtype!r}")
    count = math.prod(shape)
    nbytes = memoryview(raw).nbytes
    if nbytes != count * width:
        raise ValueError(
            f"{dtype} tensor of shape {list(shape)} needs {count * width} bytes, got {nbytes}"
        )
    if out is None:
        out = np.empty(tuple(shape), dtype=np.float32)
    elif (out.dtype != np.float32 or out.shape != tuple(shape)
          or not out.flags.c_contiguous or not out.flags.writeable):
        raise ValueError(f"out must be a writable C-contiguous float32 array of shape "
                         f"{list(shape)}")
    flat = out.reshape(-1)
    if dtype == "BF16":  # the bits of a BF16 are the high half of the float32's
        bits = flat.view(np.uint32)
        bits[...] = np.frombuffer(raw, dtype="<u2")
        bits <<= 16
    elif dtype == "F16":
        flat[...] = np.frombuffer(raw, dtype="<f2")
    else:
        np.take(_TABLES[dtype], np.frombuffer(raw, dtype=np.uint8), out=flat)
    return out
