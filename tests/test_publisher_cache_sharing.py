"""The publisher cache shared by releases running at once (review of the cycle paths): a
release's trim never removes a base file another running release was handed, and a base
that cannot be fetched leaves no file descriptor open."""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from manifest.errors import MissingKeyError
from manifest.metadata import GroupEntry, ObjectRef
from manifest.safetensors_format import SafetensorsFile
from manifest.storage.store import LocalStore
from publisher.cache import PublisherCache
from publisher.repository import Repository

from .conftest import Cli, MoEFamily


@pytest.fixture
def released(cli: Cli, release_key: Path, moe_family: MoEFamily, tmp_path: Path
             ) -> tuple[Repository, GroupEntry]:
    """A real store holding v1 (released by the CLI), its verified view and one group."""
    store = tmp_path / "store"
    store.mkdir()
    cli.publish("init", "--store", store, "--key", release_key)
    cli.publish("release", moe_family.v1, "--store", store, "--version", "v1", "--key",
                release_key, "--cache-dir", tmp_path / "unused-cache")
    repo = Repository(LocalStore(store), datetime.now(UTC))
    ts = repo.current_manifest().timestamp
    assert ts is not None
    return repo, repo.index(ts.current).groups[0]


def test_a_release_ending_does_not_trim_base_files_another_running_release_uses(
    released: tuple[Repository, GroupEntry], tmp_path: Path
) -> None:
    """Release A holds the cache and is handed a base file; release B (same cache, run at the
    same time with --cache-max-bytes 0) ends first. A must still be able to open its base:
    B's trim waits for the last release holding the cache."""
    repo, group = released
    cache_dir = tmp_path / "cache"
    a, b = PublisherCache(cache_dir), PublisherCache(cache_dir)
    a.begin()
    b.begin()
    path = repo.group_file(group, cache_dir)  # what release A's open_base_files gets
    b.end(0)  # release B finishes first
    with SafetensorsFile(path) as f:  # release A goes on to read its base
        assert f.size == group.length
    a.end(0)  # the last release out trims what no release uses any more
    assert not path.exists()


def test_the_last_release_out_trims_the_cache(released: tuple[Repository, GroupEntry],
                                              tmp_path: Path) -> None:
    repo, group = released
    cache_dir = tmp_path / "cache"
    a = PublisherCache(cache_dir)
    a.begin()
    path = repo.group_file(group, cache_dir)
    removed = a.end(0)
    assert not path.exists() and removed.files == 1 and removed.total_bytes == group.length


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_base_the_store_lacks_leaves_no_file_descriptor_open(
    released: tuple[Repository, GroupEntry], tmp_path: Path
) -> None:
    repo, group = released
    gone = dataclasses.replace(group, sha256="1" * 64,
                               full=ObjectRef("0" * 64, group.full.length, "dspatch"))
    cache_dir = tmp_path / "cache"
    repo.group_file(group, cache_dir)  # the cache directory exists: only the failure differs
    before = _open_fds()
    for _ in range(3):
        with pytest.raises(MissingKeyError):
            repo.group_file(gone, cache_dir)
    assert _open_fds() == before
    assert [p.name for p in (cache_dir / "groups").iterdir()] == [f"{group.sha256}.safetensors"]
