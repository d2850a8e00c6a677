"""The update loop: decides what is normal (python-tuf's ``updater.py`` is the model).

One cycle: fetch the manifest (conditional GET), walk to the newest trust root it names
(:mod:`edge_agent.roots`), verify it against that root and the floors (the highest content and
timestamp sequences seen), fetch the release index and check it against the manifest's pin,
plan, check free space, download what is missing (several at once, resumable), install and
verify every object, build the version directory, switch ``current`` atomically, keep ``keep``
previous versions and remove what nothing references. "Nothing new", "retry later" and
"refuse" are decided here; parsers and verifiers only say what is wrong. (The service loop
that paces cycles: ``service.py``.)

A cycle holds the model directory's lock and ONE :class:`~edge_agent.state.AgentState`, loaded
when it starts and saved at named commit points, each where a restart must see what happened:

* each verified trust root is pinned as soon as it verifies (:mod:`edge_agent.roots`);
* "fast-forward": a new root changed the release or timestamp keys; the floors they set and
  the manifest copy are forgotten (:meth:`~edge_agent.state.AgentState.follow_root`);
* "manifest verified": the new floors and ETag (replay protection);
* "plan made", "installed": the plan in progress, then the bytes it downloaded;
* "switch pending": saved before ``current`` moves, so a restart gives the switch's verdict;
* "switch failed", "switched back": a failed check, saved before switching back;
* "switch done": the verdict, the history entry and the last update; the plan is forgotten;
* "cycle recorded": the outcome (or error) of the cycle, for ``status``;
* "report": the device report that could not be sent, kept for the next cycle (:mod:`.report`).

The device follows one channel (its manifest key and ``manifest.channel``, docs/FORMAT.md
§5.2) and runs what :func:`manifest.rollout.target_for` assigns it (§5.1): the candidate of a
staged rollout when its bucket is in, else the manifest's ``current`` (the fallback).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from manifest.constants import WEIGHT_INDEX_FILE, manifest_key
from manifest.download_plan import check_include, wanted_groups
from manifest.entries import IndexDelta, PackedIndex
from manifest.errors import (
    DeltashipError,
    ExpiredError,
    HashMismatchError,
    HookError,
    LocalError,
    TransportError,
)
from manifest.index_packing import unpack_index
from manifest.metadata import (
    Manifest,
    ObjectRef,
    ReleaseIndex,
    ReleasePointer,
    Root,
    Timestamp,
    format_time,
)
from manifest.progress import LINE_INTERVAL, Progress
from manifest.storage.source import Source
from manifest.trust import (
    MAX_INDEX_SIZE,
    MAX_MANIFEST_SIZE,
    peek_root_version,
    verify_index,
    verify_manifest,
)

from .config import AgentConfig
from .fetch import (
    Held,
    built_from,
    check_space,
    download,
    fetch_group,
    finish_in_thread,
    gather_all,
    verified_plan,
)
from .fleet import assignment
from .hooks import parse_hooks
from .install import install_file
from .layout import DeviceLayout, weight_index
from .report import CycleOutcome, Reporter
from .roots import check_root_expiry, pinned_root, walk_roots
from .state import AgentState, PendingSwitch, PlanRecord
from .verdict import SwitchVerdicts

__all__ = ["Agent", "CycleResult"]

log = logging.getLogger("deltaship.agent")
INSTALLS = 2  # groups built at once (each hashes its output on a thread of its own)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class CycleResult:
    outcome: str  # "up-to-date", "updated", "pinned", "skipped-failed"
    version: str | None
    message: str
    downloaded: int = 0
    target: str | None = None  # what the store asks this device to run (candidate or current)
    skipped: bool = False  # the target failed here before: the device runs the fallback


class Agent(SwitchVerdicts):
    """The update loop of one device. A cycle (or an operator command,
    :mod:`edge_agent.operations`) holds the device's lock and its state (:meth:`holding_state`)
    and saves it at named commit points (:meth:`commit`)."""

    def __init__(self, cfg: AgentConfig, now: Callable[[], datetime] = utcnow) -> None:
        self.cfg = cfg
        self.now = now
        self.layout = DeviceLayout(cfg.model_dir)
        self.grace = timedelta(seconds=cfg.expiry_grace)
        self.hooks = parse_hooks(dict(cfg.hooks))
        self.reporter = Reporter(cfg)
        self._state: AgentState | None = None
        self._target: str | None = None  # this cycle's, once the manifest named it

    # -- the state a cycle or command holds ------------------------------------------------

    @contextlib.contextmanager
    def holding_state(self, wait: float | None = None) -> Iterator[AgentState]:
        """Hold the model directory's lock and its state, loaded once, until the block ends;
        ``wait``: the most seconds to wait for the lock (None: as long as it takes)."""
        with self.layout.lock(wait):
            self._state = self.layout.read_state()
            try:
                yield self._state
            finally:
                self._state = None

    @property
    def state(self) -> AgentState:
        if self._state is None:
            raise RuntimeError("no agent state is held: use Agent.holding_state()")
        return self._state

    def commit(self, point: str) -> None:
        """Save the held state: ``point`` names what a restart (or a kill) must see."""
        log.debug("saving the agent state: %s", point)
        self.layout.write_state(self.state)

    # -- trust -----------------------------------------------------------------------------

    def root(self) -> Root:
        """The pinned trust root (its expiry is checked where it matters: by a cycle, after
        the walk to the newest root)."""
        return pinned_root(self.layout)

    def local_index(self, version: str, root: Root) -> ReleaseIndex:
        """A retained version's saved index, re-verified against the sha256 and length the
        verified manifest pinned it to when it was installed (indexes are unsigned)."""
        data = self.layout.load_index_bytes(version)
        pointer = ReleasePointer(version, self.layout.index_pin(version))
        return verify_index(data, pointer, root, named_by="the pin saved at its install")

    async def verified_manifest(self, source: Source) -> tuple[bytes, Root, Timestamp]:
        """Fetch the manifest (conditional GET), walk to the trust root it names, forget the
        floors of rotated keys, and verify it (docs/FORMAT.md §13); returns its bytes, the
        root it verified against and the timestamp."""
        state, layout, channel = self.state, self.layout, self.cfg.channel
        root = self.root()
        if state.follow_channel(channel):  # another channel's floors mean nothing here
            log.warning("now following channel %r: forgetting the sequences of the other "
                        "channel's manifest", channel)
            layout.drop_manifest()
            self.commit("channel changed")
        key = manifest_key(channel)
        etag = state.manifest_etag if layout.has_manifest() else None
        data, new_etag = await source.get_small(key, MAX_MANIFEST_SIZE, etag)
        if data is None and layout.has_manifest():
            data = layout.load_manifest()  # unchanged since verified: check it again
        if data is None:  # the source refuses a 304 to an unconditional GET; never trust one
            raise TransportError(f"{source.url}/{key} answered 'not modified' but "
                                 "this device keeps no copy of it: retry later")
        hint = peek_root_version(data)
        if hint > root.version:
            root = await walk_roots(source, layout, root, hint)
        changed = state.follow_root(root)
        if changed:
            log.warning("trust root version %d has new %s keys: forgetting the sequences the "
                        "old keys signed (fast-forward recovery)", root.version,
                        " and ".join(changed))
            layout.drop_manifest()
            self.commit("fast-forward")
        check_root_expiry(root, self.now(), self.grace)
        ts = verify_manifest(data, root, now=self.now(), min_sequence=state.highest_sequence,
                             min_timestamp=state.highest_timestamp, grace=self.grace,
                             channel=channel)
        if (ts.manifest.sequence > state.highest_sequence or ts.sequence > state.highest_timestamp
                or new_etag != state.manifest_etag or not layout.has_manifest()):
            layout.save_manifest(data)
            state.highest_sequence = ts.manifest.sequence
            state.highest_timestamp = ts.sequence
            state.manifest_etag = new_etag
            self.commit("manifest verified")
        return data, root, ts

    # -- one cycle -------------------------------------------------------------------------

    async def cycle(self, source: Source) -> CycleResult:
        """One update cycle; its outcome (or failure) is recorded in the state, then reported
        (when configured: never failing or holding the update, :mod:`.report`)."""
        with self.holding_state():
            started, self._target = self.now(), None
            try:
                result = await self._cycle(source)
            except DeltashipError as e:
                try:
                    self._record("failed", e)
                except DeltashipError as why:  # a full disk: keep the cycle's own error
                    log.warning("could not record the failure: %s", why)
                await self.report(source, started, None, e)
                raise
            self._record(result.message, None)
            await self.report(source, started, result, None)
            return result

    async def report(self, source: Source, started: datetime, result: CycleResult | None,
                     error: DeltashipError | None) -> None:
        """Deliver the cycle's report (and keep it if it could not be); never raises."""
        if not self.reporter.enabled:
            return
        state = self.state
        if result is None:
            outcome = CycleOutcome("failed", self.layout.current(), self._target, str(error),
                                   started, self.now())
        else:
            kind = {"pinned": "pinned", "skipped-failed": "skipped"}.get(result.outcome, "ok")
            outcome = CycleOutcome("skipped" if result.skipped else kind, self.layout.current(),
                                   result.target, None, started, self.now())
        try:
            report = self.reporter.build(self.root().repository_id, state, outcome)
            pending = await self.reporter.deliver(source, report, state.report_pending)
            if pending != state.report_pending:
                state.report_pending = pending
                self.commit("report")
        except Exception as e:  # a report never fails an update
            log.warning("device report: %s", e)

    def _record(self, result: str, error: DeltashipError | None) -> None:
        self.state.last_check = format_time(self.now())
        self.state.last_result = result
        self.state.last_error = str(error) if error else None
        self.commit("cycle recorded")

    async def _cycle(self, source: Source) -> CycleResult:
        self.layout.prepare()
        state = self.state
        if state.pending_switch is not None:
            await self.finish_pending_switch(state.pending_switch)
        data, root, manifest = await self.verified_manifest(source)
        current = self.layout.current()
        pointer, skipped = self.choose(manifest.manifest, root, current)
        target = pointer.version
        self.check_same_release(target, pointer.index)
        if state.pinned:
            return CycleResult("pinned", current, f"pinned at {state.pinned} by an operator; "
                               f"the store offers {target} (run `deltaship-agent resume`)",
                               target=self._target)
        if current == target and self.cfg.include:  # `include` may have changed since
            check_include(self.local_index(target, root), self.cfg.include)
        if current == target and target in state.failed_versions:
            raise HookError(f"{target} is live but failed its health check, and there was no "
                            "previous version to switch back to: fix the model server, then "
                            "run `deltaship-agent resume`")
        if current == target:
            self.prune(target)  # finishes a prune a kill cut short after the switch
            return CycleResult("up-to-date", current, f"up to date at {target}",
                               target=self._target, skipped=skipped)
        if target in state.failed_versions:
            return CycleResult("skipped-failed", current,
                               f"{target} failed before and is not retried until a newer "
                               "release or `deltaship-agent resume`", target=self._target,
                               skipped=True)
        if self.layout.has_version(target):
            self.verify_version(target, root)
            downloaded = 0
        else:  # the index the target's pin names (a rollout's candidate has its own)
            ibytes = await self.fetch_index(source, pointer)
            index = verify_index(ibytes, pointer, root)
            downloaded = await self.install(source, index, ibytes, pointer.index)
        self.check_still_valid(data, root)
        state.pending_switch = PendingSwitch(current, target)
        self.commit("switch pending")
        self.layout.switch(target)
        log.info("switched to %s (was %s)", target, current or "nothing")
        await self.check_health(target, current)
        self.commit_switch(target, current)
        return CycleResult("updated", target, f"updated {current or 'nothing'} -> {target}",
                           downloaded, target=self._target, skipped=skipped)

    def choose(self, manifest: Manifest, root: Root, running: str | None
               ) -> tuple[ReleasePointer, bool]:
        """The release this device runs (:func:`.fleet.assignment`) and whether the one the
        store assigned was skipped; a revoked candidate is recorded as failed at once."""
        a = assignment(manifest, repository_id=root.repository_id, device_id=self.cfg.device_id,
                       running=running, failed=self.state.failed_versions, now=self.now())
        self._target = a.assigned
        if a.revoked is not None and a.revoked not in self.state.failed_versions:
            log.warning("%s was revoked: not taking it again", a.revoked)
            self.state.mark_failed(a.revoked)
            self.commit("revoked")
        return a.pointer, a.skipped

    async def fetch_index(self, source: Source, pointer: ReleasePointer) -> bytes:
        """The bytes of the release index ``pointer`` names, by the cheapest form it offers
        (docs/FORMAT.md §13 step 10): a delta from an index this device holds intact, else
        the zstd form, else the raw object. A packed form is checked against its pin before
        it is decoded and its result against the index pin (a mismatch is the store's fault,
        never a reason to try another form); the caller verifies the index as always."""
        pin = pointer.index
        forms: list[tuple[PackedIndex | IndexDelta, bytes | None]] = []
        for delta in pin.packing.deltas:
            base = self.layout.held_index(delta.base)
            if base is not None:
                forms.append((delta, base))
        if pin.packing.zstd is not None:
            forms.append((pin.packing.zstd, None))
        if not forms:
            data, _ = await source.get_small(pin.key, min(pin.length, MAX_INDEX_SIZE))
            assert data is not None
            return data
        form, base = min(forms, key=lambda f: f[0].length)
        packed, _ = await source.get_small(form.key, min(form.length, MAX_INDEX_SIZE))
        assert packed is not None
        log.info("release index of %s: %d bytes as %s (%d unpacked)", pointer.version,
                 len(packed), "a delta" if base is not None else "zstd", pin.length)
        return unpack_index(packed, form, pin, base)

    def check_same_release(self, version: str, pin: ObjectRef) -> None:
        """A retained ``version`` must be the release the manifest names (its index pin), not
        another release with the same name (a model directory re-pinned to another store)."""
        if not self.layout.has_version(version):
            return
        held = self.layout.index_pin(version)
        if (held.sha256, held.length) != (pin.sha256, pin.length):
            raise LocalError(
                f"version {version} on this device is another release than the store's "
                f"{version} (its index differs): this model directory was used with another "
                "store; give the device a new --model-dir (`deltaship-agent init`)"
            )

    def check_still_valid(self, manifest_bytes: bytes, root: Root) -> None:
        """The manifest verified before a (maybe slow) download must still hold now."""
        try:
            verify_manifest(manifest_bytes, root, now=self.now(),
                            min_sequence=self.state.highest_sequence,
                            min_timestamp=self.state.highest_timestamp, grace=self.grace,
                            channel=self.cfg.channel)
        except ExpiredError as e:
            raise ExpiredError(f"{e} (it expired while the update was downloading; nothing was "
                               "switched)") from e

    # -- installing a release --------------------------------------------------------------

    async def install(self, source: Source, index: ReleaseIndex, index_bytes: bytes,
                      pin: ObjectRef) -> int:
        plan = verified_plan(self.layout, index, self.cfg.include)
        log.info("plan for %s: download %d bytes (full download: %d) for %d groups, %d files",
                 index.version, plan.download_bytes, plan.full_bytes,
                 sum(1 for s in plan.groups if s.kind != "have"),
                 sum(1 for s in plan.files if not s.have))
        self.state.plan = PlanRecord.of(plan)
        self.commit("plan made")
        check_space(self.layout, plan)
        counted = [0]
        # Download and apply: a terminal line, else a log line every few seconds; the bytes
        # downloaded are saved in the plan as often for `status` (docs/FORMAT.md §11).
        progress = Progress(f"updating to {index.version}",
                            plan.download_bytes + plan.output_bytes, line=log.info)
        saved = [time.monotonic()]

        def on_bytes(n: int) -> None:
            counted[0] += n
            progress.advance(n)
            if time.monotonic() - saved[0] >= LINE_INTERVAL:
                saved[0] = time.monotonic()
                self._save_progress(counted[0])

        sem = asyncio.Semaphore(max(1, self.cfg.downloads))
        # Two installs at once (their chunks share a worker thread per core): each hashes its
        # output on a thread of its own, the one serial stage of a build, while memory stays
        # at a few chunks per install whatever the model size, and the downloads of the next
        # steps go on. ``ahead`` bounds the steps in flight (downloading, downloaded or
        # installing), so the finished downloads waiting for an installer stay few; steps take
        # it in plan order. Downloads are held in memory, not written, within ``held``.
        installing = asyncio.Semaphore(INSTALLS)
        ahead = asyncio.Semaphore(2 * max(1, self.cfg.downloads))
        held = Held()
        with ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as ex:

            async def group_task(step_i: int) -> None:
                step = plan.groups[step_i]
                async with ahead:
                    await fetch_group(self.layout, source, sem, installing, step, on_bytes, ex,
                                      held)
                progress.advance(step.group.length)

            async def file_task(step_i: int) -> None:
                entry = plan.files[step_i].file
                async with ahead:
                    obj = await download(self.layout, source, sem, entry.object, entry.path,
                                         on_bytes, held)
                    with built_from(self.layout, held, entry.object, obj):
                        async with installing:
                            await finish_in_thread(install_file, self.layout, entry, obj)
                    if isinstance(obj, Path):
                        await asyncio.to_thread(self.layout.discard_download,
                                                entry.object.sha256)
                progress.advance(entry.length)

            tasks = [group_task(i) for i, s in enumerate(plan.groups) if s.kind != "have"]
            tasks += [file_task(i) for i, s in enumerate(plan.files) if not s.have]
            try:
                await gather_all(tasks)
            finally:
                progress.close()
        groups = {s.group.name for s in plan.groups}
        files = {s.file.path: s.file.sha256 for s in plan.files}
        self.layout.save_index(index.version, index_bytes, pin)
        self.layout.build_version(index, groups, files)
        self.layout.save_stamps()
        self.state.bytes_last_update = counted[0]
        self.state.bytes_total += counted[0]
        if self.state.plan is not None:
            self.state.plan = dataclasses.replace(self.state.plan, done_bytes=counted[0])
        self.commit("installed")
        return counted[0]

    def _save_progress(self, done: int) -> None:
        """The bytes downloaded so far, for `status` (never fails the download)."""
        if self.state.plan is None:
            return
        self.state.plan = dataclasses.replace(self.state.plan, done_bytes=done)
        try:
            self.commit("progress")
        except DeltashipError as e:
            log.warning("could not save the progress: %s", e)

    # -- retained versions -----------------------------------------------------------------

    def verify_version(self, version: str, root: Root) -> list[str]:
        """Re-hash a retained version against its pinned index; raises on damage."""
        bad = self.damaged(version, root)
        if bad:
            raise HashMismatchError(
                f"version {version} is damaged on disk ({', '.join(bad[:3])}): "
                "run `deltaship-agent verify --repair`"
            )
        return bad

    def damaged(self, version: str, root: Root) -> list[str]:
        """The files of a retained version that differ from its pinned index, and its
        ``model.safetensors.index.json`` if it differs from the one the index makes (the
        file model servers load first)."""
        index = self.local_index(version, root)
        groups = wanted_groups(index, self.cfg.include)
        expected = [(g.file, g.sha256) for g in groups]
        expected += [(f.path, f.sha256) for f in index.files]
        weights = weight_index(index, {g.name for g in groups})
        expected.append((WEIGHT_INDEX_FILE, hashlib.sha256(weights).hexdigest()))
        return self.layout.damaged_files(version, expected)

    def prune(self, current: str) -> None:
        """Keep the current version, the ``keep`` most recent others and the pinned one; drop
        the rest, the objects nothing links to and the downloads."""
        order = [h.to for h in self.state.history if h.event == "switch" and h.to is not None]
        recent: list[str] = []
        for v in reversed(order):
            if v != current and v not in recent and self.layout.has_version(v):
                recent.append(v)
        keep = {current, *recent[: self.cfg.keep]}
        if self.state.pinned:
            keep.add(self.state.pinned)
        for v in self.layout.retained():
            if v not in keep:
                self.layout.remove_version(v)
        self.layout.collect_garbage()
        self.layout.clear_downloads()
