"""In-process hot-swap: the live weights of an agent's model directory, for Python serving code.

::

    live = LiveModel.open("/var/lib/deltaship/model")

    def handle(request):
        w = live.snapshot()                  # once per request; use only ``w`` until the end
        emb = w.tensors["model.embed_tokens.weight"].numpy()
        ...
        return {"version": w.version, ...}

A :class:`Weights` snapshot is immutable and holds one version: the tensors the version's
``model.safetensors.index.json`` maps, read from its group files with the strict safetensors
reader. When the agent switches ``current`` (a watchdog event on the model directory, or a poll
every ``poll_interval`` seconds for filesystems whose events are unreliable), a worker thread
loads the new version and publishes it with one reference assignment: requests in flight keep
the snapshot they started with, new requests get the new one, none sees a mix. ``current`` only
ever names a complete version (edge_agent/layout.py), so a half-built one is never loaded.

**Only changed groups are loaded.** A group file is identified by ``(st_dev, st_ino, st_size,
st_mtime_ns)``. Versions are hard links into the content-addressed ``objects/<sha256>`` and the
agent never rewrites a file in place, so a group unchanged between two versions is the same
inode in both and its :class:`Group` (and :class:`Tensor` objects) is reused as it is; new
content is always a new inode. A mapped file holds its inode, so the number cannot be reused
while a snapshot maps it; size and mtime guard :func:`read_group`, which holds nothing. The
release index's sha256 would name what the agent meant to link, not the file that is mapped
(after ``verify --repair`` relinks a damaged file the sha is the same, the inode is new), and
would tie serving code to the agent's private ``.deltaship/`` files.

**Memory.** :func:`map_group` (the default) maps each group file read-only and shared: tensors
are views of the page cache, one copy shared by every process serving the model, reclaimable
under pressure, never duplicated into the heap. A swap adds the changed groups' pages only
(``MAP_POPULATE`` reads them before the swap, so the first request on the new version does not
fault them in from disk); the old groups' pages are released when the last request holding the
old snapshot drops it. Measured (one process, warm page cache) on a 256 MiB model of 8 groups,
swapping 2 of them; RSS growth in MiB, file-backed + anonymous::

                                  after open   both snapshots held   old snapshot dropped
    map_group                     256 + 0      320 + 0               256 + 0
    map_group, full reload        256 + 0      512 + 0               256 + 0
    read_group                    0 + 272      0 + 336               0 + 336

Loading the two changed groups took 3 ms with ``map_group`` and 113 ms with ``read_group``.
A full reload maps the unchanged pages a second time: no new physical pages, but RSS (what
OOM killers and monitoring read) doubles. ``read_group`` puts the whole model in private heap
in every serving process (plus a page cache copy while reading), and the heap kept the freed
64 MiB after the swap; ``map_group``'s pages are the page cache itself, shared and evictable.
A mapping also keeps a pruned version's disk space until the last request holding it ends.
On Python < 3.13 each mapping keeps one file descriptor open: N group files, N descriptors.

**Errors.** If the new version cannot be loaded (missing or malformed file, bad index) or the
serving code's ``check`` refuses it (``LiveModel.open(..., check=probe)``), the old snapshot
keeps serving, one line is logged, the error is in :attr:`LiveModel.last_error`, and
that target is not retried until ``current`` changes again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from manifest.constants import WEIGHT_INDEX_FILE as WEIGHT_INDEX
from manifest.errors import DeltashipError, ModelError
from manifest.safetensors_format import SafetensorsFile

from .dtypes import to_float32

__all__ = [
    "FileIdentity",
    "Group",
    "GroupLoader",
    "LiveModel",
    "Tensor",
    "Weights",
    "load_version",
    "map_group",
    "read_group",
]

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

CURRENT = "current"
SINGLE_FILE = "model.safetensors"
MAX_WEIGHT_INDEX_SIZE = 64 << 20

_NUMPY_DTYPES: Mapping[str, str] = {
    "BOOL": "?", "U8": "u1", "I8": "i1", "I16": "<i2", "U16": "<u2", "F16": "<f2",
    "I32": "<i4", "U32": "<u4", "F32": "<f4", "I64": "<i8", "U64": "<u8", "F64": "<f8",
}  # fmt: skip


@dataclass(frozen=True, slots=True, eq=False)
class Tensor:
    """One tensor: its little-endian bytes (read-only) with dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    raw: memoryview

    def numpy(self) -> npt.NDArray[Any]:
        """A read-only view for dtypes NumPy has; a new float32 array for BF16 and F8_*."""
        np_dtype = _NUMPY_DTYPES.get(self.dtype)
        if np_dtype is None:
            return to_float32(self.raw, self.dtype, self.shape)
        return np.frombuffer(self.raw, dtype=np_dtype).reshape(self.shape)


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """What a group file's content is known by: same identity, same bytes."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True, slots=True, eq=False)
class Group:
    """One group file of a version and its tensors."""

    file: str
    identity: FileIdentity
    tensors: Mapping[str, Tensor]


@dataclass(frozen=True, slots=True, eq=False)
class Weights:
    """An immutable snapshot of one version: take it once per request."""

    version: str
    path: Path  # the version's directory
    groups: Mapping[str, Group]  # group file name -> group
    tensors: Mapping[str, Tensor]


GroupLoader = Callable[[Path], Mapping[str, Tensor]]
"""Reads one group file's tensors (:func:`map_group` or :func:`read_group`)."""

