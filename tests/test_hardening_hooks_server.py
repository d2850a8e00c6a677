"""Issue 9, points 4 and 14: the signal hook's pid file and the reference server under abuse.

Real processes throughout: ``deltaship-agent run --once`` against moto's S3 server, the
reference server (``deltaship-agent serve``), ``sleep`` victims, FIFOs and symbolic links, and
raw TCP clients that send a request and go.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from manifest.progress import LINE_INTERVAL
from publisher.progress import Progress as PublisherProgress

from ._model_server import ModelServer
from .conftest import BIN, Cli, MoEFamily
from .test_agent_e2e import Device, _release
from .test_serve_api import device  # noqa: F401 - a fixture

# Request timing is measured and compared: keep off the worker of the SIGKILL trials.
pytestmark = pytest.mark.xdist_group("timing")

HOOK_TIMEOUT = 60  # seconds: the configured bound of every signal hook below
HEAVY = json.dumps({"tokens": [i % 256 for i in range(448)], "max_new_tokens": 64}).encode()
LIGHT = b'{"tokens": [1, 2, 3]}'


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# -- point 4: the signal hook reads only the server's own pid file ---------------------------


@pytest.fixture
def fleet(cli: Cli, bucket: str, release_key: Path, moe_family: MoEFamily,
          tmp_path: Path) -> tuple[str, Path]:
    store = f"s3://{bucket}/hardening"
    cli.publish("init", "--store", store, "--key", release_key, "--out", tmp_path / "root.json")
    _release(cli, store, moe_family.v1, "v1", release_key)
    return store, tmp_path / "root.json"


def test_the_signal_hook_refuses_links_fifos_devices_and_shared_files(
        cli: Cli, fleet: tuple[str, Path], release_key: Path, moe_family: MoEFamily,
        tmp_path: Path) -> None:
    """Each replacement of the pid file fails the hook at once (exit 6, one line, switched
    back), well within the hook's timeout, and the process it pointed at gets no signal."""
    store, root = fleet
    dev = Device(cli, root, store, tmp_path / "dev")
    dev.agent("run", "--once")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pidfile = run_dir / "server.pid"
    with open(dev.config, "a") as f:
        f.write(f'\n[hooks]\nnotify = [{{kind = "signal", pidfile = "{pidfile}", '
                f"timeout = {HOOK_TIMEOUT}}}]\n")
    _release(cli, store, moe_family.v2, "v2", release_key)
    # Another process of the agent's own user (root in CI) with its own pid file: before the
    # fix, a symlink to that file made the agent send it the signal (SIGHUP ends `sleep`).
    victim = subprocess.Popen(["sleep", "600"])
    victim_pidfile = tmp_path / "victim.pid"
    victim_pidfile.write_text(f"{victim.pid}\n")

    def shared() -> None:
        pidfile.write_text(f"{victim.pid}\n")
        pidfile.chmod(0o666)

    cases: list[tuple[str, Callable[[], None], str]] = [
        ("a symlink to another process's pid file",
         lambda: pidfile.symlink_to(victim_pidfile), "is a symbolic link"),
        ("a FIFO (blocked the event loop for 12 minutes)",
         lambda: os.mkfifo(pidfile), "is not a regular file"),
        ("a symlink to /dev/zero (read without bound)",
         lambda: pidfile.symlink_to("/dev/zero"), "is a symbolic link"),
        ("a directory", lambda: pidfile.mkdir(), "is not a regular file"),
        ("a file every user may write", shared, "is writable by every user"),
        ("more than 32 bytes", lambda: pidfile.write_text(" " * 40 + f"{victim.pid}\n"),
         "more than 32 bytes"),
    ]
    try:
        for i, (what, make, reason) in enumerate(cases):
            if pidfile.is_dir() and not pidfile.is_symlink():
                pidfile.rmdir()
            else:
                pidfile.unlink(missing_ok=True)
            make()
            if i:
                dev.agent("resume")  # v2 failed in the previous case: try it again
            t0 = time.monotonic()
            p = dev.agent("run", "--once", check=False)
            took = time.monotonic() - t0
            assert p.returncode == 6, (what, p.stderr)
            # The error line; before it, the log line saying v1's own notify failed too (the
            # same pid file), which the switch back reports and does not raise.
            *logged, line = p.stderr.strip().splitlines()
            assert "Traceback" not in p.stderr and line.startswith("deltaship-agent: error: ")
            assert len(logged) == 1 and "the previous version v1 is not healthy" in logged[0]
            assert reason in line and "switched back to v1" in line, (what, line)
            assert took < HOOK_TIMEOUT, (what, took)  # refused at once, never blocked
            assert victim.poll() is None, what  # never signalled
            assert dev.status()["current"] == "v1"
    finally:
        victim.kill()
        victim.wait()
        if pidfile.is_dir() and not pidfile.is_symlink():
            pidfile.rmdir()
        else:
            pidfile.unlink(missing_ok=True)
    # The real server's own pid file still works: the hook delivers SIGHUP and v2 goes live.
    server = ModelServer(cli, dev.model_dir)
    try:
        config = dev.config.read_text().replace(str(pidfile), str(server.pidfile))
        dev.config.write_text(config)
        dev.agent("resume")
        p = dev.agent("run", "--once", check=False)
        assert p.returncode == 0 and p.stderr == "", p.stderr
        server.wait_version("v2", timeout=HOOK_TIMEOUT)
    finally:
        assert server.stop() == 0


