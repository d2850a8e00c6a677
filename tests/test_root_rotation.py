"""Root rotation and fast-forward recovery on the device (TUF §5.3; python-tuf's tests ported).

Every case runs the real agent (:class:`edge_agent.updater.Agent`, one cycle per poll) on a
model directory against a store directory written document by document
(:class:`tests._root_chain.ChainStore`), through the real storage layer. The tables are
python-tuf's ``tests/test_updater_key_rotations.py`` (``root_rotation_cases`` and
``non_root_rotation_cases``) and the root and timestamp cases of
``tests/test_updater_top_level_update.py``: for each failing case the trust root pinned on
disk must be the last good one, byte for byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_agent.cli import main as agent_cli
from edge_agent.roots import RootRotationPending
from manifest.constants import root_version_key
from manifest.errors import (
    ExpiredError,
    LocalError,
    MissingKeyError,
    ReplayError,
    SignatureError,
    UntrustedDataError,
)
from manifest.trust import MAX_ROOT_ROTATIONS

from ._root_chain import ChainStore, Device
from ._served_store import ServedStore
from ._signed_docs import NOW, OTHER_REPO_ID

PAST = NOW - timedelta(days=5)


@dataclass(frozen=True)
class MdVersion:
    keys: list[int]
    threshold: int
    sigs: list[int]
    res: type[Exception] | None = None


def store_and_device(tmp_path: Path) -> tuple[ChainStore, Device]:
    """A store at root v1 with release v1, and a device that installed it."""
    store = ChainStore(tmp_path / "store")
    store.publish_root()
    store.release("v1")
    dev = Device(tmp_path / "dev", str(store.path), store.signed_roots[0])
    assert dev.poll().outcome == "updated"
    return store, dev


# -- python-tuf's root rotation matrix ---------------------------------------------------------

ROOT_ROTATION_CASES = {
    "1-of-1 key rotation": [
        MdVersion(keys=[1], threshold=1, sigs=[1]),
        MdVersion(keys=[2], threshold=1, sigs=[2, 1]),
        MdVersion(keys=[2], threshold=1, sigs=[2]),
    ],
    "1-of-1 key rotation, unused signatures": [
        MdVersion(keys=[1], threshold=1, sigs=[3, 1, 4]),
        MdVersion(keys=[2], threshold=1, sigs=[3, 2, 1, 4]),
        MdVersion(keys=[2], threshold=1, sigs=[3, 2, 4]),
    ],
    "1-of-1 key rotation fail: not signed with old key": [
        MdVersion(keys=[1], threshold=1, sigs=[1]),
        MdVersion(keys=[2], threshold=1, sigs=[2, 3, 4], res=SignatureError),
    ],
    "1-of-1 key rotation fail: not signed with new key": [
        MdVersion(keys=[1], threshold=1, sigs=[1]),
        MdVersion(keys=[2], threshold=1, sigs=[1, 3, 4], res=SignatureError),
    ],
    "3-of-5, sign with different keycombos": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 4, 1]),
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 1, 3]),
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 1, 3]),
    ],
    "3-of-5, one key rotated": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 4, 1]),
    ],
    "3-of-5, one key rotate fails: not signed with 3 new keys": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 2, 4], res=SignatureError),
    ],
    "3-of-5, one key rotate fails: not signed with 3 old keys": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 4, 5], res=SignatureError),
    ],
    "3-of-5, one key rotated, with intermediate step": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 2, 4, 5]),
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 4, 5]),
    ],
    "3-of-5, all keys rotated, with intermediate step": [
        MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        MdVersion(keys=[5, 6, 7, 8, 9], threshold=3, sigs=[0, 2, 4, 5, 6, 7]),
        MdVersion(keys=[5, 6, 7, 8, 9], threshold=3, sigs=[5, 6, 7]),
    ],
    "1-of-3 threshold increase to 2-of-3": [
        MdVersion(keys=[1, 2, 3], threshold=1, sigs=[1]),
        MdVersion(keys=[1, 2, 3], threshold=2, sigs=[1, 2]),
    ],
    "1-of-3 threshold bump to 2-of-3 fails: new threshold not reached": [
        MdVersion(keys=[1, 2, 3], threshold=1, sigs=[1]),
        MdVersion(keys=[1, 2, 3], threshold=2, sigs=[2], res=SignatureError),
    ],
    "2-of-3 threshold decrease to 1-of-3": [
        MdVersion(keys=[1, 2, 3], threshold=2, sigs=[1, 2]),
        MdVersion(keys=[1, 2, 3], threshold=1, sigs=[1, 2]),
        MdVersion(keys=[1, 2, 3], threshold=1, sigs=[1]),
    ],
    "2-of-3 threshold decr. to 1-of-3 fails: old threshold not reached": [
        MdVersion(keys=[1, 2, 3], threshold=2, sigs=[1, 2]),
        MdVersion(keys=[1, 2, 3], threshold=1, sigs=[1], res=SignatureError),
    ],
    "1-of-2 threshold increase to 2-of-2": [
        MdVersion(keys=[1], threshold=1, sigs=[1]),
        MdVersion(keys=[1, 2], threshold=2, sigs=[1, 2]),
    ],
}


@pytest.mark.parametrize("versions", list(ROOT_ROTATION_CASES.values()),
                         ids=list(ROOT_ROTATION_CASES))
def test_root_rotation(tmp_path: Path, versions: list[MdVersion]) -> None:
    """Each MdVersion is one root version: its root keys, threshold and who signed it. The
    device pins version 1 and polls once; the release is installed only when the whole chain
    verifies, and the root on disk is the newest one that did."""
    store = ChainStore(tmp_path / "store")
    for v in versions:
        store.roles["root"] = (v.keys, v.threshold)
        store.publish_root(v.sigs)
    store.release("v1")
    dev = Device(tmp_path / "dev", str(store.path), store.signed_roots[0])
    expected = versions[-1].res
    if expected is None:
        assert dev.poll().outcome == "updated"
        assert dev.pinned == store.signed_roots[-1]
        assert dev.current == "v1"
    else:
        with pytest.raises(expected):
            dev.poll()
        assert dev.pinned == store.signed_roots[-2]  # the last good root, persisted
        assert dev.current is None


# -- python-tuf's non-root rotations: the release and timestamp roles ------------------------

NON_ROOT_ROTATION_CASES = {
    "1-of-1 key rotation": MdVersion(keys=[2], threshold=1, sigs=[2]),
    "1-of-1 key rotation, unused signatures": MdVersion(keys=[1], threshold=1, sigs=[3, 1, 4]),
    "1-of-1 key rotation fail: not signed with new key":
        MdVersion(keys=[2], threshold=1, sigs=[1, 3, 4], res=SignatureError),
    "3-of-5, one key signature wrong: not signed with 3 expected keys":
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 2, 4], res=SignatureError),
    "2-of-5, one key signature missing: threshold not reached":
        MdVersion(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 4], res=SignatureError),
    "3-of-5, sign first combo": MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
    "3-of-5, sign second combo": MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 4, 1]),
    "3-of-5, sign third combo": MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 1, 3]),
    "3-of-5, sign fourth combo": MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[1, 2, 3]),
    "3-of-5, sign fifth combo": MdVersion(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[2, 3, 4]),
}


@pytest.mark.parametrize("role", ["release", "timestamp"])
@pytest.mark.parametrize("md", list(NON_ROOT_ROTATION_CASES.values()),
                         ids=list(NON_ROOT_ROTATION_CASES))
def test_non_root_rotations(tmp_path: Path, role: str, md: MdVersion) -> None:
    """Root v2 gives ``role`` new keys and threshold; the next release is signed for that role
    by ``md.sigs``. A device at v1 walks to root v2 and installs it only if they suffice."""
    store, dev = store_and_device(tmp_path)
    store.roles[role] = (md.keys, md.threshold)
    store.publish_root()
    keys = {"release_keys": md.sigs} if role == "release" else {"timestamp_keys": md.sigs}
    store.release("v2", **keys)  # type: ignore[arg-type]
    if md.res is None:
        assert dev.poll().outcome == "updated"
        assert dev.current == "v2"
    else:
        with pytest.raises(md.res):
            dev.poll()
        assert dev.current == "v1"
    assert dev.pinned == store.signed_roots[1]  # the root itself verified either way


# -- python-tuf's top-level root cases ---------------------------------------------------------


def test_first_poll_walks_to_the_newest_root(tmp_path: Path) -> None:
    store = ChainStore(tmp_path / "store")
    store.publish_root()
    store.publish_root()
    store.release("v1")
    dev = Device(tmp_path / "dev", str(store.path), store.signed_roots[0])
    assert dev.poll().outcome == "updated"
    assert dev.pinned == store.signed_roots[1]


def test_trusted_root_expired_still_fetches_its_successor(tmp_path: Path) -> None:
    """v2 expired: pinned but refused; then a fresh v3 is reached from the expired v2."""
    store, dev = store_and_device(tmp_path)
    store.publish_root(expires=PAST)
    store.release("v2")
    with pytest.raises(ExpiredError, match=r"trust root version 2 expired.*deltaship-publish root"):
        dev.poll()
    assert dev.pinned == store.signed_roots[1] and dev.current == "v1"
    store.publish_root()
    store.refresh()
    assert dev.poll().outcome == "updated"
    assert dev.pinned == store.signed_roots[2] and dev.current == "v2"


def test_a_device_whose_pinned_root_expired_follows_a_fresh_successor(tmp_path: Path) -> None:
    store, dev = store_and_device(tmp_path)
    dev.clock[0] = NOW + timedelta(days=400)  # root v1 expired at NOW + 365 days
    store.publish_root(expires=NOW + timedelta(days=800))
    store.release("v2", expires=NOW + timedelta(days=500),
                  timestamp_expires=NOW + timedelta(days=407))
    assert dev.poll().outcome == "updated"
    assert dev.pinned == store.signed_roots[1]


def test_an_expired_root_with_no_successor_is_refused_naming_the_fix(tmp_path: Path) -> None:
    _, dev = store_and_device(tmp_path)
    dev.clock[0] = NOW + timedelta(days=366)
    with pytest.raises(ExpiredError, match=r"trust root version 1 expired.*deltaship-publish root"):
        dev.poll()


def test_root_rotations_are_capped_per_poll(tmp_path: Path) -> None:
    """More successors than MAX_ROOT_ROTATIONS: exactly that many in one poll (each pinned),
    the rest at the next poll, which then installs."""
    store, dev = store_and_device(tmp_path)
    for _ in range(MAX_ROOT_ROTATIONS + 3):
        store.publish_root()
    store.release("v2")
    with pytest.raises(RootRotationPending, match=f"up to version {1 + MAX_ROOT_ROTATIONS}"):
        dev.poll()
    assert dev.pinned == store.signed_roots[MAX_ROOT_ROTATIONS]  # version 1 + 256
    assert dev.current == "v1"
    assert dev.poll().outcome == "updated"
    assert dev.pinned == store.signed_roots[-1] and dev.current == "v2"


def test_intermediate_root_incorrectly_signed(tmp_path: Path) -> None:
    store, dev = store_and_device(tmp_path)
    store.publish_root(signers=[])  # v2 unsigned
    store.publish_root()  # v3 correctly signed
    store.release("v2")
    with pytest.raises(SignatureError, match="trust root version 2"):
        dev.poll()
    assert dev.pinned == store.signed_roots[0]


def test_intermediate_root_expired(tmp_path: Path) -> None:
    store, dev = store_and_device(tmp_path)
    store.publish_root(expires=PAST)
    store.publish_root()
    store.release("v2")
    assert dev.poll().outcome == "updated"
    assert dev.pinned == store.signed_roots[2]


def test_final_root_incorrectly_signed(tmp_path: Path) -> None:
    store, dev = store_and_device(tmp_path)
    store.publish_root(signers=[])
    store.release("v2")
    with pytest.raises(SignatureError):
        dev.poll()
    assert dev.pinned == store.signed_roots[0]


@pytest.mark.parametrize("says", [1, 3], ids=["same version", "skipped version"])
def test_new_root_with_another_version_is_refused(tmp_path: Path, says: int) -> None:
    store, dev = store_and_device(tmp_path)
    store.publish_root(version=says)  # stored as roots/2.json
    store.release("v2")
    with pytest.raises(ReplayError, match=f"says it is version {says}"):
        dev.poll()
    assert dev.pinned == store.signed_roots[0]


def test_final_root_expired_is_refused_but_persisted(tmp_path: Path) -> None:
    store, dev = store_and_device(tmp_path)
    store.publish_root(expires=PAST)
    store.release("v2")
    with pytest.raises(ExpiredError):
        dev.poll()
    assert dev.pinned == store.signed_roots[1] and dev.current == "v1"


def test_a_missing_hinted_root_is_a_store_error_retried_next_poll(tmp_path: Path) -> None:
    store, dev = store_and_device(tmp_path)
    store.publish_root()
    store.publish_root()
    store.release("v2")
    (store.path / root_version_key(3)).rename(tmp_path / "held-back")
    with pytest.raises(MissingKeyError, match=r"names trust root version 3.*roots/3\.json"):
        dev.poll()
    assert dev.pinned == store.signed_roots[1]  # v2 verified and kept
    (tmp_path / "held-back").rename(store.path / root_version_key(3))
    assert dev.poll().outcome == "updated"
    assert dev.pinned == store.signed_roots[2]


# -- the timestamp (python-tuf's new_timestamp cases) -----------------------------------------


def test_new_timestamp_unsigned(tmp_path: Path) -> None:
    store, dev = store_and_device(tmp_path)
    store.release("v2", timestamp_keys=[3])  # not a timestamp key
    with pytest.raises(SignatureError, match="manifest timestamp"):
        dev.poll()
    assert dev.current == "v1"


def test_new_timestamp_version_rollback(tmp_path: Path) -> None:
    store, dev = store_and_device(tmp_path)
    store.refresh(timestamp_sequence=5)
    assert dev.poll().outcome == "up-to-date" and dev.state.highest_timestamp == 5
    store.refresh(timestamp_sequence=4)
    with pytest.raises(ReplayError, match="timestamp sequence 4 is older than 5"):
        dev.poll()
    assert dev.state.highest_timestamp == 5


def test_older_content_under_a_newer_timestamp_is_refused(tmp_path: Path) -> None:
    """The online timestamp key cannot bring back an older release: the content floor."""
    store, dev = store_and_device(tmp_path)
    old = store.last
    store.release("v2")
    assert dev.poll().outcome == "updated"
    store.last = old  # v1's content (sequence 1), release-signed, under timestamp sequence 3
    store.refresh()
    with pytest.raises(ReplayError, match="manifest sequence 1 is older than 2"):
        dev.poll()
    assert dev.current == "v2"


def test_new_timestamp_expired_names_refresh(tmp_path: Path) -> None:
    store, dev = store_and_device(tmp_path)
    store.refresh(timestamp_expires=PAST)
    with pytest.raises(ExpiredError, match="deltaship-publish refresh"):
        dev.poll()


def test_a_timestamp_over_content_the_release_keys_did_not_sign_is_refused(
        tmp_path: Path) -> None:
    """The timestamp key alone (online, easier to steal) cannot make a release."""
    store, dev = store_and_device(tmp_path)
    store.release("evil", release_keys=[11])  # the timestamp key signs the content too
    with pytest.raises(SignatureError, match=r"manifest has 0 valid signature.*'release' keys"):
        dev.poll()
    assert dev.current == "v1"


# -- fast-forward recovery ---------------------------------------------------------------------


def test_fast_forward_after_a_timestamp_key_rotation(tmp_path: Path) -> None:
    """python-tuf's test_new_timestamp_fast_forward_recovery."""
    store, dev = store_and_device(tmp_path)
    store.refresh(timestamp_sequence=99999)  # a stolen timestamp key
    assert dev.poll().outcome == "up-to-date"
    assert dev.state.highest_timestamp == 99999
    store.roles["timestamp"] = ([12], 1)
    store.timestamp_keys = [12]
    store.publish_root()
    store.release("v2", timestamp_sequence=1)
    assert dev.poll().outcome == "updated"
    state = dev.state
    assert (state.highest_timestamp, state.highest_sequence) == (1, 2)  # content floor kept
    store.release("v3", timestamp_keys=[11], timestamp_sequence=10**6)  # the stolen key
    with pytest.raises(SignatureError, match="not one of its 'timestamp' keys"):
        dev.poll()
    assert dev.current == "v2"


