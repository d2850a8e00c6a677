"""What the directory backends of both faces share: key -> path, safe opens, OS errors -> ours.

* :func:`key_path` refuses keys that could leave the store directory (see
  :func:`~manifest.storage.location.check_key`).
* :func:`open_regular` opens a store file for reading only if it is a regular file: a device,
  pipe or socket would be endless data (:class:`~manifest.errors.FormatError`). ``O_NONBLOCK``
  so that opening a pipe without a writer cannot hang.
* :func:`file_error` is the one translation of an ``OSError`` met on a store file:

  ==========================  =================================================
  FileNotFoundError           ``StoreConfigError`` if the store directory is
                              missing, else ``MissingKeyError``
  PermissionError             ``StoreConfigError``
  ENOSPC / EDQUOT             ``DiskFullError`` (:func:`manifest.errors.disk_full`)
  any other OSError           ``RetryableError`` (reads), ``TransportError``
                              (writes, and reads of the publisher's face)
  ==========================  =================================================
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from ..errors import (
    DeltashipError,
    FormatError,
    MissingKeyError,
    RetryableError,
    StoreConfigError,
    disk_full,
)
from .location import check_key
from .retry import give_up

__all__ = ["file_error", "key_path", "missing_directory", "open_regular"]


def key_path(root: Path, key: str) -> Path:
    """The file of store key ``key`` under the store directory ``root``."""
    return root / check_key(key)


def missing_directory(root: Path) -> StoreConfigError:
    return StoreConfigError(f"store directory {root} does not exist: create it or fix the store "
                            "URL")


def open_regular(path: Path, where: str) -> BinaryIO:
    """Open a store file for reading; refuse devices, pipes and sockets (endless data)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError(
                f"{where} is not a regular file (a device, pipe or socket): refusing to read it"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_error(e: OSError, root: Path, where: str, *, writing: bool = False,
               retryable: bool = True) -> DeltashipError:
    """Our error for ``e``, met reading (or ``writing``) ``where`` in the store ``root``.

    ``retryable`` False (the publisher's face, which does not retry) gives a failed read the
    final :class:`~manifest.errors.TransportError` at once.
    """
    if isinstance(e, FileNotFoundError | NotADirectoryError):
        if not root.is_dir():
            return missing_directory(root)
        return MissingKeyError(f"{where} is missing from the store: it is incomplete or still "
                               "being published; retry later")
    verb = "write" if writing else "read"
    if isinstance(e, PermissionError):
        return StoreConfigError(f"cannot {verb} {where}: permission denied")
    full = disk_full(e, root)
    if full is not None:
        return full
    error = RetryableError(f"cannot {verb} {where}: {e.strerror or e}")
    return error if retryable and not writing else give_up(error)
