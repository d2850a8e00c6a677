"""A second, independent reader of deltaship stores, written from docs/FORMAT.md alone.

It imports nothing of deltaship: only the standard library, PyNaCl (Ed25519), zstandard and
numpy. tests/test_second_reader.py checks that it rebuilds what the project's own code does,
which tests the promise that FORMAT.md describes every format precisely enough for a second
implementation. Where a rule below is not in FORMAT.md's words, the doc was fixed.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import zstandard
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

MIB = 1 << 20
MAX_ROOT = 512 * 1024
MAX_MANIFEST = 64 * 1024
MAX_INDEX = 16 * MIB
MAX_PATCH_HEADER = 16 * MIB
WIDTHS = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
          "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
          "I64": 8, "U64": 8, "F64": 8}
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
SINT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


class ReaderError(Exception):
    """Anything the second reader refuses."""


def width(dtype: str) -> int:
    if dtype not in WIDTHS:
        raise ReaderError(f"unknown dtype {dtype}")
    return WIDTHS[dtype]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- §2 canonical JSON and signatures --------------------------------------------------------


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ReaderError(f"repeated key {k!r}")
        out[k] = v
    return out


def _no_float(s: str) -> Any:
    raise ReaderError(f"floating-point number {s}")


def parse(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"), object_pairs_hook=_no_dupes, parse_float=_no_float)


def canonical(v: Any) -> bytes:
    return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_time(s: str) -> datetime:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def check_threshold(signed: Any, sigs: Any, root_signed: dict[str, Any], role: str) -> None:
    spec = root_signed["roles"][role]
    keyids = set(spec["keyids"])
    message = canonical(signed)
    seen: set[str] = set()
    good = 0
    for entry in sigs:
        kid = entry["keyid"]
        if kid in seen:
            continue  # only the first entry of a key id counts
        seen.add(kid)
        if kid not in keyids:
            continue
        key = root_signed["keys"][kid]
        public = bytes.fromhex(key["public"])
        if key["scheme"] != "ed25519" or sha(public) != kid:
            raise ReaderError(f"key {kid} does not match its id")
        try:
            VerifyKey(public).verify(message, bytes.fromhex(entry["sig"]))
        except (BadSignatureError, ValueError):
            continue
        good += 1
    if good < spec["threshold"]:
        raise ReaderError(f"{role}: {good} valid signatures, {spec['threshold']} needed")


def check_header(signed: dict[str, Any], type_: str, repository_id: str | None) -> None:
    if signed.get("_type") != type_ or signed.get("spec_version") != 3:
        raise ReaderError(f"not a {type_} of spec_version 3")
    if repository_id is not None and signed.get("repository_id") != repository_id:
        raise ReaderError("mix-and-match: another repository_id")


# -- §4 root, §5 manifest -------------------------------------------------------------------


def verify_root(data: bytes, now: datetime, check_expiry: bool = True) -> dict[str, Any]:
    if len(data) > MAX_ROOT:
        raise ReaderError("root too large")
    env = parse(data)
    signed = env["signed"]
    check_header(signed, "deltaship.root", None)
    for role in ("root", "release", "timestamp"):
        spec = signed["roles"][role]
        if not 1 <= spec["threshold"] <= len(set(spec["keyids"])):
            raise ReaderError(f"bad threshold for {role}")
    for kid, key in signed["keys"].items():
        if sha(bytes.fromhex(key["public"])) != kid:
            raise ReaderError(f"key id {kid} is not the SHA-256 of its key")
    check_threshold(signed, env["signatures"], signed, "root")
    if check_expiry and parse_time(signed["expires"]) < now:
        raise ReaderError("root expired")
    return signed  # type: ignore[no-any-return]


def verify_successor(trusted: dict[str, Any], data: bytes, now: datetime) -> dict[str, Any]:
    env = parse(data)
    check_threshold(env["signed"], env["signatures"], trusted, "root")
    new = verify_root(data, now, check_expiry=False)
    if new["version"] != trusted["version"] + 1:
        raise ReaderError("root replay or gap")
    if new["repository_id"] != trusted["repository_id"]:
        raise ReaderError("root of another repository")
    return new


@dataclass(frozen=True)
class Pin:
    sha256: str
    length: int
    zstd: dict[str, Any] | None
    deltas: list[dict[str, Any]]


def verify_manifest(data: bytes, root: dict[str, Any], now: datetime, channel: str = "stable",
                    min_sequence: int = 0, min_timestamp: int = 0,
                    ) -> tuple[dict[str, Any], Pin]:
    """Verify both signed layers of ``manifest.json`` (§13 step 7); returns (manifest, the
    pin of its ``current`` index)."""
    if len(data) > MAX_MANIFEST:
        raise ReaderError("manifest too large")
    env = parse(data)
    ts = env["signed"]
    check_threshold(ts, env["signatures"], root, "timestamp")
    inner = ts.get("manifest")
    if not isinstance(inner, dict) or not isinstance(env.get("manifest_signatures"), list):
        raise ReaderError("not a timestamp around a manifest")
    check_threshold(inner, env["manifest_signatures"], root, "release")
    check_header(ts, "deltaship.timestamp", root["repository_id"])
    check_header(inner, "deltaship.manifest", root["repository_id"])
    if inner.get("channel", "stable") != channel:
        raise ReaderError("mix-and-match: a manifest of another channel")
    if ts["sequence"] < min_timestamp or inner["sequence"] < min_sequence:
        raise ReaderError("replayed manifest")
    if parse_time(inner["expires"]) < now:
        raise ReaderError("manifest expired")
    if parse_time(ts["expires"]) < now:
        raise ReaderError("timestamp expired")
    return inner, pin_of(inner["current"]["index"])


def pin_of(ref: dict[str, Any]) -> Pin:
    return Pin(ref["sha256"], ref["length"], ref.get("zstd"), list(ref.get("deltas", [])))


# -- §5.3 / §13 step 10: the release index and its packed forms -----------------------------


def _one_frame(packed: bytes, expected: int, dict_data: bytes | None) -> bytes:
    params = zstandard.get_frame_parameters(packed)
    if params.content_size != expected:
        raise ReaderError("packed index does not declare the pinned size")
    if dict_data is None:
        dctx = zstandard.ZstdDecompressor()
    else:
        d = zstandard.ZstdCompressionDict(dict_data, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        dctx = zstandard.ZstdDecompressor(dict_data=d)
    obj = dctx.decompressobj()
    out = obj.decompress(packed)
    if not obj.eof or obj.unused_data:
        raise ReaderError("packed index: not exactly one frame")
    return out


def fetch_index(get: Callable[[str, int], bytes], pin: Pin, form: str,
                base: bytes | None = None) -> bytes:
    """The index bytes via ``form``: ``raw``, ``zstd`` or ``delta`` (from ``base``)."""
    if pin.length > MAX_INDEX:
        raise ReaderError("index pin over the cap")
    if form == "raw":
        data = get(f"objects/{pin.sha256}", pin.length)
    else:
        if form == "zstd":
            entry = pin.zstd
        else:
            assert base is not None
            entry = next((d for d in pin.deltas if d["from"] == sha(base)), None)
        if entry is None:
            raise ReaderError(f"the pin has no {form} form")
        packed = get(f"objects/{entry['sha256']}", min(entry["length"], MAX_INDEX))
        if len(packed) != entry["length"] or sha(packed) != entry["sha256"]:
            raise ReaderError(f"{form} form does not match its entry")
        data = _one_frame(packed, pin.length, base if form == "delta" else None)
    if len(data) != pin.length or sha(data) != pin.sha256:
        raise ReaderError("index does not match its pin")
    return data


def parse_index(data: bytes, root: dict[str, Any], version: str) -> dict[str, Any]:
    index = parse(data)
    check_header(index, "deltaship.release", root["repository_id"])
    if index["version"] != version:
        raise ReaderError("index of another version")
    return index  # type: ignore[no-any-return]


# -- §6.1 safetensors, §7 the patch container -----------------------------------------------


@dataclass(frozen=True)
class Tensor:
    dtype: str
    begin: int
    end: int


def safetensors_header(data: bytes) -> tuple[dict[str, Tensor], int]:
    """Tensors by name (absolute data offsets) and the data start of a safetensors file."""
    (n,) = struct.unpack_from("<Q", data, 0)
    header = parse(data[8:8 + n])
    start = 8 + n
    out: dict[str, Tensor] = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        b, e = t["data_offsets"]
        if math.prod(t["shape"]) * width(t["dtype"]) != e - b:
            raise ReaderError(f"{name}: shape does not match its bytes")
        out[name] = Tensor(t["dtype"], start + b, start + e)
    return out, start


def compress_bound(n: int) -> int:
    return n + n // 256 + ((128 * 1024 - n) // 2048 if n < 128 * 1024 else 0) + 64


def _frame(payload: memoryview, pos: int, length: int, expected: int) -> bytes:
    if length > compress_bound(expected):
        raise ReaderError("frame over the compress bound")
    frame = bytes(payload[pos:pos + length])
    if len(frame) != length:
        raise ReaderError("payload truncated")
    if zstandard.get_frame_parameters(frame).content_size != expected:
        raise ReaderError("frame declares another size")
    out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=expected)
    if len(out) != expected:
        raise ReaderError("frame decodes to another size")
    return out


def _planes_to_bytes(planes: list[bytes], w: int, n: int) -> np.ndarray:
    stacked = np.frombuffer(b"".join(planes), dtype=np.uint8).reshape(w, n)
    return np.ascontiguousarray(stacked.T).view(UINT[w]).reshape(n)


def _order(base: np.ndarray, w: int) -> np.ndarray:
    u = UINT[w]
    key = (base >> u(8 * w - 9)) & u(0xFF) if w >= 2 else base & u(0x7F)
    order: np.ndarray = np.argsort(key, kind="stable")
    return order


def _unzigzag(z: np.ndarray, w: int) -> np.ndarray:
    u = UINT[w]
    d: np.ndarray = (z >> u(1)) ^ (u(0) - (z & u(1)))
    return d


def decode_chunk(codec: str, frames: list[bytes], w: int, length: int,
                 base: bytes | None) -> bytes:
    n = length // w
    if codec == "zstd":
        return frames[0]
    if codec == "same":
        assert base is not None
        return base
    if codec == "planes":
        return _planes_to_bytes(frames, w, n).tobytes()
    if codec == "planes-rot":
        r = _planes_to_bytes(frames, w, n)
        u = UINT[w]
        x: np.ndarray = (r >> u(1)) | ((r & u(1)) << u(8 * w - 1))
        return x.tobytes()
    if codec in ("delta", "delta-sparse"):
        assert base is not None
        b = np.frombuffer(base, dtype=UINT[w])
        if codec == "delta":
            zs = _planes_to_bytes(frames, w, n)
        else:
            bits = np.unpackbits(np.frombuffer(frames[0], dtype=np.uint8))[:n].astype(bool)
            zs = np.zeros(n, dtype=UINT[w])
            zs[bits] = _planes_to_bytes(frames[1:], w, int(bits.sum()))
        z = np.empty(n, dtype=UINT[w])
        z[_order(b, w)] = zs
        new: np.ndarray = b + _unzigzag(z, w)
        return new.tobytes()
    raise ReaderError(f"unknown codec {codec}")


def frame_sizes(codec: str, w: int, length: int, frames: list[int], payload: memoryview,
                pos: int) -> list[int]:
    """The decompressed size of each frame of a chunk (reads the bitmap for delta-sparse)."""
    n = length // w
    if codec == "same":
        return []
    if codec == "zstd":
        return [length]
    if codec in ("delta", "planes", "planes-rot"):
        return [n] * w
    if codec == "delta-sparse":
        bitmap = _frame(payload, pos, frames[0], (n + 7) // 8)
        k = int(np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8))[:n].sum())
        return [(n + 7) // 8] + [k] * w
    raise ReaderError(f"unknown codec {codec}")


def apply_container(obj: bytes, base: bytes | None, target: tuple[str, int]) -> bytes:
    """Rebuild the target group file from a DSPATCH1 container (and its base file)."""
    if obj[:8] != b"DSPATCH1":
        raise ReaderError("not a DSPATCH1 container")
    (h,) = struct.unpack_from("<Q", obj, 8)
    if not 1 <= h <= MAX_PATCH_HEADER:
        raise ReaderError("container header length out of range")
    header = parse(obj[16:16 + h])
    if header["_type"] != "deltaship.patch" or header["spec_version"] != 1:
        raise ReaderError("not a patch container of version 1")
    if (header["target"]["sha256"], header["target"]["length"]) != target:
        raise ReaderError("container names another target")
    chunk = header["chunk_bytes"]
    if chunk % 8 or not 0 < chunk <= 16 * MIB:
        raise ReaderError("bad chunk_bytes")
    base_tensors: dict[str, Tensor] = {}
    if header["base"] is not None:
        if base is None or len(base) != header["base"]["length"]:
            raise ReaderError("base file of another length")
        base_tensors, _ = safetensors_header(base)
    payload = memoryview(obj)[16 + h:]
    pos = header["prefix"]
    prefix_out = min(target[1], 8 + 100_000_000)
    prefix = zstandard.ZstdDecompressor().decompress(bytes(payload[:pos]),
                                                     max_output_size=prefix_out)
    if len(prefix) < 8 or len(prefix) != 8 + struct.unpack_from("<Q", prefix)[0]:
        raise ReaderError("the prefix is not the 8-byte length and the header it names")
    out = bytearray(prefix)
    tensors, start = safetensors_header(prefix)
    # Data-offset order: by (begin, end), ties (empty tensors at one offset) in header order.
    order = sorted(tensors, key=lambda name: (tensors[name].begin, tensors[name].end))
    at = start
    for name in order:
        if tensors[name].begin != at:
            raise ReaderError("target tensors are not contiguous")
        at = tensors[name].end
    if order != [t["name"] for t in header["tensors"]]:
        raise ReaderError("container tensors are not the target's in data-offset order")
    for entry in header["tensors"]:
        t = tensors[entry["name"]]
        w = width(t.dtype)
        nbytes = t.end - t.begin
        overlap = entry["overlap"]
        bt = base_tensors[entry["base"]] if entry["base"] is not None else None
        if bt is None and overlap:
            raise ReaderError("overlap without a base tensor")
        if bt is not None:
            assert base is not None
            if width(bt.dtype) != w or overlap % w or overlap > min(nbytes, bt.end - bt.begin):
                raise ReaderError("bad overlap")
        spans = [(s, min(s + chunk, overlap)) for s in range(0, overlap, chunk)]
        spans += [(s, min(s + chunk, nbytes)) for s in range(overlap, nbytes, chunk)]
        if len(spans) != len(entry["chunks"]):
            raise ReaderError(f"{entry['name']}: {len(entry['chunks'])} chunks, "
                              f"expected {len(spans)}")
        for (begin, end), (codec, lengths) in zip(spans, entry["chunks"], strict=True):
            inside = end <= overlap
            if codec in ("same", "delta", "delta-sparse") and not inside:
                raise ReaderError(f"{codec} outside the overlap")
            sizes = frame_sizes(codec, w, end - begin, lengths, payload, pos)
            if len(sizes) != len(lengths):
                raise ReaderError("wrong number of frames")
            frames = []
            for length, size in zip(lengths, sizes, strict=True):
                frames.append(_frame(payload, pos, length, size))
                pos += length
            base_bytes = None
            if inside and bt is not None:
                assert base is not None
                base_bytes = base[bt.begin + begin:bt.begin + end]
            out += decode_chunk(codec, frames, w, end - begin, base_bytes)
            if len(out) > target[1]:
                raise ReaderError("output passes the target length")
    if pos != len(payload):
        raise ReaderError("payload has trailing bytes")
    data = bytes(out)
    if len(data) != target[1] or sha(data) != target[0]:
        raise ReaderError("rebuilt group file does not match the target")
    return data


def decode_file(obj: bytes, length: int, sha256: str) -> bytes:
    """§8: a non-tensor file, one zstd frame."""
    out = zstandard.ZstdDecompressor().decompressobj().decompress(obj)
    if len(out) != length or sha(out) != sha256:
        raise ReaderError("file does not match its entry")
    return out


# -- a whole store ---------------------------------------------------------------------------


class DirStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def get(self, key: str, limit: int) -> bytes:
        with open(self.path / key, "rb") as f:
            return f.read(limit + 1)[:limit + 1]

    def get_object(self, ref: dict[str, Any]) -> bytes:
        data = self.get(f"objects/{ref['sha256']}", ref["length"])
        if len(data) != ref["length"] or sha(data) != ref["sha256"]:
            raise ReaderError(f"object {ref['sha256']} does not match its reference")
        return data


def materialise(store: DirStore, index: dict[str, Any], out: Path,
                have: dict[str, bytes] | None = None) -> dict[str, str]:
    """Write every group file and file of ``index`` to ``out``; returns {file: how}."""
    out.mkdir(parents=True)
    how: dict[str, str] = {}
    for g in index["groups"]:
        target = (g["sha256"], g["length"])
        patch = next((p for p in g.get("patches", []) if have and p["base_sha256"] in have),
                     None)
        if patch is not None and have is not None:
            data = apply_container(store.get_object(patch["object"]),
                                   have[patch["base_sha256"]], target)
            how[g["file"]] = "patch"
        else:
            data = apply_container(store.get_object(g["full"]), None, target)
            how[g["file"]] = "full"
        (out / g["file"]).write_bytes(data)
    for fe in index.get("files", []):
        data = decode_file(store.get_object(fe["object"]), fe["length"], fe["sha256"])
        (out / fe["path"]).parent.mkdir(parents=True, exist_ok=True)
        (out / fe["path"]).write_bytes(data)
        how[fe["path"]] = "file"
    weight_index = {"metadata": {"total_size": sum(g["length"] for g in index["groups"]),
                                 "deltaship_version": index["version"]},
                    "weight_map": {t["name"]: g["file"]
                                   for g in index["groups"] for t in g["tensors"]}}
    (out / "model.safetensors.index.json").write_text(json.dumps(weight_index))
    return how


def codecs_of(obj: bytes) -> set[str]:
    """The chunk codecs a container uses (for tests that want to know what they covered)."""
    (h,) = struct.unpack_from("<Q", obj, 8)
    header = parse(obj[16:16 + h])
    return {c[0] for t in header["tensors"] for c in t["chunks"]}
