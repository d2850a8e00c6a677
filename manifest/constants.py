"""Names spelled once: the store's keys (docs/FORMAT.md §1) and the files a model directory holds.

Every store key is built from these constants or :attr:`manifest.metadata.ObjectRef.key`.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_CHANNEL",
    "MANIFEST_KEY",
    "OBJECTS_PREFIX",
    "RELEASES_PREFIX",
    "REPORTS_PREFIX",
    "ROOTS_PREFIX",
    "ROOT_KEY",
    "SINGLE_WEIGHTS_FILE",
    "WEIGHT_INDEX_FILE",
    "channel_prefix",
    "manifest_key",
    "object_key",
    "release_pointer_key",
    "release_record_key",
    "report_key",
    "root_version_key",
]

ROOT_KEY = "root.json"  # a copy of the newest trust root (what `init` pins on devices)
ROOTS_PREFIX = "roots/"  # roots/<N>.json: every trust root version, immutable
MANIFEST_KEY = "manifest.json"  # the signed manifest of the default channel: what is current
DEFAULT_CHANNEL = "stable"
REPORTS_PREFIX = "reports/"  # reports/<device-id>.json: what each device last did (unsigned)
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


def channel_prefix(channel: str) -> str:
    """Where a channel's manifest and release records live: the store's top for ``stable``,
    ``channels/<channel>/`` for any other (``channel`` must have passed ``check_channel``)."""
    return "" if channel == DEFAULT_CHANNEL else f"channels/{channel}/"


def manifest_key(channel: str = DEFAULT_CHANNEL) -> str:
    return f"{channel_prefix(channel)}{MANIFEST_KEY}"


def release_record_key(version: str, channel: str = DEFAULT_CHANNEL) -> str:
    """``releases/<version>.json`` of ``channel`` (``version`` must have passed
    ``check_version``)."""
    return f"{channel_prefix(channel)}{release_pointer_key(version)}"


def report_key(device_id: str) -> str:
    """A device's report (``device_id`` must have passed ``check_device_id``)."""
    return f"{REPORTS_PREFIX}{device_id}.json"
