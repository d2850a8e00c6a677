"""The publisher's view of a store: verified root, manifest, release history and base groups.

Everything read back from the store is verified with :mod:`manifest.trust` before it is used,
exactly as a device would (signatures, and the store's own ``repository_id`` from its root), so
a publisher never builds on tampered content or on another store's documents. The newest root
is ``root.json``; documents signed by keys an older root listed (before a rotation) are
verified against the chain ``roots/1.json`` .. ``roots/<N>.json`` and marked as such: a
publisher may build on them (re-sign, revert, use as delta bases) but never passes them off as
signed by today's keys. The documents the publisher writes go through here too, so every store
key comes from :mod:`manifest.constants` or :attr:`ObjectRef.key
<manifest.metadata.ObjectRef.key>`.

A repository is the view of one **channel** (docs/FORMAT.md §5.2): its manifest and release
records live at the channel's keys and its manifest must name that channel, as a device
following it checks; roots and objects are shared by every channel of the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from manifest.canonical import canonical_json, loads_object
from manifest.constants import (
    DEFAULT_CHANNEL,
    MANIFEST_KEY,
    RELEASES_PREFIX,
    ROOT_KEY,
    channel_prefix,
    manifest_key,
    object_key,
    release_record_key,
    root_version_key,
)
from manifest.container import apply_container
from manifest.entries import MAX_INDEX_DELTAS, IndexPacking
from manifest.errors import (
    AlreadyExistsError,
    ConflictError,
    FormatError,
    HashMismatchError,
    MissingKeyError,
    MixAndMatchError,
    NotFoundError,
    OversizeError,
    SignatureError,
    StoreConfigError,
    UntrustedDataError,
)
from manifest.index_packing import pack_index
from manifest.metadata import (
    GroupEntry,
    ObjectRef,
    ReleaseIndex,
    ReleasePointer,
    ReleaseRecord,
    Root,
    Timestamp,
    check_version,
)
from manifest.storage.store import Store
from manifest.trust import (
    MAX_MANIFEST_SIZE,
    MAX_ROOT_SIZE,
    StreamVerifier,
    check_threshold,
    open_envelope,
    verify_index,
    verify_manifest,
    verify_record,
    verify_root,
    verify_successor,
)

from .cache import PublisherCache

__all__ = ["CurrentManifest", "Repository", "VerifiedRecord"]

# The publisher re-signs manifests: an expired one is still a valid base to build on.
_PUBLISHER_GRACE = timedelta(days=365 * 100)


@dataclass(frozen=True)
class CurrentManifest:
    """``manifest.json`` as the publisher finds it (``timestamp`` None before the first
    release). ``content_trusted``: the manifest inside is signed by the newest root's release
    keys (False: only by keys of an older root, before a rotation)."""

    timestamp: Timestamp | None
    manifest_signatures: tuple[Any, ...]
    etag: str | None
    content_trusted: bool = True
    timestamp_trusted: bool = True  # the timestamp is signed by the newest root's keys

    @property
    def next_sequence(self) -> int:
        """The next manifest sequence. It starts again at 1 when the keys that signed the
        current manifest are no longer the release keys: every device that reaches the newest
        root crosses that change and forgets its floor (fast-forward recovery, docs/FORMAT.md
        §13), so a stolen key's absurd sequence does not live on."""
        if self.timestamp is None or not self.content_trusted:
            return 1
        return self.timestamp.manifest.sequence + 1

    @property
    def next_timestamp(self) -> int:
        """The next timestamp sequence (starts again like :attr:`next_sequence`)."""
        if self.timestamp is None or not self.timestamp_trusted:
            return 1
        return self.timestamp.sequence + 1


@dataclass(frozen=True)
class VerifiedRecord:
    record: ReleaseRecord
    signed_under: int  # the root version whose release keys signed it (the newest, or older)


_CHANNELS_PREFIX = "channels/"


