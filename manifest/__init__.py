"""What the publisher and the edge agent share: formats, codecs, signing and verification."""

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
