"""The publisher's local cache: verified base group files, and the staging of running releases.

Layout under the cache directory (default ``$XDG_CACHE_HOME/deltaship/publisher``, else
``~/.cache/deltaship/publisher``)::

    .lock                         held shared by every release, exclusively by `cache clear`
    groups/<sha256>.safetensors   a base group file, rebuilt from its verified full object
    groups/.obj-*, groups/.tmp-*  downloads and rebuilds in progress
    release-*/                    the staged objects of a running release

The cache is bounded: after each release the least recently used group files are removed
until it holds at most ``max_bytes`` (:data:`DEFAULT_CACHE_MAX_BYTES`), unless another
release still holds the cache (it may be about to open a base file): the last release to
end trims it. A use stamps the file's
modification time (access times are unreliable under ``noatime``/``relatime``). Leftovers of
a killed release (staging directories, partial downloads) untouched for a day are removed
too. ``deltaship-publish cache clear`` empties the cache unless a release is using it; only the
entries above are ever counted or removed, so a mistaken ``--cache-dir`` loses nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from manifest.errors import LocalError

__all__ = [
    "DEFAULT_CACHE_MAX_BYTES",
    "CacheUsage",
    "PublisherCache",
    "default_cache_dir",
    "parse_size",
]

GiB = 1 << 30
DEFAULT_CACHE_MAX_BYTES = 4 * GiB
STALE_SECONDS = 24 * 3600  # a leftover this old belongs to no running release
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deltaship" / "publisher"


def parse_size(text: str) -> int:
    """``4294967296``, ``500M``, ``4G``, ``4GiB``, ``1T`` (binary units) -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    number = t[: len(t) - len(unit)]
    if not number.isdigit():
        raise ValueError(f"{text!r} is not a size (bytes, or a number with K, M, G or T)")
    return int(number) * _UNITS[unit]


@dataclass(frozen=True)
class CacheUsage:
    """What the cache holds (or what was removed from it)."""

    path: Path
    files: int
    total_bytes: int

    def to_dict(self) -> dict[str, object]:
        return {"path": str(self.path), "files": self.files, "bytes": self.total_bytes}


class PublisherCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.groups = root / "groups"
        self._held: IO[str] | None = None

    def _mkdirs(self) -> None:
        try:
            self.groups.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LocalError(f"cannot create the publisher cache {self.root}: {e.strerror} "
                             "(pass --cache-dir)") from e

    def group_path(self, sha256: str) -> Path:
        return self.groups / f"{sha256}.safetensors"

    def lookup(self, sha256: str) -> Path | None:
        """The cached group file of content ``sha256``, marked as just used; None if absent."""
        path = self.group_path(sha256)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path if path.is_file() else None

    def begin(self) -> Path:
        """Hold the cache for a release (shared: several releases may run at once) and make
        the release's staging directory, which the caller removes before :meth:`end`."""
        self._mkdirs()
        f = self._lock_file()
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        try:
            staging = Path(tempfile.mkdtemp(prefix="release-", dir=self.root))
        except OSError as e:
            f.close()
            raise LocalError(f"cannot write the publisher cache {self.root}: {e.strerror}") from e
        self._held = f
        return staging

    def end(self, max_bytes: int) -> CacheUsage:
        """Let the cache go, trimming it to ``max_bytes`` (see :meth:`evict`) first when no
        other release holds it: a running release was handed paths to base files it has not
        opened yet, so only the last release out trims (nothing removed: an empty usage)."""
        f = self._held if self._held is not None else self._lock_file()
        self._held = None
        try:
            try:  # shared -> exclusive; refused at once while another release holds it
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return CacheUsage(self.root, 0, 0)
            return self.evict(max_bytes)
        finally:
            f.close()  # closing drops the lock

    def _lock_file(self) -> IO[str]:
        try:
            return open(self.root / ".lock", "a")  # the caller closes it
        except OSError as e:
            raise LocalError(f"cannot use the publisher cache {self.root}: {e.strerror}") from e

    def _entries(self) -> list[Path]:
        """What the cache owns: ``groups/`` and staging directories (nothing else in
        ``root`` is ever counted or removed, whatever directory --cache-dir names)."""
        return [self.groups, *self._staging_dirs()]

    def _staging_dirs(self) -> list[Path]:
        return sorted(p for p in self.root.glob("release-*") if p.is_dir() and not p.is_symlink())

    def usage(self) -> CacheUsage:
        files = [f for e in self._entries() for f in _files(e)]
        return CacheUsage(self.root, len(files), sum(_size(f) for f in files))

    def evict(self, max_bytes: int, now: float | None = None) -> CacheUsage:
        """Remove stale leftovers, then the least recently used group files until at most
        ``max_bytes`` remain; returns what was removed. Best effort: a file that cannot be
        removed is left for the next time."""
        now = time.time() if now is None else now
        removed = [0, 0]

        def drop(path: Path, size: int) -> None:
            with contextlib.suppress(OSError):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed[0] += 1
                removed[1] += size

        for p in [*self._staging_dirs(), *self.groups.glob(".*-*")]:
            if now - _mtime(p) > STALE_SECONDS:
                drop(p, _tree_size(p))
        entries = sorted((_mtime(p), _size(p), p) for p in self.groups.glob("*.safetensors"))
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= max_bytes:
                break
            drop(path, size)
            total -= size
        return CacheUsage(self.root, removed[0], removed[1])

    def clear(self) -> CacheUsage:
        """Remove the cached base files and any staging left over; refused while a release
        holds the cache. Returns what was removed."""
        if not self.root.is_dir():
            return CacheUsage(self.root, 0, 0)
        with self._lock_file() as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise LocalError(f"a release is using the publisher cache {self.root}: "
                                 "clear it when no release runs") from e
            before = self.usage()
            groups = list(self.groups.iterdir()) if self.groups.is_dir() else []
            for p in [*groups, *self._staging_dirs()]:
                try:
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                    else:
                        p.unlink(missing_ok=True)
                except OSError as err:
                    raise LocalError(f"cannot remove {p}: {err.strerror}") from err
        return before


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _files(p: Path) -> list[Path]:
    if not p.is_dir():
        return [p] if p.is_file() else []
    return [f for f in p.rglob("*") if f.is_file()]


def _tree_size(p: Path) -> int:
    return sum(_size(f) for f in _files(p))
