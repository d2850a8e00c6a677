"""Property tests for the per-chunk codecs (manifest/codecs.py).

Every width, every codec, bit-exact: encode_chunk -> decode_chunk is the identity for any bytes,
with and without a base; decode_chunk rejects every malformed input with a FormatError.
"""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from manifest.codecs import (
    BASED_CODECS,
    CODECS,
    chunk_ranges,
    decode_chunk,
    encode_chunk,
    frame_count,
)
from manifest.errors import FormatError

WIDTHS = (1, 2, 4, 8)
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
DELTAS = BASED_CODECS - {"same"}
# What the encoder writes without a base (plain ``planes`` is only decoded, for old containers).
ENCODED_FULL = ("planes-rot", "zstd")
PROPS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# strategies


@st.composite
def contents(draw: st.DrawFn, width: int, count: int) -> bytes:
    """``count`` elements of ``width`` bytes: arbitrary, incompressible, repetitive or zero."""
    n = count * width
    kind = draw(st.sampled_from(["binary", "random", "pattern", "zeros"]))
    if kind == "binary":
        return draw(st.binary(min_size=n, max_size=n))
    if kind == "random":
        seed = draw(st.integers(0, 2**32 - 1))
        return np.random.default_rng(seed).bytes(n)
    if kind == "pattern":
        unit = draw(st.binary(min_size=1, max_size=8))
        return (unit * (n // len(unit) + 1))[:n]
    return bytes(n)


@st.composite
def width_and_count(draw: st.DrawFn, max_count: int = 600) -> tuple[int, int]:
    width = draw(st.sampled_from(WIDTHS))
    count = draw(st.one_of(st.just(0), st.integers(0, 4), st.integers(0, max_count)))
    return width, count


@st.composite
def chunk_no_base(draw: st.DrawFn) -> tuple[int, bytes]:
    width, count = draw(width_and_count())
    return width, draw(contents(width, count))


@st.composite
def chunk_random_base(draw: st.DrawFn) -> tuple[int, bytes, bytes]:
    width, count = draw(width_and_count())
    return width, draw(contents(width, count)), draw(contents(width, count))


@st.composite
def chunk_small_delta(draw: st.DrawFn) -> tuple[int, bytes, bytes]:
    """A base and the base with small integer perturbations of its bit patterns.

    Base elements are drawn partly near 0 and near the maximum of the width, so that the
    perturbation wraps around in both directions.
    """
    width, count = draw(width_and_count())
    u = UINT[width]
    top = int(np.iinfo(u).max)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    base = np.frombuffer(rng.bytes(count * width), dtype=u).copy()
    edge = draw(st.floats(0.0, 1.0))
    near = rng.random(count) < edge
    edges = np.array([0, 1, 2, top - 2, top - 1, top], dtype=u)
    base[near] = rng.choice(edges, size=int(near.sum()))
    fraction = draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]))
    magnitude = draw(st.integers(1, 1000))
    noise = rng.integers(-magnitude, magnitude + 1, size=count)
    noise[rng.random(count) >= fraction] = 0
    new = base + noise.astype(u)  # astype of a negative int wraps modulo 2**(8*width)
    return width, new.tobytes(), base.tobytes()


def _roundtrip(new: bytes, base: bytes | None, width: int) -> tuple[str, list[bytes]]:
    codec, frames = encode_chunk(new, base, width)
    assert codec in CODECS
    assert len(frames) == frame_count(codec, width)
    if base is None:
        assert codec in ENCODED_FULL
        assert width > 1 or codec == "zstd"
    assert (codec == "same") == (base is not None and new == base)
    out = decode_chunk(codec, frames, base, width, len(new))
    assert type(out) is bytes
    assert out == new
    return codec, frames


# ---------------------------------------------------------------------------------------------
# round trips


@PROPS
@given(chunk_no_base())
def test_roundtrip_without_base(case: tuple[int, bytes]) -> None:
    width, new = case
    _roundtrip(new, None, width)


@PROPS
@given(chunk_random_base())
def test_roundtrip_with_unrelated_base(case: tuple[int, bytes, bytes]) -> None:
    width, new, base = case
    _roundtrip(new, base, width)


