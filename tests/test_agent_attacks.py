"""Attacks on the update path (FIELD.md §1, TUF's attack classes), end to end.

Every test starts from a device at v1, installed by a clean, real ``deltaship-agent run
--once`` (once per module; each test gets a ``cp -a``-style copy of that device and of the
store), lets a hostile store serve something, runs the agent once more and checks that:

* it exits non-zero (3: the store sent data that failed verification) with exactly one line on
  stderr, ``deltaship-agent: error: ...``, that names the problem (no traceback);
* the live model is untouched: ``current`` still points at the same version, every file under
  it is byte-identical, no version directory appeared, every file in ``objects/`` holds the
  content its name says and is content a genuine (pinned) index names, and nothing outside the
  model directory changed.

Stores are local directories (easy to tamper with); the tampered-object cases also run
against moto's S3 server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest

from edge_agent.layout import DeviceLayout
from manifest.canonical import canonical_json, loads_object
from manifest.constants import WEIGHT_INDEX_FILE
from manifest.download_plan import download_cost, make_plan
from manifest.errors import FormatError
from manifest.metadata import FileEntry, GroupEntry, ObjectRef, ReleaseIndex
from manifest.signing import SigningKey
from manifest.trust import MAX_INDEX_SIZE, MAX_MANIFEST_SIZE

from ._attack_helpers import (
    TAMPER,
    Device,
    Needle,
    Published,
    Signed,
    current_index,
    forge_index,
    forge_manifest,
    index_path,
    manifest_of,
    now_utc,
    patch_object,
    point_at,
    publish,
    put_object,
    refused,
    sha,
    untouched,
)
from .conftest import Cli, MoEFamily

UNKNOWN = SigningKey.generate("attacker")


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, moe_family: MoEFamily) -> Published:
    """v1 and v2 released once per module to a local store signed by one release key."""
    return publish(tmp_path_factory.mktemp("attack-1of1"),
                   {"v1": moe_family.v1, "v2": moe_family.v2})


@pytest.fixture(scope="module")
def published_2of2(tmp_path_factory: pytest.TempPathFactory,
                   moe_family: MoEFamily) -> Published:
    """The same releases in a store whose root needs both of two release keys."""
    return publish(tmp_path_factory.mktemp("attack-2of2"),
                   {"v1": moe_family.v1, "v2": moe_family.v2},
                   key_names=("release-a", "release-b"), threshold=2)


@dataclass
class Scene:
    """A device at v1 (installed by a clean run) following a local store we control."""

    pub: Published
    store: Path
    dev: Device
    tmp: Path
    s3: Any = None  # a boto3 client when the store is in moto's S3
    bucket: str = ""

    def release(self, version: str = "v2") -> None:
        """Publish ``version``: its store is the previous one plus objects and a manifest."""
        shutil.copytree(self.pub.snapshots[version], self.store, dirs_exist_ok=True)

    def genuine(self, key: str) -> Path:
        return self.pub.snapshots["v2"] / key

    def attack(self, *needles: Needle, at: str = "v1", manifest_rejected: bool = False,
               code: int = 3, timeout: float = 120) -> str:
        """Run the agent once against the (tampered) store; check the refusal and the device."""
        before = self.dev.snapshot(self.tmp)
        assert before.current == at
        p = self.dev.run_once(timeout)
        verified = self.pub.content["v1"] | self.pub.content["v2"]
        try:
            untouched(self.dev, before, verified, around=self.tmp,
                      manifest_rejected=manifest_rejected)
        except AssertionError as e:
            raise AssertionError(f"{e}\nagent exit {p.returncode}, stderr:\n{p.stderr}") from e
        return refused(p, *needles, code=code)


def _scene(pub: Published, tmp_path: Path, *extra: object) -> Scene:
    """A new device, initialised and brought to v1 with real agent processes."""
    store = tmp_path / "store"
    shutil.copytree(pub.snapshots["v1"], store)
    dev = Device(None, pub.root, f"file://{store}", tmp_path / "dev", *extra)
    dev.update("v1")
    return Scene(pub, store, dev, tmp_path)


def _installed(pub: Published, work: Path) -> Device:
    """A device that a clean ``run --once`` brought to v1: the template the tests copy."""
    store = work / "store"
    shutil.copytree(pub.snapshots["v1"], store)
    dev = Device(None, pub.root, f"file://{store}", work / "dev")
    dev.update("v1")
    return dev


def _cloned(pub: Published, template: Device, tmp_path: Path) -> Scene:
    """A copy of the v1 device (hard links and all) and of the v1 store, for one test."""
    store = tmp_path / "store"
    shutil.copytree(pub.snapshots["v1"], store)
    dev = template.clone(tmp_path / "dev", f"file://{store}")
    assert dev.current() == "v1"
    return Scene(pub, store, dev, tmp_path)


@pytest.fixture(scope="module")
def device_v1(published: Published, tmp_path_factory: pytest.TempPathFactory) -> Device:
    return _installed(published, tmp_path_factory.mktemp("device-1of1"))


@pytest.fixture(scope="module")
def device_v1_2of2(published_2of2: Published,
                   tmp_path_factory: pytest.TempPathFactory) -> Device:
    return _installed(published_2of2, tmp_path_factory.mktemp("device-2of2"))


@pytest.fixture
def scene(published: Published, device_v1: Device, tmp_path: Path) -> Scene:
    return _cloned(published, device_v1, tmp_path)


@pytest.fixture
def scene_2of2(published_2of2: Published, device_v1_2of2: Device, tmp_path: Path) -> Scene:
    return _cloned(published_2of2, device_v1_2of2, tmp_path)


def _key(pub: Published) -> list[SigningKey]:
    return pub.signing_keys()


# -- tampered, truncated and endless objects ------------------------------------------------

# What an endless body may be refused as: cut off at the pinned length or the cap, or refused
# outright because a local store file is not a regular file.
ENDLESS = ("more than", "larger than", "not a regular file")
TAMPER_NEEDLES = {
    "flip": ("differs from the pinned", "tampered with"),
    "truncate": ("the index pins",),
    "extend": ("the index pins",),
}


@pytest.mark.parametrize("kind", ["flip", "truncate", "extend"])
def test_tampered_object_is_refused_and_fetched_again(scene: Scene, kind: str) -> None:
    scene.release()
    obj = patch_object(scene.store, "v1")
    path = scene.store / "objects" / obj
    path.write_bytes(TAMPER[kind](path.read_bytes()))

    scene.attack(obj[:16], *TAMPER_NEEDLES[kind])
    # The bad bytes are not kept as a partial download: the next try starts clean.
    assert not DeviceLayout(scene.dev.model_dir).download_path(obj).exists()
    # Once the store is repaired the same device updates normally.
    shutil.copy(scene.genuine(f"objects/{obj}"), path)
    scene.dev.update("v2")


def test_endless_object_is_cut_off(scene: Scene) -> None:
    """An object that never ends (a link to /dev/zero on a hostile mirror)."""
    scene.release()
    obj = patch_object(scene.store, "v1")
    path = scene.store / "objects" / obj
    path.unlink()
    path.symlink_to("/dev/zero")
    scene.attack(obj, ENDLESS)


@pytest.fixture
def s3_scene(published: Published, cli: Cli, bucket: str, tmp_path: Path) -> Scene:
    """Like ``scene``, but the device reads the store from moto's S3 server."""
    s3 = boto3.client("s3", endpoint_url=cli.endpoint)
    _upload(s3, bucket, published.snapshots["v1"])
    dev = Device(cli, published.root, f"s3://{bucket}/fleet", tmp_path / "dev")
    dev.update("v1")
    return Scene(published, tmp_path / "unused", dev, tmp_path, s3, bucket)


