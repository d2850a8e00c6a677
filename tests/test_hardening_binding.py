"""Issue 9, points 1, 5 and 10, end to end with real ``deltaship-publish`` and
``deltaship-agent`` processes.

1. Documents are bound to their repository: two stores initialised with the same release key
   (A and B) have different ``repository_id`` s; a device pinned to A refuses B's validly signed
   manifest (and keeps following A), the publisher refuses to build on it, ``init`` warns about
   the shared key, and documents of the older format are refused with what to do.
5. ``revert`` (and ``history``, ``release``) do not trust the unsigned release pointers: a
   pointer must name the version of its key, and the index it leads to must verify as that
   version of this repository.
10. A manifest stuffed with signatures by the trusted key costs one verification: it installs
    when its first signature is good and is refused when it is not.

Every refusal is checked the same way: the exact exit code, one ``PROG: error:`` line on stderr
and no traceback, the device's live model unchanged, and nothing written outside the model
directory (for the publisher: nothing written at all).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from manifest.constants import RELEASES_PREFIX
from manifest.signing import SigningKey
from manifest.trust import MAX_MANIFEST_SIZE, manifest_wire, sign_document

from ._attack_helpers import (
    Device,
    Signed,
    forge_manifest,
    manifest_of,
    open_doc,
    refused,
    sign,
    timestamp_of,
    tree,
    untouched,
)
from .conftest import BIN, MoEFamily

pytestmark = pytest.mark.xdist_group("hardening-binding")

PUBLISH_ERROR = "deltaship-publish: error: "


# -- publishing two stores with one key ------------------------------------------------------


def run(prog: str, *args: object, env: dict[str, str], cwd: Path,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / prog), *map(str, args)]
    p = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def publisher_env(home: Path) -> dict[str, str]:
    """The publisher's environment: its config (the known stores) and cache under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(XDG_CONFIG_HOME=str(home / "config"), XDG_CACHE_HOME=str(home / "cache"))
    return env


@dataclass(frozen=True)
class Store:
    name: str
    root: Path  # the root.json devices pin
    repository_id: str
    snapshots: dict[str, Path]  # version -> copy of the store right after it
    init: subprocess.CompletedProcess[str]


@dataclass(frozen=True)
class Twins:
    """Stores A and B initialised with the same release key on one publisher machine."""

    work: Path
    key: Path
    env: dict[str, str]
    a: Store
    b: Store


def init_and_release(work: Path, name: str, key: Path, env: dict[str, str],
                     models: dict[str, Path]) -> Store:
    store = work / name
    store.mkdir()
    root = work / f"root-{name}.json"
    init = run("deltaship-publish", "init", "--store", store, "--key", key, "--out", root,
               env=env, cwd=work)
    snapshots = {}
    for version, model in models.items():
        run("deltaship-publish", "release", model, "--store", store, "--version", version,
            "--key", key, env=env, cwd=work)
        snapshots[version] = work / f"{name}-{version}"
        shutil.copytree(store, snapshots[version], ignore=shutil.ignore_patterns(".lock"))
    repository_id = open_doc(root.read_bytes())[0]["repository_id"]
    return Store(name, root, repository_id, snapshots, init)


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory, moe_family: MoEFamily) -> Twins:
    work = tmp_path_factory.mktemp("twins")
    env = publisher_env(work / "home")
    run("deltaship-publish", "keygen", "--out", work / "keys", "--name", "release", env=env,
        cwd=work)
    key = work / "keys" / "release.key"
    a = init_and_release(work, "a", key, env,
                         {"v1": moe_family.v1, "v2": moe_family.v2, "v3": moe_family.v3})
    # B (say, another model) is further along: its sequence is above A's.
    b = init_and_release(work, "b", key, env,
                         {"v1": moe_family.v4, "v2": moe_family.v3, "v3": moe_family.v2,
                          "v4": moe_family.v1})
    return Twins(work, key, env, a, b)