@PROPS
@given(chunk_small_delta())
def test_roundtrip_with_small_delta(case: tuple[int, bytes, bytes]) -> None:
    width, new, base = case
    _roundtrip(new, base, width)


@PROPS
@given(chunk_no_base())
def test_identical_base_is_same_and_needs_no_payload(case: tuple[int, bytes]) -> None:
    width, new = case
    codec, frames = _roundtrip(new, bytes(new), width)
    assert codec == "same"
    assert frames == []


@pytest.mark.parametrize("width", WIDTHS)
def test_one_flipped_bit_is_not_same(width: int) -> None:
    base = np.random.default_rng(width).bytes(64 * width)
    for pos in (0, len(base) // 2, len(base) - 1):
        new = bytearray(base)
        new[pos] ^= 0x80
        codec, _ = _roundtrip(bytes(new), base, width)
        assert codec != "same"


@pytest.mark.parametrize("width", WIDTHS)
def test_wraparound_extremes(width: int) -> None:
    """0 - 1 and max + 1 wrap; the zigzag of the most negative difference is the largest."""
    u = UINT[width]
    top = np.iinfo(u).max
    half = u(top // 2 + 1)
    base = np.array([0, top, 0, top, 0, half, 1, top - 1], dtype=u)
    new = np.array([top, 0, half, half - u(1), 1, 0, 0, top], dtype=u)
    _roundtrip(new.tobytes(), base.tobytes(), width)
    _roundtrip(base.tobytes(), new.tobytes(), width)


@pytest.mark.parametrize("width", WIDTHS)
def test_every_codec_decodes(width: int) -> None:
    """Each codec is produced for some input and round-trips (covers the codec selection)."""
    rng = np.random.default_rng(7)
    n = 4096 * width
    base = rng.bytes(n)
    noisy = np.frombuffer(base, dtype=UINT[width]) + UINT[width](1)
    sparse = np.frombuffer(base, dtype=UINT[width]).copy()
    sparse[::10] += UINT[width](1)
    seen = {
        _roundtrip(base, base, width)[0],
        _roundtrip(noisy.tobytes(), base, width)[0],
        _roundtrip(sparse.tobytes(), base, width)[0],
        _roundtrip(rng.bytes(n), None, width)[0],
        _roundtrip(bytes(n), None, width)[0],
    }
    assert seen >= BASED_CODECS
    assert seen & set(ENCODED_FULL)


@pytest.mark.parametrize("width", WIDTHS)
def test_tiny_incompressible_chunk_without_base(width: int) -> None:
    """Regression: a short incompressible chunk without a base used to get codec ''."""
    for count in (1, 2, 3, 16):
        new = np.random.default_rng(count).bytes(count * width)
        codec, _ = _roundtrip(new, None, width)
        assert codec in ENCODED_FULL


# ---------------------------------------------------------------------------------------------
# planes-rot: the byte layout of docs/FORMAT.md, from a plain-Python reference


def _reference_rot_planes(data: bytes, width: int) -> list[bytes]:
    """Plane i = byte i (little endian) of each element rotated left by one bit in 8w bits."""
    bits = 8 * width
    mask = (1 << bits) - 1
    planes = [bytearray() for _ in range(width)]
    for j in range(0, len(data), width):
        x = int.from_bytes(data[j : j + width], "little")
        r = ((x << 1) | (x >> (bits - 1))) & mask
        for i, b in enumerate(r.to_bytes(width, "little")):
            planes[i].append(b)
    return [bytes(p) for p in planes]


EDGES = {w: [0, 1, 2, 1 << (8 * w - 1), (1 << (8 * w - 1)) - 1, (1 << (8 * w)) - 1,
             (1 << (8 * w)) - 2, 0x7F, 0x80] for w in WIDTHS}


@st.composite
def rot_case(draw: st.DrawFn) -> tuple[int, bytes]:
    """Any width; random bytes mixed with edge values (sign only, all ones, max positive...)."""
    width, count = draw(width_and_count(max_count=300))
    data = bytearray(draw(contents(width, count)))
    for _ in range(draw(st.integers(0, min(count, 8)))):
        j = draw(st.integers(0, count - 1))
        v = draw(st.sampled_from(EDGES[width])) & ((1 << (8 * width)) - 1)
        data[j * width : (j + 1) * width] = v.to_bytes(width, "little")
    return width, bytes(data)


@PROPS
@given(rot_case(), st.sampled_from([1, 3, 9, 10, 19]))
def test_planes_rot_matches_reference_layout(case: tuple[int, bytes], level: int) -> None:
    """Frames built by the reference decode; the encoder's frames hold the reference planes."""
    width, data = case
    n = len(data) // width
    ref = _reference_rot_planes(data, width)
    frames = [zstandard.ZstdCompressor().compress(p) for p in ref]
    assert decode_chunk("planes-rot", frames, None, width, len(data)) == data
    codec, enc = encode_chunk(data, None, width, level)
    if codec == "planes-rot":
        d = zstandard.ZstdDecompressor()
        assert [d.decompress(f, max_output_size=n) for f in enc] == ref
    assert decode_chunk(codec, enc, None, width, len(data)) == data


@pytest.mark.parametrize("width", (2, 4))
def test_planes_rot_puts_the_float_exponent_in_one_plane(width: int) -> None:
    """For BF16/F32 weights the top rotated plane is the exponent: smaller than plain planes."""
    f32 = np.random.default_rng(5).normal(0.0, 0.02, 1 << 15).astype(np.float32)
    u = f32.view(np.uint32)
    arr = (u >> np.uint32(16)).astype(np.uint16) if width == 2 else u
    data = arr.tobytes()
    codec, frames = _roundtrip(data, None, width)
    assert codec == "planes-rot"
    top = zstandard.ZstdDecompressor().decompress(frames[-1], max_output_size=arr.size)
    exponent = (arr >> (8 * width - 9)) & 0xFF
    assert top == exponent.astype(np.uint8).tobytes()
    plain = [zstandard.ZstdCompressor(level=3).compress(data[i::width]) for i in range(width)]
    assert sum(map(len, frames)) < sum(map(len, plain))


# ---------------------------------------------------------------------------------------------
# the point of delta coding


def test_delta_of_bf16_finetune_is_much_smaller_than_zstd() -> None:
    """A realistic bf16 fine-tune: most weights unchanged, some moved by one or two ulp."""
    rng = np.random.default_rng(2024)
    f32 = rng.normal(0.0, 0.02, 1 << 17).astype(np.float32)
    base = (f32.view(np.uint32) >> np.uint32(16)).astype(np.uint16)  # bf16 bit patterns
    ulps = rng.choice(np.array([-2, -1, 1, 2], dtype=np.int16), size=base.size)
    touched = rng.random(base.size) < 0.15
    new = base.copy()
    new[touched] = (base[touched].astype(np.int32) + ulps[touched]).astype(np.uint16)
    new_b, base_b = new.tobytes(), base.tobytes()

    anchor = len(zstandard.ZstdCompressor(level=3).compress(new_b))
    codec, frames = _roundtrip(new_b, base_b, 2)
    delta = sum(map(len, frames))
    assert codec in DELTAS
    assert anchor > 0.5 * len(new_b)  # sanity: bf16 weights barely compress on their own
    assert delta < 0.25 * anchor, (delta, anchor)


# ---------------------------------------------------------------------------------------------
# decode rejects malformed input


def _encoded(codec_wanted: str, width: int) -> tuple[str, list[bytes], bytes, bytes | None]:
    rng = np.random.default_rng(width)
    n = 512 * width
    base = rng.bytes(n)
    if codec_wanted in DELTAS:
        new_arr = np.frombuffer(base, dtype=UINT[width]).copy()
        step = 1 if codec_wanted == "delta" else 10
        new_arr[::step] += UINT[width](3)
        new = new_arr.tobytes()
        codec, frames = encode_chunk(new, base, width)
        assert codec == codec_wanted
        return codec, frames, new, base
    if codec_wanted == "same":
        return "same", [], base, base
    new = bytes(range(256)) * (n // 256)
    codec, frames = encode_chunk(new, None, width)
    if codec != codec_wanted:
        if codec_wanted == "zstd":
            parts = [new]
        elif codec_wanted == "planes":
            parts = [new[i::width] for i in range(width)]
        else:
            parts = _reference_rot_planes(new, width)
        codec, frames = codec_wanted, [zstandard.ZstdCompressor().compress(p) for p in parts]
    assert decode_chunk(codec, frames, None, width, n) == new
    return codec, frames, new, None


def _first_frame_size(codec: str, length: int, width: int) -> int:
    """The size the first frame of a chunk must decode to (docs/FORMAT.md, chunk codecs)."""
    if codec == "zstd":
        return length
    if codec == "delta-sparse":
        return (length // width + 7) // 8  # the non-zero bitmap
    return length // width


CASES = [(c, w) for c in CODECS for w in WIDTHS if not (c == "planes" and w == 1)]


@pytest.mark.parametrize(("codec", "width"), CASES)
def test_decode_rejects_wrong_frame_count(codec: str, width: int) -> None:
    codec, frames, new, base = _encoded(codec, width)
    extra = zstandard.ZstdCompressor().compress(b"")
    bad_counts = [[*frames, extra]]
    if frames:
        bad_counts.append(frames[:-1])
    for bad in bad_counts:
        with pytest.raises(FormatError, match="frames, expected"):
            decode_chunk(codec, bad, base, width, len(new))


@pytest.mark.parametrize(("codec", "width"), [c for c in CASES if c[0] != "same"])
def test_decode_rejects_frame_of_wrong_size(codec: str, width: int) -> None:
    codec, frames, new, base = _encoded(codec, width)
    size = _first_frame_size(codec, len(new), width)
    declared_short = zstandard.ZstdCompressor().compress(b"\x01" * (size - 1))
    unsized = zstandard.ZstdCompressor(write_content_size=False)
    undeclared_short = unsized.compress(b"\x01" * (size - 1))
    undeclared_long = unsized.compress(b"\x01" * (size + 1))
    assert zstandard.frame_content_size(undeclared_short) == -1
    for bad in (declared_short, undeclared_short, undeclared_long):
        with pytest.raises(FormatError, match=r"declares|decodes to|corrupt"):
            decode_chunk(codec, [bad, *frames[1:]], base, width, len(new))


def _frame_declaring(content_size: int) -> bytes:
    """A zstd frame whose header claims ``content_size`` bytes, holding one empty raw block."""
    descriptor = 0xE0  # 8-byte Frame_Content_Size, single segment
    last_empty_raw_block = (1).to_bytes(3, "little")
    return (
        b"\x28\xb5\x2f\xfd" + bytes([descriptor]) + struct.pack("<Q", content_size)
        + last_empty_raw_block
    )


@pytest.mark.parametrize("declared", [1 << 26, 1 << 40, (1 << 63) - 1])
@pytest.mark.parametrize(
    ("codec", "width"), [("zstd", 1), ("planes", 4), ("delta", 2), ("delta-sparse", 8)]
)
def test_decode_rejects_huge_declared_size_without_allocating(
    codec: str, width: int, declared: int
) -> None:
    frame = _frame_declaring(declared)
    assert zstandard.frame_content_size(frame) == declared
    codec, frames, new, base = _encoded(codec, width)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="declares"):
            decode_chunk(codec, [frame, *frames[1:]], base, width, len(new))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 16, b"not a zstd frame at all"])
def test_decode_rejects_corrupt_frame(garbage: bytes) -> None:
    codec, _, new, base = _encoded("zstd", 2)
    with pytest.raises(FormatError):
        decode_chunk(codec, [garbage], base, 2, len(new))


@pytest.mark.parametrize("codec", ["", "raw", "ZSTD", "lz4", "same "])
def test_decode_rejects_unknown_codec(codec: str) -> None:
    with pytest.raises(FormatError, match="unknown chunk codec"):
        decode_chunk(codec, [], None, 1, 0)


@pytest.mark.parametrize("width", WIDTHS)
def test_decode_rejects_delta_and_same_without_matching_base(width: int) -> None:
    for codec in sorted(BASED_CODECS):
        _, frames, new, base = _encoded(codec, width)
        assert base is not None
        for bad_base in (None, base[:-width], base + bytes(width)):
            with pytest.raises(FormatError, match="without a matching base"):
                decode_chunk(codec, frames, bad_base, width, len(new))


# ---------------------------------------------------------------------------------------------
# chunk_ranges


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 5000).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, 700))
    )
)
def test_chunk_ranges_tile_exactly(case: tuple[int, int, int]) -> None:
    nbytes, overlap, chunk = case
    ranges = list(chunk_ranges(nbytes, overlap, chunk))
    pos = 0
    for start, end in ranges:
        assert start == pos, "ranges must be contiguous, in order, without overlap"
        assert 0 < end - start <= chunk
        assert not start < overlap < end, "no range may straddle the overlap point"
        pos = end
    assert pos == nbytes
    starts = {s for s, _ in ranges}
    if 0 < overlap < nbytes:
        assert overlap in starts
    assert len(ranges) == -(-overlap // chunk) + -(-(nbytes - overlap) // chunk)


def test_chunk_ranges_examples() -> None:
    assert list(chunk_ranges(0, 0, 8)) == []
    assert list(chunk_ranges(10, 0, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(chunk_ranges(10, 10, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(chunk_ranges(10, 6, 4)) == [(0, 4), (4, 6), (6, 10)]
    assert list(chunk_ranges(12, 8, 8)) == [(0, 8), (8, 12)]


# ---------------------------------------------------------------------------------------------
# the choice between codecs: alternatives coded in full only when a sample says they may win


_BIG = 1 << 20  # larger than two samples: the sampled path


def _bf16_like(count: int, seed: int) -> bytes:
    """BF16 bit patterns of normal weights: rotated planes beat plain zstd on them."""
    f32 = np.random.default_rng(seed).normal(0, 0.02, count).astype(np.float32)
    return (f32.view(np.uint32) >> np.uint32(16)).astype(np.uint16).tobytes()


def _repetitive(nbytes: int, seed: int) -> bytes:
    """A random 4 KiB block repeated: plain zstd (long matches) beats any byte-plane coding."""
    block = np.random.default_rng(seed).bytes(4096)
    return (block * (nbytes // 4096 + 1))[:nbytes]


class _CountingCompressor:
    def __init__(self, inner: zstandard.ZstdCompressor, sizes: list[int]) -> None:
        self._inner, self._sizes = inner, sizes

    def compress(self, data: bytes) -> bytes:
        self._sizes.append(len(data))
        out: bytes = self._inner.compress(data)
        return out


def _plain_zstd_inputs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The input sizes of every plain-zstd (non-plane) compression from now on."""
    import manifest.codecs as codecs

    sizes: list[int] = []
    real = codecs._compressor
    monkeypatch.setattr(codecs, "_compressor",
                        lambda level: _CountingCompressor(real(level), sizes))
    return sizes


def test_full_object_skips_the_full_plain_zstd_when_planes_win_the_sample(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    new = _bf16_like(_BIG // 2, seed=1)
    sizes = _plain_zstd_inputs(monkeypatch)
    codec, frames = _roundtrip(new, None, 2)
    assert codec == "planes-rot"
    assert sizes and max(sizes) < len(new)  # only the sample was coded as plain zstd
    # and skipping it lost nothing: the full plain zstd frame would have been larger
    full = zstandard.ZstdCompressor(level=3).compress(new)
    assert sum(map(len, frames)) < len(full)


@pytest.mark.parametrize("width", [2, 4])
def test_full_object_keeps_plain_zstd_where_it_wins(
    width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    new = _repetitive(_BIG, seed=width)
    sizes = _plain_zstd_inputs(monkeypatch)
    codec, frames = _roundtrip(new, None, width)
    assert codec == "zstd"
    assert len(new) in sizes
    assert frames == [zstandard.ZstdCompressor(level=3, write_checksum=False).compress(new)]


def test_poor_delta_retries_plain_zstd_where_it_wins() -> None:
    base = np.random.default_rng(5).bytes(_BIG)
    new = _repetitive(_BIG, seed=6)
    codec, frames = _roundtrip(new, base, 2)
    assert codec == "zstd"
    assert sum(map(len, frames)) < len(new) // 50


def test_poor_delta_skips_full_retries_that_lose_the_sample(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unrelated BF16 weights: the delta saves little, the sample shows the retries lose too,
    so no plain zstd of the whole chunk is coded."""
    base, new = _bf16_like(_BIG // 2, seed=7), _bf16_like(_BIG // 2, seed=8)
    sizes = _plain_zstd_inputs(monkeypatch)
    codec, _ = _roundtrip(new, base, 2)
    assert codec in ("delta", "planes-rot")
    assert all(s < len(new) for s in sizes)
