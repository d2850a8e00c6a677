"""``deltaship-publish gc``: delete the store objects no release worth keeping references.

What is kept (docs/FORMAT.md §1, "Garbage collection"): for every channel (``stable`` at the
store's top, the others under ``channels/<name>/``), the release indexes of its last ``keep``
release records by sequence, of its manifest's current release and rollout candidate and of
the releases of the channel these two patched from (their indexes' ``deltas_from``), the
packed forms of those indexes their pointers name (``zstd``, ``deltas``), together with
every object those indexes reference (full objects, patches, chain steps, files); and every
object younger than the grace period, whatever references it (a release or a draft in
progress uploads its objects before anything names them), with every object that a release
index among them references (such a release reuses what the store already holds, however
old).

Everything else under ``objects/`` goes. Unreachable objects that no release record or
manifest of any channel ever referenced are reported apart as *lost races* (a release that
lost the manifest race, or a draft never published).

The manifests are read, not verified: gc uses them only to decide what to keep. The release
records are verified to order them as ``history`` does (by the root whose release keys signed
each one, then by sequence, which starts again after a release-key rotation); a record that
does not verify makes gc refuse. What gc cannot read in full (a manifest or record it cannot
parse, a kept release's index missing or not matching its pin) makes it refuse before
deleting anything. Just before deleting, the
channels' manifests and release records are read again; if any changed (a release ran), gc
deletes nothing and asks to be run again.

    select_deletions(objects, reachable, referenced, now, grace) -> Selection   (pure)
    collect(store, now, keep, grace, dry_run) -> GcResult                         (I/O)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from manifest.canonical import loads_object
from manifest.constants import (
    DEFAULT_CHANNEL,
    MANIFEST_KEY,
    OBJECTS_PREFIX,
    RELEASES_PREFIX,
    ROOT_KEY,
    channel_prefix,
    manifest_key,
)
from manifest.entries import ObjectRef
from manifest.errors import (
    ConflictError,
    DeltashipError,
    FormatError,
    HashMismatchError,
    LocalError,
    MissingKeyError,
    NotFoundError,
)
from manifest.metadata import ReleaseIndex, ReleaseRecord, Timestamp, check_channel
from manifest.storage.store import Store, StoredObject
from manifest.trust import MAX_INDEX_SIZE, MAX_MANIFEST_SIZE, open_envelope

from .repository import Repository

__all__ = ["DEFAULT_GRACE", "GcResult", "KeptRelease", "Selection", "channels", "collect",
           "index_objects", "parse_duration", "select_deletions"]

DEFAULT_GRACE = timedelta(hours=24)
_DURATION = re.compile(r"^(\d{1,9})([smhdw])\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``24h``, ``7d``, ``2w``."""
    m = _DURATION.match(text.strip())
    if not m:
        raise LocalError(f"duration {text!r} is not a number followed by s, m, h, d or w "
                         "(e.g. 24h)")
    try:
        return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
    except OverflowError:
        raise LocalError(f"duration {text!r} is too long") from None


@dataclass(frozen=True)
class KeptRelease:
    """A release whose index gc keeps, and why: "record" (one of the last N), "current" or
    "candidate" (named by the channel's manifest), "base" (the current release or the
    candidate patched from it)."""

    channel: str
    version: str
    why: str
    index: ObjectRef


@dataclass(frozen=True)
class Selection:
    delete: tuple[StoredObject, ...]  # unreachable and older than the grace period
    young: tuple[StoredObject, ...]  # unreachable but within the grace period: kept
    lost: frozenset[str]  # keys of unreachable objects nothing ever referenced
    # unreachable, older than the grace period, but named by a release index within it (a
    # draft waiting for its signatures): kept
    pending: tuple[StoredObject, ...] = ()


def index_objects(index: ReleaseIndex) -> set[str]:
    """The sha256 of every object ``index`` references (not the index itself)."""
    out = {f.object.sha256 for f in index.files}
    for g in index.groups:
        out.add(g.full.sha256)
        out |= {p.object.sha256 for p in g.patches}
        out |= {c.object.sha256 for c in g.chain}
    return out