def _upload(s3: Any, bucket: str, snapshot: Path, previous: Path | None = None) -> None:
    """Upload a store snapshot under ``fleet/``: what changed since ``previous``."""
    for p in sorted(snapshot.rglob("*")):
        rel = p.relative_to(snapshot)
        if p.is_file() and (previous is None or not (previous / rel).is_file()
                            or (previous / rel).read_bytes() != p.read_bytes()):
            s3.put_object(Bucket=bucket, Key=f"fleet/{rel}", Body=p.read_bytes())


def test_tampered_object_on_s3(s3_scene: Scene) -> None:
    """Flipped, truncated and extended objects served by moto's S3 server, one after the
    other to the same device; then the genuine object, which installs."""
    s3, bucket, pub = s3_scene.s3, s3_scene.bucket, s3_scene.pub
    _upload(s3, bucket, pub.snapshots["v2"], previous=pub.snapshots["v1"])
    obj = patch_object(pub.snapshots["v2"], "v1")
    good = s3_scene.genuine(f"objects/{obj}").read_bytes()
    for kind in ("flip", "truncate", "extend"):
        s3.put_object(Bucket=bucket, Key=f"fleet/objects/{obj}", Body=TAMPER[kind](good))
        try:
            s3_scene.attack(obj[:16], *TAMPER_NEEDLES[kind])
        except AssertionError as e:
            raise AssertionError(f"{kind}: {e}") from e
    s3.put_object(Bucket=bucket, Key=f"fleet/objects/{obj}", Body=good)
    s3_scene.dev.update("v2")


