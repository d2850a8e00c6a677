"""Fleet workflows on a store: promote between channels, change or advance a staged rollout,
read device reports (the decisions themselves are pure: :mod:`publisher.fleet`).

Every manifest written here is a draft (:mod:`publisher.drafts`), signed at once with
``--key`` or saved with ``--draft`` for key holders on other machines, exactly like a release
or a revert: one new manifest of the channel (sequence + 1) per command, written with a
conditional write on the ETag read at the start, so two operators (or two cron runs) never
both win.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

from manifest._fields import check_device_id
from manifest.constants import REPORTS_PREFIX, release_record_key
from manifest.errors import (
    AlreadyExistsError,
    FormatError,
    LocalError,
    MissingKeyError,
    MixAndMatchError,
    NotFoundError,
    OversizeError,
)
from manifest.metadata import Manifest, ReleaseRecord, Rollout
from manifest.report import MAX_REPORT_SIZE, DeviceReport
from manifest.signing import SigningKey
from manifest.storage.store import Store, StoreOptions, open_store

from .drafts import DEFAULT_LIFETIMES, Lifetimes, Published, finish, manifest_draft
from .fleet import (
    AdvancePolicy,
    Decision,
    FleetStatus,
    ReportSet,
    RolloutChange,
    apply_change,
    decide_advance,
    fleet_status,
)
from .keys import check_signers, load_signing_keys
from .repository import Repository

__all__ = ["Signing", "advance", "change_rollout", "promote", "read_reports", "status"]


class Signing:
    """The key and draft options of a command that writes a manifest (as ``revert`` takes)."""

    def __init__(self, key_paths: Sequence[Path] = (), draft: Path | None = None, *,
                 lifetimes: Lifetimes = DEFAULT_LIFETIMES, insecure: bool = False) -> None:
        self.key_paths = tuple(key_paths)
        self.draft = draft
        self.lifetimes = lifetimes
        self.keys: list[SigningKey] = (
            load_signing_keys(self.key_paths, insecure_permissions=insecure)
            if self.key_paths or draft is None else [])

    def check(self, repo: Repository) -> None:
        """Without ``--draft``, the keys must meet the release and timestamp thresholds now
        (before anything is read or decided)."""
        if self.draft is None:
            check_signers(repo.root(), self.keys, ("release", "timestamp"), self.key_paths)


def _open(store_url: str, channel: str, now: datetime, options: StoreOptions | None
          ) -> Repository:
    return Repository(open_store(store_url, options), now, channel)


def _manifest(repo: Repository) -> Manifest:
    """The channel's manifest; a channel without one is named with the channels that exist."""
    ts = repo.current_manifest().timestamp
    if ts is None:
        others = repo.channels()
        raise NotFoundError(f"{repo.channel_text()} has no release yet (channels with "
                            f"releases: {', '.join(others) if others else 'none'})")
    return ts.manifest


# -- promote ----------------------------------------------------------------------------------


def promote(store_url: str, version: str, source: str, target: str, signing: Signing,
            now: datetime, *, rollout_bp: int | None = None,
            options: StoreOptions | None = None) -> Published:
    """Sign ``version`` of channel ``source`` (found through its verified release record) into
    channel ``target``'s manifest, and write ``target``'s record of it; nothing is uploaded
    but a zstd form of the index the store lost (objects are shared by every channel; the
    record's packed index forms the store still holds are reused). With ``rollout_bp`` it
    becomes ``target``'s candidate, what is current there staying the fallback."""
    if source == target:
        raise LocalError(f"--from and --to are both {source!r}: promote moves a release from "
                         "one channel to another")
    src = _open(store_url, source, now, options)
    signing.check(src)
    dst = src.for_channel(target)
    try:
        record = src.release(version).record
    except NotFoundError:
        _manifest(src)  # a channel with no release at all says so (and lists the channels)
        raise
    index = src.recorded_index(record)
    if index.version != version:
        raise MixAndMatchError(
            f"the release record of {version!r} in channel {source!r} leads to the index of "
            f"{index.version!r}: the store's records were altered; nothing was promoted")
    state = dst.current_manifest()
    existing = _record_or_none(dst, version)
    if existing is not None and (existing.index.sha256, existing.index.length) \
            != (record.index.sha256, record.index.length):
        raise AlreadyExistsError(f"{dst.channel_text()} already has another release named "
                                 f"{version!r}: nothing was promoted")
    m = state.timestamp.manifest if state.timestamp else None
    if m is not None and m.current.version == version and m.rollout is None:
        raise AlreadyExistsError(f"{version!r} is already current in {dst.channel_text()}")
    if m is not None and m.current.version == version and rollout_bp is not None:
        # Its candidate would be its own fallback: revoking it would make every device record
        # the version it runs as failed.
        raise AlreadyExistsError(f"{version!r} is already current in {dst.channel_text()} "
                                 "(the fallback of its rollout): a rollout of it changes "
                                 "nothing; promote it without --rollout to end the rollout")
    # The record's packed index forms that the store still holds (a gc may have deleted one
    # the source channel no longer keeps: named here, a device would fetch it in vain).
    pointer = src.packed(record.pointer, (), named_by=release_record_key(version, source))
    current, rollout = pointer, None
    if rollout_bp is not None:
        if m is None:
            raise LocalError(f"{dst.channel_text()} has no release yet, so a staged rollout "
                             "has nothing to fall back to: promote without --rollout first")
        current, rollout = m.current, Rollout(pointer, rollout_bp)
    new_record = None if existing is not None else ReleaseRecord(
        version, state.next_sequence, now, pointer.index, repository_id=dst.root().repository_id)
    d = manifest_draft("promote", dst, now, current=current, action="promote",
                       record=new_record, lifetimes=signing.lifetimes, rollout=rollout)
    return finish(dst, d, signing.keys, signing.draft)


