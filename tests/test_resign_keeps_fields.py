"""Re-signing (found in review): what the publisher re-signs keeps the fields it did not write
(docs/FORMAT.md §2: readers keep unknown fields "at the top level and in every nested entry ...
written back unchanged"), through the real ``deltaship-publish`` processes.

* ``refresh`` (the timestamp key only) keeps the manifest and its ``release`` signatures: it must
  carry the manifest exactly as the release keys signed it, also one written by an older
  publisher (no ``channel``, §5.2: absent means ``stable``) or a newer one (fields this version
  does not know). Re-serialising the parsed manifest changed its bytes, so the kept signatures no
  longer verified and the refresh was refused: a timestamp key on a timer could not keep such a
  store fresh (devices freeze after 28 days).
* ``root edit`` drafts the successor from the newest root: unknown fields of its key entries and
  roles (a newer publisher's) must survive into the new version.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from manifest.canonical import canonical_json, loads_object
from manifest.constants import MANIFEST_KEY, ROOT_KEY, root_version_key
from manifest.trust import manifest_wire, sign_document, verify_manifest, verify_root
from publisher.keys import load_signing_key

from .conftest import Cli, MoEFamily
from .test_publish_trust import (
    HomeCli,
    Keys,
    _init_roles,
    _json,
    _keyargs,
    _now,
    _read,
    _release,
    _root_edit,
    _timestamp,
)


@pytest.fixture
def cli(s3_endpoint: str, tmp_path: Path) -> Cli:
    (tmp_path / "home").mkdir()
    return HomeCli(s3_endpoint, tmp_path, tmp_path / "home")


@pytest.fixture
def keys(cli: Cli, tmp_path: Path) -> Keys:
    return Keys(cli, tmp_path / "keys").make("root", "rel", "ts")


@pytest.fixture
def dir_store(tmp_path: Path) -> str:
    d = tmp_path / "store"
    d.mkdir()
    return str(d)


def _write(store: str, key: str, data: bytes) -> None:
    (Path(store) / key).write_bytes(data)


def _resign_manifest(store: str, keys: Keys, edit: Any) -> dict[str, Any]:
    """Rewrite the store's manifest.json as another publisher would have signed it: ``edit``
    changes the manifest inside, then both documents are signed again with the test's keys."""
    doc = loads_object((Path(store) / MANIFEST_KEY).read_bytes(), "manifest")
    signed = doc["signed"]
    edit(signed["manifest"])
    rel = load_signing_key(keys.key("rel"))
    ts = load_signing_key(keys.key("ts"))
    _write(store, MANIFEST_KEY, manifest_wire(signed, [ts.sign(signed)],
                                              [rel.sign(signed["manifest"])]))
    return signed["manifest"]  # type: ignore[no-any-return]


def _older_and_newer(m: dict[str, Any]) -> None:
    del m["channel"]  # an older publisher (before channels) did not write it
    m["note"] = "from a newer publisher"  # nor does this version know this
    m["current"]["note"] = {"nested": [1, 2]}


def test_refresh_keeps_the_release_signed_manifest_byte_for_byte(
        cli: Cli, dir_store: str, keys: Keys, moe_family: MoEFamily) -> None:
    _init_roles(cli, dir_store, keys)
    _release(cli, dir_store, moe_family.v1, "v1", *_keyargs(keys.key("rel"), keys.key("ts")))
    inner = _resign_manifest(dir_store, keys, _older_and_newer)
    before = _timestamp(cli, dir_store)
    root = verify_root(_read(cli, dir_store, ROOT_KEY), now=_now())
    verify_manifest(_read(cli, dir_store, MANIFEST_KEY), root, now=_now())  # devices take it

    p = cli.publish("refresh", "--store", dir_store, "--key", keys.key("ts"), "--json",
                    check=False)
    assert p.returncode == 0, p.stderr
    after = _timestamp(cli, dir_store)
    assert after["signed"]["sequence"] == before["signed"]["sequence"] + 1
    assert canonical_json(after["signed"]["manifest"]) == canonical_json(inner)
    assert after["manifest_signatures"] == before["manifest_signatures"]
    ts = verify_manifest(_read(cli, dir_store, MANIFEST_KEY), root, now=_now(),
                         min_timestamp=after["signed"]["sequence"])
    assert ts.current.version == "v1" and ts.manifest.unrecognized["note"]