def test_compromise_drill_release_key_stolen(tmp_path: Path) -> None:
    """A stolen release (and timestamp) key publishes sequence 10^9 and devices take it; the
    root keys rotate them out; a good release with a low sequence installs without `init`,
    and nothing the stolen keys sign is accepted afterwards."""
    store, dev = store_and_device(tmp_path)
    store.release("evil", sequence=10**9, timestamp_sequence=10**9)
    assert dev.poll().outcome == "updated" and dev.current == "evil"
    assert dev.state.highest_sequence == 10**9
    store.roles["release"] = ([12], 1)
    store.roles["timestamp"] = ([13], 1)
    store.release_keys, store.timestamp_keys = [12], [13]
    store.publish_root()
    store.release("good", sequence=2, timestamp_sequence=2)
    assert dev.poll().outcome == "updated" and dev.current == "good"
    state = dev.state
    assert (state.highest_sequence, state.highest_timestamp) == (2, 2)
    store.release("evil2", release_keys=[10], timestamp_keys=[11], sequence=10**9 + 1,
                  timestamp_sequence=10**9 + 1)
    with pytest.raises(SignatureError):
        dev.poll()
    assert dev.current == "good"
    with pytest.raises(SignatureError):  # and again at every poll
        dev.poll()
    assert dev.current == "good" and dev.pinned == store.signed_roots[1]