def test_the_server_writes_its_pid_file_without_following_a_link(
        cli: Cli, device: Device, tmp_path: Path) -> None:  # noqa: F811
    """A symlink at --pidfile is replaced, not written through; a FIFO put there while the
    server runs does not block its stop (bounded by its request timeout)."""
    victim = tmp_path / "victim"
    victim.write_text("not yours\n")
    pidfile = tmp_path / "serve.pid"
    pidfile.symlink_to(victim)
    timeout = 10
    proc = subprocess.Popen(
        [str(BIN / "deltaship-agent"), "serve", "--model-dir", str(device.model_dir), "--port",
         "0", "--pidfile", str(pidfile), "--request-timeout", str(timeout)],
        env=cli.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "serving v1" in proc.stdout.readline()
        assert victim.read_text() == "not yours\n"
        assert not pidfile.is_symlink() and pidfile.read_text() == f"{proc.pid}\n"
        pidfile.unlink()
        os.mkfifo(pidfile)  # someone put a FIFO where the server left its pid file
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=4 * timeout)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0 and took < timeout, (code, took)
    assert proc.stderr is not None and proc.stderr.read() == ""
    assert pidfile.exists()  # not the server's file: left alone (and never read blocking)
    assert victim.read_text() == "not yours\n"


# -- point 14: the server drops work nobody waits for, bounds its queue and its stop ---------


