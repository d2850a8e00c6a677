"""A store history built directly (signed records and manifests, objects as files), and what a
correct garbage collector must keep in it: the oracle for tests/test_gc.py."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from manifest.canonical import canonical_json
from manifest.constants import manifest_key, object_key, release_record_key
from manifest.entries import ChainStep, IndexDelta, IndexPacking, PackedIndex
from manifest.metadata import (
    FileEntry,
    GroupEntry,
    Manifest,
    ObjectRef,
    PatchRef,
    ReleaseIndex,
    ReleasePointer,
    ReleaseRecord,
)
from manifest.rollout import Rollout
from manifest.storage.store import LocalStore, Store
from manifest.trust import sign_document

from ._signed_docs import NOW, REPO_ID, key, manifest_bytes, record_bytes, root_doc

KEYS = [key(11)]
OLD = timedelta(days=30)
YOUNG = timedelta(hours=1)


@dataclass
class Channel:
    sequence: int = 0
    records: list[tuple[int, str, str]] = field(default_factory=list)  # (seq, version, index)
    current: ReleasePointer | None = None
    candidate: ReleasePointer | None = None


@dataclass
class History:
    """Writes a store state step by step; remembers what each index references."""

    store: Store
    now: datetime
    channels: dict[str, Channel] = field(default_factory=dict)
    refs: dict[str, set[str]] = field(default_factory=dict)  # index sha -> objects
    pointers: dict[str, ReleasePointer] = field(default_factory=dict)  # version -> pointer
    pool: list[str] = field(default_factory=list)  # object shas written so far
    young: set[str] = field(default_factory=set)
    n: int = 0
    packed: bool = False  # pointers name packed index forms (zstd, a delta), written as objects

    def __post_init__(self) -> None:
        # A real trust root: gc verifies the release records to order them (history's order)
        self.store.put("root.json", sign_document(root_doc(KEYS).to_dict(), KEYS))

    def _object(self, data: bytes, young: bool) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.store.put(object_key(sha), data)
        if isinstance(self.store, LocalStore):
            t = (self.now - (YOUNG if young else OLD)).timestamp()
            os.utime(self.store.root / object_key(sha), (t, t))
        if young:
            self.young.add(sha)
        self.pool.append(sha)
        return sha

    def new_objects(self, count: int, young: bool) -> list[str]:
        out = []
        for _ in range(count):
            self.n += 1
            out.append(self._object(b"object %d" % self.n, young))
        return out

    def index(self, objects: list[str], young: bool) -> ReleasePointer:
        """A release index referencing ``objects`` (full, patches, chain steps, a file)."""
        self.n += 1
        version = f"v{self.n}"
        refs = [ObjectRef(s, 10, "dspatch") for s in objects] or [ObjectRef("0" * 64, 1,
                                                                            "dspatch")]
        content = [hashlib.sha256(b"content %d %d" % (self.n, i)).hexdigest() for i in range(4)]
        patches = tuple(PatchRef("v0", content[1], r) for r in refs[1:2])
        chain = tuple(ChainStep(content[2], content[1], 10, r) for r in refs[2:3])
        files = tuple(FileEntry("config.json", content[3], 3, ObjectRef(r.sha256, 10, "zstd"))
                      for r in refs[3:])
        group = GroupEntry("g", "g.safetensors", content[0], 10, (), refs[0], patches,
                           chain=chain)
        data = canonical_json(ReleaseIndex(version, NOW, (group,), files[:1],
                                           repository_id=REPO_ID).to_dict())
        sha = self._object(data, young)
        self.refs[sha] = {r.sha256 for r in refs if r.sha256 != "0" * 64}
        packing = IndexPacking()
        if self.packed:  # kept with the index: what its pointers and records name
            z, d = (self._object(b"%s of %s" % (kind, sha.encode()), young)
                    for kind in (b"zstd", b"delta"))
            packing = IndexPacking(PackedIndex(z, 9), (IndexDelta("1" * 64, d, 5),))
            self.refs[sha] |= {z, d}
        pointer = ReleasePointer(version, ObjectRef(sha, len(data), "json", packing=packing))
        self.pointers[version] = pointer
        return pointer

    def _manifest(self, name: str, action: str) -> None:
        ch = self.channels[name]
        assert ch.current is not None
        rollout = Rollout(ch.candidate, 1000) if ch.candidate is not None else None
        m = Manifest(ch.sequence, NOW + timedelta(days=30), NOW, ch.current, action,
                     repository_id=REPO_ID, channel=name, rollout=rollout)
        self.store.put(manifest_key(name), manifest_bytes(m, KEYS, KEYS))

    def _record(self, name: str, pointer: ReleasePointer) -> None:
        ch = self.channels[name]
        record = ReleaseRecord(pointer.version, ch.sequence, NOW, pointer.index,
                               repository_id=REPO_ID)
        self.store.put(release_record_key(pointer.version, name), record_bytes(record, KEYS))
        ch.records.append((ch.sequence, pointer.version, pointer.index.sha256))

    def release(self, name: str, objects: list[str], young: bool, rollout: bool) -> None:
        ch = self.channels.setdefault(name, Channel())
        pointer = self.index(objects, young)
        ch.sequence += 1
        if rollout and ch.current is not None:
            ch.candidate = pointer
        else:
            ch.current, ch.candidate = pointer, None
        self._manifest(name, "rollout" if ch.candidate else "release")
        self._record(name, pointer)

    def revert(self, name: str, back: int) -> None:
        ch = self.channels.get(name)
        if ch is None or not ch.records:
            return
        version = ch.records[-1 - back % len(ch.records)][1]
        ch.sequence += 1
        ch.current, ch.candidate = self.pointers[version], None
        self._manifest(name, "revert")

    def promote(self, src: str, dest: str) -> None:
        ch = self.channels.get(src)
        if ch is None or ch.current is None or src == dest:
            return
        to = self.channels.setdefault(dest, Channel())
        if any(v == ch.current.version for _, v, _ in to.records):
            return
        to.sequence += 1
        to.current, to.candidate = ch.current, None
        self._manifest(dest, "promote")
        self._record(dest, ch.current)

    def lost_race(self, objects: list[str], young: bool) -> None:
        """A release that uploaded its objects and index, then lost the manifest race."""
        self.index(objects, young)

    def reachable(self, keep: int) -> set[str]:
        """What a correct gc --keep ``keep`` must leave in place."""
        out: set[str] = set()
        for ch in self.channels.values():
            indexes = [i for _, _, i in sorted(ch.records)[-keep:]]
            indexes += [p.index.sha256 for p in (ch.current, ch.candidate) if p is not None]
            for sha in indexes:
                out |= {sha} | self.refs[sha]
        return out