def test_a_release_key_rotation_alone_drops_both_floors(tmp_path: Path) -> None:
    store, dev = store_and_device(tmp_path)
    store.release("v2", sequence=500, timestamp_sequence=500)
    assert dev.poll().outcome == "updated"
    store.roles["release"] = ([12], 1)
    store.release_keys = [12]
    store.publish_root()
    store.release("v3", sequence=1, timestamp_sequence=1)
    assert dev.poll().outcome == "updated" and dev.current == "v3"


def test_fast_forward_survives_a_crash_after_the_root_was_pinned(tmp_path: Path) -> None:
    """The walk pins the new root before the state forgets the floors: a device stopped in
    between still forgets them at its next poll (the state records which keys set them)."""
    store, dev = store_and_device(tmp_path)
    store.release("evil", sequence=10**9, timestamp_sequence=10**9)
    dev.poll()
    store.roles["release"] = ([12], 1)
    store.release_keys = [12]
    new_root = store.publish_root()
    dev.layout.pin_root(new_root)  # the walk's first write, then "power cut"
    store.release("good", sequence=2, timestamp_sequence=2)
    assert dev.poll().outcome == "updated" and dev.current == "good"


def test_unchanged_keys_keep_the_floors(tmp_path: Path) -> None:
    """A rotation of the root keys alone forgets nothing: a replay is still refused."""
    store, dev = store_and_device(tmp_path)
    old = store.last
    store.release("v2")
    dev.poll()
    store.roles["root"] = ([5], 1)
    store.publish_root()
    store.last = old
    store.refresh()
    with pytest.raises(ReplayError):
        dev.poll()
    assert dev.pinned == store.signed_roots[1] and dev.current == "v2"