@dataclass
class Scene:
    """A device pinned to store A, at ``version``, following a copy of A we control."""

    twins: Twins
    store: Path
    dev: Device
    tmp: Path

    def serve(self, snapshot: Path) -> None:
        """Serve ``snapshot`` over the store (objects are content-addressed: they add up)."""
        shutil.copytree(snapshot, self.store, dirs_exist_ok=True)

    def refused(self, *needles: str | tuple[str, ...], code: int = 3,
                manifest_rejected: bool = True) -> str:
        """Run the agent once: a refusal, and the device exactly as before."""
        before = self.dev.snapshot(self.tmp)
        p = self.dev.run_once()
        try:  # nothing new may appear in objects/
            untouched(self.dev, before, frozenset(), around=self.tmp,
                      manifest_rejected=manifest_rejected)
        except AssertionError as e:
            raise AssertionError(f"{e}\nagent exit {p.returncode}, stderr:\n{p.stderr}") from e
        return refused(p, *needles, code=code)

    def publish(self, *args: object) -> subprocess.CompletedProcess[str]:
        return run("deltaship-publish", *args, env=self.env, cwd=self.tmp, check=False)

    @property
    def env(self) -> dict[str, str]:
        return publisher_env(self.tmp / "home")

    def publisher_refused(self, *args: object, needles: tuple[str | tuple[str, ...], ...],
                          code: int = 3) -> str:
        """A publisher command that must fail, write nothing anywhere, and leave the device
        following the store exactly as it was."""
        before_files = tree(self.tmp)
        p = self.publish(*args)
        assert tree(self.tmp) == before_files, "the refused command wrote something"
        message = publisher_refusal(p, *needles, code=code)
        before = self.dev.snapshot(self.tmp)
        q = self.dev.run_once()
        assert q.returncode == 0, q.stderr
        after = self.dev.snapshot(self.tmp)
        assert (after.current, after.live, after.versions) == (
            before.current, before.live, before.versions), "the device's live model changed"
        return message


def publisher_refusal(p: subprocess.CompletedProcess[str], *needles: str | tuple[str, ...],
                      code: int) -> str:
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PUBLISH_ERROR), p.stderr
    assert p.returncode == code, f"exit {p.returncode}, expected {code}: {p.stderr}"
    message = lines[0][len(PUBLISH_ERROR):]
    for needle in needles:
        options = (needle,) if isinstance(needle, str) else needle
        assert any(o in message for o in options), f"{needle!r} not in {message!r}"
    return message


def make_scene(twins: Twins, tmp_path: Path, at: str = "v1") -> Scene:
    store = tmp_path / "store"
    shutil.copytree(twins.a.snapshots[at], store)
    dev = Device(None, twins.a.root, f"file://{store}", tmp_path / "dev")
    dev.update(at)
    return Scene(twins, store, dev, tmp_path)


def key_of(twins: Twins) -> list[SigningKey]:
    from publisher.keys import load_signing_key

    return [load_signing_key(twins.key)]


# -- 1. another store's release ----------------------------------------------------------


def test_stores_sharing_a_key_have_their_own_repository_ids(twins: Twins) -> None:
    a, b = twins.a, twins.b
    assert a.repository_id != b.repository_id
    for store in (a, b):
        for version, snap in store.snapshots.items():
            manifest, timestamp = manifest_of(snap), timestamp_of(snap)
            assert manifest["spec_version"] == timestamp["spec_version"] == 3
            assert manifest["repository_id"] == store.repository_id, (store.name, version)
            assert timestamp["repository_id"] == store.repository_id, (store.name, version)
            index_key = manifest["current"]["index"]["sha256"]
            index = json.loads((snap / "objects" / index_key).read_bytes())  # unsigned
            assert index["repository_id"] == store.repository_id


def test_init_warns_when_its_key_signs_another_known_store(twins: Twins) -> None:
    """B's init named A (same key); A's init, the first, warned about nothing."""
    assert twins.a.init.stderr == ""
    lines = twins.b.init.stderr.splitlines()
    assert len(lines) == 1, twins.b.init.stderr
    a_url = f"file://{twins.work / 'a'}"
    assert lines[0].startswith("deltaship-publish: warning: key ")
    assert f"also signs {a_url} (repository {twins.a.repository_id})" in lines[0]
    assert f"repository id: {twins.b.repository_id}" in twins.b.init.stdout


def test_init_json_names_the_stores_sharing_the_key(twins: Twins, tmp_path: Path) -> None:
    store = tmp_path / "c"
    store.mkdir()
    p = run("deltaship-publish", "init", "--store", store, "--key", twins.key, "--json",
            env=twins.env, cwd=tmp_path)
    out = json.loads(p.stdout)
    assert sorted(out["key_shared_with"]) == [f"file://{twins.work / n}" for n in ("a", "b")]
    assert len(p.stderr.splitlines()) == 2
    # A new key shares nothing; nothing is written outside the store and the config dir.
    env = publisher_env(tmp_path / "home")
    run("deltaship-publish", "keygen", "--out", tmp_path / "keys", env=env, cwd=tmp_path)
    (tmp_path / "d").mkdir()
    p = run("deltaship-publish", "init", "--store", tmp_path / "d", "--key",
            tmp_path / "keys" / "release.key", env=env, cwd=tmp_path)
    assert p.stderr == ""
    known = json.loads((tmp_path / "home" / "config" / "deltaship" /
                        "known-stores.json").read_text())
    assert list(known["stores"]) == [f"file://{tmp_path / 'd'}"]


