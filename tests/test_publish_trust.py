"""The publisher's trust lifecycle through the real ``deltaship-publish`` processes (issue 10):
roles and thresholds at ``init``, ``refresh``, drafts signed on separate machines, root
rotation, and what ``history`` says about the three expiries.

Most cases use a local directory store (fast); the cross-machine release and the refresh run on
the moto S3 server too. Every refusal is one line on stderr with its exit code
(``manifest.errors.EXIT_CODES``) and leaves the store as it was.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from manifest.canonical import canonical_json, loads_object
from manifest.constants import MANIFEST_KEY, ROOT_KEY, release_pointer_key, root_version_key
from manifest.metadata import Root
from manifest.storage.store import StoreOptions, open_store
from manifest.trust import verify_manifest, verify_record, verify_root, verify_successor

from .conftest import BIN, Cli, MoEFamily


@dataclass
class HomeCli(Cli):
    """The CLI with HOME and the XDG directories inside the test (the list of stores this
    machine signs, and the base cache, land there)."""

    home: Path = Path()

    def env(self, **extra: str) -> dict[str, str]:
        base = {"HOME": str(self.home), "XDG_CONFIG_HOME": str(self.home / ".config"),
                "XDG_CACHE_HOME": str(self.home / ".cache")}
        return super().env(**{**base, **extra})


@pytest.fixture
def cli(s3_endpoint: str, tmp_path: Path) -> Cli:
    (tmp_path / "home").mkdir()
    return HomeCli(s3_endpoint, tmp_path, tmp_path / "home")

# -- helpers ---------------------------------------------------------------------------------


def _one_line_error(p: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """``p`` failed with ``code`` and said so in one line, naming each of ``needles``."""
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltaship-publish: error: "), p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _json(p: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(p.stdout)


@dataclass
class Keys:
    """Key pairs made with ``keygen`` in one directory: ``keys.key("a")``, ``keys.pub("a")``."""

    cli: Cli
    dir: Path

    def make(self, *names: str) -> Keys:
        for n in names:
            self.cli.publish("keygen", "--out", self.dir, "--name", n)
        return self

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def pub(self, name: str) -> Path:
        return self.dir / f"{name}.pub"

    def keyid(self, name: str) -> str:
        return str(json.loads(self.pub(name).read_text())["keyid"])


@pytest.fixture
def keys(cli: Cli, tmp_path: Path) -> Keys:
    return Keys(cli, tmp_path / "keys").make("root", "rel", "ts")


@pytest.fixture
def dir_store(tmp_path: Path) -> str:
    d = tmp_path / "store"
    d.mkdir()
    return str(d)


@pytest.fixture(params=["dir", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('bucket')}/m"
    d = tmp_path / "store"
    d.mkdir()
    return str(d)


def _read(cli: Cli, store: str, key: str) -> bytes:
    return open_store(store, StoreOptions(cli.endpoint)).get(key, 1 << 24)


def _has(cli: Cli, store: str, key: str) -> bool:
    return open_store(store, StoreOptions(cli.endpoint)).exists(key)


def _init_roles(cli: Cli, store: str, k: Keys, *extra: object) -> Any:
    """``init`` with one key per role: root (private), release and timestamp (public halves)."""
    return _json(cli.publish("init", "--store", store, "--root-key", k.key("root"),
                             "--release-key", k.pub("rel"), "--timestamp-key", k.pub("ts"),
                             *extra, "--json"))


def _release(cli: Cli, store: str, model: Path, version: str, *args: object,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    return cli.publish("release", model, "--store", store, "--version", version,
                       "--cache-dir", cli.cwd / "cache", "--json", *args, check=check)


def _keyargs(*paths: Path) -> list[object]:
    return [a for p in paths for a in ("--key", p)]


def _history(cli: Cli, store: str) -> Any:
    return _json(cli.publish("history", "--store", store, "--json"))


def _timestamp(cli: Cli, store: str) -> dict[str, Any]:
    """The raw ``manifest.json`` document (timestamp envelope, manifest signatures beside)."""
    return loads_object(_read(cli, store, MANIFEST_KEY), "manifest")


def _now() -> datetime:
    return datetime.now(UTC)


# -- init: roles, keys and thresholds ----------------------------------------------------------


def test_init_gives_each_role_its_keys_and_thresholds(cli: Cli, dir_store: str,
                                                      tmp_path: Path) -> None:
    k = Keys(cli, tmp_path / "keys").make("root1", "root2", "rel1", "rel2", "rel3", "ts")
    out = _json(cli.publish(
        "init", "--store", dir_store, "--root-key", k.key("root1"), "--root-key",
        k.key("root2"), *[a for n in ("rel1", "rel2", "rel3") for a in ("--release-key",
                                                                          k.pub(n))],
        "--timestamp-key", k.pub("ts"), "--threshold", "release=2", "--threshold", "root=2",
        "--out", tmp_path / "root.json", "--json"))
    assert out["roles"] == {
        "root": {"keyids": [k.keyid("root1"), k.keyid("root2")], "threshold": 2},
        "release": {"keyids": [k.keyid(n) for n in ("rel1", "rel2", "rel3")], "threshold": 2},
        "timestamp": {"keyids": [k.keyid("ts")], "threshold": 1},
    }
    data = _read(cli, dir_store, ROOT_KEY)
    assert data == _read(cli, dir_store, root_version_key(1))
    assert data == (tmp_path / "root.json").read_bytes()
    root = verify_root(data, now=_now())  # self-signed by both root keys
    assert root.version == 1 and root.repository_id == out["repository_id"]


def test_key_means_every_role_and_a_role_without_keys_uses_the_release_keys(
        cli: Cli, tmp_path: Path, keys: Keys, moe_family: MoEFamily) -> None:
    every, split = tmp_path / "every", tmp_path / "split"
    every.mkdir()
    split.mkdir()
    out = _json(cli.publish("init", "--store", every, "--key", keys.key("rel"), "--json"))
    assert {n: r["keyids"] for n, r in out["roles"].items()} == {
        n: [keys.keyid("rel")] for n in ("root", "release", "timestamp")}
    _release(cli, str(every), moe_family.v1, "v1", "--key", keys.key("rel"))
    p = cli.publish("refresh", "--store", every, "--key", keys.key("rel"), "--json")
    assert _json(p)["timestamp_sequence"] == 2
    # --root-key and --release-key only: the timestamp role gets the release key.
    out = _json(cli.publish("init", "--store", split, "--root-key", keys.key("root"),
                            "--release-key", keys.pub("rel"), "--json"))
    assert out["roles"]["timestamp"]["keyids"] == [keys.keyid("rel")]
    assert out["roles"]["root"]["keyids"] == [keys.keyid("root")]


@pytest.mark.parametrize(("args", "needles"), [
    (["--root-key", "root.pub", "--release-key", "rel.pub"],
     ["root.pub is not a deltaship private key", "public half"]),
    (["--key", "rel.key", "--threshold", "2"],
     ["--threshold", "must be between 1 and the 1", "key(s)"]),
    (["--root-key", "root.key", "--release-key", "rel.pub", "--threshold", "release=2"],
     ["--threshold release=2 must be between 1 and the 1 release key(s)"]),
    (["--key", "rel.key", "--threshold", "bogus=1"],
     ["--threshold", "'bogus' is not a role (root, release, timestamp)"]),
    (["--key", "rel.key", "--threshold", "release=0"], ["--threshold", "at least 1"]),
    # No root key: the root role gets the release key, here only a public half.
    (["--release-key", "rel.pub"], ["rel.pub is not a deltaship private key"]),
    ([], ["no key for the", "--key FILE"]),
], ids=["root-pub", "threshold-above-keys", "role-threshold-above-keys", "unknown-role",
        "zero", "root-from-public-release-key", "no-key"])
def test_init_refusals(cli: Cli, dir_store: str, keys: Keys, args: list[str],
                       needles: list[str]) -> None:
    argv = [keys.dir / a if a.endswith((".key", ".pub")) else a for a in args]
    _one_line_error(cli.publish("init", "--store", dir_store, *argv, check=False), 2, *needles)
    assert list(Path(dir_store).iterdir()) == []  # nothing written


# -- refresh -------------------------------------------------------------------------------------


def test_refresh_renews_freshness_only(cli: Cli, any_store: str, keys: Keys,
                                       moe_family: MoEFamily) -> None:
    _init_roles(cli, any_store, keys)
    _one_line_error(cli.publish("refresh", "--store", any_store, "--key", keys.key("ts"),
                                check=False), 2, "has no release yet", "nothing to refresh")
    # Released with a short freshness, so the default 28 days of `refresh` end later.
    _release(cli, any_store, moe_family.v1, "v1", *_keyargs(keys.key("rel"), keys.key("ts")),
             "--timestamp-days", "3")
    before = _timestamp(cli, any_store)
    _one_line_error(cli.publish("refresh", "--store", any_store, "--key", keys.key("rel"),
                                check=False), 2, "rel.key", "not one of the trust root's "
                    "'timestamp' keys")
    assert _timestamp(cli, any_store) == before
    out = _json(cli.publish("refresh", "--store", any_store, "--key", keys.key("ts"),
                            "--json"))
    after = _timestamp(cli, any_store)
    assert after["signed"]["sequence"] == before["signed"]["sequence"] + 1 == \
        out["timestamp_sequence"]
    # The release-signed manifest inside: the same bytes, the same signatures.
    assert canonical_json(after["signed"]["manifest"]) == \
        canonical_json(before["signed"]["manifest"])
    assert after["manifest_signatures"] == before["manifest_signatures"]
    # 28 days after 3: later (ISO 8601 UTC strings of one format compare as times).
    assert after["signed"]["expires"] > before["signed"]["expires"]
    assert out["current"] == "v1" and out["sequence"] == 1
    root = verify_root(_read(cli, any_store, ROOT_KEY), now=_now())
    ts = verify_manifest(_read(cli, any_store, MANIFEST_KEY), root, now=_now(),
                         min_timestamp=2, min_sequence=1)
    assert ts.current.version == "v1" and ts.root_version == 1


def test_refresh_content_resigns_the_manifest_with_the_release_keys(
        cli: Cli, dir_store: str, keys: Keys, moe_family: MoEFamily) -> None:
    _init_roles(cli, dir_store, keys)
    _release(cli, dir_store, moe_family.v1, "v1", *_keyargs(keys.key("rel"), keys.key("ts")),
             "--expires-days", "30")
    before = _timestamp(cli, dir_store)
    _one_line_error(cli.publish("refresh", "--store", dir_store, "--key", keys.key("ts"),
                                "--content", check=False),
                    2, "needs 1 'release' signatures")
    out = _json(cli.publish("refresh", "--store", dir_store, "--content", "--json",
                            *_keyargs(keys.key("ts"), keys.key("rel"))))
    after = _timestamp(cli, dir_store)
    assert out["sequence"] == 2 and out["timestamp_sequence"] == 2 and out["current"] == "v1"
    inner_before, inner_after = before["signed"]["manifest"], after["signed"]["manifest"]
    assert inner_after["sequence"] == inner_before["sequence"] + 1
    assert inner_after["expires"] > inner_before["expires"]  # 365 days, not 30
    assert inner_after["current"] == inner_before["current"]


def test_refresh_through_a_draft_and_a_damaged_draft(cli: Cli, dir_store: str, keys: Keys,
                                                     moe_family: MoEFamily,
                                                     tmp_path: Path) -> None:
    _init_roles(cli, dir_store, keys)
    _release(cli, dir_store, moe_family.v1, "v1", *_keyargs(keys.key("rel"), keys.key("ts")))
    draft = tmp_path / "refresh.draft"
    out = _json(cli.publish("refresh", "--store", dir_store, "--draft", draft, "--json"))
    assert out["missing"] == [
        "timestamp (manifest.json): 0 of 1 signatures from the timestamp keys of trust root v1"]
    for damaged, needle in [(b'{"x": 1}', "missing field '_type'"),
                            (draft.read_bytes()[:200], "not valid UTF-8 JSON")]:
        bad = tmp_path / "bad.draft"
        bad.write_bytes(damaged)
        for cmd in (["sign", bad, "--key", keys.key("ts")],
                    ["publish", bad, "--store", dir_store]):
            _one_line_error(cli.publish(*cmd, check=False), 2,
                            "bad.draft is not a usable deltaship draft", needle)
    cli.publish("sign", draft, "--key", keys.key("ts"))
    out = _json(cli.publish("publish", draft, "--store", dir_store, "--json"))
    assert (out["kind"], out["sequence"], out["timestamp_sequence"]) == ("refresh", 1, 2)


# -- revert through a draft ---------------------------------------------------------------------


def test_revert_through_a_draft(cli: Cli, dir_store: str, keys: Keys,
                                moe_family: MoEFamily, tmp_path: Path) -> None:
    _init_roles(cli, dir_store, keys)
    for v, model in (("v1", moe_family.v1), ("v2", moe_family.v2)):
        _release(cli, dir_store, model, v, *_keyargs(keys.key("rel"), keys.key("ts")))
    draft = tmp_path / "revert.json"
    out = _json(cli.publish("revert", "--store", dir_store, "--to", "v1", "--draft", draft,
                            "--key", keys.key("ts"), "--json"))
    assert out["missing"] == [
        "manifest (manifest.json): 0 of 1 signatures from the release keys of trust root v1"]
    _one_line_error(cli.publish("publish", draft, "--store", dir_store, check=False), 2,
                    "the draft lacks signatures", "release keys")
    assert _timestamp(cli, dir_store)["signed"]["manifest"]["current"]["version"] == "v2"
    signed = _json(cli.publish("sign", draft, "--key", keys.key("rel"), "--json"))
    assert signed["missing"] == [] and [a[0] for a in signed["added"]] == ["manifest"]
    out = _json(cli.publish("publish", draft, "--store", dir_store, "--json"))
    assert (out["kind"], out["current"], out["sequence"]) == ("revert", "v1", 3)
    h = cli.publish("history", "--store", dir_store)
    assert "(reverted to v1 at sequence 3)" in h.stdout
    _one_line_error(cli.publish("publish", draft, "--store", dir_store, check=False), 5,
                    "was published since this draft was made")


# -- a 2-of-3 release signed on three machines (issue 10, must show (d)) ------------------------


@dataclass
class Machine:
    """A key holder's machine: its own HOME, XDG directories and key directory, and no way to
    reach the store (signing needs none)."""

    cli: Cli
    home: Path
    name: str

    def env(self, **extra: str) -> dict[str, str]:
        return self.cli.env(HOME=str(self.home), XDG_CONFIG_HOME=str(self.home / ".config"),
                            XDG_CACHE_HOME=str(self.home / ".cache"), **extra)

    def run(self, *args: object, check: bool = True, **extra: str
            ) -> subprocess.CompletedProcess[str]:
        return self.cli.publish(*args, env=self.env(**extra), check=check)

    @property
    def key(self) -> Path:
        return self.home / "keys" / f"{self.name}.key"

    @property
    def pub(self) -> Path:
        return self.home / "keys" / f"{self.name}.pub"

    def sign(self, draft: Path, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Copy the draft in, sign it with this machine's key only, copy it back out."""
        local = self.home / draft.name
        shutil.copyfile(draft, local)
        p = self.run("sign", local, "--key", self.key, "--json", check=check,
                     AWS_ENDPOINT_URL=_dead_endpoint())
        if p.returncode == 0:
            shutil.copyfile(local, draft)
        return p


