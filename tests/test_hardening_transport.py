"""Hostile and slow HTTP stores against real agent processes (issue 9: points 2, 3 and 13).

Every test starts from a device at v1 (a copy of one that a clean ``deltaship-agent run --once``
installed), lets :class:`devtools.hostile_http.HostileServer` serve v2's store while it
misbehaves on purpose, runs real ``deltaship-agent`` processes and checks:

* the exact exit code, and exactly one ``deltaship-agent: error:`` line on stderr, the last,
  with no traceback (the lines before it are the retry warnings of the log);
* the live model unchanged (``current`` and the sha256 of every file under it), no entry
  appearing in or vanishing from the model directory, nothing written outside it;
* the failure recorded in the agent state (``status``);
* for hangs: the time the agent took, bounded by a multiple of the configured limits plus the
  retry backoff plus process start-ups measured in the same run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from devtools.hostile_http import HostileServer, Misbehaviour, ThreadedServer
from edge_agent.config import load_config, save_config
from edge_agent.layout import DeviceLayout
from manifest.metadata import format_time
from manifest.storage.retry import DEFAULT_RETRY, RetryPolicy

from ._attack_helpers import (
    Device,
    Published,
    Snapshot,
    forge_manifest,
    index_path,
    manifest_of,
    now_utc,
    patch_object,
    publish,
)
from .conftest import BIN, MoEFamily

ERROR = "deltaship-agent: error: "
# The agent's own retry policy with its waits shortened: the same number of tries, the same
# doubling and jitter, but 0.05 s instead of 0.5 s after the first failure (capped at 0.4 s).
# These tests are about what the agent does when it gives up, not about how long it waits in
# between (tests/test_storage_retry.py pins the policy's delays); the default waits would
# add about 12 s of sleep to every run that gives up.
RETRY = RetryPolicy(attempts=DEFAULT_RETRY.attempts, base=0.05, cap=0.4,
                    jitter=DEFAULT_RETRY.jitter)
TRIES = RETRY.attempts
# The most the retry loop sleeps between the tries of one request (no jitter shortens it).
BACKOFF = sum(min(RETRY.cap, RETRY.base * 2**i) for i in range(TRIES - 1))
PREFIX = "store"
# The real agent's entry point with RETRY as its retry policy (read when the store is opened).
AGENT = f"""
import sys
import edge_agent.service as service
from manifest.storage.retry import RetryPolicy
service.DEFAULT_RETRY = RetryPolicy(attempts={RETRY.attempts}, base={RETRY.base},
                                    cap={RETRY.cap}, jitter={RETRY.jitter})
