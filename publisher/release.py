"""The publisher's workflows: init, release, revert, history.

The order of writes makes every state a device can observe consistent: immutable objects
first, then the release index, then the manifest with a conditional write on the ETag read at
the start (a concurrent release makes exactly one of them fail), then the release pointer.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import zstandard

from manifest.download_plan import download_cost
from manifest.errors import AlreadyExistsError, ConflictError, KeyFileError, TrustError
from manifest.metadata import (
    FileEntry,
    GroupEntry,
    Manifest,
    ObjectRef,
    PatchRef,
    ReleaseIndex,
    ReleasePointer,
    Role,
    Root,
    TensorEntry,
    check_version,
)
from manifest.safetensors_format import SafetensorsFile
from manifest.signing import SigningKey
from manifest.stores import StoreOptions, open_store
from manifest.trust import sign_document

from .encode import EncodeResult, EncodeTask, GroupLayout, encode_all, hash_groups, layout_group
from .grouping import assign_groups, parse_pattern
from .keys import load_signing_key
from .model_dir import ModelDir, open_model
from .progress import Progress
from .repository import MANIFEST_KEY, ROOT_KEY, ReleaseRecord, Repository

__all__ = [
    "BaseSummary",
    "ReleaseConfig",
    "ReleaseSummary",
    "history",
    "init_store",
    "release",
    "revert",
]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deltaship" / "publisher"


@dataclass(frozen=True)
class ReleaseConfig:
    model_dir: Path
    store_url: str
    version: str
    key_paths: tuple[Path, ...]
    deltas_from: int = 3
    dry_run: bool = False
    group_patterns: tuple[str, ...] = ()
    store_options: StoreOptions = field(default_factory=StoreOptions)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    level: int = 3
    manifest_expires: timedelta = timedelta(days=30)
    cache_dir: Path = field(default_factory=default_cache_dir)
    progress: bool | None = None


@dataclass(frozen=True)
class BaseSummary:
    version: str
    download_bytes: int
    full_bytes: int


@dataclass
class ReleaseSummary:
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
    bases: list[BaseSummary]
    uploaded_objects: int
    uploaded_bytes: int
    seconds: float
    encode_seconds: float
    codec_bytes: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["bases"] = [b.__dict__ for b in self.bases]
        return d


def signers_for(root: Root, keys: list[SigningKey], role_name: str, paths: Iterable[Path]) -> None:
    """Check that ``keys`` can sign for ``role_name``: all listed, threshold met."""
    role: Role = root.roles[role_name]
    for key, path in zip(keys, paths, strict=True):
        if key.keyid not in role.keyids:
            raise TrustError(
                f"key {path} (id {key.keyid[:16]}) is not one of the trust root's {role_name!r} "
                "keys: use a key the store was initialised with"
            )
    if len({k.keyid for k in keys}) < role.threshold:
        raise TrustError(
            f"the trust root needs {role.threshold} {role_name!r} signatures; "
            f"{len(keys)} key(s) given: pass more --key options"
        )


def _load_keys(paths: tuple[Path, ...]) -> list[SigningKey]:
    if not paths:
        raise KeyFileError("no signing key given: pass --key FILE (made by `keygen`)")
    return [load_signing_key(p) for p in paths]


def init_store(
    store_url: str,
    key_paths: tuple[Path, ...],
    threshold: int,
    now: datetime,
    *,
    expires: timedelta = timedelta(days=365),
    options: StoreOptions | None = None,
) -> tuple[str, bytes, Root]:
    """Write a version-1 trust root signed by ``key_paths``; returns its URL, bytes, content."""
    keys = _load_keys(key_paths)
    ids = list(dict.fromkeys(k.keyid for k in keys))
    if not 1 <= threshold <= len(ids):
        raise TrustError(f"--threshold {threshold} must be between 1 and the {len(ids)} key(s)")
    role = Role(tuple(ids), threshold)
    root = Root(
        1, now + expires, {k.keyid: k.public_key for k in keys}, {"root": role, "release": role}
    )
    data = sign_document(root.to_dict(), keys)
    store = open_store(store_url, options)
    try:
        store.put_if(ROOT_KEY, data, None)
    except ConflictError as e:
        raise AlreadyExistsError(
            f"{store.url}/{ROOT_KEY} already exists: this store is initialised"
        ) from e
    return f"{store.url}/{ROOT_KEY}", data, root


@dataclass
class _Plan:
    """What a release must encode and which objects it can reuse."""

    layouts: list[GroupLayout]
    shas: list[str]
    full: dict[str, ObjectRef] = field(default_factory=dict)  # group sha -> reused full
    patches: dict[str, list[PatchRef]] = field(default_factory=dict)  # group sha -> patches
    tasks: list[EncodeTask] = field(default_factory=list)
    base_version: dict[str, str] = field(default_factory=dict)  # patch task out_path -> version
    base_files: list[SafetensorsFile] = field(default_factory=list)


def release(cfg: ReleaseConfig, now: datetime) -> ReleaseSummary:
    t0 = time.monotonic()
    version = check_version(cfg.version)
    keys = _load_keys(cfg.key_paths)
    patterns = [parse_pattern(p) for p in cfg.group_patterns]
    store = open_store(cfg.store_url, cfg.store_options)
    repo = Repository(store, now)
    root = repo.root()
    signers_for(root, keys, "release", cfg.key_paths)
    manifest, etag = repo.manifest()
    records = repo.releases()
    if any(r.version == version for r in records) or (
        manifest is not None and manifest.current.version == version
    ):
        raise AlreadyExistsError(
            f"version {version!r} is already released to {store.url}: pick a new version"
        )
    bases = _base_indexes(repo, manifest, records, cfg.deltas_from)
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="release-", dir=cfg.cache_dir))
    try:
        with open_model(cfg.model_dir) as model, ThreadPoolExecutor(cfg.workers) as ex:
            groups = assign_groups(model.tensors, patterns)
            layouts = [layout_group(g, [model.tensors[t] for t in ts]) for g, ts in groups.items()]
            bar = Progress("hashing", sum(g.length for g in layouts), enabled=cfg.progress)
            try:
                plan = _Plan(layouts, hash_groups(layouts, ex, bar.advance))
            finally:
                bar.close()
            _plan_groups(plan, repo, bases, cfg.cache_dir, staging)
            t_enc = time.monotonic()
            results = _encode(plan, ex, cfg)
            encode_seconds = time.monotonic() - t_enc
            for f in plan.base_files:
                f.close()
            files = _ship_files(model, bases, staging, cfg.level)
        index = _build_index(version, now, plan, results, files, bases)
        index_bytes = sign_document(index.to_dict(), keys)
        index_ref = ObjectRef(hashlib.sha256(index_bytes).hexdigest(), len(index_bytes), "json")
        sequence = (manifest.sequence if manifest else 0) + 1
        uploads = _new_objects(index, results, files, staging)
        up_objects = up_bytes = 0
        if not cfg.dry_run:
            up_objects, up_bytes = _upload(store, uploads, cfg.workers, cfg.progress)
            store.put(index_ref.key, index_bytes)
            pointer = ReleasePointer(version, index_ref)
            new_manifest = Manifest(
                sequence, now + cfg.manifest_expires, now, pointer, "release"
            )
            _put_manifest(store, sign_document(new_manifest.to_dict(), keys), etag)
            record = ReleaseRecord(version, sequence, now, pointer)
            store.put(f"releases/{version}.json", record.to_bytes())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _summarise(cfg, store.url, index, bases, sequence, plan, results, files,
                      up_objects, up_bytes, time.monotonic() - t0, encode_seconds)


def _put_manifest(store: Any, data: bytes, etag: str | None) -> None:
    try:
        store.put_if(MANIFEST_KEY, data, etag)
    except ConflictError as e:
        raise ConflictError(
            "another release or revert was published while this one ran, so this one was not "
            "made current: re-run the command to build on the new state"
        ) from e


def _base_indexes(
    repo: Repository, manifest: Manifest | None, records: list[ReleaseRecord], k: int
) -> list[ReleaseIndex]:
    """The current release, then the most recent others, up to ``k`` versions."""
    pointers: list[ReleasePointer] = []
    if manifest is not None:
        pointers.append(manifest.current)
    for r in reversed(records):
        if r.version not in {p.version for p in pointers}:
            pointers.append(r.pointer)
    return [repo.index(p) for p in pointers[: max(k, 0)]]


def _plan_groups(
    plan: _Plan, repo: Repository, bases: list[ReleaseIndex], cache_dir: Path, staging: Path
) -> None:
    known: dict[str, GroupEntry] = {}
    for idx in reversed(bases):  # newer entries win
        for g in idx.groups:
            known[g.sha256] = g
    for layout, sha in zip(plan.layouts, plan.shas, strict=True):
        if sha in known:  # unchanged since a base: reuse its full object and its patches
            plan.full[sha] = known[sha].full
            plan.patches[sha] = list(known[sha].patches)
            continue
        if sha in {t.sha256 for t in plan.tasks if t.base is None}:
            continue  # two groups with identical content
        plan.tasks.append(EncodeTask(layout, sha, None, None, str(staging / f"full-{sha}")))
        seen: set[str] = set()
        for idx in bases:
            bg = idx.group(layout.name)
            if bg is None or bg.sha256 in seen:
                continue
            seen.add(bg.sha256)
            base = SafetensorsFile(repo.group_file(bg, cache_dir))
            plan.base_files.append(base)
            out = str(staging / f"patch-{bg.sha256}-{sha}")
            plan.tasks.append(EncodeTask(layout, sha, base, bg.sha256, out))
            plan.base_version[out] = idx.version


def _encode(plan: _Plan, ex: ThreadPoolExecutor, cfg: ReleaseConfig) -> list[EncodeResult]:
    total = sum(t.layout.length for t in plan.tasks)
    bar = Progress("encoding", total, enabled=cfg.progress)
    try:
        results = list(
            encode_all(plan.tasks, ex, level=cfg.level, on_bytes=bar.advance)
        )
    finally:
        bar.close()
    for r in results:
        ref = ObjectRef(r.sha256, r.length, "dspatch")
        if r.task.base is None:
            plan.full[r.task.sha256] = ref
    for r in results:
        sha, base_sha = r.task.sha256, r.task.base_sha256
        if base_sha is None:
            continue
        if r.length < plan.full[sha].length:  # else a device is better off with the full object
            ref = ObjectRef(r.sha256, r.length, "dspatch")
            version = plan.base_version[r.task.out_path]
            plan.patches.setdefault(sha, []).append(PatchRef(version, base_sha, ref))
        else:
            os.unlink(r.task.out_path)
    return results


def _ship_files(
    model: ModelDir, bases: list[ReleaseIndex], staging: Path, level: int
) -> list[tuple[FileEntry, str | None]]:
    """Each non-tensor file as a zstd object; unchanged files reuse their object."""
    known = {f.sha256: f.object for idx in bases for f in idx.files}
    out: list[tuple[FileEntry, str | None]] = []
    for rel in model.other_files:
        data = (model.path / rel).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if sha in known:
            out.append((FileEntry(rel, sha, len(data), known[sha]), None))
            continue
        blob = zstandard.ZstdCompressor(level=max(level, 19)).compress(data)
        ref = ObjectRef(hashlib.sha256(blob).hexdigest(), len(blob), "zstd")
        path = staging / f"file-{ref.sha256}"
        path.write_bytes(blob)
        known[sha] = ref
        out.append((FileEntry(rel, sha, len(data), ref), str(path)))
    return out


def _build_index(
    version: str, now: datetime, plan: _Plan, results: list[EncodeResult],
    files: list[tuple[FileEntry, str | None]], bases: list[ReleaseIndex],
) -> ReleaseIndex:
    groups = []
    for layout, sha in zip(plan.layouts, plan.shas, strict=True):
        tensors = tuple(TensorEntry(i.name, i.dtype, i.shape) for i, _ in layout.tensors)
        patches = tuple(plan.patches.get(sha, []))
        groups.append(GroupEntry(layout.name, layout.file, sha, layout.length, tensors,
                                 plan.full[sha], patches))
    return ReleaseIndex(
        version, now, tuple(groups), tuple(f for f, _ in files),
        tuple(idx.version for idx in bases),
    )


def _new_objects(
    index: ReleaseIndex, results: list[EncodeResult], files: list[tuple[FileEntry, str | None]],
    staging: Path,
) -> dict[str, str]:
    """Object key -> local path of everything this release produced and references."""
    referenced = {g.full.key for g in index.groups}
    referenced |= {p.object.key for g in index.groups for p in g.patches}
    out = {}
    for r in results:
        key = f"objects/{r.sha256}"
        if key in referenced and os.path.exists(r.task.out_path):
            out[key] = r.task.out_path
    for f, path in files:
        if path is not None:
            out[f.object.key] = path
    return out


def _upload(
    store: Any, uploads: dict[str, str], workers: int, progress: bool | None
) -> tuple[int, int]:
    """Upload what the store lacks (objects are immutable: an existing key is skipped)."""
    bar = Progress("uploading", sum(os.path.getsize(p) for p in uploads.values()),
                   enabled=progress)

    def one(item: tuple[str, str]) -> int:
        key, path = item
        size = os.path.getsize(path)
        if store.exists(key):
            bar.advance(size)
            return 0
        store.put_file(key, path)
        bar.advance(size)
        return size

    try:
        with ThreadPoolExecutor(max(4, workers)) as ex:
            sizes = list(ex.map(one, uploads.items()))
    finally:
        bar.close()
    return sum(1 for s in sizes if s), sum(sizes)


def _summarise(
    cfg: ReleaseConfig, url: str, index: ReleaseIndex, bases: list[ReleaseIndex], sequence: int,
    plan: _Plan, results: list[EncodeResult], files: list[tuple[FileEntry, str | None]],
    up_objects: int, up_bytes: int, seconds: float, encode_seconds: float,
) -> ReleaseSummary:
    codec_bytes: dict[str, int] = {}
    for r in results:
        for k, v in r.codec_bytes.items():
            codec_bytes[k] = codec_bytes.get(k, 0) + v
    latest = bases[0] if bases else None
    changed = {g.sha256 for g in latest.groups} if latest else set()
    files_known = {f.sha256 for f in latest.files} if latest else set()
    full = download_cost(index, None)
    return ReleaseSummary(
        version=index.version,
        store=url,
        dry_run=cfg.dry_run,
        sequence=sequence,
        groups_total=len(index.groups),
        groups_changed=sum(1 for g in index.groups if g.sha256 not in changed),
        files_total=len(index.files),
        files_changed=sum(1 for f in index.files if f.sha256 not in files_known),
        model_bytes=index.total_size + sum(f.length for f in index.files),
        full_download_bytes=full,
        bases=[BaseSummary(b.version, download_cost(index, b), full) for b in bases],
        uploaded_objects=up_objects,
        uploaded_bytes=up_bytes,
        seconds=round(seconds, 3),
        encode_seconds=round(encode_seconds, 3),
        codec_bytes=codec_bytes,
    )


def revert(
    store_url: str, to_version: str, key_paths: tuple[Path, ...], now: datetime, *,
    expires: timedelta = timedelta(days=30), options: StoreOptions | None = None,
) -> Manifest:
    """Make an older release current again under a higher sequence number."""
    keys = _load_keys(key_paths)
    repo = Repository(open_store(store_url, options), now)
    signers_for(repo.root(), keys, "release", key_paths)
    record = repo.release(to_version)
    repo.index(record.pointer)  # refuse to point devices at an index that does not verify
    manifest, etag = repo.manifest()
    if manifest is not None and manifest.current.version == to_version:
        raise AlreadyExistsError(f"{to_version!r} is already the current release")
    seq = (manifest.sequence if manifest else 0) + 1
    new = Manifest(seq, now + expires, now, record.pointer, "revert")
    _put_manifest(repo.store, sign_document(new.to_dict(), keys), etag)
    return new


@dataclass(frozen=True)
class HistoryEntry:
    version: str
    sequence: int
    released_at: datetime
    current: bool


def history(
    store_url: str, now: datetime, options: StoreOptions | None = None
) -> tuple[list[HistoryEntry], Manifest | None]:
    repo = Repository(open_store(store_url, options), now)
    manifest, _ = repo.manifest()
    current = manifest.current.version if manifest else None
    entries = [
        HistoryEntry(r.version, r.sequence, r.released_at, r.version == current)
        for r in repo.releases()
    ]
    return entries, manifest
