"""LocalStore.put_file: a hard link (no copy) on the store's filesystem, a copy elsewhere."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from manifest.storage.store import LocalStore


def _store(tmp_path: Path) -> LocalStore:
    (tmp_path / "store").mkdir()
    return LocalStore(tmp_path / "store")


def test_put_file_links_a_file_on_the_same_filesystem(tmp_path: Path) -> None:
    store = _store(tmp_path)
    src = tmp_path / "staged"
    src.write_bytes(b"container bytes")
    src.chmod(0o600)
    store.put_file("objects/ab/cd", str(src))
    dest = tmp_path / "store" / "objects" / "ab" / "cd"
    assert dest.stat().st_ino == src.stat().st_ino  # no copy
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644  # as atomic_output leaves a file
    src.unlink()  # the publisher removes its staging afterwards
    assert store.get("objects/ab/cd", 100) == b"container bytes"
    assert store.list("objects") == ["objects/ab/cd"]  # no temp file left


def test_put_file_copies_when_it_cannot_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross_device(*args: object, **kwargs: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    store = _store(tmp_path)
    src = tmp_path / "staged"
    src.write_bytes(b"x" * 100_000)
    monkeypatch.setattr(os, "link", cross_device)
    store.put_file("objects/k", str(src))
    dest = tmp_path / "store" / "objects" / "k"
    assert dest.stat().st_ino != src.stat().st_ino
    assert dest.read_bytes() == src.read_bytes()
    assert store.list("objects") == ["objects/k"]


def test_put_file_replaces_an_existing_object(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.put("objects/k", b"old")
    src = tmp_path / "staged"
    src.write_bytes(b"new")
    store.put_file("objects/k", str(src))
    assert store.get("objects/k", 10) == b"new"
