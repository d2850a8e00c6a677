"""The agent's durable state (``<model-dir>/.deltaship/state.json``), written atomically.

It holds what must survive a restart or a power cut: the highest manifest sequence ever
verified (replay protection), the manifest's ETag, whether an operator pinned the device, the
versions that failed and must not be retried, and what the last check did.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from manifest.errors import LocalError
from manifest.stores import write_atomic

__all__ = ["AgentState", "load_state", "save_state"]


@dataclass
class AgentState:
    device_id: str = ""
    highest_sequence: int = 0
    manifest_etag: str | None = None
    pinned: str | None = None  # version an operator rolled back to, until `resume`
    failed_versions: list[str] = field(default_factory=list)
    last_check: str | None = None
    last_result: str | None = None
    last_error: str | None = None
    bytes_last_update: int = 0
    bytes_total: int = 0
    plan: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # installs and switches


def load_state(path: Path) -> AgentState:
    try:
        doc = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return AgentState()
    except (OSError, ValueError) as e:
        raise LocalError(f"agent state {path} is unreadable ({e}): fix or remove it") from e
    known = AgentState.__dataclass_fields__
    return AgentState(**{k: v for k, v in doc.items() if k in known})


def save_state(state: AgentState, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state.history = state.history[-50:]
    write_atomic(path, json.dumps(asdict(state), indent=2, sort_keys=True).encode() + b"\n")
