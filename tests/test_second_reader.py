"""docs/FORMAT.md is enough for a second implementation: tests/_second_reader.py, written from
the doc alone, verifies a store the real ``deltaship-publish`` wrote and rebuilds every group
file and file of two releases (from full objects, and from patches against the first) byte for
byte equal to what the project's own code rebuilds (tests/_device.py)."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nacl.signing import SigningKey

from edge_agent.layout import weight_index
from manifest import trust
from manifest.constants import WEIGHT_INDEX_FILE
from manifest.errors import DeltashipError
from manifest.metadata import ReleaseIndex
from manifest.storage.store import open_store
from tests import _device
from tests import _second_reader as sr
from tests.conftest import MoEFamily

BIN = Path(sys.executable).parent


def publish(*args: object) -> str:
    cmd = [str(BIN / "deltaship-publish"), *map(str, args)]
    p = subprocess.run(cmd, text=True, capture_output=True, timeout=300)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p.stdout


@pytest.fixture(scope="module")
def store(moe_family: MoEFamily, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("second-reader")
    publish("keygen", "--out", d / "keys", "--name", "release")
    key = d / "keys" / "release.key"
    (d / "store").mkdir()
    publish("init", "--store", d / "store", "--key", key, "--out", d / "root.json")
    for version, model in (("v1", moe_family.v1), ("v2", moe_family.v4)):
        publish("release", model, "--store", d / "store", "--version", version, "--key", key,
                "--cache-dir", d / "cache")
    return d


def files_of(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_second_reader_rebuilds_what_the_project_does(store: Path, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    reader = sr.DirStore(store / "store")
    root_bytes = (store / "root.json").read_bytes()
    root = sr.verify_root(root_bytes, now)
    assert reader.get("root.json", sr.MAX_ROOT) == root_bytes
    assert root["version"] == 1

    # v1 is what the record pins; v2 is current.
    record = sr.parse(reader.get("releases/v1.json", 65536))
    sr.check_threshold(record["signed"], record["signatures"], root, "release")
    sr.check_header(record["signed"], "deltaship.release-record", root["repository_id"])
    pin1 = sr.pin_of(record["signed"]["index"])
    index1_bytes = sr.fetch_index(reader.get, pin1, "raw")
    assert sr.fetch_index(reader.get, pin1, "zstd") == index1_bytes
    index1 = sr.parse_index(index1_bytes, root, "v1")

    manifest, pin2 = sr.verify_manifest(reader.get("manifest.json", sr.MAX_MANIFEST), root, now)
    assert manifest["current"]["version"] == "v2"
    assert pin2.zstd is not None and pin2.deltas, "v2's pin names a zstd and a delta form"
    raw = sr.fetch_index(reader.get, pin2, "raw")
    assert sr.fetch_index(reader.get, pin2, "zstd") == raw
    assert sr.fetch_index(reader.get, pin2, "delta", base=index1_bytes) == raw
    index2 = sr.parse_index(raw, root, "v2")

    # A tampered packed form is refused, not decoded.
    with pytest.raises(sr.ReaderError):
        sr.fetch_index(lambda k, n: reader.get(k, n)[:-1] + b"x", pin2, "zstd")

    # Rebuild both releases from full objects, and v2 from patches against v1, with both
    # implementations; every group file and file must be the same bytes.
    project = open_store(str(store / "store"))
    how1, _, ours1 = rebuild_both(reader, project, index1, tmp_path, "v1")
    assert set(how1.values()) == {"full", "file"}
    _, _, ours2 = rebuild_both(reader, project, index2, tmp_path, "v2-full")
    how2, fetched, ours2p = rebuild_both(reader, project, index2, tmp_path, "v2-patched",
                                         base=ours1)
    assert "patch" in how2.values(), how2
    assert fetched["patch"] > 0
    assert files_of(ours2p) == files_of(ours2)


def rebuild_both(reader: Any, project: Any, index: dict[str, Any], tmp_path: Path, name: str,
                 base: Path | None = None) -> tuple[dict[str, str], dict[str, int], Path]:
    """``index`` rebuilt by this reader and by the project's device code (from full objects,
    or from patches against the group files in ``base``), compared with :func:`assert_same`:
    (how this reader got each file, what the project fetched, this reader's directory)."""
    groups = [] if base is None else sorted(base.glob("*.safetensors"))
    by_sha = {hashlib.sha256(f.read_bytes()).hexdigest(): f for f in groups}
    ours, theirs = tmp_path / f"ours-{name}", tmp_path / f"theirs-{name}"
    how = sr.materialise(reader, index, ours,
                         have={sha: f.read_bytes() for sha, f in by_sha.items()} or None)
    fetched = _device.materialise(project, ReleaseIndex.from_dict(index), theirs, by_sha,
                                  tmp_path / f"work-{name}")
    assert_same(ours, theirs, index)
    return how, fetched, ours


def assert_same(ours: Path, theirs: Path, index: dict[str, object]) -> None:
    """Same group files and files; the weight index says what the agent's says (§10)."""
    mine = files_of(ours)
    project = files_of(theirs)
    weights = WEIGHT_INDEX_FILE
    agent = weight_index(ReleaseIndex.from_dict(index), {g["name"] for g in index["groups"]})  # type: ignore[attr-defined]
    assert json.loads(mine.pop(weights)) == json.loads(agent)
    project.pop(weights)
    assert mine.keys() == project.keys()
    for name, data in mine.items():
        assert data == project[name], name
    groups = index["groups"]
    assert isinstance(groups, list)
    assert {g["file"] for g in groups} <= mine.keys()
    assert any(not k.endswith(".safetensors") for k in mine), "a non-tensor file"


# -- edge cases: several chunks with a short last one, an empty tensor, odd byte lengths, every
# width, sparse changes, a first dimension that grew (overlap not a multiple of the chunk size)


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    header: dict[str, object] = {}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw
                     + b"".join(d for _, _, d in tensors.values()))


