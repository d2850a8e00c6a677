"""The stores this publisher machine initialised or released to, and the keys that sign them.

`init` looks here to warn when one of its keys already signs another store this machine knows
of (two stores sharing a release key are told apart only by their ``repository_id``, checked by
devices since spec_version 2; docs/FORMAT.md §4). A small JSON file, written atomically::

    {"_type": "deltaship.known-stores", "stores": {"<store url>":
        {"repository_id": "<32 hex>", "keyids": ["<keyid>", ...], "updated": "<time>"}}}

at ``$XDG_CONFIG_HOME/deltaship/known-stores.json`` (default ``~/.config``). It is advice only:
a missing, unreadable or malformed file counts as empty, and a failure to write it is logged and
otherwise ignored; nothing a release or a device does depends on it. At most
:data:`MAX_STORES` stores are kept (the most recently updated).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from manifest.errors import DeltashipError
from manifest.metadata import Root, format_time
from manifest.storage.atomic import write_atomic

__all__ = ["MAX_STORES", "KnownStore", "KnownStores", "default_known_stores_path"]

log = logging.getLogger("deltaship.publisher")
TYPE = "deltaship.known-stores"
MAX_STORES = 500
MAX_FILE_SIZE = 4 * 1024 * 1024


def default_known_stores_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "deltaship" / "known-stores.json"


@dataclass(frozen=True)
class KnownStore:
    url: str
    repository_id: str
    keyids: tuple[str, ...]
    updated: str = ""


class KnownStores:
    """The registry file at ``path`` (read on every call: another publisher may write it)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_known_stores_path()

    def stores(self) -> dict[str, KnownStore]:
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_FILE_SIZE + 1)
            doc = json.loads(data) if len(data) <= MAX_FILE_SIZE else None
        except (OSError, ValueError) as e:
            if not isinstance(e, FileNotFoundError):
                log.warning("ignoring the unreadable list of known stores %s: %s", self.path, e)
            return {}
        if not isinstance(doc, dict) or doc.get("_type") != TYPE:
            return {}
        entries = doc.get("stores")
        out: dict[str, KnownStore] = {}
        for url, entry in (entries.items() if isinstance(entries, dict) else ()):
            parsed = _entry(url, entry)
            if parsed is not None:
                out[url] = parsed
        return out

    def sharing_keys(self, url: str, keyids: tuple[str, ...]) -> list[KnownStore]:
        """Other stores (not ``url``) signed by any of ``keyids``."""
        mine = set(keyids)
        return [s for u, s in sorted(self.stores().items())
                if u != url and mine & set(s.keyids)]

    def remember(self, url: str, root: Root, now: datetime) -> None:
        """Record ``url`` as signed by ``root``'s keys; a failure is only logged."""
        stores = self.stores()
        stores[url] = KnownStore(url, root.repository_id, tuple(sorted(root.keys)),
                                 format_time(now))
        kept = sorted(stores.values(), key=lambda s: s.updated, reverse=True)[:MAX_STORES]
        doc: dict[str, Any] = {"_type": TYPE, "stores": {
            s.url: {"repository_id": s.repository_id, "keyids": list(s.keyids),
                    "updated": s.updated} for s in sorted(kept, key=lambda s: s.url)}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(doc, indent=1).encode() + b"\n", 0o600)
        except (OSError, DeltashipError) as e:
            log.warning("could not update the list of known stores %s: %s", self.path, e)


def _entry(url: Any, e: Any) -> KnownStore | None:
    if not isinstance(url, str) or not isinstance(e, dict):
        return None
    rid, keyids, updated = e.get("repository_id"), e.get("keyids"), e.get("updated", "")
    if not isinstance(rid, str) or not isinstance(keyids, list) or not isinstance(updated, str):
        return None
    return KnownStore(url, rid, tuple(k for k in keyids if isinstance(k, str)), updated)
