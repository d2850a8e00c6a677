"""The agent's state file as typed records, and its pure decisions: where a manual rollback
goes, when the next poll comes."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.state import (
    HISTORY_KEPT,
    AgentState,
    FilePlan,
    GroupPlan,
    PendingSwitch,
    PlanRecord,
    SwitchEvent,
    UpdateRecord,
    live_stack,
    rollback_target,
)
from manifest.download_plan import make_plan
from manifest.errors import LocalError

from ._signed_docs import index_doc, key, root_doc

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


# --- state.json: typed records, the same file shape -----------------------------------------

# A state.json as the agent wrote it before typed records (and before `last_update` and
# `pending_switch` existed): it must load, and be written back with the same content.
OLD_STATE = {
    "bytes_last_update": 1234, "bytes_total": 5678, "device_id": "dev-1",
    "failed_versions": ["v3"], "highest_sequence": 4,
    "history": [
        {"at": "2026-11-01T10:00:00Z", "event": "switch", "from": None, "to": "v1"},
        {"at": "2026-11-02T10:00:00Z", "event": "switch", "from": "v1", "to": "v2"},
        {"at": "2026-11-03T10:00:00Z", "event": "switch", "from": "v2", "to": "v1",
         "reason": "rollback"},
    ],
    "last_check": "2026-11-03T10:00:00Z", "last_error": None, "last_result": "up to date at v2",
    "manifest_etag": "\"abc\"", "pinned": "v1",
    "plan": {"version": "v4", "download_bytes": 10, "full_bytes": 30,
             "groups": {"a": {"kind": "patch", "bytes": 10}, "b": {"kind": "have", "bytes": 0}},
             "files": {"config.json": {"bytes": 0}}},
}


def test_an_old_state_file_loads_and_is_written_back_unchanged() -> None:
    state = AgentState.from_json(json.dumps(OLD_STATE).encode(), "old.json")
    assert state.pinned == "v1" and state.failed_versions == ["v3"]
    assert state.plan is not None and state.plan.groups["a"] == GroupPlan("patch", 10)
    assert state.plan.groups_changed == 1
    assert state.history[2] == SwitchEvent.switch("2026-11-03T10:00:00Z", "v2", "v1", "rollback")
    assert state.last_update is None and state.pending_switch is None
    assert (state.highest_timestamp, state.floor_keys) == (0, {})  # format v3's, not known then
    written = json.loads(state.to_json())
    assert written == {**OLD_STATE, "last_update": None, "pending_switch": None,
                       "highest_timestamp": 0, "floor_keys": {}, "channel": "stable",
                       "report_pending": None}


def test_the_current_shape_round_trips_byte_for_byte() -> None:
    state = AgentState.from_json(json.dumps(OLD_STATE).encode(), "old.json")
    state.pending_switch = PendingSwitch("v1", "v4", failed="health check failed: 503")
    state.finish_update("v4", "v1", "2026-11-04T10:00:00Z")
    state.pending_switch = PendingSwitch("v4", "v5")
    data = state.to_json()
    assert data.endswith(b"}\n") and json.loads(data)["pending_switch"] == {"from": "v4",
                                                                            "to": "v5"}
    again = AgentState.from_json(data, "state.json")
    assert again == state and again.to_json() == data


def test_unknown_fields_are_kept_and_written_back() -> None:
    doc = copy.deepcopy(OLD_STATE)
    doc["from_a_newer_agent"] = {"x": [1, 2]}
    doc["plan"]["eta"] = 12  # type: ignore[index]
    doc["plan"]["groups"]["a"]["source"] = "mirror"  # type: ignore[index]
    doc["history"][0]["by"] = "operator"  # type: ignore[index]
    doc["highest_timestamp"] = 9
    doc["floor_keys"] = {"release": {"keyids": ["aa"], "threshold": 1, "since": "root v2"},
                         "mirror": {"keyids": [], "threshold": 0}}
    doc["pending_switch"] = {"from": "v1", "to": "v2", "since": "boot 3"}
    doc["channel"], doc["report_pending"] = "beta", {"state": "ok", "any": "thing"}
    doc["last_update"] = {"version": "v2", "from": "v1", "at": "2026-11-02T10:00:00Z",
                          "downloaded_bytes": 1, "planned_bytes": 1, "full_bytes": 2,
                          "groups_changed": 1, "groups": 2, "seconds": 4.5}
    state = AgentState.from_json(json.dumps(doc).encode(), "state.json")
    assert state.unrecognized == {"from_a_newer_agent": {"x": [1, 2]}}
    assert state.pending_switch == PendingSwitch("v1", "v2")
    assert state.highest_timestamp == 9
    assert json.loads(state.to_json()) == doc


def test_a_plan_record_says_what_the_plan_downloads() -> None:
    index = index_doc("1.0")
    layers0, layers1 = index.groups
    plan = make_plan(index, {layers0.sha256, layers1.patches[0].base_sha256})
    record = PlanRecord.of(plan)
    assert record.to_dict() == {
        "version": "1.0", "download_bytes": plan.download_bytes, "full_bytes": plan.full_bytes,
        "groups": {"layers.0": {"kind": "have", "bytes": 0},
                   "layers.1": {"kind": "patch", "bytes": layers1.patches[0].object.length}},
        "files": {"config.json": {"bytes": index.files[0].object.length},
                  "tokenizer/vocab.txt": {"bytes": 0}},  # same content as config.json: once
    }
    assert record.groups_changed == 1
    state = AgentState(plan=record, bytes_last_update=7)
    state.finish_update("1.0", "0.9", "2026-11-04T10:00:00Z")
    assert state.plan is None and state.last_update == UpdateRecord(
        "1.0", "0.9", "2026-11-04T10:00:00Z", downloaded_bytes=7,
        planned_bytes=plan.download_bytes, full_bytes=plan.full_bytes, groups_changed=1,
        groups=2)


def test_the_saved_history_keeps_the_newest_entries() -> None:
    state = AgentState(history=[up(f"v{i}", f"v{i + 1}") for i in range(HISTORY_KEPT + 7)])
    saved = AgentState.from_json(state.to_json(), "state.json").history
    assert saved == state.history[-HISTORY_KEPT:]


@pytest.mark.parametrize("data", [
    b"{not json", b"\xff\xfe", b"[]", b'{"history": 5}', b'{"highest_sequence": "4"}',
    b'{"highest_sequence": true}', b'{"failed_versions": ["v1", 2]}',
    b'{"pending_switch": {"from": "v1"}}', b'{"plan": {"version": "v2", "groups": []}}',
    b'{"history": [{"event": "switch", "to": 3}]}', b'{"last_update": "v2"}',
    b'{"highest_timestamp": -1.5}', b'{"floor_keys": []}', b'{"floor_keys": {"release": 1}}',
    b'{"floor_keys": {"release": {"keyids": [1], "threshold": 1}}}',
    b'{"floor_keys": {"release": {"keyids": []}}}',
])
def test_a_malformed_state_file_is_a_clear_local_error(data: bytes) -> None:
    with pytest.raises(LocalError, match=r"agent state /m/state.json is unreadable \(.*\): "
                                         r"fix or remove it"):
        AgentState.from_json(data, "/m/state.json")


_names = st.text("abcv0123456789.-", min_size=1, max_size=8)
_maybe = st.none() | _names
_count = st.integers(min_value=0, max_value=2**40)
_events = st.builds(SwitchEvent, at=_names, event=st.sampled_from(["switch", "install"]),
                    from_=_maybe, to=_maybe, reason=st.none() | st.sampled_from(
                        ["rollback", "health check failed"]))
_plans = st.builds(
    PlanRecord, version=_names, download_bytes=_count, full_bytes=_count,
    groups=st.dictionaries(_names, st.builds(GroupPlan, kind=st.sampled_from(
        ["have", "patch", "full"]), bytes=_count), max_size=4),
    files=st.dictionaries(_names, st.builds(FilePlan, bytes=_count), max_size=3))
_updates = st.builds(UpdateRecord, version=_names, from_=_maybe, at=_names,
                     downloaded_bytes=_count, groups=_count)
_states = st.builds(
    AgentState, device_id=st.text(max_size=8), highest_sequence=_count,
    highest_timestamp=_count, floor_keys=st.dictionaries(
        st.sampled_from(["release", "timestamp"]),
        st.fixed_dictionaries({"keyids": st.lists(_names, max_size=3).map(sorted),
                               "threshold": _count}), max_size=2),
    manifest_etag=_maybe,
    pinned=_maybe, failed_versions=st.lists(_names, max_size=3), last_check=_maybe,
    last_result=st.none() | st.text(max_size=20), last_error=st.none() | st.text(max_size=20),
    bytes_last_update=_count, bytes_total=_count, plan=st.none() | _plans,
    last_update=st.none() | _updates,
    pending_switch=st.none() | st.builds(PendingSwitch, from_=_maybe, to=_names,
                                         failed=st.none() | st.text(max_size=10)),
    history=st.lists(_events, max_size=5),
    unrecognized=st.dictionaries(st.text("xyz", min_size=1, max_size=3), st.integers(),
                                 max_size=2))


@given(_states)
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_any_state_round_trips(state: AgentState) -> None:
    data = state.to_json()
    again = AgentState.from_json(data, "state.json")
    assert again == state and again.unrecognized == state.unrecognized
    assert again.to_json() == data


# --- fast-forward recovery: which floors a new trust root makes the device forget ------------

K = [key(i) for i in range(1, 8)]
ROOT = root_doc([K[0]], [K[1]], timestamp_keys=[K[2]])


def floors(state: AgentState) -> tuple[int, int, str | None]:
    return state.highest_sequence, state.highest_timestamp, state.manifest_etag


@pytest.mark.parametrize(("new", "changed", "left"), [
    (root_doc([K[3]], [K[1]], timestamp_keys=[K[2]]), (), (40, 50, '"e"')),  # root keys only
    (root_doc([K[0]], [K[4]], timestamp_keys=[K[2]]), ("release",), (0, 0, None)),
    (root_doc([K[0]], [K[1]], timestamp_keys=[K[4]]), ("timestamp",), (40, 0, None)),
    (root_doc([K[0]], [K[4]], timestamp_keys=[K[5]]), ("release", "timestamp"), (0, 0, None)),
    (root_doc([K[0]], [K[1], K[4]], timestamp_keys=[K[2]]), ("release",), (0, 0, None)),
    (root_doc([K[0]], [K[1], K[4]], timestamp_keys=[K[2]], release_threshold=2),
     ("release",), (0, 0, None)),
    (root_doc([K[0]], [K[1]], timestamp_keys=[K[2], K[5]], timestamp_threshold=2),
     ("timestamp",), (40, 0, None)),
    (ROOT, (), (40, 50, '"e"')),
], ids=["root-keys", "release-keys", "timestamp-keys", "both", "release-key-added",
        "release-threshold", "timestamp-threshold", "same-root"])
def test_follow_root_forgets_the_floors_of_rotated_keys(
        new: object, changed: tuple[str, ...], left: tuple[int, int, str | None]) -> None:
    state = AgentState(highest_sequence=40, highest_timestamp=50, manifest_etag='"e"')
    assert state.follow_root(ROOT) == ()  # the first root seen: recorded, nothing forgotten
    assert floors(state) == (40, 50, '"e"')
    again = AgentState.from_json(state.to_json(), "state.json")  # the keys are saved
    assert again.follow_root(new) == changed  # type: ignore[arg-type]
    assert floors(again) == left
    assert again.follow_root(new) == ()  # type: ignore[arg-type]  # once only


def test_forget_store_resets_what_belonged_to_the_old_repository() -> None:
    state = AgentState(device_id="d", highest_sequence=4, highest_timestamp=9,
                       manifest_etag='"e"', failed_versions=["v2"], pinned="v1")
    state.follow_root(ROOT)
    state.forget_store()
    assert floors(state) == (0, 0, None) and state.failed_versions == []
    assert state.floor_keys == {} and (state.device_id, state.pinned) == ("d", "v1")