# -- tampered release index -----------------------------------------------------------------


def _raw_index_only(scene: Scene) -> None:
    """Re-sign the genuine manifest without the index's packed forms (as a publisher before
    them wrote it): the device fetches the raw index object, which the next tests tamper
    with (the packed forms' own attacks: tests/test_index_packing.py)."""
    def strip(m: dict[str, Any]) -> None:
        for form in ("zstd", "deltas"):
            m["current"]["index"].pop(form, None)
    forge_manifest(scene.store, _key(scene.pub), strip)


def test_tampered_index_byte(scene: Scene) -> None:
    scene.release()
    _raw_index_only(scene)
    path = index_path(scene.store)
    data = bytearray(path.read_bytes())
    at = data.index(b'"version":"v2"') + len(b'"version":"v')
    data[at] = ord("3")  # same length, other content
    path.write_bytes(bytes(data))
    scene.attack("release index sha256", "differs from the manifest")


def test_index_reserialised_in_place(scene: Scene) -> None:
    """The index object replaced by the same document in other bytes of the same length (its
    keys in another order, as a tool might rewrite it): an index has no signature, the pin is
    on its exact bytes."""
    scene.release()
    _raw_index_only(scene)
    path = index_path(scene.store)
    data = path.read_bytes()
    doc = json.loads(data)
    other = json.dumps(dict(reversed(doc.items())), separators=(",", ":")).encode()
    assert len(other) == len(data) and other != data and json.loads(other) == doc
    path.write_bytes(other)
    scene.attack("release index sha256", "differs from the manifest")


def test_a_forged_index_needs_a_manifest_signed_by_the_store_keys(scene: Scene) -> None:
    """An index is only ever accepted through the pin of a verified manifest: a forged index
    pinned by a manifest signed by an unknown key is refused with that manifest."""
    scene.release()
    forge_index(scene.store, [UNKNOWN], lambda s: s["groups"].pop())
    scene.attack("manifest timestamp has 0 valid signature(s) of 1 required",
                 "not one of its 'timestamp' keys", manifest_rejected=True)


# -- manifest signatures (two layers: the timestamp role's and the release role's) -----------


