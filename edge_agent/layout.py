"""The device's model directory on disk: the only code that names a path under it or changes it.

::

    MODEL_DIR/
      current -> versions/<V>      symlink, replaced atomically (rename) to switch versions
      versions/<V>/                complete, verified versions: hard links into objects/ plus
                                   model.safetensors.index.json (what serving code loads)
      objects/<sha256>             verified content: group files and other files (read-only)
      .deltaship/
        state.json, root.json      agent state and the trusted root (pinned, then walked)
        manifest.json, lock        the last verified manifest; held by the one writer
        indexes/<V>.json           the release index of each retained version, and
        indexes/<V>.pin.json       the sha256 and length a verified manifest pinned it to
        objects.json               the stat of each object when it was last proven intact
        downloads/<sha256>         store objects being downloaded (kept across restarts)
        staging/, tmp/             half-built versions and patch outputs (cleared on start)

Invariants, kept at every instant so that a crash anywhere is harmless: a file in
``objects/`` has the content its name says; a directory in ``versions/`` is complete and was
fsynced before it got its name; ``current`` only ever points at such a directory.

What could break the first invariant is outside the agent (an editor, a disk, an operator), so
content is never trusted by its name alone when a new version reuses it (docs/FORMAT.md §10):
:meth:`DeviceLayout.damaged_objects` re-hashes every patch base, and every other reused object
unless its stat still matches the one recorded when it was last proven intact (``objects.json``;
a missing or unreadable table only means re-hashing).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from manifest.constants import MANIFEST_KEY, ROOT_KEY
from manifest.constants import WEIGHT_INDEX_FILE as INDEX_FILE
from manifest.errors import DiskFullError, LocalError, disk_errors
from manifest.metadata import ObjectRef, ReleaseIndex
from manifest.storage.atomic import fsync_dir, write_atomic

from .lock import model_dir_lock
from .state import AgentState

__all__ = [
    "CURRENT_LINK",
    "META_DIR",
    "OBJECTS_DIR",
    "STALE_TMP_SECONDS",
    "STATE_FILE",
    "VERSIONS_DIR",
    "DeviceLayout",
    "hash_file",
    "weight_index",
]

# The names under MODEL_DIR, spelled here only (docs/FORMAT.md describes them).
CURRENT_LINK = "current"  # symlink to versions/<V>: what serving code loads
VERSIONS_DIR = "versions"
OBJECTS_DIR = "objects"
META_DIR = ".deltaship"  # the agent's private files
STATE_FILE = "state.json"
PINNED_ROOT_FILE = ROOT_KEY  # the trusted root: `init` pins it, each verified successor replaces it
MANIFEST_COPY_FILE = MANIFEST_KEY  # the last verified manifest, named as in the store
LOCK_FILE = "lock"
STAMPS_FILE = "objects.json"

# (st_dev, st_ino, st_size, st_mtime_ns) of an object when it was last proven intact. Not
# st_ctime: the agent's own hard links (building, pruning versions) change it.
Stamp = tuple[int, int, int, int]


def stamp_of(st: os.stat_result) -> Stamp:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_stamps(data: bytes) -> dict[str, Stamp]:
    """The saved table; whatever is malformed in it is dropped (it only saves re-hashing)."""
    try:
        doc = json.loads(data)
    except ValueError:
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: (v[0], v[1], v[2], v[3]) for k, v in doc.items()
            if isinstance(v, list) and len(v) == 4
            and all(isinstance(x, int) and not isinstance(x, bool) for x in v)}

STALE_TMP_SECONDS = 600  # a temp file this old belongs to no live writer


def hash_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


def weight_index(index: ReleaseIndex, groups: set[str]) -> bytes:
    """The ``model.safetensors.index.json`` of a version holding ``groups``."""
    wanted = [g for g in index.groups if g.name in groups]
    weight_map = {t.name: g.file for g in wanted for t in g.tensors}
    total = sum(g.length for g in wanted)
    doc = {"metadata": {"total_size": total, "deltaship_version": index.version},
           "weight_map": weight_map}
    return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"


class DeviceLayout:
    """``MODEL_DIR`` (``root``): every path under it, and every change to it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / OBJECTS_DIR
        self.versions = root / VERSIONS_DIR
        self.current_link = root / CURRENT_LINK
        self.meta = root / META_DIR
        self.indexes = self.meta / "indexes"
        self.downloads = self.meta / "downloads"
        self.staging = self.meta / "staging"
        self.tmp = self.meta / "tmp"
        self.state_file = self.meta / STATE_FILE
        self.root_file = self.meta / PINNED_ROOT_FILE
        self.manifest_copy = self.meta / MANIFEST_COPY_FILE
        self.lock_file = self.meta / LOCK_FILE
        self.stamps_file = self.meta / STAMPS_FILE
        self._stamps: dict[str, Stamp] | None = None

    def prepare(self) -> None:
        """Create the directories; drop half-built work a crash may have left behind."""
        with disk_errors(self.root):
            for d in (self.objects, self.versions, self.indexes, self.downloads):
                d.mkdir(parents=True, exist_ok=True)
            for d in (self.staging, self.tmp):
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
            for p in self.root.glob(".current.tmp-*"):
                p.unlink(missing_ok=True)
            # Temp files of write_atomic that a crash left behind: the index ones (up to
            # 16 MiB each) are only written by a cycle, which holds the lock; next to
            # state.json, `init` pins root.json before it takes the lock, so only stale
            # ones go there.
            for p in self.indexes.glob(".tmp-*"):
                p.unlink(missing_ok=True)
            for p in self.meta.glob(".tmp-*"):
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - p.stat().st_mtime > STALE_TMP_SECONDS:
                        p.unlink(missing_ok=True)

    # -- the agent's own files -------------------------------------------------------------

    def lock(self, wait: float | None = None) -> contextlib.AbstractContextManager[None]:
        """One writer at a time (the service's cycles and operator commands); ``wait``: the
        most seconds to wait for another holder (None: as long as it takes)."""
        return model_dir_lock(self.lock_file, self.root, wait)

    def read_state(self) -> AgentState:
        """The saved agent state; a fresh one when there is none yet."""
        try:
            data = self.state_file.read_bytes()
        except FileNotFoundError:
            return AgentState()
        except OSError as e:
            raise LocalError(
                f"agent state {self.state_file} is unreadable ({e}): fix or remove it"
            ) from e
        return AgentState.from_json(data, str(self.state_file))

    def write_state(self, state: AgentState) -> None:
        self.meta.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state_file, state.to_json())

    def pin_root(self, data: bytes) -> None:
        """Pin the trust root (``init``, or a verified successor): every manifest and index is
        verified against it. Atomic: a crash leaves the old root or the new one."""
        with disk_errors(self.root):
            self.meta.mkdir(parents=True, exist_ok=True)
        write_atomic(self.root_file, data)

    def read_root(self) -> bytes:
        try:
            return self.root_file.read_bytes()
        except FileNotFoundError as e:
            raise LocalError(
                f"no pinned trust root at {self.root_file}: run `deltaship-agent init`"
            ) from e

    def has_manifest(self) -> bool:
        return self.manifest_copy.is_file()

    def load_manifest(self) -> bytes:
        return self.manifest_copy.read_bytes()

    def save_manifest(self, data: bytes) -> None:
        """Keep the last verified manifest, to re-check its expiry when the store says 304."""
        with disk_errors(self.root):
            write_atomic(self.manifest_copy, data)

    def drop_manifest(self) -> None:
        """Forget the manifest copy (fast-forward recovery, another store pinned)."""
        self.manifest_copy.unlink(missing_ok=True)

    # -- downloads (kept across restarts: the transport resumes them) ------------------------

    def download_path(self, sha256: str) -> Path:
        """Where the store object ``sha256`` is downloaded to."""
        return self.downloads / sha256

    def discard_download(self, sha256: str) -> None:
        self.download_path(sha256).unlink(missing_ok=True)

    def keep_download(self, sha256: str, data: bytes) -> None:
        """Write a verified download that was held in memory to its partial file, so that the
        next try finds it whole instead of fetching it again (an update that failed before it
        was built). Not fsynced: like any partial download it is verified before use."""
        with disk_errors(self.root):
            fd = os.open(self.download_path(sha256),
                         os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)

    def partial_download_bytes(self) -> int:
        """Bytes already downloaded (they count towards the space an update needs)."""
        return sum(p.stat().st_size for p in self.downloads.iterdir())

    def clear_downloads(self) -> None:
        for p in self.downloads.iterdir():
            p.unlink(missing_ok=True)

    # -- objects ---------------------------------------------------------------------------

    def object_path(self, sha256: str) -> Path:
        return self.objects / sha256

    def has_object(self, sha256: str) -> bool:
        return self.object_path(sha256).is_file()

    def object_shas(self) -> set[str]:
        return {p.name for p in self.objects.iterdir() if len(p.name) == 64}

    @contextlib.contextmanager
    def staged_object(self) -> Iterator[Path]:
        """A new empty file under ``tmp/`` to build content in; pass it to
        :meth:`commit_object` once verified. Removed at the end if it was not committed."""
        fd, name = tempfile.mkstemp(dir=self.tmp)
        os.close(fd)
        tmp = Path(name)
        try:
            with disk_errors(self.root):
                yield tmp
        finally:
            tmp.unlink(missing_ok=True)

    def commit_object(self, tmp: Path, sha256: str) -> Path:
        """Make a verified temp file the object ``sha256`` (fsync, read-only, rename)."""
        with disk_errors(self.root):
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o444)
            dest = self.object_path(sha256)
            os.replace(tmp, dest)
            fsync_dir(str(self.objects))
            self._stamp_table()[sha256] = stamp_of(dest.stat())
        return dest

    def remove_object(self, sha256: str) -> None:
        self.object_path(sha256).unlink(missing_ok=True)
        self._stamp_table().pop(sha256, None)

    # -- proving local objects intact (docs/FORMAT.md §10) ---------------------------------

    def _stamp_table(self) -> dict[str, Stamp]:
        if self._stamps is None:
            try:
                self._stamps = _read_stamps(self.stamps_file.read_bytes())
            except OSError:
                self._stamps = {}
        return self._stamps

    def damaged_objects(self, reused: Iterable[str], bases: Iterable[str]) -> set[str]:
        """The objects among ``reused`` and ``bases`` that are missing or do not hold the
        content their name says. Every base is re-hashed; a reused object only when its stat
        differs from the one recorded when it was last proven intact. Intact ones are recorded
        (:meth:`save_stamps` writes the table)."""
        table = self._stamp_table()
        bases = set(bases)
        bad = set()
        for sha in sorted(set(reused) | bases):
            path = self.object_path(sha)
            try:
                now = stamp_of(path.stat())  # taken before hashing: a change while hashing
                if sha not in bases and table.get(sha) == now:  # moves mtime past it
                    continue
                intact = hash_file(path) == sha
            except OSError:
                intact = False
            if intact:
                table[sha] = now
            else:
                table.pop(sha, None)
                bad.add(sha)
        return bad

    def save_stamps(self) -> None:
        """Write the table of proven objects (dropping the ones that are gone). Best effort:
        without it the next update only re-hashes more (a full disk is reported elsewhere)."""
        table = self._stamp_table()
        present = self.object_shas()
        for sha in [k for k in table if k not in present]:
            del table[sha]
        doc = {k: list(v) for k, v in sorted(table.items())}
        with contextlib.suppress(OSError, DiskFullError):
            write_atomic(self.stamps_file, json.dumps(doc, separators=(",", ":")).encode())

    # -- versions --------------------------------------------------------------------------

    def version_dir(self, version: str) -> Path:
        return self.versions / version

    def _index_path(self, version: str) -> Path:
        return self.indexes / f"{version}.json"

    def _pin_path(self, version: str) -> Path:
        return self.indexes / f"{version}.pin.json"

    def has_version(self, version: str) -> bool:
        return (self.version_dir(version).is_dir() and self._index_path(version).is_file()
                and self._pin_path(version).is_file())

    def retained(self) -> list[str]:
        if not self.versions.is_dir():  # nothing installed yet
            return []
        return sorted(p.name for p in self.versions.iterdir() if p.is_dir())

    def current(self) -> str | None:
        try:
            target = os.readlink(self.current_link)
        except (FileNotFoundError, OSError):
            return None
        return Path(target).name

    def live_version(self) -> str | None:
        """The version ``current`` names, if it names one that exists (for ``status``)."""
        return self.current() if self.current_link.exists() else None

    def save_index(self, version: str, data: bytes, pin: ObjectRef) -> None:
        """Keep a verified release index and the sha256 and length the manifest pinned it to
        (unsigned, it is re-verified against that pin), both before ``versions/<V>``."""
        doc = {"sha256": pin.sha256, "length": pin.length}
        with disk_errors(self.root):
            write_atomic(self._pin_path(version), json.dumps(doc, sort_keys=True).encode())
            write_atomic(self._index_path(version), data)

    def load_index_bytes(self, version: str) -> bytes:
        try:
            return self._index_path(version).read_bytes()
        except FileNotFoundError as e:
            raise LocalError(f"version {version} has no saved release index") from e

    def index_pin(self, version: str) -> ObjectRef:
        """The sha256 and length a retained version's index was verified against."""
        try:
            pin = json.loads(self._pin_path(version).read_bytes())
            return ObjectRef(str(pin["sha256"]), int(pin["length"]), "json")
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise LocalError(f"version {version}'s release index has no readable pin ({e}): "
                             "remove that version") from e

    def held_index(self, sha256: str) -> bytes | None:
        """The bytes of a retained version's index whose saved pin is ``sha256``, re-read and
        checked against that pin (a base for an index delta); None when no retained version
        holds it intact."""
        for version in self.retained():
            try:
                pin = self.index_pin(version)
                if pin.sha256 != sha256:
                    continue
                data = self.load_index_bytes(version)
            except (LocalError, OSError):
                continue
            if len(data) == pin.length and hashlib.sha256(data).hexdigest() == sha256:
                return data
        return None

    def build_version(
        self, index: ReleaseIndex, groups: set[str], files: dict[str, str]
    ) -> Path:
        """Assemble ``versions/<V>`` from objects by hard links, fsync it, then name it."""
        version = index.version
        final = self.version_dir(version)
        if final.is_dir():
            return final
        with disk_errors(self.root):
            stage = Path(tempfile.mkdtemp(prefix=f"{version}.", dir=self.staging))
            os.chmod(stage, 0o755)  # mkdtemp makes 0700: serving code may run as another user
            for g in index.groups:
                if g.name in groups:
                    os.link(self.object_path(g.sha256), stage / g.file)
            for path, sha in files.items():
                dest = stage / path
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.link(self.object_path(sha), dest)
            (stage / INDEX_FILE).write_bytes(weight_index(index, groups))
            with open(stage / INDEX_FILE, "rb") as f:
                os.fsync(f.fileno())
            for d in {stage, *(p.parent for p in stage.rglob("*") if p.is_file())}:
                fsync_dir(str(d))
            os.rename(stage, final)
            fsync_dir(str(self.versions))
        return final

    def switch(self, version: str) -> None:
        """Point ``current`` at ``versions/<V>`` atomically (new symlink, rename, fsync)."""
        with disk_errors(self.root):
            tmp = self.root / f".current.tmp-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            os.symlink(os.path.join(VERSIONS_DIR, version), tmp)
            os.replace(tmp, self.current_link)
            fsync_dir(str(self.root))

    def remove_version(self, version: str) -> None:
        d = self.version_dir(version)
        if d.is_dir():
            trash = Path(tempfile.mkdtemp(prefix="gc.", dir=self.staging))
            os.rename(d, trash / version)
            shutil.rmtree(trash, ignore_errors=True)
        self._index_path(version).unlink(missing_ok=True)
        self._pin_path(version).unlink(missing_ok=True)

    def damaged_files(self, version: str, expected: Iterable[tuple[str, str]]) -> list[str]:
        """The names of ``expected`` (name, sha256) that ``versions/<V>`` lacks or holds with
        other content, re-hashed from disk."""
        vdir = self.version_dir(version)
        return [name for name, sha256 in expected
                if not (vdir / name).is_file() or hash_file(vdir / name) != sha256]

    def replace_file(self, version: str, name: str, sha256: str) -> None:
        """Put the object ``sha256`` at ``name`` in ``versions/<V>`` (``verify --repair``).

        A new hard link renamed over the damaged file: a reader sees the old file or the new
        one, never a missing or half-written file.
        """
        vdir = self.version_dir(version)
        dest = vdir / name
        with disk_errors(self.root):
            tmp = vdir / f".repair-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            os.link(self.object_path(sha256), tmp)
            os.replace(tmp, dest)
            fsync_dir(str(dest.parent))

    def rewrite_file(self, version: str, name: str, data: bytes) -> None:
        """Replace ``name`` in ``versions/<V>`` with ``data`` (``verify --repair`` of the
        generated ``model.safetensors.index.json``): written, fsynced and renamed over it."""
        dest = self.version_dir(version) / name
        with disk_errors(self.root):
            write_atomic(dest, data, mode=0o644)  # serving code may run as another user

    def referenced_objects(self) -> set[str]:
        refs: set[str] = set()
        for v in self.retained():
            for p in self.version_dir(v).rglob("*"):
                if p.is_file() and p.name != INDEX_FILE:
                    refs.add(str(os.stat(p).st_ino))
        return refs

    def collect_garbage(self) -> int:
        """Remove the objects no retained version links to; bytes freed."""
        live_inodes = self.referenced_objects()
        freed = 0
        for p in self.objects.iterdir():
            st = p.stat()
            if str(st.st_ino) not in live_inodes:
                freed += st.st_size
                p.unlink()
        return freed

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free
