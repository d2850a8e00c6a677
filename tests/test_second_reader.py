"""docs/FORMAT.md is enough for a second implementation: tests/_second_reader.py, written from
the doc alone, verifies a store the real ``deltaship-publish`` wrote and rebuilds every group
file and file of two releases (from full objects, and from patches against the first) byte for
byte equal to what the project's own code rebuilds (tests/_device.py)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

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
    assert sr.verify_successor  # the chain walk is exercised by rotation tests elsewhere

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
    ours1 = tmp_path / "ours-v1"
    how1 = sr.materialise(reader, index1, ours1)
    assert set(how1.values()) == {"full", "file"}
    theirs1 = tmp_path / "theirs-v1"
    _device.materialise(project, ReleaseIndex.from_dict(index1), theirs1, {}, tmp_path / "w1")
    assert_same(ours1, theirs1, index1)

    ours2 = tmp_path / "ours-v2-full"
    sr.materialise(reader, index2, ours2)
    theirs2 = tmp_path / "theirs-v2"
    _device.materialise(project, ReleaseIndex.from_dict(index2), theirs2, {}, tmp_path / "w2")
    assert_same(ours2, theirs2, index2)

    have = {g["sha256"]: (ours1 / g["file"]).read_bytes() for g in index1["groups"]}
    ours2p = tmp_path / "ours-v2-patched"
    how2 = sr.materialise(reader, index2, ours2p, have=have)
    assert "patch" in how2.values(), how2
    theirs2p = tmp_path / "theirs-v2-patched"
    have_paths = {g["sha256"]: ours1 / g["file"] for g in index1["groups"]}
    fetched = _device.materialise(project, ReleaseIndex.from_dict(index2), theirs2p, have_paths,
                                  tmp_path / "w3")
    assert fetched["patch"] > 0
    assert_same(ours2p, theirs2p, index2)
    assert files_of(ours2p) == files_of(ours2)


def assert_same(ours: Path, theirs: Path, index: dict[str, object]) -> None:
    mine = files_of(ours)
    project = {k: v for k, v in files_of(theirs).items() if k != "model.safetensors.index.json"}
    assert mine.keys() == project.keys()
    for name, data in mine.items():
        assert data == project[name], name
    groups = index["groups"]
    assert isinstance(groups, list)
    assert {g["file"] for g in groups} <= mine.keys()
    assert any(not k.endswith(".safetensors") for k in mine), "a non-tensor file"