@pytest.mark.parametrize("what", ["manifest", "everything"])
def test_device_refuses_another_stores_release(twins: Twins, tmp_path: Path, what: str) -> None:
    """A mirror of A serves B's validly signed manifest and objects (or B's whole store): the
    device pinned to A refuses it, and A's own next release still installs afterwards (no
    replay lock-out: B's higher sequence was never remembered)."""
    scene = make_scene(twins, tmp_path)
    b_last = twins.b.snapshots["v4"]
    if what == "manifest":
        shutil.copytree(b_last / "objects", scene.store / "objects", dirs_exist_ok=True)
        shutil.copy(b_last / "manifest.json", scene.store / "manifest.json")
    else:
        scene.serve(b_last)
    message = scene.refused(
        f"manifest timestamp belongs to repository {twins.b.repository_id}",
        f"trusted root's repository {twins.a.repository_id}")
    assert "another store" in message
    scene.serve(twins.a.snapshots["v2"])
    scene.dev.update("v2")
    assert scene.dev.state()["highest_sequence"] == 2


def test_publisher_refuses_to_build_on_another_stores_manifest(
        twins: Twins, tmp_path: Path, moe_family: MoEFamily) -> None:
    """The publisher reads the store back like a device: B's manifest in A is refused by
    ``release``, ``revert`` and ``history`` (exit 3), and nothing is written."""
    scene = make_scene(twins, tmp_path)
    scene.serve(twins.a.snapshots["v2"])
    scene.dev.update("v2")
    shutil.copytree(twins.b.snapshots["v4"] / "objects", scene.store / "objects",
                    dirs_exist_ok=True)
    shutil.copy(twins.b.snapshots["v4"] / "manifest.json", scene.store / "manifest.json")
    needles = (f"manifest timestamp belongs to repository {twins.b.repository_id}",
               twins.a.repository_id)
    for args in (("history",), ("revert", "--to", "v1", "--key", twins.key),
                 ("release", moe_family.v3, "--version", "v9", "--key", twins.key,
                  "--cache-dir", tmp_path / "cache")):
        cmd, *rest = args
        before = tree(scene.tmp)
        p = scene.publish(cmd, "--store", scene.store, *rest)
        publisher_refusal(p, *needles, code=3)
        assert tree(scene.tmp) == before


def _old_format(signed: Signed) -> None:
    signed["spec_version"] = 1
    del signed["repository_id"]


def test_device_refuses_documents_of_the_older_format(twins: Twins, tmp_path: Path) -> None:
    """A new device meeting a manifest without a repository id (spec_version 1, validly
    signed) says what to do."""
    scene = make_scene(twins, tmp_path)
    scene.serve(twins.a.snapshots["v2"])
    forge_manifest(scene.store, key_of(twins), _old_format)
    scene.refused("manifest has spec_version 1, an older format", "re-initialise the store")


def test_an_older_trust_root_cannot_be_pinned_or_published_to(
        twins: Twins, tmp_path: Path, moe_family: MoEFamily) -> None:
    signed, _ = open_doc(twins.a.root.read_bytes())
    _old_format(signed)
    old_root = tmp_path / "old-root.json"
    old_root.write_bytes(sign(signed, key_of(twins)))
    before = tree(tmp_path)
    p = run("deltaship-agent", "init", "--store", "file:///nowhere", "--trust", old_root,
            "--model-dir", tmp_path / "dev", "--config", tmp_path / "dev.toml",
            env=publisher_env(tmp_path / "home"), cwd=tmp_path, check=False)
    # A trust file given on the command line is local input (exit 2), not data from the store.
    refused(p, "root has spec_version 1, an older format", "re-initialise the store", code=2)
    assert tree(tmp_path) == before
    store = tmp_path / "old-store"
    shutil.copytree(twins.a.snapshots["v1"], store)
    (store / "root.json").write_bytes(old_root.read_bytes())
    before = tree(tmp_path)
    p = run("deltaship-publish", "release", moe_family.v2, "--store", store,
            "--version", "v2", "--key", twins.key, env=publisher_env(tmp_path / "home"),
            cwd=tmp_path, check=False)
    publisher_refusal(p, "root has spec_version 1", "re-initialise", code=3)
    assert tree(tmp_path) == before


