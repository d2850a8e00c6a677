"""Device trust state (in review): fast-forward recovery compares the SET of key ids of a
role (docs/FORMAT.md §13 step 5: "the set of key ids and the threshold"), like
:func:`manifest.trust.keys_changed` and the threshold rule (distinct key ids) do.

A root that lists a key id of the ``release`` role twice (valid: the threshold counts distinct
key ids) vouches for exactly the keys of its predecessor; it must not make devices forget their
replay floors (which would let a mirror replay any older manifest those same keys signed).
"""

from __future__ import annotations

import json
from dataclasses import replace

from edge_agent.state import AgentState
from manifest.metadata import Role, Root
from manifest.trust import keys_changed

from ._signed_docs import key, root_doc

K = [key(60 + i) for i in range(4)]
ROOT = root_doc([K[0]], [K[1], K[2]], timestamp_keys=[K[3]])


def _listed_twice(root: Root, role: str) -> Root:
    r = root.roles[role]
    roles = {**root.roles, role: Role((*r.keyids, r.keyids[0]), r.threshold)}
    return Root.from_dict(replace(root, version=root.version + 1, roles=roles).to_dict())


def test_a_key_listed_twice_is_the_same_set_of_keys() -> None:
    for role in ("release", "timestamp"):
        again = _listed_twice(ROOT, role)
        assert len(again.roles[role].keyids) == len(ROOT.roles[role].keyids) + 1
        assert not keys_changed(ROOT, again, role)
        state = AgentState(highest_sequence=40, highest_timestamp=50, manifest_etag='"e"')
        assert state.follow_root(ROOT) == ()
        saved = AgentState.from_json(state.to_json(), "state.json")
        assert saved.follow_root(again) == ()
        assert (saved.highest_sequence, saved.highest_timestamp, saved.manifest_etag) == \
            (40, 50, '"e"')
        # And back to the plain listing: still the same keys.
        assert saved.follow_root(ROOT) == ()
        assert (saved.highest_sequence, saved.highest_timestamp) == (40, 50)


def test_a_state_saved_with_a_key_listed_twice_reads_as_the_set() -> None:
    state = AgentState(highest_sequence=7, highest_timestamp=8)
    state.follow_root(_listed_twice(ROOT, "release"))
    raw = state.to_dict()
    raw["floor_keys"]["release"]["keyids"] *= 2  # as an agent with the old rule may have saved
    saved = AgentState.from_json(json.dumps(raw).encode(), "state.json")
    assert saved.follow_root(ROOT) == ()
    assert (saved.highest_sequence, saved.highest_timestamp) == (7, 8)
