"""The pure steps of a release: each takes typed values and returns a new frozen one.

::

    manifest, records          --base_pointers-->   the releases patches start from
    hashed groups, bases       --plan_encoding-->   EncodePlan  (reuse what a base holds,
                                                                 encode the rest)
    EncodePlan, encode results --choose_objects-->  ChosenObjects (a patch only if smaller
                                                                   than the full object)
    ChosenObjects, files,
    bases                      --build_index-->     ReleaseIndex (with each group's chain,
                                                                 carried from the bases)
    ChosenObjects, files       --objects_to_upload--> object key -> staged file

No I/O here: :mod:`publisher.release` reads the store and the model, encodes, writes and
uploads, and passes the values between these steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from manifest.download_plan import MAX_ROUTE_OBJECTS
from manifest.entries import MAX_INDEX_DELTAS, ChainStep
from manifest.metadata import (
    FileEntry,
    GroupEntry,
    Manifest,
    ObjectRef,
    PatchRef,
    ReleaseIndex,
    ReleasePointer,
    ReleaseRecord,
    Root,
    TensorEntry,
)

from .encode import EncodeResult, GroupLayout

__all__ = [
    "MAX_CHAIN_STEPS",
    "ChosenObjects",
    "EncodeJob",
    "EncodePlan",
    "HashedGroup",
    "PatchBase",
    "ShippedFile",
    "StoreState",
    "base_pointers",
    "build_index",
    "carry_chain",
    "choose_objects",
    "index_delta_bases",
    "objects_to_upload",
    "plan_encoding",
    "running_pointers",
]


# Chain steps one group keeps (docs/FORMAT.md §6): the nearest to this release's patch bases.
MAX_CHAIN_STEPS = 16


@dataclass(frozen=True)
class StoreState:
    """The verified store as a release finds it; ``bases`` newest first."""

    url: str
    root: Root
    manifest: Manifest | None
    etag: str | None  # of the manifest read: the new one replaces exactly that one
    records: tuple[ReleaseRecord, ...]
    bases: tuple[ReleaseIndex, ...]

    @property
    def next_sequence(self) -> int:
        return (self.manifest.sequence if self.manifest else 0) + 1

    def has_version(self, version: str) -> bool:
        current = self.manifest.current.version if self.manifest else None
        return version == current or any(r.version == version for r in self.records)


def base_pointers(
    manifest: Manifest | None, records: Sequence[ReleaseRecord], k: int,
    checkpoint_every: int = 0, checkpoints: int = 4,
) -> list[ReleasePointer]:
    """The current release, then the most recent others, up to ``k`` versions; then, with
    ``checkpoint_every`` N > 0, the ``checkpoints`` most recent **checkpoint releases** not
    already listed: every N-th release of the channel (the 1st, the N+1-th, ...; ``records``
    oldest first). Patches from checkpoints let a device that fell further behind than ``k``
    releases (and than the chains of earlier patches reach) still download a patch, not the
    full group: it can reach a checkpoint through a short chain (docs/FORMAT.md §6)."""
    pointers: list[ReleasePointer] = []
    if manifest is not None:
        pointers.append(manifest.current)
    for r in reversed(records):
        if r.version not in {p.version for p in pointers}:
            pointers.append(r.pointer)
    recent = pointers[: max(k, 0)]
    if checkpoint_every > 0:
        marks = [r.pointer for i, r in enumerate(records) if i % checkpoint_every == 0]
        seen = {p.version for p in recent}
        recent += [p for p in reversed(marks) if p.version not in seen][:max(checkpoints, 0)]
    return recent


def running_pointers(manifest: Manifest | None) -> list[ReleasePointer]:
    """What the devices of a channel run now: its current release and its rollout candidate."""
    if manifest is None:
        return []
    out = [manifest.current]
    if manifest.rollout is not None:
        out.append(manifest.rollout.candidate)
    return out


def index_delta_bases(manifest: Manifest | None, records: Sequence[ReleaseRecord],
                      n: int) -> list[ReleasePointer]:
    """The releases whose indexes a new index is shipped as deltas from (docs/FORMAT.md §5.3),
    most wanted first: with ``n`` > 0, what the channel's devices run now
    (:func:`running_pointers`), then its ``n`` most recent releases (``records`` oldest
    first); each index once, at most :data:`~manifest.entries.MAX_INDEX_DELTAS`."""
    if n <= 0:
        return []
    out: list[ReleasePointer] = []
    for p in running_pointers(manifest) + [r.pointer for r in reversed(records)][:n]:
        if p.index.sha256 not in {q.index.sha256 for q in out}:
            out.append(p)
    return out[:MAX_INDEX_DELTAS]


@dataclass(frozen=True)
class HashedGroup:
    """A group of the new model as its canonical file, and that file's sha256."""

    layout: GroupLayout
    sha256: str


@dataclass(frozen=True)
class PatchBase:
    """What a patch is made from: a group as released in ``version``."""

    version: str
    group: GroupEntry


@dataclass(frozen=True)
class EncodeJob:
    """Encode a group's content in full (``base`` None) or as a patch from ``base``."""

    layout: GroupLayout
    sha256: str
    base: PatchBase | None
    out_path: str


@dataclass(frozen=True)
class EncodePlan:
    """Per group content (sha256): objects reused from a base release, and what to encode."""

    reused_full: Mapping[str, ObjectRef]
    reused_patches: Mapping[str, tuple[PatchRef, ...]]
    jobs: tuple[EncodeJob, ...]


