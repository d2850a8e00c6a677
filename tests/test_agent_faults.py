"""The edge agent under faults, with real processes: HTTP store, SIGKILL, bad servers, full disk.

* An HTTP store end to end: releases published with the real ``deltaship-publish`` into a
  directory served over plain HTTP on 127.0.0.1; bytes are counted at the server (and by a TCP
  proxy for the raw cost of an unchanged poll), never by the agent.
* SIGKILL at seeded random instants of ``deltaship-agent run --once`` (download, apply, switch,
  clean-up), the crash invariants checked from outside right after every kill, then a restart
  that must end on the complete, verified release.
* A fault-injecting HTTP server (:mod:`devtools.faulty_http`): 500s, 503 + Retry-After, resets
  and truncations mid-body, Range ignored, and a server that never recovers.
* A full disk: a small tmpfs (as root, or in a user namespace), the pre-download free-space
  check and a real ENOSPC in the middle of a download.

Set DELTASHIP_FAULT_SEED to replay other kill instants (the seed is printed on failure).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devtools import modelgen
from devtools.faulty_http import Faults, Served
from tests._agent_checks import (
    BIN,
    Dev,
    Hasher,
    Release,
    agent_env,
    assert_same_model,
    check_layout,
    leftovers,
    store_releases,
)
from tests._served_store import ServedStore

from .conftest import MoEFamily

SEED = int(os.environ.get("DELTASHIP_FAULT_SEED", "20261123"))
MiB = 1 << 20
ERROR_PREFIX = "deltaship-agent: error:"
PLAN_RE = re.compile(r"plan for (\S+): download (\d+) bytes \(full download: (\d+)\)")


# -- publishing ----------------------------------------------------------------------------


def publish(*args: object) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / "deltaship-publish"), *map(str, args)]
    p = subprocess.run(cmd, env=agent_env(), text=True, capture_output=True, timeout=300)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


def new_store(d: Path) -> tuple[Path, Path, Path]:
    """A local-directory store with a trust root; returns (store, root.json, key)."""
    publish("keygen", "--out", d / "keys", "--name", "release")
    key = d / "keys" / "release.key"
    store = d / "store"
    store.mkdir()
    publish("init", "--store", store, "--key", key, "--out", d / "root.json")
    return store, d / "root.json", key


def release(store: Path, model: Path, version: str, key: Path) -> dict[str, Any]:
    out = publish("release", model, "--store", store, "--version", version, "--key", key,
                  "--json", "--cache-dir", store.parent / "publisher-cache").stdout
    return json.loads(out)  # type: ignore[no-any-return]


def base_download(summary: dict[str, Any], base: str | None) -> int:
    """What the release summary says a device at ``base`` downloads."""
    if base is None:
        return summary["full_download_bytes"]  # type: ignore[no-any-return]
    return next(b["download_bytes"] for b in summary["bases"] if b["version"] == base)


# -- what a run cost at the server -----------------------------------------------------------


def object_bytes(reqs: list[Served], exclude: set[str]) -> int:
    """Body bytes the server sent for objects/ other than the release indexes."""
    return sum(r.sent for r in reqs
               if "/objects/" in r.path and r.path.rsplit("/", 1)[1] not in exclude)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith(ERROR_PREFIX)]


def assert_one_error_line(p: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert p.returncode == code, f"exit {p.returncode}, expected {code}:\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    errors = error_lines(p.stderr)
    assert len(errors) == 1, p.stderr
    assert p.stderr.rstrip().splitlines()[-1] == errors[0].rstrip(), p.stderr
    for w in words:
        assert re.search(w, errors[0], re.IGNORECASE), f"{w!r} not in {errors[0]!r}"
    return errors[0]


def finished_ok(dev: Dev, releases: dict[str, Release], version: str) -> None:
    """``current`` is the release, complete and verified (by us and by the agent), no debris."""
    assert check_layout(dev.model_dir, releases, {version}) == version
    out = dev.run("verify").stdout
    assert f"{version}: every file matches its signed sha256" in out
    assert leftovers(dev.model_dir) == []


# -- 1. an HTTP store end to end -------------------------------------------------------------


@pytest.mark.slow  # scheduled first (tests/conftest.py)
def test_http_store_end_to_end(moe_family: MoEFamily, tmp_path: Path) -> None:
    store, root, key = new_store(tmp_path)
    models = {"v1": moe_family.v1, "v2": moe_family.v2, "v3": moe_family.v3,
              "v4": moe_family.v4}
    summaries: dict[str, dict[str, Any]] = {}
    with ServedStore(store, "deltaship/fleet") as served:

        def update(dev: Dev, version: str, base: str | None) -> None:
            rels = store_releases(store)
            indexes = {r.index_sha256 for r in rels.values()}
            indexes |= {f for r in rels.values() for f in r.index_forms}
            mark = served.mark()
            out = dev.run("run", "--once", "-v")
            reqs, _ = served.since(mark)
            assert f"-> {version}" in out.stdout
            plan = PLAN_RE.search(out.stderr)
            assert plan and plan[1] == version, out.stderr
            status = dev.status()
            assert status["current"] == version and status["plan"] is None
            at_server = object_bytes(reqs, indexes)
            expected = base_download(summaries[version], base)
            # What crossed the wire = the plan = what the agent reports = the release summary.
            assert at_server == int(plan[2]) == status["bytes_last_update"] == expected, (
                version, base, at_server, plan[0], status["bytes_last_update"], expected)
            # One manifest GET, the index once in one form (its pinned length: a delta from
            # the index the device holds, else the zstd form), each object once, no errors.
            paths = [r.path for r in reqs]
            assert len(paths) == len(set(paths)), paths
            assert [r.status for r in reqs] == [200] * len(reqs)
            assert sum(p.endswith("/manifest.json") for p in paths) == 1
            index = rels[version]
            forms = {index.index_sha256: index.index_length, **index.index_forms}
            got = [(r.path.rsplit("/", 1)[1], r.sent) for r in reqs
                   if r.path.rsplit("/", 1)[1] in forms]
            assert len(got) == 1 and got[0][1] == forms[got[0][0]], got
            assert got[0][0] != index.index_sha256, "the raw index was fetched, not a packed form"
            # The delta from the index the device holds if there is one, else the zstd form.
            delta = index.index_deltas.get(rels[base].index_sha256) if base else None
            [zstd] = [f for f in index.index_forms if f not in index.index_deltas.values()]
            assert got[0][0] == (delta or zstd), got
            assert (delta is not None) == (version in ("v2", "v3")), index.index_deltas
            assert_same_model(dev.live, models[version])
            finished_ok(dev, rels, version)
            vdir = dev.live.resolve()
            assert vdir.stat().st_mode & 0o055 == 0o055, (
                f"{vdir} mode {oct(vdir.stat().st_mode)}: serving code running as another "
                "user cannot read the live model")

        summaries["v1"] = release(store, models["v1"], "v1", key)
        a = Dev.init(root, served.url, tmp_path / "a")
        update(a, "v1", None)
        b = a.clone(tmp_path / "b")  # a second device, left at v1

        # An unchanged poll: one conditional GET answered 304, no body, a few hundred bytes.
        mark = served.mark()
        assert "up to date at v1" in a.run("run", "--once").stdout
        reqs, wire = served.since(mark)
        assert [(r.path.rsplit("/", 1)[1], r.status, r.sent) for r in reqs] == [
            ("manifest.json", 304, 0)]
        assert reqs[0].if_none_match
        assert wire.connections == 1 and wire.total < 1024, wire
        print(f"unchanged poll: {len(reqs)} request, {wire.up} bytes up, {wire.down} down")

        for version, base in (("v2", "v1"), ("v3", "v2")):
            summaries[version] = release(store, models[version], version, key)
            update(a, version, base)
        summaries["v4"] = release(store, models["v4"], "v4", key)
        update(b, "v4", "v1")  # the device left at v1 skips straight to v4


# -- the world of the fault tests: a bigger model, published once per module --------------


@dataclass
class World:
    dir: Path
    store: Path
    root: Path
    models: dict[str, Path]
    summaries: dict[str, dict[str, Any]]
    releases: dict[str, Release]
    empty: Dev  # initialised, nothing installed
    at_v1: Dev  # v1 installed while v1 was the current release
    served: ServedStore

    @property
    def index_shas(self) -> set[str]:
        return ({r.index_sha256 for r in self.releases.values()}
                | {f for r in self.releases.values() for f in r.index_forms})

    def device(self, template: Dev, where: Path, **changes: Any) -> Dev:
        return template.clone(where, **changes)

    def group_objects(self) -> str:
        """A regex for the store keys of objects other than release indexes."""
        return "^objects/(?!(?:" + "|".join(sorted(self.index_shas)) + ")$)"

    def big_objects(self, version: str, base: str | None, over: int = 2_000_000) -> str:
        """A regex for the objects over ``over`` bytes a device at ``base`` fetches for
        ``version``."""
        have = set(self.releases[base].expected.values()) if base else set()
        index = json.loads((self.store / "objects" / self.releases[version].index_sha256)
                           .read_bytes())  # unsigned, pinned
        keys = set()
        for g in index["groups"]:
            if g["sha256"] not in have:
                patch = [p["object"] for p in g["patches"] if p["base_sha256"] in have]
                obj = min([g["full"], *patch], key=lambda o: o["length"])
                if obj["length"] > over:
                    keys.add(obj["sha256"])
        assert keys
        return "^objects/(?:" + "|".join(sorted(keys)) + ")$"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    d = tmp_path_factory.mktemp("faults")
    # 16 MB: experts of 3 MiB, so full objects (2.2 MB) outgrow the agent's 1 MiB write
    # block and a kill can leave partial downloads to resume.
    cfg = modelgen.MoEConfig(layers=1, experts=4, hidden=512, ffn=1024, vocab=1024, seed=11)
    v1 = modelgen.generate_moe(d / "models" / "v1", cfg)
    v2 = modelgen.train_experts(v1, d / "models" / "v2", experts=[(0, 1), (0, 3)], seed=12)
    store, root, key = new_store(d)
    summaries = {"v1": release(store, v1, "v1", key)}
    empty = Dev.init(root, f"file://{store}", d / "templates" / "empty")
    at_v1 = empty.clone(d / "templates" / "at-v1")
    at_v1.run("run", "--once")
    assert at_v1.current() == "v1"
    summaries["v2"] = release(store, v2, "v2", key)
    with ServedStore(store, "deltaship/fleet") as served:
        yield World(d, store, root, {"v1": v1, "v2": v2}, summaries, store_releases(store),
                    empty, at_v1, served)


# -- 2. SIGKILL at random instants -----------------------------------------------------------


@dataclass(frozen=True)
class KillScenario:
    name: str
    template: str  # "empty" (fresh install) or "at_v1" (update v1 -> v2)
    http: bool  # through the HTTP server, else file://
    keep: int  # previous versions kept (0: the update also deletes v1 and collects objects)
    kills: int  # SIGKILLs that must land while the agent runs


KILL_SCENARIOS = [
    KillScenario("fresh-file", "empty", http=False, keep=2, kills=13),
    KillScenario("update-file-keep0", "at_v1", http=False, keep=0, kills=13),
    KillScenario("fresh-http", "empty", http=True, keep=2, kills=13),
    KillScenario("update-http", "at_v1", http=True, keep=1, kills=13),
]
WORK_SECONDS = 0.4  # the download is rate-capped to last about this long


def _phase(dev: Dev, old: str | None, rel: Release) -> str:
    """Where the kill landed, judged from what it left on disk."""
    if dev.current() == rel.version:
        return "after switch"
    if (dev.model_dir / "versions" / rel.version).is_dir():
        return "built, not switched"
    if any((dev.meta / "staging").glob("*")):
        return "building version"
    if any((dev.meta / "tmp").glob("*")):
        return "applying"
    objects = dev.model_dir / "objects"
    new = set(rel.expected.values()) - ({p.name for p in (dev.model_dir / "versions" / old)
                                         .iterdir()} if old else set())
    downloads = list((dev.meta / "downloads").glob("*")) if dev.meta.is_dir() else []
    if downloads:
        return "downloading" if any(p.stat().st_size for p in downloads) else "download opened"
    if objects.is_dir() and any((objects / s).exists() for s in new):
        return "applying"
    return "starting"


@pytest.mark.xdist_group("timing")  # not beside the 32-client load test (scripts/test.sh)
@pytest.mark.parametrize("sc", KILL_SCENARIOS, ids=lambda sc: sc.name)
def test_sigkill_at_random_instants(world: World, sc: KillScenario, tmp_path: Path) -> None:
    rng = random.Random(f"{SEED}:{sc.name}")
    target = world.releases["v2"]
    old = "v1" if sc.template == "at_v1" else None
    template = world.empty if old is None else world.at_v1
    plan_bytes = base_download(world.summaries["v2"], old)
    url = world.served.url if sc.http else f"file://{world.store}"
    settings = {"store": url, "keep": sc.keep, "max_rate": plan_bytes / WORK_SECONDS}

    # Calibrate on an uninterrupted run: it also proves the update itself is right.
    golden = world.device(template, tmp_path / "golden", **settings)
    t0 = time.monotonic()
    golden.run("run", "--once")
    t_full = time.monotonic() - t0
    t0 = time.monotonic()
    assert "up to date" in golden.run("run", "--once").stdout
    t_noop = time.monotonic() - t0
    assert_same_model(golden.live, world.models["v2"])
    finished_ok(golden, world.releases, "v2")
    golden.remove()

    lo, hi = 0.85 * t_noop, t_full + 0.05
    lo_start = lo
    kills, trials, phases, runs = 0, 0, Counter[str](), 0
    mark = world.served.mark()
    started = time.monotonic()
    def mid_work() -> int:
        return sum(n for p, n in phases.items() if p != "starting")

    # Until enough kills landed, half of them in the middle of the work: a busy machine (shared
    # CI) starts slower than calibrated, so kills before start-up ends do not count toward that.
    while kills < sc.kills or mid_work() < sc.kills // 2:
        trials += 1
        assert trials <= 3 * sc.kills, (f"only {kills} kills ({mid_work()} mid-work) landed in "
                                        f"{trials} trials: {dict(phases)}")
        dev = world.device(template, tmp_path / f"t{trials}", **settings)
        ctx = f"seed {SEED}, scenario {sc.name}, trial {trials}"
        for attempt in range(2 if rng.random() < 0.2 else 1):  # sometimes kill the restart too
            delay = rng.uniform(lo, hi)
            proc = dev.popen("run", "--once")
            t_start = time.monotonic()
            runs += 1
            try:
                rc = proc.wait(timeout=delay)
                err = proc.stderr.read() if proc.stderr else ""
                assert rc == 0, f"{ctx}: the agent failed on its own ({rc}): {err}"
                if attempt == 0:  # a whole run (a restart resumes and is shorter)
                    # It finished before the kill: the machine is less loaded than during the
                    # calibration (shared CI), so aim the next kills inside this shorter run.
                    hi = min(hi, time.monotonic() - t_start)
                    lo = min(lo, 0.8 * hi)
            except subprocess.TimeoutExpired:
                proc.kill()  # SIGKILL: no handler, no clean-up, no flush
                proc.wait()
                kills += 1
                phase = _phase(dev, old, target)
                phases[phase] += 1
                if phase == "starting" and attempt == 0:
                    # Start-up took longer than calibrated (a busy machine): aim later, and
                    # widen the window when start-up now takes most of it.
                    lo = max(lo, delay)
                    if lo > hi - 0.05:
                        hi = lo + max(0.1, hi - lo_start)
            finally:
                if proc.stderr:
                    proc.stderr.close()
            # Right after the crash the live model is still a complete, verified version.
            try:
                check_layout(dev.model_dir, world.releases, {old, "v2"})
            except AssertionError as e:
                raise AssertionError(f"{ctx}, {delay:.3f} s after start: {e}") from e
        out = dev.run("run", "--once")
        runs += 1
        assert dev.current() == "v2", f"{ctx}: {out.stdout} {out.stderr}"
        try:
            finished_ok(dev, world.releases, "v2")
        except AssertionError as e:
            raise AssertionError(f"{ctx}: {e}") from e
        dev.remove()
    elapsed = time.monotonic() - started
    reqs, _ = world.served.since(mark)
    sent = object_bytes(reqs, world.index_shas)
    resumed = sum(1 for r in reqs if r.range and r.status == 206)
    print(f"\n{sc.name}: {kills} kills in {trials} trials ({runs} agent runs) in {elapsed:.1f} s;"
          f" kill window {lo:.2f}-{hi:.2f} s (uninterrupted run {t_full:.2f} s, no-op "
          f"{t_noop:.2f} s); landed: {dict(phases)}")
    if sc.http:
        print(f"{sc.name}: server sent {sent} object bytes for {trials} updates of "
              f"{plan_bytes} bytes ({sent / (trials * plan_bytes):.2f}x); {resumed} resumed "
              "with Range")
    assert kills >= sc.kills
    # Kills must have landed in the middle of the work, not only before or after it.
    assert mid_work() >= sc.kills // 2, phases


# -- 3. a faulty HTTP store ----------------------------------------------------------------


def _fault_cases(world: World) -> dict[str, Faults]:
    groups, big = world.group_objects(), world.big_objects("v2", None)
    return {
        "500s": Faults(fail=2, fail_status=500, only=groups),
        "503-retry-after": Faults(fail=1, fail_status=503, retry_after="1"),  # the manifest
        "resets-mid-body": Faults(resets=[1_200_000, 300_000, 1_999_000], only=big),
        "truncated-bodies": Faults(truncations=[1_100_000, 1, 1_900_000], only=big),
        "range-ignored": Faults(truncations=[1_500_000, 700_000], ignore_range=True, only=big),
    }


@pytest.mark.parametrize("case", ["500s", "503-retry-after", "resets-mid-body",
                                  "truncated-bodies", "range-ignored"])
def test_faulty_store_still_installs(world: World, case: str, tmp_path: Path) -> None:
    faults = _fault_cases(world)[case]
    injected = copy.deepcopy(faults)  # the server consumes its own
    dev = world.device(world.empty, tmp_path / "dev", store=world.served.direct_url)
    world.served.set_faults(faults)
    mark = world.served.mark()
    try:
        out = dev.run("run", "--once", check=False)
    finally:
        world.served.set_faults(None)
    reqs, _ = world.served.since(mark)
    assert out.returncode == 0, out.stderr
    finished_ok(dev, world.releases, "v2")

    sizes = {p.name: p.stat().st_size for p in (world.store / "objects").iterdir()}
    plan = base_download(world.summaries["v2"], None)
    sent = object_bytes(reqs, world.index_shas)
    got = dev.status()["bytes_last_update"]
    cut = sum(injected.resets) + sum(injected.truncations)
    assert plan <= got <= sent <= plan + cut, (plan, got, sent, cut)

    by_path: dict[str, list[Served]] = {}
    for r in reqs:
        by_path.setdefault(r.path, []).append(r)
    failed = [r for r in reqs if r.status >= 500]
    assert len(failed) == injected.fail
    for r in failed:  # retried after the backoff, or the server's Retry-After
        later = [x for x in by_path[r.path] if x.at > r.at]
        assert later and later[0].status in (200, 206)
        if injected.retry_after:
            assert later[0].at - r.at >= float(injected.retry_after) * 0.95
    broken = [r for r in reqs if r.status in (200, 206) and "/objects/" in r.path
              and r.sent < sizes[r.path.rsplit("/", 1)[1]] - _start(r)]
    assert len(broken) == len(injected.resets) + len(injected.truncations), broken
    for r in broken:
        nxt = next(x for x in by_path[r.path] if x.at > r.at)
        if injected.ignore_range:  # asked to resume, sent everything again: agent restarted
            assert nxt.range and nxt.status == 200
            assert nxt.sent == sizes[r.path.rsplit("/", 1)[1]]
        elif r.sent > 1:  # resumed where the partial file ended, not from zero
            assert nxt.range and nxt.status == 206 and _start(nxt) > 0, (r, nxt)


def _start(r: Served) -> int:
    m = re.fullmatch(r"bytes=(\d+)-", r.range or "")
    return int(m[1]) if m and r.status == 206 else 0


def test_store_that_keeps_failing(world: World, tmp_path: Path) -> None:
    dev = world.device(world.at_v1, tmp_path / "dev", store=world.served.direct_url)
    before = _fingerprint(dev)
    world.served.set_faults(Faults(fail=10**9, fail_status=500, only=world.group_objects()))
    try:
        t0 = time.monotonic()
        out = dev.run("run", "--once", check=False)
        took = time.monotonic() - t0
    finally:
        world.served.set_faults(None)
    line = assert_one_error_line(out, 4, "HTTP 500", "retry later")
    print(f"\ngave up after {took:.1f} s: {line}")
    assert check_layout(dev.model_dir, world.releases, {"v1"}) == "v1"
    assert _fingerprint(dev) == before  # the live model is untouched
    status = dev.status()
    assert status["current"] == "v1" and "HTTP 500" in (status["last_error"] or "")
    # The store heals: the next run installs v2.
    dev.run("run", "--once")
    finished_ok(dev, world.releases, "v2")


def _fingerprint(dev: Dev) -> dict[str, tuple[int, int, str]]:
    sha = Hasher()
    live = dev.live.resolve()
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, sha(p)) for p in live.iterdir()}


# -- 4. a full disk ----------------------------------------------------------------------------

IN_USERNS = "DELTASHIP_TEST_IN_USERNS"
NO_ROOT_MOUNT = "DELTASHIP_TEST_NO_ROOT_MOUNT"  # pretend `mount` is refused (tests the fallback)


class SmallDisk:
    """A tmpfs of a given size at ``path``; ``resize`` remounts it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounted = False

    def mount(self, mib: int) -> bool:
        if os.environ.get(NO_ROOT_MOUNT) and not os.environ.get(IN_USERNS):
            return False
        if os.geteuid() != 0 or not shutil.which("mount"):
            return False
        self.path.mkdir(parents=True, exist_ok=True)
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0755", "tmpfs",
                            str(self.path)], capture_output=True, text=True)
        self.mounted = p.returncode == 0
        return self.mounted

    def resize(self, mib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={mib}m", str(self.path)], check=True)

    def free(self) -> int:
        return shutil.disk_usage(self.path).free

    def fill(self, leave: int) -> Path:
        """A ballast file that leaves ``leave`` bytes free."""
        ballast = self.path / "ballast"
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for _ in range(100):  # others may be writing meanwhile: retry a little smaller
                size = self.free() - leave
                assert size > 0
                try:
                    os.posix_fallocate(fd, os.fstat(fd).st_size, size)
                    return ballast
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    leave += 64 * 1024
            raise AssertionError("cannot fill the disk")
        finally:
            os.close(fd)

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False)
            self.mounted = False


