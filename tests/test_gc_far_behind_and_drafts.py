"""Fleet (found in review): gc and the releases that keep far-behind devices on patches.

``release --checkpoint-every N`` patches from the most recent checkpoint releases (every N-th
release of the channel), which are older than the last few: ``gc --keep N`` (even with N at
least ``--deltas-from``, as the docs ask) used to delete their indexes and objects, and every
later checkpointed release then failed (exit 4, "missing from the store ... retry later")."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from manifest.constants import MANIFEST_KEY, object_key
from manifest.metadata import Manifest, ReleaseIndex, ReleaseRecord
from manifest.storage.store import LocalStore, StoredObject
from publisher.gc import collect, index_objects

from .conftest import Cli, MoEFamily


def _release(cli: Cli, store: str, key: Path, model: Path, version: str,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    return cli.publish("release", model, "--store", store, "--version", version, "--key", key,
                       "--deltas-from", "1", "--checkpoint-every", "2", check=check)


def _new_store(cli: Cli, tmp_path: Path) -> tuple[str, Path]:
    """An initialised directory store and its release key."""
    store = str(tmp_path / "store")
    Path(store).mkdir()
    cli.publish("keygen", "--out", tmp_path / "keys", "--name", "release")
    key = tmp_path / "keys" / "release.key"
    cli.publish("init", "--store", store, "--key", key)
    return store, key


def test_gc_keeps_the_checkpoint_releases_a_checkpointed_release_patches_from(
        cli: Cli, tmp_path: Path, moe_family: MoEFamily) -> None:
    store, key = _new_store(cli, tmp_path)
    f = moe_family
    for version, model in (("v1", f.v1), ("v2", f.v2), ("v3", f.v3), ("v4", f.v4)):
        _release(cli, store, key, model, version)
    records = {v: ReleaseRecord.from_dict(json.loads(
        (Path(store) / "releases" / f"{v}.json").read_bytes())["signed"], v).index
        for v in ("v1", "v2", "v3", "v4")}
    for o in (Path(store) / "objects").iterdir():  # written two days ago
        os.utime(o, (time.time() - 2 * 86400,) * 2)
    out = json.loads(cli.publish("gc", "--store", store, "--keep", "1", "--grace", "0s",
                                 "--json").stdout)
    kept = {(k["version"], k["why"]) for k in out["kept_releases"]}
    # v4 patched from v3 (--deltas-from 1) and from the checkpoint v1 (--checkpoint-every 2)
    assert kept == {("v4", "current"), ("v4", "record"), ("v3", "base"), ("v1", "base")}
    objects = LocalStore(store)
    assert not objects.exists(records["v2"].key)  # the rest still goes
    assert all(objects.exists(records[v].key) for v in ("v1", "v3", "v4"))
    p = _release(cli, store, key, f.v2, "v5", check=False)
    assert p.returncode == 0, p.stderr


def test_durations_too_long_for_a_date_are_one_line(cli: Cli, tmp_path: Path) -> None:
    store = ("--store", tmp_path / "nowhere")
    for args in (("gc", *store, "--keep", "1", "--grace", "999999999w"),
                 ("fleet", "status", *store, "--poll-interval", "100000w", "--stale", "10000")):
        p = cli.publish(*args, check=False)
        assert p.returncode == 2, (args, p.stderr)
        assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr
        assert "too long" in p.stderr, p.stderr


def test_gc_keeps_what_a_draft_in_progress_reuses_from_an_old_release(
        cli: Cli, tmp_path: Path, moe_family: MoEFamily) -> None:
    """A release uploads only the objects the store lacks: a ``--draft`` whose model shares
    content with an old release (here: v1's weights released again as v4) names v1's objects,
    written long ago. gc ran while the draft waited for its signatures (well within the grace
    period) and deleted them: the published v4 named objects the store no longer had."""
    store, key = _new_store(cli, tmp_path)
    f = moe_family
    for version, model in (("v1", f.v1), ("v2", f.v2), ("v3", f.v3)):
        cli.publish("release", model, "--store", store, "--version", version, "--key", key,
                    "--deltas-from", "1")
    for o in (Path(store) / "objects").iterdir():  # written two days ago
        os.utime(o, (time.time() - 2 * 86400,) * 2)
    draft = tmp_path / "v4.draft"
    cli.publish("release", f.v1, "--store", store, "--version", "v4", "--deltas-from", "1",
                "--draft", draft)
    cli.publish("gc", "--store", store, "--keep", "1")  # the default grace: 24 hours
    cli.publish("sign", draft, "--key", key)
    cli.publish("publish", draft, "--store", store)
    s = LocalStore(store)
    manifest = Manifest.from_dict(json.loads(s.get(MANIFEST_KEY, 1 << 20))["signed"]["manifest"])
    assert manifest.current.version == "v4"
    index = ReleaseIndex.from_dict(json.loads(s.get(manifest.current.index.key, 1 << 24)))
    missing = [sha for sha in index_objects(index) if not s.exists(object_key(sha))]
    assert missing == []


class _Cut(Exception):
    pass


def test_an_interrupted_gc_never_leaves_an_index_whose_objects_are_gone(
        cli: Cli, tmp_path: Path, moe_family: MoEFamily) -> None:
    """gc stopped part way (Ctrl-C, the store failing) had deleted some objects of an old
    release and not yet its index: `revert --to` that release then succeeded (it reads the
    record and the index, both still there) and devices were sent to missing objects. gc now
    deletes the indexes first: a cut leaves either the release whole or its index gone (and
    revert refuses)."""
    store, key = _new_store(cli, tmp_path)
    f = moe_family
    for version, model in (("v1", f.v1), ("v2", f.v2), ("v3", f.v3), ("v4", f.v4)):
        cli.publish("release", model, "--store", store, "--version", version, "--key", key,
                    "--deltas-from", "1")
    for o in (Path(store) / "objects").iterdir():  # written two days ago
        os.utime(o, (time.time() - 2 * 86400,) * 2)
    s = LocalStore(store)
    records = {v: ReleaseRecord.from_dict(json.loads(
        (Path(store) / "releases" / f"{v}.json").read_bytes())["signed"], v).index
        for v in ("v1", "v2")}
    indexes = {r.key for r in records.values()}
    done: list[str] = []

    def cut(o: StoredObject) -> None:
        done.append(o.key)
        if o.key not in indexes:
            raise _Cut  # gc stops after its first deletion of anything but an index

    with pytest.raises(_Cut):
        collect(s, datetime.now(UTC), 1, timedelta(hours=24), dry_run=False, on_delete=cut)
    assert done  # it did delete
    for version, ref in records.items():
        index = ReleaseIndex.from_dict(json.loads(s.get(ref.key, 1 << 24))) \
            if s.exists(ref.key) else None
        if index is not None:  # a release whose index is left is whole
            assert all(s.exists(object_key(sha)) for sha in index_objects(index)), version
    for version, ref in records.items():
        p = cli.publish("revert", "--store", store, "--to", version, "--key", key, check=False)
        if p.returncode == 0:  # only a release left whole
            index = ReleaseIndex.from_dict(json.loads(s.get(ref.key, 1 << 24)))
            assert all(s.exists(object_key(sha)) for sha in index_objects(index)), version
        else:
            assert p.returncode == 4 and p.stderr.count("\n") == 1, p.stderr
