"""Fuzzing every parser of bytes from outside: only the project's errors come out, in bounded
memory.

Valid inputs (a real patch container and full object, a safetensors header, chunk frames,
signed-document entries, packed indexes) are mutated by hypothesis: bytes flipped, cut or
appended, JSON values replaced by other types, huge or negative numbers, wrong nesting. Each
parser must either accept the input or raise its documented error (FormatError, OversizeError,
HashMismatchError, UnsafeNameError, SafetensorsError), never IndexError, KeyError, TypeError,
ValueError, OverflowError, struct.error or zstandard.ZstdError, and its tracemalloc peak stays
under a bound derived from the input's size and the documented caps. Examples are derandomized
so CI is reproducible; failures found here are pinned as plain tests below.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import re
import struct
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from manifest.codecs import CODECS, chunk_ranges, decode_chunk_into, encode_chunk, frame_count
from manifest.container import ContainerBuilder, apply_container
from manifest.entries import (
    MAX_INDEX_SIZE,
    FileEntry,
    GroupEntry,
    IndexDelta,
    ObjectRef,
    PackedIndex,
    ReleasePointer,
    folder_clash,
)
from manifest.errors import OversizeError, SafetensorsError, UntrustedDataError
from manifest.index_packing import pack_delta, pack_zstd, unpack_index
from manifest.metadata import ReleaseIndex
from manifest.report import DeviceReport
from manifest.rollout import Rollout
from manifest.safetensors_format import SafetensorsFile, build_header, parse_header

# DELTASHIP_FUZZ_EXAMPLES=5000 explores further (random, not derandomized), for a local hunt;
# DELTASHIP_FUZZ_EVENTS=1 with --hypothesis-show-statistics shows which checks refused what.
_HUNT = int(os.environ.get("DELTASHIP_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_HUNT or 200, deadline=None, derandomize=not _HUNT, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HUGE = "9" * 5000  # past Python's 4300-digit int limit: json.loads raises a plain ValueError
HOSTILE: list[Any] = [
    None, True, False, 0, -1, -(2**63), 2**63, 2**64, 10**300, 1.5, float("1e308"), "", "x",
    "A" * 300, [], [None], [[[]]], {}, {"a": 1}, [0, 1], [2**62] * 64, HUGE,
]

CHUNK = 4096  # small chunks: many chunk entries in a small container


# ---------------------------------------------------------------------------------------------
# mutation helpers


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value inside ``doc`` (dict keys and list indexes)."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def _copy_to_parent(doc: Any, path: tuple[Any, ...]) -> tuple[Any, Any]:
    """A deep copy of ``doc`` and, inside it, the container of the value at ``path``."""
    out = copy.deepcopy(doc)
    node = out
    for p in path[:-1]:
        node = node[p]
    return out, node


def _replace(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    out, parent = _copy_to_parent(doc, path)
    parent[path[-1]] = value
    return out


def _drop(doc: Any, path: tuple[Any, ...]) -> Any:
    if not path:
        return doc
    out, parent = _copy_to_parent(doc, path)
    del parent[path[-1]]
    return out


def _dumps(doc: Any) -> bytes:
    """JSON bytes; the string HUGE becomes a bare integer of 5000 digits."""
    return json.dumps(doc).replace(f'"{HUGE}"', HUGE).encode()


@st.composite
def mutated_doc(draw: st.DrawFn, doc: Any) -> Any:
    """``doc`` with one to three values replaced (hostile values, wrong nesting) or dropped."""
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        how = draw(st.sampled_from(["hostile", "nest", "drop"]))
        if how == "drop":
            doc = _drop(doc, path)
        elif how == "nest":
            node = doc
            for p in path:
                node = node[p]
            doc = _replace(doc, path, draw(st.sampled_from([[node], {"x": node}])))
        else:
            doc = _replace(doc, path, draw(st.sampled_from(HOSTILE)))
    return doc


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with bytes flipped, cut or appended."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "set", "cut", "extend", "splice"]))
        at = draw(st.integers(0, max(0, len(buf) - 1)))
        if how == "flip" and buf:
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "set" and buf:
            buf[at] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80]))
        elif how == "cut":
            del buf[at:]
        elif how == "extend":
            buf += draw(st.binary(min_size=1, max_size=64))
        else:
            buf[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(buf)


def _peak(fn: Callable[[], object]) -> tuple[int, BaseException | None]:
    """Run ``fn`` under tracemalloc: its peak allocation and what it raised (None: nothing)."""
    tracemalloc.start()
    try:
        fn()
        err: BaseException | None = None
    except Exception as e:
        err = e
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak, err


def _check(err: BaseException | None, allowed: tuple[type[BaseException], ...]) -> None:
    if os.environ.get("DELTASHIP_FUZZ_EVENTS"):  # --hypothesis-show-statistics: which checks
        event(re.sub(r"[0-9a-f]{8,}|\d+", "N", str(err))[:70] if err else "accepted")
    if err is not None and not isinstance(err, allowed):
        raise AssertionError(f"escaped {type(err).__name__}: {err}") from err
    if err is not None:
        line = str(err)
        assert line and "\n" not in line and len(line) < 2000, line


# ---------------------------------------------------------------------------------------------
# safetensors headers


def _header_doc() -> dict[str, Any]:
    prefix, _ = build_header(
        [("a", "F32", (4, 3)), ("b.weight", "BF16", (5,)), ("c", "U8", (0, 7)),
         ("d", "I64", (2, 1, 2))],
        {"format": "pt"},
    )
    doc: dict[str, Any] = json.loads(prefix[8:])
    return doc


_HEADER = _header_doc()
_HEADER_DATA = 4 * 3 * 4 + 5 * 2 + 0 + 4 * 8


@FUZZ
@given(st.data())
def test_fuzz_safetensors_header_values(data: st.DataObject) -> None:
    raw = _dumps(data.draw(mutated_doc(_HEADER)))
    peak, err = _peak(lambda: parse_header(raw, _HEADER_DATA))
    _check(err, (SafetensorsError,))
    assert peak < 64 * len(raw) + (1 << 20)


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_file_bytes(data: st.DataObject, tmp_path_factory: Any) -> None:
    prefix, _ = build_header([("a", "F32", (4, 3)), ("b", "BF16", (5,))])
    blob = data.draw(mutated_bytes(prefix + bytes(4 * 3 * 4 + 5 * 2)))
    path = tmp_path_factory.mktemp("st") / "m.safetensors"
    path.write_bytes(blob)

    def load() -> None:
        with SafetensorsFile(path) as f:
            for t in f.tensors.values():
                f.read(t)

    peak, err = _peak(load)
    _check(err, (SafetensorsError,))
    assert peak < 64 * len(blob) + (1 << 20)


def test_header_int_past_the_digit_limit_is_a_safetensors_error() -> None:
    """Found by fuzzing: json.loads raised a plain ValueError for an int of 5000 digits."""
    raw = _dumps({"a": {"dtype": "U8", "shape": [HUGE], "data_offsets": [0, 1]}})
    with pytest.raises(SafetensorsError, match="not UTF-8 JSON"):
        parse_header(raw, 1)


def test_header_shape_whose_product_passes_the_digit_limit_is_a_safetensors_error() -> None:
    """Found by fuzzing: the mismatch message printed a product of 8000 digits (ValueError)."""
    raw = _dumps({"a": {"dtype": "U8", "shape": [10**4000, 10**4000], "data_offsets": [0, 1]}})
    with pytest.raises(SafetensorsError, match=f"= more than {2**64}, but") as e:
        parse_header(raw, 1)
    assert len(str(e.value)) < 400


def test_header_with_a_long_shape_of_huge_dims_is_refused_without_multiplying_them() -> None:
    """A 1.7 MB header whose shape lists 80000 dims of 2**62 took 11.6 s (quadratic product,
    then a ValueError from printing it); a 100 MB header would take hours. The product now
    stops once it passes the tensor's span (or 2**64): here after two multiplications."""
    raw = _dumps({"a": {"dtype": "U8", "shape": [2**62] * 80_000, "data_offsets": [0, 1]}})
    with pytest.raises(SafetensorsError, match="a list of 80000 items") as e:
        parse_header(raw, 1)
    assert len(str(e.value)) < 400


