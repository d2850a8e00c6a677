"""What a signed manifest's fleet settings mean for this device (pure: no I/O, "now" passed in).

:func:`assignment` is the release the device runs (docs/FORMAT.md §5.1, through
:func:`manifest.rollout.target_for`) together with what the update loop must do about it: a
revoked candidate to record as failed, or a candidate that already failed here (the device
then runs the fallback, ``current``, and reports the candidate as skipped).
:func:`rollout_view` is the same decision as ``status`` shows it: the candidate, the state,
the share now, this device's bucket and whether it is in.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from manifest.metadata import Manifest, ReleasePointer
from manifest.rollout import bucket, target_for

__all__ = ["Assignment", "assignment", "rollout_view"]


@dataclass(frozen=True)
class Assignment:
    pointer: ReleasePointer  # the release to run
    assigned: str  # the version the store assigned (a skipped candidate: not ``pointer``'s)
    revoked: str | None = None  # a revoked candidate, to record as failed
    skipped: bool = False  # the assigned candidate failed here before: ``pointer`` is current


def assignment(manifest: Manifest, *, repository_id: str, device_id: str,
               running: str | None, failed: Collection[str], now: datetime) -> Assignment:
    """What this device runs; ``failed``: the versions that failed here before."""
    choice = target_for(manifest.current, manifest.rollout, repository_id=repository_id,
                        device_id=device_id, running=running, now=now)
    version = choice.pointer.version
    if choice.reason == "candidate" and version in failed:
        return Assignment(manifest.current, version, skipped=True)
    return Assignment(choice.pointer, version, revoked=choice.revoked)


def rollout_view(manifest: Manifest, *, repository_id: str, device_id: str,
                 running: str | None, now: datetime) -> dict[str, Any] | None:
    """``status``'s view of the manifest's rollout (None: there is none)."""
    rollout = manifest.rollout
    if rollout is None:
        return None
    candidate = rollout.candidate.version
    mine = bucket(repository_id, candidate, device_id)
    choice = target_for(manifest.current, rollout, repository_id=repository_id,
                        device_id=device_id, running=running, now=now)
    return {"candidate": candidate, "fallback": manifest.current.version,
            "state": rollout.state, "basis_points": rollout.share(now),
            "bucket": mine, "in": choice.pointer.version == candidate,
            "target": choice.pointer.version}