def test_refresh_through_a_draft_keeps_the_manifest_too(
        cli: Cli, dir_store: str, keys: Keys, moe_family: MoEFamily, tmp_path: Path) -> None:
    _init_roles(cli, dir_store, keys)
    _release(cli, dir_store, moe_family.v1, "v1", *_keyargs(keys.key("rel"), keys.key("ts")))
    inner = _resign_manifest(dir_store, keys, _older_and_newer)
    draft = tmp_path / "refresh.draft"
    out = _json(cli.publish("refresh", "--store", dir_store, "--draft", draft, "--json"))
    assert out["missing"] == [
        "timestamp (manifest.json): 0 of 1 signatures from the timestamp keys of trust root v1"]
    cli.publish("sign", draft, "--key", keys.key("ts"))
    p = cli.publish("publish", draft, "--store", dir_store, "--json", check=False)
    assert p.returncode == 0, p.stderr
    assert canonical_json(_timestamp(cli, dir_store)["signed"]["manifest"]) == \
        canonical_json(inner)


def test_root_edit_keeps_unknown_fields_of_keys_and_roles(
        cli: Cli, dir_store: str, keys: Keys, tmp_path: Path) -> None:
    keys.make("rel2")
    _init_roles(cli, dir_store, keys)
    # Root v1 as a newer publisher wrote it: fields in a key entry and in a role.
    v1 = loads_object(_read(cli, dir_store, ROOT_KEY), "root")["signed"]
    rel_id, ts_id = keys.keyid("rel"), keys.keyid("ts")
    v1["keys"][rel_id]["hsm"] = {"slot": 3}
    v1["roles"]["release"]["note"] = "two people"
    v1["roles"]["mirrors"] = {"keyids": [ts_id], "threshold": 1, "extra": True}
    data = sign_document(v1, [load_signing_key(keys.key("root"))])
    for key in (ROOT_KEY, root_version_key(1)):
        _write(dir_store, key, data)

    d = tmp_path / "r.draft"
    _root_edit(cli, dir_store, d, "--add-key", f"release={keys.pub('rel2')}")
    new = json.loads(d.read_text())["documents"][0]["signed"]
    assert new["version"] == 2
    assert new["keys"][rel_id]["hsm"] == {"slot": 3}
    assert new["roles"]["release"]["note"] == "two people"
    assert new["roles"]["release"]["keyids"] == [rel_id, keys.keyid("rel2")]
    assert new["roles"]["mirrors"] == {"keyids": [ts_id], "threshold": 1, "extra": True}
    cli.publish("root", "sign", d, "--key", keys.key("root"))
    cli.publish("root", "publish", d, "--store", dir_store)
    v2 = loads_object(_read(cli, dir_store, ROOT_KEY), "root")["signed"]
    assert v2["keys"][rel_id]["hsm"] == {"slot": 3}


def test_a_draft_cannot_assign_a_document_to_another_role(
        cli: Cli, dir_store: str, keys: Keys, moe_family: MoEFamily, tmp_path: Path) -> None:
    """A release record is signed by the ``release`` role (FORMAT §9, §14): a draft whose
    record says ``role: timestamp`` (edited on its way between machines) would let the online
    timestamp key alone sign the record that `revert` and `history` later trust."""
    _init_roles(cli, dir_store, keys)
    draft = tmp_path / "v1.draft"
    _release(cli, dir_store, moe_family.v1, "v1", "--draft", draft)
    d = json.loads(draft.read_text())
    for doc in d["documents"]:
        if doc["name"] == "record":
            doc["role"] = "timestamp"
    draft.write_text(json.dumps(d))
    for cmd in (["sign", draft, "--key", keys.key("ts")],
                ["publish", draft, "--store", dir_store]):
        p = cli.publish(*cmd, check=False)
        assert p.returncode == 2, (p.returncode, p.stderr)
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
        assert "record" in p.stderr and "'release'" in p.stderr, p.stderr
    assert not (Path(dir_store) / MANIFEST_KEY).exists()