@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SmallDisk | None]:
    """A tmpfs mounted as root; else None once this test passed again in a user namespace."""
    disk = SmallDisk(tmp_path / "disk")
    if not disk.mount(8):
        _rerun_in_user_namespace(request, tmp_path)
        yield None
        return
    try:
        yield disk
    finally:
        disk.unmount()


def _rerun_in_user_namespace(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Without root, `unshare -rm` gives a private mount namespace where tmpfs mounts work."""
    if os.environ.get(IN_USERNS):
        pytest.skip("no tmpfs: mount -t tmpfs fails even in a user namespace")
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c",
                            f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"],
                           capture_output=True, text=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no small filesystem for a full-disk test: not root, and unprivileged "
                    f"user namespaces are unavailable ({probe.stderr.strip() if probe else ''})")
    env = {**os.environ, IN_USERNS: "1"}
    cmd = ["unshare", "-r", "-m", sys.executable, "-m", "pytest", request.node.nodeid, "-q",
           "-p", "no:cacheprovider", "-p", "no:xdist", "--basetemp", str(tmp_path / "ns")]
    p = subprocess.run(cmd, env=env, cwd=Path(__file__).parent.parent, text=True,
                       capture_output=True, timeout=240)
    assert p.returncode == 0, f"in a user namespace:\n{p.stdout[-4000:]}\n{p.stderr[-2000:]}"
    print(f"\nin a user namespace (not root): {p.stdout.strip().splitlines()[-1]}")


def _object_for(world: World, group_sha: str) -> str:
    """The object a device at v1 downloads to build the v2 content ``group_sha``."""
    index = json.loads((world.store / "objects" / world.releases["v2"].index_sha256)
                       .read_bytes())  # unsigned, pinned
    have = set(world.releases["v1"].expected.values())
    for g in index["groups"]:
        if g["sha256"] == group_sha:
            objs = [g["full"], *(p["object"] for p in g["patches"] if p["base_sha256"] in have)]
            return str(min(objs, key=lambda o: o["length"])["sha256"])
    raise KeyError(group_sha)


def _needs(world: World, old: str | None) -> int:
    """Bytes the agent's pre-download check asks for (plan + output + its 16 MiB margin)."""
    new = world.releases["v2"]
    have = set(world.releases[old].expected.values()) if old else set()
    output = sum(_group_lengths(world)[sha] for sha in set(new.expected.values()) - have)
    return base_download(world.summaries["v2"], old) + output + 16 * MiB


def _group_lengths(world: World) -> dict[str, int]:
    index = json.loads((world.store / "objects" / world.releases["v2"].index_sha256)
                       .read_bytes())  # unsigned, pinned
    out = {g["sha256"]: g["length"] for g in index["groups"]}
    out.update({f["sha256"]: f["length"] for f in index["files"]})
    return out


def test_disk_too_small_is_refused_before_downloading(world: World,
                                                      small_disk: SmallDisk | None,
                                                      tmp_path: Path) -> None:
    if small_disk is None:
        return  # passed in a user namespace
    # A fresh install of a model larger than the whole (tiny) disk.
    need_fresh = _needs(world, None)
    small_disk.resize(need_fresh // MiB - 8)
    fresh = world.device(world.empty, small_disk.path / "fresh", store=world.served.url)
    mark = world.served.mark()
    out = fresh.run("run", "--once", check=False)
    assert_one_error_line(out, 2, "free disk space", rf"needs {need_fresh // MiB} MiB")
    reqs, _ = world.served.since(mark)
    assert object_bytes(reqs, world.index_shas) == 0  # refused before downloading anything
    assert fresh.current() is None and leftovers(fresh.model_dir) == []
    fresh.remove()

    # A device at v1 on a disk that a ballast file fills: v2 is refused, v1 stays live.
    small_disk.resize(need_fresh // MiB + 24)
    dev = world.device(world.at_v1, small_disk.path / "dev", store=world.served.url)
    before = _fingerprint(dev)
    need = _needs(world, "v1")
    ballast = small_disk.fill(leave=need - 4 * MiB)
    mark = world.served.mark()
    out = dev.run("run", "--once", check=False)
    line = assert_one_error_line(out, 2, "free disk space", "free some space")
    print(f"\n{line}")
    reqs, _ = world.served.since(mark)
    assert object_bytes(reqs, world.index_shas) == 0
    assert check_layout(dev.model_dir, world.releases, {"v1"}) == "v1"
    assert _fingerprint(dev) == before
    assert "free disk space" in (dev.status()["last_error"] or "")
    # Space freed: the update goes through.
    ballast.unlink()
    dev.run("run", "--once")
    finished_ok(dev, world.releases, "v2")


@pytest.mark.parametrize("where", ["download", "apply"])
def test_disk_fills_up_during_the_update(world: World, small_disk: SmallDisk | None,
                                         where: str, tmp_path: Path) -> None:
    """The pre-download check passes, then another process takes the space: a real ENOSPC.

    The server holds object responses for a while after their headers; meanwhile a ballast
    file takes the space: "download": the small objects are fetched and applied, then the
    disk fills but for a few pages, and writing a big download fails; "apply": the disk fills
    but for the room the downloads need, and writing the first patched group file fails (the
    downloads, held in memory, are written to disk for the next try).
    """
    if small_disk is None:
        return  # passed in a user namespace
    small_disk.resize(_needs(world, "v1") // MiB + 40)
    plan = base_download(world.summaries["v2"], "v1")
    dev = world.device(world.at_v1, small_disk.path / "dev", store=world.served.direct_url)
    before = _fingerprint(dev)
    big = world.big_objects("v2", "v1", over=500_000)
    held = big if where == "download" else world.group_objects()
    small = [sha for sha in set(world.releases["v2"].expected.values())
             - set(world.releases["v1"].expected.values())
             if not re.search(big, f"objects/{_object_for(world, sha)}")]
    world.served.set_faults(Faults(stalls=[1.5] * 50, only=held))
    try:
        proc = dev.popen("run", "--once")
        deadline = time.monotonic() + 20

        def ready() -> bool:
            if where == "apply":  # planned: its downloads wait for their stalled bodies
                with contextlib.suppress(OSError, ValueError):
                    return json.loads((dev.meta / "state.json").read_bytes())["plan"] is not None
                return False
            return all((dev.model_dir / "objects" / sha).exists() for sha in small)

        while not ready() and proc.poll() is None:
            assert time.monotonic() < deadline, "the update never got there"
            time.sleep(0.005)
        assert proc.poll() is None
        ballast = small_disk.fill(leave=32 * 1024 if where == "download"
                                  else plan + 128 * 1024)
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        world.served.set_faults(None)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    line = assert_one_error_line(result, 2, "no space left")
    print(f"\n{where}: {line}")
    assert check_layout(dev.model_dir, world.releases, {"v1"}) == "v1"
    assert _fingerprint(dev) == before
    # Space freed: the update resumes (what was downloaded stays) and goes through.
    ballast.unlink()
    mark = world.served.mark()
    dev.run("run", "--once")
    finished_ok(dev, world.releases, "v2")
    reqs, _ = world.served.since(mark)
    assert object_bytes(reqs, world.index_shas) < plan  # finished downloads were kept
    # The line names the disk and says what to do (both agent messages for ENOSPC do).
    assert str(dev.model_dir) in line and "free" in line, line
