"""The release workflow: a model directory in, a signed release in the store, a summary out.

Each step takes typed values and returns a new frozen one (the pure ones are in
:mod:`publisher.release_plan`)::

    read_store_state  -> StoreState        verified root, manifest (+ ETag), records, bases
    hash_model_groups -> HashedGroup...    the new model's groups as canonical files
    plan_encoding     -> EncodePlan        reuse what a base has, encode the rest
    encode            -> EncodeResult...   full objects and patches, staged on disk
    choose_objects    -> ChosenObjects     a patch only if smaller than the full object
    start_ship_files  -> ShippedFile...    the non-tensor files as zstd objects (overlapped
                                           with encode, on the same pool: ship_files.py)
    build_index       -> ReleaseIndex
    upload            -> UploadStats       the objects the store lacks (full objects start
                                           as soon as they are written: uploads.py)
    publish                                index; then the draft of the manifest and
                                           release record, signed and published (or saved
                                           with --draft for other key holders)
    summarise         -> ReleaseSummary

The order of writes makes every state a device can observe consistent: immutable objects
first, then the release index, then the manifest with a conditional write on the ETag read at
the start (a concurrent release makes exactly one of them fail), then the release record.
With ``--draft`` the objects and the index are uploaded (unreferenced until published) and
the manifest and record wait in the draft file (:mod:`publisher.drafts`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from manifest.canonical import canonical_json
from manifest.constants import DEFAULT_CHANNEL, release_record_key
from manifest.errors import (
    AlreadyExistsError,
    LocalError,
    MissingKeyError,
    ModelError,
)
from manifest.metadata import (
    ObjectRef,
    ReleaseIndex,
    ReleasePointer,
    ReleaseRecord,
    Rollout,
    check_version,
)
from manifest.safetensors_format import SafetensorsFile
from manifest.signing import SigningKey
from manifest.storage.store import StoreOptions, open_store

from .cache import DEFAULT_CACHE_MAX_BYTES, PublisherCache, default_cache_dir
from .drafts import DEFAULT_LIFETIMES, Lifetimes, Published, finish, manifest_draft
from .encode import EncodeResult, EncodeTask, encode_all, hash_groups, layout_group
from .grouping import GroupRule, assign_groups, parse_pattern
from .keys import check_signers, load_signing_keys
from .known_stores import KnownStores
from .model_dir import ModelDir, open_model
from .progress import Progress
from .release_plan import (
    EncodePlan,
    HashedGroup,
    StoreState,
    base_pointers,
    build_index,
    choose_objects,
    index_delta_bases,
    objects_to_upload,
    plan_encoding,
)
from .repository import Repository
from .ship_files import start_ship_files
from .summary import ReleaseSummary, Timings, UploadStats, summarise
from .uploads import Uploads

__all__ = ["ReleaseConfig", "default_cache_dir", "release"]


@dataclass(frozen=True)
class ReleaseConfig:
    model_dir: Path
    store_url: str
    version: str
    key_paths: tuple[Path, ...]
    deltas_from: int = 3
    dry_run: bool = False
    group_patterns: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()  # other files left out (model_dir.open_model)
    store_options: StoreOptions = field(default_factory=StoreOptions)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    level: int = 3
    lifetimes: Lifetimes = DEFAULT_LIFETIMES
    draft: Path | None = None  # save the manifest and record here for other key holders
    cache_dir: Path = field(default_factory=default_cache_dir)
    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES  # LRU-trimmed to this after each release
    progress: bool | None = None
    known_stores: Path | None = None  # the list of stores this machine signs (None: default)
    insecure_key_permissions: bool = False  # accept a private key group or others can read
    channel: str = DEFAULT_CHANNEL
    # Basis points of a staged rollout: the new version becomes the candidate and what is
    # current stays the fallback. None: the new version is current for the whole channel.
    rollout_basis_points: int | None = None
    checkpoint_every: int = 0  # also patch from every N-th release (release_plan.base_pointers)
    # Ship the index as deltas from what the channel runs and its N most recent releases'
    # indexes (release_plan.index_delta_bases; 0: none, only the zstd form).
    index_deltas: int = 1


def release(cfg: ReleaseConfig, now: datetime) -> ReleaseSummary:
    t0 = time.monotonic()
    version = check_version(cfg.version)
    keys = (load_signing_keys(cfg.key_paths, insecure_permissions=cfg.insecure_key_permissions)
            if cfg.key_paths or cfg.draft is None else [])
    rules = [parse_pattern(p) for p in cfg.group_patterns]
    repo = Repository(open_store(cfg.store_url, cfg.store_options), now, cfg.channel)
    if cfg.draft is None:  # all signatures now: refuse missing keys before encoding anything
        check_signers(repo.root(), keys, ("release", "timestamp"), cfg.key_paths)
    check_new_version(repo, version, cfg.rollout_basis_points)
    state = read_store_state(repo, version, cfg.deltas_from, cfg.checkpoint_every)
    cache = PublisherCache(cfg.cache_dir)
    staging = cache.begin()  # held with other releases until `end`; `cache clear` waits
    # Full objects upload as soon as they are written, overlapped with encoding (uploads.py).
    uploads = Uploads(repo.store, cfg.workers)
    # Set when the release fails (or Ctrl-C): the files still being shipped stop at their next
    # block, those not begun do not start, instead of the pool's shutdown waiting for them.
    stop = threading.Event()
    try:
        with open_model(cfg.model_dir, cfg.exclude) as model, \
                ThreadPoolExecutor(cfg.workers) as ex, _set_on_failure(stop):
            listing = model.listing()
            early = None if cfg.dry_run else uploads
            # The other files are compressed on the same pool, overlapped with the groups.
            shipping = start_ship_files(model, state.bases, staging, cfg.level, ex, stop)
            if state.bases:  # hash first: groups a base has are reused, not encoded
                read = _tensor_files_state(model)  # hashed and encoded in separate reads
                groups = hash_model_groups(model, rules, ex, cfg.progress)
                plan = plan_encoding(groups, state.bases, staging)
                with contextlib.ExitStack() as open_files:
                    base_files = open_base_files(plan, repo, cfg.cache_dir, open_files)
                    t_enc = time.monotonic()
                    results = encode(plan, base_files, ex, cfg.level, cfg.progress, early)
                    encode_seconds = time.monotonic() - t_enc
                _check_unchanged(model, read)
            else:  # nothing to reuse or patch from: every group is encoded, and hashed on the way
                t_enc = time.monotonic()
                groups, plan, results = hash_and_encode(model, rules, staging, ex, cfg.level,
                                                        cfg.progress, early)
                encode_seconds = time.monotonic() - t_enc
            chosen = choose_objects(plan, results)
            for path in chosen.rejected:  # free the disk before the next step writes to it
                os.unlink(path)
            files = tuple(f.result() for f in shipping)
        index = build_index(version, now, groups, chosen, files, state.bases,
                            state.root.repository_id)
        index_bytes = canonical_json(index.to_dict())
        uploaded = UploadStats()
        published: Published | None = None
        if not cfg.dry_run:
            uploaded = uploads.finish(objects_to_upload(chosen, files), cfg.progress)
            published = publish(repo, version, index_bytes, keys, now, cfg.lifetimes,
                                cfg.draft, cfg.rollout_basis_points, cfg.index_deltas,
                                state.records)
            KnownStores(cfg.known_stores).remember(repo.store.url, state.root, now)
    finally:
        uploads.close()  # before the staged files go
        shutil.rmtree(staging, ignore_errors=True)
        cache.end(cfg.cache_max_bytes)
    timings = Timings(time.monotonic() - t0, encode_seconds)
    summary = summarise(index, state, results, uploaded, timings, cfg.dry_run, listing,
                        published)
    return dataclasses.replace(summary, channel=cfg.channel,
                               rollout_basis_points=cfg.rollout_basis_points)


def _tensor_files_state(model: ModelDir) -> list[tuple[str, int, int, int]]:
    """Each tensor file's path, inode, size and modification time."""
    try:
        return [(s.path, (st := os.stat(s.path)).st_ino, st.st_size, st.st_mtime_ns)
                for s in model.shards]
    except OSError as e:
        raise ModelError(f"cannot read {e.filename}: {e.strerror or e}") from e


