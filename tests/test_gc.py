"""Garbage collection: never a reachable object, always the old unreachable ones; the CLI on
a directory and on moto's S3."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manifest.constants import OBJECTS_PREFIX, object_key, release_record_key
from manifest.storage.store import LocalStore, S3Store, Store, StoreOptions
from publisher.gc import DEFAULT_GRACE, collect, parse_duration

from ._gc_store import History
from .conftest import Cli

CHANNELS = ["stable", "beta", "edge-1"]
ops = st.lists(st.one_of(
    st.tuples(st.just("release"), st.sampled_from(CHANNELS), st.integers(0, 3),
              st.integers(0, 2), st.booleans(), st.booleans()),
    st.tuples(st.just("revert"), st.sampled_from(CHANNELS), st.integers(0, 5)),
    st.tuples(st.just("promote"), st.sampled_from(CHANNELS), st.sampled_from(CHANNELS)),
    st.tuples(st.just("lost"), st.integers(0, 3), st.booleans()),
), max_size=14)


def play(h: History, history: list[tuple[Any, ...]]) -> None:
    for op in history:
        if op[0] == "release":
            _, name, new, reused, young, rollout = op
            objects = h.new_objects(new, young) + h.pool[-reused:][:reused] if h.pool else []
            h.release(name, objects or h.new_objects(1, young), young, rollout)
        elif op[0] == "revert":
            h.revert(op[1], op[2])
        elif op[0] == "promote":
            h.promote(op[1], op[2])
        else:
            h.lost_race(h.new_objects(op[1], op[2]), op[2])


def objects_in(store: Store) -> set[str]:
    return {k[len(OBJECTS_PREFIX):] for k in store.list(OBJECTS_PREFIX)}


@settings(max_examples=60, deadline=None)
@given(ops, st.integers(1, 3), st.booleans())
def test_gc_keeps_every_reachable_object_and_deletes_old_unreachable_ones(
    history: list[tuple[Any, ...]], keep: int, packed: bool
) -> None:
    """``packed``: every index pointer also names packed forms of its index (FORMAT §5.3),
    which the oracle counts with the index (kept with it, referenced with it)."""
    with tempfile.TemporaryDirectory() as d:
        now = datetime.now(UTC).replace(microsecond=0)
        h = History(LocalStore(d), now, packed=packed)
        play(h, history)
        before = objects_in(h.store)
        reachable = h.reachable(keep)
        result = collect(h.store, now, keep, DEFAULT_GRACE, dry_run=False)
        after = objects_in(h.store)
        assert reachable & before <= after  # never a reachable object
        assert h.young & before <= after  # never a young one
        assert after == (reachable | h.young) & before  # and every other one goes
        assert {o.key for o in result.deleted} == {object_key(s) for s in before - after}
        named = {i for ch in h.channels.values() for _, _, i in ch.records}
        named |= {p.index.sha256 for ch in h.channels.values()
                  for p in (ch.current, ch.candidate) if p is not None}
        referenced = named.union(*(h.refs[i] for i in named))  # an index's own, not deeper
        lost = {k[len(OBJECTS_PREFIX):] for k in result.selection.lost}
        assert lost == before - reachable - referenced
        # a second run finds nothing more to delete
        assert collect(h.store, now, keep, DEFAULT_GRACE, dry_run=False).deleted == ()


def test_dry_run_deletes_nothing(tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    h = History(LocalStore(tmp_path), now)
    for _ in range(3):  # a full object, a patch, a chain step and a file each
        h.release("stable", h.new_objects(4, False), False, False)
    before = objects_in(h.store)
    r = collect(h.store, now, 1, DEFAULT_GRACE, dry_run=True)
    assert objects_in(h.store) == before and r.deleted == ()
    assert {o.key for o in r.selection.delete} == {object_key(s)
                                                   for s in before - h.reachable(1)}
    assert len(r.selection.delete) == 10 and r.reachable == 5  # two releases' indexes, objects


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("24h", 86400),
                                                ("7d", 604800), ("2w", 1209600)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


def _cli_history(store: Store, now: datetime) -> History:
    h = History(store, now)
    h.release("stable", h.new_objects(2, False), False, False)
    h.release("beta", h.new_objects(2, False), False, False)
    h.promote("beta", "stable")
    h.release("stable", h.new_objects(2, False), False, True)  # a rollout candidate
    h.lost_race(h.new_objects(1, False), False)
    return h


def _gc(cli: Cli, store: str, *args: object, check: bool = True) -> Any:
    p = cli.publish("gc", "--store", store, *args, check=check)
    return json.loads(p.stdout) if "--json" in args and p.returncode == 0 else p


def test_cli_on_a_directory(cli: Cli, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    h = _cli_history(LocalStore(store), datetime.now(UTC).replace(microsecond=0))
    before = objects_in(h.store)
    reachable = h.reachable(1)
    dry = _gc(cli, str(store), "--keep", "1", "--dry-run", "--json")
    assert dry["dry_run"] and objects_in(h.store) == before
    doomed = {d["key"] for d in dry["deleted"]}
    assert doomed == {object_key(s) for s in before - reachable}
    assert len(dry["lost_race_objects"]) == 2  # the lost release's object and its index
    text = _gc(cli, str(store), "--keep", "1").stdout
    assert f"deleted {len(doomed)} object(s), freed" in text and "lost races" in text
    assert objects_in(h.store) == before & reachable
    assert "deleted 0 object(s)" in _gc(cli, str(store), "--keep", "1").stdout


def test_cli_on_s3(cli: Cli, bucket: str, s3_endpoint: str) -> None:
    url = f"s3://{bucket}/fleet"
    s3 = S3Store(bucket, "fleet", StoreOptions(endpoint_url=s3_endpoint))
    h = _cli_history(s3, datetime.now(UTC))
    before, reachable = objects_in(s3), h.reachable(1)
    young = _gc(cli, url, "--keep", "1", "--json")  # everything is younger than a day
    assert young["deleted"] == [] and objects_in(s3) == before
    done = _gc(cli, url, "--keep", "1", "--grace", "0s", "--json")
    assert {d["key"] for d in done["deleted"]} == {object_key(s) for s in before - reachable}
    assert done["bytes_freed"] > 0 and objects_in(s3) == before & reachable


REFUSALS = [
    (("--keep", "0"), None, 2, "keep at least"),
    (("--keep", "1", "--grace", "soon"), None, 2, "duration 'soon'"),
    (("--keep", "1"), "no-root", 2, "not a deltaship store"),
    (("--keep", "1"), "missing-index", 4, "which the store lacks"),
    (("--keep", "1"), "bad-record", 3, "gc cannot read"),
]


@pytest.mark.parametrize(("args", "damage", "code", "message"), REFUSALS)
def test_cli_refusals(cli: Cli, tmp_path: Path, args: tuple[str, ...], damage: str | None,
                      code: int, message: str) -> None:
    store = tmp_path / "store"
    store.mkdir()
    h = _cli_history(LocalStore(store), datetime.now(UTC) - timedelta(days=2))
    before = objects_in(h.store)
    if damage == "no-root":
        (store / "root.json").unlink()
    elif damage == "missing-index":
        (store / h.channels["stable"].current.index.key).unlink()  # type: ignore[union-attr]
        before = objects_in(h.store)
    elif damage == "bad-record":
        (store / release_record_key("v999")).write_bytes(b"{not json")
    p = _gc(cli, str(store), *args, check=False)
    assert p.returncode == code, p.stderr
    assert p.stderr.count("\n") == 1 and message in p.stderr, p.stderr
    assert objects_in(h.store) == before