@pytest.mark.parametrize("layer", ["timestamp", "manifest"])
def test_manifest_signed_by_unknown_key(scene: Scene, layer: str) -> None:
    scene.release()
    if layer == "timestamp":
        forge_manifest(scene.store, _key(scene.pub), timestamp_keys=[UNKNOWN])
        needles = ("manifest timestamp has 0 valid signature(s) of 1 required",
                   "not one of its 'timestamp' keys")
    else:
        forge_manifest(scene.store, [UNKNOWN], timestamp_keys=_key(scene.pub))
        needles = ("manifest has 0 valid signature(s) of 1 required",
                   "not one of its 'release' keys")
    scene.attack(*needles, manifest_rejected=True)


@pytest.mark.parametrize("layer", ["timestamp", "manifest"])
def test_manifest_edited_after_signing(scene: Scene, layer: str) -> None:
    """The genuine v2 manifest with an expiry pushed out and the old signature kept; the
    timestamp layer re-signed around edited content is refused too (the timestamp key alone
    cannot change what is current)."""
    scene.release()
    path = scene.store / "manifest.json"
    doc = loads_object(path.read_bytes(), "manifest")
    if layer == "timestamp":
        doc["signed"]["expires"] = "2099-01-01T00:00:00Z"
        needle = "manifest timestamp has 0 valid signature(s)"
    else:
        doc["signed"]["manifest"]["expires"] = "2099-01-01T00:00:00Z"
        doc["signatures"] = [k.sign(doc["signed"]) for k in _key(scene.pub)]
        needle = "manifest has 0 valid signature(s)"
    path.write_bytes(canonical_json(doc))
    scene.attack(needle, "invalid signature", manifest_rejected=True)


@pytest.mark.parametrize("signers", ["one key", "one key twice"])
@pytest.mark.parametrize("layer", ["timestamp", "manifest"])
def test_manifest_below_threshold(scene_2of2: Scene, signers: str, layer: str) -> None:
    scene_2of2.release()
    a, b = _key(scene_2of2.pub)
    few = [a] if signers == "one key" else [a, a]
    if layer == "timestamp":
        forge_manifest(scene_2of2.store, [a, b], timestamp_keys=few)
    else:
        forge_manifest(scene_2of2.store, few, timestamp_keys=[a, b])
    what = "manifest timestamp" if layer == "timestamp" else "manifest"
    scene_2of2.attack(f"{what} has 1 valid signature(s) of 2 required", manifest_rejected=True)


def test_index_below_threshold(scene_2of2: Scene) -> None:
    """A new index pinned by a manifest with a full timestamp threshold but one release
    signature of two: the timestamp keys cannot pin another index."""
    scene_2of2.release()
    a, b = _key(scene_2of2.pub)
    forge_index(scene_2of2.store, [a], lambda s: s["groups"].pop(), timestamp_keys=[a, b])
    scene_2of2.attack("manifest has 1 valid signature(s) of 2 required",
                      manifest_rejected=True)


# -- replay and freeze ----------------------------------------------------------------------


def test_replayed_older_manifest(scene: Scene) -> None:
    old = (scene.store / "manifest.json").read_bytes()
    scene.release()
    scene.dev.update("v2")
    (scene.store / "manifest.json").write_bytes(old)
    scene.attack("manifest timestamp sequence 1 is older than 2 already seen", "replayed",
                 at="v2", manifest_rejected=True)


def test_older_content_under_a_fresh_timestamp(scene: Scene) -> None:
    """The timestamp key re-attests v1's manifest (content sequence 1) with a new timestamp
    sequence: the content floor refuses it."""
    old = manifest_of(scene.store)
    scene.release()
    scene.dev.update("v2")
    forge_manifest(scene.store, _key(scene.pub), lambda m: m.update(old),
                   edit_timestamp=lambda t: t.update(sequence=t["sequence"] + 1))
    scene.attack("manifest sequence 1 is older than 2 already seen", at="v2",
                 manifest_rejected=True)


