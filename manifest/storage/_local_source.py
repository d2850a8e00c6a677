"""The agent's directory source: the store layout in a local (or mounted) directory.

Reads happen in worker threads; files are opened with :func:`._files.open_regular` and OS
errors translated by :func:`._files.file_error`, as in the publisher's
:class:`~manifest.storage.store.LocalStore`. A directory has no ETags: the base class derives
one from the content. The one write (a device report) is atomic
(:func:`~manifest.storage.atomic.write_atomic`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from ..errors import RangeNotSatisfiableError, RetryableError
from ._files import file_error, key_path, open_regular
from ._pace import DEFAULT_LIMITS, TransferLimits
from ._source_base import Body, Sleep, SourceBase
from .atomic import write_atomic
from .retry import DEFAULT_RETRY, RetryPolicy

__all__ = ["LocalSource"]


class LocalSource(SourceBase):
    """A directory with the store layout (``file:///path``): reads in worker threads."""

    def __init__(self, root: str | os.PathLike[str], *, retry: RetryPolicy = DEFAULT_RETRY,
                 max_rate: float | None = None, limits: TransferLimits = DEFAULT_LIMITS,
                 sleep: Sleep = asyncio.sleep) -> None:
        self.root = Path(root).absolute()
        super().__init__(f"file://{self.root}", retry, max_rate, sleep, limits)

    async def _put(self, key: str, data: bytes, deadline: float) -> None:
        """Atomically replace ``key`` (its directory created); a report a reader sees is
        whole. OS errors become ours (:func:`._files.file_error`)."""
        path = key_path(self.root, key)

        def write() -> None:
            if not self.root.is_dir():
                raise FileNotFoundError(self.root)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)

        try:
            await asyncio.to_thread(write)
        except OSError as e:
            raise file_error(e, self.root, self._where(key), writing=True) from e

    @asynccontextmanager
    async def _open(self, key: str, start: int, etag: str | None) -> AsyncIterator[Body | None]:
        where = self._where(key)
        try:
            f = await asyncio.to_thread(open_regular, key_path(self.root, key), where)
        except OSError as e:
            raise file_error(e, self.root, where) from e
        try:
            size = os.fstat(f.fileno()).st_size
            if start and start >= size:
                raise RangeNotSatisfiableError(
                    f"{where} has only {size} bytes, not more than {start}")
            f.seek(start)

            async def read(n: int) -> bytes:
                try:
                    return await asyncio.to_thread(f.read, n)
                except OSError as e:
                    raise RetryableError(f"cannot read {where}: {e.strerror or e}") from e

            yield Body(start, size, None, read)
        finally:
            f.close()
