"""Every document the publisher writes goes through a draft: made, signed, then published.

``release``, ``revert``, ``refresh``, ``promote``, ``rollout`` and ``root edit`` each build a
:class:`~manifest.draft.Draft` of the documents they will write. With ``--key`` options the
draft is signed at once and published when every threshold is met; with ``--draft FILE`` it is
saved for key holders on other machines (``deltaship-publish sign FILE --key K``) and written
by ``deltaship-publish publish FILE``. One path, so a command signed on one machine and one
signed by three key holders write the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from manifest._fields import check_channel
from manifest.constants import DEFAULT_CHANNEL, release_record_key, root_version_key
from manifest.draft import Draft, DraftDocument
from manifest.errors import (
    ConflictError,
    FormatError,
    LocalError,
    OversizeError,
    SignatureError,
    TrustError,
    UntrustedDataError,
    disk_errors,
)
from manifest.metadata import Manifest, ReleasePointer, ReleaseRecord, Rollout, Root, Timestamp
from manifest.signing import SigningKey
from manifest.storage.atomic import write_atomic
from manifest.trust import verify_successor

from .repository import Repository

__all__ = [
    "DEFAULT_LIFETIMES",
    "Lifetimes",
    "Published",
    "draft_channel",
    "finish",
    "load_draft",
    "manifest_draft",
    "publish_draft",
    "save_draft",
]


@dataclass(frozen=True)
class Lifetimes:
    """How long what the publisher signs stays valid (docs/FORMAT.md §5).

    Freshness (the timestamp) lasts 28 days and is meant to be refreshed weekly: two failed
    weekly refreshes in a row still leave a week before devices stop. The release content
    lasts a year; every release, revert and ``refresh --content`` renews it.
    """

    manifest: timedelta = timedelta(days=365)
    timestamp: timedelta = timedelta(days=28)


DEFAULT_LIFETIMES = Lifetimes()


def _until(now: datetime, lifetime: timedelta, what: str) -> datetime:
    try:
        return now + lifetime
    except OverflowError as e:
        raise LocalError(f"a {what} lifetime of {lifetime.days} days ends after the year "
                         "9999: choose fewer days") from e


def manifest_draft(
    kind: str,
    repo: Repository,
    now: datetime,
    *,
    current: ReleasePointer | None = None,
    action: str | None = None,
    record: ReleaseRecord | None = None,
    new_content: bool = True,
    lifetimes: Lifetimes = DEFAULT_LIFETIMES,
    rollout: Rollout | None = None,
) -> Draft:
    """A draft of the channel's manifest (and the release record ``record``, if any).

    ``new_content``: a new manifest (sequence + 1, new expiry) naming ``current`` and
    ``rollout``, or with ``current`` None, re-signing what is current now as it is (its
    action and rollout too: ``refresh --content``); else the current manifest is kept with
    its signatures and only the timestamp is new (``refresh``). Either way the timestamp's
    sequence goes up by one and it names the store's newest root. The draft's ``base`` names
    the channel, so ``publish`` writes it to that channel's keys.
    """
    root = repo.root()
    state = repo.current_manifest()
    docs: list[DraftDocument] = []
    key = repo.manifest_key
    if record is not None:
        docs.append(DraftDocument("record", release_record_key(record.version, repo.channel),
                                  "release", record.to_dict()))
    if new_content:
        if current is None:
            if state.timestamp is None:
                raise LocalError(f"{repo.channel_text()} has no release yet: nothing to "
                                 "re-sign")
            current, rollout = state.timestamp.current, state.timestamp.manifest.rollout
        manifest = Manifest(
            state.next_sequence, _until(now, lifetimes.manifest, "manifest"), now, current,
            action or (state.timestamp.manifest.action if state.timestamp else "release"),
            repository_id=root.repository_id, channel=repo.channel, rollout=rollout,
        )
        manifest_doc = DraftDocument("manifest", key, "release", manifest.to_dict())
    else:
        if state.timestamp is None:
            raise LocalError(f"{repo.channel_text()} has no release yet: nothing to refresh")
        if not state.content_trusted:
            raise TrustError(
                f"the manifest in {repo.store.url} is signed by release keys the newest trust "
                f"root (v{root.version}) no longer lists: re-sign it with the new release "
                "keys (`deltaship-publish refresh --content`) or release a new version"
            )
        manifest = state.timestamp.manifest
        # Exactly what the release keys signed (their signatures are kept), not a
        # re-serialisation that could differ from it.
        manifest_doc = DraftDocument("manifest", key, "release", manifest.signed_dict(),
                                     list(state.manifest_signatures))
    docs.append(manifest_doc)
    ts = Timestamp(state.next_timestamp, _until(now, lifetimes.timestamp, "timestamp"),
                   root.version, manifest, repository_id=root.repository_id)
    docs.append(DraftDocument("timestamp", key, "timestamp", ts.to_dict()))
    return Draft(kind, root.repository_id, repo.store.url, repo.root_bytes(), docs,
                 {"etag": state.etag, "sequence": manifest.sequence,
                  "timestamp_sequence": ts.sequence, "channel": repo.channel})


def draft_channel(draft: Draft) -> str:
    """The channel a manifest draft was made for (``stable`` for drafts made before
    channels)."""
    try:
        return check_channel(draft.base.get("channel", DEFAULT_CHANNEL), "the draft's channel")
    except FormatError as e:  # the user's file
        raise LocalError(f"{e}: not a usable deltaship draft") from e


def root_draft(repo: Repository, new: Root) -> Draft:
    """A draft of ``new``, the successor of the store's newest root."""
    root = repo.root()
    doc = DraftDocument("root", root_version_key(new.version), "root", new.to_dict())
    return Draft("root", root.repository_id, repo.store.url, repo.root_bytes(), [doc],
                 {"root_version": root.version})