def _expire(scene: Scene, ago: timedelta) -> None:
    def edit(m: Signed) -> None:
        m["expires"] = (now_utc() - ago).strftime("%Y-%m-%dT%H:%M:%SZ")

    forge_manifest(scene.store, _key(scene.pub), edit)


def test_expired_manifest(scene: Scene) -> None:
    scene.release()
    _expire(scene, timedelta(hours=1))
    scene.attack("manifest expired at", "device clock", manifest_rejected=True)


def test_expired_freshness_names_refresh(scene: Scene) -> None:
    """Nobody ran `deltaship-publish refresh`: one line says so."""
    scene.release()
    ago = (now_utc() - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    forge_manifest(scene.store, _key(scene.pub), edit_timestamp=lambda t: t.update(expires=ago))
    scene.attack("manifest timestamp expired at", "`deltaship-publish refresh`",
                 manifest_rejected=True)


@pytest.mark.parametrize(("grace", "accepted"), [(1800, False), (7200, True)])
def test_expiry_grace(published: Published, tmp_path: Path, grace: int, accepted: bool) -> None:
    """A device with a bad clock may accept a manifest expired less than its grace ago."""
    scene = _scene(published, tmp_path, "--expiry-grace", grace)
    scene.release()
    _expire(scene, timedelta(hours=1))
    if accepted:
        scene.dev.update("v2")
    else:
        scene.attack("manifest expired at", manifest_rejected=True)


# -- mix-and-match --------------------------------------------------------------------------


def test_manifest_naming_v2_with_v1_index(scene: Scene) -> None:
    v1_index = index_path(scene.store)
    digest, length = v1_index.name, v1_index.stat().st_size
    scene.release()
    forge_manifest(scene.store, _key(scene.pub),
                   lambda m: point_at(m, version="v2", digest=digest, length=length))
    scene.attack("release index is for version 'v1' but the manifest names 'v2'")


@pytest.mark.parametrize("pin", ["sha256", "length"])
def test_manifest_pin_does_not_match_the_index(scene: Scene, pin: str) -> None:
    scene.release()
    data = index_path(scene.store).read_bytes()
    if pin == "sha256":  # the genuine index bytes, stored under the key the manifest pins
        digest, length = sha(b"some other document"), len(data)
        (scene.store / "objects" / digest).write_bytes(data)
        needles: tuple[str, ...] = ("release index sha256", "differs from the manifest's")
    else:
        digest, length = sha(data), len(data) + 1
        needles = (f"release index is {len(data)} bytes, the manifest pins {length}",)
    forge_manifest(scene.store, _key(scene.pub),
                   lambda m: point_at(m, version="v2", digest=digest, length=length))
    scene.attack(*needles)


# -- oversized metadata (endless data) ------------------------------------------------------


def test_oversized_manifest(scene: Scene) -> None:
    """A validly signed manifest over the 64 KiB cap (an unknown field is kept and signed)."""
    scene.release()
    data = forge_manifest(scene.store, _key(scene.pub),
                          lambda m: m.update(padding="x" * MAX_MANIFEST_SIZE))
    assert len(data) > MAX_MANIFEST_SIZE
    scene.attack(f"over its {MAX_MANIFEST_SIZE}-byte cap", manifest_rejected=True)


@pytest.mark.parametrize("kind", ["device", "pipe", "pipe without writer"])
def test_endless_manifest(scene: Scene, kind: str) -> None:
    """A manifest that never ends: a link to /dev/zero, or a pipe someone keeps writing to;
    or one that never starts: a pipe nobody writes to (the agent must not hang on it)."""
    scene.release()
    path = scene.store / "manifest.json"
    path.unlink()
    if kind == "device":
        path.symlink_to("/dev/zero")
        scene.attack("manifest.json", ENDLESS, manifest_rejected=True)
        return
    os.mkfifo(path)
    if kind == "pipe without writer":
        scene.attack("manifest", manifest_rejected=True, timeout=20)
        return
    writer = threading.Thread(target=_flood, args=(path,), daemon=True)
    writer.start()
    try:
        scene.attack("manifest.json", ENDLESS, manifest_rejected=True)
    finally:
        with contextlib.suppress(OSError):  # release a writer still waiting for a reader
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        writer.join(10)


def _flood(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "wb") as f:
        while True:
            f.write(b"x" * 65536)


@pytest.mark.parametrize("body", ["oversized", "endless"])
def test_oversized_index(scene: Scene, body: str) -> None:
    """A manifest pinning an index larger than 16 MiB: the device reads at most the cap."""
    scene.release()
    size = MAX_INDEX_SIZE + (1 << 20)
    blob = b" " * size
    digest, length = put_object(scene.store, blob)
    if body == "endless":
        (scene.store / "objects" / digest).unlink()
        (scene.store / "objects" / digest).symlink_to("/dev/zero")
    forge_manifest(scene.store, _key(scene.pub),
                   lambda m: point_at(m, version="v2", digest=digest, length=length))
    cap = f"{MAX_INDEX_SIZE}-byte cap"
    scene.attack(digest, cap if body == "oversized" else (cap, "not a regular file"))


# -- wrong content behind valid signatures --------------------------------------------------


def test_one_object_listed_for_two_groups(scene: Scene) -> None:
    """An index (validly pinned by a signed manifest) that hands one group another group's
    patch. Found by this suite: both downloads raced on one partial file and the agent died
    with a traceback."""
    scene.release()
    patched = [g for g in current_index(scene.store)["groups"] if g["patches"]]
    assert len(patched) >= 2
    victim, donor = patched[0]["name"], patched[1]["name"]

    def edit(signed: Signed) -> None:
        groups = {g["name"]: g for g in signed["groups"]}
        groups[victim]["patches"] = groups[donor]["patches"]

    forge_index(scene.store, _key(scene.pub), edit)
    scene.attack("for both group", victim, donor)


def test_rebuilt_group_checked_against_the_index(scene: Scene) -> None:
    """Wrong software installation: an index (validly pinned by a signed manifest) whose group
    sha256 is not what its patch rebuilds. The rebuilt file is checked before it can become
    live."""
    scene.release()
    victim = next(g for g in current_index(scene.store)["groups"] if g["patches"])["name"]

    def edit(signed: Signed) -> None:
        group = next(g for g in signed["groups"] if g["name"] == victim)
        group["sha256"] = sha(b"some other group file")

    forge_index(scene.store, _key(scene.pub), edit)
    scene.attack(f"group {victim}", "differs from the release index")


def _plan_index(files: list[tuple[str, str, str]], groups: int = 0) -> ReleaseIndex:
    """An index with ``groups`` groups and ``files`` (path, content sha, object sha)."""
    return ReleaseIndex(
        "v9", now_utc(),
        tuple(GroupEntry(f"g{i}", f"g{i}.safetensors", sha(b"g%d" % i), 10, (),
                         ObjectRef(sha(b"full"), 5, "dspatch")) for i in range(groups)),
        tuple(FileEntry(path, content, 3, ObjectRef(obj, 2, "zstd"))
              for path, content, obj in files),
        repository_id="0" * 32,
    )


def test_plan_fetches_identical_files_once() -> None:
    """Two files with the same content share one object: it is downloaded once (found by this
    suite: the two downloads raced on one partial file; such a model could not install)."""
    a, b = sha(b"license"), sha(b"other")
    plan = make_plan(_plan_index([("LICENSE", a, sha(b"o1")), ("docs/LICENSE", a, sha(b"o1")),
                                  ("README", b, sha(b"o2"))]), set())
    assert [s.have for s in plan.files] == [False, True, False]
    assert plan.download_bytes == 4
    plan = make_plan(_plan_index([("LICENSE", a, sha(b"o1")), ("copy", a, sha(b"o1"))]), {a})
    assert [s.have for s in plan.files] == [True, True]


def test_plan_fetches_identical_groups_once() -> None:
    """Two groups with the same content (identically initialised experts) share one full
    object: one download, and the publisher's summary counts it once too."""
    g = GroupEntry("g0", "g0.safetensors", sha(b"same"), 10, (), ObjectRef(sha(b"full"), 5,
                                                                          "dspatch"))
    index = ReleaseIndex("v9", now_utc(), (g, dataclasses.replace(g, name="g1",
                                                                 file="g1.safetensors")), (),
                         repository_id="0" * 32)
    plan = make_plan(index, set())
    assert [s.kind for s in plan.groups] == ["full", "have"]
    assert plan.download_bytes == 5 == download_cost(index, None)
    assert download_cost(index, index) == 0


def test_plan_refuses_an_object_shared_by_two_contents() -> None:
    with pytest.raises(FormatError, match="for both group g0 and group g1"):
        make_plan(_plan_index([], groups=2), set())
    with pytest.raises(FormatError, match="for both file a and file b"):
        make_plan(_plan_index([("a", sha(b"1"), sha(b"o")), ("b", sha(b"2"), sha(b"o"))]), set())


# -- path traversal -------------------------------------------------------------------------


def _group(signed: Signed, name: str, file: str) -> None:
    signed["groups"][0]["name"] = name
    signed["groups"][0]["file"] = file


def _file(signed: Signed, path: str) -> None:
    signed["files"][0]["path"] = path


TRAVERSALS: dict[str, tuple[Callable[[Signed, Path], None], str]] = {
    "group ../evil": (lambda s, tmp: _group(s, "../evil", "../evil.safetensors"),
                      "unsafe group name '../evil'"),
    "group file ../../etc/x": (lambda s, tmp: _group(s, s["groups"][0]["name"], "../../etc/x"),
                               "unsafe file name '../../etc/x'"),
    "file ../../etc/x": (lambda s, tmp: _file(s, "../../etc/x"),
                         "unsafe file name '../../etc/x'"),
    "file absolute": (lambda s, tmp: _file(s, str(tmp / "etc" / "x")),
                      "unsafe file name '/"),
    "file backslash": (lambda s, tmp: _file(s, "..\\..\\etc\\x"), "unsafe file name"),
}


@pytest.mark.parametrize("case", list(TRAVERSALS))
def test_path_traversal_in_a_pinned_index(scene: Scene, case: str) -> None:
    edit, needle = TRAVERSALS[case]
    scene.release()
    forge_index(scene.store, _key(scene.pub), lambda s: edit(s, scene.tmp))
    scene.attack(needle)
    written = [p for p in scene.tmp.rglob("*") if p.name in ("x", "evil.safetensors")]
    assert written == []
    assert not (scene.tmp / "etc").exists()


def test_path_traversal_in_the_version_name(scene: Scene) -> None:
    """Versions become directory names too: ``versions/<V>``."""
    scene.release()
    forge_manifest(scene.store, _key(scene.pub),
                   lambda m: m["current"].update(version="../../evil"))
    scene.attack("'../../evil' is not a valid version", manifest_rejected=True)
    assert [p for p in scene.tmp.rglob("evil*")] == []


def test_harness_clean_release_installs(scene: Scene) -> None:
    """Sanity check of the harness: on a copied device a clean v2 release installs, v1 stays
    retained with its objects, and live files are still hard links into ``objects/``."""
    scene.release()
    scene.dev.update("v2")
    assert manifest_of(scene.store)["current"]["version"] == "v2"
    assert sorted(os.listdir(scene.dev.model_dir / "versions")) == ["v1", "v2"]
    objects = {p.name for p in (scene.dev.model_dir / "objects").iterdir()}
    assert scene.pub.content["v1"] | scene.pub.content["v2"] <= objects
    for p in (scene.dev.model_dir / "current").iterdir():
        assert p.name == WEIGHT_INDEX_FILE or p.stat().st_nlink >= 2, p
