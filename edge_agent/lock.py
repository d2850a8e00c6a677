"""One writer at a time per model directory: the service's cycles and operator commands.

:meth:`edge_agent.layout.DeviceLayout.lock` names the lock file; this module only holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path

__all__ = ["model_dir_lock"]

log = logging.getLogger("deltaship.agent")


@contextlib.contextmanager
def model_dir_lock(lock_file: Path, model_dir: Path) -> Iterator[None]:
    """Hold ``lock_file`` exclusively; waits (and says so) while another holder works."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another deltaship-agent working on %s", model_dir)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
