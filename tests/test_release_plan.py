"""The pure steps of a release: the bases, what to reuse, what to encode, what to keep."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

import pytest

from manifest.metadata import (
    GroupEntry,
    Manifest,
    ObjectRef,
    PatchRef,
    ReleaseIndex,
    ReleasePointer,
    ReleaseRecord,
)
from publisher.encode import EncodeResult, EncodeTask, GroupLayout
from publisher.release_plan import (
    ChosenObjects,
    EncodeJob,
    EncodePlan,
    HashedGroup,
    PatchBase,
    ShippedFile,
    StoreState,
    base_pointers,
    build_index,
    choose_objects,
    objects_to_upload,
    plan_encoding,
)

from ._signed_docs import NOW, REPO_ID, file_entry, group, hexof, key, root_doc

STAGING = Path("/staging")


def _pointer(version: str, c: str = "e") -> ReleasePointer:
    return ReleasePointer(version, ObjectRef(hexof(c), 100, "json"))


def _record(version: str, sequence: int) -> ReleaseRecord:
    return ReleaseRecord(version, sequence, NOW, _pointer(version).index, repository_id=REPO_ID)


def _manifest(version: str, sequence: int) -> Manifest:
    return Manifest(sequence, NOW + timedelta(days=30), NOW, _pointer(version),
                    repository_id=REPO_ID)


def _index(version: str, *groups: GroupEntry) -> ReleaseIndex:
    return ReleaseIndex(version, NOW, groups, (), repository_id=REPO_ID)


def _hashed(name: str, c: str) -> HashedGroup:
    return HashedGroup(GroupLayout(name, b"", ()), hexof(c))


# --- which releases patches start from ---------------------------------------------------


@pytest.mark.parametrize(
    ("current", "history", "k", "expected"),
    [
        pytest.param(None, [], 3, [], id="first-release"),
        pytest.param("v3", ["v1", "v2", "v3"], 3, ["v3", "v2", "v1"], id="newest-first"),
        pytest.param("v3", ["v1", "v2", "v3"], 2, ["v3", "v2"], id="capped"),
        pytest.param("v3", ["v1", "v2", "v3"], 0, [], id="no-deltas"),
        pytest.param("v1", ["v1", "v2", "v3"], 2, ["v1", "v3"], id="after-revert-current-first"),
    ],
)
def test_base_pointers(
    current: str | None, history: list[str], k: int, expected: list[str]
) -> None:
    manifest = _manifest(current, len(history) + 1) if current else None
    records = [_record(v, i + 1) for i, v in enumerate(history)]
    assert [p.version for p in base_pointers(manifest, records, k)] == expected


def test_store_state() -> None:
    empty = StoreState("s3://b/p", root_doc([key(1)]), None, None, (), ())
    assert empty.next_sequence == 1 and not empty.has_version("v1")
    state = dataclasses.replace(
        empty, manifest=_manifest("v2", 5), records=(_record("v1", 1), _record("v2", 2))
    )
    assert state.next_sequence == 6
    assert state.has_version("v1") and state.has_version("v2") and not state.has_version("v3")


# --- what to reuse and what to encode ------------------------------------------------------


def test_unchanged_group_reuses_its_objects_and_patches() -> None:
    old = dataclasses.replace(group("layers.0"), sha256=hexof("1"))
    plan = plan_encoding([_hashed("layers.0", "1")], [_index("v1", old)], STAGING)
    assert plan.jobs == ()
    assert plan.reused_full == {hexof("1"): old.full}
    assert plan.reused_patches == {hexof("1"): old.patches}


def test_changed_group_gets_a_full_object_and_one_patch_per_distinct_base() -> None:
    v2 = _index("v2", dataclasses.replace(group("layers.0"), sha256=hexof("2")))
    v1 = _index("v1", dataclasses.replace(group("layers.0"), sha256=hexof("1")))
    v0 = _index("v0", dataclasses.replace(group("layers.0"), sha256=hexof("1")))  # = v1's
    plan = plan_encoding([_hashed("layers.0", "9"), _hashed("new", "8")], [v2, v1, v0], STAGING)
    summary = [(j.layout.name, j.base.version if j.base else None, j.out_path)
               for j in plan.jobs]
    assert summary == [
        ("layers.0", None, f"/staging/full-{hexof('9')}"),
        ("layers.0", "v2", f"/staging/patch-{hexof('2')}-{hexof('9')}"),
        ("layers.0", "v1", f"/staging/patch-{hexof('1')}-{hexof('9')}"),
        ("new", None, f"/staging/full-{hexof('8')}"),  # no base has it: no patch
    ]
    assert plan.reused_full == {} and plan.reused_patches == {}


def test_identical_new_contents_are_encoded_once() -> None:
    plan = plan_encoding([_hashed("experts.0", "7"), _hashed("experts.1", "7")], [], STAGING)
    assert [j.layout.name for j in plan.jobs] == ["experts.0"]


# --- which patches to keep -------------------------------------------------------------------


def _job(base: PatchBase | None, name: str) -> EncodeJob:
    return EncodeJob(GroupLayout("layers.0", b"", ()), hexof("9"), base, f"/staging/{name}")


def _result(job: EncodeJob, length: int, c: str) -> EncodeResult:
    """What the encoder returns for ``job``: its task carries the same out_path."""
    return EncodeResult(EncodeTask(job.layout, job.sha256, None, None, job.out_path), length,
                        hexof(c), {})


def _plan_and_results(
    patch_lengths: list[int], full_length: int = 100
) -> tuple[EncodePlan, list[EncodeResult]]:
    """A changed group: its full object, and one patch per length, from bases v0, v1, ..."""
    jobs = [_job(None, "full")]
    results = [_result(jobs[0], full_length, "f")]
    for i, n in enumerate(patch_lengths):
        base = PatchBase(f"v{i}", dataclasses.replace(group("layers.0"), sha256=hexof(str(i))))
        jobs.append(_job(base, f"patch-{i}"))
        results.append(_result(jobs[-1], n, "abcdef"[i]))
    return EncodePlan({}, {}, tuple(jobs)), results


def test_a_patch_is_kept_only_if_smaller_than_the_full_object() -> None:
    plan, results = _plan_and_results([40, 100, 150])
    chosen = choose_objects(plan, list(reversed(results)))  # any order of results
    full = ObjectRef(hexof("f"), 100, "dspatch")
    assert chosen.full == {hexof("9"): full}
    assert chosen.patches == {hexof("9"): (
        PatchRef("v0", hexof("0"), ObjectRef(hexof("a"), 40, "dspatch")),
    )}
    assert chosen.new == {full.key: "/staging/full", f"objects/{hexof('a')}": "/staging/patch-0"}
    assert sorted(chosen.rejected) == ["/staging/patch-1", "/staging/patch-2"]


def test_kept_patches_follow_the_reused_ones() -> None:
    reused = PatchRef("v0", hexof("0"), ObjectRef(hexof("c"), 10, "dspatch"))
    plan = EncodePlan({hexof("1"): ObjectRef(hexof("d"), 50, "dspatch")},
                      {hexof("1"): (reused,)}, ())
    chosen = choose_objects(plan, [])
    assert chosen.patches == {hexof("1"): (reused,)} and chosen.new == {}


# --- the index and the uploads ---------------------------------------------------------------


def test_index_and_uploads() -> None:
    groups = [_hashed("layers.0", "1"), _hashed("layers.1", "2")]
    full1, full2 = ObjectRef(hexof("a"), 5, "dspatch"), ObjectRef(hexof("b"), 6, "dspatch")
    patch = PatchRef("v1", hexof("3"), ObjectRef(hexof("c"), 2, "dspatch"))
    chosen = ChosenObjects({hexof("1"): full1, hexof("2"): full2}, {hexof("2"): (patch,)},
                           {full2.key: "/staging/full-2"}, ())
    files = [ShippedFile(file_entry("config.json"), "/staging/file-x"),
             ShippedFile(file_entry("LICENSE", 2), None)]
    index = build_index("v2", NOW, groups, chosen, files, [_index("v1")], REPO_ID)
    assert [(g.name, g.full, g.patches) for g in index.groups] == [
        ("layers.0", full1, ()), ("layers.1", full2, (patch,))]
    assert [f.path for f in index.files] == ["config.json", "LICENSE"]
    assert index.deltas_from == ("v1",)
    assert ReleaseIndex.from_dict(index.to_dict()) == index
    assert objects_to_upload(chosen, files) == {
        full2.key: "/staging/full-2", files[0].entry.object.key: "/staging/file-x"}


@pytest.mark.parametrize(
    ("every", "count", "expected"),
    [
        pytest.param(0, 4, ["v10", "v9", "v8"], id="no-checkpoints"),
        pytest.param(4, 4, ["v10", "v9", "v8", "v5", "v1"], id="every-4th"),
        pytest.param(3, 2, ["v10", "v9", "v8", "v7", "v4"], id="capped-at-2"),
        pytest.param(1, 1, ["v10", "v9", "v8", "v7"], id="every-release"),
    ],
)
def test_checkpoint_releases_are_extra_bases(every: int, count: int,
                                             expected: list[str]) -> None:
    """The 1st, (N+1)-th, ... releases are checkpoints: the most recent ``count`` of them not
    already among the last ``k`` are bases too, newest first."""
    history = [f"v{i}" for i in range(1, 11)]
    records = [_record(v, i + 1) for i, v in enumerate(history)]
    got = base_pointers(_manifest("v10", 11), records, 3, every, count)
    assert [p.version for p in got] == expected
