"""The agent's configuration: an explicit dataclass, stored as TOML.

The click layer maps flags onto :class:`AgentConfig`; ``load_config`` and ``save_config`` are the
only code that reads or writes the file. Nothing here reads the environment at import time.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from manifest.errors import LocalError
from manifest.stores import write_atomic

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
    model_dir: Path
    device_id: str = ""
    interval: float = 300.0  # seconds between polls (jittered)
    include: tuple[str, ...] = ()  # fnmatch patterns of group names; empty: every group
    endpoint_url: str | None = None
    max_rate: float | None = None  # bytes per second for downloads
    keep: int = 2  # previous versions kept for rollback
    expiry_grace: float = 0.0  # seconds a manifest may be past its expiry (bad clocks)
    downloads: int = 4  # concurrent downloads
    hooks: dict[str, object] = field(default_factory=dict)  # used by the hot-swap issue

    @property
    def state_dir(self) -> Path:
        return self.model_dir / ".deltaship"

    @property
    def trust_path(self) -> Path:
        return self.state_dir / "root.json"


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        s = str(v).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{s}"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def save_config(cfg: AgentConfig, path: Path) -> None:
    lines = ["# deltaship-agent configuration (written by `deltaship-agent init`)"]
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if v is None or f.name == "hooks":
            continue
        lines.append(f"{f.name} = {_toml_value(v)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, ("\n".join(lines) + "\n").encode(), 0o644)


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
        return AgentConfig(**doc)
    except (KeyError, TypeError) as e:
        raise LocalError(f"{path}: incomplete or malformed configuration ({e})") from e