def edge_model(d: Path, version: int) -> Path:
    rng = np.random.default_rng(7)
    big = rng.normal(0, 0.02, 1_100_003).astype(np.float32)  # 2 chunks of 4 MiB, odd count
    emb = rng.normal(0, 0.02, (300, 8)).astype(np.float32)
    head = rng.normal(0, 0.02, (50, 8)).astype(np.float32)
    small = rng.integers(0, 256, 13, dtype=np.uint8)
    f64 = rng.normal(0, 1, 37)
    i16 = rng.integers(-30000, 30000, 51, dtype=np.int16)
    retyped = rng.normal(0, 0.02, 24).astype(np.float32)
    extra: dict[str, tuple[str, list[int], bytes]] = {}
    retyped_t: tuple[str, list[int], bytes] = ("F32", [24], retyped.tobytes())
    if version == 2:
        rng2 = np.random.default_rng(8)
        hit = rng2.random(big.size) < 0.05  # few changes: delta-sparse
        big = big + hit * rng2.normal(0, 1e-3, big.size).astype(np.float32)
        big = np.concatenate([big, rng2.normal(0, 0.02, 1001).astype(np.float32)])  # grew
        emb = np.vstack([emb + 1e-4, rng2.normal(0, 0.02, (45, 8)).astype(np.float32)])
        head = head[:31] * 1.01  # shrank
        small = small ^ np.uint8(0x5A)
        f64 = f64 + 1e-13  # tiny: delta of width 8
        i16 = i16 + 3
        retyped_t = ("F16", [24], retyped.astype(np.float16).tobytes())  # another width
        extra = {"model.layers.0.new.weight": ("I32", [5], np.arange(5, dtype=np.int32).tobytes())}
    bf16 = (emb.view(np.uint32) >> 16).astype(np.uint16)
    out = d / f"edge-v{version}"
    out.mkdir()
    write_safetensors(out / "model.safetensors", {
        "model.embed_tokens.weight": ("BF16", list(bf16.shape), bf16.tobytes()),
        "lm_head.weight": ("F32", list(head.shape), head.tobytes()),
        "model.layers.0.empty.weight": ("F32", [0, 8], b""),
        "model.layers.0.empty2.weight": ("U8", [3, 0], b""),
        "model.layers.0.mlp.weight": ("F32", [big.size], big.tobytes()),
        "model.layers.0.odd.weight": ("U8", [13], small.tobytes()),
        "model.layers.0.f64.weight": ("F64", [37], f64.tobytes()),
        "model.layers.0.i16.weight": ("I16", [51], i16.tobytes()),
        "model.layers.0.retyped.weight": retyped_t,
        "model.layers.0.zz_empty.weight": ("BF16", [0], b""),
        **extra,
    })
    (out / "config.json").write_text('{"model_type": "edge", "note": "\u00e9"}\n')
    (out / "sub").mkdir()
    (out / "sub" / "empty.txt").write_bytes(b"")
    return out


