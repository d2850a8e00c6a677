"""The update loop: decides what is normal (python-tuf's ``updater.py`` is the model).

One cycle: fetch the manifest (conditional GET), verify it against the pinned root and the
highest sequence seen, fetch and verify the release index, plan, check free space, download
what is missing (several at once, resumable), install and verify every object, build the
version directory, switch ``current`` atomically, keep ``keep`` previous versions and remove
what nothing references. "Nothing new", "retry later" and "refuse" are decided here; parsers
and verifiers only say what is wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from manifest.download_plan import Plan, make_plan, wanted_groups
from manifest.errors import (
    DeltashipError,
    DiskFullError,
    HashMismatchError,
    HookError,
    LocalError,
    TransportError,
)
from manifest.metadata import ObjectRef, ReleaseIndex, ReleasePointer, Root, format_time
from manifest.trust import (
    MAX_INDEX_SIZE,
    MAX_MANIFEST_SIZE,
    verify_index,
    verify_manifest,
    verify_root,
)

from .config import AgentConfig
from .hooks import parse_hooks
from .install import check_download, install_file, install_group
from .layout import DeviceLayout, hash_file
from .lock import model_dir_lock
from .retry import RetryPolicy, RetryState
from .state import AgentState, load_state, save_state
from .transport import Source, open_source

__all__ = ["Agent", "CycleResult", "next_poll_delay", "run_forever"]

log = logging.getLogger("deltaship.agent")
MANIFEST_COPY = "manifest.json"
SPACE_MARGIN = 16 * 1024 * 1024


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class CycleResult:
    outcome: str  # "up-to-date", "updated", "pinned", "skipped-failed"
    version: str | None
    message: str
    downloaded: int = 0


class Agent:
    def __init__(self, cfg: AgentConfig, now: Callable[[], datetime] = utcnow) -> None:
        self.cfg = cfg
        self.now = now
        self.layout = DeviceLayout(cfg.model_dir)
        self.state_path = cfg.state_dir / "state.json"
        self.grace = timedelta(seconds=cfg.expiry_grace)
        self.hooks = parse_hooks(dict(cfg.hooks))

    # -- trust -----------------------------------------------------------------------------

    def root(self) -> Root:
        try:
            data = self.cfg.trust_path.read_bytes()
        except FileNotFoundError as e:
            raise LocalError(
                f"no pinned trust root at {self.cfg.trust_path}: run `deltaship-agent init`"
            ) from e
        return verify_root(data, now=self.now(), grace=self.grace)

    def local_index(self, version: str, root: Root) -> ReleaseIndex:
        """A retained version's saved index, re-verified against the pinned root."""
        import hashlib

        data = self.layout.load_index_bytes(version)
        pointer = ReleasePointer(
            version, ObjectRef(hashlib.sha256(data).hexdigest(), len(data), "json")
        )
        return verify_index(data, pointer, root)

    # -- one cycle -------------------------------------------------------------------------

    async def cycle(self, source: Source) -> CycleResult:
        with model_dir_lock(self.cfg.state_dir):
            return await self._cycle(source)

    async def _cycle(self, source: Source) -> CycleResult:
        self.layout.prepare()
        state = load_state(self.state_path)
        if state.pending_switch is not None:
            await self.finish_pending_switch(state.pending_switch)
            state = load_state(self.state_path)
        root = self.root()
        etag = state.manifest_etag if (self.cfg.state_dir / MANIFEST_COPY).is_file() else None
        data, new_etag = await source.get_small(MANIFEST_COPY, MAX_MANIFEST_SIZE, etag)
        if data is None:  # unchanged since we last verified it: check it again (expiry)
            data = (self.cfg.state_dir / MANIFEST_COPY).read_bytes()
        manifest = verify_manifest(
            data, root, now=self.now(), min_sequence=state.highest_sequence, grace=self.grace
        )
        if manifest.sequence > state.highest_sequence or new_etag != state.manifest_etag:
            self.layout.save_manifest(data)
            state.highest_sequence = manifest.sequence
            state.manifest_etag = new_etag
            save_state(state, self.state_path)
        target = manifest.current.version
        current = self.layout.current()
        if state.pinned:
            return CycleResult("pinned", current, f"pinned at {state.pinned} by an operator; "
                               f"the store offers {target} (run `deltaship-agent resume`)")
        if current == target and target in state.failed_versions:
            raise HookError(f"{target} is live but failed its health check, and there was no "
                            "previous version to switch back to: fix the model server, then "
                            "run `deltaship-agent resume`")
        if current == target:
            return CycleResult("up-to-date", current, f"up to date at {target}")
        if target in state.failed_versions:
            return CycleResult("skipped-failed", current,
                               f"{target} failed before and is not retried until a newer "
                               "release or `deltaship-agent resume`")
        if self.layout.has_version(target):
            self.verify_version(target, root)
            downloaded = 0
        else:
            ibytes, _ = await source.get_small(
                manifest.current.index.key, min(manifest.current.index.length, MAX_INDEX_SIZE)
            )
            assert ibytes is not None
            index = verify_index(ibytes, manifest.current, root)
            downloaded = await self.install(source, index, ibytes, state)
        state = load_state(self.state_path)
        state.pending_switch = {"from": current, "to": target}
        save_state(state, self.state_path)
        self.layout.switch(target)
        log.info("switched to %s (was %s)", target, current or "nothing")
        await self.check_health(target, current)
        self.commit_switch(target, current)
        return CycleResult("updated", target, f"updated {current or 'nothing'} -> {target}",
                           downloaded)

    def commit_switch(self, target: str, previous: str | None) -> None:
        """The new version passed its checks: record it, forget the plan, prune."""
        state = load_state(self.state_path)
        at = format_time(self.now())
        state.history.append({"at": at, "event": "switch", "from": previous, "to": target})
        plan = state.plan if state.plan and state.plan.get("version") == target else None
        groups = plan.get("groups", {}) if plan else {}
        state.last_update = {
            "version": target, "from": previous, "at": at,
            "downloaded_bytes": state.bytes_last_update if plan else 0,
            "planned_bytes": plan.get("download_bytes", 0) if plan else 0,
            "full_bytes": plan.get("full_bytes", 0) if plan else 0,
            "groups_changed": sum(1 for g in groups.values() if g.get("kind") != "have"),
            "groups": len(groups),
        }
        state.plan = None
        state.pending_switch = None
        save_state(state, self.state_path)
        self.prune(target, previous=previous)

    async def finish_pending_switch(self, pending: dict[str, Any]) -> None:
        """A previous run stopped before its switch's verdict was recorded: finish it now."""
        target, previous = pending.get("to"), pending.get("from")
        prev = previous if isinstance(previous, str) else None
        state = load_state(self.state_path)
        if not isinstance(target, str) or state.pinned:  # an operator decided since
            state.pending_switch = None
            save_state(state, self.state_path)
            return
        if isinstance(pending.get("failed"), str) and prev is not None:
            log.warning("recording the interrupted switch back from %s to %s", target, prev)
            await self._switch_back(target, prev, HookError(pending["failed"]))
        if self.layout.current() != target:  # it never switched
            state.pending_switch = None
            save_state(state, self.state_path)
            return
        log.warning("the check of %s was interrupted: checking it again", target)
        await self.check_health(target, prev)
        self.commit_switch(target, prev)

    async def check_health(self, target: str, previous: str | None) -> None:
        """Notify the model server and check it; on failure switch back and remember.

        Not on the first install: no model server can run before there is a model, and there
        is nothing to switch back to. Any exception from a hook counts as a failure; if the
        agent is stopped before the verdict is recorded, ``state.pending_switch`` makes the
        next run finish it (see :meth:`finish_pending_switch`).
        """
        if self.hooks.empty or previous is None:
            return
        try:
            await self.hooks.after_switch(target, self.layout.version_dir(target))
            return
        except Exception as e:
            failure = e if isinstance(e, HookError) else HookError(f"hook error: {e!r}")
        await self._switch_back(target, previous, failure)

    async def _switch_back(self, target: str, previous: str, failure: HookError) -> None:
        """Undo a failed switch and remember the failure; raises HookError. Idempotent: the
        failure is saved first, so a stop half-way is finished by the next run."""
        state = load_state(self.state_path)
        state.pending_switch = {"from": previous, "to": target, "failed": str(failure)}
        save_state(state, self.state_path)
        back = self.layout.has_version(previous)
        if back:
            if self.layout.current() != previous:
                self.layout.switch(previous)
            try:
                await self.hooks.after_switch(previous, self.layout.version_dir(previous))
            except Exception as e:
                log.error("the previous version %s is not healthy either: %s", previous, e)
        state = load_state(self.state_path)
        if target not in state.failed_versions:
            state.failed_versions.append(target)
        if back:
            state.history.append({"at": format_time(self.now()), "event": "switch",
                                  "from": target, "to": previous,
                                  "reason": "health check failed"})
        state.plan = None
        state.pending_switch = None
        save_state(state, self.state_path)
        if not back:
            raise HookError(f"{target} failed after the switch ({failure}), and {previous} is "
                            "no longer on this device to switch back to: fix the model server "
                            "or release a fixed version") from failure
        self.prune(previous, previous=None)  # the failed version's files go
        raise HookError(
            f"{target} failed after the switch ({failure}); switched back to "
            f"{previous} and will not retry {target} until a newer release or "
            "`deltaship-agent resume`"
        ) from failure

    async def install(
        self, source: Source, index: ReleaseIndex, index_bytes: bytes, state: AgentState
    ) -> int:
        plan = make_plan(index, self.layout.object_shas(), self.cfg.include)
        log.info("plan for %s: download %d bytes (full download: %d) for %d groups, %d files",
                 index.version, plan.download_bytes, plan.full_bytes,
                 sum(1 for s in plan.groups if s.kind != "have"),
                 sum(1 for s in plan.files if not s.have))
        state.plan = plan.to_dict()
        save_state(state, self.state_path)
        self.check_space(plan)
        counted = [0]

        def on_bytes(n: int) -> None:
            counted[0] += n

        sem = asyncio.Semaphore(max(1, self.cfg.downloads))
        # One install at a time (its chunks use both worker threads): memory stays at a few
        # chunks whatever the model size, while downloads go on in parallel.
        installing = asyncio.Semaphore(1)
        with ThreadPoolExecutor(2) as ex:

            async def group_task(step_i: int) -> None:
                step = plan.groups[step_i]
                assert step.object is not None
                obj = await self.download(source, sem, step.object, step.group.name, on_bytes)
                async with installing:
                    await asyncio.to_thread(install_group, self.layout, step, obj, ex)
                obj.unlink(missing_ok=True)

            async def file_task(step_i: int) -> None:
                entry = plan.files[step_i].file
                obj = await self.download(source, sem, entry.object, entry.path, on_bytes)
                async with installing:
                    await asyncio.to_thread(install_file, self.layout, entry, obj)
                obj.unlink(missing_ok=True)

            tasks = [group_task(i) for i, s in enumerate(plan.groups) if s.kind != "have"]
            tasks += [file_task(i) for i, s in enumerate(plan.files) if not s.have]
            await _gather_all(tasks)
        groups = {s.group.name for s in plan.groups}
        files = {s.file.path: s.file.sha256 for s in plan.files}
        self.layout.save_index(index.version, index_bytes)
        self.layout.build_version(index, groups, files)
        state = load_state(self.state_path)
        state.bytes_last_update = counted[0]
        state.bytes_total += counted[0]
        save_state(state, self.state_path)
        return counted[0]

    async def download(
        self, source: Source, sem: asyncio.Semaphore, ref: ObjectRef, what: str,
        on_bytes: Callable[[int], None],
    ) -> Path:
        dest = self.layout.downloads / ref.sha256
        async with sem:
            await source.fetch(ref.key, dest, ref.length, on_bytes)
        await asyncio.to_thread(check_download, dest, ref, f"object for {what}")
        return dest

    def check_space(self, plan: Plan) -> None:
        partial = sum(p.stat().st_size for p in self.layout.downloads.iterdir())
        need = plan.download_bytes - partial + plan.output_bytes + SPACE_MARGIN
        free = self.layout.free_bytes()
        if need > free:
            raise DiskFullError(
                f"the update to {plan.version} needs {need // 2**20} MiB of free disk space in "
                f"{self.cfg.model_dir}, {free // 2**20} MiB are free: free some space"
            )

    def verify_version(self, version: str, root: Root) -> list[str]:
        """Re-hash a retained version against its signed index; raises on damage."""
        bad = self.damaged(version, root)
        if bad:
            raise HashMismatchError(
                f"version {version} is damaged on disk ({', '.join(bad[:3])}): "
                "run `deltaship-agent verify --repair`"
            )
        return bad

    def damaged(self, version: str, root: Root) -> list[str]:
        index = self.local_index(version, root)
        vdir = self.layout.version_dir(version)
        bad = []
        for g in wanted_groups(index, self.cfg.include):
            p = vdir / g.file
            if not p.is_file() or hash_file(p) != g.sha256:
                bad.append(g.file)
        for f in index.files:
            p = vdir / f.path
            if not p.is_file() or hash_file(p) != f.sha256:
                bad.append(f.path)
        return bad

    def prune(self, current: str, previous: str | None) -> None:
        """Keep the current version and the ``keep`` most recent others; drop the rest."""
        state = load_state(self.state_path)
        order = [h["to"] for h in state.history if h.get("event") == "switch"]
        recent: list[str] = []
        for v in reversed(order):
            if v != current and v not in recent and self.layout.has_version(v):
                recent.append(v)
        keep = {current, *recent[: self.cfg.keep]}
        if state.pinned:
            keep.add(state.pinned)
        for v in self.layout.retained():
            if v not in keep:
                self.layout.remove_version(v)
        self.layout.collect_garbage()
        for p in self.layout.downloads.iterdir():
            p.unlink(missing_ok=True)


