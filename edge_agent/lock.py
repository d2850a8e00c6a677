"""One writer at a time per model directory: the service's cycles and operator commands."""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path

__all__ = ["model_dir_lock"]

log = logging.getLogger("deltaship.agent")


@contextlib.contextmanager
def model_dir_lock(state_dir: Path) -> Iterator[None]:
    """Hold ``state_dir/lock`` exclusively; waits (and says so) while another holder works."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "lock", "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another deltaship-agent working on %s", state_dir.parent)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
