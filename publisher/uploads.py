"""Upload a release's objects, starting each as soon as it is known to ship.

A full object always ships (:func:`publisher.release_plan.choose_objects` keeps every one), so
it is uploaded as soon as its container is written, while later groups are still being
encoded: the upload (network, or a local store's fsync) overlaps the CPU work instead of
following it. Everything else (patches, once chosen; other files) starts in :meth:`finish`.
Objects are immutable and content addressed, so an early upload changes nothing a device
can observe: the index naming them is still written after every upload has finished.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, as_completed

from manifest.storage.store import Store

from .progress import Progress
from .summary import UploadStats

__all__ = ["Uploads"]


class Uploads:
    """Uploads to ``store`` on a pool of their own (``workers`` threads, at least 4)."""

    def __init__(self, store: Store, workers: int) -> None:
        self._store = store
        self._pool = ThreadPoolExecutor(max(4, workers))
        self._started: dict[str, tuple[Future[int], int]] = {}
        self._cancel = threading.Event()  # set by close(): uploads in flight stop

    def start(self, key: str, path: str) -> None:
        """Upload ``path`` as ``key`` (skipped if the store has it) unless already started."""
        if key not in self._started:
            size = os.path.getsize(path)
            self._started[key] = (self._pool.submit(self._one, key, path), size)

    @property
    def started(self) -> frozenset[str]:
        """The keys whose upload has been started (or done)."""
        return frozenset(self._started)

    def _one(self, key: str, path: str) -> int:
        if self._store.exists(key):
            return 0
        self._store.put_file(key, path, self._cancel)
        return os.path.getsize(path)

    def finish(self, uploads: dict[str, str], progress: bool | None) -> UploadStats:
        """Upload every object of ``uploads`` (key -> staged file) and wait for all of them
        (those started early too); what the store already held is not counted."""
        for key, path in uploads.items():
            self.start(key, path)
        wanted = [self._started[key] for key in uploads]
        bar = Progress("uploading", sum(size for _, size in wanted), enabled=progress)
        sizes = {id(f): size for f, size in wanted}
        added: list[int] = []
        try:
            for fut in as_completed(f for f, _ in wanted):
                added.append(fut.result())
                bar.advance(sizes[id(fut)])
        finally:
            bar.close()
        return UploadStats(sum(1 for s in added if s), sum(added))

    def close(self) -> None:
        """Stop: uploads not started are dropped, those in flight stop at their next block
        (an S3 multipart upload is aborted, so no parts are left to pay for); returns once
        none runs (call before the staged files are deleted). After :meth:`finish` nothing is
        in flight; before it (Ctrl-C, a failed release) a slow link does not delay the exit
        by the rest of a large object's upload."""
        self._cancel.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
