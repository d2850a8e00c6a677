"""In-process hot-swap (edge_agent/serving/live.py, weights.py) and the float32 helpers (dtypes.py).

Versions are built on disk by the agent's own DeviceLayout (objects, hard-linked version
directories, atomic switch of ``current``), with data that encodes the version that last changed
each group, so a snapshot that mixed two versions would show it; one test runs the real
publisher and agent processes. Waits poll for a bounded time; no assertion depends on timing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from edge_agent.layout import DeviceLayout
from edge_agent.serving import LiveModel, Tensor, Weights, map_group, read_group, to_float32
from manifest.constants import WEIGHT_INDEX_FILE
from manifest.errors import ModelError
from manifest.metadata import GroupEntry, ObjectRef, ReleaseIndex, TensorEntry
from manifest.safetensors_format import SafetensorsFile, build_header

from .conftest import Cli, MoEFamily
from .test_agent_e2e import Device, _raw, _release, published  # noqa: F401 (fixture)

GROUPS = ["embeddings", "layers.0", *(f"layers.0.experts.{e}" for e in range(4)), "lm_head"]
CHANGES: dict[int, set[str]] = {
    1: set(GROUPS),
    2: {"layers.0.experts.1", "layers.0.experts.3"},
    3: {"layers.0", "layers.0.experts.0"},
    4: {"embeddings", "lm_head"},
    5: {"layers.0.experts.1"},
    6: {"layers.0.experts.2", "layers.0.experts.3"},
}


def tag(version: int, group: str) -> int:
    """The version whose release last changed ``group``: what its tensors hold."""
    return max(k for k in range(1, version + 1) if group in CHANGES[k])


def group_file(group: str, value: int) -> bytes:
    """A canonical group file whose F32 and BF16 tensors are filled with ``value``."""
    tensors = [(f"model.{group}.w", "F32", (4, 8)), (f"model.{group}.b", "BF16", (8,))]
    prefix, _ = build_header(tensors, {"format": "pt"})
    bf16 = struct.pack("<f", value)[2:] * 8
    return prefix + np.full((4, 8), value, dtype="<f4").tobytes() + bf16


class FakeAgent:
    """Releases versions into a model directory exactly as the agent lays them out."""

    def __init__(self, root: Path) -> None:
        self.layout = DeviceLayout(root)
        self.layout.prepare()

    def release(self, version: int, content: Callable[[str], bytes] | None = None) -> str:
        entries = []
        for g in GROUPS:
            data = content(g) if content else group_file(g, tag(version, g))
            sha = hashlib.sha256(data).hexdigest()
            if not self.layout.has_object(sha):
                with self.layout.staged_object() as tmp:
                    tmp.write_bytes(data)
                    self.layout.commit_object(tmp, sha)
            tensors = (TensorEntry(f"model.{g}.w", "F32", (4, 8)),
                       TensorEntry(f"model.{g}.b", "BF16", (8,)))
            entries.append(GroupEntry(g, f"{g}.safetensors", sha, len(data), tensors,
                                      ObjectRef(sha, len(data), "dspatch")))
        index = ReleaseIndex(f"v{version}", datetime.now(UTC), tuple(entries), (),
                             repository_id="0" * 32)
        self.layout.build_version(index, set(GROUPS), {})
        return index.version

    def switch(self, version: str) -> None:
        self.layout.switch(version)


class CountingLoader:
    """The default loader, recording which files it was asked to read."""

    def __init__(self, inner: Callable[[Path], Mapping[str, Tensor]] = map_group) -> None:
        self.inner = inner
        self.paths: list[Path] = []

    def __call__(self, path: Path) -> Mapping[str, Tensor]:
        self.paths.append(path)
        return self.inner(path)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def check_consistent(w: Weights) -> None:
    """Every tensor of ``w`` holds what its version released: no mix of versions."""
    k = int(w.version.removeprefix("v"))
    for g in GROUPS:
        assert (w.tensors[f"model.{g}.w"].numpy() == tag(k, g)).all(), (w.version, g)
        assert (w.tensors[f"model.{g}.b"].numpy() == tag(k, g)).all(), (w.version, g)


@pytest.fixture
def agent(tmp_path: Path) -> FakeAgent:
    fake = FakeAgent(tmp_path / "model")
    for k in CHANGES:
        fake.release(k)
    fake.switch("v1")
    return fake


def test_snapshot_holds_the_current_version(agent: FakeAgent) -> None:
    with LiveModel.open(agent.layout.root) as live:
        w = live.snapshot()
    assert w.version == live.version == "v1"
    assert w.path == agent.layout.version_dir("v1")
    assert set(w.groups) == {f"{g}.safetensors" for g in GROUPS}
    check_consistent(w)
    for g in GROUPS:
        path = w.path / f"{g}.safetensors"
        with SafetensorsFile(path) as st:
            want = {t.name: st.read(t) for t in st.tensors.values()}
        assert {n: bytes(t.raw) for n, t in w.groups[path.name].tensors.items()} == want
        assert {n: bytes(t.raw) for n, t in read_group(path).items()} == want
    emb = w.tensors["model.embeddings.w"]
    assert emb.dtype == "F32" and emb.shape == (4, 8) and emb.raw.readonly
    assert not emb.numpy().flags.writeable


def test_swap_loads_only_changed_groups(agent: FakeAgent) -> None:
    loads = CountingLoader()
    seen: list[str] = []
    with LiveModel.open(agent.layout.root, poll_interval=60, loader=loads) as live:
        assert live.watching  # with a 60 s poll, only a watchdog event can swap in time
        live.subscribe(lambda w: seen.append(w.version))
        w1 = live.snapshot()
        loads.paths.clear()
        agent.switch("v2")
        wait_for(lambda: live.version == "v2")
        w2 = live.snapshot()
    assert seen == ["v2"] and live.last_error is None
    changed = {f"{g}.safetensors" for g in CHANGES[2]}
    assert {p.name for p in loads.paths} == changed and len(loads.paths) == len(changed)
    for file, group in w2.groups.items():
        if file in changed:
            assert group is not w1.groups[file]
        else:
            assert group is w1.groups[file]
            assert all(w2.tensors[n] is t for n, t in w1.groups[file].tensors.items())
    check_consistent(w2)
    # A request still holding v1 keeps reading it after the agent prunes it from disk.
    agent.layout.remove_version("v1")
    assert agent.layout.collect_garbage() > 0
    check_consistent(w1)


def test_readers_never_see_a_mix(agent: FakeAgent) -> None:
    errors: list[BaseException] = []
    seen: set[str] = set()
    latest = [""] * 3  # what each reader saw last
    stop = threading.Event()

    def reader(i: int) -> None:
        while not stop.is_set():
            w = live.snapshot()
            try:
                check_consistent(w)
            except BaseException as e:
                errors.append(e)
                return
            seen.add(w.version)
            latest[i] = w.version

    def all_readers_on(version: str) -> Callable[[], bool]:
        return lambda: bool(errors) or all(v == version for v in latest)

    with LiveModel.open(agent.layout.root, poll_interval=0.05) as live:
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(len(latest))]
        for t in threads:
            t.start()
        for version in ["v2", "v3", "v4", "v5", "v6", "v3", "v6"]:  # with a rollback
            agent.switch(version)
            wait_for(all_readers_on(version))
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert seen == {f"v{k}" for k in CHANGES}


def test_polling_without_watchdog(agent: FakeAgent) -> None:
    with LiveModel.open(agent.layout.root, poll_interval=0.05, watch=False) as live:
        assert not live.watching
        agent.switch("v4")
        wait_for(lambda: live.version == "v4")
        check_consistent(live.snapshot())


def _truncated(agent: FakeAgent) -> str:
    return agent.release(7, lambda g: group_file(g, 7)[: -5 if g == "lm_head" else None])


def _missing(agent: FakeAgent) -> str:
    version = agent.release(7, lambda g: group_file(g, 7))
    (agent.layout.version_dir(version) / "lm_head.safetensors").unlink()
    return version


def _bad_index(agent: FakeAgent) -> str:
    version = agent.release(7, lambda g: group_file(g, 7))
    index = agent.layout.version_dir(version) / WEIGHT_INDEX_FILE
    doc = json.loads(index.read_text())
    doc["weight_map"]["model.lm_head.extra"] = "lm_head.safetensors"
    index.write_text(json.dumps(doc))
    return version


@pytest.mark.parametrize(("breaks", "message"), [
    (_truncated, "lm_head.safetensors: not a valid safetensors file: tensor data ends at"),
    (_missing, "lm_head.safetensors: No such file or directory"),
    (_bad_index, "lm_head.safetensors: no tensor 'model.lm_head.extra'"),
])
def test_broken_version_keeps_the_old_snapshot(
    agent: FakeAgent, breaks: Callable[[FakeAgent], str], message: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = breaks(agent)
    caplog.set_level(logging.INFO, logger="edge_agent.serving.live")
    with LiveModel.open(agent.layout.root, poll_interval=0.02) as live:
        agent.switch(broken)
        wait_for(lambda: live.last_error is not None)
        assert isinstance(live.last_error, ModelError) and message in str(live.last_error)
        assert live.version == "v1"
        check_consistent(live.snapshot())
        agent.switch("v1")  # the agent rolls back: the live version is what current names
        wait_for(lambda: live.last_error is None)
        agent.switch("v3")
        wait_for(lambda: live.version == "v3")
    errors = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.ERROR and r.name.startswith("edge_agent.serving")]
    assert len(errors) == 1 and errors[0].startswith(f"cannot load versions/{broken}, still "
                                                     "serving v1: ")


def test_watchdog_shutdown_race_is_not_logged_as_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # watchdog 7 logs this when an event arrives while LiveModel.close() stops the observer
    # (seen once in CI); it is harmless there and must not reach a model server's error log.
    caplog.set_level(logging.INFO)
    inotify_log = logging.getLogger("watchdog.observers.inotify")
    inotify_log.error("InotifyEmitter.queue_events() called when the thread is inactive")
    inotify_log.error("some other inotify failure")
    assert [r.getMessage() for r in caplog.records] == ["some other inotify failure"]


def test_open_without_a_current_version(tmp_path: Path) -> None:
    DeviceLayout(tmp_path).prepare()
    with pytest.raises(ModelError, match="current does not name a version"):
        LiveModel.open(tmp_path)


def test_agent_update_swaps_only_changed_groups(
    cli: Cli, published: tuple[str, Path], release_key: Path,  # noqa: F811
    moe_family: MoEFamily, tmp_path: Path,
) -> None:
    """Real publisher and agent processes; the serving side loads only the trained experts."""
    store, root = published
    _release(cli, store, moe_family.v1, "v1", release_key)
    dev = Device(cli, root, store, tmp_path / "dev")
    dev.agent("run", "--once")
    loads = CountingLoader()
    with LiveModel.open(dev.model_dir, loader=loads, poll_interval=0.2) as live:
        w1 = live.snapshot()
        loads.paths.clear()
        _release(cli, store, moe_family.v2, "v2", release_key)
        dev.agent("run", "--once")
        wait_for(lambda: live.version == "v2")
        w2 = live.snapshot()

    def shas(version: str) -> dict[str, str]:
        index = json.loads(DeviceLayout(dev.model_dir).load_index_bytes(version))
        return {g["file"]: g["sha256"] for g in index["groups"]}

    changed = {f for f, sha in shas("v2").items() if shas("v1")[f] != sha}
    assert 0 < len(changed) < len(w2.groups)
    assert sorted(p.name for p in loads.paths) == sorted(changed)
    assert {n: bytes(t.raw) for n, t in w2.tensors.items()} == _raw(moe_family.v2)
    assert {n: bytes(t.raw) for n, t in w1.tensors.items()} == _raw(moe_family.v1)


# -- dtypes -----------------------------------------------------------------------------------


def decode(bits: int, exponent_bits: int, mantissa_bits: int, bias: int, *, ieee: bool) -> float:
    """A sign/exponent/mantissa bit pattern's value, per IEEE 754 and the OCP FP8 spec."""
    sign = -1.0 if bits >> (exponent_bits + mantissa_bits) else 1.0
    e = (bits >> mantissa_bits) & ((1 << exponent_bits) - 1)
    m = bits & ((1 << mantissa_bits) - 1)
    if e == (1 << exponent_bits) - 1:
        if ieee:
            return sign * math.inf if m == 0 else math.nan
        if m == (1 << mantissa_bits) - 1:  # E4M3: no infinities, NaN only at S.1111.111
            return math.nan
    if e == 0:
        return sign * math.ldexp(m, 1 - bias - mantissa_bits)
    return sign * math.ldexp((1 << mantissa_bits) + m, e - bias - mantissa_bits)