from edge_agent.cli import main
sys.argv[0] = "deltaship-agent"
main()
"""
AGENT_COMMAND = [sys.executable, "-c", AGENT]


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, moe_family: MoEFamily) -> Published:
    return publish(tmp_path_factory.mktemp("h9-transport"),
                   {"v1": moe_family.v1, "v2": moe_family.v2})


@pytest.fixture(scope="module")
def device_v1(published: Published, tmp_path_factory: pytest.TempPathFactory) -> Device:
    work = tmp_path_factory.mktemp("h9-device")
    store = work / "store"
    shutil.copytree(published.snapshots["v1"], store)
    dev = Device(None, published.root, f"file://{store}", work / "dev")
    dev.update("v1")
    return dev


@pytest.fixture(scope="module")
def start_up(device_v1: Device) -> float:
    """Seconds one agent process takes to start and exit here and now (the anchor of bounds)."""
    t0 = time.monotonic()
    device_v1.agent("status", "--config", device_v1.config)
    return time.monotonic() - t0


@dataclass
class Scene:
    pub: Published
    store: Path  # the directory the hostile server serves: v2 released
    dev: Device
    served: ThreadedServer
    tmp: Path

    @property
    def server(self) -> HostileServer:
        return self.served.server

    def configure(self, **changes: Any) -> None:
        cfg = load_config(self.dev.config)
        save_config(dataclasses.replace(cfg, **changes), self.dev.config)

    def requests(self, key: str) -> list[Any]:
        return [r for r in self.server.requests if r.path == f"/{PREFIX}/{key}"]

    def run(self, *args: object, timeout: float = 300) -> tuple[subprocess.CompletedProcess[str],
                                                                 float]:
        t0 = time.monotonic()
        p = self.dev.agent(*args, "--config", self.dev.config, check=False, timeout=timeout)
        return p, time.monotonic() - t0


@pytest.fixture
def scene(published: Published, device_v1: Device, tmp_path: Path) -> Iterator[Scene]:
    store = tmp_path / "store"
    shutil.copytree(published.snapshots["v2"], store)
    with ThreadedServer(HostileServer(store, PREFIX)) as served:
        dev = device_v1.clone(tmp_path / "dev", served.url)
        dev.command = AGENT_COMMAND
        assert dev.current() == "v1"
        yield Scene(published, store, dev, served, tmp_path)


def error_line(p: subprocess.CompletedProcess[str], code: int, *patterns: str) -> str:
    """Exit ``code``; one error line, the last on stderr, matching ``patterns``; no traceback."""
    assert "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1, f"exit {p.returncode}; expected one {ERROR!r} line:\n{p.stderr}"
    assert p.stderr.rstrip().splitlines()[-1] == errors[0], p.stderr
    assert p.returncode == code, f"exit {p.returncode}, expected {code}: {errors[0]}"
    for pattern in patterns:
        assert re.search(pattern, errors[0]), f"{pattern!r} not in {errors[0]!r}"
    return errors[0][len(ERROR):]


def unchanged(scene: Scene, before: Snapshot, recorded: str | None = None) -> None:
    """The live model and everything outside the model directory are as before; the failure
    (matching ``recorded``) is in the agent state."""
    after = scene.dev.snapshot(scene.tmp)
    assert after.current == before.current == "v1"
    assert after.live == before.live, "the live version changed"
    assert after.top == before.top, "an entry appeared in or vanished from the model dir"
    assert after.outside == before.outside, "files outside the model dir changed"
    if recorded is not None:
        error = scene.dev.state()["last_error"] or ""
        assert re.search(recorded, error), f"{recorded!r} not recorded: {error!r}"


def hang_bound(per_try: float, start_up: float) -> float:
    """What a run that gives up on one request may take: every try at its limit, the longest
    backoff, and process start-up (generous multiples: the machine is shared)."""
    return 2 * (TRIES * per_try + BACKOFF) + 10 * start_up + 10


# -- 2. answers that make no sense are transport errors, never crashes ------------------------


def _index_key(scene: Scene) -> str:
    """The key of the index form the device at v1 fetches: the delta from its own index."""
    ref = manifest_of(scene.store)["current"]["index"]
    held = DeviceLayout(scene.dev.model_dir).index_pin("v1").sha256
    (delta,) = [d for d in ref.get("deltas", []) if d["from"] == held]
    assert delta["sha256"] != index_path(scene.store).name  # not the raw index
    return f"objects/{delta['sha256']}"


def _object_key(scene: Scene) -> str:
    return f"objects/{patch_object(scene.store, 'v1')}"


NONSENSE = {
    # what the key is, what the server answers, what the error line says
    "index-304": (_index_key, Misbehaviour(status=304), "304 Not Modified to a request"),
    "object-304": (_object_key, Misbehaviour(status=304), "304 Not Modified to a request"),
    "object-206-5000-digits": (
        _object_key, Misbehaviour(status=206, headers={"Content-Range": "bytes 0-9/" + "9" * 5000}),
        "malformed Content-Range"),
    "object-206-backwards": (
        _object_key, Misbehaviour(status=206, headers={"Content-Range": "bytes 9-0/10"}),
        "malformed Content-Range"),
    "index-206-elsewhere": (
        _index_key, Misbehaviour(status=206, headers={"Content-Range": "bytes 5-9/10"}),
        "asked for the whole document and got bytes 5-"),
    "object-content-length-5000-digits": (
        _object_key, Misbehaviour(headers={"Content-Length": "9" * 5000}), "failed"),
}


@pytest.mark.parametrize("case", NONSENSE)
def test_nonsense_answer_is_a_transport_error(scene: Scene, case: str) -> None:
    key_of, what, says = NONSENSE[case]
    key = key_of(scene)
    scene.server.misbehave(re.escape(key) + "$", what)
    before = scene.dev.snapshot(scene.tmp)
    p, _ = scene.run("run", "--once")
    line = error_line(p, 4, re.escape(says), f"gave up after {TRIES} tries", "retry later")
    assert key in line
    unchanged(scene, before, re.escape(says))
    assert len(scene.requests(key)) == TRIES  # retried, then given up
    # The store heals: the same device updates.
    scene.server.behave()
    p, _ = scene.run("run", "--once")
    assert p.returncode == 0, p.stderr
    assert scene.dev.current() == "v2"


def test_manifest_304_without_a_copy(scene: Scene) -> None:
    """The device lost its copy of the manifest; the store answers 304 anyway."""
    DeviceLayout(scene.dev.model_dir).manifest_copy.unlink()
    scene.server.misbehave(r"^manifest\.json$", Misbehaviour(status=304))
    before = scene.dev.snapshot(scene.tmp)
    p, _ = scene.run("run", "--once")
    error_line(p, 4, "manifest.json answered 304 Not Modified to a request that was not "
               "conditional", f"gave up after {TRIES} tries")
    unchanged(scene, before, "304")
    assert [r.if_none_match for r in scene.requests("manifest.json")] == [None] * TRIES


def test_service_survives_nonsense_and_records_it(scene: Scene) -> None:
    """In service mode a transport error is recorded and the service keeps polling."""
    scene.configure(interval=1.0)
    scene.server.misbehave(re.escape(_index_key(scene)) + "$", Misbehaviour(status=304))
    before = scene.dev.snapshot(scene.tmp)
    proc = subprocess.Popen([*AGENT_COMMAND, "run", "--config", scene.dev.config],
                            env=scene.dev.env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(scene.requests(_index_key(scene))) < 2 * TRIES:  # two cycles given up
            assert proc.poll() is None, f"the service died ({proc.returncode})"
            assert time.monotonic() < deadline, "the service stopped polling"
            time.sleep(0.1)
        assert proc.poll() is None
        unchanged(scene, before, "304 Not Modified")
        assert scene.dev.state()["last_result"] == "failed"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err


BUGGY_AGENT = """
import sys
import edge_agent.updater as updater