def _dead_endpoint() -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.slow  # scheduled first (tests/conftest.py)
def test_two_of_three_release_signed_on_three_machines(
        cli: Cli, bucket: str, tmp_path: Path, moe_family: MoEFamily) -> None:
    store = f"s3://{bucket}/fleet"
    holders = []
    for name in ("alice", "bob", "carol"):
        m = Machine(cli, tmp_path / name, name)
        m.home.mkdir()
        m.run("keygen", "--out", m.home / "keys", "--name", name)
        holders.append(m)
    alice, bob, carol = holders
    ci = Machine(cli, tmp_path / "ci", "ts")  # the release machine: objects and the timestamp
    ci.home.mkdir()
    ci.run("keygen", "--out", ci.home / "keys", "--name", "root")
    ci.run("keygen", "--out", ci.home / "keys", "--name", "ts")
    ci.run("init", "--store", store, "--root-key", ci.home / "keys/root.key",
           *[a for m in holders for a in ("--release-key", m.pub)],
           "--timestamp-key", ci.pub, "--threshold", "release=2")
    draft = tmp_path / "v1.draft"
    out = _json(ci.run("release", moe_family.v1, "--store", store, "--version", "v1",
                       "--draft", draft, "--key", ci.key, "--json"))
    assert out["draft"] == str(draft) and len(out["draft_missing"]) == 2  # record, manifest
    assert not _has(cli, store, MANIFEST_KEY) and not _has(cli, store, release_pointer_key("v1"))

    _one_line_error(ci.run("publish", draft, "--store", store, check=False), 2,
                    "the draft lacks signatures",
                    "0 of 2 signatures from the release keys of trust root v1")
    a = _json(alice.sign(draft))
    assert sorted(x[0] for x in a["added"]) == ["manifest", "record"] and len(a["missing"]) == 2
    _one_line_error(ci.run("publish", draft, "--store", store, check=False), 2,
                    "1 of 2 signatures from the release keys")
    stranger = Machine(cli, tmp_path / "mallory", "mallory")
    stranger.home.mkdir()
    stranger.run("keygen", "--out", stranger.home / "keys", "--name", "mallory")
    _one_line_error(stranger.sign(draft, check=False), 2, "is not a key of any role this "
                    "release draft needs (release, timestamp)")
    root_key = Machine(cli, ci.home, "root")  # a key of a role the draft does not need
    _one_line_error(root_key.sign(draft, check=False), 2, "(root) is not a key of any role")
    c = _json(carol.sign(draft))
    assert c["missing"] == []
    out = _json(ci.run("publish", draft, "--store", store, "--json"))
    assert out["current"] == "v1" and out["written"] == [MANIFEST_KEY, release_pointer_key("v1")]

    # What devices read verifies against the pinned root: 2 of the 3 release keys.
    root = verify_root(_read(cli, store, root_version_key(1)), now=_now())
    ts = verify_manifest(_read(cli, store, MANIFEST_KEY), root, now=_now())
    assert ts.current.version == "v1" and ts.manifest.sequence == 1
    record = verify_record(_read(cli, store, release_pointer_key("v1")), root, "v1", "record")
    assert record.index == ts.current.index
    sigs = {s["keyid"] for s in _timestamp(cli, store)["manifest_signatures"]}
    assert sigs == {json.loads(m.pub.read_text())["keyid"] for m in (alice, carol)}

    # Two drafts made on the same state (v2 and v3), each signed by bob and carol; the
    # weekly refresh runs before either is published.
    drafts = {v: tmp_path / f"{v}.draft" for v in ("v2", "v3")}

    def make_and_sign(version: str, *signers: Machine) -> Path:
        drafts[version].unlink(missing_ok=True)
        model = moe_family.v2 if version == "v2" else moe_family.v3
        ci.run("release", model, "--store", store, "--version", version, "--draft",
               drafts[version], "--key", ci.key)
        for m in signers:
            m.sign(drafts[version])
        return drafts[version]

    d2, d3 = make_and_sign("v2", bob, carol), make_and_sign("v3", bob, carol)
    ci.run("refresh", "--store", store, "--key", ci.key)
    before = _read(cli, store, MANIFEST_KEY)
    for d in (d2, d3):
        _one_line_error(ci.run("publish", d, "--store", store, check=False), 5,
                        "was published since this draft was made", "make the draft again")
    assert _read(cli, store, MANIFEST_KEY) == before
    # v3 made again on the new state publishes; then v2's draft is behind another release.
    out = _json(ci.run("publish", make_and_sign("v3", alice, bob), "--store", store, "--json"))
    assert (out["current"], out["sequence"], out["timestamp_sequence"]) == ("v3", 2, 3)
    after = _read(cli, store, MANIFEST_KEY)
    _one_line_error(ci.run("publish", d2, "--store", store, check=False), 5,
                    "was published since this draft was made")
    assert _read(cli, store, MANIFEST_KEY) == after
    assert not _has(cli, store, release_pointer_key("v2"))
    assert [r["version"] for r in _history(cli, store)["releases"]] == ["v1", "v3"]


