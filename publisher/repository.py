"""The publisher's view of a store: verified root, manifest, release history and base groups.

Everything read back from the store is verified with :mod:`manifest.trust` before it is used,
exactly as a device would (signatures, and the store's own ``repository_id`` from its root), so
a publisher never builds on tampered content or on another store's documents. Release pointers
are unsigned: each must name the version of its key, and the index it names is verified before
use. The documents the
publisher writes go through here too, so every store key comes from :mod:`manifest.constants`
or :attr:`ObjectRef.key <manifest.metadata.ObjectRef.key>`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

from manifest.constants import MANIFEST_KEY, RELEASES_PREFIX, ROOT_KEY, release_pointer_key
from manifest.container import apply_container
from manifest.errors import (
    AlreadyExistsError,
    ConflictError,
    FormatError,
    HashMismatchError,
    MissingKeyError,
    MixAndMatchError,
    NotFoundError,
    OversizeError,
    StoreConfigError,
)
from manifest.metadata import (
    GroupEntry,
    Manifest,
    ObjectRef,
    ReleaseIndex,
    ReleasePointer,
    ReleaseRecord,
    Root,
    check_version,
)
from manifest.storage.store import Store
from manifest.trust import (
    MAX_MANIFEST_SIZE,
    MAX_ROOT_SIZE,
    StreamVerifier,
    verify_index,
    verify_manifest,
    verify_root,
)

from .cache import PublisherCache

__all__ = ["Repository"]

# The publisher re-signs manifests: an expired one is still a valid base to build on.
_PUBLISHER_GRACE = timedelta(days=365 * 100)


class Repository:
    def __init__(self, store: Store, now: datetime) -> None:
        self.store = store
        self.now = now
        self._root: Root | None = None

    def root(self) -> Root:
        if self._root is None:
            try:
                data = self.store.get(ROOT_KEY, MAX_ROOT_SIZE)
            except MissingKeyError as e:
                raise StoreConfigError(
                    f"{self.store.url} has no trust root: run `deltaship-publish init` first"
                ) from e
            self._root = verify_root(data, now=self.now, grace=_PUBLISHER_GRACE)
        return self._root

    def manifest(self) -> tuple[Manifest | None, str | None]:
        """The verified current manifest and its ETag, or (None, None) before the first release."""
        try:
            data, etag = self.store.get_with_etag(MANIFEST_KEY, MAX_MANIFEST_SIZE)
        except MissingKeyError:
            return None, None
        return verify_manifest(data, self.root(), now=self.now, grace=_PUBLISHER_GRACE), etag

    def releases(self) -> list[ReleaseRecord]:
        """Every released version, oldest first."""
        out = [
            self._record(key)
            for key in self.store.list(RELEASES_PREFIX)
            if key.endswith(".json")
        ]
        return sorted(out, key=lambda r: r.sequence)

    def release(self, version: str) -> ReleaseRecord:
        """The record of ``version``; NotFoundError if it was never released (or cannot be)."""
        never = f"version {version!r} was never released to {self.store.url}"
        try:
            key = release_pointer_key(check_version(version))
        except FormatError as e:
            raise NotFoundError(never) from e
        try:
            return self._record(key)
        except MissingKeyError as e:
            raise NotFoundError(never) from e

    def _record(self, key: str) -> ReleaseRecord:
        """The pointer at ``key``, which must name the version its key names (it is unsigned:
        a pointer copied over another one must not pass for that release)."""
        record = ReleaseRecord.from_bytes(self.store.get(key, ReleaseRecord.MAX_SIZE), key)
        if key != release_pointer_key(record.version):
            raise MixAndMatchError(
                f"{self.store.url}/{key} names version {record.version!r}: the (unsigned) "
                "release pointer was altered or copied from another release; restore or remove it"
            )
        return record

    def put_root(self, data: bytes) -> str:
        """Write the first trust root; returns its URL. Refuses to replace an existing one."""
        try:
            self.store.put_if(ROOT_KEY, data, None)
        except ConflictError as e:
            raise AlreadyExistsError(
                f"{self.store.url}/{ROOT_KEY} already exists: this store is initialised"
            ) from e
        return f"{self.store.url}/{ROOT_KEY}"

    def put_manifest(self, data: bytes, etag: str | None) -> None:
        """Replace the manifest only if it is still the one read with ``etag``."""
        try:
            self.store.put_if(MANIFEST_KEY, data, etag)
        except ConflictError as e:
            raise ConflictError(
                "another release or revert was published while this one ran, so this one was "
                "not made current: re-run the command to build on the new state"
            ) from e

    def put_release(self, record: ReleaseRecord) -> None:
        self.store.put(release_pointer_key(record.version), record.to_bytes())

    def index(self, pointer: ReleasePointer, named_by: str = "the manifest") -> ReleaseIndex:
        """The verified index ``pointer`` names (``named_by`` says where it comes from)."""
        data = self.store.get(pointer.index.key, pointer.index.length)
        return verify_index(data, pointer, self.root(), named_by=named_by)

    def fetch_object(self, ref: ObjectRef, dest: str, what: str) -> None:
        """Download an object to ``dest`` and check its length and sha256.

        The store's length is checked against the signed one first, so an object of the wrong
        size costs a HEAD (or a ``stat``), not a download into ``dest``.
        """
        size = self.store.size(ref.key)
        if size > ref.length:
            raise OversizeError(f"{what} is {size} bytes in the store, longer than the "
                                f"{ref.length} bytes the index pins: not downloaded")
        if size < ref.length:
            raise HashMismatchError(f"{what} is {size} bytes in the store, the index pins "
                                    f"{ref.length}: not downloaded")
        self.store.download(ref.key, dest, max_size=ref.length)
        v = StreamVerifier(ref.sha256, ref.length, what)
        with open(dest, "rb") as f:
            while block := f.read(1 << 22):
                v.update(block)
        v.finish()

    def group_file(self, group: GroupEntry, cache_dir: Path) -> Path:
        """A verified copy of a released group file, rebuilt from its full object, cached in
        :class:`~publisher.cache.PublisherCache` ``cache_dir`` (a hit is marked as used)."""
        cache = PublisherCache(cache_dir)
        hit = cache.lookup(group.sha256)
        if hit is not None:
            return hit
        path = cache.group_path(group.sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, obj = tempfile.mkstemp(dir=path.parent, prefix=".obj-")
        os.close(fd)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            self.fetch_object(group.full, obj, f"full object of group {group.name}")
            with os.fdopen(fd, "wb") as out:
                sha = apply_container(obj, None, out, expected=(group.sha256, group.length))
                out.flush()
                os.fsync(out.fileno())
            if sha != group.sha256:
                raise HashMismatchError(f"full object of group {group.name} rebuilds another file")
            os.replace(tmp, path)
        finally:
            for p in (obj, tmp):
                with contextlib.suppress(OSError):
                    os.unlink(p)
        return path