async def _cycle(self, source):
    raise RuntimeError("injected bug")

updater.Agent._cycle = _cycle
from edge_agent.cli import main
sys.argv[0] = "deltaship-agent"
main()
"""


def test_service_backs_off_after_a_bug(scene: Scene) -> None:
    """An unexpected exception in a cycle: logged with its traceback, recorded, and the service
    waits its poll interval instead of dying (systemd would restart it in a tight loop)."""
    interval = 1.0
    scene.configure(interval=interval)
    proc = subprocess.Popen([sys.executable, "-c", BUGGY_AGENT, "run", "--config",
                             scene.dev.config], env=scene.dev.env, stderr=subprocess.PIPE,
                            text=True)
    t0 = time.monotonic()
    try:
        deadline = t0 + 120
        while "injected bug" not in (scene.dev.state().get("last_error") or ""):
            assert proc.poll() is None, f"the service died ({proc.returncode})"
            assert time.monotonic() < deadline, "the bug was never recorded"
            time.sleep(0.1)
        first = time.monotonic()
        time.sleep(4 * interval)
        assert proc.poll() is None, "the service died after a bug"
        watched = time.monotonic() - first
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    state = scene.dev.state()
    assert "unexpected error (a bug" in state["last_error"] and state["last_result"] == "failed"
    cycles = err.count("unexpected error in an update cycle (a bug)")
    assert err.count("RuntimeError: injected bug") == cycles  # each with its traceback
    # Jitter shortens an interval to 0.8 of it at most: no tight loop.
    assert 2 <= cycles <= watched / (0.8 * interval) + 2, (cycles, watched)


# -- 3. slow stores: deadlines, minimum rate, expiry, and the operator's lock -------------------


def test_slow_manifest_hits_its_deadline(scene: Scene, start_up: float) -> None:
    """The issue's drip: the manifest at one byte every 2 s (the 64 KiB cap allows days)."""
    deadline = 1.0
    scene.configure(document_deadline=deadline)
    scene.server.misbehave(r"^manifest\.json$", Misbehaviour(drip=(1, 2.0)))
    before = scene.dev.snapshot(scene.tmp)
    p, took = scene.run("run", "--once")
    error_line(p, 4, rf"took longer than its {deadline:g} s deadline",
               f"gave up after {TRIES} tries")
    print(f"\nslow manifest: gave up after {took:.1f} s")
    assert took < hang_bound(deadline, start_up), took
    unchanged(scene, before, "deadline")
    assert len(scene.requests("manifest.json")) == TRIES