def select_deletions(objects: Iterable[StoredObject], reachable: set[str],
                     referenced: set[str], now: datetime, grace: timedelta,
                     pending: set[str] | frozenset[str] = frozenset()) -> Selection:
    """Which of ``objects`` (keys under ``objects/``) go: not in ``reachable`` nor in
    ``pending`` (named by a release index younger than ``grace``: a draft) and last written at
    least ``grace`` before ``now``. ``referenced``: everything any release ever referenced
    (the rest are lost races)."""
    delete: list[StoredObject] = []
    young: list[StoredObject] = []
    kept: list[StoredObject] = []
    lost: set[str] = set()
    for o in objects:
        sha = o.key[len(OBJECTS_PREFIX):]
        if sha in reachable:
            continue
        if sha not in referenced:
            lost.add(o.key)
        if now - o.modified < grace:
            young.append(o)
        else:
            (kept if sha in pending else delete).append(o)
    return Selection(tuple(delete), tuple(young), frozenset(lost), tuple(kept))


def channels(store: Store) -> list[str]:
    """``stable`` and every channel with a key under ``channels/``."""
    names = {DEFAULT_CHANNEL}
    for key in store.list("channels/"):
        parts = key.split("/")
        if len(parts) >= 3:
            try:
                names.add(check_channel(parts[1], f"store key {key}"))
            except DeltashipError:
                continue  # not a channel this version writes: nothing of ours to keep
    return sorted(names)


@dataclass
class _Reader:
    """Reads what each channel names, remembering the bytes for the re-check."""

    store: Store
    seen: dict[str, str] = field(default_factory=dict)  # key -> sha256 of its bytes

    def read(self, key: str, cap: int) -> bytes:
        data = self.store.get(key, cap)
        self.seen[key] = hashlib.sha256(data).hexdigest()
        return data

    def releases(self, channel: str, keep: int, now: datetime
                 ) -> tuple[list[KeptRelease], list[ObjectRef], dict[str, ObjectRef]]:
        """(what to keep, every index any record or the manifest of ``channel`` names, the
        index of each version that has a record)."""
        kept: list[KeptRelease] = []
        try:
            data = self.read(manifest_key(channel), MAX_MANIFEST_SIZE)
        except MissingKeyError:
            self.seen[manifest_key(channel)] = ""
        else:
            where = f"{channel_prefix(channel)}{MANIFEST_KEY}"
            m = _parse(lambda: Timestamp.from_dict(open_envelope(data, where,
                                                                 MAX_MANIFEST_SIZE)[0]), where)
            kept.append(KeptRelease(channel, m.manifest.current.version, "current",
                                    m.manifest.current.index))
            if m.manifest.rollout is not None:
                c = m.manifest.rollout.candidate
                kept.append(KeptRelease(channel, c.version, "candidate", c.index))
        records = []
        prefix = f"{channel_prefix(channel)}{RELEASES_PREFIX}"
        for key in self.store.list(prefix):
            if "/" in key[len(prefix):] or not key.endswith(".json"):
                continue
            records.append(_record(self.read(key, ReleaseRecord.MAX_SIZE), key))
        order = _release_order(self.store, now, channel) if records else {}
        records.sort(key=lambda r: (order.get(r.version, -1), r.sequence, r.version))
        kept += [KeptRelease(channel, r.version, "record", r.index) for r in records[-keep:]]
        return (kept, [r.index for r in records] + [k.index for k in kept],
                {r.version: r.index for r in records})


def _release_order(store: Store, now: datetime, channel: str) -> dict[str, int]:
    """Each released version's place in the channel's release order, as ``history`` gives it:
    by the root whose release keys signed the record, then by sequence (the sequence starts
    again at 1 when the release keys change, so the bare sequence misorders the releases
    made before and after a rotation)."""
    where = f"the release records of channel {channel}"
    try:
        releases = Repository(store, now, channel).releases()
    except DeltashipError as e:
        raise type(e)(f"gc cannot order {where} ({e}): it deletes nothing until they verify "
                      "against the store's trust roots") from e
    return {r.record.version: i for i, r in enumerate(releases)}


def _record(data: bytes, key: str) -> ReleaseRecord:
    record: ReleaseRecord = _parse(
        lambda: ReleaseRecord.from_dict(open_envelope(data, key, ReleaseRecord.MAX_SIZE)[0], key),
        key)
    return record


