"""The encoder on reused buffers: chunks read into per-thread buffers, coded from scratch planes.

The publisher reads every chunk into a buffer it reuses (``SafetensorsFile.read_into``) and
``encode_chunk`` codes from per-thread scratch arrays: the frames must be the same bytes as
from a fresh ``bytes`` input and must never alias a buffer that is reused for the next chunk.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from manifest.codecs import decode_chunk, encode_chunk
from manifest.safetensors_format import SafetensorsFile

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _bf16_like(rng: np.random.Generator, count: int) -> np.ndarray:
    """Float-like bit patterns (the top half of float32 normals): planes-rot territory."""
    f = rng.standard_normal(count).astype(np.float32) * 0.02
    return (f.view(np.uint32) >> 16).astype(np.uint16)


@st.composite
def chunks(draw: st.DrawFn) -> tuple[int, bytes, bytes | None]:
    width = draw(st.sampled_from([1, 2, 4, 8]))
    count = draw(st.one_of(st.integers(0, 50), st.integers(1000, 70_000)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if width == 2:
        new = _bf16_like(rng, count).tobytes()
    else:
        new = rng.integers(0, 64, count * width, dtype=np.uint8).tobytes()
    kind = draw(st.sampled_from(["none", "same", "near", "unrelated"]))
    if kind == "none":
        return width, new, None
    if kind == "same":
        return width, new, new
    if kind == "unrelated":
        return width, new, rng.bytes(len(new))
    base = np.frombuffer(new, dtype=UINT[width]).copy()
    base[:: draw(st.integers(1, 9))] += UINT[width](1)
    return width, new, base.tobytes()


@PROPS
@given(chunks())
def test_buffer_inputs_give_the_frames_of_bytes(case: tuple[int, bytes, bytes | None]) -> None:
    width, new, base = case
    expected = encode_chunk(new, base, width)
    as_array = np.frombuffer(new, dtype=np.uint8).copy()
    base_view = None if base is None else memoryview(bytearray(base))
    got = encode_chunk(as_array, base_view, width)
    assert got == expected
    assert all(type(f) is bytes for f in got[1])
    assert decode_chunk(got[0], got[1], base, width, len(new)) == new


def test_frames_do_not_alias_reused_buffers() -> None:
    """Coding the next chunk (same thread, same scratch) and overwriting the input buffer
    leaves the frames of the previous chunk intact."""
    rng = np.random.default_rng(3)
    buf = bytearray(4 * 2**20)
    first = _bf16_like(rng, len(buf) // 2).tobytes()
    buf[:] = first
    codec, frames = encode_chunk(memoryview(buf), None, 2)
    kept = [bytes(f) for f in frames]
    buf[:] = _bf16_like(rng, len(buf) // 2).tobytes()
    encode_chunk(memoryview(buf), None, 2)
    encode_chunk(memoryview(buf), first, 2)
    assert frames == kept
    assert decode_chunk(codec, frames, None, 2, len(first)) == first


def test_threads_coding_at_once_get_their_own_scratch() -> None:
    rng = np.random.default_rng(4)
    items: list[tuple[bytes, bytes | None]] = [
        (_bf16_like(rng, 300_000 + 1000 * i).tobytes(), None) for i in range(12)]
    items += [(new, _bf16_like(rng, len(new) // 2).tobytes()) for new, _ in items[:6]]
    expected = [encode_chunk(new, base, 2) for new, base in items]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda it: encode_chunk(np.frombuffer(it[0], np.uint8), it[1], 2),
                          items * 3))
    assert got == expected * 3


def test_read_into_matches_read(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    arr = np.arange(100, dtype=np.int16)
    save_file({"a": arr, "b": arr[:3].copy()}, str(path))
    with SafetensorsFile(path) as f:
        t = f.tensors["a"]
        for offset, length in ((0, 200), (10, 6), (199, 1), (200, 0)):
            out = bytearray(b"\xee" * (length + 4))
            f.read_into(t, offset, memoryview(out)[:length])
            assert bytes(out[:length]) == f.read(t, offset, length)
            assert out[length:] == b"\xee" * 4  # nothing written past the view
        wide = np.zeros(3, dtype=np.uint16)  # a buffer of 2-byte items is filled bytewise
        f.read_into(t, 4, wide.data)
        assert wide.tobytes() == arr.tobytes()[4:10]
        for offset, length in ((-1, 2), (0, 201), (199, 2)):
            with pytest.raises(ValueError, match="outside tensor"):
                f.read_into(t, offset, memoryview(bytearray(length)))


@pytest.mark.parametrize(("given", "expected"), [(None, "1"), ("3", "3")])
def test_the_publisher_starts_no_blas_threads_unless_asked(
    given: str | None, expected: str
) -> None:
    """numpy is imported after publisher/__init__ defaults OPENBLAS_NUM_THREADS to 1 (its
    threads only spin: the publisher never calls BLAS); a value the user set is kept."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if given is not None:
        env["OPENBLAS_NUM_THREADS"] = given
    code = ("import publisher, os, sys; assert 'numpy' in sys.modules; "
            "print(os.environ['OPENBLAS_NUM_THREADS'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == expected