def test_slow_object_is_abandoned_and_resumed(scene: Scene, start_up: float) -> None:
    """An object sent at 20 bytes/s, under a minimum of 1 KiB/s over 1 s: each try ends as too
    slow and keeps its bytes; slow tries are no progress, so the agent gives up; later the
    download resumes where it stopped."""
    window = 1.0
    scene.configure(min_rate=1024.0, rate_window=window)
    key = _object_key(scene)
    drip = (2, 0.1)  # 20 bytes/s: the six tries get nowhere near the end of the object
    assert (scene.store / key).stat().st_size > 3 * TRIES * window * drip[0] / drip[1]
    scene.server.misbehave(re.escape(key) + "$", Misbehaviour(drip=drip))
    before = scene.dev.snapshot(scene.tmp)
    p, took = scene.run("run", "--once")
    error_line(p, 4, "too slow", "under the minimum of 1024 bytes/s",
               f"gave up after {TRIES} tries")
    print(f"\nslow object: gave up after {took:.1f} s")
    assert took < hang_bound(window, start_up), took
    unchanged(scene, before, "too slow")
    tries = scene.requests(key)
    assert len(tries) == TRIES
    assert all(r.sent > 0 for r in tries)
    assert [r.range is not None for r in tries] == [False] + [True] * (TRIES - 1)  # resumed
    partial = DeviceLayout(scene.dev.model_dir).download_path(key.rsplit("/", 1)[1])
    have = partial.stat().st_size
    assert 0 < have <= sum(r.sent for r in tries)  # the bytes of the slow tries were kept
    scene.server.behave()
    p, _ = scene.run("run", "--once")
    assert p.returncode == 0 and scene.dev.current() == "v2", p.stderr
    last = scene.requests(key)[-1]
    assert (last.status, last.range) == (206, f"bytes={have}-")


def test_manifest_expiring_during_a_slow_download(scene: Scene, start_up: float) -> None:
    """The manifest is valid when verified, then the objects take until after its expiry: the
    agent checks again with the time after the download and does not switch."""
    # Seconds for the agent to start and verify the manifest: a generous multiple of a start-up
    # measured here and now.
    lead = max(8.0, 6 * start_up)
    expires = now_utc() + timedelta(seconds=lead)
    forge_manifest(scene.store, scene.pub.signing_keys(),
                   lambda m: m.update(expires=format_time(expires)))
    hold = expires.timestamp() + 1.5
    scene.server.misbehave(r"^objects/", Misbehaviour(hold_until=hold, times=1))
    before = scene.dev.snapshot(scene.tmp)
    p, _ = scene.run("run", "--once")
    # Not the first check (that would say nothing of the download): the one before the switch.
    error_line(p, 3, "manifest expired at", "while the update was downloading",
               "nothing was switched")
    unchanged(scene, before, "while the update was downloading")


