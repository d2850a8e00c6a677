"""In-process hot-swap: the live weights of an agent's model directory, for Python serving code.

::

    live = LiveModel.open("/var/lib/deltaship/model")

    def handle(request):
        w = live.snapshot()                  # once per request; use only ``w`` until the end
        emb = w.tensors["model.embed_tokens.weight"].numpy()
        ...
        return {"version": w.version, ...}

A :class:`~edge_agent.serving.weights.Weights` snapshot is immutable and holds one version
(:func:`~edge_agent.serving.weights.load_version`). When the agent switches ``current`` (a
watchdog event on the model directory, or a poll every ``poll_interval`` seconds for
filesystems whose events are unreliable), a worker thread loads the new version and publishes
it with one reference assignment: requests in flight keep the snapshot they started with, new
requests get the new one, none sees a mix. ``current`` only ever names a complete version
(edge_agent/layout.py), so a half-built one is never loaded. Only the groups whose files
changed are loaded again, and group files are mapped, not read (see
:mod:`edge_agent.serving.weights`).

**Errors.** If the new version cannot be loaded (missing or malformed file, bad index) or the
serving code's ``check`` refuses it (``LiveModel.open(..., check=probe)``), the old snapshot
keeps serving, one line is logged, the error is in :attr:`LiveModel.last_error`, and
that target is not retried until ``current`` changes again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from manifest.errors import DeltashipError, ModelError

from ..layout import CURRENT_LINK
from .weights import GroupLoader, Weights, load_version, map_group

__all__ = ["LiveModel"]

log = logging.getLogger(__name__)


class _QuietObserverShutdown(logging.Filter):
    """Drop watchdog's ERROR for an inotify event that arrives while its observer stops.

    watchdog 7 logs "InotifyEmitter.queue_events() called when the thread is inactive" when
    the agent writes into the model directory just as `LiveModel.close()` stops the
    observer. Nothing is lost (the model is closing), so it must not read as an error in a
    model server's log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_QuietObserverShutdown())


def _read_current(model_dir: Path) -> str:
    try:
        return os.readlink(model_dir / CURRENT_LINK)
    except OSError as e:
        raise ModelError(f"{model_dir / CURRENT_LINK} does not name a version ({e.strerror}): "
                         "has the agent installed one?") from e


class _CurrentChanged(FileSystemEventHandler):
    """Wakes the worker when ``current`` is replaced (rename of a temp link), made or removed."""

    def __init__(self, wake: threading.Event) -> None:
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        for p in (event.src_path, event.dest_path):
            if p and os.path.basename(os.fsdecode(p)) == CURRENT_LINK:
                self._wake.set()