def _request(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def _connect(url: str, path: str, body: bytes) -> socket.socket:
    """A raw client that has sent its whole request (and not read the answer)."""
    u = urllib.parse.urlsplit(url)
    assert u.hostname is not None and u.port is not None
    s = socket.create_connection((u.hostname, u.port))
    s.sendall(_request(path, body))
    return s


def _answer(s: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of the answer on ``s`` (then closed)."""
    s.settimeout(timeout)
    data = b""
    with s:
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in
                   (line.partition(":") for line in lines[1:]))
    return int(lines[0].split()[1]), headers, body


def _timed(server: ModelServer, body: bytes, path: str = "/v1/forward",
           timeout: float = 600) -> tuple[float, int]:
    t0 = time.monotonic()
    status, _, _ = _answer(_connect(server.url, path, body), timeout)
    return time.monotonic() - t0, status


def _heavy_seconds(server: ModelServer) -> float:
    """The median time of one heavy request (a 448-token prompt, 64 new tokens), alone."""
    times = []
    for _ in range(3):
        took, status = _timed(server, HEAVY, "/v1/generate")
        assert status == 200
        times.append(took)
    return statistics.median(times)


def _queue(server: ModelServer) -> dict[str, int]:
    q: dict[str, int] = server.stats()["queue"]
    return q


def test_work_of_clients_that_left_is_dropped(cli: Cli, device: Device) -> None:  # noqa: F811
    """Many clients send a heavy request and disconnect at once: a 3-token request is then
    answered within a bound derived from this run's single-request times (before the fix it
    waited for all of them: 30 clients, 20 s)."""
    server = ModelServer(cli, device.model_dir, "--threads", 2, "--max-queue", 1000,
                         "--request-timeout", 600)  # only the disconnects may free the queue
    try:
        heavy = _heavy_seconds(server)
        light = statistics.median(_timed(server, LIGHT)[0] for _ in range(3))
        bound = 5 * heavy + 5 * light
        clients = max(30, math.ceil(6 * bound * 2 / heavy))  # 6x the bound of work if kept
        for _ in range(clients):
            _connect(server.url, "/v1/generate", HEAVY).close()
        took, status = _timed(server, LIGHT)
        assert status == 200 and took < bound, (took, bound, heavy, clients, _queue(server))
        # and nothing of theirs is still computing or waiting
        deadline = time.monotonic() + bound
        while (q := _queue(server))["running"] + q["waiting"]:
            assert time.monotonic() < deadline, q
            time.sleep(0.01)
        assert q["rejected"] == 0 and q["timed_out"] == 0, q
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.log.read_text()


def test_a_full_queue_answers_503_with_retry_after(cli: Cli, device: Device) -> None:  # noqa: F811
    server = ModelServer(cli, device.model_dir, "--threads", 1, "--max-queue", 2,
                         "--request-timeout", 600)
    try:
        heavy = _heavy_seconds(server)
        clients = [_connect(server.url, "/v1/generate", HEAVY) for _ in range(12)]
        answers = [_answer(s, 12 * heavy + 60) for s in clients]
        statuses = [a[0] for a in answers]
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 3, statuses
        refused = [a for a in answers if a[0] == 503]
        assert refused, statuses  # 1 computing + 2 waiting; the rest cannot all wait
        for _, headers, body in refused:
            assert headers["retry-after"].isdigit() and int(headers["retry-after"]) >= 1
            assert "--max-queue" in json.loads(body)["error"]
        assert _queue(server)["rejected"] == len(refused)
        took, status = _timed(server, LIGHT)  # and it serves again at once
        assert status == 200 and took < 2 * heavy + 60
    finally:
        assert server.stop() == 0


def test_a_request_over_its_time_is_answered_503_and_its_work_stopped(
        cli: Cli, device: Device) -> None:  # noqa: F811
    server = ModelServer(cli, device.model_dir)
    try:
        heavy = _heavy_seconds(server)
    finally:
        assert server.stop() == 0
    timeout = heavy / 4
    server = ModelServer(cli, device.model_dir, "--threads", 1, "--request-timeout", timeout)
    try:
        t0 = time.monotonic()
        status, headers, body = _answer(_connect(server.url, "/v1/generate", HEAVY), 60 * heavy)
        took = time.monotonic() - t0
        assert status == 503 and took < heavy, (status, took, heavy)
        assert "--request-timeout" in json.loads(body)["error"]
        assert int(headers["retry-after"]) >= 1
        deadline = time.monotonic() + heavy * 4  # the generation stops at its next token
        while (q := _queue(server))["running"]:
            assert time.monotonic() < deadline, q
            time.sleep(0.01)
        assert q["timed_out"] == 1, q
        assert _timed(server, LIGHT)[1] == 200
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.log.read_text()


def test_sigterm_with_work_queued_stops_within_the_request_timeout(
        cli: Cli, device: Device) -> None:  # noqa: F811
    """SIGTERM refuses the waiting requests (503) and lets the running ones finish: the
    server exits 0 within its request timeout, one line on stderr (before the fix it computed
    the whole queue: 21 s)."""
    server = ModelServer(cli, device.model_dir)
    try:
        heavy = _heavy_seconds(server)
    finally:
        assert server.stop() == 0
    timeout = max(2.0, 4 * heavy)  # every request can finish in time
    server = ModelServer(cli, device.model_dir, "--threads", 2, "--max-queue", 10_000,
                         "--request-timeout", timeout)
    clients = math.ceil(4 * (2 * timeout) * 2 / heavy)  # 4x the bound of queued work
    sockets = [_connect(server.url, "/v1/generate", HEAVY) for _ in range(clients)]
    try:
        deadline = time.monotonic() + 10 * timeout
        while server.stats()["requests"] < clients:  # every request read and queued
            assert time.monotonic() < deadline, _queue(server)
            time.sleep(0.01)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=20 * timeout)
        took = time.monotonic() - t0
        assert code == 0 and took < 2 * timeout, (code, took, heavy, clients)
        answers = [_answer(s, 2 * timeout)[0] for s in sockets]
        assert 503 in answers and set(answers) <= {200, 503}, answers
    finally:
        for s in sockets:
            s.close()
        server.stop()
    line = _one_line(server.log.read_text())
    assert "waiting requests answered 503" in line, line


# -- also: progress of the agent (terminal, logs, status) and of the publisher ----------------


def test_the_agent_shows_progress_in_logs_on_a_terminal_and_in_status(
        cli: Cli, bucket: str, release_key: Path, moe_family: MoEFamily,
        tmp_path: Path) -> None:
    store = f"s3://{bucket}/progress"
    cli.publish("init", "--store", store, "--key", release_key, "--out", tmp_path / "root.json")
    full = _release(cli, store, moe_family.v1, "v1", release_key)["full_download_bytes"]
    expected = 3 * LINE_INTERVAL  # seconds the first install should take at this rate
    rate = max(1, int(full / expected))
    dev = Device(cli, tmp_path / "root.json", store, tmp_path / "dev", "--max-rate", rate)
    log = tmp_path / "agent.log"
    with open(log, "w") as err:  # not a terminal: periodic log lines
        proc = subprocess.Popen([str(BIN / "deltaship-agent"), "run", "--once", "-v",
                                 "--config", str(dev.config)], env=cli.env(), stderr=err,
                                stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10 * expected
            while True:  # `status` shows the bytes done while the update runs
                plan = dev.status()["plan"]
                if plan and 0 < plan.get("done_bytes", 0) < plan["download_bytes"]:
                    break
                assert proc.poll() is None and time.monotonic() < deadline, plan
                time.sleep(0.2)
            text = dev.agent("status").stdout
            assert " bytes downloaded (full " in text or proc.poll() is not None, text
            assert proc.wait(timeout=10 * expected) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = [line for line in log.read_text().splitlines() if "updating to v1:" in line]
    assert len(lines) >= 2 and all("ETA" in line and "/s" in line for line in lines), lines
    assert dev.status()["plan"] is None
    # On a terminal: one line redrawn in place, with bytes, speed and ETA.
    _release(cli, store, moe_family.v2, "v2", release_key)
    main, tty = os.openpty()
    try:
        proc = subprocess.Popen([str(BIN / "deltaship-agent"), "run", "--once", "--config",
                                 str(dev.config)], env=cli.env(), stderr=tty,
                                stdout=subprocess.DEVNULL)
        os.close(tty)
        out = b""
        with contextlib.suppress(OSError):  # EIO once the agent has closed the terminal
            while chunk := os.read(main, 65536):
                out += chunk
        assert proc.wait(timeout=10 * expected) == 0
    finally:
        os.close(main)
    text = out.decode(errors="replace")
    assert "\rupdating to v2: " in text and "100.0%" in text and "ETA" in text, text


def test_publisher_progress_reaches_a_log_in_periodic_lines(tmp_path: Path) -> None:
    """Not a terminal: a line every interval while the job runs (none for a short job)."""
    log = tmp_path / "publish.log"
    with open(log, "w") as stream:
        quick = PublisherProgress("hashing", 100, stream)
        quick.advance(100)
        quick.close()
        slow = PublisherProgress("uploading", 3, stream)
        slow.interval = 0.05
        for _ in range(3):
            time.sleep(slow.interval * 2)
            slow.advance(1)
        slow.close()
    lines = log.read_text().splitlines()
    assert len(lines) == 4 and all(line.startswith("deltaship-publish: uploading: ")
                                   for line in lines), lines
    assert "100.0% 3 B/3 B" in lines[-1]


def test_publisher_progress_lines_go_to_stdout_and_leave_stderr_to_errors(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A release that fails after a long encode still prints one line on stderr."""
    bar = PublisherProgress("encoding", 2)
    bar.interval = 0.05
    for _ in range(2):
        time.sleep(bar.interval * 2)
        bar.advance(1)
    bar.close()
    out, err = capsys.readouterr()
    assert err == "" and out.count("deltaship-publish: encoding: ") == 3, (out, err)


# -- also: the systemd units and their install steps ------------------------------------------

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
UNITS = ["deltaship-agent.service", "deltaship-serve.service"]


def _directives(unit: str) -> dict[str, list[str]]:
    text = (SCRIPTS / unit).read_text().replace("\\\n", " ")
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(" ".join(value.split()))
    return out


def _install_steps() -> list[list[str]]:
    """The commands of the agent unit's "Install" comment, split into words."""
    text = (SCRIPTS / UNITS[0]).read_text()
    lines = [line[1:].strip() for line in text.splitlines() if line.startswith("#   ")]
    return [cmd.split() for cmd in " ".join(lines).replace("\\ ", " ").split("  ") if cmd]


def test_the_units_verify_agree_with_their_install_steps_and_are_hardened(
        tmp_path: Path) -> None:
    agent, serve = (_directives(u) for u in UNITS)
    exe = agent["ExecStart"][0].split()[0]
    assert exe.startswith("/") and exe == serve["ExecStart"][0].split()[0]
    steps = " ".join(" ".join(words) for words in _install_steps())
    assert f"python3 -m venv {Path(exe).parent.parent} " in steps  # ExecStart is the venv's
    assert f"{exe} init --config /etc/{agent['ConfigurationDirectory'][0]}/agent.toml" in steps
    assert f"--model-dir /var/lib/{agent['StateDirectory'][0]}/model" in steps
    assert f"chown -R {agent['User'][0]}:{agent['Group'][0]} /var/lib/deltaship" in steps
    assert "sudo -u" not in steps  # the unit's user cannot write /etc/deltaship
    assert f"run --config /etc/{agent['ConfigurationDirectory'][0]}/agent.toml" in \
        agent["ExecStart"][0]
    pidfile = f"/run/{serve['RuntimeDirectory'][0]}/serve.pid"
    assert f"--pidfile {pidfile}" in serve["ExecStart"][0] and f"--notify-signal {pidfile}" in steps
    assert agent["User"] == serve["User"]  # the signal hook reaches only its own user
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze here")
    for unit in UNITS:  # verify needs ExecStart to exist: point it at this install
        copy = tmp_path / unit
        copy.write_text((SCRIPTS / unit).read_text().replace(exe, str(BIN / "deltaship-agent")))
        p = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
        assert p.returncode == 0 and not p.stdout + p.stderr, p.stdout + p.stderr
        p = subprocess.run([analyze, "security", "--offline=true", str(SCRIPTS / unit)],
                           capture_output=True, text=True)
        level = float(p.stdout.strip().splitlines()[-1].split(":")[1].split()[0])
        assert level <= 4.0, p.stdout


REFRESH_UNITS = ["deltaship-refresh.service", "deltaship-refresh.timer"]


def test_the_refresh_timer_is_weekly_and_its_unit_command_refreshes_a_store(
        cli: Cli, tmp_path: Path, moe_family: MoEFamily) -> None:
    """The weekly `deltaship-publish refresh` (issue 10): a hardened oneshot of the agent's
    virtual environment, started by a persistent weekly timer with a random delay; its command
    line, with the variables of the environment file its header shows, refreshes a store."""
    service, timer = (_directives(u) for u in REFRESH_UNITS)
    assert timer["OnCalendar"] == ["weekly"] and timer["Persistent"] == ["true"]
    assert timer["RandomizedDelaySec"] and timer["WantedBy"] == ["timers.target"]
    assert service["Type"] == ["oneshot"] and service["EnvironmentFile"]
    exe, *args = service["ExecStart"][0].split()
    assert Path(exe).parent == Path(_directives(UNITS[0])["ExecStart"][0].split()[0]).parent
    header = [line[1:].strip() for line in (SCRIPTS / REFRESH_UNITS[0]).read_text()
              .splitlines() if line.startswith("#   ")]
    used = {a[2:-1] for a in args if a.startswith("${")}
    assert used == {"DELTASHIP_STORE", "DELTASHIP_TIMESTAMP_KEY"}
    assert all(any(h.startswith(f"{v}=") for h in header) for v in used)

    env = cli.env(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"),
                  XDG_CACHE_HOME=str(tmp_path / "cache"))
    keys, store = tmp_path / "keys", tmp_path / "store"
    store.mkdir()
    for name in ("root", "release", "timestamp"):
        cli.publish("keygen", "--out", keys, "--name", name, env=env)
    cli.publish("init", "--store", store, "--root-key", keys / "root.key", "--release-key",
                keys / "release.pub", "--timestamp-key", keys / "timestamp.pub", env=env)
    cli.publish("release", moe_family.v1, "--store", store, "--version", "v1", "--key",
                keys / "release.key", "--key", keys / "timestamp.key", env=env)
    values = {"DELTASHIP_STORE": str(store), "DELTASHIP_TIMESTAMP_KEY": str(keys / "timestamp.key")}
    argv = [values[a[2:-1]] if a.startswith("${") else a for a in args]
    p = cli.run("deltaship-publish", *argv, env=env)
    assert p.stdout.startswith("refreshed: v1 is current (manifest sequence 1, timestamp 2)")

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze here")
    for unit in REFRESH_UNITS:  # verify needs ExecStart to exist, and the timer its service
        text = (SCRIPTS / unit).read_text()
        (tmp_path / unit).write_text(text.replace(exe, str(BIN / "deltaship-publish")))
    p = subprocess.run([analyze, "verify", *(str(tmp_path / u) for u in REFRESH_UNITS)],
                       capture_output=True, text=True)
    assert p.returncode == 0 and not p.stdout + p.stderr, p.stdout + p.stderr
    p = subprocess.run([analyze, "security", "--offline=true", str(SCRIPTS / REFRESH_UNITS[0])],
                       capture_output=True, text=True)
    level = float(p.stdout.strip().splitlines()[-1].split(":")[1].split()[0])
    assert level <= 4.0, p.stdout


@contextlib.contextmanager
def _passable(d: Path) -> Iterator[None]:
    """``d`` searchable by others (o+x) while the block runs, if it was not."""
    mode = d.stat().st_mode
    if mode & stat.S_IXOTH:
        yield
        return
    d.chmod(mode | stat.S_IXOTH)
    try:
        yield
    finally:
        d.chmod(mode)


def test_the_install_steps_work_under_the_units_user_without_new_privileges(
        cli: Cli, release_key: Path, moe_family: MoEFamily) -> None:
    """The unit header's steps (root writes the configuration, the state directory goes to
    the service user), then the agent as that user under no_new_privs: installs v1, updates
    to v2 and its signal hook reaches a server running as the same user."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as the unit's user")
    user = 65534  # nobody
    base = Path(tempfile.mkdtemp(prefix="deltaship-unit-"))
    # The checkout may lie under a private directory (mktemp -d is 0700): let the unit's user
    # pass through to the virtual environment and the sources for the length of the test.
    reach = contextlib.ExitStack()
    for top in (BIN, Path(__file__).resolve().parents[1]):
        for d in reversed(top.resolve().parents):
            reach.enter_context(_passable(d))
    try:
        base.chmod(0o755)
        etc, state, run = base / "etc", base / "state", base / "run"
        etc.mkdir(mode=0o755)
        state.mkdir()
        run.mkdir()
        store = base / "store"
        store.mkdir()
        cli.publish("init", "--store", store, "--key", release_key, "--out", etc / "root.json")
        (etc / "root.json").chmod(0o644)
        _release(cli, str(store), moe_family.v1, "v1", release_key)
        config = etc / "agent.toml"
        cli.run("deltaship-agent", "init", "--config", config, "--store", store, "--trust",
                etc / "root.json", "--model-dir", state / "model", "--notify-signal",
                run / "serve.pid", "--device-id", "unit")
        for d in (state, run):
            subprocess.run(["chown", "-R", f"{user}:{user}", str(d)], check=True)
        as_user = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
                   "--no-new-privs"]
        env = {"PATH": os.environ["PATH"], "HOME": str(state)}
        agent = [*as_user, str(BIN / "deltaship-agent"), "run", "--once", "--config",
                 str(config)]
        p = subprocess.run(agent, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and p.stderr == "", p.stderr
        got = run / "got-hup"
        server = subprocess.Popen([*as_user, sys.executable, "-c", (
            "import os, pathlib, signal, time\n"
            f"signal.signal(signal.SIGHUP, lambda *a: pathlib.Path({str(got)!r}).touch())\n"
            f"pathlib.Path({str(run / 'serve.pid')!r}).write_text(f'{{os.getpid()}}\\n')\n"
            "time.sleep(600)\n")])
        try:
            deadline = time.monotonic() + HOOK_TIMEOUT
            while not (run / "serve.pid").exists():
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.05)
            _release(cli, str(store), moe_family.v2, "v2", release_key)
            p = subprocess.run(agent, env=env, capture_output=True, text=True, timeout=300)
            assert p.returncode == 0 and p.stderr == "", p.stderr
            assert "updated v1 -> v2" in p.stdout
            while not got.exists():
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.05)
        finally:
            server.kill()
            server.wait()
        assert config.stat().st_uid == 0 and not config.stat().st_mode & 0o022
    finally:
        reach.close()
        shutil.rmtree(base)