def test_untrusted_data_never_moves_the_pinned_root(tmp_path: Path) -> None:
    store, dev = store_and_device(tmp_path)
    (store.path / root_version_key(2)).write_bytes(b"{not json")
    store.release("v2", root_version=2)
    with pytest.raises(UntrustedDataError):
        dev.poll()
    assert dev.pinned == store.signed_roots[0]


# -- what a poll costs (over HTTP, counted at the server) --------------------------------------


def test_an_unchanged_poll_is_one_conditional_get_even_after_rotations(tmp_path: Path) -> None:
    """Roots are fetched only when the manifest names a newer one; before and after a walk
    (and after a fast-forward, which forgets the ETag once) an unchanged poll is a single
    conditional GET answered 304."""
    store = ChainStore(tmp_path / "store")
    store.publish_root()
    store.release("v1")
    with ServedStore(store.path, "fleet") as served:
        dev = Device(tmp_path / "dev", served.url, store.signed_roots[0])

        def poll() -> list[tuple[str, int]]:
            mark = served.mark()
            dev.poll()
            reqs, _ = served.since(mark)
            return [(r.path.split("/fleet/", 1)[1], r.status) for r in reqs]

        first = poll()
        assert first[0] == ("manifest.json", 200) and len(first) == 3  # + index, file
        assert poll() == [("manifest.json", 304)]
        store.roles["release"] = ([12], 1)
        store.release_keys = [12]
        store.publish_root()
        store.publish_root()
        store.release("v2", sequence=1, timestamp_sequence=1)
        walked = poll()
        assert walked[:3] == [("manifest.json", 200), ("roots/2.json", 200),
                              ("roots/3.json", 200)]
        assert dev.current == "v2" and len(walked) == 5
        assert poll() == [("manifest.json", 304)]
        assert dev.pinned == store.signed_roots[2]