# -- root rotation ---------------------------------------------------------------------------


def _root_edit(cli: Cli, store: str, out: Path, *args: object,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    return cli.publish("root", "edit", "--store", store, *args, "--out", out, "--json",
                       check=check)


def _edit_draft(path: Path, **changes: Any) -> None:
    """Change the proposed root in a (still unsigned) root draft, as a hand edit would."""
    d = json.loads(path.read_text())
    (doc,) = d["documents"]
    doc["signed"].update(changes)
    path.write_text(json.dumps(d))


def test_root_rotation_needs_old_and_new_root_keys_and_never_overwrites(
        cli: Cli, dir_store: str, keys: Keys, tmp_path: Path) -> None:
    keys.make("root2")
    _init_roles(cli, dir_store, keys)
    v1 = _read(cli, dir_store, ROOT_KEY)
    draft = tmp_path / "root2.draft"
    out = _json(_root_edit(cli, dir_store, draft, "--add-key", f"root={keys.pub('root2')}",
                           "--remove-key", f"root={keys.pub('root')}"))
    assert out["version"] == 2  # always the next version: no gap can be drafted
    assert out["roles"]["root"] == {"keyids": [keys.keyid("root2")], "threshold": 1}
    twin = tmp_path / "twin.draft"  # a second successor of v1, made at the same time
    shutil.copyfile(draft, twin)

    _one_line_error(cli.publish("root", "publish", draft, "--store", dir_store, check=False),
                    2, "0 of 1 signatures from the root keys of trust root v1")
    new_only, old_only = tmp_path / "new-only.draft", tmp_path / "old-only.draft"
    shutil.copyfile(draft, new_only)
    shutil.copyfile(draft, old_only)
    cli.publish("root", "sign", new_only, "--key", keys.key("root2"))
    cli.publish("root", "sign", old_only, "--key", keys.key("root"))
    _one_line_error(cli.publish("root", "publish", new_only, "--store", dir_store,
                                check=False), 2,
                    "0 of 1 signatures from the root keys of trust root v1")
    _one_line_error(cli.publish("root", "publish", old_only, "--store", dir_store,
                                check=False), 2,
                    "0 of 1 signatures from the root keys of the new trust root v2")
    assert _read(cli, dir_store, ROOT_KEY) == v1 and not _has(cli, dir_store, "roots/2.json")
    # A key of no role in the root draft (the release key) cannot sign it.
    _one_line_error(cli.publish("root", "sign", draft, "--key", keys.key("rel"), check=False),
                    2, "is not a key of any role this root draft needs (root)")

    cli.publish("root", "sign", old_only, "--key", keys.key("root2"))
    out = _json(cli.publish("root", "publish", old_only, "--store", dir_store, "--json"))
    assert out["root_version"] == 2 and out["written"] == ["roots/2.json", "root.json"]
    v2 = _read(cli, dir_store, ROOT_KEY)
    assert v2 == _read(cli, dir_store, root_version_key(2))
    assert _read(cli, dir_store, root_version_key(1)) == v1
    assert verify_successor(v2, verify_root(v1, now=None)).version == 2

    # The same draft again, or another successor of v1: refused, roots/2.json kept.
    for again in (old_only, twin):
        if again == twin:
            cli.publish("root", "sign", twin, "--key", keys.key("root"), "--key",
                        keys.key("root2"))
        _one_line_error(cli.publish("root", "publish", again, "--store", dir_store,
                                    check=False), 5, "trust root changed since the draft",
                        "make the draft again")
        assert _read(cli, dir_store, root_version_key(2)) == v2 == _read(cli, dir_store,
                                                                          ROOT_KEY)


def test_an_interrupted_root_publish_is_completed_by_publishing_again(
        cli: Cli, dir_store: str, keys: Keys, tmp_path: Path) -> None:
    """roots/2.json written, root.json not yet (the publisher died in between): publishing the
    same draft again finishes the job; a different successor is refused (exit 5) and roots/2.json
    is never replaced."""
    keys.make("root2")
    _init_roles(cli, dir_store, keys)
    v1 = _read(cli, dir_store, ROOT_KEY)
    draft, other = tmp_path / "a.draft", tmp_path / "b.draft"
    _root_edit(cli, dir_store, draft, "--add-key", f"root={keys.pub('root2')}")
    _root_edit(cli, dir_store, other, "--expires-days", "30")
    cli.publish("root", "sign", draft, "--key", keys.key("root"), "--key", keys.key("root2"))
    cli.publish("root", "sign", other, "--key", keys.key("root"))
    cli.publish("root", "publish", draft, "--store", dir_store)
    v2 = _read(cli, dir_store, ROOT_KEY)
    (Path(dir_store) / ROOT_KEY).write_bytes(v1)  # as if the last write never happened

    _one_line_error(cli.publish("root", "publish", other, "--store", dir_store, check=False),
                    5, "roots/2.json already exists")
    assert _read(cli, dir_store, root_version_key(2)) == v2
    assert _read(cli, dir_store, ROOT_KEY) == v1
    cli.publish("root", "publish", draft, "--store", dir_store)
    assert _read(cli, dir_store, ROOT_KEY) == v2 == _read(cli, dir_store, root_version_key(2))


def test_root_edit_remove_by_prefix_and_thresholds(cli: Cli, dir_store: str, keys: Keys,
                                                   tmp_path: Path) -> None:
    keys.make("rel2", "rel3")
    cli.publish("init", "--store", dir_store, "--root-key", keys.key("root"),
                *[a for n in ("rel", "rel2", "rel3") for a in ("--release-key", keys.pub(n))],
                "--timestamp-key", keys.pub("ts"), "--threshold", "release=2")
    d = tmp_path / "r.draft"
    prefix = keys.keyid("rel2")[:10]
    out = _json(_root_edit(cli, dir_store, d, "--remove-key", f"release={prefix}",
                           "--threshold", "release=1", "--expires-days", "700"))
    assert out["roles"]["release"] == {
        "keyids": [keys.keyid("rel"), keys.keyid("rel3")], "threshold": 1}
    assert out["roles"]["timestamp"]["keyids"] == [keys.keyid("ts")]
    cli.publish("root", "sign", d, "--key", keys.key("root"))
    cli.publish("root", "publish", d, "--store", dir_store)
    root = Root.from_dict(loads_object(_read(cli, dir_store, ROOT_KEY), "root")["signed"])
    assert root.roles["release"].threshold == 1 and root.version == 2
    assert (root.expires - _now()).days >= 698
    # Raise it again, across the two release keys left.
    out = _json(_root_edit(cli, dir_store, d, "--threshold", "release=2"))
    assert out["version"] == 3 and out["roles"]["release"]["threshold"] == 2


@pytest.mark.parametrize(("args", "code", "needles"), [
    (["--remove-key", "release=0000"], 2, ["--remove-key release=0000", "no such key"]),
    (["--remove-key", "release="], 2, ["expected ROLE=KEYID"]),
    (["--remove-key", "root={k}/root.pub"], 2, ["the root role would have no key",
                                                 "--add-key"]),
    (["--threshold", "release=3"], 2, ["the release threshold 3 must be between 1 and its 1"]),
    (["--threshold", "release=0"], 2, ["--threshold release=0: N must be at least 1"]),
    (["--threshold", "bogus=1"], 2, ["'bogus' is not a role"]),
    (["--add-key", "bogus={k}/rel.pub"], 2, ["'bogus' is not a role"]),
    (["--add-key", "release={k}/nope.pub"], 2, ["nope.pub", "does not exist"]),
], ids=["unknown-id", "empty", "last-root-key", "threshold-above-keys", "threshold-zero",
        "threshold-unknown-role", "add-unknown-role", "add-missing-file"])
def test_root_edit_refusals(cli: Cli, dir_store: str, keys: Keys, tmp_path: Path,
                            args: list[str], code: int, needles: list[str]) -> None:
    _init_roles(cli, dir_store, keys)
    argv = [a.format(k=keys.dir) for a in args]
    d = tmp_path / "r.draft"
    _one_line_error(_root_edit(cli, dir_store, d, *argv, check=False), code, *needles)
    assert not d.exists()


def test_a_hand_edited_root_draft_is_refused(cli: Cli, dir_store: str, keys: Keys,
                                             tmp_path: Path) -> None:
    """A draft changed to skip a version, or one whose root is already expired, is signed by
    the key holders (they sign what they are shown) but never published."""
    _init_roles(cli, dir_store, keys)
    v1 = _read(cli, dir_store, ROOT_KEY)
    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({"version": 3}, ["says it is version 3", "only be followed by the next version"]),
        ({"expires": "2020-01-01T00:00:00Z"}, ["would already be expired", "--expires-days"]),
    ]
    for changes, needles in cases:
        d = tmp_path / "r.draft"
        d.unlink(missing_ok=True)
        _root_edit(cli, dir_store, d)
        _edit_draft(d, **changes)
        cli.publish("root", "sign", d, "--key", keys.key("root"))
        _one_line_error(cli.publish("root", "publish", d, "--store", dir_store, check=False),
                        2, *needles)
        assert _read(cli, dir_store, ROOT_KEY) == v1
        assert not _has(cli, dir_store, "roots/2.json") and not _has(cli, dir_store,
                                                                     "roots/3.json")


