"""The publisher's repository against a real local store: the documents it writes and reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from manifest.constants import MANIFEST_KEY, ROOT_KEY
from manifest.errors import AlreadyExistsError, ConflictError, FormatError, NotFoundError
from manifest.metadata import ObjectRef, ReleaseRecord
from manifest.storage.store import open_store
from publisher.repository import Repository

from ._signed_docs import NOW, hexof


def _repo(tmp_path: Path) -> Repository:
    return Repository(open_store(str(tmp_path)), NOW)


def _record(version: str, sequence: int) -> ReleaseRecord:
    return ReleaseRecord(version, sequence, NOW, ObjectRef(hexof("a"), 10, "json"))


def test_release_records_round_trip_in_sequence_order(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    assert repo.releases() == []
    for version, seq in [("v2", 2), ("v10", 10), ("v1", 1)]:
        repo.put_release(_record(version, seq))
    repo.store.put("releases/notes.txt", b"not a pointer")  # ignored: not <version>.json
    assert (tmp_path / "releases" / "v1.json").read_bytes() == _record("v1", 1).to_bytes()
    assert [r.version for r in repo.releases()] == ["v1", "v2", "v10"]
    assert repo.release("v10") == _record("v10", 10)


@pytest.mark.parametrize("version", ["v3", "../v1", "v1/../v1", ""])
def test_a_version_never_released(tmp_path: Path, version: str) -> None:
    repo = _repo(tmp_path)
    repo.put_release(_record("v1", 1))
    message = f"version {version!r} was never released to"
    with pytest.raises(NotFoundError, match=re.escape(message)):
        repo.release(version)


def test_a_malformed_record_is_refused(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    repo.store.put("releases/v1.json", b'{"_type": "deltaship.release-pointer"}')
    message = "releases/v1.json: missing field 'spec_version'"
    with pytest.raises(FormatError, match=re.escape(message)):
        repo.releases()


def test_root_is_written_once_and_manifest_only_over_what_was_read(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    assert repo.put_root(b"root-1") == f"{repo.store.url}/{ROOT_KEY}"
    with pytest.raises(AlreadyExistsError, match="already exists: this store is initialised"):
        repo.put_root(b"root-2")
    repo.put_manifest(b"m1", None)
    _, etag = repo.store.get_with_etag(MANIFEST_KEY, 100)
    with pytest.raises(ConflictError, match="another release or revert was published"):
        repo.put_manifest(b"m2", None)
    repo.put_manifest(b"m2", etag)
    with pytest.raises(ConflictError):
        repo.put_manifest(b"m3", etag)
    assert repo.store.get(MANIFEST_KEY, 100) == b"m2"
