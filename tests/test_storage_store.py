"""The publisher's face of the storage layer, for real: S3 through moto's server, directories."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import boto3
import pytest

from manifest.errors import ConflictError, MissingKeyError, OversizeError, StoreConfigError
from manifest.storage.store import LocalStore, Store, StoreOptions, open_store


@pytest.fixture(params=["s3", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "s3":
        bucket = request.getfixturevalue("bucket")
        endpoint = request.getfixturevalue("s3_endpoint")
        return open_store(f"s3://{bucket}/pre/fix", StoreOptions(endpoint))
    (tmp_path / "store").mkdir()
    return open_store(str(tmp_path / "store"))


def test_get_put_list_exists(store: Store, tmp_path: Path) -> None:
    assert not store.exists("objects/a")
    with pytest.raises(MissingKeyError):
        store.get("objects/a", 100)
    store.put("objects/a", b"hello")
    src = tmp_path / "f"
    src.write_bytes(b"x" * 1000)
    store.put_file("objects/b", str(src))
    assert store.exists("objects/a") and store.get("objects/b", 1000) == b"x" * 1000
    assert store.list("objects/") == ["objects/a", "objects/b"]
    with pytest.raises(OversizeError):
        store.get("objects/b", 999)
    dest = tmp_path / "d"
    store.download("objects/a", str(dest))
    assert dest.read_bytes() == b"hello"


def test_conditional_put(store: Store) -> None:
    store.put_if("manifest.json", b"one", None)
    with pytest.raises(ConflictError):
        store.put_if("manifest.json", b"two", None)  # exists already
    data, etag = store.get_with_etag("manifest.json", 100)
    assert data == b"one"
    store.put_if("manifest.json", b"three", etag)
    with pytest.raises(ConflictError):
        store.put_if("manifest.json", b"four", etag)  # stale etag
    assert store.get("manifest.json", 100) == b"three"


def test_racing_conditional_puts_one_wins(store: Store) -> None:
    store.put_if("manifest.json", b"base", None)
    _, etag = store.get_with_etag("manifest.json", 100)
    results: list[str] = []
    barrier = threading.Barrier(8)

    def writer(i: int) -> None:
        barrier.wait()
        try:
            store.put_if("manifest.json", f"w{i}".encode(), etag)
            results.append("won")
        except ConflictError:
            results.append("lost")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("won") == 1 and results.count("lost") == 7


def test_multipart_upload(bucket: str, s3_endpoint: str, tmp_path: Path) -> None:
    store = open_store(f"s3://{bucket}/mp", StoreOptions(s3_endpoint,
                                                         multipart_threshold=5 * 2**20))
    big = tmp_path / "big"
    big.write_bytes(os.urandom(12 * 2**20))
    store.put_file("objects/big", str(big))
    head = boto3.client("s3", endpoint_url=s3_endpoint).head_object(Bucket=bucket,
                                                                   Key="mp/objects/big")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    dest = tmp_path / "back"
    store.download("objects/big", str(dest))
    assert dest.read_bytes() == big.read_bytes()


def test_local_store_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    store.put("a/b/c", b"1")
    store.put("a/b/c", b"2")
    assert (tmp_path / "a/b/c").read_bytes() == b"2"
    assert [p.name for p in (tmp_path / "a/b").iterdir()] == ["c"]


def test_store_urls(tmp_path: Path) -> None:
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    with pytest.raises(StoreConfigError, match="unsupported store URL"):
        open_store("ftp://x/y")
    with pytest.raises(StoreConfigError, match="no bucket"):
        open_store("s3:///prefix")
    with pytest.raises(StoreConfigError, match="does not exist"):
        open_store(str(tmp_path / "missing")).get("x", 1)


def test_http_stores_are_read_only_and_remote_files_refused() -> None:
    with pytest.raises(StoreConfigError, match="http\\(s\\) stores are read-only"):
        open_store("https://cdn.example/models")
    with pytest.raises(StoreConfigError, match="remote host"):
        open_store("file://elsewhere/x")
    with pytest.raises(StoreConfigError, match="use s3://bucket/prefix, file:///path"):
        open_store("ftp://x/y")


def test_list_refuses_prefixes_that_leave_the_store(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    assert store.list("") == [] and store.list("objects/") == []
    for prefix in ("../", "/etc/", "a//"):
        with pytest.raises(ValueError, match="not a store key"):
            store.list(prefix)
