"""What a release reports: per base version, what a device at that version downloads.

Download bytes come from the one cost model (:func:`manifest.download_plan.download_cost`), so
the summary counts what a device would fetch, identical contents once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from manifest.download_plan import download_cost
from manifest.metadata import ReleaseIndex

from .drafts import Published
from .encode import EncodeResult
from .model_dir import ModelFiles
from .release_plan import StoreState

__all__ = ["BaseSummary", "ReleaseSummary", "Timings", "UploadStats", "summarise"]


@dataclass(frozen=True)
class UploadStats:
    """What an upload added to the store (objects it already held are not counted)."""

    objects: int = 0
    total_bytes: int = 0


@dataclass(frozen=True)
class Timings:
    seconds: float  # the whole release
    encode_seconds: float


@dataclass(frozen=True)
class BaseSummary:
    version: str
    download_bytes: int
    full_bytes: int


@dataclass(frozen=True)
class ReleaseSummary:
    """The release's report; ``to_dict`` is the ``--json`` output, in field order."""

    version: str
    store: str
    dry_run: bool
    sequence: int
    groups_total: int
    groups_changed: int
    files_total: int
    files_changed: int
    model_bytes: int
    full_download_bytes: int
    bases: tuple[BaseSummary, ...]
    uploaded_objects: int
    uploaded_bytes: int
    seconds: float
    encode_seconds: float
    codec_bytes: dict[str, int]
    tensor_files: tuple[str, ...] = ()  # the model's safetensors files that were read
    other_files: tuple[str, ...] = ()  # the model's other files, shipped as they are
    skipped_files: tuple[str, ...] = ()  # hidden files and directories, not shipped
    excluded_files: tuple[str, ...] = ()  # other files matching --exclude, not shipped
    draft: str | None = None  # the draft file written instead of publishing (--draft)
    draft_missing: tuple[str, ...] = ()  # signatures the draft still needs
    channel: str = "stable"
    rollout_basis_points: int | None = None  # a staged release: the candidate's share

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["bases"] = [b.__dict__ for b in self.bases]
        for k in ("tensor_files", "other_files", "skipped_files", "excluded_files",
                  "draft_missing"):
            d[k] = list(d[k])
        return d


def summarise(
    index: ReleaseIndex,
    state: StoreState,
    results: Sequence[EncodeResult],
    uploaded: UploadStats,
    timings: Timings,
    dry_run: bool,
    model_files: ModelFiles | None = None,
    published: Published | None = None,
) -> ReleaseSummary:
    """Changes are counted against the latest base; downloads against every base."""
    codec_bytes: dict[str, int] = {}
    for r in results:
        for k, v in r.codec_bytes.items():
            codec_bytes[k] = codec_bytes.get(k, 0) + v
    latest = state.bases[0] if state.bases else None
    groups_known = {g.sha256 for g in latest.groups} if latest else set()
    files_known = {f.sha256 for f in latest.files} if latest else set()
    full = download_cost(index, None)
    return ReleaseSummary(
        version=index.version,
        store=state.url,
        dry_run=dry_run,
        sequence=state.next_sequence,
        groups_total=len(index.groups),
        groups_changed=sum(1 for g in index.groups if g.sha256 not in groups_known),
        files_total=len(index.files),
        files_changed=sum(1 for f in index.files if f.sha256 not in files_known),
        model_bytes=index.total_size + sum(f.length for f in index.files),
        full_download_bytes=full,
        bases=tuple(BaseSummary(b.version, download_cost(index, b), full) for b in state.bases),
        uploaded_objects=uploaded.objects,
        uploaded_bytes=uploaded.total_bytes,
        seconds=round(timings.seconds, 3),
        encode_seconds=round(timings.encode_seconds, 3),
        codec_bytes=codec_bytes,
        tensor_files=model_files.tensor_files if model_files else (),
        other_files=model_files.other_files if model_files else (),
        skipped_files=model_files.skipped_files if model_files else (),
        excluded_files=model_files.excluded_files if model_files else (),
        draft=str(published.draft_path) if published and published.draft_path else None,
        draft_missing=published.missing if published else (),
    )