def _parse(fn: Callable[[], Any], where: str) -> Any:
    try:
        return fn()
    except DeltashipError as e:
        raise type(e)(f"gc cannot read {where} ({e}), so it cannot tell what that channel "
                      "needs: it deletes nothing until the file is restored or removed") from e


@dataclass(frozen=True)
class GcResult:
    store: str
    kept: tuple[KeptRelease, ...]
    reachable: int  # objects kept because a kept release references them
    selection: Selection
    deleted: tuple[StoredObject, ...]  # what was deleted (nothing with dry_run)
    dry_run: bool

    @property
    def freed(self) -> int:
        return sum(o.size for o in self.selection.delete)

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.store, "dry_run": self.dry_run,
            "kept_releases": [{"channel": k.channel, "version": k.version, "why": k.why,
                               "index": k.index.sha256} for k in self.kept],
            "reachable_objects": self.reachable,
            "deleted": [{"key": o.key, "bytes": o.size, "lost_race": o.key in
                         self.selection.lost} for o in self.selection.delete],
            "deleted_objects": len(self.deleted),
            "bytes_freed": 0 if self.dry_run else self.freed,
            "bytes_to_free": self.freed,
            "young_kept": [o.key for o in self.selection.young],
            "in_progress_kept": [o.key for o in self.selection.pending],
            "lost_race_objects": sorted(self.selection.lost),
        }


def collect(store: Store, now: datetime, keep: int, grace: timedelta, *, dry_run: bool,
            on_plan: Callable[[Selection], None] | None = None,
            on_delete: Callable[[StoredObject], None] | None = None) -> GcResult:
    """Decide and (unless ``dry_run``) delete: ``on_plan`` sees the selection before the
    first deletion, ``on_delete`` each object after it is deleted."""
    if keep < 1:
        raise LocalError(f"--keep {keep}: keep at least the last release of every channel")
    if not store.exists(ROOT_KEY):
        raise NotFoundError(f"{store.url} is not a deltaship store (no {ROOT_KEY}): check "
                            "--store")
    reader = _Reader(store)
    kept: list[KeptRelease] = []
    named: list[ObjectRef] = []
    by_version: dict[str, dict[str, ObjectRef]] = {}
    for channel in channels(store):
        kept_here, named_here, by_version[channel] = reader.releases(channel, keep, now)
        kept += kept_here
        named += named_here
    objects = store.list_objects(OBJECTS_PREFIX)
    present = {o.key[len(OBJECTS_PREFIX):] for o in objects}
    indexes = {k.index.sha256: _kept_index(store, k, present) for k in _unique(kept)}
    kept += _bases(kept, indexes, by_version, store, present)
    reachable = {k.index.sha256 for k in kept}
    reachable |= {sha for k in kept for sha in k.index.packing.objects()}  # zstd, deltas
    for index in indexes.values():
        reachable |= index_objects(index)
    pending = _in_progress(store, objects, reachable, now, grace)
    referenced = set(reachable) | {ref.sha256 for ref in named}
    referenced |= {sha for ref in named for sha in ref.packing.objects()}
    for ref in _unique_refs(named):
        if ref.sha256 in present and ref.sha256 not in indexes:
            old = _index_or_none(store, ref)
            if old is not None:
                referenced |= index_objects(old)
    selection = select_deletions(objects, reachable, referenced, now, grace, pending)
    deleted: list[StoredObject] = []
    if on_plan is not None:
        on_plan(selection)
    if not dry_run and selection.delete:
        _check_unchanged(reader, now)
        # The indexes first: a gc cut short (Ctrl-C, the store failing) must not leave an
        # old release's index, which `revert` and `promote` trust, without its objects.
        indexes_named = {ref.sha256 for ref in named}
        for o in sorted(selection.delete,
                        key=lambda o: o.key[len(OBJECTS_PREFIX):] not in indexes_named):
            store.delete(o.key)
            deleted.append(o)
            if on_delete is not None:
                on_delete(o)
    return GcResult(store.url, tuple(kept), len(reachable & present), selection,
                    tuple(deleted), dry_run)