# -- after a rotation: old releases, refresh, revert ---------------------------------------------


def test_after_a_release_key_rotation(cli: Cli, dir_store: str, keys: Keys,
                                      moe_family: MoEFamily, tmp_path: Path) -> None:
    """Runbook (a): root edit -> root sign -> root publish -> refresh --content."""
    keys.make("rel2")
    _init_roles(cli, dir_store, keys)
    _release(cli, dir_store, moe_family.v1, "v1", *_keyargs(keys.key("rel"), keys.key("ts")))
    d = tmp_path / "rot.draft"
    _root_edit(cli, dir_store, d, "--add-key", f"release={keys.pub('rel2')}",
               "--remove-key", f"release={keys.pub('rel')}")
    cli.publish("root", "sign", d, "--key", keys.key("root"))  # old and new root key alike
    cli.publish("root", "publish", d, "--store", dir_store)

    h = _history(cli, dir_store)
    assert h["root_version"] == 2 and h["current"] == "v1"
    assert [(r["version"], r["signed_under_root"]) for r in h["releases"]] == [("v1", 1)]
    text = cli.publish("history", "--store", dir_store).stdout
    assert "v1" in text and "(signed under root v1)" in text

    before = _read(cli, dir_store, MANIFEST_KEY)
    _one_line_error(cli.publish("refresh", "--store", dir_store, "--key", keys.key("ts"),
                                check=False), 2, "needs 1 'release' signatures",
                    "must be re-signed with the new release keys")
    _one_line_error(cli.publish("refresh", "--store", dir_store, "--content",
                                *_keyargs(keys.key("ts"), keys.key("rel")), check=False), 2,
                    "rel.key", "not one of the trust root's")
    assert _read(cli, dir_store, MANIFEST_KEY) == before
    out = _json(cli.publish("refresh", "--store", dir_store, "--content", "--json",
                            *_keyargs(keys.key("ts"), keys.key("rel2"))))
    # The content count starts again: devices forget the rotated-out keys' floor.
    assert (out["current"], out["sequence"], out["root_version"]) == ("v1", 1, 2)
    root2 = verify_root(_read(cli, dir_store, ROOT_KEY), now=_now())
    ts = verify_manifest(_read(cli, dir_store, MANIFEST_KEY), root2, now=_now())
    assert ts.root_version == 2 and ts.current.version == "v1"
    # The old release stays usable (revert target, delta base) and says whose keys signed it.
    _release(cli, dir_store, moe_family.v2, "v2", *_keyargs(keys.key("rel2"), keys.key("ts")))
    cli.publish("revert", "--store", dir_store, "--to", "v1",
                *_keyargs(keys.key("rel2"), keys.key("ts")))
    h = _history(cli, dir_store)
    assert [(r["version"], r["signed_under_root"], r["current"]) for r in h["releases"]] == [
        ("v1", 1, True), ("v2", 2, False)]


