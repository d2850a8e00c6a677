"""The agent's configuration: an explicit dataclass, stored as TOML.

The click layer maps flags onto :class:`AgentConfig`; ``load_config`` and ``save_config`` are the
only code that reads or writes the file. Nothing here reads the environment at import time.

Every setting has one rule in :data:`RULES` (its type and range; a new field is one line
there): ``load_config`` applies them to the file, :func:`check_config` to what ``init`` is
about to write, and a wrong setting is a :class:`~manifest.errors.LocalError` naming every wrong
field (``field = value: what it must be``), never a ``TypeError`` later in the update loop.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from manifest._fields import check_channel, check_device_id
from manifest.constants import DEFAULT_CHANNEL
from manifest.errors import FormatError, LocalError
from manifest.storage.atomic import write_atomic

__all__ = ["REPORT_MODES", "RULES", "AgentConfig", "check_config", "default_config_path",
           "load_config", "save_config"]


def default_config_path() -> Path:
    """/etc/deltaship/agent.toml for root, else the user's config directory."""
    if os.geteuid() == 0:
        return Path("/etc/deltaship/agent.toml")
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "deltaship" / "agent.toml"


@dataclass(frozen=True)
class AgentConfig:
    store: str
    model_dir: Path  # its contents: edge_agent.layout.DeviceLayout
    device_id: str = ""
    interval: float = 300.0  # seconds between polls (jittered)
    include: tuple[str, ...] = ()  # fnmatch patterns of group names; empty: every group
    endpoint_url: str | None = None
    max_rate: float | None = None  # bytes per second for downloads
    keep: int = 2  # previous versions kept for rollback
    expiry_grace: float = 0.0  # seconds a manifest may be past its expiry (bad clocks)
    downloads: int = 4  # concurrent downloads
    hooks: dict[str, object] = field(default_factory=dict)  # the [hooks] table (edge_agent.hooks)
    # Slow or hostile stores (manifest.storage.TransferLimits; docs/ERRORS.md "Slow stores"):
    document_deadline: float = 300.0  # seconds one try of the manifest or an index may take
    min_rate: float = 1024.0  # bytes/s over rate_window below which a transfer is abandoned
    rate_window: float = 60.0  # seconds
    allow_redirect_hosts: tuple[str, ...] = ()  # hosts an HTTP store may redirect to
    channel: str = DEFAULT_CHANNEL  # the store's manifest this device follows (FORMAT.md §5.2)
    # Device reports (edge_agent/report.py, docs/FORMAT.md §15): "off", or "store" (write
    # reports/<device-id>.json to the store: needs write credentials); and/or POST to report_url.
    report: str = "off"
    report_url: str | None = None
    report_deadline: float = 10.0  # seconds all report writes of one cycle may take


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_str(s: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped, the rest as is."""
    return '"' + "".join(
        _ESCAPES.get(c) or (f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else c) for c in s
    ) + '"'


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else _toml_str(k)


def _toml_value(v: object) -> str:
    """One TOML value on one line (tables become inline tables)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return _toml_str(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} to TOML")


def _toml_table(name: str, table: dict[str, object]) -> list[str]:
    """``[name]`` with one line per key; an array of tables is written one table per line."""
    lines = [f"[{_toml_key(name)}]"]
    for k, v in table.items():
        if isinstance(v, list | tuple) and any(isinstance(x, dict) for x in v):
            lines += [f"{_toml_key(k)} = ["] + [f"  {_toml_value(x)}," for x in v] + ["]"]
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    return lines



# -- the rules: one per setting --------------------------------------------------------------


class _Wrong(Exception):
    """One setting's value breaks its rule; the message says what the value must be."""


Rule = Callable[[Any], Any]  # the value as read from TOML -> the AgentConfig value, or _Wrong

REPORT_MODES = ("off", "store")
MAX_INTERVAL = 365 * 86400.0  # a poll interval (seconds)
MAX_EXPIRY_GRACE = 3650 * 86400.0  # ten years: beyond, expiry arithmetic leaves the calendar


def _text(what: str, *, empty: bool = True) -> Rule:
    def rule(v: Any) -> str:
        if not isinstance(v, str) or (not empty and not v):
            raise _Wrong(f"must be {what}")
        return v
    return rule


def _number(what: str, lo: float, hi: float, *, whole: bool = False) -> Rule:
    kind = "a whole number" if whole else "a number"
    limits = f"from {lo:.0f} to {hi:.0f}"

    def rule(v: Any) -> float | int:
        ok = isinstance(v, int) if whole else isinstance(v, int | float)
        if isinstance(v, bool) or not ok or not math.isfinite(v) or not lo <= v <= hi:
            raise _Wrong(f"must be {kind} {limits} ({what})")
        return v if whole else float(v)
    return rule


def _path(v: Any) -> Path:
    return Path(_text("a directory path", empty=False)(v))


def _patterns(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list | tuple) or not all(isinstance(p, str) and p.strip() for p in v):
        raise _Wrong('must be a list of non-empty group-name patterns, e.g. ["layers.3.experts.*"]')
    return tuple(v)


def _hosts(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list | tuple) or not all(isinstance(h, str) and h.strip() for h in v):
        raise _Wrong('must be a list of host names, e.g. ["cdn.example.com", "mirror:8443"]')
    return tuple(v)


def _channel(v: Any) -> str:
    try:
        return check_channel(v, "the channel")
    except FormatError as e:
        raise _Wrong(f"must be a channel name ({e})") from e


def _device_id(v: Any) -> str:
    """Empty (an older configuration: no reports) or a device id (FORMAT.md §15)."""
    if v == "":
        return ""
    try:
        return str(check_device_id(v))
    except FormatError as e:
        raise _Wrong("must be a device id: letters, digits, '.', '_', ':', '-', at most 128, "
                     "starting with a letter or digit") from e


def _report(v: Any) -> str:
    if v not in REPORT_MODES:
        raise _Wrong(f"must be one of {', '.join(map(repr, REPORT_MODES))}")
    return str(v)


def _url(v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", v):
        raise _Wrong("must be an http:// or https:// URL")
    return v


def _hooks(v: Any) -> dict[str, object]:
    if not isinstance(v, dict):
        raise _Wrong("must be a table ([hooks]: see edge_agent/hooks.py)")
    from .hooks import parse_hooks  # asyncio: not for `--help`

    try:
        parse_hooks(v)
    except LocalError as e:
        raise _Wrong(f"is wrong: {e}") from e
    return v


RULES: dict[str, Rule] = {
    "store": _text("a store URL or path", empty=False),
    "model_dir": _path,
    "device_id": _device_id,
    "interval": _number("seconds", 1, MAX_INTERVAL),
    "include": _patterns,
    "endpoint_url": _text("a URL", empty=False),
    "max_rate": _number("bytes per second", 1, 1e15),
    "keep": _number("versions", 0, 1000, whole=True),
    "expiry_grace": _number("seconds", 0, MAX_EXPIRY_GRACE),
    "downloads": _number("at once", 1, 64, whole=True),
    "hooks": _hooks,
    "document_deadline": _number("seconds", 1, MAX_INTERVAL),
    "min_rate": _number("bytes per second", 1, 1e15),
    "rate_window": _number("seconds", 1, 86400),
    "allow_redirect_hosts": _hosts,
    "channel": _channel,
    "report": _report,
    "report_url": _url,
    "report_deadline": _number("seconds", 1, 3600),
}


def _shown(v: Any) -> str:
    try:
        text = _toml_value(v)
    except TypeError:
        text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _validated(doc: dict[str, Any], where: str, flags: bool = False) -> AgentConfig:
    """``doc`` as an :class:`AgentConfig`, or one LocalError naming every wrong setting."""
    wrong: list[str] = []
    known = {f.name: f for f in fields(AgentConfig)}
    for name in sorted(set(doc) - set(known)):
        wrong.append(f"unknown setting {name!r}")
    values: dict[str, Any] = {}
    for name, f in known.items():
        label = f"--{name.replace('_', '-')}" if flags else name
        if name not in doc:
            if f.default is MISSING and f.default_factory is MISSING:
                wrong.append(f"missing setting {name!r}")
            continue
        rule = RULES.get(name, lambda v: v)
        try:
            values[name] = rule(doc[name])
        except _Wrong as e:
            wrong.append(f"{label} {'' if flags else '= '}{_shown(doc[name])}: {e}")
    if wrong:
        many = f"{len(wrong)} wrong settings: " if len(wrong) > 1 else ""
        raise LocalError(f"{where}{': ' if where else ''}{many}{'; '.join(wrong)}")
    return AgentConfig(**values)


def check_config(cfg: AgentConfig, where: str = "") -> AgentConfig:
    """``cfg`` (from flags) checked against :data:`RULES`; errors name the flags."""
    doc = {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) is not None}
    doc = {k: str(v) if isinstance(v, Path) else v for k, v in doc.items()}
    return _validated(doc, where, flags=True)


def save_config(cfg: AgentConfig, path: Path) -> None:
    lines = ["# deltaship-agent configuration (written by `deltaship-agent init`)"]
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if v is None or f.name == "hooks":
            continue
        lines.append(f"{f.name} = {_toml_value(v)}")
    if cfg.hooks:  # a table: after every top-level setting
        lines += ["", *_toml_table("hooks", cfg.hooks)]
    try:
        data = ("\n".join(lines) + "\n").encode()
    except UnicodeEncodeError as e:
        raise LocalError(f"cannot write {path}: a setting is not valid UTF-8 text") from e
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data, 0o644)
    except OSError as e:  # a full disk is a DiskFullError already
        why = "a file is in the way of its directory" if isinstance(
            e, FileExistsError | NotADirectoryError) else e.strerror
        raise LocalError(f"cannot write the agent configuration {path}: {why}") from e


def load_config(path: Path) -> AgentConfig:
    try:
        text = path.read_bytes().decode("utf-8")
        doc = tomllib.loads(text)
    except FileNotFoundError as e:
        raise LocalError(
            f"no agent configuration at {path}: run `deltaship-agent init` first"
        ) from e
    except OSError as e:
        raise LocalError(f"cannot read the agent configuration {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise LocalError(f"{path}: not a TOML file (not UTF-8 text at byte {e.start})") from e
    except tomllib.TOMLDecodeError as e:
        raise LocalError(f"{path}: not valid TOML: {e}") from e
    return _validated(doc, str(path))
