"""Review (serving/device side): a command hook's stderr is bounded on disk."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edge_agent.hooks import MAX_HOOK_STDERR, parse_hooks
from manifest.errors import HookError


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_hook_flooding_stderr_is_stopped_before_it_fills_the_disk(tmp_path: Path) -> None:
    """stderr goes to a temp file: a hook writing without end must not fill $TMPDIR until its
    timeout. It writes four times the cap, then records its pid and waits: the agent stops it
    (its whole process group) for its output, long before the timeout."""
    pid = tmp_path / "pid"
    script = (f"head -c {4 * MAX_HOOK_STDERR} /dev/zero >&2; sleep 60 & echo $! > {pid}; "
              "wait")
    hooks = parse_hooks({"notify": [{"kind": "command", "argv": ["sh", "-c", script],
                                     "timeout": 60}]})
    with pytest.raises(HookError) as e:
        asyncio.run(asyncio.wait_for(hooks.after_switch("v2", tmp_path), timeout=30))
    assert "stderr" in str(e.value) and "within" not in str(e.value), e.value
    assert len(str(e.value).splitlines()) == 1
    if pid.exists():  # it got that far: what it started is gone with it
        assert not _alive(int(pid.read_text()))


def test_a_failing_hook_still_reports_its_last_stderr_line(tmp_path: Path) -> None:
    hooks = parse_hooks({"notify": [{"kind": "command", "timeout": 30, "argv": [
        "sh", "-c", "echo first >&2; echo 'model not found' >&2; exit 3"]}]})
    with pytest.raises(HookError, match=r"^sh exited 3 model not found$"):
        asyncio.run(hooks.after_switch("v2", tmp_path))
