"""Hooks and health checks after a switch, with automatic switch back: real processes."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from edge_agent.hooks import Hooks, parse_hooks
from edge_agent.layout import DeviceLayout
from manifest.errors import HookError

from .conftest import BIN, Cli, MoEFamily
from .test_agent_e2e import Device, _raw, _release


@pytest.fixture
def fleet(cli: Cli, bucket: str, release_key: Path, moe_family: MoEFamily,
          tmp_path: Path) -> tuple[str, Path]:
    store = f"s3://{bucket}/hooks"
    cli.publish("init", "--store", store, "--key", release_key, "--out", tmp_path / "root.json")
    _release(cli, store, moe_family.v1, "v1", release_key)
    return store, tmp_path / "root.json"


def _with_hooks(dev: Device, toml: str) -> None:
    with open(dev.config, "a") as f:
        f.write("\n[hooks]\n" + toml + "\n")


@pytest.mark.slow  # scheduled first (tests/conftest.py)
def test_failing_health_check_switches_back_and_is_not_retried(
        cli: Cli, fleet: tuple[str, Path], release_key: Path, moe_family: MoEFamily,
        tmp_path: Path) -> None:
    store, root = fleet
    # The model server is healthy on a version when its flag file exists: only v1's does.
    (tmp_path / "healthy-v1").touch()
    check = shlex.join(["test", "-f", f"{tmp_path}/healthy-{{version}}"])
    dev = Device(cli, root, store, tmp_path / "dev", "--health-command", check,
                 "--health-attempts", "2", "--health-interval", "0.1")
    dev.agent("run", "--once")
    assert dev.status()["current"] == "v1"
    _release(cli, store, moe_family.v2, "v2", release_key)
    p = dev.agent("run", "--once", check=False)
    assert p.returncode == 6, p.stderr
    assert "v2 failed after the switch" in p.stderr and "switched back to v1" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    st = dev.status()
    assert st["current"] == "v1" and st["failed_versions"] == ["v2"]
    assert st["plan"] is None and "v2" not in st["retained"]  # nothing of v2 is left behind
    assert _raw(dev.live) == _raw(moe_family.v1)
    # A manual rollback never picks the failed version as "the previous one".
    p = dev.agent("rollback", check=False)
    assert p.returncode != 0 and "no previous version" in p.stderr
    # Not retried in a loop...
    p = dev.agent("run", "--once")
    assert "not retried" in p.stdout and dev.status()["current"] == "v1"
    # ...until an operator resumes (and the server is healthy again).
    (tmp_path / "healthy-v2").touch()
    dev.agent("resume")
    dev.agent("run", "--once")
    assert dev.status()["current"] == "v2"
    assert _raw(dev.live) == _raw(moe_family.v2)


def _update_with_hook(cli: Cli, fleet: tuple[str, Path], release_key: Path,
                      moe_family: MoEFamily, tmp_path: Path,
                      hooks: str) -> tuple[Device, subprocess.CompletedProcess[str], float]:
    """Install v1, configure ``hooks``, release v2 and update: the device, the agent's run
    and how long it took."""
    store, root = fleet
    dev = Device(cli, root, store, tmp_path / "dev")
    dev.agent("run", "--once")
    _with_hooks(dev, hooks)
    _release(cli, store, moe_family.v2, "v2", release_key)
    t0 = time.monotonic()
    p = dev.agent("run", "--once", check=False)
    return dev, p, time.monotonic() - t0


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_a_hanging_hook_is_timed_out(cli: Cli, fleet: tuple[str, Path], release_key: Path,
                                     moe_family: MoEFamily, tmp_path: Path) -> None:
    # A wrapper script whose child hangs: the timeout kills the whole process group (killing
    # only the shell would leave its child holding the pipe, and the agent waiting).
    hang, child = 600, tmp_path / "child.pid"
    dev, p, took = _update_with_hook(
        cli, fleet, release_key, moe_family, tmp_path,
        f'notify = [{{kind = "command", argv = ["sh", "-c", "sleep {hang} & echo $! >> {child}; '
        'wait"], timeout = 1}]')
    assert took < hang  # returned long before the hang would have ended
    assert p.returncode == 6 and "did not finish within 1 s" in p.stderr
    assert dev.status()["current"] == "v1"
    # Both runs of the hook (the update, then the switch back) left no child behind.
    children = [int(pid) for pid in child.read_text().split()]
    assert len(children) == 2 and not any(map(_running, children))


def _kill_agent_when(cli: Cli, dev: Device, ready: Callable[[], bool]) -> None:
    """Run `run --once` as a process and SIGKILL it shortly after ``ready()`` holds."""
    proc = subprocess.Popen([str(BIN / "deltaship-agent"), "run", "--once", "--config",
                             str(dev.config)], env=cli.env(), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ready():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        time.sleep(0.3)
    finally:
        proc.kill()
        proc.wait()


def test_an_interrupted_health_check_is_finished_by_the_next_run(
        cli: Cli, fleet: tuple[str, Path], release_key: Path, moe_family: MoEFamily,
        tmp_path: Path) -> None:
    """Killed between the switch and the verdict, the agent must not leave the unchecked
    version live for good: the next run checks it again (and switches back)."""
    store, root = fleet
    hold = tmp_path / "hold"
    check = f"while [ -f {hold} ]; do sleep 0.05; done; test {{version}} = v1"
    dev = Device(cli, root, store, tmp_path / "dev", "--health-command",
                 shlex.join(["sh", "-c", check]), "--health-timeout", "60")
    dev.agent("run", "--once")
    _release(cli, store, moe_family.v2, "v2", release_key)
    hold.touch()
    try:  # SIGKILL while the health check runs
        _kill_agent_when(cli, dev, lambda: os.readlink(dev.live) == "versions/v2")
    finally:
        hold.unlink()
    assert dev.status()["current"] == "v2"  # live, but not committed
    p = dev.agent("run", "--once", check=False)
    assert p.returncode == 6 and "v2 failed after the switch" in p.stderr, p.stderr
    st = dev.status()
    assert st["current"] == "v1" and st["failed_versions"] == ["v2"]
    assert _raw(dev.live) == _raw(moe_family.v1)


class _Recorder(BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str, str]]] = []
    version = ""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        self.seen.append(("POST", self.path, body))
        self.send_response(200)
        self.end_headers()

    def do_GET(self) -> None:
        self.seen.append(("GET", self.path, ""))
        data = json.dumps({"version": _Recorder.version}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_http_notify_and_http_health_with_version(
        cli: Cli, fleet: tuple[str, Path], release_key: Path, moe_family: MoEFamily,
        tmp_path: Path) -> None:
    store, root = fleet
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        dev = Device(cli, root, store, tmp_path / "dev")
        dev.agent("run", "--once")
        body = '{"version": "{version}", "path": "{path}"}'
        _with_hooks(dev, 'notify = [{kind = "http", method = "POST", url = "' + url + '/load", '
                         "body = '" + body + "'}]\n"
                         'health = {kind = "http", url = "' + url + '/version", '
                         'expect_version = true, timeout = 5, attempts = 3, interval = 0.1}')
        _release(cli, store, moe_family.v2, "v2", release_key)
        _Recorder.version = "v1"  # the server keeps reporting the old version: not healthy
        p = dev.agent("run", "--once", check=False)
        assert p.returncode == 6 and "reports version v1, not v2" in p.stderr
        posts = [json.loads(b) for m, _, b in _Recorder.seen if m == "POST"]
        assert [b["version"] for b in posts] == ["v2", "v1"]  # notified, then switched back
        assert posts[0]["path"].endswith("versions/v2")
        assert sum(1 for m, p_, _ in _Recorder.seen if p_ == "/version") >= 3  # retried
        _Recorder.version = "v2"
        dev.agent("resume")
        dev.agent("run", "--once")
        assert dev.status()["current"] == "v2"
    finally:
        server.shutdown()


def test_signal_hook(cli: Cli, fleet: tuple[str, Path], release_key: Path,
                     moe_family: MoEFamily, tmp_path: Path) -> None:
    store, root = fleet
    got = tmp_path / "got-hup"
    script = ("import signal, pathlib, time\n"
              f"signal.signal(signal.SIGHUP, lambda *a: pathlib.Path({str(got)!r}).touch())\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        (tmp_path / "server.pid").write_text(str(proc.pid))
        time.sleep(0.5)  # let it install its handler
        dev = Device(cli, root, store, tmp_path / "dev")
        _with_hooks(dev, f'notify = [{{kind = "signal", pidfile = "{tmp_path / "server.pid"}",'
                         ' signal = "HUP"}]')
        dev.agent("run", "--once")  # the first install: no server can run yet, no hooks
        time.sleep(0.5)
        assert not got.exists()
        _release(cli, store, moe_family.v2, "v2", release_key)
        dev.agent("run", "--once")
        deadline = time.monotonic() + 10
        while not got.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got.exists()
    finally:
        proc.kill()
        proc.wait()


def test_bad_hook_configuration_is_one_clear_line(cli: Cli, fleet: tuple[str, Path],
                                                  tmp_path: Path) -> None:
    store, root = fleet
    dev = Device(cli, root, store, tmp_path / "dev")
    config = dev.config.read_text()
    for table, where in [
        ('notify = [{kind = "carrier-pigeon"}]', "hooks.notify[0]"),
        ('health = {kind = "command", argv = ["true"], attempts = "2"}', "hooks.health.attempts"),
        ('health = {kind = "command", argv = ["true"], timeout = 0}', "hooks.health.timeout"),
        ('notify = [{kind = "command", argv = "true"}]', "hooks.notify[0].argv"),
        ('notify = [{kind = "signal", pidfile = "/x", signal = "BOGUS"}]',
         "hooks.notify[0].signal"),
    ]:
        dev.config.write_text(config)
        _with_hooks(dev, table)
        p = dev.agent("run", "--once", check=False)
        assert p.returncode == 2 and where in p.stderr, (table, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert not dev.live.exists()  # refused before anything was installed


def test_a_pidfile_that_names_no_server_fails_the_hook_cleanly(
        cli: Cli, fleet: tuple[str, Path], release_key: Path, moe_family: MoEFamily,
        tmp_path: Path) -> None:
    store, root = fleet
    dev = Device(cli, root, store, tmp_path / "dev")
    dev.agent("run", "--once")
    (tmp_path / "server.pid").write_text("0\n")  # kill(0, ...) would signal the agent itself
    _with_hooks(dev, f'notify = [{{kind = "signal", pidfile = "{tmp_path / "server.pid"}"}}]')
    _release(cli, store, moe_family.v2, "v2", release_key)
    p = dev.agent("run", "--once", check=False)
    assert p.returncode == 6 and "does not hold a server's process id" in p.stderr, p.stderr
    assert dev.status()["current"] == "v1"


def _signal_hook(pidfile: Path) -> Hooks:
    return parse_hooks({"notify": [{"kind": "signal", "pidfile": str(pidfile)}]})


def test_a_stale_pidfile_naming_a_dead_process_is_one_clear_error(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "server.pid").write_text(f"{dead.pid}\n")
    with pytest.raises(HookError, match=rf"server.pid is stale: no process {dead.pid} "):
        asyncio.run(_signal_hook(tmp_path / "server.pid").after_switch("v2", tmp_path))


def test_a_recycled_pid_of_another_user_is_never_signalled(tmp_path: Path) -> None:
    # The server died and its pid went to another user's process: an agent running as root
    # would signal it. The pid file's owner and the process's owner must agree.
    if os.geteuid() == 0:
        proc = subprocess.Popen(["sleep", "60"], user=65534)  # nobody
        other = proc.pid
    else:
        proc = None
        other = next((int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                      and int(p.name) > 1 and p.stat().st_uid != os.geteuid()), 0)
        if not other:
            pytest.skip("no process of another user to point the pid file at")
    try:
        (tmp_path / "server.pid").write_text(f"{other}\n")
        with pytest.raises(HookError, match=rf"stale: process {other} belongs to uid "):
            asyncio.run(_signal_hook(tmp_path / "server.pid").after_switch("v2", tmp_path))
        if proc is not None:
            assert proc.poll() is None  # not signalled (SIGHUP would have ended `sleep`)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def test_a_stop_during_the_switch_back_still_records_the_failure(
        cli: Cli, fleet: tuple[str, Path], release_key: Path, moe_family: MoEFamily,
        tmp_path: Path) -> None:
    """Killed while re-checking the previous version after v2 failed: the next run must not
    forget that v2 failed (and switch to it again)."""
    store, root = fleet
    hold = tmp_path / "hold"
    check = (f"if [ {{version}} = v1 ]; then while [ -f {hold} ]; do sleep 0.05; done; "
             "exit 0; fi; exit 1")
    dev = Device(cli, root, store, tmp_path / "dev", "--health-command",
                 shlex.join(["sh", "-c", check]), "--health-timeout", "60",
                 "--health-attempts", "1")
    dev.agent("run", "--once")
    _release(cli, store, moe_family.v2, "v2", release_key)
    hold.touch()
    state = DeviceLayout(dev.model_dir).state_file
    try:  # SIGKILL inside v1's check
        _kill_agent_when(cli, dev, lambda: "failed" in (
            json.loads(state.read_text()).get("pending_switch") or {}))
    finally:
        hold.unlink()
    p = dev.agent("run", "--once", check=False)
    assert p.returncode == 6 and "v2 failed after the switch" in p.stderr, p.stderr
    st = dev.status()
    assert st["current"] == "v1" and st["failed_versions"] == ["v2"]
    assert "v2" not in st["retained"]
    assert "not retried" in dev.agent("run", "--once").stdout


def test_a_command_hook_may_leave_a_background_process(
        cli: Cli, fleet: tuple[str, Path], release_key: Path, moe_family: MoEFamily,
        tmp_path: Path) -> None:
    """`sh -c 'server &'` returns at once; its child keeps the hook's stderr open, which must
    not make the agent wait for it (and time the hook out)."""
    timeout = 20
    dev, p, took = _update_with_hook(
        cli, fleet, release_key, moe_family, tmp_path,
        f'notify = [{{kind = "command", argv = ["sh", "-c", "sleep 60 &"], timeout = {timeout}}}]')
    assert p.returncode == 0, p.stderr
    assert took < timeout  # waiting for the child would have run into the hook's timeout
    assert dev.status()["current"] == "v2"