def plan_encoding(
    groups: Sequence[HashedGroup], bases: Sequence[ReleaseIndex], staging: Path
) -> EncodePlan:
    """Reuse the objects of content a base already has; else a full object and one patch per
    distinct base content of the same group name. Identical contents are encoded once."""
    known: dict[str, GroupEntry] = {}
    for idx in reversed(bases):  # newer entries win
        for g in idx.groups:
            known[g.sha256] = g
    full: dict[str, ObjectRef] = {}
    patches: dict[str, tuple[PatchRef, ...]] = {}
    jobs: list[EncodeJob] = []
    encoded: set[str] = set()
    for group in groups:
        layout, sha = group.layout, group.sha256
        if sha in known:  # unchanged since a base: reuse its full object and its patches
            full[sha] = known[sha].full
            patches[sha] = known[sha].patches
            continue
        if sha in encoded:
            continue  # two groups with identical content
        encoded.add(sha)
        jobs.append(EncodeJob(layout, sha, None, str(staging / f"full-{sha}")))
        seen: set[str] = set()
        for idx in bases:
            bg = idx.group(layout.name)
            if bg is None or bg.sha256 in seen:
                continue
            seen.add(bg.sha256)
            out = str(staging / f"patch-{bg.sha256}-{sha}")
            jobs.append(EncodeJob(layout, sha, PatchBase(idx.version, bg), out))
    return EncodePlan(full, patches, tuple(jobs))


@dataclass(frozen=True)
class ChosenObjects:
    """What the index references per group content, and which staged files hold new objects."""

    full: Mapping[str, ObjectRef]
    patches: Mapping[str, tuple[PatchRef, ...]]
    new: Mapping[str, str]  # object key -> staged file of an object this release made and keeps
    rejected: tuple[str, ...]  # staged patches no smaller than their full object


def choose_objects(plan: EncodePlan, results: Sequence[EncodeResult]) -> ChosenObjects:
    """Keep a patch only if it is smaller than the full object: else a device is better off
    downloading the full object. ``results`` are those of ``plan.jobs``, in any order."""
    jobs = {j.out_path: j for j in plan.jobs}
    done = [(jobs[r.task.out_path], r) for r in results]
    full = dict(plan.reused_full)
    new: dict[str, str] = {}
    for job, r in done:
        if job.base is None:
            ref = ObjectRef(r.sha256, r.length, "dspatch")
            full[job.sha256] = ref
            new[ref.key] = job.out_path
    patches = {sha: list(ps) for sha, ps in plan.reused_patches.items()}
    rejected: list[str] = []
    for job, r in done:
        if job.base is None:
            continue
        if r.length < full[job.sha256].length:
            ref = ObjectRef(r.sha256, r.length, "dspatch")
            patch = PatchRef(job.base.version, job.base.group.sha256, ref)
            patches.setdefault(job.sha256, []).append(patch)
            new[ref.key] = job.out_path
        else:
            rejected.append(job.out_path)
    return ChosenObjects(
        full, {sha: tuple(ps) for sha, ps in patches.items()}, new, tuple(rejected)
    )


@dataclass(frozen=True)
class ShippedFile:
    """A non-tensor file of the model; ``staged`` holds its object if this release made it."""

    entry: FileEntry
    staged: str | None


def build_index(
    version: str,
    now: datetime,
    groups: Sequence[HashedGroup],
    chosen: ChosenObjects,
    files: Sequence[ShippedFile],
    bases: Sequence[ReleaseIndex],
    repository_id: str,
) -> ReleaseIndex:
    entries = []
    for group in groups:
        layout, sha = group.layout, group.sha256
        tensors = tuple(TensorEntry(i.name, i.dtype, i.shape) for i, _ in layout.tensors)
        patches = chosen.patches.get(sha, ())
        chain = carry_chain(sha, patches, [g for idx in bases
                                           if (g := idx.group(layout.name)) is not None])
        entries.append(GroupEntry(layout.name, layout.file, sha, layout.length, tensors,
                                  chosen.full[sha], patches, chain=chain))
    return ReleaseIndex(
        version, now, tuple(entries), tuple(f.entry for f in files),
        tuple(idx.version for idx in bases), repository_id=repository_id,
    )


def carry_chain(
    sha256: str, patches: Sequence[PatchRef], previous: Sequence[GroupEntry]
) -> tuple[ChainStep, ...]:
    """The chain of a group whose new content is ``sha256``, from the same group in earlier
    indexes (``previous``, newest first): their patches become steps ending at their content,
    and their chains carry on. Only steps that lead to a base of ``patches`` (or to
    ``sha256``) within a device's route bound are kept, nearest first, at most
    :data:`MAX_CHAIN_STEPS`; a step is listed once, never twice with a patch."""
    steps: dict[str, ChainStep] = {}
    for g in previous:
        for c in (*(ChainStep(p.base_sha256, g.sha256, g.length, p.object) for p in g.patches),
                  *g.chain):
            steps.setdefault(c.object.sha256, c)
    used = {p.object.sha256 for p in patches}
    # distance: objects still to apply after reaching a content, to arrive at ``sha256``
    distance = {sha256: 0} | {p.base_sha256: 1 for p in patches if p.base_sha256 != sha256}
    kept: list[tuple[int, ChainStep]] = []
    for d in range(MAX_ROUTE_OBJECTS):
        for c in steps.values():
            if c.object.sha256 not in used and distance.get(c.sha256) == d:
                used.add(c.object.sha256)
                kept.append((d, c))
                distance.setdefault(c.base_sha256, d + 1)
    return tuple(c for _, c in kept[:MAX_CHAIN_STEPS])


def objects_to_upload(chosen: ChosenObjects, files: Sequence[ShippedFile]) -> dict[str, str]:
    """Object key -> staged file of everything this release made and its index references."""
    out = dict(chosen.new)
    for f in files:
        if f.staged is not None:
            out[f.entry.object.key] = f.staged
    return out