def assert_exact(got: np.ndarray, want: list[float]) -> None:
    """Same float32 bit patterns (signed zeros included), NaN at the same places."""
    expected = np.array(want, dtype=np.float64).astype(np.float32)
    assert got.dtype == np.float32 and got.shape == expected.shape
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))


def all_patterns(width: int) -> bytes:
    return np.arange(1 << (8 * width), dtype=f"<u{width}").tobytes()


def test_bf16_is_the_high_half_of_float32() -> None:
    got = to_float32(all_patterns(2), "BF16", (1 << 16,))
    want = b"".join(b"\0\0" + struct.pack("<H", b) for b in range(1 << 16))
    # Bit for bit, NaN payloads included (a round trip through Python floats would quiet them).
    assert np.array_equal(got.view(np.uint32), np.frombuffer(want, "<u4"))


def test_f16_all_patterns() -> None:
    got = to_float32(all_patterns(2), "F16", (256, 256))
    want = [decode(b, 5, 10, 15, ieee=True) for b in range(1 << 16)]
    assert_exact(got.reshape(-1), want)
    with np.errstate(invalid="ignore"):  # numpy keeps signalling NaNs, float32() flags them
        numpy_f16 = np.frombuffer(all_patterns(2), "<f2").astype(np.float64).tolist()
        assert_exact(got.reshape(-1), numpy_f16)