def test_second_reader_edge_cases(tmp_path: Path) -> None:
    publish("keygen", "--out", tmp_path / "keys", "--name", "release")
    key = tmp_path / "keys" / "release.key"
    (tmp_path / "store").mkdir()
    publish("init", "--store", tmp_path / "store", "--key", key, "--out", tmp_path / "root.json")
    for v in (1, 2):
        publish("release", edge_model(tmp_path, v), "--store", tmp_path / "store",
                "--version", f"v{v}", "--key", key, "--cache-dir", tmp_path / "cache")
    now = datetime.now(UTC)
    reader = sr.DirStore(tmp_path / "store")
    root = sr.verify_root((tmp_path / "root.json").read_bytes(), now)
    record = sr.parse(reader.get("releases/v1.json", 65536))
    index1 = sr.parse_index(sr.fetch_index(reader.get, sr.pin_of(record["signed"]["index"]),
                                           "zstd"), root, "v1")
    _, pin2 = sr.verify_manifest(reader.get("manifest.json", sr.MAX_MANIFEST), root, now)
    index2 = sr.parse_index(sr.fetch_index(reader.get, pin2, "raw"), root, "v2")
    project = open_store(str(tmp_path / "store"))

    _, _, ours1 = rebuild_both(reader, project, index1, tmp_path, "v1")
    how, _, _ = rebuild_both(reader, project, index2, tmp_path, "v2", base=ours1)
    codecs = set()
    for g in index2["groups"]:
        for p in g.get("patches", []):
            codecs |= sr.codecs_of(reader.get_object(p["object"]))
    assert "patch" in how.values(), how
    assert {"delta", "delta-sparse", "planes-rot"} <= codecs, codecs


# -- the signed documents: both implementations accept and refuse the same bytes ------------


def sign_envelope(signed: dict[str, object], keys: list[SigningKey]) -> dict[str, object]:
    """§2, from the doc: Ed25519 over the canonical JSON of ``signed``, key id = SHA-256."""
    msg = sr.canonical(signed)
    return {"signed": signed, "signatures": [
        {"keyid": sr.sha(bytes(k.verify_key)), "sig": k.sign(msg).signature.hex()} for k in keys]}


def hand_root(keys: list[SigningKey], threshold: int, version: int, expires: str,
              repository_id: str = "ab" * 16) -> dict[str, object]:
    ids = [sr.sha(bytes(k.verify_key)) for k in keys]
    role = {"keyids": ids, "threshold": threshold}
    return {"_type": "deltaship.root", "spec_version": 3, "repository_id": repository_id,
            "version": version, "expires": expires,
            "keys": {i: {"scheme": "ed25519", "public": bytes(k.verify_key).hex(), "name": "k"}
                     for i, k in zip(ids, keys, strict=True)},
            "roles": {"root": role, "release": role, "timestamp": role}}


