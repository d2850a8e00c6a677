"""Issue 9, points 6 and 7: local content is proven, not trusted by name; a signed index cannot
make the agent write more than it declares.

Every end-to-end test starts from a copy of a device that a real ``deltaship-agent run --once``
brought to v1, releases v2 (genuine, or a validly re-signed index with the test key), runs the
real agent once more and checks the exact exit code, exactly one line on stderr and no
traceback, the model directory (the live version byte for byte) and that nothing outside the
model directory changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import zstandard

from devtools import modelgen
from edge_agent.layout import DeviceLayout, hash_file
from manifest.container import MAX_CHUNK_BYTES, ContainerBuilder
from manifest.download_plan import local_inputs, make_plan
from manifest.entries import (
    MAX_CONTENT_LENGTH,
    MAX_GROUP_TENSORS,
    GroupEntry,
    PatchRef,
    TensorEntry,
)
from manifest.errors import OversizeError
from manifest.metadata import ObjectRef, ReleaseIndex

from ._attack_helpers import (
    Device,
    Published,
    Signed,
    current_index,
    forge_index,
    publish,
    put_object,
    refused,
    tree,
    untouched,
)
from .conftest import BIN, MoEFamily

WARNING = "deltaship-agent: "


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, moe_family: MoEFamily) -> Published:
    """v1, v2 (two experts trained) and v3 (one more expert trained: shares most of v2)."""
    v3 = modelgen.train_experts(moe_family.v2, tmp_path_factory.mktemp("v3") / "v3",
                                experts=[(0, 2)], seed=5)
    return publish(tmp_path_factory.mktemp("local-trust"),
                   {"v1": moe_family.v1, "v2": moe_family.v2, "v3": v3})


@pytest.fixture(scope="module")
def device_v1(published: Published, tmp_path_factory: pytest.TempPathFactory) -> Device:
    work = tmp_path_factory.mktemp("local-trust-device")
    store = work / "store"
    shutil.copytree(published.snapshots["v1"], store)
    dev = Device(None, published.root, f"file://{store}", work / "dev")
    dev.update("v1")
    return dev


@dataclass
class Scene:
    pub: Published
    store: Path
    dev: Device
    tmp: Path

    @property
    def layout(self) -> DeviceLayout:
        return DeviceLayout(self.dev.model_dir)

    def release(self, version: str = "v2") -> None:
        shutil.copytree(self.pub.snapshots[version], self.store, dirs_exist_ok=True)

    def outside(self) -> dict[str, str]:
        """Every file next to the model directory (the store, the configuration)."""
        mine = self.dev.model_dir.name
        return {k: v for k, v in tree(self.tmp).items() if Path(k).parts[0] != mine}


@pytest.fixture
def scene(published: Published, device_v1: Device, tmp_path: Path) -> Scene:
    store = tmp_path / "store"
    shutil.copytree(published.snapshots["v1"], store)
    dev = device_v1.clone(tmp_path / "dev", f"file://{store}")
    return Scene(published, store, dev, tmp_path)


def damage(path: Path, *, keep_stat: bool = False) -> None:
    """Flip one byte in place (same inode); ``keep_stat``: put the mtime back afterwards, as
    bit rot (or a careful hand) would leave it."""
    st = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 0x01]))
    os.chmod(path, st.st_mode & 0o777)
    if keep_stat:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def one_warning(p: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr:\n{p.stderr}"
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_intact(scene: Scene, version: str = "v2") -> None:
    """``version`` is live, every file matches the signed index (the agent's own `verify`
    says so), and every object holds the content its name says."""
    assert scene.dev.current() == version
    index = current_index(scene.store)
    live = scene.layout.version_dir(version)
    for g in index["groups"]:
        assert hash_file(live / g["file"]) == g["sha256"], g["name"]
    for f in index["files"]:
        assert hash_file(live / f["path"]) == f["sha256"], f["path"]
    for p in scene.layout.objects.iterdir():
        assert hash_file(p) == p.name, f"objects/{p.name} holds other content"
    v = scene.dev.agent("verify", "--config", scene.dev.config, check=False)
    assert v.returncode == 0, v.stderr
    assert f"{version}: every file matches its signed sha256" in v.stdout


def shared_group(index: Signed, previous: Signed) -> Signed:
    """A group v2 takes unchanged from v1."""
    before = {g["sha256"] for g in previous["groups"]}
    return next(g for g in index["groups"] if g["sha256"] in before and not g["patches"])


def patched_group(index: Signed) -> Signed:
    return next(g for g in index["groups"] if g["patches"])


# -- point 6: local objects are proven before a new version reuses them ------------------------


@pytest.mark.parametrize("keep_stat", [False, True], ids=["edited", "same-stat"])
def test_damaged_patch_base_falls_back_to_the_full_object(scene: Scene, keep_stat: bool) -> None:
    """Every patch base is re-hashed before use (even when its stat is unchanged, as with bit
    rot): a damaged one leaves the plan, the full object is fetched, the update succeeds."""
    scene.release()
    group = patched_group(current_index(scene.store))
    base = group["patches"][0]["base_sha256"]
    damage(scene.layout.object_path(base), keep_stat=keep_stat)
    v1_before, outside = tree(scene.layout.version_dir("v1")), scene.outside()

    p = scene.dev.run_once()

    assert p.returncode == 0, p.stderr
    assert "updated v1 -> v2" in p.stdout
    one_warning(p, f"objects/{base}", "does not hold the content its name says")
    assert_intact(scene)
    assert not scene.layout.object_path(base).exists(), "the damaged base is still an object"
    assert tree(scene.layout.version_dir("v1")) == v1_before, "the previous version changed"
    assert scene.outside() == outside, "files outside the model dir changed"
    # The next release finds nothing to refuse: the damaged base is gone from objects/.
    assert scene.dev.run_once().returncode == 0


def test_damaged_shared_group_is_fetched_again(scene: Scene) -> None:
    """A flipped byte in a group file v2 shares with the live v1 (an in-place edit: its stat
    changed) is noticed before v2 reuses it; v2 gets a fresh, verified copy."""
    scene.release()
    index = current_index(scene.store)
    group = shared_group(index, current_index(scene.pub.snapshots["v1"]))
    damage(scene.layout.object_path(group["sha256"]))
    v1_before, outside = tree(scene.layout.version_dir("v1")), scene.outside()

    p = scene.dev.run_once()

    assert p.returncode == 0, p.stderr
    assert "updated v1 -> v2" in p.stdout
    one_warning(p, f"objects/{group['sha256']}", "does not hold the content its name says")
    assert_intact(scene)
    v1, v2 = scene.layout.version_dir("v1"), scene.layout.version_dir("v2")
    # v2's copy is a new file: v1 (the previous live version) is left exactly as it was.
    assert (v1 / group["file"]).stat().st_ino != (v2 / group["file"]).stat().st_ino
    assert tree(v1) == v1_before, "the previous version changed"
    assert scene.outside() == outside, "files outside the model dir changed"


def test_edited_object_with_a_recorded_stat_is_fetched_again(scene: Scene) -> None:
    """The cheap proof end to end: after v1 -> v2 the table in .deltaship/ vouches for every
    object; an in-place edit of a group v3 reuses from v2 changes its mtime, so it is re-hashed,
    found damaged and fetched again."""
    scene.release("v2")
    scene.dev.update("v2")
    stamps = json.loads(scene.layout.stamps_file.read_text())
    assert set(stamps) == scene.layout.object_shas(), "not every object has a recorded stat"
    scene.release("v3")
    group = shared_group(current_index(scene.store), current_index(scene.pub.snapshots["v2"]))
    damage(scene.layout.object_path(group["sha256"]))
    v2_before, outside = tree(scene.layout.version_dir("v2")), scene.outside()

    p = scene.dev.run_once()

    assert p.returncode == 0, p.stderr
    assert "updated v2 -> v3" in p.stdout
    one_warning(p, f"objects/{group['sha256']}", "does not hold the content its name says")
    assert_intact(scene, "v3")
    assert tree(scene.layout.version_dir("v2")) == v2_before, "the previous version changed"
    assert scene.outside() == outside, "files outside the model dir changed"


# -- point 6, unit: what the cheap proof covers -------------------------------------------------


@pytest.fixture
def layout(tmp_path: Path) -> DeviceLayout:
    layout = DeviceLayout(tmp_path / "m")
    layout.prepare()
    return layout


def _commit(layout: DeviceLayout, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    with layout.staged_object() as tmp:
        tmp.write_bytes(data)
        layout.commit_object(tmp, sha)
    layout.save_stamps()
    return sha


def test_stamps_decide_what_is_rehashed(layout: DeviceLayout,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _commit(layout, b"a" * 4096), _commit(layout, b"b" * 4096)
    hashed: list[str] = []
    real = hash_file

    def counting(path: Path, block: int = 1 << 22) -> str:
        hashed.append(path.name)
        return real(path, block)

    monkeypatch.setattr("edge_agent.layout.hash_file", counting)
    fresh = DeviceLayout(layout.root)  # reads the saved table
    assert fresh.damaged_objects({a}, {b}) == set()
    assert hashed == [b], "a reused object with its recorded stat is not re-hashed; a base is"

    damage(layout.object_path(a))  # an in-place write changes mtime: re-hashed, caught
    hashed.clear()
    assert DeviceLayout(layout.root).damaged_objects({a}, set()) == {a}
    assert hashed == [a]


def test_same_stat_damage_is_caught_for_bases_only(layout: DeviceLayout) -> None:
    """What the stat proof does not cover (docs/FORMAT.md §10): content changed with the
    mtime put back (bit rot, a deliberate hand). Bases are re-hashed anyway; `verify` re-hashes
    everything."""
    a = _commit(layout, b"a" * 4096)
    damage(layout.object_path(a), keep_stat=True)
    assert DeviceLayout(layout.root).damaged_objects({a}, set()) == set()
    assert DeviceLayout(layout.root).damaged_objects(set(), {a}) == {a}


@pytest.mark.parametrize("table", [b"", b"not json", b"[1]", b'{"x": [1, 2]}', b'{"x": "y"}'])
def test_an_unreadable_table_only_means_rehashing(layout: DeviceLayout, table: bytes) -> None:
    a = _commit(layout, b"a" * 4096)
    layout.stamps_file.write_bytes(table)
    damage(layout.object_path(a), keep_stat=True)
    assert DeviceLayout(layout.root).damaged_objects({a}, set()) == {a}
    assert DeviceLayout(layout.root).damaged_objects({"0" * 64}, set()) == {"0" * 64}


def _group(name: str, sha: str, full: int, patches: dict[str, int]) -> GroupEntry:
    return GroupEntry(
        name, f"{name}.safetensors", sha, 100, (TensorEntry("t", "U8", (10,)),),
        ObjectRef(f"{name}f".ljust(64, "f"), full, "dspatch"),
        tuple(PatchRef("v0", base, ObjectRef(f"{name}{base[:4]}".ljust(64, "e"), n, "dspatch"))
              for base, n in patches.items()),
    )


def test_planner_takes_a_verified_have_set() -> None:
    """Pure: what a plan takes from the device; without a damaged base it patches from another
    intact base or fetches the full object."""
    b1, b2, kept = "1" * 64, "2" * 64, "3" * 64
    groups = (_group("a", "a" * 64, 1000, {b1: 10, b2: 20}), _group("k", kept, 1000, {}))
    index = ReleaseIndex("v2", datetime.now(UTC), groups, (), repository_id="0" * 32)
    plan = make_plan(index, {b1, b2, kept})
    assert local_inputs(plan, {b1, b2, kept}) == ({kept}, {b1})
    assert make_plan(index, {b2, kept}).groups[0].base_sha256 == b2
    assert make_plan(index, {kept}).groups[0].kind == "full"


# -- point 7: nothing written beyond the index's declared length; every size field capped -------


def _bomb(output: int, chunk: int) -> bytes:
    """A valid full-object container whose target is ``output`` zero bytes (one U8 tensor),
    in ``chunk``-byte chunks: a few kB that decode to ``output`` bytes."""
    header = f'{{"x":{{"dtype":"U8","shape":[{output}],"data_offsets":[0,{output}]}}}}'
    raw = header.encode() + b" " * (-len(header) % 8)
    builder = ContainerBuilder(None, chunk, 3)
    builder.set_prefix(len(raw).to_bytes(8, "little") + raw)
    builder.add_tensor("x", None, 0)
    frames: dict[int, bytes] = {}
    for start in range(0, output, chunk):
        n = min(chunk, output - start)
        if n not in frames:
            c = zstandard.ZstdCompressor(level=3).compressobj(size=n)
            parts = [c.compress(bytes(min(1 << 20, n - i))) for i in range(0, n, 1 << 20)]
            frames[n] = b"".join(parts) + c.flush()
        builder.add_chunk("zstd", [frames[n]])

    class Buf:
        def __init__(self) -> None:
            self.parts: list[bytes] = []

        def write(self, data: bytes, /) -> int:
            self.parts.append(data)
            return len(data)

    out = Buf()
    builder.finish("0" * 64, 8 + len(raw) + output, out)
    return b"".join(out.parts)


def _serve_bomb(scene: Scene, bomb: bytes) -> Signed:
    """Re-sign v2's index with the test key so that one group's only object is ``bomb``."""
    scene.release()
    digest, length = put_object(scene.store, bomb)
    chosen: Signed = {}

    def edit(index: Signed) -> None:
        g = patched_group(index)
        g["patches"] = []
        g["full"] = {"sha256": digest, "length": length, "encoding": "dspatch"}
        chosen.update(g)

    forge_index(scene.store, scene.pub.signing_keys(), edit)
    return chosen


@dataclass(frozen=True)
class Measured:
    proc: subprocess.CompletedProcess[str]
    peak_rss: int  # bytes


def _run_measured(dev: Device, report_dir: Path) -> Measured:
    """``run --once`` under a tiny parent that reports the child's peak RSS (ru_maxrss of
    its only child) into ``report_dir`` (outside the scene)."""
    report = report_dir / "rss"
    code = ("import resource, subprocess, sys\n"
            "p = subprocess.run(sys.argv[2:])\n"
            "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
            "open(sys.argv[1], 'w').write(str(rss * 1024))\n"
            "sys.exit(p.returncode)\n")
    cmd = [sys.executable, "-c", code, str(report), str(BIN / "deltaship-agent"), "run",
           "--once", "--config", str(dev.config)]
    p = subprocess.run(cmd, cwd=dev.model_dir.parent, env=dev.env, text=True,
                       capture_output=True, timeout=300)
    return Measured(p, int(report.read_text()))


@pytest.fixture
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("rss")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _files_over(top: Path, limit: int) -> list[str]:
    return [str(p) for p in top.rglob("*") if p.is_file() and p.stat().st_size > limit]


@pytest.mark.parametrize(("chunk", "needles"), [
    (1 << 30, ("chunk_bytes", "over the cap")),
    (4 << 20, ("differs from the release index",)),
], ids=["1GiB-chunks", "4MiB-chunks"])
def test_patch_expanding_past_its_declared_length_is_refused(
    scene: Scene, device_v1: Device, report_dir: Path, tmp_path: Path, chunk: int,
    needles: tuple[str, ...],
) -> None:
    """A validly signed index whose object for a group decodes to 1 GiB of zeros (the index
    still declares the group's real length): exit 3, one line, live model unchanged, no big
    file, and peak RSS no higher than that of a clean update of the same model."""
    # A clean update of the same device copy, measured the same way: the memory baseline.
    clean_store = tmp_path / "clean-store"
    shutil.copytree(scene.pub.snapshots["v2"], clean_store)
    clean = device_v1.clone(tmp_path / "clean-dev", f"file://{clean_store}")
    baseline = _run_measured(clean, report_dir)
    assert baseline.proc.returncode == 0, baseline.proc.stderr
    shutil.rmtree(tmp_path / "clean-dev")
    shutil.rmtree(clean_store)
    (tmp_path / "clean-dev.toml").unlink()

    output = 1 << 30
    group = _serve_bomb(scene, _bomb(output, chunk))
    model_size = sum(g["length"] for g in current_index(scene.store)["groups"])
    before = scene.dev.snapshot(scene.tmp)

    run = _run_measured(scene.dev, report_dir)

    refused(run.proc, group["name"], *needles, code=3)
    untouched(scene.dev, before, scene.pub.content["v1"] | scene.pub.content["v2"],
              around=scene.tmp)
    assert not _files_over(scene.dev.model_dir, model_size), "a big file was written"
    assert not any(scene.layout.tmp.iterdir()), "a patch output was left behind"
    # Memory does not grow with what the container claims: well under the 1 GiB output,
    # and within the clean update's peak plus a few times the model's size.
    assert run.peak_rss < baseline.peak_rss + 4 * model_size + MAX_CHUNK_BYTES, (
        run.peak_rss, baseline.peak_rss)
    assert run.peak_rss < output // 4


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("length", MAX_CONTENT_LENGTH + 1, "length"),
    ("full-length", MAX_CONTENT_LENGTH + 1, "full.length"),
    ("tensors", MAX_GROUP_TENSORS + 1, "tensors lists more than"),
])
def test_index_size_fields_over_their_caps_are_refused(
    scene: Scene, field: str, value: int, needle: str
) -> None:
    """A validly signed index naming sizes past the documented caps (docs/FORMAT.md §6) is
    refused while parsing, before any planning or allocation."""
    scene.release()

    def edit(index: Signed) -> None:
        g = patched_group(index)
        if field == "length":
            g["length"] = value
        elif field == "full-length":
            g["full"]["length"] = value
        else:
            t = g["tensors"][0]
            g["tensors"] = [dict(t, name=f"t{i}") for i in range(value)]

    forge_index(scene.store, scene.pub.signing_keys(), edit)
    before = scene.dev.snapshot(scene.tmp)
    p = scene.dev.run_once()
    refused(p, needle, ("over the cap", "more than"), code=3)
    untouched(scene.dev, before, scene.pub.content["v1"] | scene.pub.content["v2"],
              around=scene.tmp)


def test_entry_caps_are_checked_while_parsing() -> None:
    with pytest.raises(OversizeError, match="over the cap"):
        ObjectRef.from_dict({"sha256": "a" * 64, "length": MAX_CONTENT_LENGTH + 1,
                             "encoding": "zstd"}, "o")
    with pytest.raises(OversizeError, match="dimensions"):
        TensorEntry.from_dict({"name": "t", "dtype": "U8", "shape": [1] * 17}, "t")
    assert ObjectRef.from_dict({"sha256": "a" * 64, "length": MAX_CONTENT_LENGTH,
                                "encoding": "zstd"}, "o").length == MAX_CONTENT_LENGTH
