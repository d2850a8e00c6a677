"""The publisher's view of a store: verified root, manifest, release history and base groups.

Everything read back from the store is verified with :mod:`manifest.trust` before it is used,
exactly as a device would, so a publisher never builds on tampered content.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from manifest.canonical import canonical_json, loads_object
from manifest.container import apply_container
from manifest.errors import (
    FormatError,
    HashMismatchError,
    MissingKeyError,
    NotFoundError,
    StoreConfigError,
)
from manifest.metadata import (
    GroupEntry,
    Manifest,
    ObjectRef,
    ReleaseIndex,
    ReleasePointer,
    Root,
    check_version,
    format_time,
    parse_time,
)
from manifest.stores import Store
from manifest.trust import (
    MAX_MANIFEST_SIZE,
    MAX_ROOT_SIZE,
    StreamVerifier,
    verify_index,
    verify_manifest,
    verify_root,
)

__all__ = ["MANIFEST_KEY", "ROOT_KEY", "ReleaseRecord", "Repository"]

ROOT_KEY = "root.json"
MANIFEST_KEY = "manifest.json"
RELEASES_PREFIX = "releases/"
_POINTER_TYPE = "deltaship.release-pointer"
# The publisher re-signs manifests: an expired one is still a valid base to build on.
_PUBLISHER_GRACE = timedelta(days=365 * 100)


@dataclass(frozen=True)
class ReleaseRecord:
    """``releases/<version>.json``: an unsigned pointer to a (signed) release index."""

    version: str
    sequence: int
    released_at: datetime
    pointer: ReleasePointer

    def to_bytes(self) -> bytes:
        return canonical_json(
            {
                "_type": _POINTER_TYPE,
                "spec_version": 1,
                "version": self.version,
                "sequence": self.sequence,
                "released_at": format_time(self.released_at),
                "index": self.pointer.to_dict()["index"],
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes, key: str) -> ReleaseRecord:
        d: dict[str, Any] = loads_object(data, key)
        if d.get("_type") != _POINTER_TYPE:
            raise FormatError(f"{key} is not a release pointer")
        seq = d.get("sequence")
        if not isinstance(seq, int):
            raise FormatError(f"{key}: sequence must be an integer")
        version = check_version(d.get("version"))
        pointer = ReleasePointer.from_dict({"version": version, "index": d.get("index")}, key)
        return cls(version, seq, parse_time(d.get("released_at"), key), pointer)


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
        out = []
        for key in self.store.list(RELEASES_PREFIX):
            if key.endswith(".json"):
                out.append(ReleaseRecord.from_bytes(self.store.get(key, 64 * 1024), key))
        return sorted(out, key=lambda r: r.sequence)

    def release(self, version: str) -> ReleaseRecord:
        key = f"{RELEASES_PREFIX}{version}.json"
        try:
            return ReleaseRecord.from_bytes(self.store.get(key, 64 * 1024), key)
        except MissingKeyError as e:
            raise NotFoundError(
                f"version {version!r} was never released to {self.store.url}"
            ) from e

    def index(self, pointer: ReleasePointer) -> ReleaseIndex:
        data = self.store.get(pointer.index.key, pointer.index.length)
        return verify_index(data, pointer, self.root())

    def fetch_object(self, ref: ObjectRef, dest: str, what: str) -> None:
        """Download an object to ``dest`` and check its length and sha256."""
        self.store.download(ref.key, dest)
        v = StreamVerifier(ref.sha256, ref.length, what)
        with open(dest, "rb") as f:
            while block := f.read(1 << 22):
                v.update(block)
        v.finish()

    def group_file(self, group: GroupEntry, cache_dir: Path) -> Path:
        """A verified copy of a released group file, rebuilt from its full object, cached."""
        path = cache_dir / "groups" / f"{group.sha256}.safetensors"
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, obj = tempfile.mkstemp(dir=path.parent, prefix=".obj-")
        os.close(fd)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            self.fetch_object(group.full, obj, f"full object of group {group.name}")
            with os.fdopen(fd, "wb") as out:
                sha = apply_container(obj, None, out)
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