def outcome(fn: Callable[[], object]) -> bool:
    try:
        fn()
    except (sr.ReaderError, DeltashipError):
        return False
    return True


def test_second_reader_agrees_on_signed_documents(store: Path) -> None:
    now = datetime.now(UTC)
    later = "2099-01-01T00:00:00Z"
    k1, k2, k3 = (SigningKey(bytes([n]) * 32) for n in (1, 2, 3))

    def root_case(env: dict[str, object], expect: bool) -> None:
        data = sr.canonical(env)
        ours = outcome(lambda: sr.verify_root(data, now))
        theirs = outcome(lambda: trust.verify_root(data, now=now))
        assert (ours, theirs) == (expect, expect), env["signatures"]

    two = hand_root([k1, k2], 2, 1, later)
    root_case(sign_envelope(two, [k1, k2]), True)
    root_case(sign_envelope(two, [k2, k1, k3]), True)  # an unknown key is ignored
    doubled = sign_envelope(two, [k1])
    doubled["signatures"] = [*doubled["signatures"], *doubled["signatures"]]  # type: ignore[misc]
    root_case(doubled, False)  # one key signing twice counts once
    bad_first = sign_envelope(two, [k1, k2])
    sigs = bad_first["signatures"]
    assert isinstance(sigs, list)
    bad_first["signatures"] = [{"keyid": sigs[0]["keyid"], "sig": "00" * 64}, *sigs]
    root_case(bad_first, False)  # only the first entry of a key id counts
    root_case(sign_envelope(hand_root([k1], 1, 1, "2020-01-01T00:00:00Z"), [k1]), False)

    # A successor: signed by a threshold of the old root's keys AND of its own.
    old = hand_root([k1], 1, 1, later)
    trusted_ours = sr.verify_root(sr.canonical(sign_envelope(old, [k1])), now)
    trusted_theirs = trust.verify_root(sr.canonical(sign_envelope(old, [k1])), now=now)
    for signers, version, expect in (([k1, k2], 2, True), ([k2], 2, False), ([k1], 2, False),
                                     ([k1, k2], 3, False)):
        data = sr.canonical(sign_envelope(hand_root([k2], 1, version, later), signers))
        ours = outcome(lambda d=data: sr.verify_successor(trusted_ours, d, now))  # type: ignore[misc]
        theirs = outcome(lambda d=data: trust.verify_successor(d, trusted_theirs))  # type: ignore[misc]
        assert (ours, theirs) == (expect, expect), (signers, version)

    # The real store's manifest, and edits of either signed layer without re-signing.
    root_bytes = (store / "root.json").read_bytes()
    root_ours = sr.verify_root(root_bytes, now)
    root_theirs = trust.verify_root(root_bytes, now=now)
    wire = sr.parse((store / "store" / "manifest.json").read_bytes())

    def manifest_case(env: dict[str, object], expect: bool, **kw: object) -> None:
        data = sr.canonical(env)
        ours = outcome(lambda: sr.verify_manifest(data, root_ours, now, **kw))  # type: ignore[arg-type]
        theirs = outcome(lambda: trust.verify_manifest(data, root_theirs, now=now, **kw))  # type: ignore[arg-type]
        assert (ours, theirs) == (expect, expect), kw

    manifest_case(wire, True)
    manifest_case(wire, False, channel="beta")
    manifest_case(wire, False, min_sequence=wire["signed"]["manifest"]["sequence"] + 1)
    manifest_case(wire, False, min_timestamp=wire["signed"]["sequence"] + 1)
    for layer in ("timestamp", "manifest"):
        edited = json.loads(json.dumps(wire))
        target = edited["signed"] if layer == "timestamp" else edited["signed"]["manifest"]
        target["sequence"] += 1
        manifest_case(edited, False)
    swapped = json.loads(json.dumps(wire))
    swapped["manifest_signatures"] = []
    manifest_case(swapped, False)
