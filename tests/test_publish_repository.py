"""The publisher's repository against a real local store: the documents it writes and reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from manifest.constants import MANIFEST_KEY, ROOT_KEY, release_pointer_key, root_version_key
from manifest.errors import (
    AlreadyExistsError,
    ConflictError,
    FormatError,
    MixAndMatchError,
    NotFoundError,
    SignatureError,
)
from manifest.metadata import ObjectRef, ReleaseRecord
from manifest.storage.store import open_store
from publisher.repository import Repository

from ._signed_docs import NOW, REPO_ID, Repo, hexof, key, record_bytes

SIM = Repo()


def _repo(tmp_path: Path) -> Repository:
    repo = Repository(open_store(str(tmp_path)), NOW)
    repo.put_root(SIM.root_bytes)
    return repo


def _record(version: str, sequence: int) -> ReleaseRecord:
    return ReleaseRecord(version, sequence, NOW, ObjectRef(hexof("a"), 10, "json"),
                         repository_id=REPO_ID)


def _put(repo: Repository, record: ReleaseRecord, keys: list | None = None) -> bytes:
    data = record_bytes(record, SIM.release_keys if keys is None else keys)
    repo.store.put(release_pointer_key(record.version), data)
    return data


def test_release_records_round_trip_in_sequence_order(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    assert repo.releases() == []
    for version, seq in [("v2", 2), ("v10", 10), ("v1", 1)]:
        _put(repo, _record(version, seq))
    repo.store.put("releases/notes.txt", b"not a pointer")  # ignored: not <version>.json
    assert [r.record.version for r in repo.releases()] == ["v1", "v2", "v10"]
    assert repo.release("v10").record == _record("v10", 10)
    assert repo.release("v10").signed_under == 1


@pytest.mark.parametrize("version", ["v3", "../v1", "v1/../v1", ""])
def test_a_version_never_released(tmp_path: Path, version: str) -> None:
    repo = _repo(tmp_path)
    _put(repo, _record("v1", 1))
    message = f"version {version!r} was never released to"
    with pytest.raises(NotFoundError, match=re.escape(message)):
        repo.release(version)


def test_a_malformed_record_is_refused(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    repo.store.put("releases/v1.json", b'{"_type": "deltaship.release-record"}')
    with pytest.raises(FormatError, match="not a signed envelope"):
        repo.releases()


def test_a_record_copied_over_another_version_is_refused(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    data = _put(repo, _record("v1", 1))
    repo.store.put("releases/v2.json", data)
    with pytest.raises(MixAndMatchError, match="signed for version 'v1'"):
        repo.release("v2")


def test_a_record_signed_by_another_key_is_refused(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    _put(repo, _record("v1", 1), [key(99)])
    with pytest.raises(SignatureError, match="0 valid signature"):
        repo.release("v1")


def test_root_is_written_once_and_manifest_only_over_what_was_read(tmp_path: Path) -> None:
    repo = Repository(open_store(str(tmp_path)), NOW)
    assert repo.put_root(b"root-1") == f"{repo.store.url}/{ROOT_KEY}"
    assert repo.store.get(root_version_key(1), 100) == b"root-1"
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