@pytest.mark.parametrize(("dtype", "layout", "anchors"), [
    ("F8_E4M3", (4, 3, 7, False), {0x7E: 448.0, 0x78: 256.0, 0x01: 2.0**-9, 0x80: -0.0}),
    ("F8_E5M2", (5, 2, 15, True), {0x7B: 57344.0, 0x7C: math.inf, 0xFC: -math.inf,
                                   0x01: 2.0**-16}),
])
def test_f8_all_patterns(dtype: str, layout: tuple[int, int, int, bool],
                         anchors: dict[int, float]) -> None:
    e, m, bias, ieee = layout
    got = to_float32(all_patterns(1), dtype, (16, 16)).reshape(-1)
    assert_exact(got, [decode(b, e, m, bias, ieee=ieee) for b in range(256)])
    for bits, value in anchors.items():
        assert got[bits] == value and math.copysign(1, got[bits]) == math.copysign(1, value)
    nan = {b for b in range(256) if math.isnan(got[b])}
    assert nan == ({0x7F, 0xFF} if dtype == "F8_E4M3" else {0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF})


def test_e8m0_scales() -> None:
    got = to_float32(all_patterns(1), "F8_E8M0", (256,))
    assert_exact(got, [math.ldexp(1.0, b - 127) for b in range(255)] + [math.nan])


