"""The store's other workflows: write its trust root, revert to a release, list the history."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from manifest.errors import AlreadyExistsError, TrustError
from manifest.metadata import Manifest, Role, Root
from manifest.storage.store import StoreOptions, open_store
from manifest.trust import sign_document

from .keys import check_signers, load_signing_keys
from .repository import Repository

__all__ = ["HistoryEntry", "history", "init_store", "revert"]


def init_store(
    store_url: str,
    key_paths: tuple[Path, ...],
    threshold: int,
    now: datetime,
    *,
    expires: timedelta = timedelta(days=365),
    options: StoreOptions | None = None,
    insecure_key_permissions: bool = False,
) -> tuple[str, bytes, Root]:
    """Write a version-1 trust root signed by ``key_paths``; returns its URL, bytes, content."""
    keys = load_signing_keys(key_paths, insecure_permissions=insecure_key_permissions)
    ids = list(dict.fromkeys(k.keyid for k in keys))
    if not 1 <= threshold <= len(ids):
        raise TrustError(f"--threshold {threshold} must be between 1 and the {len(ids)} key(s)")
    role = Role(tuple(ids), threshold)
    root = Root(
        1, now + expires, {k.keyid: k.public_key for k in keys}, {"root": role, "release": role}
    )
    data = sign_document(root.to_dict(), keys)
    url = Repository(open_store(store_url, options), now).put_root(data)
    return url, data, root


def revert(
    store_url: str, to_version: str, key_paths: tuple[Path, ...], now: datetime, *,
    expires: timedelta = timedelta(days=30), options: StoreOptions | None = None,
    insecure_key_permissions: bool = False,
) -> Manifest:
    """Make an older release current again under a higher sequence number."""
    keys = load_signing_keys(key_paths, insecure_permissions=insecure_key_permissions)
    repo = Repository(open_store(store_url, options), now)
    check_signers(repo.root(), keys, "release", key_paths)
    record = repo.release(to_version)
    repo.index(record.pointer)  # refuse to point devices at an index that does not verify
    manifest, etag = repo.manifest()
    if manifest is not None and manifest.current.version == to_version:
        raise AlreadyExistsError(f"{to_version!r} is already the current release")
    seq = (manifest.sequence if manifest else 0) + 1
    new = Manifest(seq, now + expires, now, record.pointer, "revert")
    repo.put_manifest(sign_document(new.to_dict(), keys), etag)
    return new


@dataclass(frozen=True)
class HistoryEntry:
    version: str
    sequence: int
    released_at: datetime
    current: bool


def history(
    store_url: str, now: datetime, options: StoreOptions | None = None
) -> tuple[list[HistoryEntry], Manifest | None]:
    """Every release, oldest first, and the current manifest (None before the first)."""
    repo = Repository(open_store(store_url, options), now)
    manifest, _ = repo.manifest()
    current = manifest.current.version if manifest else None
    entries = [
        HistoryEntry(r.version, r.sequence, r.released_at, r.version == current)
        for r in repo.releases()
    ]
    return entries, manifest
