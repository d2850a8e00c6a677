"""Pure decisions of the agent: where a manual rollback goes, when the next poll comes."""

from __future__ import annotations

import pytest

from edge_agent.service import next_poll_delay
from edge_agent.state import AgentState, SwitchEvent, live_stack, rollback_target

AT = "2026-11-30T00:00:00Z"


def up(a: str | None, b: str) -> SwitchEvent:
    return SwitchEvent.switch(AT, a, b)


def back(a: str, b: str, reason: str = "rollback") -> SwitchEvent:
    return SwitchEvent.switch(AT, a, b, reason)


@pytest.mark.parametrize(("history", "stack"), [
    ([], []),
    ([up(None, "v1")], ["v1"]),
    ([up(None, "v1"), up("v1", "v2"), up("v2", "v3")], ["v1", "v2", "v3"]),
    # repeated rollbacks go further back instead of bouncing between the last two
    ([up(None, "v1"), up("v1", "v2"), up("v2", "v3"), back("v3", "v2")], ["v1", "v2"]),
    ([up(None, "v1"), up("v1", "v2"), up("v2", "v3"), back("v3", "v2"), back("v2", "v1")],
     ["v1"]),
    # a failed health check switched back: the failed version was never pushed
    ([up(None, "v1"), up("v1", "v2"), back("v3", "v2", "health check failed")], ["v1", "v2"]),
    # rollback --to a version that is not below: it is pushed
    ([up(None, "v1"), up("v1", "v2"), back("v2", "v0")], ["v1", "v2", "v0"]),
    # resume after a rollback, then update again
    ([up(None, "v1"), up("v1", "v2"), back("v2", "v1"), up("v1", "v3")], ["v1", "v3"]),
    # history older than the cap: the first switch's "from" starts the stack
    ([up("v7", "v8")], ["v7", "v8"]),
    # other events are ignored
    ([SwitchEvent(AT, "install", None, "v9"), up(None, "v1")], ["v1"]),
])
def test_live_stack(history: list[SwitchEvent], stack: list[str]) -> None:
    assert live_stack(history) == stack


def test_rollback_target_skips_failed_and_missing_versions() -> None:
    state = AgentState(history=[up(None, "v1"), up("v1", "v2"), up("v2", "v3"), up("v3", "v4")],
                       failed_versions=["v3"])
    retained = {"v1", "v3", "v4"}.__contains__
    assert rollback_target(state, "v4", retained) == "v1"  # v3 failed, v2 is gone
    assert rollback_target(state, "v1", {"v1"}.__contains__) is None


@pytest.mark.parametrize(("interval", "backoff", "retry_after", "delay"), [
    (300.0, 2.0, None, 2.0),  # backing off
    (300.0, None, None, 300.0),  # out of tries: the next poll
    (300.0, 2.0, 42.0, 42.0),  # the store asks for more than the backoff
    (30.0, None, 120.0, 120.0),  # ...or more than the interval
    (300.0, 60.0, 10**6, 3600.0),  # but cannot park the device for more than an hour
    (300.0, None, 10.0, 300.0),  # a shorter Retry-After does not make polls faster
])
def test_next_poll_delay(interval: float, backoff: float | None, retry_after: float | None,
                         delay: float) -> None:
    assert next_poll_delay(interval, backoff, retry_after) == delay