# -- re-pinning (`deltaship-agent init --trust` again) -----------------------------------------


def test_pinning_another_repository_forgets_the_old_ones_floors(tmp_path: Path) -> None:
    store, dev = store_and_device(tmp_path)
    store.release("v2", sequence=1000, timestamp_sequence=1000)
    dev.poll()
    state = dev.layout.read_state()
    state.failed_versions = ["v3"]
    dev.layout.write_state(state)
    same = Device(tmp_path / "dev", str(store.path), store.signed_roots[0])  # same store
    assert same.state.highest_sequence == 1000 and same.state.failed_versions == ["v3"]

    other = ChainStore(tmp_path / "other", repository_id=OTHER_REPO_ID)
    other.roles = {"root": ([5], 1), "release": ([6], 1), "timestamp": ([7], 1)}
    other.release_keys, other.timestamp_keys = [6], [7]
    other.publish_root()
    other.release("w1")  # sequence 1: below the old store's floor
    moved = Device(tmp_path / "dev", str(other.path), other.signed_roots[0])
    state = moved.state
    assert (state.highest_sequence, state.highest_timestamp, state.manifest_etag) == (0, 0, None)
    assert state.failed_versions == [] and not moved.layout.has_manifest()
    assert moved.poll().outcome == "updated" and moved.current == "w1"
    assert moved.state.highest_sequence == 1