def test_to_float32_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="needs 6 bytes, got 4"):
        to_float32(b"\0" * 4, "BF16", (3,))
    with pytest.raises(ValueError, match="no float32 conversion"):
        to_float32(b"\0" * 4, "F32", (1,))
    assert to_float32(b"", "F8_E4M3", (0, 5)).shape == (0, 5)


def test_refresh_reloads_files_replaced_in_place(agent: FakeAgent) -> None:
    """`verify --repair` relinks a damaged file under the same name: a refresh (the server's
    SIGHUP) reloads that group only; a refresh that finds nothing changed swaps nothing."""
    loader = CountingLoader()
    with LiveModel.open(agent.layout.root, loader=loader, watch=False,
                        poll_interval=60) as live:
        before = live.snapshot()
        loader.paths.clear()
        live.refresh()
        time.sleep(0.3)
        assert live.snapshot() is before and loader.paths == []
        path = before.path / "layers.0.experts.1.safetensors"
        tmp = path.with_suffix(".new")
        tmp.write_bytes(group_file("layers.0.experts.1", 42))
        os.replace(tmp, path)  # a new inode under the same name
        live.refresh()
        wait_for(lambda: live.snapshot() is not before)
        after = live.snapshot()
    assert loader.paths == [path]
    assert (after.tensors["model.layers.0.experts.1.w"].numpy() == 42).all()
    assert all(after.groups[f] is g for f, g in before.groups.items() if f != path.name)


def test_a_version_switched_away_from_while_loading_is_never_published(
        agent: FakeAgent) -> None:
    """The agent switches back (a failed health check) while the server still loads: the
    abandoned version must not go live, not even briefly."""
    seen: list[str] = []
    started = threading.Event()

    def slow_check(w: Weights) -> None:
        if w.version == "v2":
            started.set()
            time.sleep(0.5)

    with LiveModel.open(agent.layout.root, check=slow_check, poll_interval=0.05) as live:
        live.subscribe(lambda w: seen.append(w.version))
        agent.switch("v2")
        assert started.wait(5)
        agent.switch("v1")
        time.sleep(1.0)
        assert live.version == "v1"
    assert "v2" not in seen
