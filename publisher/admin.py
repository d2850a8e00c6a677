"""The store's other workflows: write its trust root, revert to a release, list the history."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from manifest.constants import release_pointer_key
from manifest.errors import AlreadyExistsError, LocalError, MixAndMatchError, TrustError
from manifest.metadata import Manifest, Role, Root
from manifest.storage.store import StoreOptions, open_store
from manifest.trust import sign_document

from .keys import check_signers, load_signing_keys
from .known_stores import KnownStore, KnownStores
from .repository import Repository

__all__ = ["HistoryEntry", "InitResult", "history", "init_store", "new_repository_id", "revert"]


def new_repository_id() -> str:
    """A store's identity: 128 random bits, fixed by ``init`` (docs/FORMAT.md §4)."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class InitResult:
    url: str  # of the root written
    data: bytes  # its bytes, for devices to pin
    root: Root
    shared_with: tuple[KnownStore, ...]  # other known stores that one of its keys signs


def init_store(
    store_url: str,
    key_paths: tuple[Path, ...],
    threshold: int,
    now: datetime,
    *,
    expires: timedelta = timedelta(days=365),
    options: StoreOptions | None = None,
    known: KnownStores | None = None,
    insecure_key_permissions: bool = False,
) -> InitResult:
    """Write a version-1 trust root, with a new repository id, signed by ``key_paths``.

    Records the store in ``known`` (default: this user's list) and names the other known
    stores whose roots list one of the same keys.
    """
    keys = load_signing_keys(key_paths, insecure_permissions=insecure_key_permissions)
    ids = list(dict.fromkeys(k.keyid for k in keys))
    if not 1 <= threshold <= len(ids):
        raise TrustError(f"--threshold {threshold} must be between 1 and the {len(ids)} key(s)")
    role = Role(tuple(ids), threshold)
    try:
        expiry = now + expires
    except OverflowError as e:
        raise LocalError(f"a trust root expiring {expires.days} days from now would expire "
                         "after the year 9999: choose fewer days") from e
    root = Root(
        1, expiry, {k.keyid: k.public_key for k in keys}, {"root": role, "release": role},
        repository_id=new_repository_id(),
    )
    data = sign_document(root.to_dict(), keys)
    store = open_store(store_url, options)
    url = Repository(store, now).put_root(data)
    known = known or KnownStores()
    shared = tuple(known.sharing_keys(store.url, tuple(ids)))
    known.remember(store.url, root, now)
    return InitResult(url, data, root, shared)


def revert(
    store_url: str, to_version: str, key_paths: tuple[Path, ...], now: datetime, *,
    expires: timedelta = timedelta(days=30), options: StoreOptions | None = None,
    insecure_key_permissions: bool = False,
) -> Manifest:
    """Make an older release current again under a higher sequence number."""
    keys = load_signing_keys(key_paths, insecure_permissions=insecure_key_permissions)
    repo = Repository(open_store(store_url, options), now)
    root = repo.root()
    check_signers(root, keys, "release", key_paths)
    record = repo.release(to_version)
    # The pointer is unsigned: only what the signed index says counts. It must verify (hash,
    # signature, repository) and be the requested version, or devices would be sent elsewhere.
    index = repo.index(record.pointer, release_pointer_key(to_version))
    if index.version != to_version:
        raise MixAndMatchError(
            f"the release pointer of {to_version!r} leads to the signed index of "
            f"{index.version!r}: the store's releases/ was altered; nothing was reverted"
        )
    manifest, etag = repo.manifest()
    if manifest is not None and manifest.current.version == to_version:
        raise AlreadyExistsError(f"{to_version!r} is already the current release")
    seq = (manifest.sequence if manifest else 0) + 1
    new = Manifest(seq, now + expires, now, record.pointer, "revert",
                   repository_id=root.repository_id)
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
    """Every release, oldest first, and the current manifest (None before the first).

    A store without a trust root is not a store with no releases yet: it is a mistyped URL or
    a store never initialised (StoreConfigError, exit 2)."""
    repo = Repository(open_store(store_url, options), now)
    repo.root()
    manifest, _ = repo.manifest()
    current = manifest.current.version if manifest else None
    entries = [
        HistoryEntry(r.version, r.sequence, r.released_at, r.version == current)
        for r in repo.releases()
    ]
    return entries, manifest
