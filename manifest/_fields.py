"""How every document reads its fields: the typed field reader, times, names and versions.

Shared by the entries (:mod:`manifest.entries`) and the documents (:mod:`manifest.metadata`);
the public helpers are re-exported by :mod:`manifest.metadata`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from .errors import FormatError, UnsafeNameError

__all__ = [
    "HEX64",
    "SPEC_VERSION",
    "FieldReader",
    "check_channel",
    "check_device_id",
    "check_file_path",
    "check_group_name",
    "check_header",
    "check_repository_id",
    "check_version",
    "document_header",
    "format_time",
    "parse_list",
    "parse_time",
    "read_document_header",
    "short_repr",
]

# 2: the root, the manifest and the release index carry the store's ``repository_id``.
# 3: roles root/release/timestamp, the freshness (timestamp) document around the manifest,
#    immutable roots/<N>.json, unsigned release indexes pinned by signed release records
#    (docs/FORMAT.md). Documents of an older spec_version are refused with what to do.
SPEC_VERSION = 3
_REINIT = ("re-initialise the store with this deltaship (`deltaship-publish init` on a new "
           "prefix), release again and pin the new trust root on devices")
_OLDER_SPEC = {
    1: "an older format whose documents do not name their repository: " + _REINIT,
    2: "an older format without a timestamp role or root chain: " + _REINIT,
}
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# \Z, not $: "$" also matches before a trailing newline, which would let "name\n" through.
HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}\Z")
_PATH_PART = re.compile(r"^[^/\\\x00-\x1f\x7f]{1,255}\Z")
_VERSION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}\Z")
_REPOSITORY_ID = re.compile(r"^[0-9a-f]{32}\Z")
_CHANNEL = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\Z")

T = TypeVar("T")


def short_repr(v: object, limit: int = 256) -> str:
    """``repr(v)`` cut to ``limit`` characters, for one-line messages about values of any size
    (and never a ValueError: ints past Python's 4300-digit str limit are not printed)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 256:
        return f"<an integer of {v.bit_length()} bits>"
    if isinstance(v, list) and len(v) > 16:
        return f"<a list of {len(v)} items>"
    try:
        text = repr(v)
    except ValueError:  # an int inside past the str limit
        return f"<a {type(v).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime(_TIME_FORMAT)


def parse_time(s: object, where: str) -> datetime:
    if not isinstance(s, str):
        raise FormatError(f"{where} must be a time string like 2026-01-31T12:00:00Z")
    try:
        return datetime.strptime(s, _TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError as e:
        raise FormatError(f"{where} is not a time like 2026-01-31T12:00:00Z: {s!r}") from e


def check_group_name(name: str) -> str:
    """Group names become file names on devices: a conservative alphabet, no dot-dot."""
    if not isinstance(name, str) or not _GROUP_NAME.match(name) or ".." in name:
        raise UnsafeNameError(f"unsafe group name {name!r}")
    return name


def check_file_path(path: str) -> str:
    """A relative POSIX path that cannot escape the model directory."""
    if not isinstance(path, str) or not path or len(path) > 1024 or path.startswith("/"):
        raise UnsafeNameError(f"unsafe file name {path!r}")
    for part in path.split("/"):
        if part in ("", ".", "..") or not _PATH_PART.match(part):
            raise UnsafeNameError(f"unsafe file name {path!r}")
    return path


def check_version(v: object, where: str = "version") -> str:
    if not isinstance(v, str) or not _VERSION.match(v):
        raise FormatError(
            f"{where} {v!r} is not a valid version (letters, digits, '.', '_', '+', '-')"
        )
    return v


def check_repository_id(v: object, where: str) -> str:
    """A repository id: 32 lowercase hex digits (128 random bits chosen by ``init``)."""
    if not isinstance(v, str) or not _REPOSITORY_ID.match(v):
        raise FormatError(f"{where} {v!r} is not a repository id (32 lowercase hex digits)")
    return v


def check_channel(v: object, where: str = "channel") -> str:
    """A channel name (``stable``, ``beta``): it becomes part of store keys."""
    if not isinstance(v, str) or not _CHANNEL.match(v):
        raise FormatError(f"{where} {v!r} is not a channel name (lowercase letters, digits, "
                          "'-' and '_', at most 64)")
    return v


def check_device_id(v: object, where: str = "device id") -> str:
    """A device id: it becomes a store key (``reports/<device-id>.json``) and a rollout input."""
    if not isinstance(v, str) or not _DEVICE_ID.match(v):
        raise FormatError(f"{where} {v!r} is not a device id (letters, digits, '.', '_', ':', "
                          "'-'; at most 128; not starting with a punctuation mark)")
    return v


class FieldReader:
    """Pops typed fields from a dict; what is left over is ``unrecognized``.

    ``error`` is what a wrong field raises: :class:`FormatError` for documents from a store;
    the agent's own files pass another class (their faults are local).
    """

    def __init__(self, d: object, where: str, error: type[Exception] = FormatError) -> None:
        if not isinstance(d, dict):
            raise error(f"{where} must be a JSON object")
        self.d: dict[str, Any] = dict(d)
        self.where = where
        self.error = error

    def get(self, key: str, kind: type[T] | tuple[type, ...]) -> Any:
        return self.take(key, kind)

    def take(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        """The value of ``key``; a missing key gives ``default`` (none: required); ``null`` is
        accepted only where the default is None."""
        if key not in self.d:
            if default is ...:
                raise self.error(f"{self.where}: missing field {key!r}")
            return default
        v = self.d.pop(key)
        if v is None and default is None:
            return None
        if (isinstance(v, bool) and kind is int) or not isinstance(v, kind):
            raise self.error(f"{self.where}.{key} has the wrong type")
        return v

    def strings(self, key: str) -> list[str]:
        """A list of strings (missing: empty)."""
        v = self.take(key, list, [])
        if not all(isinstance(s, str) for s in v):
            raise self.error(f"{self.where}.{key} must be a list of strings")
        return list(v)

    def count(self, key: str) -> int:
        v: int = self.get(key, int)
        if v < 0:
            raise self.error(f"{self.where}.{key} must not be negative")
        return v

    def sha256(self, key: str = "sha256") -> str:
        v: str = self.get(key, str)
        if not HEX64.match(v):
            raise self.error(f"{self.where}.{key} is not a lowercase hex sha256")
        return v

    def optional(self, key: str, default: Any) -> Any:
        return self.d.pop(key, default)

    def rest(self) -> dict[str, Any]:
        return self.d


def check_header(r: FieldReader, type_name: str) -> None:
    """A document's ``_type`` is ``type_name`` and its ``spec_version`` one we understand."""
    t = r.get("_type", str)
    if t != type_name:
        raise FormatError(f"{r.where} has _type {t!r}, expected {type_name!r}")
    v = r.get("spec_version", int)
    if v in _OLDER_SPEC:
        raise FormatError(f"{r.where} has spec_version {v}, {_OLDER_SPEC[v]}")
    if v != SPEC_VERSION:
        raise FormatError(
            f"{r.where} has spec_version {v}; this deltaship understands {SPEC_VERSION}: upgrade"
        )


def parse_list(value: Any, where: str, parse: Callable[[Any, str], T]) -> list[T]:
    if not isinstance(value, list):
        raise FormatError(f"{where} must be a list")
    return [parse(v, f"{where}[{i}]") for i, v in enumerate(value)]


def read_document_header(r: FieldReader, type_name: str) -> str:
    """A signed-or-pinned document's header: ``_type``, ``spec_version`` (:func:`check_header`)
    and ``repository_id``, which is returned."""
    check_header(r, type_name)
    return check_repository_id(r.get("repository_id", str), f"{r.where} repository_id")


def document_header(type_name: str, repository_id: str,
                    unrecognized: Mapping[str, Any]) -> dict[str, Any]:
    """The start of a document's ``to_dict``: the fields kept from a newer writer, then
    ``_type``, ``spec_version`` and ``repository_id``."""
    return {**unrecognized, "_type": type_name, "spec_version": SPEC_VERSION,
            "repository_id": repository_id}
