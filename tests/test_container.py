"""The patch container workflow: encode a model release, apply it, get the exact target back.

Round trips go through the publisher's encoder (publisher.encode.encode_all) and the agent's
decoder (manifest.container.apply_container): full objects first, materialised into base group
files, then patches against those bases. Every output must hash to the target and load with
the official safetensors library byte-identically. Then the container is tampered with.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

from manifest.codecs import BASED_CODECS, CHUNK_BYTES
from manifest.container import (
    MAGIC,
    MAX_CHUNK_BYTES,
    apply_container,
    max_frame_length,
    read_header,
)
from manifest.errors import (
    FormatError,
    HashMismatchError,
    OversizeError,
)
from manifest.safetensors_format import SafetensorsFile
from publisher.encode import EncodeResult, EncodeTask, encode_all, hash_groups, layout_group
from publisher.grouping import assign_groups
from publisher.model_dir import open_model

from ._st_helpers import NUMPY_DTYPES, random_array, write_raw_tensors

# A tensor is a numpy array or, for dtypes numpy lacks, (dtype, shape, raw little-endian bytes).
Tensor = np.ndarray | tuple[str, tuple[int, ...], bytes]
Model = dict[str, Tensor]
REJECTED = (FormatError, HashMismatchError, OversizeError)
DELTAS = BASED_CODECS - {"same"}


# ---------------------------------------------------------------------------------------------
# the workflow helper: publish versions of a model, apply them as a device would


def _raw(t: Tensor) -> tuple[str, tuple[int, ...], bytes]:
    if isinstance(t, np.ndarray):
        return NUMPY_DTYPES[str(t.dtype)], t.shape, t.tobytes()
    return t


def write_model(path: Path, model: Model, shards: int = 1) -> None:
    """A model directory: one file, or ``shards`` files plus a sharded-checkpoint index."""
    path.mkdir(parents=True)
    names = sorted(model)
    if shards == 1 and all(isinstance(t, np.ndarray) for t in model.values()):
        save_file({n: model[n] for n in names}, str(path / "model.safetensors"))  # type: ignore[misc]
        return
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        if shards == 1:
            file = "model.safetensors"
        part = names[i::shards]
        write_raw_tensors(str(path / file), [(n, *_raw(model[n])) for n in part], {"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    if shards > 1:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))


@dataclass
class Release:
    """One published version: per group its container, and the group file a device rebuilt."""

    results: dict[str, EncodeResult]
    files: dict[str, Path]


class Publisher:
    """Publishes successive versions of a model; every version is patched against the last."""

    def __init__(self, work: Path, executor: ThreadPoolExecutor | None, chunk_bytes: int) -> None:
        self.work = work
        self.executor = executor
        self.chunk_bytes = chunk_bytes
        self.versions = 0
        self.last: Release | None = None

    def publish(self, model: Model, shards: int = 1) -> Release:
        self.versions += 1
        v = self.work / f"v{self.versions}"
        write_model(v / "model", model, shards)
        ex = self.executor or ThreadPoolExecutor(2)
        bases: dict[str, SafetensorsFile] = {}
        with open_model(v / "model") as m:
            groups = assign_groups(m.tensors)
            layouts = [layout_group(g, [m.tensors[t] for t in ts]) for g, ts in groups.items()]
            shas = hash_groups(layouts, ex)
            tasks = []
            for layout, sha in zip(layouts, shas, strict=True):
                base = None
                if self.last is not None and layout.name in self.last.files:
                    base = bases[layout.name] = SafetensorsFile(self.last.files[layout.name])
                base_sha = None if base is None else _sha_file(Path(base.path))
                out = v / f"{layout.name}.{'patch' if base else 'full'}"
                tasks.append(EncodeTask(layout, sha, base, base_sha, str(out)))
            results = {
                r.task.layout.name: r
                for r in encode_all(tasks, self.executor, chunk_bytes=self.chunk_bytes)
            }
        if self.executor is None:
            ex.shutdown()
        assert list(results) == [t.layout.name for t in tasks]
        files = {}
        for name, r in results.items():
            files[name] = v / "device" / r.task.layout.file
            files[name].parent.mkdir(exist_ok=True)
            with open(files[name], "wb") as out:
                sha = apply_container(r.task.out_path, bases.get(name), out,
                                      executor=self.executor)
            assert sha == r.task.sha256 == _sha_file(files[name])
            assert os.path.getsize(files[name]) == r.task.layout.length
            assert os.path.getsize(r.task.out_path) == r.length
            assert _sha_file(Path(r.task.out_path)) == r.sha256
        for b in bases.values():
            b.close()
        self.last = Release(results, files)
        check_release_matches(self.last, model)
        return self.last


def _sha_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_release_matches(release: Release, model: Model) -> None:
    """The device's group files hold exactly the model's tensors, per the official library."""
    seen: dict[str, Path] = {}
    for path in release.files.values():
        with safe_open(str(path), framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                assert name not in seen
                seen[name] = path
                dtype, shape, raw = _raw(model[name])
                sl = f.get_slice(name)
                assert (sl.get_dtype(), tuple(sl.get_shape())) == (dtype, shape), name
                if dtype in ("BF16", "F8_E4M3", "F8_E5M2"):
                    continue  # numpy cannot hold these; checked through torch below
                arr = f.get_tensor(name)
                assert arr.tobytes() == raw, name
        with SafetensorsFile(path) as st_file:
            for name, info in st_file.tensors.items():
                assert st_file.read(info) == _raw(model[name])[2], name
    assert set(seen) == set(model)


# ---------------------------------------------------------------------------------------------
# a small MoE model and the changes a release makes to it


def base_model(seed: int = 0) -> Model:
    rng = np.random.default_rng(seed)

    def w(*shape: int, dtype: str = "float32") -> np.ndarray:
        return rng.normal(0, 0.02, shape).astype(dtype)

    return {
        "model.embed_tokens.weight": w(100, 16, dtype="float16"),
        "model.layers.0.self_attn.q_proj.weight": w(16, 16),
        "model.layers.0.input_layernorm.weight": np.ones(16, dtype=np.float32),
        "model.layers.0.mlp.gate.weight": w(2, 16),
        "model.layers.0.mlp.experts.0.w1.weight": w(24, 16),
        "model.layers.0.mlp.experts.1.w1.weight": w(24, 16),
        "model.layers.0.mlp.experts.1.w2.weight": w(16, 24),
        "model.layers.0.step": np.array(7, dtype=np.int64),
        "model.layers.0.mask": np.array([True, False, True] * 5),
        "model.layers.0.empty": np.zeros((0, 16), dtype=np.float32),
        "model.layers.1.self_attn.q_proj.weight": w(16, 16, dtype="float16"),
        "model.norm.weight": np.ones(16, dtype=np.float16),
        "lm_head.weight": w(100, 16, dtype="float16"),
    }


def _noise(m: Model, scale: float = 1e-4, seed: int = 1) -> Model:
    rng = np.random.default_rng(seed)
    out = dict(m)
    for k, v in m.items():
        if isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.size:
            out[k] = (v + rng.normal(0, scale, v.shape)).astype(v.dtype)
    return out


def _resize_vocab(m: Model, rows: int) -> Model:
    rng = np.random.default_rng(rows)
    out = dict(m)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        v = m[k]
        assert isinstance(v, np.ndarray)
        extra = rng.normal(0, 0.02, (max(rows - len(v), 0), v.shape[1])).astype(v.dtype)
        out[k] = np.concatenate([v[:rows], extra])
    return out


def _change(m: Model, **changes: Tensor | None) -> Model:
    out = dict(m)
    for k, v in changes.items():
        name = k.replace("__", ".")
        if v is None:
            del out[name]
        else:
            out[name] = v
    return out


def _random_like(m: Model, seed: int = 9) -> Model:
    rng = np.random.default_rng(seed)
    out: Model = {}
    for k, v in m.items():
        assert isinstance(v, np.ndarray)
        raw = rng.bytes(v.nbytes)
        out[k] = (np.frombuffer(raw, dtype=np.uint8) & 1).astype(bool).reshape(v.shape) \
            if v.dtype == bool else np.frombuffer(raw, dtype=v.dtype).reshape(v.shape).copy()
    return out


E0 = "model__layers__0__mlp__experts__0__w1__weight"
Q0 = "model__layers__0__self_attn__q_proj__weight"

MUTATIONS: dict[str, Callable[[Model], Model]] = {
    "unchanged": lambda m: dict(m),
    "slightly changed": _noise,
    "one expert changed": lambda m: _change(m, **{E0: _noise(m)[E0.replace("__", ".")]}),
    "tensor added to a group": lambda m: _change(
        m, model__layers__0__mlp__experts__0__w3__weight=np.full((24, 16), 0.5, np.float32)),
    "group added": lambda m: _change(
        m, model__layers__2__mlp__experts__0__w1__weight=np.arange(64, dtype=np.int32)),
    "tensor removed": lambda m: _change(m, model__layers__0__mlp__experts__1__w2__weight=None),
    "group removed": lambda m: _change(
        m, model__layers__0__mlp__experts__1__w1__weight=None,
        model__layers__0__mlp__experts__1__w2__weight=None),
    "dtype changed, width changed": lambda m: _change(
        m, **{Q0: np.asarray(m[Q0.replace("__", ".")]).astype(np.float64)}),
    "dtype changed, same width": lambda m: _change(
        m, model__norm__weight=np.asarray(m["model.norm.weight"]).view(np.int16) + 1,
        model__layers__0__mask=np.asarray(m["model.layers.0.mask"]).view(np.uint8)),
    "shape changed past dim 0": lambda m: _change(
        m, **{E0: np.asarray(m[E0.replace("__", ".")]).reshape(16, 24)}),
    "vocab grown": lambda m: _resize_vocab(m, 117),
    "vocab shrunk": lambda m: _resize_vocab(m, 64),
    "vocab grown and tuned": lambda m: _noise(_resize_vocab(m, 131)),
    "all new random bits": _random_like,
    "empty tensor grows": lambda m: _change(
        m, model__layers__0__empty=np.ones((3, 16), dtype=np.float32)),
}

EXECUTORS = {"serial": lambda: None, "threads": lambda: ThreadPoolExecutor(4)}


@pytest.fixture(params=sorted(EXECUTORS))
def executor(request: pytest.FixtureRequest) -> Iterator[ThreadPoolExecutor | None]:
    ex = EXECUTORS[request.param]()
    yield ex
    if ex is not None:
        ex.shutdown()


@pytest.mark.parametrize("chunk_bytes", [64, CHUNK_BYTES], ids=["64B-chunks", "4MiB-chunks"])
@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_release_roundtrip(
    tmp_path: Path, executor: ThreadPoolExecutor | None, chunk_bytes: int, mutation: str
) -> None:
    pub = Publisher(tmp_path, executor, chunk_bytes)
    v1 = base_model()
    full = pub.publish(v1)
    for r in full.results.values():
        assert r.task.base is None
        assert set(r.codec_bytes) <= {"planes-rot", "zstd"}
    v2 = MUTATIONS[mutation](v1)
    patch = pub.publish(v2)
    codecs = {c for r in patch.results.values() for c in r.codec_bytes}
    if mutation == "unchanged":
        assert codecs == {"same"}
        assert all(r.codec_bytes["same"] == 0 for r in patch.results.values())
    if mutation in ("slightly changed", "vocab grown and tuned"):
        assert codecs & DELTAS
    if mutation.startswith("vocab"):
        emb = patch.results["embeddings"]
        assert emb.task.base is not None
        assert BASED_CODECS & set(emb.codec_bytes)
    if chunk_bytes == 64:
        expert = patch.results.get("layers.0.experts.0") or full.results["layers.0.experts.0"]
        hdr = _header(Path(expert.task.out_path))
        assert max(len(t["chunks"]) for t in hdr.tensors) >= 24  # 24x16 float32 in 64 B


def test_unchanged_patch_is_tiny(tmp_path: Path) -> None:
    pub = Publisher(tmp_path, None, CHUNK_BYTES)
    v1 = base_model()
    full = pub.publish(v1)
    patch = pub.publish(dict(v1))
    assert patch.results.keys() == full.results.keys()
    for r in patch.results.values():
        assert r.codec_bytes == {"same": 0}
        hdr = _header(Path(r.task.out_path))
        assert r.length == hdr.payload_start + hdr.prefix  # no payload past the prefix frame


def test_small_change_patch_is_smaller_than_full(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    bits = (rng.normal(0, 0.02, (256, 64)).astype(np.float32).view(np.uint32) >> 16)
    bf16 = bits.astype(np.uint16)
    v1: Model = {"model.layers.0.mlp.experts.0.w1.weight": ("BF16", (256, 64), bf16.tobytes())}
    tuned = bf16.copy()
    touched = rng.random(tuned.shape) < 0.1
    tuned[touched] += np.uint16(1)
    v2: Model = {"model.layers.0.mlp.experts.0.w1.weight": ("BF16", (256, 64), tuned.tobytes())}
    pub = Publisher(tmp_path, None, CHUNK_BYTES)
    full = pub.publish(v1)
    patch = pub.publish(v2)
    g = "layers.0.experts.0"
    assert patch.results[g].codec_bytes.keys() <= DELTAS
    assert patch.results[g].length < 0.3 * full.results[g].length
    torch = pytest.importorskip("torch")
    with safe_open(str(patch.files[g]), framework="pt") as f:
        t = f.get_tensor("model.layers.0.mlp.experts.0.w1.weight")
        assert t.dtype == torch.bfloat16
        assert t.view(torch.int16).numpy().tobytes() == tuned.tobytes()


def test_sharded_bf16_and_f8_model(tmp_path: Path, executor: ThreadPoolExecutor | None) -> None:
    """Raw-bytes dtypes, a sharded source checkpoint, tensors moving between shards."""
    rng = np.random.default_rng(11)
    v1: Model = {
        "model.embed_tokens.weight": ("BF16", (50, 8), rng.bytes(800)),
        "model.layers.0.mlp.experts.0.gate_proj.weight": ("F8_E4M3", (8, 8), rng.bytes(64)),
        "model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv": np.ones(1, np.float32),
        "model.layers.0.mlp.experts.1.up_proj.weight": ("F8_E5M2", (8, 8), rng.bytes(64)),
        "model.layers.0.mlp.gate.weight": ("BF16", (2, 8), rng.bytes(32)),
        "lm_head.weight": ("BF16", (50, 8), rng.bytes(800)),
    }
    v2 = dict(v1)
    emb = bytearray(_raw(v1["model.embed_tokens.weight"])[2])
    emb[10] ^= 1
    v2["model.embed_tokens.weight"] = ("BF16", (60, 8), bytes(emb) + rng.bytes(160))
    v2["model.layers.0.mlp.experts.1.up_proj.weight"] = ("F8_E4M3", (8, 8), rng.bytes(64))
    pub = Publisher(tmp_path, executor, 64)
    pub.publish(v1, shards=3)
    release = pub.publish(v2, shards=2)
    torch = pytest.importorskip("torch")
    for path in release.files.values():
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                t = f.get_tensor(name)
                raw = t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16)
                if t.dtype == torch.float32:
                    raw = t.view(torch.int32)
                assert raw.numpy().tobytes() == _raw(v2[name])[2], name


# property: any sequence of random edits to any small model round-trips

tensor_specs = st.tuples(
    st.sampled_from(["float16", "float32", "int8", "int64", "bool", "uint16"]),
    st.lists(st.integers(0, 9), min_size=0, max_size=2).map(tuple),
)
names = st.sampled_from([
    "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
    "model.layers.0.mlp.experts.0.w1.weight", "model.layers.0.mlp.experts.0.w2.weight",
    "model.layers.0.mlp.experts.1.w1.weight", "model.layers.0.self_attn.o_proj.weight",
    "model.layers.1.self_attn.o_proj.weight",
])
edits = st.sampled_from(["keep", "noise", "flip", "grow", "shrink", "drop", "random"])


def _edit(rng: np.random.Generator, arr: np.ndarray, edit: str) -> np.ndarray | None:
    if edit == "drop":
        return None
    if edit == "random" or (arr.ndim == 0 and edit in ("grow", "shrink")):
        return np.frombuffer(rng.bytes(arr.nbytes), np.uint8).view(arr.dtype).reshape(arr.shape) \
            if arr.dtype != bool else rng.random(arr.shape) < 0.5
    if edit == "noise" or edit == "flip":
        b = np.frombuffer(arr.tobytes(), np.uint8).copy()
        k = max(1, b.size // 10) if edit == "noise" else 1
        if b.size:
            idx = rng.integers(0, b.size, k)
            b[idx] = (b[idx] + (1 if arr.dtype == bool else 1 + rng.integers(0, 3, k))) & (
                1 if arr.dtype == bool else 0xFF)
        return b.view(arr.dtype).reshape(arr.shape)
    if edit == "grow":
        extra = arr[:1] if len(arr) else np.zeros((1, *arr.shape[1:]), arr.dtype)
        return np.concatenate([arr, extra, extra])
    if edit == "shrink":
        return arr[: len(arr) // 2].copy()
    return arr


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(names, tensor_specs, min_size=1, max_size=6),
    st.lists(st.tuples(names, edits), max_size=6),
    st.dictionaries(names, tensor_specs, max_size=2),
    st.sampled_from([8, 24, 64, 4096]),
    st.integers(0, 2**32 - 1),
)
def test_random_releases_roundtrip(
    tmp_path_factory: pytest.TempPathFactory,
    spec: dict[str, tuple[str, tuple[int, ...]]],
    changes: list[tuple[str, str]],
    added: dict[str, tuple[str, tuple[int, ...]]],
    chunk_bytes: int,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    v1: Model = {n: random_array(rng, d, s) for n, (d, s) in spec.items()}
    v2 = dict(v1)
    for name, edit in changes:
        if name in v2:
            new = _edit(rng, np.asarray(v2[name]), edit)
            if new is None:
                del v2[name]
            else:
                v2[name] = np.ascontiguousarray(new)
    for name, (d, s) in added.items():
        v2.setdefault(name, random_array(rng, d, s))
    if not v2:
        v2 = {"model.norm.weight": np.ones(3, np.float16)}
    pub = Publisher(tmp_path_factory.mktemp("rel"), None, chunk_bytes)
    pub.publish(v1)
    pub.publish(v2)


# ---------------------------------------------------------------------------------------------
# tampering: a container or base that is not what it claims must never produce output quietly


def _header(path: Path) -> Any:
    with open(path, "rb") as f:
        return read_header(f, os.path.getsize(path))


@dataclass
class Patch:
    container: bytes
    base_path: Path
    target: bytes

    def apply(self, tmp: Path, container: bytes | None = None,
              base: Path | str | None = "base") -> bytes:
        path = tmp / "tampered.patch"
        path.write_bytes(self.container if container is None else container)
        out = io.BytesIO()
        base_path = self.base_path if base == "base" else base
        if base_path is None:
            apply_container(path, None, out)
        else:
            with SafetensorsFile(base_path) as b:
                apply_container(path, b, out)
        return out.getvalue()


@pytest.fixture(scope="module")
def patch(tmp_path_factory: pytest.TempPathFactory) -> Patch:
    """One group, patched: same, delta and zstd chunks, in 256-byte chunks."""
    rng = np.random.default_rng(3)
    e = "model.layers.0.mlp.experts.0."
    w1 = rng.normal(0, 0.02, (8, 64)).astype(np.float32)
    v1: Model = {
        e + "w1.weight": w1,
        e + "w2.weight": rng.normal(0, 0.02, (8, 16)).astype(np.float16),
        e + "w3.weight": np.zeros((4, 4), np.int8),
    }
    tuned = w1.view(np.uint32).copy()
    tuned[rng.random(tuned.shape) < 0.1] += np.uint32(1)
    v2 = dict(v1)
    v2[e + "w1.weight"] = tuned.view(np.float32)
    v2[e + "w3.weight"] = np.frombuffer(rng.bytes(64), np.int8).reshape(4, 16)
    v2[e + "w4.weight"] = np.frombuffer(rng.bytes(512), np.int32).copy()
    pub = Publisher(tmp_path_factory.mktemp("patch"), None, 256)
    base = pub.publish(v1).files["layers.0.experts.0"]
    r = pub.publish(v2)
    g = "layers.0.experts.0"
    codecs = set(r.results[g].codec_bytes)
    assert {"same", "zstd"} <= codecs and codecs & DELTAS
    return Patch(Path(r.results[g].task.out_path).read_bytes(), base, r.files[g].read_bytes())


def test_untampered_patch_applies(patch: Patch, tmp_path: Path) -> None:
    assert patch.apply(tmp_path) == patch.target


def test_tampered_raw_payload_byte_is_a_hash_mismatch(patch: Patch, tmp_path: Path) -> None:
    """The last byte of the container is literal data of an incompressible tensor."""
    bad = bytearray(patch.container)
    bad[-1] ^= 0x01
    with pytest.raises(HashMismatchError, match="does not match the target sha256"):
        patch.apply(tmp_path, bytes(bad))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_tampered_byte_is_rejected_or_harmless(
    patch: Patch, tmp_path: Path, data: st.DataObject
) -> None:
    """Flip bits anywhere (header, prefix frame, chunk frames): reject, or yield the target.

    Some bits change nothing (a zstd frame header's unused bit, the base sha256 that the caller
    checks); what must never happen is wrong output or an error blaming someone else.
    """
    payload_start = _payload_start(patch.container)
    where = data.draw(st.one_of(
        st.integers(payload_start, len(patch.container) - 1),
        st.integers(0, len(patch.container) - 1),
    ))
    mask = data.draw(st.integers(1, 255))
    bad = bytearray(patch.container)
    bad[where] ^= mask
    try:
        out = patch.apply(tmp_path, bytes(bad))
    except REJECTED:
        return
    assert out == patch.target


def _payload_start(container: bytes) -> int:
    (n,) = struct.unpack("<Q", container[8:16])
    return 16 + n


def test_every_payload_byte_tampered_is_rejected_or_harmless(
    patch: Patch, tmp_path: Path
) -> None:
    """Exhaustive over the payload (prefix frame included), one bit flip per byte."""
    start = _payload_start(patch.container)
    rejected = 0
    for where in range(start, len(patch.container)):
        bad = bytearray(patch.container)
        bad[where] ^= 0x04
        try:
            out = patch.apply(tmp_path, bytes(bad))
        except REJECTED:
            rejected += 1
            continue
        assert out == patch.target, where
    assert rejected > 0.9 * (len(patch.container) - start)


def test_tampered_prefix_frame_is_untrusted_data(patch: Patch, tmp_path: Path) -> None:
    """A prefix that decodes to a broken safetensors header blames the container, not the user."""
    start = _payload_start(patch.container)
    hdr = json.loads(patch.container[16:start])
    prefix_frame = patch.container[start : start + hdr["prefix"]]
    prefix = zstandard.ZstdDecompressor().decompress(prefix_frame)
    broken = prefix[:8] + prefix[8:].replace(b'"dtype"', b'"dtypo"', 1)
    frame = zstandard.ZstdCompressor().compress(broken)
    hdr["prefix"] = len(frame)
    raw = json.dumps(hdr, sort_keys=True, separators=(",", ":")).encode()
    bad = MAGIC + struct.pack("<Q", len(raw)) + raw + frame + patch.container[start + len(
        prefix_frame):]
    with pytest.raises(FormatError, match="unknown dtype"):
        patch.apply(tmp_path, bad)


@pytest.mark.parametrize("keep", [0, 7, 8, 15, 16, 17, "header-1", "payload", "payload+1",
                                  "middle", "end-1"])
def test_truncated_container_is_rejected(patch: Patch, tmp_path: Path, keep: int | str) -> None:
    start = _payload_start(patch.container)
    n = {"header-1": start - 1, "payload": start, "payload+1": start + 1,
         "middle": (start + len(patch.container)) // 2, "end-1": len(patch.container) - 1}.get(
        keep, keep)  # type: ignore[call-overload]
    with pytest.raises(REJECTED):
        patch.apply(tmp_path, patch.container[:n])


@pytest.mark.parametrize("magic", [b"DSPATCH2", b"dspatch1", b"\x00" * 8, b"PK\x03\x04DSPA"])
def test_bad_magic_is_rejected(patch: Patch, tmp_path: Path, magic: bytes) -> None:
    with pytest.raises(FormatError, match="bad magic"):
        patch.apply(tmp_path, magic + patch.container[8:])


@pytest.mark.parametrize("length", [0, "size-15", 16 * 1024 * 1024 + 1, 2**63, 2**64 - 1])
def test_oversized_header_length_is_rejected(
    patch: Patch, tmp_path: Path, length: int | str
) -> None:
    n = len(patch.container) - 15 if length == "size-15" else length
    bad = MAGIC + struct.pack("<Q", n) + patch.container[16:]  # type: ignore[arg-type]
    with pytest.raises(OversizeError, match=r"header length .* out of bounds"):
        patch.apply(tmp_path, bad)


def test_header_length_off_by_one_is_rejected(patch: Patch, tmp_path: Path) -> None:
    (n,) = struct.unpack("<Q", patch.container[8:16])
    for m in (n - 1, n + 1):
        with pytest.raises(FormatError):
            patch.apply(tmp_path, MAGIC + struct.pack("<Q", m) + patch.container[16:])


@pytest.mark.parametrize("extra", [b"\x00", b"x" * 100, "zstd frame"])
def test_trailing_bytes_are_rejected(patch: Patch, tmp_path: Path, extra: bytes | str) -> None:
    if extra == "zstd frame":
        extra = zstandard.ZstdCompressor().compress(b"more")
    assert isinstance(extra, bytes)
    with pytest.raises(FormatError, match="trailing bytes"):
        patch.apply(tmp_path, patch.container + extra)


def test_base_of_wrong_length_is_rejected(patch: Patch, tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    save_file({"model.layers.0.mlp.experts.0.w1.weight": np.zeros((8, 17), np.float32)},
              str(other))
    with pytest.raises(FormatError, match="base file length differs"):
        patch.apply(tmp_path, base=other)


def test_wrong_base_of_right_length_is_a_hash_mismatch(patch: Patch, tmp_path: Path) -> None:
    """Same header, other bits: 'same' and 'delta' chunks decode to the wrong data."""
    with SafetensorsFile(patch.base_path) as b:
        start = b.data_start
    raw = patch.base_path.read_bytes()
    other = tmp_path / "other.safetensors"
    other.write_bytes(raw[:start] + bytes(x ^ 0x10 for x in raw[start:]))
    with pytest.raises(HashMismatchError):
        patch.apply(tmp_path, base=other)


def test_base_without_the_named_tensors_is_rejected(patch: Patch, tmp_path: Path) -> None:
    with SafetensorsFile(patch.base_path) as b:
        tensors = [(n.replace("experts", "expertz"), t.dtype, t.shape, b.read(t))
                   for n, t in b.tensors.items()]
    other = tmp_path / "other.safetensors"
    write_raw_tensors(str(other), tensors, {"format": "pt"})
    assert other.stat().st_size == patch.base_path.stat().st_size
    with pytest.raises(FormatError, match="missing base tensor"):
        patch.apply(tmp_path, base=other)


def test_patch_without_base_is_rejected(patch: Patch, tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="one is missing"):
        patch.apply(tmp_path, base=None)


def test_full_object_with_a_base_is_rejected(patch: Patch, tmp_path: Path) -> None:
    pub = Publisher(tmp_path / "full", None, 64)
    full = pub.publish(base_model())
    r = next(iter(full.results.values()))
    data = Path(r.task.out_path).read_bytes()
    assert patch.apply(tmp_path, data, base=None) == full.files[r.task.layout.name].read_bytes()
    with pytest.raises(FormatError, match="one is missing"):
        patch.apply(tmp_path, data)


def test_patch_applied_to_another_groups_base_is_rejected(patch: Patch, tmp_path: Path) -> None:
    pub = Publisher(tmp_path / "other", None, 64)
    files = pub.publish(base_model()).files
    for path in files.values():
        with pytest.raises(REJECTED):
            patch.apply(tmp_path, base=path)


def _rewrite(container: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    start = _payload_start(container)
    doc = json.loads(container[16:start])
    edit(doc)
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<Q", len(raw)) + raw + container[start:]


def _set(*path: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        for k in path[:-1]:
            doc = doc[k]
        doc[path[-1]] = value
    return edit


def _first_chunk(doc: dict[str, Any], codecs: str | frozenset[str]) -> list[Any]:
    wanted = {codecs} if isinstance(codecs, str) else codecs
    return next(c for t in doc["tensors"] for c in t["chunks"] if c[0] in wanted)


def _last_frames(doc: dict[str, Any]) -> list[int]:
    frames: list[int] = [c[1] for t in doc["tensors"] for c in t["chunks"] if c[1]][-1]
    return frames


HEADER_EDITS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("wrong _type", _set("_type", value="deltaship.index"), "wrong _type"),
    ("spec_version 2", _set("spec_version", value=2), "spec_version"),
    ("chunk_bytes 0", _set("chunk_bytes", value=0), "positive multiple of 8"),
    ("chunk_bytes 100", _set("chunk_bytes", value=100), "positive multiple of 8"),
    ("chunk_bytes string", _set("chunk_bytes", value="256"), "chunk_bytes must be"),
    ("prefix past the end", _set("prefix", value=2**64), "payload is shorter"),
    ("prefix negative", _set("prefix", value=-1), "prefix must be"),
    ("target missing", _set("target", value=None), "target must be"),
    ("target length negative", _set("target", "length", value=-1), "target.length"),
    ("target length off", lambda d: d["target"].update(length=d["target"]["length"] + 1),
     "target header is malformed: tensor data ends at"),
    ("target sha256 off", _set("target", "sha256", value="0" * 64),
     "does not match the target sha256"),
    ("tensors not a list", _set("tensors", value={}), "tensors must be a list"),
    ("tensor missing", lambda d: d["tensors"].pop(), "does not list every tensor"),
    ("tensors reordered", lambda d: d["tensors"].reverse(), "out of order"),
    ("tensor renamed", _set("tensors", 0, "name", value="x"), "out of order"),
    ("unknown base tensor", _set("tensors", 0, "base", value="nope"), "missing base tensor"),
    ("base tensor not a string", _set("tensors", 0, "base", value=["x"]),
     "missing base tensor"),
    ("overlap too large", _set("tensors", 0, "overlap", value=10**9), "bad overlap"),
    ("overlap not a multiple of width", _set("tensors", 0, "overlap", value=2), "bad overlap"),
    ("overlap without base", lambda d: next(
        t for t in d["tensors"] if t["base"] is None).update(overlap=4),
     "overlap without a base"),
    ("chunk missing", lambda d: d["tensors"][0]["chunks"].pop(), "wrong chunk count"),
    ("chunk malformed", _set("tensors", 0, "chunks", 0, value=["zstd"]), "malformed chunk"),
    ("unknown codec", _set("tensors", 0, "chunks", 0, 0, value="lz4"), "malformed chunk"),
    ("same outside the overlap", lambda d: next(
        t for t in d["tensors"] if t["base"] is None)["chunks"].__setitem__(0, ["same", []]),
     "same chunk outside the base overlap"),
    ("frame count", lambda d: _first_chunk(d, DELTAS)[1].append(0), "wrong frame count"),
    ("frame length negative", lambda d: _first_chunk(d, "zstd")[1].__setitem__(0, -5),
     "frame length must be"),
    ("frame longer than its chunk needs",
     lambda d: _first_chunk(d, "zstd")[1].__setitem__(0, 10**12), "longer than its chunk"),
    ("frame lengths past the end", lambda d: _last_frames(d).__setitem__(0, _last_frames(d)[0] + 1),
     "payload is shorter"),
    ("chunk_bytes over the cap", _set("chunk_bytes", value=MAX_CHUNK_BYTES + 8), "over the cap"),
    ("chunk_bytes 1 GiB", _set("chunk_bytes", value=2**30), "over the cap"),
    ("frame lengths shifted", lambda d: (
        _first_chunk(d, DELTAS)[1].__setitem__(0, _first_chunk(d, DELTAS)[1][0] + 1),
        _first_chunk(d, DELTAS)[1].__setitem__(1, _first_chunk(d, DELTAS)[1][1] - 1),
    ), r"corrupt zstd frame|frame declares|decodes to"),
]


@pytest.mark.parametrize(("edit", "problem"), [c[1:] for c in HEADER_EDITS],
                         ids=[c[0] for c in HEADER_EDITS])
def test_malformed_header_is_rejected(
    patch: Patch, tmp_path: Path, edit: Callable[[dict[str, Any]], None], problem: str
) -> None:
    with pytest.raises(REJECTED, match=problem):
        patch.apply(tmp_path, _rewrite(patch.container, edit))


ODD_VALUES = [None, -1, 0, 1, 2**64, "x", "delta", [], {}, [1], 1.5, True]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if prefix:
        yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def test_any_header_field_replaced_is_rejected_or_harmless(patch: Patch, tmp_path: Path) -> None:
    """Every field of the header, replaced by values of every JSON type: never another error."""
    doc = json.loads(patch.container[16 : _payload_start(patch.container)])
    outcomes: dict[str, int] = {}
    for path in _paths(doc):
        for value in ODD_VALUES:
            bad = _rewrite(patch.container, _set(*path, value=value))
            try:
                out = patch.apply(tmp_path, bad)
            except REJECTED as e:
                outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
                continue
            assert out == patch.target, (path, value)
            outcomes["harmless"] = outcomes.get("harmless", 0) + 1
    assert outcomes["harmless"] < 0.05 * sum(outcomes.values()), outcomes


# -- the output is bounded by what the signed index declares (issue 9, point 7) -------------


def _apply_expecting(patch: Patch, tmp: Path, container: bytes,
                     expected: tuple[str, int]) -> io.BytesIO:
    path = tmp / "expected.patch"
    path.write_bytes(container)
    out = io.BytesIO()
    with SafetensorsFile(patch.base_path) as b:
        apply_container(path, b, out, expected=expected)
    return out


def test_output_matching_the_declared_target_is_written(patch: Patch, tmp_path: Path) -> None:
    digest = hashlib.sha256(patch.target).hexdigest()
    out = _apply_expecting(patch, tmp_path, patch.container, (digest, len(patch.target)))
    assert out.getvalue() == patch.target


@pytest.mark.parametrize("delta", [-1, 1, 2**30], ids=["shorter", "longer", "1GiB-longer"])
def test_a_target_other_than_declared_is_refused_before_writing(
    patch: Patch, tmp_path: Path, delta: int
) -> None:
    """A container naming another target length than its index is refused with nothing
    written: the free-space check counted the index's length."""
    digest = hashlib.sha256(patch.target).hexdigest()
    out = io.BytesIO()
    with pytest.raises(HashMismatchError, match="differs from the release index"):
        out = _apply_expecting(patch, tmp_path, patch.container,
                               (digest, len(patch.target) + delta))
    assert out.getvalue() == b""


def test_a_bomb_declaring_the_index_target_is_refused_before_writing(
    patch: Patch, tmp_path: Path
) -> None:
    """The container's own target is a 1 GiB tensor of zeros in 1 GiB chunks (a few kB of
    payload): refused before any allocation or write, whatever the index declares."""
    digest = hashlib.sha256(patch.target).hexdigest()
    bomb = _rewrite(patch.container, _set("chunk_bytes", value=2**30))
    out = io.BytesIO()
    with pytest.raises(OversizeError, match="over the cap"):
        out = _apply_expecting(patch, tmp_path, bomb, (digest, len(patch.target)))
    assert out.getvalue() == b""


@given(size=st.integers(0, 2 * MAX_CHUNK_BYTES), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=30, deadline=None)
def test_max_frame_length_bounds_any_zstd_frame(size: int, seed: int) -> None:
    """Incompressible data at every level the encoder uses fits the per-frame cap."""
    data = np.random.default_rng(seed).bytes(min(size, 1 << 20))
    for level in (1, 3, 19):
        frame = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(data)
        assert len(frame) <= max_frame_length(len(data))