def _check_unchanged(model: ModelDir, before: list[tuple[str, int, int, int]]) -> None:
    """Refuse a release whose tensor files were written between hashing and encoding them:
    its index would name group hashes its objects do not rebuild."""
    after = _tensor_files_state(model)
    for (path, *was), (_, *now) in zip(before, after, strict=True):
        if was != now:
            raise ModelError(f"{path} changed while it was read: release again once the "
                             "model directory is no longer being written")


@contextlib.contextmanager
def _set_on_failure(stop: threading.Event) -> Iterator[None]:
    try:
        yield
    except BaseException:
        stop.set()
        raise


def check_new_version(repo: Repository, version: str, rollout_bp: int | None) -> None:
    """Before anything is read or encoded: a version name is released once per store (every
    channel), and a staged release needs a release to fall back to."""
    elsewhere = repo.versions_elsewhere(version)
    if elsewhere:
        raise AlreadyExistsError(
            f"version {version!r} is already released to channel {elsewhere[0]!r} of "
            f"{repo.store.url}: pick a new version, or move it with `deltaship-publish promote "
            f"--from {elsewhere[0]} --to {repo.channel} --version {version}`"
        )
    if rollout_bp is not None and repo.current_manifest().timestamp is None:
        raise LocalError(f"{repo.channel_text()} has no release yet, so a staged rollout has "
                         "nothing to fall back to: release the first version without --rollout")


