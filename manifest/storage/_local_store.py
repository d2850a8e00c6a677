"""The publisher's directory store: the store layout in a local directory (or a mounted one).

Writes are atomic (:mod:`manifest.storage.atomic`); :meth:`LocalStore.put_if` compares and
replaces under an exclusive ``flock`` on ``<dir>/.lock``. The ETag of a file is its SHA-256.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import os
import shutil
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from ..errors import ConflictError, MissingKeyError, OversizeError
from ._files import file_error, key_path, missing_directory, open_regular
from ._listing import StoredObject
from .atomic import atomic_output, fsync_dir, write_atomic
from .location import check_prefix

__all__ = ["LocalStore"]

COPY_BLOCK = 1 << 22


class LocalStore:
    """A directory with the store layout; the embedded default and the simplest mirror."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.url = f"file://{self.root}"

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise missing_directory(self.root)

    @contextlib.contextmanager
    def _errors(self, key: str, writing: bool = False) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise file_error(e, self.root, f"{self.url}/{key}", writing=writing,
                             retryable=False) from e

    def _read(self, key: str, max_size: int | None) -> bytes:
        """The file's bytes; at most ``max_size + 1`` of them."""
        path = key_path(self.root, key)
        with self._errors(key), open_regular(path, f"{self.url}/{key}") as f:
            return f.read() if max_size is None else f.read(max_size + 1)

    def get(self, key: str, max_size: int) -> bytes:
        return self.get_with_etag(key, max_size)[0]

    def get_with_etag(self, key: str, max_size: int) -> tuple[bytes, str]:
        data = self._read(key, max_size)
        if len(data) > max_size:
            raise OversizeError(f"{self.url}/{key} is larger than its {max_size}-byte cap")
        return data, hashlib.sha256(data).hexdigest()

    def exists(self, key: str) -> bool:
        return key_path(self.root, key).is_file()

    def size(self, key: str) -> int:
        path = key_path(self.root, key)
        with self._errors(key), open_regular(path, f"{self.url}/{key}") as f:
            return os.fstat(f.fileno()).st_size

    def put(self, key: str, data: bytes) -> None:
        self._require_root()
        path = key_path(self.root, key)
        with self._errors(key, writing=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)

    def put_file(self, key: str, path: str, cancel: threading.Event | None = None) -> None:
        """Store the file at ``path`` as ``key``, atomically and durably (``cancel`` is not
        looked at: a link is instant and a copy runs at disk speed).

        When ``path`` is on the store's filesystem the object is a hard link to it (no copy:
        the publisher's staged objects are written once), so the caller must not modify
        ``path`` in place afterwards (deleting or replacing it is fine); elsewhere it is copied.
        """
        self._require_root()
        dest = key_path(self.root, key)
        with self._errors(key, writing=True):
            dest.parent.mkdir(parents=True, exist_ok=True)
            if self._link(path, dest):
                return
        with open(path, "rb") as src, self._errors(key, writing=True), atomic_output(dest) as out:
            shutil.copyfileobj(src, out, COPY_BLOCK)

    @staticmethod
    def _link(path: str, dest: Path) -> bool:
        """Hard-link ``path`` to ``dest`` as :func:`atomic_output` would write it (mode 0644,
        fsynced, renamed into place, directory fsynced); False if it cannot be linked."""
        tmp = f"{dest.parent}/.tmp-{os.urandom(8).hex()}"
        try:
            os.link(path, tmp, follow_symlinks=False)
        except OSError:  # another filesystem, no hard links there, ...: copy instead
            return False
        try:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fchmod(fd, 0o644)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, dest)
            tmp = ""
            fsync_dir(dest.parent)
        finally:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return True

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with self._errors(".lock", writing=True):
            f = open(self.root / ".lock", "a")  # noqa: SIM115 (closed below)
        with f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def put_if(self, key: str, data: bytes, etag: str | None) -> None:
        key_path(self.root, key)  # a bad key is refused before the lock is taken
        self._require_root()
        with self._lock():
            try:
                current: str | None = hashlib.sha256(self._read(key, None)).hexdigest()
            except MissingKeyError:
                current = None
            if current != etag:
                raise ConflictError(
                    f"{self.url}/{key} changed since it was read (another writer went first)"
                )
            self.put(key, data)

    def list(self, prefix: str) -> list[str]:
        self._require_root()
        base = self.root / check_prefix(prefix)
        if not base.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root))
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )

    def list_objects(self, prefix: str) -> builtins.list[StoredObject]:
        out = []
        for key in self.list(prefix):
            try:
                st = key_path(self.root, key).stat()
            except FileNotFoundError:  # removed since the listing
                continue
            except OSError as e:
                raise file_error(e, self.root, f"{self.url}/{key}", retryable=False) from e
            out.append(StoredObject(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC)))
        return out

    def delete(self, key: str) -> None:
        path = key_path(self.root, key)
        with self._errors(key, writing=True):
            path.unlink(missing_ok=True)

    def download(self, key: str, dest: str, max_size: int | None = None) -> None:
        path = key_path(self.root, key)
        with self._errors(key):
            src = open_regular(path, f"{self.url}/{key}")
        with src, open(dest, "wb") as out:
            if max_size is None:
                shutil.copyfileobj(src, out, COPY_BLOCK)
                return
            copied = 0
            while block := src.read(min(COPY_BLOCK, max_size + 1 - copied)):
                copied += len(block)
                if copied > max_size:
                    raise OversizeError(f"{self.url}/{key} is larger than its {max_size}-byte "
                                        "cap")
                out.write(block)