async def _gather_all(tasks: list[Coroutine[Any, Any, None]]) -> None:
    """Run every task; on the first failure cancel the rest and raise it."""
    running = [asyncio.ensure_future(t) for t in tasks]
    try:
        await asyncio.gather(*running)
    except BaseException:
        for t in running:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        raise


def _record(agent: Agent, result: CycleResult | None, error: DeltashipError | None) -> None:
    state = load_state(agent.state_path)
    state.last_check = format_time(agent.now())
    state.last_result = result.message if result else "failed"
    state.last_error = str(error) if error else None
    save_state(state, agent.state_path)


MAX_RETRY_AFTER = 3600.0  # a store cannot park a device for longer than this


def next_poll_delay(interval: float, backoff: float | None, retry_after: float | None) -> float:
    """Seconds until the next poll after a transport failure (pure).

    The retry backoff while it lasts, else the (jittered) poll interval; never sooner than the
    store's Retry-After, capped at :data:`MAX_RETRY_AFTER`.
    """
    delay = backoff if backoff is not None else interval
    if retry_after is not None and retry_after > delay:
        delay = min(retry_after, max(delay, MAX_RETRY_AFTER))
    return delay


async def run_forever(
    cfg: AgentConfig, *, once: bool = False, retry: RetryPolicy | None = None
) -> int:
    """The service loop; returns the exit code. SIGTERM/SIGINT stop it between steps."""
    agent = Agent(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    policy = retry or RetryPolicy()
    failures = RetryState(policy)
    source = open_source(cfg.store, endpoint_url=cfg.endpoint_url, max_rate=cfg.max_rate)
    try:
        while not stop.is_set():
            delay = cfg.interval * random.uniform(0.8, 1.2)
            task = asyncio.ensure_future(agent.cycle(source))
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                log.info("stopped")
                return 0
            stopper.cancel()
            try:
                result = task.result()
            except DeltashipError as e:
                try:
                    _record(agent, None, e)
                except DeltashipError as why:  # a full disk: keep the cycle's own error
                    log.warning("could not record the failure: %s", why)
                if once:
                    raise  # the command line prints it: one line on stderr
                log.error("update failed: %s", e)
                if isinstance(e, TransportError):
                    delay = next_poll_delay(delay, failures.failed(e, e.retry_after),
                                            e.retry_after)
            else:
                _record(agent, result, None)
                log.info("%s", result.message)
                failures = RetryState(policy)
                if once:
                    return 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
        return 0
    finally:
        await source.close()