def test_status_command_shows_the_expiries_and_warns(tmp_path: Path) -> None:
    """`deltaship-agent status` (text and --json) after a walk: the trusted root's version,
    the three expiries, and a `warning:` line for the freshness this test's store let expire
    (its timestamp expired in March 2026, before any real clock running this)."""
    store, dev = store_and_device(tmp_path)
    store.publish_root()
    store.refresh()
    dev.poll()
    config = tmp_path / "dev-agent.toml"
    text = CliRunner().invoke(agent_cli, ["status", "--config", str(config)])
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert any(ln.startswith("trust root expires") and "version 2, 2027-03-01T12:00:00Z" in ln
               for ln in lines), text.output
    assert any(ln.startswith("release content expires") for ln in lines), text.output
    assert any(ln.startswith("freshness expires") for ln in lines), text.output
    warnings = [ln for ln in lines if ln.startswith("warning:")]
    assert any("freshness expired at" in w and "`deltaship-publish refresh`" in w
               for w in warnings), text.output
    doc = json.loads(CliRunner().invoke(agent_cli, ["status", "--json", "--config",
                                                    str(config)]).output)
    assert doc["root_version"] == 2 and doc["highest_timestamp"] == 2
    assert sorted(doc["expires"]) == ["content", "freshness", "root"]
    assert doc["expires"]["freshness"]["warning"].startswith("the freshness expired at")


def test_a_same_named_version_of_another_store_is_not_taken_for_the_live_one(
        tmp_path: Path) -> None:
    """Re-pinned to another store that also released "v1": the device's v1 is another release
    (its index pin differs), so it is neither "up to date" nor reused: one clear refusal."""
    _, dev = store_and_device(tmp_path)
    assert dev.current == "v1"
    other = ChainStore(tmp_path / "other", repository_id=OTHER_REPO_ID)
    other.roles = {"root": ([5], 1), "release": ([6], 1), "timestamp": ([7], 1)}
    other.release_keys, other.timestamp_keys = [6], [7]
    other.publish_root()
    other.release("v1")  # another index (it names the other repository)
    moved = Device(tmp_path / "dev", str(other.path), other.signed_roots[0])
    with pytest.raises(LocalError, match="version v1 on this device is another release"):
        moved.poll()
    assert moved.current == "v1"
