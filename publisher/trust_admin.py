"""The trust lifecycle on the publisher's side: refresh freshness, edit the root, sign and
publish drafts (docs/FORMAT.md §4, §5, §14; README "Keys and rotation")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

from manifest.constants import DEFAULT_CHANNEL
from manifest.errors import LocalError, TrustError
from manifest.metadata import Role, Root
from manifest.signing import PublicKey
from manifest.storage.store import StoreOptions, open_store

from .drafts import (
    DEFAULT_LIFETIMES,
    Lifetimes,
    Published,
    finish,
    load_draft,
    manifest_draft,
    publish_draft,
    root_draft,
    save_draft,
)
from .keys import check_signers, load_public_key, load_signing_keys
from .repository import Repository

__all__ = ["RootEdit", "edit_root", "publish_file", "refresh", "sign_file"]


def refresh(
    store_url: str, key_paths: Sequence[Path], now: datetime, *, content: bool = False,
    lifetimes: Lifetimes = DEFAULT_LIFETIMES, options: StoreOptions | None = None,
    insecure_key_permissions: bool = False, draft: Path | None = None,
    channel: str = DEFAULT_CHANNEL,
) -> Published:
    """Re-sign the freshness of what is current in ``channel`` (a new timestamp: later
    expiry, higher sequence, the newest root version). ``content``: re-sign the manifest
    itself too (release keys), which is required when the release keys changed since it was
    signed."""
    keys = (load_signing_keys(tuple(key_paths), insecure_permissions=insecure_key_permissions)
            if key_paths or draft is None else [])
    repo = Repository(open_store(store_url, options), now, channel)
    current = repo.current_manifest()
    new_content = content or not current.content_trusted
    if draft is None:
        roles = ("release", "timestamp") if new_content else ("timestamp",)
        try:
            check_signers(repo.root(), keys, roles, tuple(key_paths))
        except TrustError as e:
            if new_content and not content:
                raise TrustError(f"{e} (the manifest was signed by release keys the newest "
                                 "root no longer lists, so it must be re-signed with the new "
                                 "release keys too)") from e
            raise
    d = manifest_draft("refresh", repo, now, new_content=new_content, lifetimes=lifetimes)
    return finish(repo, d, keys, draft)


class RootEdit:
    """Changes to the newest root, applied by :func:`edit_root`."""

    def __init__(self) -> None:
        self.add: list[tuple[str, PublicKey]] = []
        self.remove: list[tuple[str, str]] = []  # (role, key id or key id prefix)
        self.thresholds: dict[str, int] = {}
        self.expires: timedelta | None = None

    def add_key(self, role: str, path: Path) -> None:
        self.add.append((_role(role), load_public_key(path)))

    def remove_key(self, role: str, key: str) -> None:
        """``key``: a key id (or a unique prefix of one) or a key file."""
        p = Path(key)
        kid = load_public_key(p).keyid if p.is_file() else key.lower()
        self.remove.append((_role(role), kid))


def _role(name: str) -> str:
    if name not in Root.ROLES:
        raise LocalError(f"{name!r} is not a role ({', '.join(Root.ROLES)})")
    return name


def edit_root(store_url: str, edit: RootEdit, now: datetime, out: Path, *,
              options: StoreOptions | None = None) -> tuple[Root, Root]:
    """Write to ``out`` a draft of the newest root's successor with ``edit`` applied (version
    + 1, unsigned); returns (old, new)."""
    repo = Repository(open_store(store_url, options), now)
    old = repo.root()
    keys = dict(old.keys)
    roles = {name: list(role.keyids) for name, role in old.roles.items()}
    thresholds = {name: role.threshold for name, role in old.roles.items()}
    for role, kid in edit.remove:
        matches = [k for k in roles[role] if k.startswith(kid)]
        if len(matches) != 1:
            raise LocalError(f"--remove-key {role}={kid}: "
                             + ("no such key in that role" if not matches else "ambiguous prefix")
                             + f" (the {role} keys: {', '.join(k[:16] for k in roles[role])})")
        roles[role].remove(matches[0])
    for role, pub in edit.add:
        keys.setdefault(pub.keyid, pub)
        if pub.keyid not in roles[role]:
            roles[role].append(pub.keyid)
    thresholds.update({_role(role): n for role, n in edit.thresholds.items()})
    new_roles = {}
    for name, ids in roles.items():
        if not ids:
            raise LocalError(f"the {name} role would have no key: add one with --add-key")
        if not 1 <= thresholds[name] <= len(ids):
            raise LocalError(f"the {name} threshold {thresholds[name]} must be between 1 and "
                             f"its {len(ids)} key(s): pass --threshold {name}=N")
        new_roles[name] = Role(tuple(ids), thresholds[name], old.roles[name].unrecognized)
    used = {k for ids in roles.values() for k in ids}
    lifetime = edit.expires or timedelta(days=365)
    try:
        expires = now + lifetime
    except OverflowError as e:
        raise LocalError("that root lifetime ends after the year 9999: choose fewer days") from e
    new = replace(old, version=old.version + 1, expires=expires,
                  keys={k: v for k, v in keys.items() if k in used}, roles=new_roles)
    save_draft(out, root_draft(repo, new))
    return old, new


def sign_file(path: Path, key_paths: Sequence[Path], *, insecure_key_permissions: bool = False
              ) -> tuple[list[tuple[str, str]], list[str]]:
    """Add each key's signatures to the draft in ``path`` (no store access needed); returns
    (document, key id) added and the thresholds still missing."""
    keys = load_signing_keys(tuple(key_paths), insecure_permissions=insecure_key_permissions)
    draft = load_draft(path)
    added = draft.sign(keys)
    save_draft(path, draft)
    return added, draft.missing()


def publish_file(path: Path, store_url: str, now: datetime,
                 options: StoreOptions | None = None) -> Published:
    """Publish the fully signed draft in ``path`` to ``store_url``."""
    draft = load_draft(path)
    repo = Repository(open_store(store_url, options), now)
    return publish_draft(repo, draft)
