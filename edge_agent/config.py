"""The agent's configuration: an explicit dataclass, stored as TOML.

The click layer maps flags onto :class:`AgentConfig`; ``load_config`` and ``save_config`` are the
only code that reads or writes the file. Nothing here reads the environment at import time.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from manifest.errors import LocalError
from manifest.storage.atomic import write_atomic

__all__ = ["AgentConfig", "default_config_path", "load_config", "save_config"]


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
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, 0o644)


def load_config(path: Path) -> AgentConfig:
    try:
        doc = tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError as e:
        raise LocalError(
            f"no agent configuration at {path}: run `deltaship-agent init` first"
        ) from e
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise LocalError(f"cannot read the agent configuration {path}: {e}") from e
    known = {f.name for f in fields(AgentConfig)}
    unknown = set(doc) - known
    if unknown:
        raise LocalError(f"{path}: unknown setting {sorted(unknown)[0]!r}")
    try:
        doc["model_dir"] = Path(doc["model_dir"])
        doc["include"] = tuple(doc.get("include", ()))
        doc["allow_redirect_hosts"] = tuple(doc.get("allow_redirect_hosts", ()))
        return AgentConfig(**doc)
    except (KeyError, TypeError) as e:
        raise LocalError(f"{path}: incomplete or malformed configuration ({e})") from e