# -- files ----------------------------------------------------------------------------------


def save_draft(path: Path, draft: Draft) -> None:
    """Write a draft atomically (it holds no secret: signatures and public keys only)."""
    with disk_errors(path):
        try:
            write_atomic(path, draft.to_bytes())
        except OSError as e:
            raise LocalError(f"cannot write the draft {path}: {e.strerror}") from e


def load_draft(path: Path) -> Draft:
    try:
        size = os.stat(path).st_size
        if size > 32 * 1024 * 1024:
            raise OversizeError(f"{path} is {size} bytes: not a draft")
        data = path.read_bytes()
    except OSError as e:
        raise LocalError(f"cannot read the draft {path}: {e.strerror}") from e
    try:
        return Draft.from_bytes(data, str(path))
    except (FormatError, OversizeError) as e:
        raise LocalError(f"{path} is not a usable deltaship draft: {e}") from e


# -- publishing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    kind: str
    store: str
    written: tuple[str, ...]  # store keys, in the order written
    timestamp: Timestamp | None = None
    root: Root | None = None
    draft_path: Path | None = None  # set when only a draft was written
    missing: tuple[str, ...] = ()  # thresholds a saved draft still lacks
    signed: tuple[tuple[str, str], ...] = field(default=())
    channel: str = DEFAULT_CHANNEL


def finish(
    repo: Repository, draft: Draft, keys: Sequence[SigningKey], draft_path: Path | None,
) -> Published:
    """Sign ``draft`` with ``keys``; save it to ``draft_path`` if given, else publish it (every
    threshold must then be met)."""
    signed = tuple(draft.sign(keys)) if keys else ()
    if draft_path is not None:
        save_draft(draft_path, draft)
        return Published(draft.kind, repo.store.url, (), draft_path=draft_path,
                         missing=tuple(draft.missing()), signed=signed, channel=repo.channel)
    missing = draft.missing()
    if missing:
        raise TrustError(
            f"not enough signatures to publish: {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + ": pass more --key options, or use --draft FILE and have each key holder run "
              "`deltaship-publish sign FILE --key K`"
        )
    return publish_draft(repo, draft)


def publish_draft(repo: Repository, draft: Draft) -> Published:
    """Write a fully signed draft to the store it was made for (checked here); a manifest
    draft goes to the channel its ``base`` names (``repo`` is re-aimed there)."""
    if draft.kind != "root":
        repo = repo.for_channel(draft_channel(draft))
    root = repo.root()
    if draft.repository_id != root.repository_id:
        raise TrustError(f"the draft is for repository {draft.repository_id}, but "
                         f"{repo.store.url} is repository {root.repository_id}: wrong --store")
    drafted = draft.root()
    if drafted.version != root.version or draft.trusted_root != repo.root_bytes():
        raise ConflictError(
            f"the store's trust root changed since the draft was made (v{drafted.version} -> "
            f"v{root.version}): make the draft again"
        )
    missing = draft.missing()
    if missing:
        raise TrustError(f"the draft lacks signatures: {missing[0]}: have the key holders run "
                         "`deltaship-publish sign FILE --key K`")
    if draft.kind == "root":
        return _publish_root(repo, draft, root)
    return _publish_manifest(repo, draft)


def _publish_manifest(repo: Repository, draft: Draft) -> Published:
    ts_doc = draft.document("timestamp")
    ts = Timestamp.from_dict(ts_doc.signed)
    now_state = repo.current_manifest()
    if now_state.etag != draft.base.get("etag"):
        raise ConflictError(
            "another release, revert or refresh was published since this draft was made, so "
            "it was not published: make the draft again to build on the new state"
        )
    record = draft.get("record")
    for doc in (draft.document("manifest"), draft.document("timestamp"), record):
        expected = (repo.manifest_key if doc is None or doc.name != "record" else
                    release_record_key(str(doc.signed.get("version")), repo.channel))
        if doc is not None and doc.key != expected:
            raise LocalError(f"the draft writes its {doc.name} to {doc.key!r}, not to "
                             f"{expected!r} of channel {repo.channel!r}: not a usable draft")
    wire = draft.wire("timestamp")
    repo.check_manifest_bytes(wire)
    repo.put_manifest(wire, _etag(draft.base))
    written = [repo.manifest_key]
    if record is not None:
        repo.store.put(record.key, record.envelope())
        written.append(record.key)
    return Published(draft.kind, repo.store.url, tuple(written), timestamp=ts,
                     channel=repo.channel)


def _etag(base: Any) -> str | None:
    v = base.get("etag")
    return v if isinstance(v, str) else None


def _publish_root(repo: Repository, draft: Draft, root: Root) -> Published:
    doc = draft.document("root")
    data = doc.envelope()
    try:
        new = verify_successor(data, root)
    except SignatureError as e:
        raise TrustError(f"the new trust root is not signed as required: {e}") from e
    except UntrustedDataError as e:  # the draft is the user's file (a hand edit): exit 2
        raise LocalError(f"the draft's new trust root is refused: {e}") from e
    if new.expires <= repo.now:
        raise LocalError(f"the new trust root v{new.version} would already be expired: "
                         "make the draft again with a later --expires-days")
    key = root_version_key(new.version)
    repo.put_root_version(new.version, data)
    return Published("root", repo.store.url, (key, "root.json"), root=new)