def test_a_stolen_timestamp_key_is_rotated_out(cli: Cli, dir_store: str, keys: Keys,
                                               moe_family: MoEFamily, tmp_path: Path) -> None:
    """Runbook (c) on the publisher's side: the root keys replace the timestamp key; the old
    one can no longer refresh, the new one can, and the content stays as the release keys
    signed it."""
    keys.make("ts2")
    _init_roles(cli, dir_store, keys)
    _release(cli, dir_store, moe_family.v1, "v1", *_keyargs(keys.key("rel"), keys.key("ts")))
    d = tmp_path / "rot.draft"
    _root_edit(cli, dir_store, d, "--remove-key", f"timestamp={keys.keyid('ts')[:12]}",
               "--add-key", f"timestamp={keys.pub('ts2')}")
    cli.publish("root", "sign", d, "--key", keys.key("root"))
    cli.publish("root", "publish", d, "--store", dir_store)
    _one_line_error(cli.publish("refresh", "--store", dir_store, "--key", keys.key("ts"),
                                check=False), 2, "ts.key", "not one of the trust root's "
                    "'timestamp' keys")
    out = _json(cli.publish("refresh", "--store", dir_store, "--key", keys.key("ts2"),
                            "--json"))
    # The timestamp count starts again (the keys that signed the old one were rotated out:
    # devices forget that floor), the content keeps its sequence and signatures.
    assert (out["sequence"], out["timestamp_sequence"], out["root_version"]) == (1, 1, 2)


