"""Uploads (publisher/uploads.py): full objects start uploading while encoding goes on.

Against a real directory store (LocalStore); the early uploads are checked structurally: every
full object is in the store once encoding has returned, before anything asked for an upload.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from devtools import modelgen
from manifest.metadata import ObjectRef
from manifest.storage.store import LocalStore
from publisher.model_dir import open_model
from publisher.release import encode, hash_model_groups
from publisher.release_plan import plan_encoding
from publisher.uploads import Uploads


def _store(tmp_path: Path) -> LocalStore:
    (tmp_path / "store").mkdir()
    return LocalStore(tmp_path / "store")


def _staged(tmp_path: Path, data: bytes) -> tuple[str, str]:
    path = tmp_path / hashlib.sha256(data).hexdigest()[:12]
    path.write_bytes(data)
    return ObjectRef(hashlib.sha256(data).hexdigest(), len(data), "zstd").key, str(path)


def test_finish_uploads_what_the_store_lacks_once(tmp_path: Path) -> None:
    store = _store(tmp_path)
    a, b, c = (_staged(tmp_path, bytes([i]) * (100 + i)) for i in range(3))
    store.put_file(*c)  # already in the store: not counted
    uploads = Uploads(store, workers=2)
    try:
        uploads.start(*a)
        uploads.start(*a)  # started once
        stats = uploads.finish(dict([a, b, c]), progress=False)
    finally:
        uploads.close()
    assert (stats.objects, stats.total_bytes) == (2, 100 + 101)
    for key, path in (a, b, c):
        assert store.get(key, 1000) == Path(path).read_bytes()


def test_close_leaves_each_object_whole_or_absent(tmp_path: Path) -> None:
    """After a failure elsewhere: uploads not begun are dropped, a local store's copy or link
    in flight finishes (S3 uploads stop: tests/test_upload_cancel.py), and the staged files
    can go."""
    store = _store(tmp_path)
    staged = [_staged(tmp_path, bytes([i]) * 50_000) for i in range(12)]
    uploads = Uploads(store, workers=1)
    for key, path in staged:
        uploads.start(key, path)
    uploads.close()
    for key, path in staged:
        data = Path(path).read_bytes()
        Path(path).unlink()
        if store.exists(key):
            assert store.get(key, len(data)) == data
    assert not [p for p in (tmp_path / "store").rglob(".tmp-*")]  # no partial upload left


def test_a_failed_upload_is_raised_by_finish(tmp_path: Path) -> None:
    store = _store(tmp_path)
    key, path = _staged(tmp_path, b"x" * 10)
    Path(path).unlink()  # the staged file is gone: put_file fails
    uploads = Uploads(store, workers=1)
    try:
        with pytest.raises(OSError):
            uploads.finish({key: path}, progress=False)
    finally:
        uploads.close()
    assert not store.exists(key)


def test_encode_starts_every_full_object_upload(tmp_path: Path) -> None:
    model = modelgen.generate_moe(tmp_path / "m", modelgen.MoEConfig(layers=2, experts=3))
    store = _store(tmp_path)
    staging = tmp_path / "staging"
    staging.mkdir()
    uploads = Uploads(store, workers=2)
    with open_model(model) as m, ThreadPoolExecutor(2) as ex:
        groups = hash_model_groups(m, [], ex, False)
        plan = plan_encoding(groups, (), staging)
        try:
            results = encode(plan, {}, ex, 3, False, uploads)
            keys = {ObjectRef(r.sha256, r.length, "dspatch").key: r.task.out_path
                    for r in results}
            assert uploads.started == set(keys)  # all started while encoding, none after
            stats = uploads.finish(keys, progress=False)
        finally:
            uploads.close()
    assert len(results) == len(groups) > 3
    assert stats.objects == len(keys)
    for key, path in keys.items():
        assert store.get(key, 2**30) == Path(path).read_bytes()
