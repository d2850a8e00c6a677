"""``deltaship-agent init``'s --notify-* and --health-* flags as a validated ``[hooks]`` table.

No click here: the command line passes the flags' values, and which of the timing flags the
user gave explicitly (a timing flag without the hook it times is a mistake worth a word).
"""

from __future__ import annotations

import shlex
import signal
from collections.abc import Collection
from pathlib import Path
from urllib.parse import urlsplit

from manifest.errors import LocalError

__all__ = ["TIMING_FLAGS", "hooks_from_flags"]

# The parameters with defaults that only mean something next to another flag.
TIMING_FLAGS = ("hook_timeout", "health_timeout", "health_attempts", "health_interval")


def _url(flag: str, value: str) -> str:
    try:
        parts = urlsplit(value)
    except ValueError as e:  # e.g. an unclosed [ of an IPv6 address
        raise LocalError(f"{flag} {value!r}: not a URL ({e})") from e
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise LocalError(f"{flag} {value!r}: not an http:// or https:// URL")
    return value


def _argv(flag: str, value: str) -> list[str]:
    try:
        words = shlex.split(value)
    except ValueError as e:
        raise LocalError(f"{flag} {value!r}: {e}") from e
    if not words:
        raise LocalError(f"{flag}: the command is empty")
    return words


def _signal_hook(value: str, timeout: float) -> dict[str, object]:
    pidfile, _, name = value.rpartition(":") if ":" in value else (value, "", "HUP")
    name = name.upper().removeprefix("SIG")
    if not pidfile or f"SIG{name}" not in signal.Signals.__members__:
        raise LocalError(f"--notify-signal {value!r}: expected PIDFILE or PIDFILE:SIGNAL "
                         "with a signal name such as HUP or USR1")
    return {"kind": "signal", "pidfile": str(Path(pidfile).absolute()), "signal": name,
            "timeout": timeout}


def hooks_from_flags(given: Collection[str], notify_http: tuple[str, ...],
                     notify_body: str | None, notify_command: tuple[str, ...],
                     notify_signal: tuple[str, ...], hook_timeout: float,
                     health_url: str | None, health_command: str | None,
                     health_expect_version: bool, health_timeout: float, health_attempts: int,
                     health_interval: float) -> dict[str, object]:
    """The ``[hooks]`` table the flags describe, validated; ``given``: the names of
    :data:`TIMING_FLAGS` the user set (the others hold their defaults)."""
    timing = set(given) & set(TIMING_FLAGS)
    has_health = health_url is not None or health_command is not None
    if health_url is not None and health_command is not None:
        raise LocalError("--health-url and --health-command exclude each other: choose one")
    if notify_body is not None and not notify_http:
        raise LocalError("--notify-body needs --notify-http")
    if health_expect_version and health_url is None:
        raise LocalError("--health-expect-version needs --health-url")
    if timing - {"hook_timeout"} and not has_health:
        flag = sorted(timing - {"hook_timeout"})[0].replace("_", "-")
        raise LocalError(f"--{flag} needs --health-url or --health-command")
    if "hook_timeout" in timing and not (notify_http or notify_command or notify_signal):
        raise LocalError("--hook-timeout needs --notify-http, --notify-command or --notify-signal")

    body = {"body": notify_body} if notify_body else {}
    notify: list[dict[str, object]] = [
        *({"kind": "http", "url": _url("--notify-http", u), **body, "timeout": hook_timeout}
          for u in notify_http),
        *({"kind": "command", "argv": _argv("--notify-command", c), "timeout": hook_timeout}
          for c in notify_command),
        *(_signal_hook(s, hook_timeout) for s in notify_signal),
    ]
    table: dict[str, object] = {"notify": notify} if notify else {}
    check = {"timeout": health_timeout, "attempts": health_attempts, "interval": health_interval}
    if health_url is not None:
        expect = {"expect_version": True} if health_expect_version else {}
        table["health"] = {"kind": "http", "url": _url("--health-url", health_url), **expect,
                           **check}
    elif health_command is not None:
        table["health"] = {"kind": "command", "argv": _argv("--health-command", health_command),
                           **check}
    from .hooks import parse_hooks  # asyncio: not for `--help`

    parse_hooks(table)
    return table
