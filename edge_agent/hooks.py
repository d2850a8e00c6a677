"""After a switch: tell the model server (hooks), then check that it is healthy.

Hooks and the health check come from the ``[hooks]`` table of the agent configuration::

    [hooks]
    notify = [
      {kind = "http", method = "POST", url = "http://127.0.0.1:8000/v2/repository/models/m/load",
       body = '{"version": "{version}", "path": "{path}"}'},
      {kind = "command", argv = ["systemctl", "reload", "model-server"]},
      {kind = "signal", pidfile = "/run/model-server.pid", signal = "HUP"},
    ]
    health = {kind = "http", url = "http://127.0.0.1:8000/version", expect_version = true,
              timeout = 5, attempts = 10, interval = 1}
    # or: health = {kind = "command", argv = ["/usr/local/bin/check-model"], timeout = 30}

Notify requests default to POST, health requests to GET (``method`` overrides). With
``expect_version``, the health answer must name the new version: the ``version`` field of a JSON
object body, or else the version as a whole word anywhere in the body (``v2`` does not match
``v20``).
``{version}`` and ``{path}`` (the version directory) are substituted in URLs, bodies and
arguments. A signal goes only to a process owned by the pid file's owner (a stale pid file,
whose pid now names another user's process or none, fails the hook). The pid file must be a
regular file, not writable by every user: it is opened without following a symbolic link and
without blocking, its owner is read from the open descriptor, at most 32 bytes are read, off
the event loop (a symlink to another process's pid file, a FIFO or ``/dev/zero`` in its place
fail the hook at once). Every hook and check has
a timeout; a hook that hangs is a failed hook. A command hook's stderr is kept in a temp file
(its last line is in the error) of at most 1 MiB: a hook that writes more is stopped, with
what it started, and fails. Of an HTTP answer the first 64 KiB are read. The update
loop decides what a failure means (switch back, remember the version as failed). Hooks run
after every switch except a device's first install (no model server can run before there is a
model, and there is nothing to switch back to), and after a manual ``deltaship-agent rollback``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal as signals
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manifest.errors import HookError, LocalError

__all__ = ["MAX_HOOK_STDERR", "Hooks", "parse_hooks"]

# A command hook's stderr goes to a temp file (see _run): the most bytes it may hold before
# the hook is stopped, and how often its size is looked at while the hook runs.
MAX_HOOK_STDERR = 1 << 20
STDERR_POLL = 0.05
MAX_HOOK_ANSWER = 64 << 10  # bytes of an HTTP hook's answer read (the version, an error)


@dataclass(frozen=True)
class Hook:
    kind: str  # "http", "command" or "signal"
    url: str = ""
    method: str = "POST"
    body: str = ""
    argv: tuple[str, ...] = ()
    pidfile: str = ""
    signal: str = "HUP"
    timeout: float = 10.0
    expect_version: bool = False
    attempts: int = 1
    interval: float = 1.0


@dataclass(frozen=True)
class Hooks:
    notify: tuple[Hook, ...] = ()
    health: Hook | None = None

    @property
    def empty(self) -> bool:
        return not self.notify and self.health is None

    async def after_switch(self, version: str, path: Path) -> None:
        """Run every notify hook, then the health check; raise HookError on the first failure."""
        for hook in self.notify:
            await _attempt(hook, version, path, "notify hook")
        if self.health is not None:
            last: HookError | None = None
            for i in range(max(1, self.health.attempts)):
                try:
                    await _attempt(self.health, version, path, "health check")
                    return
                except HookError as e:
                    last = e
                    if i + 1 < self.health.attempts:
                        await asyncio.sleep(self.health.interval)
            assert last is not None
            raise last


def _reported_version(body: str, expected: str) -> str:
    """The version a health answer names: its JSON ``version`` field, else ``expected`` when
    the body contains it as a whole word, else ``"none"``."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "version" in doc:
        return str(doc["version"])
    return expected if re.search(rf"(?<![\w.-]){re.escape(expected)}(?![\w.-])", body) else "none"


def _fill(text: str, version: str, path: Path) -> str:
    return text.replace("{version}", version).replace("{path}", str(path))


async def _attempt(hook: Hook, version: str, path: Path, what: str) -> None:
    try:
        await asyncio.wait_for(_run(hook, version, path), timeout=hook.timeout)
    except TimeoutError as e:
        raise HookError(f"{what} ({hook.kind}) did not finish within {hook.timeout:g} s") from e


