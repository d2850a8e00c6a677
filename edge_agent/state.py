"""The agent's durable state (``<model-dir>/.deltaship/state.json``), written atomically.

It holds what must survive a restart or a power cut: the highest manifest sequence ever
verified (replay protection), the manifest's ETag, whether an operator pinned the device, the
versions that failed and must not be retried, and what the last check did.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from manifest.errors import LocalError
from manifest.storage.atomic import write_atomic

__all__ = ["AgentState", "live_stack", "load_state", "rollback_target", "save_state"]


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
    # The last update that went live: {"version", "from", "at", "downloaded_bytes",
    # "planned_bytes", "full_bytes", "groups_changed", "groups"}.
    last_update: dict[str, Any] | None = None
    # A switch whose hooks and health check have not given their verdict yet: {"from", "to"}.
    # Saved before `current` moves; a restart finishes the check (or switches back) first.
    pending_switch: dict[str, Any] | None = None
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


def live_stack(history: list[dict[str, Any]]) -> list[str]:
    """The versions a rollback goes back through, oldest first (pure).

    An update pushes the version it switched to; a rollback, or a switch back after a failed
    health check, pops back to the version it switched to. So repeated rollbacks go further
    back instead of bouncing between the last two versions.
    """
    stack: list[str] = []
    for h in history:
        frm, to = h.get("from"), h.get("to")
        if h.get("event") != "switch" or not isinstance(to, str):
            continue
        if h.get("reason") in ("rollback", "health check failed") and to in stack:
            del stack[len(stack) - stack[::-1].index(to):]
            continue
        if not stack and isinstance(frm, str):
            stack.append(frm)
        if not stack or stack[-1] != to:
            stack.append(to)
    return stack


def rollback_target(state: AgentState, current: str | None,
                    retained: Callable[[str], bool]) -> str | None:
    """The version ``deltaship-agent rollback`` goes to by default, or None (pure)."""
    for v in reversed(live_stack(state.history)):
        if v != current and v not in state.failed_versions and retained(v):
            return v
    return None