# -- 5. release records (signed since format 3) ------------------------------------------------


def _pointer(store: Path, version: str) -> Path:
    return store / RELEASES_PREFIX / f"{version}.json"


def _resign_record(twins: Twins, store: Path, version: str, edit: Callable[[dict], None]) -> None:
    """What a holder of the release key writes: releases/<version>.json edited and re-signed."""
    signed = json.loads(_pointer(store, version).read_text())["signed"]
    edit(signed)
    _pointer(store, version).write_bytes(sign_document(signed, key_of(twins)))


def test_revert_refuses_a_pointer_copied_over_another(twins: Twins, tmp_path: Path,
                                                       moe_family: MoEFamily) -> None:
    """releases/v1.json overwritten with releases/v3.json: ``revert --to v1`` used to sign a
    manifest for v3 ("v3 is current again"). The signed record names its own version."""
    scene = make_scene(twins, tmp_path, at="v3")
    shutil.copy(_pointer(scene.store, "v3"), _pointer(scene.store, "v1"))
    message = scene.publisher_refused(
        "revert", "--store", scene.store, "--to", "v1", "--key", twins.key,
        needles=("releases/v1.json is signed for version 'v3'", "copied"))
    assert "is current" not in message
    for cmd in (("history",), ("release", moe_family.v4, "--version", "v9",
                               "--key", twins.key)):
        scene.publisher_refused(cmd[0], "--store", scene.store, *cmd[1:],
                                needles=("releases/v1.json is signed for version 'v3'",))


def test_revert_refuses_an_edited_record(twins: Twins, tmp_path: Path) -> None:
    """releases/v1.json edited to name v3's index, without the key: its signature fails."""
    scene = make_scene(twins, tmp_path, at="v3")
    doc = json.loads(_pointer(scene.store, "v1").read_text())
    doc["signed"]["index"] = json.loads(_pointer(scene.store, "v3").read_text())["signed"]["index"]
    _pointer(scene.store, "v1").write_text(json.dumps(doc))
    scene.publisher_refused(
        "revert", "--store", scene.store, "--to", "v1", "--key", twins.key,
        needles=("releases/v1.json has 0 valid signature", "'release' keys"))


def test_revert_refuses_a_pointer_to_another_versions_index(twins: Twins,
                                                            tmp_path: Path) -> None:
    """releases/v1.json re-signed (with the key) to name v3's genuine index: the index's own
    version still decides."""
    scene = make_scene(twins, tmp_path, at="v3")
    v3_index = json.loads(_pointer(scene.store, "v3").read_text())["signed"]["index"]
    _resign_record(twins, scene.store, "v1", lambda r: r.update(index=v3_index))
    scene.publisher_refused(
        "revert", "--store", scene.store, "--to", "v1", "--key", twins.key,
        needles=("release index is for version 'v3' but releases/v1.json names 'v1'",))


def test_revert_refuses_a_pointer_to_another_stores_index(twins: Twins, tmp_path: Path) -> None:
    """releases/v1.json re-signed (the key is shared) to name B's v1 index, copied into A."""
    scene = make_scene(twins, tmp_path, at="v3")
    b_v1 = twins.b.snapshots["v1"]
    b_index = manifest_of(b_v1)["current"]["index"]
    shutil.copy(b_v1 / "objects" / b_index["sha256"], scene.store / "objects")
    _resign_record(twins, scene.store, "v1", lambda r: r.update(index=b_index))
    scene.publisher_refused(
        "revert", "--store", scene.store, "--to", "v1", "--key", twins.key,
        needles=(f"release index belongs to repository {twins.b.repository_id}",))


def test_revert_refuses_another_stores_record(twins: Twins, tmp_path: Path) -> None:
    """B's signed releases/v1.json copied into A (same key): its repository id is B's."""
    scene = make_scene(twins, tmp_path, at="v3")
    shutil.copy(_pointer(twins.b.snapshots["v1"], "v1"), _pointer(scene.store, "v1"))
    scene.publisher_refused(
        "revert", "--store", scene.store, "--to", "v1", "--key", twins.key,
        needles=(f"belongs to repository {twins.b.repository_id}",))


