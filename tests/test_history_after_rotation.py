"""``history`` and a release's view of "the most recent releases" after a release-key rotation,
whose manifest sequence starts again at 1 (real publisher processes, a directory store)."""

from __future__ import annotations

import json
from pathlib import Path

from manifest.constants import release_record_key

from .conftest import Cli, MoEFamily


def _keys(cli: Cli, d: Path, *names: str) -> None:
    for n in names:
        cli.publish("keygen", "--out", d, "--name", n)


def _rotated_store(cli: Cli, models: list[Path], tmp_path: Path, before: list[str],
                   after: list[str]) -> Path:
    """A directory store: ``before`` released (models[0], models[1], ...) under the first
    release key, the release key rotated (root edit, signed and published, the manifest
    refreshed: its sequence starts again at 1), then ``after`` under the new key."""
    k, store = tmp_path / "keys", tmp_path / "store"
    _keys(cli, k, "root", "rel", "rel2", "ts")
    store.mkdir()
    cli.publish("init", "--store", store, "--root-key", k / "root.key", "--release-key",
                k / "rel.pub", "--timestamp-key", k / "ts.pub")
    order = [(v, "rel") for v in before] + [(v, "rel2") for v in after]
    for i, (version, rel) in enumerate(order):
        if i == len(before):
            draft = tmp_path / "rot.draft"
            cli.publish("root", "edit", "--store", store, "--add-key",
                        f"release={k / 'rel2.pub'}", "--remove-key",
                        f"release={k / 'rel.pub'}", "--out", draft)
            cli.publish("root", "sign", draft, "--key", k / "root.key")
            cli.publish("root", "publish", draft, "--store", store)
            cli.publish("refresh", "--store", store, "--content", "--key", k / "rel2.key",
                        "--key", k / "ts.key")  # manifest sequence 1 under the new keys
        cli.publish("release", models[i], "--store", store, "--version", version, "--key",
                    k / f"{rel}.key", "--key", k / "ts.key", "--cache-dir", tmp_path / "cache")
    return store


def _sequences(store: Path, *versions: str) -> dict[str, int]:
    return {v: json.loads((store / release_record_key(v)).read_bytes())["signed"]["sequence"]
            for v in versions}


def test_history_after_a_release_key_rotation_lists_releases_in_release_order(
    cli: Cli, moe_family: MoEFamily, tmp_path: Path
) -> None:
    """b1, b2, b3 under the first release key; rotation; a4 under the new one (its sequence
    starts again: 2). `history` (and every reader of the channel's releases "oldest first":
    the bases of the next release, its index deltas) lists them b1, b2, b3, a4, not by bare
    sequence (b1, a4|b2, b3)."""
    models = [moe_family.v1, moe_family.v2, moe_family.v3, moe_family.v4]
    store = _rotated_store(cli, models, tmp_path, ["b1", "b2", "b3"], ["a4"])
    assert _sequences(store, "b1", "b2", "b3", "a4") == {"b1": 1, "b2": 2, "b3": 3, "a4": 2}
    h = json.loads(cli.publish("history", "--store", store, "--json").stdout)
    assert [r["version"] for r in h["releases"]] == ["b1", "b2", "b3", "a4"]
    assert h["releases"][-1]["current"]


def test_gc_keeps_the_most_recent_releases_after_a_release_key_rotation(
    cli: Cli, moe_family: MoEFamily, tmp_path: Path
) -> None:
    """b1..b3 under the first release key, a4 and a5 under the new one (sequences 2 and 3).
    `gc --keep 2` keeps the records of a5 and a4, the two most recent releases, not b3 and
    a5 as the bare sequence orders them (b1, a4|b2, a5|b3)."""
    models = [moe_family.v1, moe_family.v2, moe_family.v3, moe_family.v4, moe_family.v1]
    store = _rotated_store(cli, models, tmp_path, ["b1", "b2", "b3"], ["a4", "a5"])
    assert _sequences(store, "b3", "a4", "a5") == {"b3": 3, "a4": 2, "a5": 3}
    out = json.loads(cli.publish("gc", "--store", store, "--keep", "2", "--dry-run",
                                 "--json").stdout)
    records = {r["version"] for r in out["kept_releases"] if r["why"] == "record"}
    assert records == {"a4", "a5"}
