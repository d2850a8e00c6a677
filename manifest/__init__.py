"""What the publisher and the edge agent share: formats, codecs, signing and verification.

The names below are loaded from their modules on first use, so that importing one submodule
(say ``manifest.errors`` for a CLI's ``--help``) does not import the signing library too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import DeltashipError
    from .metadata import SPEC_VERSION, Manifest, ReleaseIndex, Root
    from .trust import StreamVerifier, verify_index, verify_manifest, verify_root

__all__ = [
    "SPEC_VERSION",
    "DeltashipError",
    "Manifest",
    "ReleaseIndex",
    "Root",
    "StreamVerifier",
    "verify_index",
    "verify_manifest",
    "verify_root",
]

_HOME = {
    "DeltashipError": "errors",
    **dict.fromkeys(["SPEC_VERSION", "Manifest", "ReleaseIndex", "Root"], "metadata"),
    **dict.fromkeys(["StreamVerifier", "verify_index", "verify_manifest", "verify_root"],
                    "trust"),
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
