"""The one cost model: the cheapest way for a device to obtain each group and file of a release.

Pure (no I/O): the caller passes the sha256 of the content it holds. The agent's planner runs
it on what is on disk; the publisher's release summary on what a device holding a base release
holds (:func:`download_cost`), so both report the same bytes.

For each group: already present locally (same content hash, from any retained version), a
patch from content the device holds, a **chain** (earlier releases' patches from content the
device holds through intermediate contents, ending in a patch to this release's content: the
group's ``chain`` and ``patches``, at most :data:`MAX_ROUTE_OBJECTS` objects), or the full
object: whichever downloads the fewest bytes (a patch or chain only when smaller than the full
object; ties go to fewer objects). No I/O here: the caller passes what it has on disk.

Every object is downloaded by at most one step (a chain's intermediate steps never use an
object another step of the plan uses, nor any group's full object or patch): the update loop
downloads each step's objects to ``downloads/<sha256>`` and deletes them once that step is
installed, so two steps sharing an object would race on the same file. Files with the same
content (two identical ``LICENSE``-style files, or two groups such as identically initialised
experts) are fetched once, the later ones marked ``have`` (the first one's install provides
the content before the version is built). Two groups, or a group and a file, can never
legitimately share an object (each object rebuilds exactly one content: its target
sha256 is inside it), so an index that says so is refused before anything is downloaded.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Iterable, Set
from dataclasses import dataclass

from .entries import ChainStep
from .errors import FormatError, LocalError
from .metadata import FileEntry, GroupEntry, ObjectRef, ReleaseIndex

__all__ = ["MAX_ROUTE_OBJECTS", "FileStep", "GroupStep", "Plan", "check_include", "content_of",
           "download_cost", "local_inputs", "make_plan", "wanted_groups"]

MAX_ROUTE_OBJECTS = 8  # patches applied one after the other to reach one group's content
Route = tuple[int, tuple[ChainStep, ...]]  # bytes to download, the steps in order


@dataclass(frozen=True)
class GroupStep:
    """How a group is obtained. ``object``: the full object, or the patch that ends the route
    (from ``chain[-1].sha256`` for a chain, else from ``base_sha256``); ``base_sha256``: the
    content on the device the route starts from; ``chain``: the intermediate steps of a
    ``"chain"``, applied in order before ``object``."""

    group: GroupEntry
    kind: str  # "have", "patch", "chain" or "full"
    object: ObjectRef | None = None
    base_sha256: str | None = None
    chain: tuple[ChainStep, ...] = ()

    @property
    def objects(self) -> tuple[ObjectRef, ...]:
        """What the step downloads, in the order it applies them."""
        last = (self.object,) if self.object is not None else ()
        return tuple(c.object for c in self.chain) + last

    @property
    def download(self) -> int:
        return sum(o.length for o in self.objects)

    @property
    def patch_base(self) -> str | None:
        """The content the last object patches (None for a full object)."""
        return self.chain[-1].sha256 if self.chain else self.base_sha256

    @property
    def scratch_bytes(self) -> int:
        """Disk a chain needs besides the group file: two intermediates at a time."""
        sizes = [c.length for c in self.chain]
        return max((a + b for a, b in itertools.pairwise(sizes)), default=sum(sizes))


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

    @property
    def scratch_bytes(self) -> int:
        """Disk for intermediate contents, freed again (chains are applied one at a time)."""
        return max((s.scratch_bytes for s in self.groups), default=0)


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
    groups = wanted_groups(index, include)
    # Objects a chain's intermediate step must not use: the plan's other downloads.
    claimed = {g.full.sha256 for g in groups} | {p.object.sha256 for g in groups
                                                 for p in g.patches}
    claimed |= {f.object.sha256 for f in index.files}
    for g in groups:
        if g.sha256 in planned:
            steps.append(GroupStep(g, "have"))
            continue
        planned.add(g.sha256)
        step = _cheapest_route(g, have, claimed)
        claimed |= {c.object.sha256 for c in step.chain}
        steps.append(step)
    files = []
    for f in index.files:
        files.append(FileStep(f, f.sha256 in planned))
        planned.add(f.sha256)
    plan = Plan(index.version, tuple(steps), tuple(files))
    _check_objects_unshared(plan)
    return plan


def _cheapest_route(g: GroupEntry, have: Set[str], claimed: Set[str]) -> GroupStep:
    """The full object, or the cheapest route of at most :data:`MAX_ROUTE_OBJECTS` patches
    from content in ``have`` to ``g`` if it downloads fewer bytes (bounded Bellman-Ford over
    contents; the group's patches and chain steps are the edges)."""
    edges = [ChainStep(p.base_sha256, g.sha256, g.length, p.object) for p in g.patches]
    edges += [c for c in g.chain if c.object.sha256 not in claimed]
    # content -> (bytes, route): the cheapest way to it with at most k objects, k = 0, 1, ...
    layer: dict[str, Route] = {c.base_sha256: (0, ()) for c in edges if c.base_sha256 in have}
    best: Route | None = None
    for _ in range(MAX_ROUTE_OBJECTS):
        nxt = dict(layer)
        for e in edges:
            start = layer.get(e.base_sha256)
            if start is None or e.sha256 in have or any(h.object == e.object for h in start[1]):
                continue
            route = (start[0] + e.object.length, (*start[1], e))
            if _cheaper(route, nxt.get(e.sha256)):
                nxt[e.sha256] = route
        if nxt == layer:
            break
        layer = nxt
        if _cheaper(layer.get(g.sha256), best):
            best = layer.get(g.sha256)
    if best is None or best[0] >= g.full.length:
        return GroupStep(g, "full", g.full)
    hops = best[1]
    if len(hops) == 1:
        return GroupStep(g, "patch", hops[0].object, hops[0].base_sha256)
    return GroupStep(g, "chain", hops[-1].object, hops[0].base_sha256, hops[:-1])


def _cheaper(a: Route | None, b: Route | None) -> bool:
    return a is not None and (b is None or (a[0], len(a[1])) < (b[0], len(b[1])))


def local_inputs(plan: Plan, have: set[str]) -> tuple[set[str], set[str]]:
    """What ``plan`` takes from the device: (content it reuses as it is, patch bases).

    The caller proves these intact before trusting the plan; a damaged one leaves ``have``
    and :func:`make_plan` picks the full object (or a patch from another base) instead.
    """
    reused = {s.group.sha256 for s in plan.groups if s.kind == "have"}
    reused |= {s.file.sha256 for s in plan.files if s.have}
    bases = {s.base_sha256 for s in plan.groups if s.base_sha256 is not None}  # route starts
    return reused & have, bases


def _check_objects_unshared(plan: Plan) -> None:
    users: dict[str, str] = {}
    downloads = [(o, f"group {s.group.name}") for s in plan.groups for o in s.objects]
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