def test_root_renewal_without_key_changes(cli: Cli, dir_store: str, keys: Keys,
                                          moe_family: MoEFamily, tmp_path: Path) -> None:
    """Runbook (b): a root about to expire gets a successor with the same keys."""
    _init_roles(cli, dir_store, keys, "--expires-days", "20")
    _release(cli, dir_store, moe_family.v1, "v1", *_keyargs(keys.key("rel"), keys.key("ts")))
    (warning,) = cli.publish("history", "--store", dir_store).stderr.strip().splitlines()
    assert warning.startswith("deltaship-publish: warning: the trust root expires at ")
    assert "`deltaship-publish root edit`" in warning
    d = tmp_path / "renew.draft"
    old = _json(_root_edit(cli, dir_store, d))
    cli.publish("root", "sign", d, "--key", keys.key("root"))
    cli.publish("root", "publish", d, "--store", dir_store)
    cli.publish("refresh", "--store", dir_store, "--key", keys.key("ts"))
    h = _history(cli, dir_store)
    assert h["root_version"] == 2 == old["version"]
    assert h["expires"]["root"]["days_left"] >= 363 and h["expires"]["root"]["warning"] is None
    assert _timestamp(cli, dir_store)["signed"]["root_version"] == 2
    assert cli.publish("history", "--store", dir_store).stderr == ""