async def _run(hook: Hook, version: str, path: Path) -> None:
    if hook.kind == "http":
        import aiohttp  # only when an HTTP hook runs: importing it costs more than a cycle

        url = _fill(hook.url, version, path)
        try:
            async with aiohttp.ClientSession() as session, session.request(
                hook.method, url, data=_fill(hook.body, version, path).encode() or None
            ) as resp:
                text = (await _read_prefix(resp)).decode(resp.charset or "utf-8",
                                                         errors="replace")
        except aiohttp.ClientError as e:
            raise HookError(f"{hook.method} {url} failed: {e}") from e
        if not 200 <= resp.status < 300:
            said = " ".join(text.split())[:200]
            raise HookError(f"{hook.method} {url} answered HTTP {resp.status}"
                            + (f": {said}" if said else ""))
        reported = _reported_version(text, version) if hook.expect_version else version
        if reported != version:
            raise HookError(f"{url} reports version {reported}, not {version}")
    elif hook.kind == "command":
        argv = [_fill(a, version, path) for a in hook.argv]
        env = {**os.environ, "DELTASHIP_VERSION": version, "DELTASHIP_PATH": str(path)}
        # stderr goes to a file, not a pipe: a background process the command leaves running
        # (`server &`) must not make the hook wait for it. Its own process group, so that a
        # timeout kills what it started too.
        with tempfile.TemporaryFile() as err:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=err,
                    start_new_session=True)
            except OSError as e:
                raise HookError(f"cannot run {argv[0]}: {e.strerror}") from e
            try:
                flooded = await _wait_bounded(proc, err.fileno())
            except asyncio.CancelledError:
                await _kill_group(proc)
                raise
            if flooded:
                await _kill_group(proc)
                raise HookError(f"{argv[0]} wrote more than {MAX_HOOK_STDERR >> 20} MiB to "
                                "stderr: stopped (it must not fill the disk)")
            if proc.returncode != 0:
                err.seek(max(0, os.fstat(err.fileno()).st_size - (1 << 16)))  # its end
                lines = err.read(1 << 16).decode(errors="replace").strip().splitlines()
                detail = lines[-1] if lines else ""
                raise HookError(f"{argv[0]} exited {proc.returncode} {detail}".rstrip())
    else:  # signal
        await _send_signal(hook)


async def _read_prefix(resp: Any) -> bytes:
    """At most :data:`MAX_HOOK_ANSWER` bytes of an HTTP hook's answer (the rest is dropped
    with the connection): a server streaming without end cannot fill the agent's memory."""
    parts: list[bytes] = []
    size = 0
    while size < MAX_HOOK_ANSWER:
        part = await resp.content.read(MAX_HOOK_ANSWER - size)
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