def _bases(kept: Sequence[KeptRelease], indexes: dict[str, ReleaseIndex],
           by_version: dict[str, dict[str, ObjectRef]], store: Store, present: set[str]
           ) -> list[KeptRelease]:
    """The releases of its channel that a channel's current release or candidate patched from
    (its index's ``deltas_from``: the recent releases and the checkpoint releases of
    ``release --checkpoint-every``). The channel's next release patches from the same ones (or
    newer), and reads their indexes and objects: without them it fails. A base whose index
    the store lacks or that does not match its record is not kept (nothing of it to keep);
    ``indexes`` gains the indexes of the bases kept."""
    out: list[KeptRelease] = []
    for k in kept:
        if k.why not in ("current", "candidate"):
            continue
        for version in indexes[k.index.sha256].deltas_from:
            ref = by_version[k.channel].get(version)
            if ref is None or ref.sha256 not in present:
                continue
            if ref.sha256 not in indexes:
                index = _index_or_none(store, ref)
                if index is None:
                    continue
                indexes[ref.sha256] = index
            out.append(KeptRelease(k.channel, version, "base", ref))
    return out


def _in_progress(store: Store, objects: Iterable[StoredObject], reachable: set[str],
                 now: datetime, grace: timedelta) -> set[str]:
    """What the release indexes among the unreachable objects younger than the grace period
    reference: a ``--draft`` waiting for its signatures (or a release about to write its
    manifest) uploaded its index, and its objects are only those the store lacked: the others
    it names (an old release's, when its model shares content with it) may be as old as
    anything and must stay as long as the draft can still be published."""
    out: set[str] = set()
    for o in objects:
        sha = o.key[len(OBJECTS_PREFIX):]
        if sha in reachable or now - o.modified >= grace or o.size > MAX_INDEX_SIZE:
            continue
        index = _index_or_none(store, ObjectRef(sha, o.size, "json"))
        if index is not None:
            out |= index_objects(index)
    return out


def _unique(kept: Sequence[KeptRelease]) -> list[KeptRelease]:
    seen: dict[str, KeptRelease] = {}
    for k in kept:
        seen.setdefault(k.index.sha256, k)
    return list(seen.values())


def _unique_refs(refs: Sequence[ObjectRef]) -> list[ObjectRef]:
    return list({r.sha256: r for r in refs}.values())


def _read_index(store: Store, ref: ObjectRef) -> ReleaseIndex:
    data = store.get(ref.key, MAX_INDEX_SIZE)
    if len(data) != ref.length or hashlib.sha256(data).hexdigest() != ref.sha256:
        raise HashMismatchError(f"{ref.key} does not match the pin that names it")
    return ReleaseIndex.from_dict(loads_object(data, ref.key))


def _kept_index(store: Store, k: KeptRelease, present: set[str]) -> ReleaseIndex:
    where = f"release {k.version} of channel {k.channel} ({k.why})"
    if k.index.sha256 not in present:
        raise MissingKeyError(f"{where} names the index {k.index.key}, which the store lacks: "
                              "gc deletes nothing until it is restored or the release "
                              "is no longer kept")
    try:
        return _read_index(store, k.index)
    except DeltashipError as e:
        raise type(e)(f"{where}: {e}: gc deletes nothing until its index is restored") from e


def _index_or_none(store: Store, ref: ObjectRef) -> ReleaseIndex | None:
    """An older release's index, only to tell lost races from old releases."""
    try:
        return _read_index(store, ref)
    except (MissingKeyError, FormatError, HashMismatchError):
        return None
    except DeltashipError as e:
        if isinstance(e, LocalError):
            raise
        return None


def _check_unchanged(reader: _Reader, now: datetime) -> None:
    """The manifests and release records gc read are still the same, and no new ones."""
    again = _Reader(reader.store)
    for channel in channels(reader.store):
        try:
            again.releases(channel, 1, now)
        except DeltashipError as e:
            raise ConflictError(f"the store changed while gc ran ({e}): nothing deleted; "
                                "run gc again") from e
    if again.seen != reader.seen:
        raise ConflictError("the store changed while gc ran (a release, revert or promote): "
                            "nothing deleted; run gc again")