# -- history: the three expiries and their warnings -----------------------------------------------


def test_history_shows_three_expiries_and_warns_when_freshness_is_near(
        cli: Cli, dir_store: str, keys: Keys, moe_family: MoEFamily) -> None:
    _init_roles(cli, dir_store, keys)
    h = _history(cli, dir_store)
    assert list(h["expires"]) == ["root"] and h["current"] is None
    _release(cli, dir_store, moe_family.v1, "v1", *_keyargs(keys.key("rel"), keys.key("ts")))
    p = cli.publish("history", "--store", dir_store)
    assert p.stderr == ""
    labels = [x.split(" expires")[0].strip() for x in p.stdout.splitlines() if " expires " in x]
    assert labels == ["trust root", "release content", "freshness"]
    h = _history(cli, dir_store)
    assert {n: e["warning"] for n, e in h["expires"].items()} == {
        "root": None, "content": None, "freshness": None}
    assert 26 <= h["expires"]["freshness"]["days_left"] <= 28

    cli.publish("refresh", "--store", dir_store, "--key", keys.key("ts"), "--timestamp-days",
                "3")
    p = cli.publish("history", "--store", dir_store)
    assert p.returncode == 0
    (warning,) = p.stderr.strip().splitlines()
    assert warning.startswith("deltaship-publish: warning: the freshness expires at ")
    assert "`deltaship-publish refresh`" in warning
    h = _history(cli, dir_store)
    assert h["expires"]["freshness"]["warning"] and h["expires"]["content"]["warning"] is None