def test_revert_to_a_genuine_pointer_still_works(twins: Twins, tmp_path: Path) -> None:
    scene = make_scene(twins, tmp_path, at="v3")
    p = scene.publish("revert", "--store", scene.store, "--to", "v1", "--key", twins.key)
    assert p.returncode == 0 and "reverted: v1 is current" in p.stdout, p.stderr
    scene.dev.update("v1")


# -- 10. signature junk -----------------------------------------------------------------------


def _stuff(layer: str, signatures: Callable[[dict[str, str]], list[dict[str, str]]]
           ) -> Callable[[Path, list[SigningKey]], None]:
    """Re-sign the store's manifest, ``layer`` (``timestamp`` or ``manifest``) padded with a
    long list (costly to canonicalise) and its signature list ``signatures(good)`` filling it
    up to the 64 KiB cap."""

    def apply(store: Path, keys: list[SigningKey]) -> None:
        ts = timestamp_of(store)
        body = ts if layer == "timestamp" else ts["manifest"]
        body["x_padding"] = [0] * 5000
        good = open_doc(sign(body, keys))[1][0]
        sigs = signatures(good)
        ts_sigs = sigs if layer == "timestamp" else [k.sign(ts) for k in keys]
        m_sigs = sigs if layer == "manifest" else [k.sign(ts["manifest"]) for k in keys]
        data = manifest_wire(ts, ts_sigs, m_sigs)
        assert len(data) <= MAX_MANIFEST_SIZE, len(data)
        assert len(sigs) >= 200
        (store / "manifest.json").write_bytes(data)

    return apply


N_JUNK = 240
BAD_SIG = "00" * 64


@pytest.mark.parametrize("layer", ["timestamp", "manifest"])
@pytest.mark.parametrize("first", ["good", "bad"])
def test_manifest_stuffed_with_signatures(twins: Twins, tmp_path: Path, first: str,
                                          layer: str) -> None:
    """Hundreds of signature entries by the trusted key id on either layer: only the first
    counts. A good one first installs the release; junk first is refused, and the device is as
    before."""
    scene = make_scene(twins, tmp_path)
    scene.serve(twins.a.snapshots["v2"])
    if first == "good":
        _stuff(layer, lambda g: [g] * N_JUNK)(scene.store, key_of(twins))
        scene.dev.update("v2")
        return
    _stuff(layer, lambda g: [{"keyid": g["keyid"], "sig": BAD_SIG}] * N_JUNK + [g])(
        scene.store, key_of(twins))
    what = "manifest timestamp" if layer == "timestamp" else "manifest"
    scene.refused(f"{what} has 0 valid signature(s) of 1 required", "invalid signature by key")


# -- the list of known stores (advice only) ----------------------------------------------------


def test_known_stores_survive_a_bad_file_and_an_unwritable_place(tmp_path: Path) -> None:
    from manifest.metadata import Role, Root
    from publisher.known_stores import KnownStores

    from ._signed_docs import NOW, OTHER_REPO_ID, REPO_ID, key

    def root(repository_id: str, *seeds: int) -> Root:
        keys = {key(n).keyid: key(n).public_key for n in seeds}
        role = Role(tuple(keys), 1)
        return Root(1, NOW, keys, {"root": role, "release": role}, repository_id=repository_id)

    path = tmp_path / "cfg" / "known-stores.json"
    known = KnownStores(path)
    assert known.stores() == {}
    known.remember("s3://b/staging", root(REPO_ID, 1), NOW)
    known.remember("s3://b/prod", root(OTHER_REPO_ID, 1, 2), NOW)
    assert [s.url for s in known.sharing_keys("s3://b/new", (key(2).keyid,))] == ["s3://b/prod"]
    assert [s.url for s in known.sharing_keys("s3://b/prod", (key(1).keyid,))] == [
        "s3://b/staging"]
    assert known.sharing_keys("s3://b/new", (key(3).keyid,)) == []
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    for junk in (b"{not json", b"[]", b'{"_type": "deltaship.known-stores", "stores": [1]}',
                 b'{"_type": "deltaship.known-stores", "stores": {"u": {"keyids": 3}}}'):
        path.write_bytes(junk)
        assert known.stores() == {}
        known.remember("s3://b/x", root(REPO_ID, 1), NOW)  # and it heals
        assert list(known.stores()) == ["s3://b/x"]
    blocked = tmp_path / "file"
    blocked.write_text("")
    KnownStores(blocked / "sub" / "known-stores.json").remember("s3://b/y", root(REPO_ID, 1),
                                                                NOW)  # only logged
