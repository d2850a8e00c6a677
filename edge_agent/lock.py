"""One writer at a time per model directory: the service's cycles and operator commands.

:meth:`edge_agent.layout.DeviceLayout.lock` names the lock file; this module only holds it.
The holder writes its pid and command into the file, so that a process that waits can say who
it waits for. The service's cycles wait as long as it takes (operator commands are short);
operator commands wait at most ``wait`` seconds and then give up with a
:class:`~manifest.errors.ConflictError` (exit 5) that names the holder and what to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from manifest.errors import ConflictError, LocalError, disk_errors

__all__ = ["model_dir_lock"]

log = logging.getLogger("deltaship.agent")

POLL = 0.05  # seconds between tries while waiting with a limit


@contextlib.contextmanager
def model_dir_lock(lock_file: Path, model_dir: Path, wait: float | None = None) -> Iterator[None]:
    """Hold ``lock_file`` exclusively; waits (and says so) while another holder works.

    ``wait``: the most seconds to wait (None: no limit); then ``ConflictError``.
    """
    try:
        with disk_errors(model_dir):
            lock_file.parent.mkdir(parents=True, exist_ok=True)
            f = open(lock_file, "a+")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise LocalError(f"cannot use the model directory {model_dir}: "
                         f"{e.strerror or e} ({e.filename or lock_file})") from e
    with f:
        if not _try_lock(f):
            holder = _holder(f)
            log.warning("waiting for another deltaship-agent (%s) working on %s", holder,
                        model_dir)
            _wait_for(f, wait, holder, model_dir)
        _record_holder(f)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _try_lock(f: IO[str]) -> bool:
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _wait_for(f: IO[str], wait: float | None, holder: str, model_dir: Path) -> None:
    if wait is None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + wait
    while not _try_lock(f):
        if time.monotonic() >= deadline:
            raise ConflictError(
                f"another deltaship-agent ({holder}) is working on {model_dir}; gave up after "
                f"waiting {wait:g} s: retry when it is done, give a longer --wait, or stop "
                "the service first (e.g. `systemctl stop deltaship-agent`)")
        time.sleep(POLL)


def _holder(f: IO[str]) -> str:
    """Who holds the lock, as the holder wrote it (best effort)."""
    with contextlib.suppress(OSError, ValueError):
        f.seek(0)
        text = " ".join(f.read(300).split())
        if text:
            return text
    return "pid unknown"


def _record_holder(f: IO[str]) -> None:
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:2]]) if sys.argv else "python"
    with contextlib.suppress(OSError):
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}: {command}\n")
        f.flush()