_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_UNTRACKED_FD: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}


def map_group(path: Path) -> Mapping[str, Tensor]:
    """Tensors as views of a read-only shared mapping of the file (see the module docstring)."""
    with SafetensorsFile(path) as st:
        infos, start, size = list(st.tensors.values()), st.data_start, st.size
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size != size:
            raise ModelError(f"{path}: the file changed while being opened")
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | _POPULATE,
                           prot=mmap.PROT_READ, **_UNTRACKED_FD)
    view = memoryview(mapped)  # unmapped when the last tensor view of it is dropped
    return {t.name: Tensor(t.name, t.dtype, t.shape, view[start + t.begin:start + t.end])
            for t in infos}


def read_group(path: Path) -> Mapping[str, Tensor]:
    """Tensors read into private memory (for filesystems that cannot be mapped)."""
    with SafetensorsFile(path) as st:
        return {t.name: Tensor(t.name, t.dtype, t.shape, memoryview(st.read(t)))
                for t in st.tensors.values()}


def load_version(
    version_dir: Path, previous: Weights | None = None, loader: GroupLoader = map_group
) -> Weights:
    """Load a version's weights, reusing ``previous``'s groups whose file identity is unchanged.

    ``version_dir`` holds ``model.safetensors.index.json`` (as the agent writes it) or, for a
    plain checkpoint directory, a single ``model.safetensors``.

    Raises :class:`ModelError` for a missing or malformed index or group file.
    """
    try:
        declared, weight_map = _read_weight_index(version_dir)
        groups: dict[str, Group] = {}
        for file in sorted(set(weight_map.values())):
            path = version_dir / _relative(file)
            identity = FileIdentity.of(os.stat(path))
            old = previous.groups.get(file) if previous is not None else None
            if old is not None and old.identity == identity:
                groups[file] = old
            else:
                groups[file] = Group(file, identity, MappingProxyType(dict(loader(path))))
    except OSError as e:
        raise _os_error(e) from e
    tensors: dict[str, Tensor] = {}
    for name, file in weight_map.items():
        tensor = groups[file].tensors.get(name)
        if tensor is None:
            raise ModelError(f"{version_dir / file}: no tensor {name!r}, which {WEIGHT_INDEX} "
                             "maps to it")
        tensors[name] = tensor
    return Weights(declared or version_dir.name, version_dir, MappingProxyType(groups),
                   MappingProxyType(tensors))


def _read_weight_index(version_dir: Path) -> tuple[str | None, dict[str, str]]:
    path = version_dir / WEIGHT_INDEX
    single = version_dir / SINGLE_FILE
    if not path.exists() and single.is_file():
        with SafetensorsFile(single) as st:  # a plain one-file checkpoint
            return None, dict.fromkeys(st.tensors, SINGLE_FILE)
    with open(path, "rb") as f:
        raw = f.read(MAX_WEIGHT_INDEX_SIZE + 1)
    if len(raw) > MAX_WEIGHT_INDEX_SIZE:
        raise ModelError(f"{path}: larger than {MAX_WEIGHT_INDEX_SIZE} bytes")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not JSON ({e})") from e
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    metadata = doc.get("metadata", {}) if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ModelError(f"{path}: weight_map must map tensor names to file names")
    version = metadata.get("deltaship_version") if isinstance(metadata, dict) else None
    if version is not None and not isinstance(version, str):
        raise ModelError(f"{path}: metadata.deltaship_version must be a string")
    return version, weight_map


def _relative(file: str) -> str:
    p = PurePosixPath(file)
    if p.is_absolute() or ".." in p.parts or "\\" in file or not p.parts:
        raise ModelError(f"{WEIGHT_INDEX} names a file outside the version: {file!r}")
    return file


def _os_error(e: OSError) -> ModelError:
    if e.errno in (errno.EMFILE, errno.ENFILE):
        return ModelError(f"too many open files while mapping the model ({e.filename}): raise "
                          "the open-file limit (ulimit -n, LimitNOFILE=) above its group count")
    return ModelError(f"cannot load {e.filename}: {e.strerror}")


def _read_current(model_dir: Path) -> str:
    try:
        return os.readlink(model_dir / CURRENT)
    except OSError as e:
        raise ModelError(f"{model_dir / CURRENT} does not name a version ({e.strerror}): has "
                         "the agent installed one?") from e


class _CurrentChanged(FileSystemEventHandler):
    """Wakes the worker when ``current`` is replaced (rename of a temp link), made or removed."""

    def __init__(self, wake: threading.Event) -> None:
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        for p in (event.src_path, event.dest_path):
            if p and os.path.basename(os.fsdecode(p)) == CURRENT:
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
        what = target or CURRENT
        if isinstance(error, DeltashipError):
            log.error("cannot load %s, still serving %s: %s", what, self.version, error)
        else:  # a bug: keep serving, but with a traceback
            log.error("cannot load %s, still serving %s", what, self.version, exc_info=error)