def _record_or_none(repo: Repository, version: str) -> ReleaseRecord | None:
    try:
        return repo.release(version).record
    except NotFoundError:
        return None


# -- rollouts ---------------------------------------------------------------------------------


def change_rollout(store_url: str, channel: str, change: RolloutChange, signing: Signing,
                   now: datetime, options: StoreOptions | None = None) -> Published:
    """One new manifest of ``channel`` that makes ``change`` to its rollout."""
    repo = _open(store_url, channel, now, options)
    signing.check(repo)
    return _write_change(repo, _manifest(repo), change, signing, now)


def _write_change(repo: Repository, manifest: Manifest, change: RolloutChange,
                  signing: Signing, now: datetime) -> Published:
    current, rollout = apply_change(manifest, change, now, repo.channel_text())
    d = manifest_draft("rollout", repo, now, current=current, action="rollout",
                       lifetimes=signing.lifetimes, rollout=rollout)
    return finish(repo, d, signing.keys, signing.draft)


def advance(store_url: str, channel: str, policy: AdvancePolicy, signing: Signing,
            now: datetime, options: StoreOptions | None = None
            ) -> tuple[Decision, Published | None]:
    """Decide from the device reports whether the channel's rollout halts (or is revoked),
    widens, completes or waits, and write the manifest that does it (nothing when it waits).
    Safe to run from cron: the keys are checked first every time, a run that decides nothing
    writes nothing, and a concurrent writer makes this run fail with exit 5, not both win."""
    repo = _open(store_url, channel, now, options)
    signing.check(repo)
    ts = repo.current_manifest().timestamp
    manifest = ts.manifest if ts else None
    reports = (read_reports(repo.store, repo.root().repository_id, channel)
               if manifest is not None and manifest.rollout is not None else ReportSet(()))
    decision = decide_advance(manifest, reports, policy, now, repo.channel_text())
    if not decision.changes:
        return decision, None
    assert manifest is not None
    return decision, _write_change(repo, manifest, decision.change(), signing, now)


# -- reports ----------------------------------------------------------------------------------


def read_reports(store: Store, repository_id: str, channel: str, workers: int = 16
                 ) -> ReportSet:
    """Every ``reports/<device-id>.json`` of ``channel``. A report that cannot be used (not
    a report, over its size cap, another repository's, filed under another device's name) is
    counted in ``malformed`` with why, never fatal; one deleted while listing is skipped."""
    keys = store.list(REPORTS_PREFIX)

    def one(key: str) -> DeviceReport | str | None:
        name = key[len(REPORTS_PREFIX):]
        try:
            if not name.endswith(".json"):
                raise FormatError("not a <device-id>.json name")
            device_id = check_device_id(name[:-len(".json")], "file name")
            report = DeviceReport.from_bytes(store.get(key, MAX_REPORT_SIZE), key)
        except MissingKeyError:
            return None
        except (FormatError, OversizeError) as e:
            return str(e)
        if report.device_id != device_id:
            return f"names device {report.device_id!r}"
        if report.repository_id != repository_id:
            return f"belongs to repository {report.repository_id}"
        return report

    with ThreadPoolExecutor(max(1, min(workers, len(keys)))) as ex:
        results = list(ex.map(one, keys))
    reports: list[DeviceReport] = []
    malformed: list[tuple[str, str]] = []
    other = 0
    for key, res in zip(keys, results, strict=True):
        if isinstance(res, str):
            malformed.append((key, res))
        elif res is not None and res.channel != channel:
            other += 1
        elif res is not None:
            reports.append(res)
    return ReportSet(tuple(reports), tuple(malformed), other)


def status(store_url: str, channel: str, now: datetime, stale_after: timedelta,
           options: StoreOptions | None = None) -> FleetStatus:
    """``fleet status``: the channel's manifest and what its devices reported."""
    repo = _open(store_url, channel, now, options)
    root = repo.root()
    ts = repo.current_manifest().timestamp
    reports = read_reports(repo.store, root.repository_id, channel)
    return fleet_status(ts.manifest if ts else None, reports, root.repository_id, now,
                        stale_after, channel)

