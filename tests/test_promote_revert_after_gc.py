"""``revert`` and ``promote`` after ``gc`` on a real store (real publisher processes): what
they make current names only objects the store holds, or they refuse in one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devtools import modelgen
from manifest.constants import manifest_key, object_key

from .conftest import Cli


@pytest.fixture(scope="module")
def ten_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("cycle-models")
    cfg = modelgen.MoEConfig(layers=1, experts=2, hidden=32, ffn=64, vocab=64, seed=1)
    models = [modelgen.generate_moe(d / "m1", cfg)]
    for i in range(2, 11):
        models.append(modelgen.train_experts(models[-1], d / f"m{i}", experts=[(0, i % 2)],
                                             seed=i))
    return models


def _store(cli: Cli, key: Path, models: list[Path], *extra: object) -> Path:
    store = cli.cwd / "store"
    store.mkdir()
    cli.publish("init", "--store", store, "--key", key)
    for i, model in enumerate(models, start=1):
        cli.publish("release", model, "--store", store, "--version", f"v{i}", "--key", key,
                    "--cache-dir", cli.cwd / "cache", *extra)
    return store


def _named_forms(store: Path, channel: str) -> list[str]:
    """Every object the channel's manifest names for its current release's index."""
    doc = json.loads((store / manifest_key(channel)).read_bytes())
    index = doc["signed"]["manifest"]["current"]["index"]
    forms = [index["sha256"]] + ([index["zstd"]["sha256"]] if "zstd" in index else [])
    return forms + [d["sha256"] for d in index.get("deltas", [])]


def test_promote_after_gc_names_no_packed_index_form_gc_deleted(
    cli: Cli, release_key: Path, ten_models: list[Path]
) -> None:
    """v9 ships its index as 8 deltas (--index-deltas 8); `revert --to v9` re-packs it with a
    delta from what devices run, dropping one of the record's (at most 8); `gc --keep 1`
    then deletes that one (only v9's record, no longer kept, names it). `promote` of v9 must
    not name it in the other channel's manifest: a device holding its base index would pick
    it and fail on a missing object every cycle (FORMAT §13 step 10 tries no other form)."""
    key = release_key
    store = _store(cli, key, ten_models, "--index-deltas", "8")
    record = json.loads((store / "releases" / "v9.json").read_bytes())
    assert len(record["signed"]["index"]["deltas"]) == 8
    cli.publish("revert", "--store", store, "--to", "v9", "--key", key)
    cli.publish("gc", "--store", store, "--keep", "1", "--grace", "0s")
    cli.publish("promote", "--store", store, "--from", "stable", "--to", "beta",
                "--version", "v9", "--key", key)
    missing = [s for s in _named_forms(store, "beta") if not (store / object_key(s)).exists()]
    assert missing == []
    beta = json.loads((store / "channels" / "beta" / "releases" / "v9.json").read_bytes())
    named = [beta["signed"]["index"]["zstd"]["sha256"]]
    named += [d["sha256"] for d in beta["signed"]["index"]["deltas"]]
    assert all((store / object_key(s)).exists() for s in named)


def test_revert_to_a_release_gc_deleted_says_so(cli: Cli, release_key: Path,
                                                ten_models: list[Path]) -> None:
    """v1's index and objects are gone after `gc --keep 1`: the revert is refused in one line
    that says why, not "still being published; retry later" (it never will be)."""
    store = _store(cli, release_key, ten_models[:5])
    cli.publish("gc", "--store", store, "--keep", "1", "--grace", "0s")
    before = (store / manifest_key("stable")).read_bytes()
    p = cli.publish("revert", "--store", store, "--to", "v1", "--key", release_key,
                    check=False)
    assert p.returncode == 4 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert "retry later" not in p.stderr
    assert "v1" in p.stderr and "gc" in p.stderr
    assert (store / manifest_key("stable")).read_bytes() == before
    p = cli.publish("promote", "--store", store, "--from", "stable", "--to", "beta",
                    "--version", "v1", "--key", release_key, check=False)
    assert p.returncode == 4 and "retry later" not in p.stderr and "gc" in p.stderr
    assert not (store / manifest_key("beta")).exists()


def test_release_with_index_deltas_from_a_release_gc_deleted(
    cli: Cli, release_key: Path, ten_models: list[Path]
) -> None:
    """`--index-deltas 8` asks for deltas from the indexes of the 8 most recent releases; the
    oldest were deleted by `gc --keep 1` (FORMAT §1 keeps the current release's bases, not
    every index a delta could start from). The release ships deltas from the indexes the store
    still holds instead of failing after its uploads, again on every retry."""
    store = _store(cli, release_key, ten_models[:5])
    cli.publish("gc", "--store", store, "--keep", "1", "--grace", "0s")
    gone = json.loads((store / "releases" / "v1.json").read_bytes())["signed"]["index"]
    assert not (store / object_key(gone["sha256"])).exists()
    cli.publish("release", ten_models[5], "--store", store, "--version", "v6", "--key",
                release_key, "--cache-dir", cli.cwd / "cache", "--index-deltas", "8")
    record = json.loads((store / "releases" / "v6.json").read_bytes())["signed"]["index"]
    bases = {d["from"] for d in record["deltas"]}
    assert gone["sha256"] not in bases and len(bases) >= 2  # v5's and v4's indexes at least
    assert all((store / object_key(d["sha256"])).exists() for d in record["deltas"])
    assert _named_forms(store, "stable")[0] == record["sha256"]


def test_release_after_revert_and_gc(cli: Cli, release_key: Path,
                                     ten_models: list[Path]) -> None:
    """v1..v6, `revert --to v2`, `gc --keep 1` (keeps v2, its bases and v6: v5's index goes),
    then v7 patches from v2, v6 and v5 (`--deltas-from 3`): it must release, from the bases
    the store still holds."""
    store = _store(cli, release_key, ten_models[:6])
    cli.publish("revert", "--store", store, "--to", "v2", "--key", release_key)
    cli.publish("gc", "--store", store, "--keep", "1", "--grace", "0s")
    v5 = json.loads((store / "releases" / "v5.json").read_bytes())["signed"]["index"]
    assert not (store / object_key(v5["sha256"])).exists()
    p = cli.publish("release", ten_models[6], "--store", store, "--version", "v7", "--key",
                    release_key, "--cache-dir", cli.cwd / "cache", check=False)
    assert p.returncode == 0, p.stderr
    assert _named_forms(store, "stable")[0] == json.loads(
        (store / "releases" / "v7.json").read_bytes())["signed"]["index"]["sha256"]


def test_promote_refuses_a_rollout_whose_candidate_is_the_fallback(
    cli: Cli, release_key: Path, ten_models: list[Path]
) -> None:
    """stable runs v1 with v2 rolling out; `promote --rollout` of v1 (from beta) would make v1
    both the fallback and the candidate: a `rollout --revoke` would then have every device
    record the version it runs as failed. Refused in one line; nothing written."""
    store = cli.cwd / "store"
    store.mkdir()
    k = ("--key", release_key, "--cache-dir", cli.cwd / "cache")
    cli.publish("init", "--store", store, "--key", release_key)
    cli.publish("release", ten_models[0], "--store", store, "--version", "v1", "--channel",
                "beta", *k)
    cli.publish("promote", "--store", store, "--from", "beta", "--to", "stable", "--version",
                "v1", "--key", release_key)
    cli.publish("release", ten_models[1], "--store", store, "--version", "v2", "--rollout",
                "10", *k)
    before = (store / manifest_key("stable")).read_bytes()
    p = cli.publish("promote", "--store", store, "--from", "beta", "--to", "stable",
                    "--version", "v1", "--rollout", "20", "--key", release_key, check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "already current" in p.stderr and "Traceback" not in p.stderr
    assert (store / manifest_key("stable")).read_bytes() == before
    cli.publish("promote", "--store", store, "--from", "beta", "--to", "stable", "--version",
                "v1", "--key", release_key)  # without --rollout: ends v2's rollout
    m = json.loads((store / manifest_key("stable")).read_bytes())["signed"]["manifest"]
    assert m["current"]["version"] == "v1" and "rollout" not in m
