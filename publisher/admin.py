"""The store's other workflows: write its trust root, revert to a release, list the history."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from manifest.constants import DEFAULT_CHANNEL, release_record_key
from manifest.errors import AlreadyExistsError, LocalError, MixAndMatchError, TrustError
from manifest.metadata import Role, Root, Timestamp
from manifest.signing import PublicKey
from manifest.storage.store import StoreOptions, open_store
from manifest.trust import sign_document

from .drafts import DEFAULT_LIFETIMES, Lifetimes, Published, finish, manifest_draft
from .keys import check_signers, load_public_key, load_signing_keys
from .known_stores import KnownStore, KnownStores
from .release_plan import running_pointers
from .repository import Repository

__all__ = [
    "ROLES",
    "History",
    "HistoryEntry",
    "InitResult",
    "history",
    "init_store",
    "new_repository_id",
    "revert",
    "role_keys",
]

ROLES = Root.ROLES


def new_repository_id() -> str:
    """A store's identity: 128 random bits, fixed by ``init`` (docs/FORMAT.md §4)."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class InitResult:
    url: str  # of the root written
    data: bytes  # its bytes, for devices to pin
    root: Root
    shared_with: tuple[KnownStore, ...]  # other known stores that one of its keys signs


def role_keys(
    every: Sequence[Path], per_role: Mapping[str, Sequence[Path]]
) -> dict[str, tuple[Path, ...]]:
    """Which key files each role gets: ``--key`` (``every``) is every role; a role given keys of
    its own (``--root-key``, ``--release-key``, ``--timestamp-key``) uses only those; a role
    given none uses the release role's (docs/README "Keys and rotation")."""
    out = {r: tuple(per_role.get(r, ())) or tuple(every) for r in ROLES}
    if not out["timestamp"] and per_role.get("release"):
        out["timestamp"] = tuple(per_role["release"])
    if not out["root"] and per_role.get("release"):
        out["root"] = tuple(per_role["release"])
    missing = [r for r in ROLES if not out[r]]
    if missing:
        raise LocalError(f"no key for the {', '.join(missing)} role(s): pass --key FILE (every "
                         "role) or --root-key/--release-key/--timestamp-key")
    return out


def init_store(
    store_url: str,
    keys_by_role: Mapping[str, Sequence[Path]],
    thresholds: Mapping[str, int],
    now: datetime,
    *,
    expires: timedelta = timedelta(days=365),
    options: StoreOptions | None = None,
    known: KnownStores | None = None,
    insecure_key_permissions: bool = False,
) -> InitResult:
    """Write a version-1 trust root, with a new repository id, signed by the root keys.

    Root keys must be private (they sign the root now); release and timestamp keys may be
    public halves (their private keys can stay on the machines that sign). Records the store
    in ``known`` (default: this user's list) and names the other known stores whose roots list
    one of the same keys.
    """
    signers = load_signing_keys(tuple(keys_by_role["root"]),
                                insecure_permissions=insecure_key_permissions)
    publics: dict[str, PublicKey] = {k.keyid: k.public_key for k in signers}
    roles: dict[str, Role] = {}
    for role in ROLES:
        ids: list[str] = []
        for path in keys_by_role[role]:
            pub = load_public_key(path)  # a private key file gives its public half
            publics.setdefault(pub.keyid, pub)
            if pub.keyid not in ids:
                ids.append(pub.keyid)
        threshold = thresholds.get(role, 1)
        if not 1 <= threshold <= len(ids):
            raise TrustError(f"--threshold {role}={threshold} must be between 1 and the "
                             f"{len(ids)} {role} key(s)")
        roles[role] = Role(tuple(ids), threshold)
    if len({k.keyid for k in signers}) < roles["root"].threshold:
        raise TrustError(f"the root role needs {roles['root'].threshold} signatures: pass that "
                         "many root keys")
    try:
        expiry = now + expires
    except OverflowError as e:
        raise LocalError(f"a trust root expiring {expires.days} days from now would expire "
                         "after the year 9999: choose fewer days") from e
    root = Root(1, expiry, publics, roles, repository_id=new_repository_id())
    data = sign_document(root.to_dict(), signers)
    store = open_store(store_url, options)
    url = Repository(store, now).put_root(data)
    known = known or KnownStores()
    shared = tuple(known.sharing_keys(store.url, tuple(publics)))
    known.remember(store.url, root, now)
    return InitResult(url, data, root, shared)


def revert(
    store_url: str, to_version: str, key_paths: tuple[Path, ...], now: datetime, *,
    lifetimes: Lifetimes = DEFAULT_LIFETIMES, options: StoreOptions | None = None,
    insecure_key_permissions: bool = False, draft: Path | None = None,
    channel: str = DEFAULT_CHANNEL,
) -> Published:
    """Make an older release of ``channel`` current again under a higher sequence number (a
    rollout in progress ends: every device of the channel runs ``to_version``)."""
    keys = (load_signing_keys(key_paths, insecure_permissions=insecure_key_permissions)
            if key_paths or draft is None else [])
    repo = Repository(open_store(store_url, options), now, channel)
    root = repo.root()
    if draft is None:
        check_signers(root, keys, ("release", "timestamp"), key_paths)
    record = repo.release(to_version).record
    # The record is signed; what its signed index says must still be the requested version,
    # or devices would be sent elsewhere.
    index = repo.recorded_index(record)
    if index.version != to_version:
        raise MixAndMatchError(
            f"the release record of {to_version!r} leads to the index of "
            f"{index.version!r}: the store's releases/ was altered; nothing was reverted"
        )
    current = repo.current_manifest()
    if current.timestamp is not None and current.timestamp.current.version == to_version \
            and current.timestamp.manifest.rollout is None:
        raise AlreadyExistsError(f"{to_version!r} is already the current release (to extend "
                                 "its validity: `deltaship-publish refresh`)")
    running = running_pointers(current.timestamp.manifest if current.timestamp else None)
    pointer = repo.packed(record.pointer, running,  # a delta from what devices run now
                          named_by=release_record_key(to_version, channel))
    d = manifest_draft("revert", repo, now, current=pointer, action="revert",
                       lifetimes=lifetimes)
    return finish(repo, d, keys, draft)


@dataclass(frozen=True)
class HistoryEntry:
    version: str
    sequence: int
    released_at: datetime
    current: bool
    signed_under: int = 0  # the root version whose keys signed its record


@dataclass(frozen=True)
class History:
    entries: list[HistoryEntry]
    timestamp: Timestamp | None
    root: Root
    content_trusted: bool = True
    channel: str = DEFAULT_CHANNEL
    channels: tuple[str, ...] = ()


def history(store_url: str, now: datetime, options: StoreOptions | None = None,
            channel: str = DEFAULT_CHANNEL) -> History:
    """Every release of ``channel``, oldest first, its current manifest (None before the
    first) and the root; ``channels``: every channel of the store that has a manifest.

    A store without a trust root is not a store with no releases yet: it is a mistyped URL or
    a store never initialised (StoreConfigError, exit 2)."""
    repo = Repository(open_store(store_url, options), now, channel)
    root = repo.root()
    state = repo.current_manifest()
    current = state.timestamp.current.version if state.timestamp else None
    entries = [
        HistoryEntry(r.record.version, r.record.sequence, r.record.released_at,
                     r.record.version == current, r.signed_under)
        for r in repo.releases()
    ]
    return History(entries, state.timestamp, root, state.content_trusted, channel,
                   tuple(repo.channels()))
