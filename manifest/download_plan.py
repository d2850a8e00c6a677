"""The one cost model: the cheapest way for a device to obtain each group and file of a release.

Pure (no I/O): the caller passes the sha256 of the content it holds. The agent's planner runs
it on what is on disk; the publisher's release summary on what a device holding a base release
holds (:func:`download_cost`), so both report the same bytes.

For each group: already present locally (same content hash, from any retained version), a
patch from content the device holds, or the full object. Costs are download bytes; ties go to
the step that needs no download. No I/O here: the caller passes what it has on disk.

Every object is downloaded by at most one step: the update loop downloads each step's object
to ``downloads/<sha256>`` and deletes it once that step is installed, so two steps sharing an
object would race on the same file. Files with the same content (two identical
``LICENSE``-style files, or two groups such as identically initialised experts) are fetched
once, the later ones marked ``have`` (the first one's install provides the content before the
version is built). Two groups, or a group and a file,
can never legitimately share an object (each object rebuilds exactly one content: its target
sha256 is inside it), so an index that says so is refused before anything is downloaded.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import FormatError, LocalError
from .metadata import FileEntry, GroupEntry, ObjectRef, ReleaseIndex

__all__ = ["FileStep", "GroupStep", "Plan", "check_include", "content_of", "download_cost",
           "local_inputs", "make_plan", "wanted_groups"]


@dataclass(frozen=True)
class GroupStep:
    group: GroupEntry
    kind: str  # "have", "patch" or "full"
    object: ObjectRef | None = None
    base_sha256: str | None = None

    @property
    def download(self) -> int:
        return self.object.length if self.object else 0


@dataclass(frozen=True)
class FileStep:
    file: FileEntry
    have: bool  # nothing to download: on the device, or another step of the plan fetches it

    @property
    def download(self) -> int:
        return 0 if self.have else self.file.object.length


@dataclass(frozen=True)
class Plan:
    version: str
    groups: tuple[GroupStep, ...]
    files: tuple[FileStep, ...]

    @property
    def download_bytes(self) -> int:
        return sum(s.download for s in self.groups) + sum(s.download for s in self.files)

    @property
    def full_bytes(self) -> int:
        """What the same groups and files would cost as full objects."""
        return sum(s.group.full.length for s in self.groups) + sum(
            s.file.object.length for s in self.files
        )

    @property
    def output_bytes(self) -> int:
        """Bytes of new local content the plan writes (for the free-space check)."""
        return sum(s.group.length for s in self.groups if s.kind != "have") + sum(
            s.file.length for s in self.files if not s.have
        )


def check_include(index: ReleaseIndex, include: Iterable[str],
                  fix: str = "fix `include` in the agent configuration") -> None:
    """Every ``include`` pattern matches a group of ``index``; else a LocalError (a device's
    configuration, fixed by its operator) naming the patterns and the groups that exist."""
    names = [g.name for g in index.groups]
    unmatched = [p for p in include if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        raise LocalError(
            f"include pattern(s) {', '.join(map(repr, unmatched))} match no group of release "
            f"{index.version} (its groups: {shown or 'none'}): {fix}"
        )


def wanted_groups(index: ReleaseIndex, include: Iterable[str]) -> list[GroupEntry]:
    """The groups of ``index`` the ``include`` patterns select (none: every group); a pattern
    that selects nothing is refused (:func:`check_include`), never an empty model."""
    patterns = list(include)
    if not patterns:
        return list(index.groups)
    check_include(index, patterns)
    return [g for g in index.groups if any(fnmatch.fnmatchcase(g.name, p) for p in patterns)]


def make_plan(index: ReleaseIndex, have: set[str], include: Iterable[str] = ()) -> Plan:
    """``have``: sha256 of every verified object on the device.

    Content that appears twice in the index (two groups or two files with the same sha256) is
    fetched once: the later entries are ``have``.
    """
    steps = []
    planned = set(have)
    for g in wanted_groups(index, include):
        if g.sha256 in planned:
            steps.append(GroupStep(g, "have"))
            continue
        planned.add(g.sha256)
        usable = [p for p in g.patches if p.base_sha256 in have]
        best = min(usable, key=lambda p: p.object.length, default=None)
        if best is not None and best.object.length < g.full.length:
            steps.append(GroupStep(g, "patch", best.object, best.base_sha256))
        else:
            steps.append(GroupStep(g, "full", g.full))
    files = []
    for f in index.files:
        files.append(FileStep(f, f.sha256 in planned))
        planned.add(f.sha256)
    plan = Plan(index.version, tuple(steps), tuple(files))
    _check_objects_unshared(plan)
    return plan


def local_inputs(plan: Plan, have: set[str]) -> tuple[set[str], set[str]]:
    """What ``plan`` takes from the device: (content it reuses as it is, patch bases).

    The caller proves these intact before trusting the plan; a damaged one leaves ``have``
    and :func:`make_plan` picks the full object (or a patch from another base) instead.
    """
    reused = {s.group.sha256 for s in plan.groups if s.kind == "have"}
    reused |= {s.file.sha256 for s in plan.files if s.have}
    bases = {s.base_sha256 for s in plan.groups if s.base_sha256 is not None}
    return reused & have, bases


def _check_objects_unshared(plan: Plan) -> None:
    users: dict[str, str] = {}
    downloads = [(s.object, f"group {s.group.name}") for s in plan.groups if s.object]
    downloads += [(s.file.object, f"file {s.file.path}") for s in plan.files if not s.have]
    for ref, what in downloads:
        other = users.setdefault(ref.sha256, what)
        if other != what:
            raise FormatError(
                f"release index {plan.version} lists object {ref.sha256[:16]}... for both "
                f"{other} and {what}: one object cannot rebuild two different contents"
            )


def content_of(index: ReleaseIndex | None) -> set[str]:
    """The sha256 of every group and file a device holding ``index`` (None: nothing) has."""
    if index is None:
        return set()
    return {g.sha256 for g in index.groups} | {f.sha256 for f in index.files}


def download_cost(index: ReleaseIndex, base: ReleaseIndex | None) -> int:
    """Bytes a device holding ``base`` (None: nothing) downloads to reach ``index``."""
    return make_plan(index, content_of(base)).download_bytes