def read_store_state(repo: Repository, version: str, deltas_from: int,
                     checkpoint_every: int = 0) -> StoreState:
    """The verified store; refuses a ``version`` it already holds before reading any base."""
    current = repo.current_manifest()
    manifest = current.timestamp.manifest if current.timestamp else None
    records = tuple(r.record for r in repo.releases())
    state = StoreState(repo.store.url, repo.root(), manifest, current.etag, records, bases=())
    if state.has_version(version):
        raise AlreadyExistsError(
            f"version {version!r} is already released to {state.url}: pick a new version"
        )
    bases: list[ReleaseIndex] = []
    for p in base_pointers(manifest, records, deltas_from, checkpoint_every):
        current_one = manifest is not None and p == manifest.current
        try:
            bases.append(repo.index(p, "the manifest" if current_one
                                    else release_record_key(p.version, repo.channel)))
        except MissingKeyError:
            if current_one:
                raise
            # gc removed an older release (docs/FORMAT.md §1): no patches from it; a device
            # still at that version downloads the full objects of what changed.
    return dataclasses.replace(state, bases=tuple(bases))


def hash_model_groups(
    model: ModelDir, rules: Sequence[GroupRule], ex: ThreadPoolExecutor,
    progress: bool | None,
) -> tuple[HashedGroup, ...]:
    groups = assign_groups(model.tensors, rules)
    layouts = [layout_group(g, [model.tensors[t] for t in ts]) for g, ts in groups.items()]
    bar = Progress("hashing", sum(g.length for g in layouts), enabled=progress)
    try:
        shas = hash_groups(layouts, ex, bar.advance)
    finally:
        bar.close()
    return tuple(HashedGroup(g, sha) for g, sha in zip(layouts, shas, strict=True))


def hash_and_encode(
    model: ModelDir, rules: Sequence[GroupRule], staging: Path, ex: ThreadPoolExecutor,
    level: int, progress: bool | None, uploads: Uploads | None = None,
) -> tuple[tuple[HashedGroup, ...], EncodePlan, tuple[EncodeResult, ...]]:
    """A release without bases: :func:`hash_model_groups`, :func:`plan_encoding` and
    :func:`encode` in one read of the model, every group file hashed from the chunks read to
    encode it. The plan is :func:`plan_encoding`'s (no base: a full object per distinct
    content), its jobs staged where they were encoded; a group whose content an earlier
    group has is encoded twice and its second object dropped (identical contents are rare).
    Full objects start uploading to ``uploads`` once written, as in :func:`encode`."""
    layouts = [layout_group(g, [model.tensors[t] for t in ts])
               for g, ts in assign_groups(model.tensors, rules).items()]
    paths = [str(staging / f"group-{i}") for i in range(len(layouts))]
    # Largest groups first: the serial end of a group (its hash, writing its container) then
    # overlaps the coding of smaller ones instead of trailing the release.
    tasks = [EncodeTask(layouts[i], None, None, None, paths[i])
             for i in sorted(range(len(layouts)), key=lambda i: -layouts[i].length)]
    bar = Progress("hashing and encoding", sum(t.layout.length for t in tasks),
                   enabled=progress)
    hashed: dict[str, HashedGroup] = {}  # by staged path
    kept: dict[str, EncodeResult] = {}
    try:
        for r in encode_all(tasks, ex, level=level, on_bytes=bar.advance):
            assert r.task.sha256 is not None
            hashed[r.task.out_path] = HashedGroup(r.task.layout, r.task.sha256)
            if r.task.sha256 in kept:
                os.unlink(r.task.out_path)
                continue
            kept[r.task.sha256] = r
            if uploads is not None:
                uploads.start(ObjectRef(r.sha256, r.length, "dspatch").key, r.task.out_path)
    finally:
        bar.close()
    groups = [hashed[path] for path in paths]
    plan = plan_encoding(groups, (), staging)
    jobs = tuple(dataclasses.replace(j, out_path=kept[j.sha256].task.out_path)
                 for j in plan.jobs)
    return tuple(groups), dataclasses.replace(plan, jobs=jobs), tuple(kept[j.sha256] for j in jobs)