# -- the README's runbooks, as written ----------------------------------------------------------


def test_the_readme_keys_and_rotation_commands_run_as_written(
        cli: Cli, bucket: str, tmp_path: Path, moe_family: MoEFamily) -> None:
    """Every shell block of README "Keys and rotation" but the root-only install steps, in
    order, against S3: set-up, weekly refresh, runbooks (a)-(d)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Keys and rotation", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```sh\n")[1:]]
    assert len(blocks) == 6 and "useradd" in blocks[1]
    script = "\n".join(b for b in blocks if "useradd" not in b)
    store = f"s3://{bucket}/llm"
    for i, model in enumerate((moe_family.v1, moe_family.v2, moe_family.v3), 1):
        (cli.cwd / f"checkpoint-v{i}").symlink_to(model)
    env = cli.env(PATH=f"{BIN}:/usr/bin:/bin")
    p = subprocess.run(["bash", "-euo", "pipefail", "-c",
                        script.replace("s3://models/llm", store)],
                       cwd=cli.cwd, env=env, text=True, capture_output=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    h = _history(cli, store)
    assert (h["current"], h["root_version"]) == ("v3", 4)
    assert [(r["version"], r["signed_under_root"]) for r in h["releases"]] == [
        ("v1", 1), ("v2", 4), ("v3", 4)]