class Repository:
    def __init__(self, store: Store, now: datetime, channel: str = DEFAULT_CHANNEL) -> None:
        self.store = store
        self.now = now
        self.channel = channel  # checked by the caller (manifest._fields.check_channel)
        self._root: Root | None = None
        self._root_bytes = b""
        self._chain: list[Root] | None = None
        self._current: CurrentManifest | None = None
        self._indexes: dict[str, bytes] = {}  # index sha256 -> its bytes, once verified

    def root(self) -> Root:
        """The newest trust root (``root.json``), self-signed; an expired one still counts
        (the publisher is how it gets renewed)."""
        if self._root is None:
            try:
                data = self.store.get(ROOT_KEY, MAX_ROOT_SIZE)
            except MissingKeyError as e:
                raise StoreConfigError(
                    f"{self.store.url} has no trust root: run `deltaship-publish init` first"
                ) from e
            self._root = verify_root(data, now=None)
            self._root_bytes = data
        return self._root

    def root_bytes(self) -> bytes:
        self.root()
        return self._root_bytes

    def chain(self) -> list[Root]:
        """Every trust root, oldest first: ``roots/1.json`` .. the newest, each verified as the
        successor of the one before (what a device walks)."""
        if self._chain is None:
            newest = self.root()
            first = verify_root(self.store.get(root_version_key(1), MAX_ROOT_SIZE), now=None)
            chain = [first]
            while chain[-1].version < newest.version:
                n = chain[-1].version + 1
                chain.append(verify_successor(
                    self.store.get(root_version_key(n), MAX_ROOT_SIZE), chain[-1]))
            if chain[-1] != newest:
                raise UntrustedDataError(
                    f"{self.store.url}/{ROOT_KEY} is not the last root of its chain "
                    f"roots/1..{newest.version}.json: restore root.json from "
                    f"{root_version_key(newest.version)}"
                )
            self._chain = chain
        return self._chain

    def signed_under(self, body: bytes, signatures: list[Any], role: str, what: str) -> int:
        """The newest root version whose ``role`` keys signed ``body``: the newest root first,
        then older ones of the chain; SignatureError if none did."""
        root = self.root()
        try:
            check_threshold(root, role, body, signatures, what)
            return root.version
        except SignatureError as newest_error:
            for old in reversed(self.chain()[:-1]):
                try:
                    check_threshold(old, role, body, signatures, what)
                    return old.version
                except SignatureError:
                    continue
            raise newest_error from None

    @property
    def manifest_key(self) -> str:
        return manifest_key(self.channel)

    def for_channel(self, channel: str) -> Repository:
        """The view of another channel of the same store (the root read once is shared);
        ``self`` for its own channel."""
        if channel == self.channel:
            return self
        other = Repository(self.store, self.now, channel)
        other._root, other._root_bytes, other._chain = self._root, self._root_bytes, self._chain
        return other

    def channels(self) -> list[str]:
        """The channels that have a manifest, ``stable`` first if it has one."""
        found = [DEFAULT_CHANNEL] if self.store.exists(MANIFEST_KEY) else []
        for key in self.store.list(_CHANNELS_PREFIX):
            parts = key.split("/")
            if len(parts) == 3 and parts[2] == MANIFEST_KEY and parts[1] != DEFAULT_CHANNEL:
                found.append(parts[1])
        return found

    def channel_text(self) -> str:
        """``channel 'beta' of URL`` (for messages)."""
        return f"channel {self.channel!r} of {self.store.url}"

    def versions_elsewhere(self, version: str) -> list[str]:
        """The other channels whose release records include ``version``."""
        return [c for c in self.channels() if c != self.channel
                and self.store.exists(release_record_key(version, c))]

    def current_manifest(self) -> CurrentManifest:
        """The channel's manifest, verified; one signed by an older root's keys (before
        a rotation) is accepted to build on, and says so."""
        if self._current is None:
            self._current = self._read_manifest()
        return self._current

    def _read_manifest(self) -> CurrentManifest:
        try:
            data, etag = self.store.get_with_etag(self.manifest_key, MAX_MANIFEST_SIZE)
        except MissingKeyError:
            return CurrentManifest(None, (), None)
        root = self.root()
        try:
            ts = verify_manifest(data, root, now=self.now, grace=_PUBLISHER_GRACE,
                                 channel=self.channel)
            sigs = loads_object(data, "manifest").get("manifest_signatures", [])
            return CurrentManifest(ts, tuple(sigs), etag)
        except SignatureError:
            if root.version == 1:
                raise
        # Signed before a rotation: check every signature against the chain instead.
        doc = loads_object(data, "manifest")
        signed, inner_sigs = doc.get("signed"), doc.get("manifest_signatures")
        if not isinstance(signed, dict) or not isinstance(inner_sigs, list) \
                or not isinstance(doc.get("signatures"), list):
            raise FormatError("manifest is not a signed timestamp envelope")
        ts_under = self.signed_under(canonical_json(signed), doc["signatures"], "timestamp",
                                     "manifest timestamp")
        ts = Timestamp.from_dict(signed)
        content_under = self.signed_under(canonical_json(signed.get("manifest")), inner_sigs,
                                          "release", "manifest")
        for what, rid in (("manifest timestamp", ts.repository_id),
                          ("manifest", ts.manifest.repository_id)):
            if rid != root.repository_id:
                raise MixAndMatchError(f"{what} belongs to repository {rid}, not to "
                                       f"{root.repository_id}: restore the store's own")
        if ts.manifest.channel != self.channel:
            raise MixAndMatchError(f"{self.store.url}/{self.manifest_key} is the manifest of "
                                   f"channel {ts.manifest.channel!r}, not {self.channel!r}")
        return CurrentManifest(ts, tuple(inner_sigs), etag, content_under == root.version,
                               ts_under == root.version)

    def check_manifest_bytes(self, data: bytes) -> None:
        """What is about to be written verifies as a device would verify it (no expiry)."""
        verify_manifest(data, self.root(), now=self.now, grace=_PUBLISHER_GRACE,
                        channel=self.channel)

    @property
    def _releases_prefix(self) -> str:
        return channel_prefix(self.channel) + RELEASES_PREFIX

    def releases(self) -> list[VerifiedRecord]:
        """Every version released to the channel, oldest first: by the root whose release
        keys signed it, then by sequence (the sequence starts again at 1 once the release keys
        change, :attr:`CurrentManifest.next_sequence`)."""
        out = [
            self._record(key)
            for key in self.store.list(self._releases_prefix)
            if key.endswith(".json")
        ]
        return sorted(out, key=lambda r: (r.signed_under, r.record.sequence))

    def release(self, version: str) -> VerifiedRecord:
        """The channel's record of ``version``; NotFoundError if it was never released to the
        channel (or cannot be)."""
        where = (self.store.url if self.channel == DEFAULT_CHANNEL
                 else self.channel_text())
        never = f"version {version!r} was never released to {where}"
        try:
            key = release_record_key(check_version(version), self.channel)
        except FormatError as e:
            raise NotFoundError(never) from e
        try:
            return self._record(key)
        except MissingKeyError as e:
            raise NotFoundError(never) from e

    def _record(self, key: str) -> VerifiedRecord:
        """The signed record at ``key``, which must be for the version its key names."""
        version = key[len(self._releases_prefix):-len(".json")]
        data = self.store.get(key, ReleaseRecord.MAX_SIZE)
        where = f"{self.store.url}/{key}"
        try:
            record = verify_record(data, self.root(), version, where)
            return VerifiedRecord(record, self.root().version)
        except SignatureError:
            if self.root().version == 1:
                raise
        signed, sigs = open_envelope(data, where, ReleaseRecord.MAX_SIZE)
        under = self.signed_under(canonical_json(signed), sigs, "release", where)
        old = self.chain()[under - 1]
        return VerifiedRecord(verify_record(data, old, version, where), under)

    def put_root(self, data: bytes) -> str:
        """Write the first trust root (``roots/1.json`` and ``root.json``); returns the URL of
        ``root.json``. Refuses to replace an existing one."""
        try:
            self.store.put_if(ROOT_KEY, data, None)
        except ConflictError as e:
            raise AlreadyExistsError(
                f"{self.store.url}/{ROOT_KEY} already exists: this store is initialised"
            ) from e
        self.store.put(root_version_key(1), data)
        return f"{self.store.url}/{ROOT_KEY}"

    def put_root_version(self, version: int, data: bytes) -> None:
        """Add trust root ``version`` (never replacing one), then make it ``root.json``. The
        same bytes found there already are an interrupted publish of this root: finished."""
        try:
            self.store.put_if(root_version_key(version), data, None)
        except ConflictError as e:
            if self.store.get(root_version_key(version), MAX_ROOT_SIZE) == data:
                self.store.put(ROOT_KEY, data)
                self._root, self._chain = None, None
                return
            raise ConflictError(
                f"{self.store.url}/{root_version_key(version)} already exists: another root "
                "was published first; make the draft again from the store's newest root"
            ) from e
        self.store.put(ROOT_KEY, data)
        self._root, self._chain = None, None

    def put_manifest(self, data: bytes, etag: str | None) -> None:
        """Replace the manifest only if it is still the one read with ``etag``."""
        try:
            self.store.put_if(self.manifest_key, data, etag)
        except ConflictError as e:
            raise ConflictError(
                "another release or revert was published while this one ran, so this one was "
                "not made current: re-run the command to build on the new state"
            ) from e

    def index(self, pointer: ReleasePointer, named_by: str = "the manifest") -> ReleaseIndex:
        """The verified index ``pointer`` names (``named_by`` says where it comes from)."""
        return verify_index(self.index_bytes(pointer, named_by), pointer, self.root(),
                            named_by=named_by)

    def recorded_index(self, record: ReleaseRecord) -> ReleaseIndex:
        """The verified index the channel's record of a version pins. One the store no longer
        holds was deleted by gc (records are written after their index): a MissingKeyError
        (exit 4) that says the version can no longer be made current, not "still being
        published; retry later" (docs/FORMAT.md §1)."""
        key = release_record_key(record.version, self.channel)
        try:
            return self.index(record.pointer, key)
        except MissingKeyError as e:
            raise MissingKeyError(
                f"the release index of {record.version!r} ({record.index.key}), which {key} "
                f"pins, is gone from {self.store.url} (`deltaship-publish gc` deleted it): "
                f"{record.version} can no longer be made current"
            ) from e

    def index_bytes(self, pointer: ReleasePointer, named_by: str = "the manifest") -> bytes:
        """The exact bytes of the index ``pointer`` names, verified (read once per view)."""
        data = self._indexes.get(pointer.index.sha256)
        if data is None:
            data = self.store.get(pointer.index.key, pointer.index.length)
        verify_index(data, pointer, self.root(), named_by=named_by)
        self._indexes[pointer.index.sha256] = data
        return data

    def packed(self, pointer: ReleasePointer, bases: Sequence[ReleasePointer],
               max_deltas: int = MAX_INDEX_DELTAS, *, named_by: str = "the manifest",
               data: bytes | None = None) -> ReleasePointer:
        """``pointer`` with the packed forms of its index (docs/FORMAT.md §5.3): the ones it
        names that the store still holds, the zstd form if missing, and deltas from the
        indexes of ``bases`` the store still holds (most wanted first; at most
        ``max_deltas``). Packed objects the
        store lacks are uploaded here, before any manifest names them. ``data``: the index
        bytes when the caller has them (just written), else they are read and verified."""
        if data is None:
            data = self.index_bytes(pointer, named_by)
        old = pointer.index.packing
        zstd = old.zstd if old.zstd is not None and self.store.exists(old.zstd.key) else None
        keep = IndexPacking(zstd, tuple(d for d in old.deltas if self.store.exists(d.key)))
        base_bytes = []
        for b in bases:
            if b.index.sha256 == pointer.index.sha256:
                continue
            try:
                base_bytes.append(self.index_bytes(b, f"the pointer to {b.version}"))
            except MissingKeyError:  # gc deleted that release's index: no delta from it
                continue
        forms = pack_index(data, base_bytes, keep, max_deltas)
        for sha, blob in forms.objects.items():
            if not self.store.exists(object_key(sha)):
                self.store.put(object_key(sha), blob)
        return ReleasePointer(pointer.version,
                              dataclasses.replace(pointer.index, packing=forms.packing))

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
        os.close(fd)  # reopened once the object is here: a failed fetch leaks no descriptor
        try:
            self.fetch_object(group.full, obj, f"full object of group {group.name}")
            with open(tmp, "wb") as out:
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
