"""Names spelled once: the store's keys (docs/FORMAT.md §1) and the files a model directory holds.

Every store key is built from these constants or :attr:`manifest.metadata.ObjectRef.key`.
"""

from __future__ import annotations

__all__ = [
    "MANIFEST_KEY",
    "OBJECTS_PREFIX",
    "RELEASES_PREFIX",
    "ROOTS_PREFIX",
    "ROOT_KEY",
    "SINGLE_WEIGHTS_FILE",
    "WEIGHT_INDEX_FILE",
    "object_key",
    "release_pointer_key",
    "root_version_key",
]

ROOT_KEY = "root.json"  # a copy of the newest trust root (what `init` pins on devices)
ROOTS_PREFIX = "roots/"  # roots/<N>.json: every trust root version, immutable
MANIFEST_KEY = "manifest.json"  # the signed manifest: what is current
RELEASES_PREFIX = "releases/"  # releases/<version>.json: the signed release records
OBJECTS_PREFIX = "objects/"  # objects/<sha256>: immutable, content-addressed objects
# The weight map of a sharded model: read by the publisher, written by devices, never shipped.
WEIGHT_INDEX_FILE = "model.safetensors.index.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"  # the one file of an unsharded checkpoint


def object_key(sha256: str) -> str:
    return f"{OBJECTS_PREFIX}{sha256}"


def release_pointer_key(version: str) -> str:
    """The key of a release pointer; ``version`` must have passed ``check_version``."""
    return f"{RELEASES_PREFIX}{version}.json"


def root_version_key(version: int) -> str:
    """The key of trust root ``version`` (1 for the one ``init`` writes)."""
    return f"{ROOTS_PREFIX}{int(version)}.json"
