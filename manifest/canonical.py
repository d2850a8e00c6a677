"""Canonical JSON: the exact bytes that signatures cover.

Keys sorted by code point, no insignificant whitespace, UTF-8, no floats (only integers, strings,
booleans, null, lists and objects), so that any implementation produces the same bytes.

Parsing (:func:`loads_object`) refuses an object with a repeated key: JSON leaves its meaning
open (Python keeps the last value, other parsers the first or either), so two implementations
could read one signed document as two different ones.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import FormatError

__all__ = ["canonical_json", "loads_object"]


MAX_DEPTH = 64  # signed documents nest about 6 deep; deeper input is hostile


def _check(value: Any, where: str, depth: int = 0) -> None:
    if isinstance(value, float):
        raise FormatError(f"{where}: floats are not allowed in signed documents")
    if depth > MAX_DEPTH and isinstance(value, dict | list | tuple):
        raise FormatError(f"{where}: nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise FormatError(f"{where}: object keys must be strings")
            _check(v, f"{where}.{k}", depth + 1)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check(v, f"{where}[{i}]", depth + 1)


def canonical_json(value: Any) -> bytes:
    """Serialise ``value`` canonically (see module docstring)."""
    _check(value, "$")
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FormatError(f"a string is not valid Unicode (lone surrogate?): {e}") from e


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for k, v in pairs:
        if k in doc:
            raise ValueError(f"the key {k!r} appears twice in one object")
        doc[k] = v
    return doc


def loads_object(data: bytes, what: str) -> dict[str, Any]:
    """Parse bytes that must hold one JSON object; any problem (a repeated key too) is a
    :class:`FormatError`."""
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_reject_constant,
                         object_pairs_hook=_no_repeated_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{what} is not valid UTF-8 JSON: {e}") from e
    except RecursionError as e:
        raise FormatError(f"{what} is nested too deeply to be a signed document") from e
    if not isinstance(doc, dict):
        raise FormatError(f"{what} is not a JSON object")
    return doc
