"""Device side (found in review): a command hook's stderr is bounded on disk."""

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


def test_an_endless_health_answer_is_read_only_as_far_as_needed(tmp_path: Path) -> None:
    """A health endpoint that streams without end (a broken or hostile model server): the agent
    reads a bounded prefix, so the check is decided on it instead of buffering the stream in
    memory until the timeout."""
    from aiohttp import web

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"serving v2 ")
        chunk = b"x" * 65536
        while True:
            await resp.write(chunk)
            await asyncio.sleep(0.001)

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/healthz", endless)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            hooks = parse_hooks({"health": {"kind": "http", "expect_version": True,
                                            "timeout": 20,
                                            "url": f"http://127.0.0.1:{port}/healthz"}})
            await asyncio.wait_for(hooks.after_switch("v2", tmp_path), timeout=60)
        finally:
            await runner.cleanup()

    asyncio.run(main())  # passes: the prefix names v2


def test_the_reported_line_is_the_last_one_even_after_much_output(tmp_path: Path) -> None:
    """A chatty hook (100 KiB of warnings, within the cap) then its real error: the error names
    the last line, not whatever line the first 64 KiB happen to end in."""
    script = ("i=0; while [ $i -lt 5000 ]; do echo 'warning: something minor' >&2; "
              "i=$((i+1)); done; echo 'fatal: the model server is down' >&2; exit 4")
    hooks = parse_hooks({"notify": [{"kind": "command", "timeout": 60,
                                     "argv": ["sh", "-c", script]}]})
    with pytest.raises(HookError) as e:
        asyncio.run(hooks.after_switch("v2", tmp_path))
    assert str(e.value) == "sh exited 4 fatal: the model server is down"
