"""The device's trust root: the pinned root, and the walk to the newest one (TUF §5.3).

A device learns that the store has a newer root from the manifest it polls anyway (its
``root_version``, read before verification: only a hint). It then fetches
``roots/<trusted+1>.json``, ``roots/<trusted+2>.json``, ... up to that version, at most
:data:`~manifest.trust.MAX_ROOT_ROTATIONS` a poll, verifies each against the one before
(:func:`~manifest.trust.verify_successor`: both thresholds, the next version, the same
repository; expiry is not checked, so an expired trusted root can still fetch its successor) and
pins each as soon as it verifies. Only the root the walk ends on must not be expired.

What a rotation means for the replay floors (fast-forward recovery) is
:meth:`edge_agent.state.AgentState.follow_root`'s business; python-tuf's
``Updater._load_root`` is the model for the walk.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from manifest.constants import MANIFEST_KEY, root_version_key
from manifest.errors import MissingKeyError, TransportError
from manifest.metadata import Root
from manifest.storage.source import Source
from manifest.trust import (
    MAX_ROOT_ROTATIONS,
    MAX_ROOT_SIZE,
    check_expiry,
    keys_changed,
    verify_root,
    verify_successor,
)

from .layout import DeviceLayout

__all__ = ["RootRotationPending", "check_root_expiry", "pinned_root", "walk_roots"]

log = logging.getLogger("deltaship.agent")

ROOT_RENEWAL = ("the root key holders must sign a new version (`deltaship-publish root edit`, "
                "`root sign`, `root publish`)")


class RootRotationPending(TransportError):
    """More successors than one poll walks: the walk goes on at the next poll."""


def pinned_root(layout: DeviceLayout) -> Root:
    """The pinned trust root, self-signature checked, expiry not (an expired root may still
    fetch its successor; :func:`check_root_expiry` is the caller's)."""
    return verify_root(layout.read_root(), now=None)


def check_root_expiry(root: Root, now: datetime, grace: timedelta) -> None:
    check_expiry(root.expires, now, grace, f"trust root version {root.version}", ROOT_RENEWAL)


async def walk_roots(source: Source, layout: DeviceLayout, trusted: Root, hint: int) -> Root:
    """Walk from ``trusted`` towards version ``hint``, pinning each verified successor; returns
    the last one. A successor that fails verification stops the walk (the root pinned is the
    last good one); so does a missing one (the store's fault: retried next poll)."""
    target = min(hint, trusted.version + MAX_ROOT_ROTATIONS)
    while trusted.version < target:
        key = root_version_key(trusted.version + 1)
        try:
            data, _ = await source.get_small(key, MAX_ROOT_SIZE)
        except MissingKeyError as e:
            raise MissingKeyError(
                f"the store's {MANIFEST_KEY} names trust root version {hint}, but {source.url}/"
                f"{key} is missing (trusted: version {trusted.version}): the store is "
                "incomplete; retry later"
            ) from e
        assert data is not None
        new = verify_successor(data, trusted)
        layout.pin_root(data)
        changed = [r for r in Root.ROLES if keys_changed(trusted, new, r)]
        log.info("trust root version %d verified and pinned%s", new.version,
                 f" (new {', '.join(changed)} keys)" if changed else "")
        trusted = new
    if hint > trusted.version:
        raise RootRotationPending(
            f"the store names trust root version {hint}; this poll verified up to version "
            f"{trusted.version} (at most {MAX_ROOT_ROTATIONS} a poll): the rest on the next poll"
        )
    return trusted
