"""Compatibility re-export; removed when the architecture branches merge.

The publisher's store is now :mod:`manifest.storage.store`.
"""

from manifest.storage.store import LocalStore, S3Store, Store, StoreOptions, open_store

__all__ = ["LocalStore", "S3Store", "Store", "StoreOptions", "open_store"]