class LiveModel:
    """The live weights of a model directory, swapped whole when its ``current`` moves."""

    def __init__(self, model_dir: Path, weights: Weights, prepared: Any, target: str, *,
                 poll_interval: float, loader: GroupLoader,
                 check: Callable[[Weights], Any] | None, reuse: bool) -> None:
        """Use :meth:`open`."""
        self.model_dir = model_dir
        self._live: tuple[Weights, Any] = (weights, prepared)  # swapped as one reference
        self._target = target
        self._failed: str | None = None
        self._last_error: Exception | None = None
        self._poll_interval = poll_interval
        self._loader = loader
        self._check = check
        self._reuse = reuse
        self._recheck = False
        self._recheck_lock = threading.Lock()
        self._subscribers: list[Callable[[Weights], None]] = []
        self._wake = threading.Event()
        self._closed = False
        self._observer: BaseObserver | None = None
        self._worker = threading.Thread(target=self._run, name="deltaship-hotswap", daemon=True)

    @classmethod
    def open(cls, model_dir: str | os.PathLike[str], *, poll_interval: float = 1.0,
             loader: GroupLoader = map_group, watch: bool = True,
             check: Callable[[Weights], Any] | None = None,
             reuse: bool = True) -> LiveModel:
        """Load the version ``current`` names and follow its switches.

        ``watch=False`` relies on polling alone. ``check(weights)`` runs on every loaded
        version before it goes live (serving code's own acceptance test, e.g. a probe forward
        pass); an exception refuses the version like a load error does, and what it returns
        (e.g. the model built from the weights) goes live with them as :attr:`prepared`. Raises
        :class:`ModelError` when there is no loadable current version (or ``check``'s
        exception for it). ``reuse=False`` reloads every group on a switch (the naive full
        reload, for comparisons).
        """
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        root = Path(model_dir)
        target = _read_current(root)
        weights = load_version(root / target, None, loader)
        prepared = check(weights) if check is not None else None
        live = cls(root, weights, prepared, target, poll_interval=poll_interval,
                   loader=loader, check=check, reuse=reuse)
        if watch:
            live._start_observer()
        live._worker.start()
        return live

    def snapshot(self) -> Weights:
        """The live weights; take them once per request and use nothing else."""
        return self._live[0]

    @property
    def prepared(self) -> Any:
        """What ``check`` returned for the live weights (None without a check); it is swapped
        together with them, and a version refused or abandoned while loading drops it."""
        return self._live[1]

    @property
    def _weights(self) -> Weights:
        return self._live[0]

    @property
    def version(self) -> str:
        return self._weights.version

    @property
    def last_error(self) -> Exception | None:
        """Why the version ``current`` names is not live; None once a swap succeeds."""
        return self._last_error

    @property
    def watching(self) -> bool:
        """Whether filesystem events are followed (else only polling)."""
        return self._observer is not None

    def refresh(self) -> None:
        """Look at ``current`` now (e.g. on SIGHUP), also at the files of the live version.

        Besides following a switch at once, this reloads group files of the live version that
        were replaced in place (``deltaship-agent verify --repair``) and retries a version that
        failed to load (e.g. after raising the open-file limit).
        """
        with self._recheck_lock:
            self._recheck = True
        self._wake.set()

    def subscribe(self, fn: Callable[[Weights], None]) -> Callable[[], None]:
        """Call ``fn(weights)`` on the worker thread after each swap; returns an unsubscriber."""
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn)

    def close(self) -> None:
        """Stop watching; snapshots already taken stay valid."""
        self._closed = True
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None
        if self._worker.is_alive() and self._worker is not threading.current_thread():
            self._worker.join()

    def __enter__(self) -> LiveModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the worker ------------------------------------------------------------------------

    def _start_observer(self) -> None:
        observer = Observer()
        observer.schedule(_CurrentChanged(self._wake), str(self.model_dir), recursive=False)
        try:
            observer.start()
        except OSError as e:  # e.g. the inotify watch limit: polling still works
            log.warning("cannot watch %s (%s); polling every %gs", self.model_dir, e,
                        self._poll_interval)
            return
        self._observer = observer

    def _run(self) -> None:
        # Events only set a flag and the worker loads whatever `current` names when it runs,
        # so a burst of switches is coalesced; the timeout is the polling fallback.
        while not self._closed:
            self._wake.wait(self._poll_interval)
            self._wake.clear()
            if not self._closed:
                self._follow()

    def _follow(self) -> None:
        while not self._closed:
            try:
                target = _read_current(self.model_dir)
            except ModelError as e:
                self._fail(None, e)
                return
            with self._recheck_lock:
                recheck, self._recheck = self._recheck, False
            if recheck:
                self._failed = None
            if target == self._target and not recheck:
                self._failed, self._last_error = None, None  # e.g. rolled back to it
                return
            if target == self._failed:
                return
            try:
                same = target == self._target  # a recheck of the live version's files
                reuse = self._weights if self._reuse or same else None
                weights = load_version(self.model_dir / target, reuse, self._loader)
                if same and all(g is self._weights.groups.get(f)
                                for f, g in weights.groups.items()):
                    self._failed, self._last_error = None, None
                    return  # unchanged
                prepared = self._check(weights) if self._check is not None else None
            except Exception as e:
                with contextlib.suppress(ModelError):
                    if _read_current(self.model_dir) != target:
                        continue  # switched again (and maybe pruned) while loading
                self._fail(target, e)
                return
            with contextlib.suppress(ModelError):
                if _read_current(self.model_dir) != target:
                    continue  # switched again while loading: never publish a stale target
            previous = self._weights
            self._live = (weights, prepared)  # the swap: one reference assignment
            self._target, self._failed, self._last_error = target, None, None
            reused = sum(g is previous.groups.get(f) for f, g in weights.groups.items())
            log.info("now serving %s (was %s): %d groups loaded, %d reused", weights.version,
                     previous.version, len(weights.groups) - reused, reused)
            del previous  # its pages go as soon as the requests still using it end
            for fn in list(self._subscribers):
                try:
                    fn(weights)
                except Exception:
                    log.exception("hot-swap subscriber %r failed", fn)

    def _fail(self, target: str | None, error: Exception) -> None:
        if target is not None:
            self._failed = target
        if str(error) == str(self._last_error):
            return
        self._last_error = error
        what = target or CURRENT_LINK
        if isinstance(error, DeltashipError):
            log.error("cannot load %s, still serving %s: %s", what, self.version, error)
        else:  # a bug: keep serving, but with a traceback
            log.error("cannot load %s, still serving %s", what, self.version, exc_info=error)