def open_base_files(
    plan: EncodePlan, repo: Repository, cache_dir: Path, stack: contextlib.ExitStack
) -> dict[str, SafetensorsFile]:
    """Base group sha256 -> its file (fetched, verified and cached), open until ``stack`` ends."""
    out: dict[str, SafetensorsFile] = {}
    for job in plan.jobs:
        if job.base is not None and job.base.group.sha256 not in out:
            path = repo.group_file(job.base.group, cache_dir)
            out[job.base.group.sha256] = stack.enter_context(SafetensorsFile(path))
    return out


def encode(
    plan: EncodePlan, base_files: dict[str, SafetensorsFile], ex: ThreadPoolExecutor,
    level: int, progress: bool | None, uploads: Uploads | None = None,
) -> tuple[EncodeResult, ...]:
    """Every job of ``plan``, written to its ``out_path``; results in job order. Each full
    object starts uploading to ``uploads`` once written (every full object ships:
    :func:`~publisher.release_plan.choose_objects`)."""
    tasks = [
        EncodeTask(j.layout, j.sha256, None, None, j.out_path) if j.base is None else
        EncodeTask(j.layout, j.sha256, base_files[j.base.group.sha256], j.base.group.sha256,
                   j.out_path)
        for j in plan.jobs
    ]
    tasks.sort(key=lambda t: -t.layout.length)  # largest first, as in hash_and_encode
    bar = Progress("encoding", sum(t.layout.length for t in tasks), enabled=progress)
    results: dict[str, EncodeResult] = {}
    try:
        for r in encode_all(tasks, ex, level=level, on_bytes=bar.advance):
            if uploads is not None and r.task.base is None:
                uploads.start(ObjectRef(r.sha256, r.length, "dspatch").key, r.task.out_path)
            results[r.task.out_path] = r
    finally:
        bar.close()
    return tuple(results[j.out_path] for j in plan.jobs)


def publish(
    repo: Repository, version: str, index_bytes: bytes, keys: Sequence[SigningKey],
    now: datetime, lifetimes: Lifetimes, draft_path: Path | None,
    rollout_bp: int | None = None, index_deltas: int = 1,
    records: Sequence[ReleaseRecord] = (),
) -> Published:
    """Write the index object and its packed forms (zstd, and deltas from the indexes of
    ``index_deltas`` of the channel's ``records``, oldest first:
    :func:`~publisher.release_plan.index_delta_bases`),
    then draft the manifest and record naming them, and sign and publish them (or save the
    draft for other key holders; see the module doc). With ``rollout_bp`` the new version is
    the candidate of a staged rollout and what is current stays the fallback."""
    index_ref = ObjectRef(hashlib.sha256(index_bytes).hexdigest(), len(index_bytes), "json")
    repo.store.put(index_ref.key, index_bytes)
    current = repo.current_manifest()
    manifest = current.timestamp.manifest if current.timestamp else None
    bases = index_delta_bases(manifest, records, index_deltas)
    new = repo.packed(ReleasePointer(version, index_ref), bases, data=index_bytes)
    record = ReleaseRecord(version, current.next_sequence, now, new.index,
                           repository_id=repo.root().repository_id)
    rollout = None
    if rollout_bp is not None:
        assert current.timestamp is not None  # check_new_version
        new, rollout = current.timestamp.current, Rollout(new, rollout_bp)
    draft = manifest_draft("release", repo, now, current=new, action="release",
                           record=record, lifetimes=lifetimes, rollout=rollout)
    return finish(repo, draft, keys, draft_path)
