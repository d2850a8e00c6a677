"""Getting a release's objects onto the device: the verified plan, the space check, downloads.

The update loop (:mod:`edge_agent.updater`) and ``verify --repair`` (:mod:`edge_agent.repair`)
share these; what the device holds is only ever trusted once proven (docs/FORMAT.md §10).
:func:`fetch_group` downloads and installs one step of a plan: a patch, a full object, or a
chain of patches, which falls back to the full object when one of its objects is missing from
the store or fails verification.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, overload

from manifest.download_plan import GroupStep, Plan, local_inputs, make_plan
from manifest.errors import DiskFullError, LocalError, MissingKeyError, UntrustedDataError
from manifest.metadata import ObjectRef, ReleaseIndex
from manifest.storage.source import Source

from .install import Obj, build_group, check_digest, install_chain
from .layout import DeviceLayout

__all__ = ["HOLD_BYTES", "SPACE_MARGIN", "Held", "built_from", "check_space", "download",
           "fetch_group", "finish_in_thread", "gather_all", "keep", "release", "verified_plan"]

log = logging.getLogger("deltaship.agent")
SPACE_MARGIN = 16 * 1024 * 1024  # free bytes an update leaves on the disk at the least
# Downloads held in memory at once, from their first byte until the group they build is built
# (manifest.storage._partial_file): fast links never write a download to the device's disk.
HOLD_BYTES = 64 * 1024 * 1024


class Held:
    """The bytes of downloads held in memory by one install, at most ``limit`` at once; a
    download that does not fit is written to disk as before. Used from the event loop only."""

    def __init__(self, limit: int = HOLD_BYTES) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


def verified_plan(layout: DeviceLayout, index: ReleaseIndex, include: Iterable[str]) -> Plan:
    """Plan from local content proven intact (docs/FORMAT.md §10), not trusted by name.

    Every object the plan would reuse or patch is checked (:meth:`DeviceLayout.
    damaged_objects`); a damaged one is removed from ``objects/`` and from the planner's
    input, which then picks the full object or a patch from another intact base, until
    everything the plan takes from the device is proven.
    """
    patterns = tuple(include)
    have = layout.object_shas()
    hashed: set[str] = set()
    seen: set[str] = set()
    while True:
        plan = make_plan(index, have, patterns)
        reused, bases = local_inputs(plan, have)
        reused, bases = reused - seen - bases, bases - hashed
        if not reused and not bases:
            break
        bad = _damaged_objects(layout, reused, bases)
        seen |= reused | bases
        hashed |= bases
        for sha in sorted(bad):
            log.warning("objects/%s does not hold the content its name says: "
                        "fetching that content again", sha)
            layout.remove_object(sha)
        have -= bad
    layout.save_stamps()
    return plan


def _damaged_objects(layout: DeviceLayout, reused: set[str], bases: set[str]) -> set[str]:
    """:meth:`DeviceLayout.damaged_objects`, one object per task on every core (hashlib
    releases the GIL): proving the bases of a dense update re-hashes most of the model."""
    layout.damaged_objects((), ())  # loads the stamp table once, before the threads share it
    shas = sorted(reused | bases)
    if len(shas) < 2:
        return layout.damaged_objects(reused, bases)

    def one(sha: str) -> set[str]:
        return layout.damaged_objects({sha} & reused, {sha} & bases)

    with ThreadPoolExecutor(os.cpu_count() or 1) as ex:
        return set().union(*ex.map(one, shas))


def check_space(layout: DeviceLayout, plan: Plan) -> None:
    """Refuse an update the disk cannot hold (partial downloads already count)."""
    need = plan.download_bytes - layout.partial_download_bytes() + plan.output_bytes
    need += plan.scratch_bytes
    need += SPACE_MARGIN
    free = layout.free_bytes()
    if need > free:
        raise DiskFullError(
            f"the update to {plan.version} needs {need // 2**20} MiB of free disk space in "
            f"{layout.root}, {free // 2**20} MiB are free: free some space"
        )


@overload
async def download(
    layout: DeviceLayout, source: Source, sem: asyncio.Semaphore, ref: ObjectRef, what: str,
    on_bytes: Callable[[int], None],
) -> Path: ...


@overload
async def download(
    layout: DeviceLayout, source: Source, sem: asyncio.Semaphore, ref: ObjectRef, what: str,
    on_bytes: Callable[[int], None], held: Held | None,
) -> Obj: ...


async def download(
    layout: DeviceLayout, source: Source, sem: asyncio.Semaphore, ref: ObjectRef, what: str,
    on_bytes: Callable[[int], None], held: Held | None = None,
) -> Obj:
    """Fetch (or finish fetching) the store object ``ref`` and check its length and sha256
    (hashed while it was received) before anything reads it; a bad one is discarded, so that
    it is fetched anew. Partial downloads are not fsynced: one that a power loss (or anything
    else) damaged before this run fails the check and is fetched once more from byte 0 here.

    With ``held``, a download that fits in it may come back as bytes, never written to disk;
    the caller gives its length back to ``held`` once it is done with them."""
    dest = layout.download_path(ref.sha256)
    hold = held is not None and held.take(ref.length)
    data: bytes | None = None
    try:
        async with sem:
            resumed = await asyncio.to_thread(_size, dest)
            sha, data = await _fetch(source, ref, dest, on_bytes, hold)
            if sha != ref.sha256 and resumed:
                log.warning("the partial download of %s (%s) was damaged before this run "
                            "(%d bytes kept): downloading it again", what, ref.key, resumed)
                data = None  # dropped: the budget is given back if what follows fails
                await asyncio.to_thread(layout.discard_download, ref.sha256)
                sha, data = await _fetch(source, ref, dest, on_bytes, hold)
        try:
            check_digest(sha, ref, f"object for {what}")
        except Exception:  # not a cancellation: the download may be good
            data = None
            await asyncio.to_thread(layout.discard_download, ref.sha256)
            raise
    finally:
        if hold and data is None:
            assert held is not None
            held.give(ref.length)
    return dest if data is None else data


async def _fetch(source: Source, ref: ObjectRef, dest: Path, on_bytes: Callable[[int], None],
                 hold: bool) -> tuple[str, bytes | None]:
    if hold:
        return await source.fetch_held(ref.key, dest, ref.length, on_bytes)
    return await source.fetch(ref.key, dest, ref.length, on_bytes), None


def keep(layout: DeviceLayout, ref: ObjectRef, obj: Obj) -> None:
    """On a failure before ``obj`` was built: write it to disk if it was held, so that the
    next try does not download it again (best effort; blocking, on failure paths only)."""
    if not isinstance(obj, bytes):
        return
    try:
        layout.keep_download(ref.sha256, obj)
    except LocalError as e:
        layout.discard_download(ref.sha256)
        log.warning("could not keep the download of %s for the next try: %s", ref.key, e)


def release(held: Held | None, obj: Obj) -> None:
    """Give a held download's bytes back to ``held`` (the caller drops ``obj``); a path
    (nothing held) is ignored."""
    if held is not None and isinstance(obj, bytes):
        held.give(len(obj))


@contextlib.contextmanager
def built_from(layout: DeviceLayout, held: Held | None, ref: ObjectRef,
               obj: Obj) -> Iterator[Obj]:
    """``obj`` (the verified download of ``ref``) while what it builds is built: on a failure
    a held download is written to disk for the next try (:func:`keep`); either way its bytes
    are given back to ``held`` (:func:`release`)."""
    try:
        yield obj
    except BaseException:
        keep(layout, ref, obj)
        raise
    finally:
        release(held, obj)


P = ParamSpec("P")
T = TypeVar("T")


async def finish_in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``asyncio.to_thread`` for a build: when the update is cancelled (another group failed)
    it waits for the call to end, since a thread cannot be stopped. Only then do the caller's
    exit handlers run: the staged file is removed once nothing writes to it (its space is
    free again) and a held download is kept on a disk the build no longer fills."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller sees
        raise


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


async def fetch_group(
    layout: DeviceLayout, source: Source, sem: asyncio.Semaphore, installing: asyncio.Semaphore,
    step: GroupStep, on_bytes: Callable[[int], None], executor: ThreadPoolExecutor,
    held: Held | None = None,
) -> None:
    """Download and install one group ``step`` (not ``have``); installs take ``installing``.
    A chain whose object the store lacks or that fails verification is replaced by the
    group's full object (logged); a transport failure is raised (the update is retried, and
    finished downloads are kept). Downloads may be held in memory in ``held``."""
    g = step.group
    if step.kind == "chain":
        chain_objects = step.objects
        try:
            paths = [asyncio.ensure_future(
                download(layout, source, sem, o, g.name, on_bytes, held))
                for o in chain_objects]
            try:
                objs = await asyncio.gather(*paths)
            except BaseException as e:
                for t in paths:
                    t.cancel()
                # The finished downloads are verified: kept for the next try (docs/FORMAT.md
                # §10), unless the full object replaces the chain.
                fallback = isinstance(e, (MissingKeyError, UntrustedDataError))
                done = await asyncio.gather(*paths, return_exceptions=True)
                for o, r in zip(chain_objects, done, strict=True):
                    if not isinstance(r, BaseException):
                        if not fallback:
                            keep(layout, o, r)
                        release(held, r)
                raise
            with contextlib.ExitStack() as building:
                for o, one in zip(chain_objects, objs, strict=True):
                    building.enter_context(built_from(layout, held, o, one))
                async with installing:
                    await finish_in_thread(install_chain, layout, step, objs, executor)
        except (MissingKeyError, UntrustedDataError) as e:
            log.warning("group %s: the chain of %d patches failed (%s): fetching the full "
                        "object instead", g.name, len(chain_objects), e)
            step = GroupStep(g, "full", g.full)
        for o in chain_objects:  # kept on other failures: the next try resumes them
            layout.discard_download(o.sha256)
        if step.kind == "chain":
            return
    assert step.object is not None
    obj = await download(layout, source, sem, step.object, g.name, on_bytes, held)
    with built_from(layout, held, step.object, obj), layout.staged_object() as tmp:
        async with installing:
            await finish_in_thread(build_group, layout, step, obj, tmp, executor)
        # Outside ``installing``: the fsync of this group overlaps the build of the next.
        await asyncio.to_thread(layout.commit_object, tmp, g.sha256)
    if isinstance(obj, Path):
        await asyncio.to_thread(layout.discard_download, step.object.sha256)  # unlink: ms


async def gather_all(tasks: list[Coroutine[Any, Any, None]]) -> None:
    """Run every task; on the first failure cancel the rest and raise it."""
    running = [asyncio.ensure_future(t) for t in tasks]
    try:
        await asyncio.gather(*running)
    except BaseException:
        for t in running:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        raise
