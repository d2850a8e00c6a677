"""The release pipeline (issue 12; found in review): a release with bases hashes the model's
groups in one read and encodes them in others. A tensor file written in between must stop the
release, not publish an index whose group hashes its new objects do not rebuild."""

from __future__ import annotations

import importlib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from manifest.errors import ModelError
from publisher.release import ReleaseConfig

from .conftest import Cli, MoEFamily


def test_a_tensor_file_written_between_hash_and_encode_is_refused(
    cli: Cli, release_key: Path, moe_family: MoEFamily, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rel = importlib.import_module("publisher.release")  # the package exports release()
    store = tmp_path / "store"
    store.mkdir()
    cache = tmp_path / "cache"
    cli.publish("init", "--store", store, "--key", release_key)
    cli.publish("release", moe_family.v1, "--store", store, "--version", "v1", "--key",
                release_key, "--cache-dir", cache)
    manifest = (store / "manifest.json").read_bytes()
    records = sorted(p.relative_to(store) for p in (store / "releases").rglob("*"))

    model = tmp_path / "v2"
    model.mkdir()
    for f in moe_family.v2.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    shard = next(model.glob("*.safetensors"))
    hash_groups = rel.hash_model_groups

    def hash_then_write(*args: Any) -> Any:
        out = hash_groups(*args)
        with open(shard, "r+b") as f:  # the last byte of the last tensor, same size
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0xFF]))
        return out

    monkeypatch.setattr(rel, "hash_model_groups", hash_then_write)
    cfg = ReleaseConfig(model, str(store), "v2", (release_key,), cache_dir=cache, workers=2,
                        known_stores=tmp_path / "known-stores", progress=False)
    with pytest.raises(ModelError, match="changed while it was read"):
        rel.release(cfg, datetime.now(UTC))
    assert (store / "manifest.json").read_bytes() == manifest  # v2 was not published
    assert sorted(p.relative_to(store) for p in (store / "releases").rglob("*")) == records
    assert not list(cache.glob("release-*"))