def _holder_running(scene: Scene, proc: subprocess.Popen[Any]) -> None:
    lock = DeviceLayout(scene.dev.model_dir).lock_file
    deadline = time.monotonic() + 120
    while f"pid {proc.pid}:" not in (lock.read_text() if lock.exists() else ""):
        assert proc.poll() is None, "the agent ended before the test could wait for it"
        assert time.monotonic() < deadline, "the agent never took the lock"
        time.sleep(0.05)


@pytest.mark.parametrize("command", [("rollback",), ("resume",), ("verify", "--repair")])
def test_operator_command_waits_a_bounded_time(scene: Scene, start_up: float,
                                               command: tuple[str, ...]) -> None:
    """A cycle stuck on a slow mirror holds the lock; an operator command waits ``--wait``
    seconds, then says who holds it and what to do (exit 5)."""
    scene.configure(document_deadline=600.0)  # the cycle would hold the lock for long
    scene.server.misbehave(r"^manifest\.json$", Misbehaviour(drip=(1, 2.0)))
    if command[0] == "verify":  # a repair takes the lock only when something is damaged
        live = scene.dev.model_dir / "current"
        victim = next(p for p in sorted(live.resolve().iterdir()) if p.is_file())
        with open(victim, "r+b") as f:
            f.write(b"\0damaged")
    before = scene.dev.snapshot(scene.tmp)
    proc = subprocess.Popen([str(BIN / "deltaship-agent"), "run", "--once", "--config",
                             scene.dev.config], env=scene.dev.env, stderr=subprocess.DEVNULL)
    try:
        _holder_running(scene, proc)
        wait = 1.0
        p, took = scene.run(*command, "--wait", wait)
        error_line(p, 5, f"pid {proc.pid}: deltaship-agent run", f"waiting {wait:g} s",
                   "--wait", "stop the service")
        assert wait <= took < wait + 10 * start_up + 5, took
        status = scene.dev.agent("status", "--config", scene.dev.config)  # never blocked
        assert "v1" in status.stdout
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    after = scene.dev.snapshot(scene.tmp)
    assert after.live == before.live and after.current == "v1"
    assert after.outside == before.outside and after.top == before.top
    assert scene.dev.state()["pinned"] is None


# -- 13. redirects ---------------------------------------------------------------------------


@pytest.fixture
def elsewhere(scene: Scene) -> Iterator[ThreadedServer]:
    """The same store on another port: another origin."""
    with ThreadedServer(HostileServer(scene.store, PREFIX)) as other:
        yield other


def test_redirect_to_another_origin_is_refused(scene: Scene, elsewhere: ThreadedServer) -> None:
    target = f"{elsewhere.url}/{{key}}"
    scene.server.misbehave(r"^manifest\.json$", Misbehaviour(redirect=target))
    before = scene.dev.snapshot(scene.tmp)
    p, _ = scene.run("run", "--once")
    line = error_line(p, 4, "was redirected to", "not followed", "allow_redirect_hosts")
    assert f"{elsewhere.url}/manifest.json" in line
    unchanged(scene, before, "redirected")
    assert elsewhere.server.requests == []  # not a single request went there
    assert len(scene.requests("manifest.json")) == 1  # not retried: asking again won't help

    # Allowed by the configuration, the same redirect is followed and the update goes through.
    scene.configure(allow_redirect_hosts=(f"127.0.0.1:{elsewhere.server.port}",))
    p, _ = scene.run("run", "--once")
    assert p.returncode == 0 and scene.dev.current() == "v2", p.stderr
    assert [r.path for r in elsewhere.server.requests] == [f"/{PREFIX}/manifest.json"]


def test_same_origin_redirect_is_followed(scene: Scene) -> None:
    scene.server.misbehave(r"^objects/", Misbehaviour(redirect=f"/{PREFIX}/{{key}}?moved",
                                                      times=2))
    p, _ = scene.run("run", "--once")
    assert p.returncode == 0 and scene.dev.current() == "v2", p.stderr
    assert [r.status for r in scene.server.requests].count(302) == 2
