"""The packed forms of a release index (docs/FORMAT.md §5.3): one codec for both sides.

A pointer to a release index may offer, besides the raw object, the index as one zstd frame
(``zstd``) and as zstd frames coded against older indexes used as raw-content dictionaries
(``deltas``). The publisher encodes them (:func:`pack_index`); a device decodes the one it
downloaded (:func:`unpack_index`): pure functions, bytes in and bytes out, no I/O.

Decoding checks, in order, before anything is parsed: that the pinned index length is at most
``MAX_INDEX_SIZE``; the packed bytes' length and SHA-256
against the form's pin; for a delta, that the base is the index the delta names; that the
frame declares a content size equal to the pinned index length; then it decompresses one frame
(output bounded by that size, nothing after it) and checks the result's length and SHA-256
against the index pin. The caller then verifies the index as always
(:func:`manifest.trust.verify_index`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .entries import (
    MAX_INDEX_DELTAS,
    MAX_INDEX_SIZE,
    IndexDelta,
    IndexPacking,
    ObjectRef,
    PackedIndex,
)
from .errors import FormatError, HashMismatchError, LocalError, OversizeError

if TYPE_CHECKING:  # zstandard is imported where a form is coded: an up-to-date poll needs none
    import zstandard

__all__ = ["ZSTD_LEVEL", "PackedForms", "form_name", "pack_delta", "pack_index", "pack_zstd",
           "unpack_index"]

ZSTD_LEVEL = 19


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dictionary(base: bytes) -> zstandard.ZstdCompressionDict:
    import zstandard

    return zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def pack_zstd(index: bytes) -> bytes:
    """The index as one zstd frame (level 19, content size in the frame header)."""
    import zstandard

    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(index)


def pack_delta(index: bytes, base: bytes) -> bytes:
    """The index as one zstd frame coded with ``base`` (another index's exact bytes) as a
    raw-content dictionary (level 19, content size in the frame header)."""
    import zstandard

    c = zstandard.ZstdCompressor(level=ZSTD_LEVEL, dict_data=_dictionary(base),
                                 write_content_size=True, write_dict_id=False)
    return c.compress(index)


@dataclass(frozen=True)
class PackedForms:
    """What :func:`pack_index` decided: the packing to sign into the pointer and the bytes
    of each packed object it names that it encoded (sha256 -> bytes, for ``objects/<sha256>``;
    forms kept from ``keep`` are not repeated)."""

    packing: IndexPacking
    objects: dict[str, bytes]


def pack_index(index: bytes, bases: Iterable[bytes], keep: IndexPacking | None = None,
               max_deltas: int = MAX_INDEX_DELTAS) -> PackedForms:
    """The packed forms of ``index``: the zstd form (``keep``'s, else encoded) and deltas from
    ``bases`` (other indexes' exact bytes, most wanted first) then ``keep``'s, at most
    ``max_deltas``. A delta from the index itself, or not smaller than the zstd form, is left
    out (a device would never choose it)."""
    if len(index) > MAX_INDEX_SIZE:
        raise OversizeError(f"the release index is {len(index)} bytes, over its cap "
                            f"{MAX_INDEX_SIZE}")
    keep = keep or IndexPacking()
    objects: dict[str, bytes] = {}
    zstd = keep.zstd
    if zstd is None:
        blob = pack_zstd(index)
        zstd = PackedIndex(_sha(blob), len(blob))
        objects[zstd.sha256] = blob
    own = _sha(index)
    chosen: dict[str, IndexDelta] = {}
    limit = max(0, min(max_deltas, MAX_INDEX_DELTAS))
    for base in bases:
        base_sha = _sha(base)
        if len(chosen) >= limit or base_sha == own or base_sha in chosen:
            continue
        old = keep.delta_from(base_sha)
        if old is not None:
            chosen[base_sha] = old
            continue
        blob = pack_delta(index, base)
        if len(blob) < zstd.length:
            chosen[base_sha] = IndexDelta(base_sha, _sha(blob), len(blob))
            objects[chosen[base_sha].sha256] = blob
    for d in keep.deltas:
        if len(chosen) < limit and d.base not in chosen and d.base != own:
            chosen[d.base] = d
    deltas = tuple(chosen[b] for b in sorted(chosen))
    named = {zstd.sha256, *(d.sha256 for d in deltas)}
    return PackedForms(IndexPacking(zstd, deltas),
                       {k: v for k, v in objects.items() if k in named})


def form_name(form: PackedIndex | IndexDelta) -> str:
    """How messages name a packed form."""
    if isinstance(form, IndexDelta):
        return f"the release index delta from {form.base[:16]}... ({form.key})"
    return f"the zstd release index ({form.key})"


def unpack_index(packed: bytes, form: PackedIndex | IndexDelta, pin: ObjectRef,
                 base: bytes | None = None, *, named_by: str = "the manifest") -> bytes:
    """The index bytes ``packed`` (the object ``form`` names) decodes to, checked against
    ``form`` and the index ``pin`` (``named_by`` names who pins it, for messages). A delta
    needs ``base``: the exact bytes of the index its ``from`` names.

    Raises :class:`HashMismatchError` / :class:`FormatError` (the store's fault) when the
    packed bytes or their result differ from the pins, :class:`LocalError` when ``base`` is
    not the delta's base (the caller's fault)."""
    import zstandard

    what = form_name(form)
    if pin.length > MAX_INDEX_SIZE:  # the frame's declared size bounds the output: cap it first
        raise OversizeError(f"{named_by} pins a release index of {pin.length} bytes, over its "
                            f"cap {MAX_INDEX_SIZE}: {what} is not decoded")
    if len(packed) != form.length:
        raise HashMismatchError(f"{what} is {len(packed)} bytes, {named_by} pins {form.length}")
    digest = _sha(packed)
    if digest != form.sha256:
        raise HashMismatchError(f"{what} sha256 {digest[:16]}... differs from {named_by}'s "
                                f"{form.sha256[:16]}...: it was corrupted or tampered with")
    dictionary = None
    if isinstance(form, IndexDelta):
        if base is None or _sha(base) != form.base:
            raise LocalError(f"{what} needs the index {form.base[:16]}... as its base, and "
                             "was given other bytes")
        dictionary = _dictionary(base)
    try:
        declared = zstandard.frame_content_size(packed)
    except zstandard.ZstdError as e:
        raise FormatError(f"{what} is not a zstd frame ({e})") from e
    if declared != pin.length:
        raise HashMismatchError(
            f"{what} declares {'no content size' if declared < 0 else f'{declared} bytes'}, "
            f"{named_by} pins an index of {pin.length}")
    # The frame's declared size bounds the output: zstd refuses to write past it.
    d = zstandard.ZstdDecompressor(dict_data=dictionary).decompressobj()
    try:
        out = d.decompress(packed)
    except zstandard.ZstdError as e:
        raise FormatError(f"{what} does not decode ({e})") from e
    if not d.eof or d.unused_data or len(out) != pin.length:
        raise FormatError(f"{what} is not exactly one whole zstd frame of {pin.length} bytes")
    result = _sha(out)
    if result != pin.sha256:
        raise HashMismatchError(f"{what} decodes to an index with sha256 {result[:16]}..., "
                                f"not {named_by}'s {pin.sha256[:16]}...: it was corrupted or "
                                "tampered with")
    return out