async def _wait_bounded(proc: asyncio.subprocess.Process, err: int) -> bool:
    """Wait for ``proc``; True (it still runs) as soon as its stderr file, ``err``, holds more
    than :data:`MAX_HOOK_STDERR` bytes."""
    waiter = asyncio.ensure_future(proc.wait())
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=STDERR_POLL)
            if done:
                return False
            if os.fstat(err).st_size > MAX_HOOK_STDERR:
                return True
    finally:
        waiter.cancel()


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """Kill the hook's process group (what it started too); wait briefly for it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signals.SIGKILL)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), timeout=5)


async def _send_signal(hook: Hook) -> None:
    # Imported here: the serving package is not needed by an agent without a signal hook.
    from .serving.pidfile import PidFileRefused, read_pidfile

    try:
        text, owner = await asyncio.to_thread(read_pidfile, hook.pidfile)
    except PidFileRefused as e:
        raise HookError(f"the pid file {hook.pidfile} {e}: refused (it must be a regular "
                        "file the server wrote)") from None
    except OSError as e:
        raise HookError(f"cannot read the pid file {hook.pidfile}: {e.strerror}") from None
    pid = int(text) if text.isdigit() else 0
    if pid < 2 or pid == os.getpid():  # 0, -1 and 1 signal groups or init
        raise HookError(f"{hook.pidfile} does not hold a server's process id ({text[:20]!r})")
    number = _signal_number(hook.signal)
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise HookError(f"{hook.pidfile} is stale: no process {pid} (is the server "
                        "running?)") from None
    except (OSError, AttributeError):  # no pidfd (not Linux, or a kernel before 5.3)
        pidfd = -1
    try:
        # With a pidfd, the process checked is the process signalled even if it exits and
        # its pid is reused in between.
        _check_owner(pid, hook.pidfile, owner)
        if pidfd >= 0:
            signals.pidfd_send_signal(pidfd, number)
        else:
            os.kill(pid, number)
    except ProcessLookupError:
        raise HookError(f"{hook.pidfile} is stale: process {pid} is gone (is the server "
                        "running?)") from None
    except OSError as e:
        raise HookError(f"cannot signal the process in {hook.pidfile}: {e.strerror}") from None
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _check_owner(pid: int, pidfile: str, owner: int) -> None:
    """Refuse a pid that belongs to another user than the pid file's: a recycled pid.

    A server writes its own pid file, so the two owners agree; after the server dies its
    pid may go to any process, and an agent running as root would signal it. (Wall-clock
    comparisons cannot tell: edge boards without a real-time clock step their clock at boot.)
    Where /proc is missing (not Linux), the pid is trusted as before.
    """
    try:
        running_as = os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        raise HookError(f"{pidfile} is stale: no process {pid} (is the server running?)") from None
    except OSError:
        return
    if running_as != owner:
        raise HookError(f"{pidfile} is stale: process {pid} belongs to uid {running_as}, the "
                        f"file to uid {owner}, so it is not the server (is the server running?)")


_FIELDS = set(Hook.__dataclass_fields__)


_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,), "url": (str,), "method": (str,), "body": (str,), "pidfile": (str,),
    "signal": (str,), "timeout": (int, float), "interval": (int, float), "attempts": (int,),
    "expect_version": (bool,),
}  # fmt: skip


def _signal_number(name: str) -> int:
    number = getattr(signals, f"SIG{name.upper().removeprefix('SIG')}", None)
    if not isinstance(number, signals.Signals):
        raise LocalError(f"unknown signal {name!r} (e.g. HUP, USR1, TERM)")
    return int(number)


def _hook(d: Any, where: str, method: str) -> Hook:
    if not isinstance(d, dict) or d.get("kind") not in ("http", "command", "signal"):
        raise LocalError(f"{where}: needs kind = \"http\", \"command\" or \"signal\"")
    unknown = set(d) - _FIELDS
    if unknown:
        raise LocalError(f"{where}: unknown setting {sorted(unknown)[0]!r}")
    for key, value in d.items():
        types = _TYPES.get(key)
        if types is not None and (not isinstance(value, types) or (
                bool not in types and isinstance(value, bool))):
            raise LocalError(f"{where}.{key}: {value!r} is not a {types[0].__name__}")
    if "argv" in d and (not isinstance(d["argv"], list)
                        or not all(isinstance(a, str) for a in d["argv"])):
        raise LocalError(f"{where}.argv: must be a list of strings")
    if "timeout" in d and not d["timeout"] > 0:
        raise LocalError(f"{where}.timeout: must be more than 0 seconds")
    if "interval" in d and not d["interval"] >= 0:
        raise LocalError(f"{where}.interval: must not be negative")
    if d.get("attempts", 1) < 1:
        raise LocalError(f"{where}.attempts: must be at least 1")
    d = {"method": method, **d}
    if "argv" in d:
        d["argv"] = tuple(d["argv"])
    hook = Hook(**d)
    if hook.kind == "signal":
        try:
            _signal_number(hook.signal)
        except LocalError as e:
            raise LocalError(f"{where}.signal: {e}") from None
    needs = {"http": hook.url, "command": hook.argv, "signal": hook.pidfile}[hook.kind]
    if not needs:
        raise LocalError(f"{where}: a {hook.kind} hook needs "
                         f"{ {'http': 'url', 'command': 'argv', 'signal': 'pidfile'}[hook.kind] }")
    return hook


def parse_hooks(d: dict[str, Any]) -> Hooks:
    """The ``[hooks]`` table of the configuration (see the module docstring)."""
    unknown = set(d) - {"notify", "health"}
    if unknown:
        raise LocalError(f"[hooks]: unknown setting {sorted(unknown)[0]!r}")
    notify = tuple(
        _hook(h, f"hooks.notify[{i}]", "POST") for i, h in enumerate(d.get("notify", []))
    )
    health = _hook(d["health"], "hooks.health", "GET") if "health" in d else None
    if health is not None and health.kind == "signal":
        raise LocalError("hooks.health: a health check is an http request or a command")
    return Hooks(notify, health)