def test_zero_dimension_anywhere_still_means_zero_bytes() -> None:
    raw = _dumps({"a": {"dtype": "F32", "shape": [2**62] * 10 + [0], "data_offsets": [0, 0]},
                  "b": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}})
    tensors, _ = parse_header(raw, 3)
    assert [(t.name, t.nbytes) for t in tensors] == [("a", 0), ("b", 3)]


# ---------------------------------------------------------------------------------------------
# patch containers


def _safetensors(tensors: list[tuple[str, str, tuple[int, ...], bytes]]) -> bytes:
    prefix, _ = build_header([(n, d, s) for n, d, s, _ in tensors])
    return prefix + b"".join(b for *_, b in tensors)


def _model(seed: int, scale: int) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(3 * CHUNK // 4).astype(np.float32)
    h = (rng.standard_normal(CHUNK).astype(np.float32) * scale).astype(np.float16)
    return [("w", "F32", (3 * CHUNK // 4,), w.tobytes()),
            ("h", "F16", (CHUNK,), h.tobytes()),
            ("b", "U8", (37,), bytes(range(37)))]


def _container(base_file: bytes | None, target: bytes) -> bytes:
    """A container built the way the publisher does: chunk by chunk, same-named base tensor."""
    n = struct.unpack("<Q", target[:8])[0]
    tensors, _ = parse_header(target[8:8 + n], len(target) - 8 - n)
    base_tensors: dict[str, Any] = {}
    base_start = 0
    if base_file is not None:
        bn = struct.unpack("<Q", base_file[:8])[0]
        base_start = 8 + bn
        base_tensors = {t.name: t for t in
                        parse_header(base_file[8:8 + bn], len(base_file) - base_start)[0]}
    b = ContainerBuilder(None if base_file is None else
                         (hashlib.sha256(base_file).hexdigest(), len(base_file)), CHUNK, 3)
    b.set_prefix(target[:8 + n])
    for t in tensors:
        bt = base_tensors.get(t.name)
        overlap = min(bt.nbytes, t.nbytes) if bt is not None and bt.width == t.width else 0
        b.add_tensor(t.name, t.name if overlap else None, overlap)
        data = target[8 + n + t.begin:8 + n + t.end]
        for lo, hi in chunk_ranges(t.nbytes, overlap, CHUNK):
            ref = None
            if bt is not None and hi <= overlap:
                assert base_file is not None
                ref = base_file[base_start + bt.begin + lo:base_start + bt.begin + hi]
            codec, frames = encode_chunk(data[lo:hi], ref, t.width)
            b.add_chunk(codec, frames)
    out = io.BytesIO()
    b.finish(hashlib.sha256(target).hexdigest(), len(target), out)
    return out.getvalue()


_BASE = _safetensors(_model(1, 1))
_TARGET = _safetensors(_model(1, 1)[:1] + _model(2, 2)[1:])
_PATCH = _container(_BASE, _TARGET)
_FULL = _container(None, _TARGET)
_BASE_DIR = tempfile.mkdtemp(prefix="fuzz-base-")
_BASE_PATH = os.path.join(_BASE_DIR, "base.safetensors")
with open(_BASE_PATH, "wb") as _f:
    _f.write(_BASE)


_POOL = ThreadPoolExecutor(2)  # as a device decodes: chunks in parallel, in order


def _apply(container: bytes, with_base: bool, pool: ThreadPoolExecutor | None = None) -> bytes:
    out = io.BytesIO()
    if with_base:
        with SafetensorsFile(_BASE_PATH) as base:
            apply_container(container, base, out, executor=pool)
    else:
        apply_container(container, None, out, executor=pool)
    return out.getvalue()


def test_the_fuzzed_containers_apply_unmodified() -> None:
    assert _apply(_PATCH, True) == _TARGET == _apply(_PATCH, True, _POOL)
    assert _apply(_FULL, False) == _TARGET == _apply(_FULL, False, _POOL)
    assert len(_PATCH) < len(_FULL)  # the patch codes against the base (same/delta chunks)


# A decode holds the container, its output and a few chunk buffers (numpy arrays are traced).
_CONTAINER_BOUND = 8 * (len(_FULL) + len(_TARGET)) + 64 * CHUNK + (2 << 20)


@FUZZ
@given(st.data(), st.booleans(), st.booleans())
def test_fuzz_container_bytes(data: st.DataObject, patch: bool, parallel: bool) -> None:
    blob = data.draw(mutated_bytes(_PATCH if patch else _FULL))
    peak, err = _peak(lambda: _apply(blob, patch, _POOL if parallel else None))
    _check(err, (UntrustedDataError,))
    assert peak < _CONTAINER_BOUND + 8 * len(blob)


def _split(container: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", container[8:16])[0]
    return json.loads(container[16:16 + n]), container[16 + n:]


@FUZZ
@given(st.data(), st.booleans())
def test_fuzz_container_header_values(data: st.DataObject, patch: bool) -> None:
    header, payload = _split(_PATCH if patch else _FULL)
    raw = _dumps(data.draw(mutated_doc(header)))
    blob = b"DSPATCH1" + struct.pack("<Q", len(raw)) + raw + payload
    peak, err = _peak(lambda: _apply(blob, patch))
    _check(err, (UntrustedDataError,))
    assert peak < _CONTAINER_BOUND + 8 * len(blob)


def _near(v: Any) -> st.SearchStrategy[Any]:
    """Plausible wrong values for a container header field: what a buggy publisher might
    write (off by a little, another codec or tensor name, a power of two), not random types."""
    names = st.sampled_from(["w", "h", "b", "x", None])
    if isinstance(v, bool) or v is None:
        return st.one_of(st.none(), names)
    if isinstance(v, int):
        return st.one_of(st.integers(max(0, v - 9), v + 9), st.sampled_from(
            [0, 1, 7, 8, 16, 2 * v, v // 2, 1 << 20, 1 << 24, (1 << 24) + 8, 1 << 40]))
    if isinstance(v, str) and v in CODECS:
        return st.sampled_from(CODECS)
    if isinstance(v, str):
        return names
    if isinstance(v, list):
        return st.sampled_from([[], v[:-1], [*v, v[-1]] if v else [0], v[::-1]])
    return st.just(v)


@FUZZ
@given(st.data(), st.booleans())
def test_fuzz_container_header_plausible_values(data: st.DataObject, patch: bool) -> None:
    header, payload = _split(_PATCH if patch else _FULL)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(header) if p and p[0] in ("chunk_bytes", "prefix", "tensors")]
        path = data.draw(st.sampled_from(paths))
        node = header
        for p in path:
            node = node[p]
        header = _replace(header, path, data.draw(_near(node)))
    raw = _dumps(header)
    blob = b"DSPATCH1" + struct.pack("<Q", len(raw)) + raw + payload
    peak, err = _peak(lambda: _apply(blob, patch))
    _check(err, (UntrustedDataError,))
    assert peak < _CONTAINER_BOUND + 8 * len(blob)


@FUZZ
@given(st.data())
def test_fuzz_container_target_header(data: st.DataObject) -> None:
    """The safetensors header inside the prefix frame, mutated (and re-framed so it decodes)."""
    header, payload = _split(_FULL)
    old_prefix = header["prefix"]
    n = struct.unpack("<Q", _TARGET[:8])[0]
    st_doc = json.loads(_TARGET[8:8 + n])
    raw = _dumps(data.draw(mutated_doc(st_doc)))
    frame = zstandard.ZstdCompressor().compress(struct.pack("<Q", len(raw)) + raw)
    header["prefix"] = len(frame)
    hraw = _dumps(header)
    blob = (b"DSPATCH1" + struct.pack("<Q", len(hraw)) + hraw + frame + payload[old_prefix:])
    peak, err = _peak(lambda: _apply(blob, False))
    _check(err, (UntrustedDataError,))
    assert peak < _CONTAINER_BOUND + 8 * len(blob)


def test_target_header_with_an_int_past_the_digit_limit_is_a_format_error() -> None:
    """Found by fuzzing: the container's target header escaped as a ValueError."""
    header, payload = _split(_FULL)
    raw = _dumps({"w": {"dtype": "U8", "shape": [HUGE], "data_offsets": [0, 1]}})
    frame = zstandard.ZstdCompressor().compress(struct.pack("<Q", len(raw)) + raw)
    old_prefix, header["prefix"] = header["prefix"], len(frame)
    hraw = _dumps(header)
    blob = b"DSPATCH1" + struct.pack("<Q", len(hraw)) + hraw + frame + payload[old_prefix:]
    with pytest.raises(UntrustedDataError, match="target header is malformed"):
        _apply(blob, False)


def test_container_naming_a_huge_base_value_says_so_in_one_short_line() -> None:
    """Found in review: the message quoted the container's base tensor name whole, whatever
    JSON it was (here a list of 100000 ints: a 2 MB line)."""
    header, payload = _split(_PATCH)
    header["tensors"][0]["base"] = [2**62] * 100_000
    raw = _dumps(header)
    blob = b"DSPATCH1" + struct.pack("<Q", len(raw)) + raw + payload
    with pytest.raises(UntrustedDataError, match="missing base tensor <a list of 100000") as e:
        _apply(blob, True)
    assert len(str(e.value)) < 400


def test_tiny_chunks_of_a_big_target_are_counted_without_listing_them() -> None:
    """Found in review: a 347-byte container naming an 8 MiB target tensor with 8-byte chunks
    (and no chunk entries) made the decoder list all 1M chunk ranges before comparing their
    count, a 128 MiB peak (16x the target: a 1 GB group would take 16 GB). It is refused now
    with memory independent of the target's size."""
    n = 8 * 1024 * 1024
    st_raw = json.dumps({"t": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    st_raw += b" " * (-len(st_raw) % 8)
    prefix = struct.pack("<Q", len(st_raw)) + st_raw
    frame = zstandard.ZstdCompressor().compress(prefix)
    header = {"_type": "deltaship.patch", "spec_version": 1, "base": None,
              "target": {"sha256": "0" * 64, "length": len(prefix) + n}, "chunk_bytes": 8,
              "prefix": len(frame),
              "tensors": [{"name": "t", "base": None, "overlap": 0, "chunks": []}]}
    raw = _dumps(header)
    blob = b"DSPATCH1" + struct.pack("<Q", len(raw)) + raw + frame
    peak, err = _peak(lambda: _apply(blob, False))
    assert isinstance(err, UntrustedDataError) and "wrong chunk count" in str(err)
    assert peak < 64 * len(blob) + (1 << 20), peak  # was 128 MiB


# ---------------------------------------------------------------------------------------------
# chunk codecs


_CHUNK_DATA = np.random.default_rng(3).standard_normal(512).astype(np.float32).tobytes()
_CHUNK_BASE = (np.frombuffer(_CHUNK_DATA, np.float32) + np.float32(1e-3)).tobytes()
_SPARSE_BASE = bytearray(_CHUNK_DATA)
_SPARSE_BASE[:8] = b"\x01" * 8


@FUZZ
@given(st.data(), st.sampled_from(["delta", "sparse", "full"]), st.sampled_from([1, 2, 4, 8]))
def test_fuzz_chunk_frames(data: st.DataObject, kind: str, width: int) -> None:
    base = {"delta": _CHUNK_BASE, "sparse": bytes(_SPARSE_BASE), "full": None}[kind]
    codec, frames = encode_chunk(_CHUNK_DATA, base, width)
    frames = list(frames)
    mutate_real: bool = data.draw(st.booleans())
    if frames and mutate_real:
        i = data.draw(st.integers(0, len(frames) - 1))
        frames[i] = data.draw(mutated_bytes(frames[i]))
    else:
        codec = data.draw(st.sampled_from(CODECS))
        frames = data.draw(st.lists(st.binary(max_size=64), max_size=frame_count(codec, width)
                                    + 1))
    length = data.draw(st.sampled_from([len(_CHUNK_DATA), len(_CHUNK_DATA) - width, 0, 7]))
    ref = None if base is None else base[:length]
    out = np.empty(len(_CHUNK_DATA), dtype=np.uint8)
    peak, err = _peak(lambda: decode_chunk_into(codec, frames, ref, width, length, out))
    _check(err, (UntrustedDataError,))
    assert peak < 16 * len(_CHUNK_DATA) + (1 << 20)


# ---------------------------------------------------------------------------------------------
# signed-document entries, device reports, packed indexes


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


_OBJ = {"sha256": _sha(b"o"), "length": 10, "encoding": "dspatch"}
_GROUP = {
    "name": "g0", "file": "g0.safetensors", "sha256": _sha(b"g"), "length": 100,
    "tensors": [{"name": "a", "dtype": "F32", "shape": [2, 3]}],
    "full": {**_OBJ, "encoding": "zstd"},
    "patches": [{"base_version": "1.0", "base_sha256": _sha(b"b"), "object": _OBJ}],
    "chain": [{"base_sha256": _sha(b"c"), "sha256": _sha(b"b"), "length": 90, "object": _OBJ}],
}
_FILE = {"path": "config.json", "sha256": _sha(b"f"), "length": 5,
         "object": {**_OBJ, "encoding": "zstd"}}
_POINTER = {"version": "1.1", "index": {
    "sha256": _sha(b"i"), "length": 1000, "zstd": {"sha256": _sha(b"z"), "length": 300},
    "deltas": sorted([{"from": _sha(b"a"), "sha256": _sha(b"d"), "length": 30},
                      {"from": _sha(b"b"), "sha256": _sha(b"e"), "length": 40}],
                     key=lambda d: str(d["from"]))}}
_ROLLOUT = {"candidate": _POINTER, "basis_points": 1000, "state": "active",
            "ramp": {"start": "2026-01-01T00:00:00Z", "end": "2026-01-02T00:00:00Z",
                     "start_basis_points": 100, "end_basis_points": 5000}}
_REPORT = {"_type": "deltaship.device-report", "spec_version": 3, "device_id": "dev-1",
           "repository_id": "0" * 32, "channel": "stable", "state": "failed",
           "current": "1.0", "target": "1.1", "last_error": "boom",
           "failed_versions": ["1.1"], "last_update_bytes": 5,
           "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:01:00Z",
           "agent_version": "0.1"}

_DOCS: dict[str, tuple[dict[str, Any], Callable[[Any], object]]] = {
    "group": (_GROUP, lambda d: GroupEntry.from_dict(d, "group")),
    "file": (_FILE, lambda d: FileEntry.from_dict(d, "file")),
    "pointer": (_POINTER, lambda d: ReleasePointer.from_dict(d, "current")),
    "rollout": (_ROLLOUT, lambda d: Rollout.from_dict(d)),
    "report": (_REPORT, lambda d: DeviceReport.from_bytes(_dumps(d))),
}


@pytest.mark.parametrize("kind", sorted(_DOCS))
def test_the_fuzzed_documents_parse_unmodified(kind: str) -> None:
    doc, parse = _DOCS[kind]
    parse(json.loads(json.dumps(doc)))


@FUZZ
@given(st.data(), st.sampled_from(sorted(_DOCS)))
def test_fuzz_document_values(data: st.DataObject, kind: str) -> None:
    doc, parse = _DOCS[kind]
    mutated = data.draw(mutated_doc(doc))
    # Documents are parsed from JSON bytes: the same types as loads_object returns.
    raw = _dumps(mutated)
    try:
        value = json.loads(raw)
    except ValueError:
        value = None  # the 5000-digit int: loads_object refuses it before any from_dict
    peak, err = _peak(lambda: parse(value))
    _check(err, (UntrustedDataError,))
    assert peak < 64 * len(raw) + (1 << 20)


_INDEX = json.dumps({"groups": [_GROUP] * 20, "files": [_FILE] * 5}).encode()
_OLD_INDEX = json.dumps({"groups": [_GROUP] * 19, "files": [_FILE] * 4}).encode()


@FUZZ
@given(st.data(), st.booleans())
def test_fuzz_packed_index(data: st.DataObject, delta: bool) -> None:
    """Mutated packed bytes, pinned as they are (as if signed): only untrusted-data errors."""
    packed = pack_delta(_INDEX, _OLD_INDEX) if delta else pack_zstd(_INDEX)
    blob = data.draw(mutated_bytes(packed))
    if not blob:
        return
    form: PackedIndex | IndexDelta = (IndexDelta(_sha(_OLD_INDEX), _sha(blob), len(blob))
                                      if delta else PackedIndex(_sha(blob), len(blob)))
    pin = ObjectRef(_sha(_INDEX), len(_INDEX), "json")
    peak, err = _peak(lambda: unpack_index(blob, form, pin, _OLD_INDEX if delta else None))
    _check(err, (UntrustedDataError,))
    assert peak < 8 * (len(_INDEX) + len(_OLD_INDEX)) + 64 * len(blob) + (1 << 20)


def test_packed_index_pinned_over_the_index_cap_is_refused_before_decoding() -> None:
    """Found in review: the output bound of a packed index was the pinned index length, which
    nothing capped: a 2 KB zstd form of a 64 MiB index (any size: zstd codes zeros at ~32000:1)
    decoded in full (a 64 MiB peak for 64 MiB) before the index cap refused it."""
    big = bytes(MAX_INDEX_SIZE + 1)
    packed = pack_zstd(big)
    pin = ObjectRef(_sha(big), len(big), "json")
    peak, err = _peak(lambda: unpack_index(packed, PackedIndex(_sha(packed), len(packed)), pin))
    assert isinstance(err, OversizeError) and "over its cap" in str(err), err
    assert peak < 64 * len(packed) + (1 << 20), peak  # was the pinned length


def test_index_of_deep_file_paths_is_checked_for_folder_clashes_in_bounded_memory() -> None:
    """Found in review: the file/folder clash check listed every folder of every path; an
    index of 2000 files of 1 KB paths 500 folders deep (2.4 MB) peaked at 561 MiB and took
    14 s (a 16 MiB index: gigabytes). Same answer now, in memory of the index's order."""
    deep = "/".join(["a"] * 500)
    files = [{**_FILE, "path": f"{i:05d}/{deep}"} for i in range(300)]
    clash = [*files, {**_FILE, "path": "00007/a/a"}]
    for listed, error in ((files, None), (clash, "'00007/a/a' as a file and a folder")):
        doc = {"_type": "deltaship.release", "spec_version": 3, "repository_id": "0" * 32,
               "version": "1.0", "released_at": "2026-01-01T00:00:00Z", "groups": [_GROUP],
               "files": listed}
        raw = _dumps(doc)

        def parse(raw: bytes = raw) -> ReleaseIndex:
            return ReleaseIndex.from_dict(json.loads(raw))

        peak, err = _peak(parse)
        if error is None:
            assert err is None, err
        else:
            assert isinstance(err, UntrustedDataError) and error in str(err), err
        assert peak < 32 * len(raw), (peak, len(raw))  # was ~230x


@pytest.mark.parametrize(("paths", "clash"), [
    (["a", "a-b", "a/c"], "a"), (["a-b", "a/c"], None), (["x/y", "x/y/z", "x"], "x"),
    (["b/c", "a/b"], None), (["ab/c", "a"], None), ([], None),
])
def test_folder_clash_examples(paths: list[str], clash: str | None) -> None:
    assert folder_clash(paths) == clash
