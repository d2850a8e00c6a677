"""The strict safetensors reader and the canonical writer (manifest/safetensors_format.py).

Table-driven malformed files, one row per class of problem, each of which must raise a
SafetensorsError naming the file and the problem; then property tests against the official
``safetensors`` library in both directions.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from manifest.errors import ModelError, SafetensorsError
from manifest.safetensors_format import (
    DTYPE_WIDTHS,
    MAX_HEADER_SIZE,
    SafetensorsFile,
    build_header,
    parse_header,
    write_safetensors,
)

from ._st_helpers import NUMPY_DTYPES, entry, random_array, raw_file, write_raw_tensors

PROPS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _f32(name: str, begin: int, n: int = 1) -> tuple[str, dict[str, Any]]:
    return name, entry("F32", [n], begin, begin + 4 * n)


# (id, file contents, regex the message must contain after "<path>: not a valid ...: ")
MALFORMED: list[tuple[str, bytes, str]] = [
    # the 8-byte length prefix
    ("empty file", b"", r"file is 0 bytes, too short for the 8-byte header length"),
    ("7-byte file", b"\x02\x00\x00\x00\x00\x00\x00", r"file is 7 bytes, too short"),
    ("header over cap", raw_file("{}", declared=MAX_HEADER_SIZE + 1),
     rf"header length {MAX_HEADER_SIZE + 1} exceeds the {MAX_HEADER_SIZE}-byte cap"),
    ("header length u64 max", raw_file("{}", declared=2**64 - 1), r"exceeds the .*-byte cap"),
    ("header past end", raw_file("{}", declared=100),
     r"header length 100 runs past the end of the 10-byte file"),
    ("header past end by one", raw_file("{}    ", declared=7), r"header length 7 runs past"),
    # the header's JSON
    ("non-UTF-8 header", raw_file(b'{"\xff\xfe": 1}'), r"header is not UTF-8 JSON \('utf-8'"),
    ("latin-1 header", raw_file('{"caf\xe9": {}}'.encode("latin-1")), r"not UTF-8 JSON"),
    ("empty header", raw_file(b""), r"header is not UTF-8 JSON \(Expecting value"),
    ("non-JSON header", raw_file(b"{dtype: F32}"), r"header is not UTF-8 JSON \(Expecting"),
    ("truncated JSON", raw_file(b'{"a": {"dtype": "F32"'), r"header is not UTF-8 JSON"),
    ("deeply nested JSON", raw_file(b"[" * 100_000 + b"]" * 100_000),
     r"header JSON is nested too deeply"),
    ("JSON list", raw_file("[]"), r"header is not a JSON object"),
    ("JSON string", raw_file('"x"'), r"header is not a JSON object"),
    ("JSON number", raw_file("8"), r"header is not a JSON object"),
    ("JSON null", raw_file("null"), r"header is not a JSON object"),
    ("duplicate tensor", raw_file(
        '{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
        ' "w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', b"ab"),
     r"header names 'w' twice"),
    ("duplicate __metadata__", raw_file('{"__metadata__": {}, "__metadata__": {}}'),
     r"header names '__metadata__' twice"),
    # one tensor entry
    ("entry not an object", raw_file({"w": [0, 4]}, bytes(4)), r"entry for 'w' is not an object"),
    ("unknown dtype", raw_file({"w": entry("F128", [1], 0, 16)}, bytes(16)),
     r"tensor 'w' has unknown dtype 'F128'"),
    ("lower-case dtype", raw_file({"w": entry("f32", [1], 0, 4)}, bytes(4)),
     r"tensor 'w' has unknown dtype 'f32'"),
    ("dtype not a string", raw_file({"w": entry(4, [1], 0, 4)}, bytes(4)),  # type: ignore[arg-type]
     r"tensor 'w' has unknown dtype 4"),
    ("missing dtype", raw_file({"w": {"shape": [1], "data_offsets": [0, 1]}}, b"x"),
     r"tensor 'w' has unknown dtype None"),
    ("negative dim", raw_file({"w": entry("U8", [-1], 0, 0)}), r"tensor 'w' has an invalid shape"),
    ("float dim", raw_file({"w": entry("U8", [2.0], 0, 2)}, b"ab"), r"invalid shape \[2\.0\]"),
    ("bool dim", raw_file({"w": entry("U8", [True], 0, 1)}, b"a"), r"invalid shape \[True\]"),
    ("string dim", raw_file({"w": entry("U8", ["2"], 0, 2)}, b"ab"), r"invalid shape \['2'\]"),
    ("shape not a list", raw_file({"w": entry("U8", 2, 0, 2)}, b"ab"),  # type: ignore[arg-type]
     r"tensor 'w' has an invalid shape 2"),
    ("missing shape", raw_file({"w": {"dtype": "U8", "data_offsets": [0, 1]}}, b"a"),
     r"tensor 'w' has an invalid shape None"),
    ("one data offset", raw_file({"w": {"dtype": "U8", "shape": [1], "data_offsets": [1]}}, b"a"),
     r"tensor 'w' has invalid data_offsets \[1\]"),
    ("three data offsets",
     raw_file({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 1]}}, b"a"),
     r"invalid data_offsets \[0, 1, 1\]"),
    ("negative data offset", raw_file({"w": entry("U8", [1], -1, 0)}, b"a"),
     r"tensor 'w' has invalid data_offsets \[-1, 0\]"),
    ("begin after end", raw_file({"w": entry("U8", [0], 1, 0)}, b"a"),
     r"tensor 'w' has invalid data_offsets \[1, 0\]"),
    ("float data offsets", raw_file({"w": entry("U8", [1], 0.0, 1.0)}, b"a"),
     r"invalid data_offsets \[0\.0, 1\.0\]"),
    ("bool data offsets", raw_file({"w": entry("U8", [1], False, True)}, b"a"),
     r"invalid data_offsets \[False, True\]"),
    ("missing data_offsets", raw_file({"w": {"dtype": "U8", "shape": [1]}}, b"a"),
     r"tensor 'w' has invalid data_offsets None"),
    # sizes and layout
    ("shape x width too small", raw_file({"w": entry("F32", [2], 0, 4)}, bytes(4)),
     r"tensor 'w': shape \[2\] x 4 bytes = 8, but data_offsets span 4"),
    ("shape x width too large", raw_file({"w": entry("BF16", [2, 2], 0, 16)}, bytes(16)),
     r"tensor 'w': shape \[2, 2\] x 2 bytes = 8, but data_offsets span 16"),
    ("gap between tensors", raw_file(dict([_f32("a", 0), _f32("b", 8)]), bytes(12)),
     r"tensor data not contiguous: gap before 'b' \(offset 8\)"),
    ("overlapping tensors", raw_file(dict([_f32("a", 0, 2), _f32("b", 4)]), bytes(8)),
     r"tensor data not contiguous: overlap at 'b' \(offset 4\)"),
    ("same offsets twice", raw_file(dict([_f32("a", 0), _f32("b", 0)]), bytes(4)),
     r"tensor data not contiguous: overlap at '[ab]' \(offset 0\)"),
    ("first tensor not at 0", raw_file(dict([_f32("a", 4)]), bytes(8)),
     r"tensor data not contiguous: gap before 'a' \(offset 4\)"),
    ("data longer than tensors", raw_file(dict([_f32("a", 0)]), bytes(8)),
     r"tensor data ends at 4 but the data section has 8 bytes"),
    ("data shorter than tensors", raw_file(dict([_f32("a", 0, 2)]), bytes(4)),
     r"tensor data ends at 8 but the data section has 4 bytes"),
    ("data but no tensors", raw_file("{}", b"x"),
     r"tensor data ends at 0 but the data section has 1 bytes"),
    # __metadata__
    ("metadata int value", raw_file({"__metadata__": {"format": 1}}),
     r"__metadata__ must map strings to strings"),
    ("metadata null value", raw_file({"__metadata__": {"format": None}}),
     r"__metadata__ must map strings to strings"),
    ("metadata nested", raw_file({"__metadata__": {"a": {"b": "c"}}}),
     r"__metadata__ must map strings to strings"),
    ("metadata list", raw_file({"__metadata__": ["pt"]}),
     r"__metadata__ must map strings to strings"),
    ("metadata string", raw_file({"__metadata__": "pt"}),
     r"__metadata__ must map strings to strings"),
]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


@pytest.mark.parametrize(
    ("contents", "problem"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_file_is_rejected_naming_file_and_problem(
    tmp_path: Path, contents: bytes, problem: str
) -> None:
    path = tmp_path / "model-00001-of-00002.safetensors"
    path.write_bytes(contents)
    fds = _open_fds()
    with pytest.raises(SafetensorsError) as info:
        SafetensorsFile(path)
    err = info.value
    assert isinstance(err, ModelError)  # a local file: the user must act
    assert err.path == str(path)
    assert str(err).startswith(f"{path}: not a valid safetensors file: ")
    assert "\n" not in str(err)
    assert re.search(problem, err.problem), (problem, err.problem)
    assert _open_fds() == fds, "the file descriptor leaked"


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(SafetensorsError, match=r"nope\.safetensors: .*cannot open"):
        SafetensorsFile(path)


def test_parse_header_names_the_given_path() -> None:
    with pytest.raises(SafetensorsError) as info:
        parse_header(b"[]", 0, "shard-3.safetensors")
    assert info.value.path == "shard-3.safetensors"


@pytest.mark.parametrize("read", ["read", "read_into"])
def test_file_shrinking_while_read_is_reported(tmp_path: Path, read: str) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": np.arange(1000, dtype=np.int32)}, str(path))
    with SafetensorsFile(path) as f:
        t = f.tensors["w"]
        os.truncate(path, f.data_start + 100)
        with pytest.raises(SafetensorsError, match="file shrank while being read"):
            if read == "read":
                f.read(t)
            else:
                f.read_into(t, 0, memoryview(bytearray(t.nbytes)))


# ---------------------------------------------------------------------------------------------
# well-formed edge cases


def test_valid_edge_cases_are_accepted(tmp_path: Path) -> None:
    cases = {
        "empty header": raw_file("{}"),
        "padded header": raw_file("{}      "),
        "metadata only": raw_file({"__metadata__": {"format": "pt", "": ""}}),
        "zero-size tensors": raw_file(
            {"a": entry("F32", [0, 3], 0, 0), "b": entry("U8", [2], 0, 2),
             "c": entry("I64", [4, 0], 2, 2)}, b"xy"),
        "scalar": raw_file({"s": entry("F64", [], 0, 8)}, bytes(8)),
        "unicode name": raw_file({"emb\u00e9d.\u6f22": entry("U8", [1], 0, 1)}, b"z"),
    }
    for name, contents in cases.items():
        path = tmp_path / f"{len(contents)}.safetensors"
        path.write_bytes(contents)
        with SafetensorsFile(path) as f:
            offsets = sorted((t.begin, t.end) for t in f.tensors.values())
            assert f.size == len(contents), name
        with safe_open(str(path), framework="numpy") as ref:
            assert set(ref.keys()) == set(f.tensors), name
        assert all(b <= e for b, e in offsets), name


def test_read_ranges(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    arr = np.arange(100, dtype=np.int16)
    save_file({"a": arr, "b": arr[:3].copy()}, str(path))
    with SafetensorsFile(path) as f:
        t = f.tensors["a"]
        assert f.read(t) == arr.tobytes()
        assert f.read(t, 10) == arr.tobytes()[10:]
        assert f.read(t, 10, 6) == arr.tobytes()[10:16]
        assert f.read(t, 200, 0) == b""
        for offset, length in ((-1, 2), (0, 201), (199, 2), (5, -1)):
            with pytest.raises(ValueError, match="outside tensor"):
                f.read(t, offset, length)


# ---------------------------------------------------------------------------------------------
# the official library's files read back identically

names = st.text(alphabet="abcxyz._0123456789", min_size=1, max_size=12).filter(
    lambda s: s != "__metadata__"
)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
numpy_tensors = st.dictionaries(
    names, st.tuples(st.sampled_from(sorted(NUMPY_DTYPES)), shapes), min_size=0, max_size=6
)
metadatas = st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)


@PROPS
@given(numpy_tensors, metadatas, st.integers(0, 2**32 - 1))
def test_reads_files_written_by_official_library(
    spec: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None, seed: int
) -> None:
    # safetensors 0.8.0 writes the invalid header '{},"__metadata__":{}}' for this one input
    assume(spec or metadata != {})
    rng = np.random.default_rng(seed)
    arrays = {n: random_array(rng, d, s) for n, (d, s) in spec.items()}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.safetensors")
        save_file(arrays, path, metadata=metadata)
        with SafetensorsFile(path) as f:
            assert set(f.tensors) == set(arrays)
            assert f.metadata == (metadata or {})
            assert f.size == os.path.getsize(path)
            for name, arr in arrays.items():
                t = f.tensors[name]
                assert t.dtype == NUMPY_DTYPES[str(arr.dtype)]
                assert t.shape == arr.shape
                assert t.width == arr.dtype.itemsize
                assert f.read(t) == arr.astype(arr.dtype.newbyteorder("<")).tobytes()
            with open(path, "rb") as fh:
                assert fh.read(f.data_start) == f.header_bytes


# ---------------------------------------------------------------------------------------------
# build_header's output loads with the official library


def _build(path: str, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None) -> bytes:
    tensors = [(n, NUMPY_DTYPES[str(a.dtype)], a.shape, a.tobytes()) for n, a in arrays.items()]
    write_raw_tensors(path, tensors, metadata)
    with open(path, "rb") as f:
        return f.read()


@PROPS
@given(numpy_tensors, metadatas, st.integers(0, 2**32 - 1))
def test_build_header_output_loads_with_official_library(
    spec: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    arrays = {n: random_array(rng, d, s) for n, (d, s) in spec.items()}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "built.safetensors")
        contents = _build(path, arrays, metadata)
        (n,) = struct.unpack("<Q", contents[:8])
        assert n % 8 == 0 and contents[8 + n - 1 : 8 + n] in (b"}", b" ")
        loaded = load_file(path)
        assert set(loaded) == set(arrays)
        for name, arr in arrays.items():
            assert loaded[name].dtype == arr.dtype
            assert loaded[name].shape == arr.shape
            assert loaded[name].tobytes() == arr.tobytes()
        with safe_open(path, framework="numpy") as ref:
            assert (ref.metadata() or {}) == (metadata or {})
        # and our reader agrees, and the header is a pure function of its input
        with SafetensorsFile(path) as f:
            assert [(t.begin, t.end) for t in f.tensors.values()] == [
                (t.begin, t.end) for t in build_header(
                    ((n, NUMPY_DTYPES[str(a.dtype)], a.shape) for n, a in arrays.items())
                )[1]
            ]
            for name, arr in arrays.items():
                assert f.read(f.tensors[name]) == arr.tobytes()
        again, _ = build_header(
            ((n, NUMPY_DTYPES[str(a.dtype)], a.shape) for n, a in arrays.items()), metadata
        )
        assert contents[: len(again)] == again


def test_build_header_layout() -> None:
    prefix, infos = build_header(
        [("b", "BF16", (3, 2)), ("a", "F8_E4M3", (5,)), ("z", "F64", ())], {"format": "pt"}
    )
    (n,) = struct.unpack("<Q", prefix[:8])
    assert len(prefix) == 8 + n and n % 8 == 0
    doc = json.loads(prefix[8:])
    assert list(doc) == ["__metadata__", "b", "a", "z"]  # given order, not sorted
    assert [(t.name, t.begin, t.end) for t in infos] == [("b", 0, 12), ("a", 12, 17), ("z", 17, 25)]
    assert doc["b"] == {"dtype": "BF16", "shape": [3, 2], "data_offsets": [0, 12]}
    assert parse_header(prefix[8:], 25)[0] == infos


LOW_PRECISION = [
    ("BF16", "bfloat16"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
]


def test_build_header_bf16_and_f8_load_with_official_library(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    tensors = [
        ("model.embed_tokens.weight", "BF16", (7, 4), rng.bytes(56)),
        ("model.layers.0.mlp.experts.0.w1.weight", "F8_E4M3", (3, 5), rng.bytes(15)),
        ("model.layers.0.mlp.experts.0.w2.weight", "F8_E5M2", (2,), rng.bytes(2)),
        ("model.norm.weight", "BF16", (0,), b""),
        ("model.layers.0.mlp.gate.weight", "F32", (2, 2), rng.bytes(16)),
    ]
    path = tmp_path / "lowp.safetensors"
    write_raw_tensors(str(path), tensors, {"format": "pt"})

    # header level, with numpy (which has no bfloat16 or float8)
    with safe_open(str(path), framework="numpy") as ref:
        assert list(ref.keys()) == sorted(n for n, *_ in tensors)
        assert ref.metadata() == {"format": "pt"}
        for name, dtype, shape, _ in tensors:
            sl = ref.get_slice(name)
            assert sl.get_dtype() == dtype
            assert tuple(sl.get_shape()) == shape
    # byte level: data back to back in the given order, right after the header
    contents = path.read_bytes()
    (n,) = struct.unpack("<Q", contents[:8])
    assert contents[8 + n :] == b"".join(t[3] for t in tensors)
    with SafetensorsFile(path) as f:
        for name, dtype, shape, data in tensors:
            assert (f.tensors[name].dtype, f.tensors[name].shape) == (dtype, shape)
            assert f.read(f.tensors[name]) == data

    # values, through torch when it is installed
    torch = pytest.importorskip("torch")
    with safe_open(str(path), framework="pt") as ref:
        for name, dtype, shape, data in tensors:
            t = ref.get_tensor(name)
            assert tuple(t.shape) == shape
            if dtype != "F32":
                torch_name = dict(LOW_PRECISION)[dtype]
                assert t.dtype == getattr(torch, torch_name)
            as_int = t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16)
            if dtype == "F32":
                as_int = t.view(torch.int32)
            assert as_int.numpy().tobytes() == data


def test_dtype_widths_match_official_dtype_names(tmp_path: Path) -> None:
    """Every dtype we accept is one the official library accepts, with the same width."""
    for dtype, width in DTYPE_WIDTHS.items():
        path = tmp_path / f"{dtype}.safetensors"
        write_raw_tensors(str(path), [("t", dtype, (3,), bytes(3 * width))])
        with safe_open(str(path), framework="numpy") as ref:
            assert ref.get_slice("t").get_dtype() == dtype


# ---------------------------------------------------------------------------------------------
# write_safetensors: round trip through our reader and the official library, any chunking

any_tensors = st.dictionaries(
    names, st.tuples(st.sampled_from(sorted(DTYPE_WIDTHS)), shapes), min_size=0, max_size=6
)


@PROPS
@given(any_tensors, metadatas, st.data())
def test_write_safetensors_round_trip(
    spec: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None,
    data: st.DataObject,
) -> None:
    expected: dict[str, bytes] = {}
    tensors: list[tuple[str, str, tuple[int, ...], Any]] = []
    for name, (dtype, shape) in spec.items():
        n = DTYPE_WIDTHS[dtype] * int(np.prod(shape))
        raw = expected[name] = data.draw(st.binary(min_size=n, max_size=n))
        cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=3)))
        chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
        # the bytes at once, or streamed as chunks (empty ones included)
        tensors.append((name, dtype, shape, raw if data.draw(st.booleans()) else iter(chunks)))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "written.safetensors")
        infos = write_safetensors(path, tensors, metadata)
        prefix, again = build_header(((n, dt, sh) for n, dt, sh, _ in tensors), metadata)
        with open(path, "rb") as fh:
            assert fh.read() == prefix + b"".join(expected[n] for n, *_ in tensors)
        assert infos == again
        with SafetensorsFile(path) as f:
            assert f.metadata == (metadata or {})
            assert sorted((t.name, t.dtype, t.shape) for t in f.tensors.values()) == sorted(
                (n, dt, sh) for n, dt, sh, _ in tensors)
            for name, t in f.tensors.items():
                assert f.read(t) == expected[name]
        with safe_open(path, framework="numpy") as ref:
            assert (ref.metadata() or {}) == (metadata or {})
            assert sorted(ref.keys()) == sorted(spec)
        assert os.listdir(d) == ["written.safetensors"]


@pytest.mark.parametrize("data", [b"\0" * 7, [b"\0" * 4, b"\0" * 5], [b"\0" * 8, b"\0"]],
                         ids=["short", "long", "extra chunk"])
def test_write_safetensors_refuses_data_of_the_wrong_length(tmp_path: Path, data: Any) -> None:
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match=r"tensor 't': F32 \[2\] takes 8 bytes, its data has"):
        write_safetensors(path, [("t", "F32", (2,), data)])
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["t.safetensors"]
