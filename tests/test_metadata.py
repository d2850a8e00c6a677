"""Typed metadata and canonical JSON: unsafe names, malformed fields, round trips, properties."""

from __future__ import annotations

import copy
import dataclasses
import json
import posixpath
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manifest.canonical import canonical_json, loads_object
from manifest.entries import MAX_CONTENT_LENGTH
from manifest.errors import (
    FormatError,
    MixAndMatchError,
    OversizeError,
    SignatureError,
    UnsafeNameError,
)
from manifest.metadata import (
    FileEntry,
    GroupEntry,
    Manifest,
    ObjectRef,
    PatchRef,
    ReleaseIndex,
    ReleasePointer,
    ReleaseRecord,
    Role,
    Root,
    TensorEntry,
    Timestamp,
    check_file_path,
    check_group_name,
    check_version,
)
from manifest.signing import SigningKey
from manifest.trust import sign_document, verify_record

from ._signed_docs import (
    NOW,
    OTHER_REPO_ID,
    REPO_ID,
    Repo,
    file_entry,
    group,
    hexof,
    index_doc,
    key,
    root_doc,
)


def raises(exc: type[Exception], *fragments: str) -> Any:
    return pytest.raises(exc, match=".*".join(re.escape(f) for f in fragments))


# --- path traversal and unsafe names ---------------------------------------------------

UNSAFE_GROUP_NAMES = [
    "../x", "..", ".", "", "a/b", "/abs", "a\\b", "..\\x", "a\x00b", "a\nb", "a\n", "\na",
    "a\r", "a\t", "a b", ".hidden", "-rf", "x..y", "a" * 201, "é", "a:b", "~", "a\u2028",
]


@pytest.mark.parametrize("name", UNSAFE_GROUP_NAMES)
def test_unsafe_group_names(name: str) -> None:
    with raises(UnsafeNameError, f"unsafe group name {name!r}"):
        check_group_name(name)
    entry = group("ok").to_dict()
    entry["name"] = name
    entry["file"] = f"{name}.safetensors"
    doc = {**index_doc().to_dict(), "groups": [entry]}
    with pytest.raises(UnsafeNameError, match=re.escape(f"unsafe group name {name!r}")):
        ReleaseIndex.from_dict(doc)


UNSAFE_FILE_PATHS = [
    "../etc/passwd", "/etc/passwd", "a/../b", "a/..", "a//b", "./a", "a/./b", "a/", "", ".",
    "..", "a\\b", "..\\..\\x", "C:\\x", "a\x00", "a\x00b", "a\nb", "config.json\n", "a/b\n",
    "a\r", "\x7f", "x" * 1025, "a/" + "b" * 256, "//server/share",
]


@pytest.mark.parametrize("path", UNSAFE_FILE_PATHS)
def test_unsafe_file_paths(path: str) -> None:
    with raises(UnsafeNameError, f"unsafe file name {path!r}"):
        check_file_path(path)
    doc = index_doc().to_dict()
    doc["files"][0]["path"] = path
    with raises(UnsafeNameError, f"unsafe file name {path!r}"):
        ReleaseIndex.from_dict(doc)


@pytest.mark.parametrize(
    "path",
    ["config.json", "tokenizer/vocab.txt", "a..b", "...", "a.", ".gitattributes", "x" * 255,
     "dir/" * 10 + "f", "modèle.json"],
)
def test_safe_file_paths(path: str) -> None:
    assert check_file_path(path) == path


@pytest.mark.parametrize(
    ("name", "file", "exc", "message"),
    [
        ("layers.0", "layers.1.safetensors", UnsafeNameError, "group 'layers.0' has file"),
        ("layers.0", "layers.0.bin", UnsafeNameError, "group 'layers.0' has file 'layers.0.bin'"),
        ("layers.0", "sub/layers.0.safetensors", UnsafeNameError, "has file"),
        ("layers.0", "../layers.0.safetensors", UnsafeNameError, "unsafe file name"),
        ("layers.0", "layers.0.safetensors/../x", UnsafeNameError, "unsafe file name"),
        ("layers.0", "/layers.0.safetensors", UnsafeNameError, "unsafe file name"),
    ],
)
def test_group_file_must_be_its_name(
    name: str, file: str, exc: type[Exception], message: str
) -> None:
    entry = {**group(name).to_dict(), "file": file}
    with raises(exc, message):
        GroupEntry.from_dict(entry, "groups[0]")


@pytest.mark.parametrize(
    "version", ["", "../1", "1/2", "1.0\n", "\n1.0", "1 0", ".1", "-1", "1\x00", "v" * 129, 1]
)
def test_unsafe_versions(version: Any) -> None:
    with raises(FormatError, f"version {version!r} is not a valid version"):
        check_version(version)


# --- format: fields of the release index ---------------------------------------------


def _index_edit(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    d = copy.deepcopy(index_doc().to_dict())
    edit(d)
    return d


def _g0(key_: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        d["groups"][0][key_] = value

    return edit


def _top(key_: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        d[key_] = value

    return edit


def _drop(key_: str) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        del d[key_]

    return edit


def _dup(section: str, i: int = 0) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        d[section].append(copy.deepcopy(d[section][i]))

    return edit


def _dup_tensor(d: dict[str, Any]) -> None:
    d["groups"][1]["tensors"].append(copy.deepcopy(d["groups"][0]["tensors"][0]))


def _file_shadows_group(d: dict[str, Any]) -> None:
    d["files"][0]["path"] = d["groups"][0]["file"]


BAD_INDEXES = [
    pytest.param(_dup("groups"), FormatError, "release index lists a group twice", id="dup-group"),
    pytest.param(_dup("files"), FormatError, "release index lists a file twice", id="dup-file"),
    pytest.param(_file_shadows_group, FormatError, "lists a file twice", id="file-shadows-group"),
    pytest.param(_dup_tensor, FormatError, "lists a tensor in two groups", id="dup-tensor"),
    pytest.param(_top("_type", "deltaship.manifest"), FormatError,
                 "release index has _type 'deltaship.manifest', expected 'deltaship.release'",
                 id="wrong-type"),
    pytest.param(_drop("_type"), FormatError, "release index: missing field '_type'",
                 id="no-type"),
    pytest.param(_top("spec_version", 4), FormatError,
                 "release index has spec_version 4; this deltaship understands 3: upgrade",
                 id="spec-version-4"),
    pytest.param(_top("spec_version", 2), FormatError,
                 "release index has spec_version 2, an older format without a timestamp role or "
                 "root chain: re-initialise the store", id="spec-version-2"),
    pytest.param(_top("spec_version", 1), FormatError,
                 "release index has spec_version 1, an older format whose documents do not name "
                 "their repository: re-initialise the store", id="spec-version-1"),
    pytest.param(_drop("repository_id"), FormatError,
                 "release index: missing field 'repository_id'", id="no-repository-id"),
    pytest.param(_top("repository_id", "A" * 32), FormatError,
                 "release index repository_id 'AAAA", id="repository-id-upper"),
    pytest.param(_top("repository_id", "ab" * 32), FormatError,
                 "is not a repository id (32 lowercase hex digits)", id="repository-id-long"),
    pytest.param(_top("spec_version", "1"), FormatError,
                 "release index.spec_version has the wrong type", id="spec-version-string"),
    pytest.param(_drop("groups"), FormatError, "missing field 'groups'", id="no-groups"),
    pytest.param(_top("groups", {}), FormatError, "release index.groups has the wrong type",
                 id="groups-object"),
    pytest.param(_top("version", "1.0/../x"), FormatError, "version '1.0/../x' is not a valid",
                 id="version-path"),
    pytest.param(_top("deltas_from", ["0.9\n"]), FormatError,
                 "deltas_from '0.9\\n' is not a valid version", id="deltas-from-newline"),
    pytest.param(_top("deltas_from", "0.9"), FormatError, "deltas_from must be a list",
                 id="deltas-from-string"),
    pytest.param(_top("released_at", "2026-03-01 12:00:00"), FormatError,
                 "released_at is not a time like", id="time-format"),
    pytest.param(_g0("sha256", hexof("A")), FormatError,
                 "groups[0].sha256 is not a lowercase hex sha256", id="sha-uppercase"),
    pytest.param(_g0("sha256", hexof("a") + "\n"), FormatError,
                 "groups[0].sha256 is not a lowercase hex sha256", id="sha-trailing-newline"),
    pytest.param(_g0("sha256", hexof("a")[:-1]), FormatError,
                 "groups[0].sha256 is not a lowercase hex sha256", id="sha-short"),
    pytest.param(_g0("length", -1), FormatError, "groups[0].length must not be negative",
                 id="negative-length"),
    pytest.param(_g0("length", True), FormatError, "groups[0].length has the wrong type",
                 id="bool-length"),
    pytest.param(_g0("length", "10"), FormatError, "groups[0].length has the wrong type",
                 id="string-length"),
    pytest.param(_g0("full", {"sha256": hexof("a"), "length": 1, "encoding": "gzip"}),
                 FormatError, "groups[0].full.encoding 'gzip' is unknown", id="unknown-encoding"),
    pytest.param(_g0("tensors", [{"name": "t", "dtype": "F32", "shape": [-1]}]), FormatError,
                 "groups[0].tensors[0].shape must be a list of non-negative integers",
                 id="negative-shape"),
    pytest.param(_g0("tensors", [{"name": "t", "dtype": "F32", "shape": [True]}]), FormatError,
                 "shape must be a list of non-negative integers", id="bool-shape"),
    pytest.param(_g0("patches", [{"base_version": "../0", "base_sha256": hexof("a"),
                                  "object": {"sha256": hexof("a"), "length": 1,
                                             "encoding": "dspatch"}}]),
                 FormatError, "groups[0].patches[0].base_version '../0' is not a valid version",
                 id="patch-base-version"),
    pytest.param(_g0("patches", {}), FormatError, "groups[0].patches must be a list",
                 id="patches-object"),
    pytest.param(_top("groups", ["x"]), FormatError, "groups[0] must be a JSON object",
                 id="group-not-object"),
]


@pytest.mark.parametrize(("edit", "exc", "message"), BAD_INDEXES)
def test_malformed_release_index(
    edit: Callable[[dict[str, Any]], None], exc: type[Exception], message: str
) -> None:
    with raises(exc, message):
        ReleaseIndex.from_dict(_index_edit(edit))


def test_index_accessors() -> None:
    index = index_doc()
    assert index.group("layers.1") == index.groups[1]
    assert index.group("missing") is None
    assert index.total_size == sum(g.length for g in index.groups)


# --- format: manifest and pointer --------------------------------------------------------


def _manifest_dict() -> dict[str, Any]:
    repo = Repo()
    return repo.manifest_doc(repo.publish()[2]).to_dict()


BAD_MANIFESTS = [
    pytest.param("_type", "deltaship.root",
                 "manifest has _type 'deltaship.root', expected 'deltaship.manifest'", id="type"),
    pytest.param("spec_version", 0, "manifest has spec_version 0", id="spec-version"),
    pytest.param("sequence", -1, "manifest.sequence must not be negative", id="sequence<0"),
    pytest.param("sequence", "5", "manifest.sequence has the wrong type", id="sequence-str"),
    pytest.param("sequence", False, "manifest.sequence has the wrong type", id="sequence-bool"),
    pytest.param("expires", 1767225600, "manifest.expires has the wrong type", id="epoch"),
    pytest.param("expires", "2026-02-30T00:00:00Z", "manifest expires is not a time like",
                 id="feb-30"),
    pytest.param("action", "delete",
                 "manifest.action 'delete' is not one of release, revert, promote, rollout",
                 id="unknown-action"),
    pytest.param("action", ["revert"], "manifest.action ['revert'] is not", id="action-list"),
    pytest.param("current", {"version": "1.0", "index": {"sha256": hexof("a")}},
                 "manifest.current.index: missing field 'length'", id="pointer-no-length"),
    pytest.param("current", {"version": "1.0\n", "index": {"sha256": hexof("a"), "length": 1}},
                 "manifest.current.version '1.0\\n' is not a valid version", id="pointer-version"),
    pytest.param("current", {"version": "1.0", "index": {"sha256": "00", "length": 1}},
                 "manifest.current.index.sha256 is not a lowercase hex sha256", id="pointer-sha"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_MANIFESTS)
def test_malformed_manifest(field: str, value: Any, message: str) -> None:
    d = {**_manifest_dict(), field: value}
    with raises(FormatError, message):
        Manifest.from_dict(d)


@pytest.mark.parametrize("field", ["_type", "spec_version", "sequence", "expires", "current"])
def test_manifest_missing_field(field: str) -> None:
    d = _manifest_dict()
    del d[field]
    with raises(FormatError, f"manifest: missing field {field!r}"):
        Manifest.from_dict(d)


def test_manifest_defaults_and_revert() -> None:
    d = _manifest_dict()
    del d["action"]
    assert Manifest.from_dict(d).action == "release"
    assert Manifest.from_dict({**d, "action": "revert"}).action == "revert"


def _timestamp_dict() -> dict[str, Any]:
    return Timestamp(7, NOW + timedelta(days=7), 2, Manifest.from_dict(_manifest_dict()),
                     repository_id=REPO_ID).to_dict()


BAD_TIMESTAMPS = [
    pytest.param("_type", "deltaship.manifest",
                 "timestamp has _type 'deltaship.manifest', expected 'deltaship.timestamp'",
                 id="type"),
    pytest.param("sequence", -1, "timestamp.sequence must not be negative", id="sequence<0"),
    pytest.param("sequence", True, "timestamp.sequence has the wrong type", id="sequence-bool"),
    pytest.param("root_version", 0, "timestamp.root_version must be at least 1", id="root-v0"),
    pytest.param("root_version", "2", "timestamp.root_version has the wrong type",
                 id="root-version-string"),
    pytest.param("expires", "soon", "timestamp expires is not a time like", id="expires"),
    pytest.param("manifest", "m", "timestamp.manifest has the wrong type", id="manifest-str"),
    pytest.param("manifest", {"_type": "deltaship.root"}, "manifest has _type 'deltaship.root'",
                 id="manifest-of-another-type"),
    pytest.param("repository_id", "x", "timestamp repository_id 'x' is not a repository id",
                 id="repository-id"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_TIMESTAMPS)
def test_malformed_timestamp(field: str, value: Any, message: str) -> None:
    with raises(FormatError, message):
        Timestamp.from_dict({**_timestamp_dict(), field: value})


@pytest.mark.parametrize("field", ["_type", "spec_version", "repository_id", "sequence",
                                   "expires", "root_version", "manifest"])
def test_timestamp_missing_field(field: str) -> None:
    d = _timestamp_dict()
    del d[field]
    with raises(FormatError, f"timestamp: missing field {field!r}"):
        Timestamp.from_dict(d)


def test_timestamp_wire_form_embeds_the_manifest() -> None:
    d = _timestamp_dict()
    assert d == {"_type": "deltaship.timestamp", "spec_version": 3, "repository_id": REPO_ID,
                 "sequence": 7, "expires": "2026-03-08T12:00:00Z", "root_version": 2,
                 "manifest": _manifest_dict()}
    ts = Timestamp.from_dict(d)
    assert ts.current == ts.manifest.current and ts.to_dict() == d


def test_nothing_parses_as_a_document_of_another_type() -> None:
    docs: dict[Any, dict[str, Any]] = {
        Root: root_doc([key(1)]).to_dict(),
        Manifest: _manifest_dict(),
        Timestamp: _timestamp_dict(),
        ReleaseIndex: index_doc().to_dict(),
        ReleaseRecord: _record_dict(),
    }
    for cls, d in docs.items():
        assert cls.from_dict(d).to_dict() == d
        for other in docs:
            if other is not cls:
                with raises(FormatError, f"has _type {d['_type']!r}, expected {other.TYPE!r}"):
                    other.from_dict(d)


# --- format: release record (releases/<version>.json) -----------------------------------


def _record() -> ReleaseRecord:
    return ReleaseRecord("v4", 4, NOW, ObjectRef(hexof("a"), 91234, "json"),
                         repository_id=REPO_ID)


def _record_dict() -> dict[str, Any]:
    return _record().to_dict()


def test_record_wire_form_is_format_section_9() -> None:
    """A release record is signed by the release role, for the version its key names."""
    record = _record()
    assert record.to_dict() == {
        "_type": "deltaship.release-record", "spec_version": 3, "repository_id": REPO_ID,
        "version": "v4", "sequence": 4, "released_at": "2026-03-01T12:00:00Z",
        "index": {"sha256": hexof("a"), "length": 91234},
    }
    repo = Repo()
    data = sign_document(record.to_dict(), repo.release_keys)
    assert verify_record(data, repo.root, "v4", "releases/v4.json") == record
    assert record.pointer == ReleasePointer("v4", record.index)
    with raises(MixAndMatchError, "releases/v5.json is signed for version 'v4'"):
        verify_record(data, repo.root, "v5", "releases/v5.json")
    with raises(SignatureError, "releases/v4.json has 0 valid signature(s) of 1",
                "'release' keys"):
        verify_record(sign_document(record.to_dict(), repo.root_keys), repo.root, "v4",
                      "releases/v4.json")
    other = dataclasses.replace(record, repository_id=OTHER_REPO_ID)
    with raises(MixAndMatchError, f"releases/v4.json belongs to repository {OTHER_REPO_ID}"):
        verify_record(sign_document(other.to_dict(), repo.release_keys), repo.root, "v4",
                      "releases/v4.json")


BAD_RECORDS = [
    pytest.param("_type", "deltaship.manifest",
                 "r.json has _type 'deltaship.manifest', expected 'deltaship.release-record'",
                 id="type"),
    pytest.param("spec_version", 4, "r.json has spec_version 4; this deltaship understands 3",
                 id="newer-spec-version"),
    pytest.param("spec_version", 1, "r.json has spec_version 1, an older format",
                 id="older-spec-version"),
    pytest.param("spec_version", 2, "r.json has spec_version 2, an older format without a "
                 "timestamp role", id="format-v2"),
    pytest.param("repository_id", 5, "r.json.repository_id has the wrong type",
                 id="repository-id"),
    pytest.param("spec_version", "1", "r.json.spec_version has the wrong type",
                 id="spec-version-string"),
    pytest.param("version", "../v4", "r.json.version '../v4' is not a valid version",
                 id="version-path"),
    pytest.param("sequence", -1, "r.json.sequence must not be negative", id="sequence<0"),
    pytest.param("sequence", True, "r.json.sequence has the wrong type", id="sequence-bool"),
    pytest.param("released_at", "2026-03-01", "r.json released_at is not a time like",
                 id="time"),
    pytest.param("index", {"sha256": hexof("a")}, "r.json.index: missing field 'length'",
                 id="index-no-length"),
    pytest.param("index", {"sha256": "A" * 64, "length": 1},
                 "r.json.index.sha256 is not a lowercase hex sha256", id="index-sha"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_RECORDS)
def test_malformed_record(field: str, value: Any, message: str) -> None:
    with raises(FormatError, message):
        ReleaseRecord.from_dict({**_record_dict(), field: value}, "r.json")


@pytest.mark.parametrize(
    "field",
    ["_type", "spec_version", "repository_id", "version", "sequence", "released_at", "index"],
)
def test_record_missing_field(field: str) -> None:
    d = _record_dict()
    del d[field]
    with raises(FormatError, f"r.json: missing field {field!r}"):
        ReleaseRecord.from_dict(d, "r.json")


def test_record_size_cap_and_bad_json() -> None:
    repo = Repo()
    padded = {**_record_dict(), "x_pad": "x" * ReleaseRecord.MAX_SIZE}
    with raises(OversizeError, "r.json is", "over its 65536-byte cap"):
        verify_record(sign_document(padded, repo.release_keys), repo.root, "v4", "r.json")
    with raises(FormatError, "r.json is not valid UTF-8 JSON"):
        verify_record(b"{", repo.root, "v4", "r.json")


def test_index_references_keep_unknown_fields() -> None:
    """The index reference of a manifest or a release pointer is an object reference too."""
    d = _record_dict()
    d["index"]["x_mirror"] = "eu"
    assert ReleaseRecord.from_dict(d).to_dict() == d
    m = _manifest_dict()
    m["current"]["index"]["x_mirror"] = "eu"
    assert Manifest.from_dict(m).to_dict() == m


# --- canonical JSON ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "x is not valid UTF-8 JSON"),
        (b"{", "x is not valid UTF-8 JSON"),
        (b'{"a": NaN}', "NaN is not valid JSON"),
        (b'{"a": [Infinity]}', "Infinity is not valid JSON"),
        (b'{"a": -Infinity}', "-Infinity is not valid JSON"),
        (b"\xc3\x28", "x is not valid UTF-8 JSON"),
        (b"[1]", "x is not a JSON object"),
        (b"1", "x is not a JSON object"),
        (b'{"a": 1' + b"0" * 5000 + b"}", "x is not valid UTF-8 JSON"),
        (b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}", "x is nested too deeply"),
        (b'{"a":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001, "x is nested too deeply"),
        (b'{"a":1,"a":1}', "the key 'a' appears twice in one object"),
        (b'{"a":[{"b":1,"c":2,"b":2}]}', "the key 'b' appears twice in one object"),
    ],
)
def test_loads_object_rejects(data: bytes, message: str) -> None:
    with raises(FormatError, message):
        loads_object(data, "x")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"a": 1.0}, "$.a: floats are not allowed in signed documents"),
        ({"a": [1, {"b": 0.5}]}, "$.a[1].b: floats are not allowed"),
        ({"a": float("nan")}, "$.a: floats are not allowed"),
        ({"a": float("inf")}, "$.a: floats are not allowed"),
        ({"a": (1, 2.5)}, "$.a[1]: floats are not allowed"),
        ({1: "a"}, "$: object keys must be strings"),
        ({"a": "\udfff"}, "not valid Unicode (lone surrogate"),
        ({"\ud800": 1}, "not valid Unicode (lone surrogate"),
    ],
)
def test_canonical_json_rejects(value: Any, message: str) -> None:
    with raises(FormatError, message):
        canonical_json(value)


def test_canonical_json_exact_bytes() -> None:
    value = {"b": [1, True, None, "é\n\"\\"], "a": {"z": -0, "é": 10**30, "A": "\u2028"}}
    assert canonical_json(value) == (
        '{"a":{"A":"\u2028","z":0,"é":1000000000000000000000000000000},'
        '"b":[1,true,null,"é\\n\\"\\\\"]}'
    ).encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _reordered(value: Any, rnd: Any) -> Any:
    """The same JSON value with every object's keys inserted in a shuffled order."""
    if isinstance(value, dict):
        keys = list(value)
        rnd.shuffle(keys)
        return {k: _reordered(value[k], rnd) for k in keys}
    if isinstance(value, list):
        return [_reordered(v, rnd) for v in value]
    return value


@settings(max_examples=150, deadline=None)
@given(value=st.dictionaries(st.text(), json_values, max_size=6), rnd=st.randoms())
def test_canonical_json_is_deterministic_and_order_independent(value: Any, rnd: Any) -> None:
    data = canonical_json(value)
    assert canonical_json(value) == data
    assert canonical_json(_reordered(value, rnd)) == data
    assert loads_object(data, "x") == value
    assert canonical_json(loads_object(data, "x")) == data
    # No insignificant whitespace: re-serialising with the standard library changes nothing.
    assert json.dumps(json.loads(data), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode() == data


@settings(max_examples=100, deadline=None)
@given(value=json_values, where=st.integers(0, 3))
def test_canonical_json_rejects_any_float(value: Any, where: int) -> None:
    wrapped: Any = [value, 0.5] if where == 0 else {"k": [value, {"f": -1.25}]}
    with pytest.raises(FormatError, match="floats are not allowed"):
        canonical_json(wrapped)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40) | st.text(alphabet="./\\a\x00\n", max_size=12))
def test_accepted_paths_cannot_escape(path: str) -> None:
    try:
        check_file_path(path)
    except UnsafeNameError as e:
        assert repr(path) in str(e)
        return
    assert not path.startswith("/") and "\\" not in path
    assert posixpath.normpath(path) == path
    assert ".." not in path.split("/")
    assert not any(ord(c) < 0x20 or c == "\x7f" for c in path)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30) | st.text(alphabet="./\\a-_\n", max_size=8))
def test_accepted_group_names_are_plain_file_names(name: str) -> None:
    try:
        check_group_name(name)
    except UnsafeNameError:
        return
    assert check_file_path(f"{name}.safetensors") == f"{name}.safetensors"
    assert "/" not in name and ".." not in name and not name.startswith(".")
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", name)


# --- round trips: from_dict(to_dict(x)) == x -----------------------------------------

hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
count = st.integers(0, MAX_CONTENT_LENGTH)
repository_ids = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)
versions = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,20}", fullmatch=True)
group_names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,20}", fullmatch=True)
path_parts = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_. -]{0,12}", fullmatch=True)
times = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
).map(lambda t: t.replace(microsecond=0))
unknown = st.dictionaries(
    st.from_regex(r"x_[a-z]{1,8}", fullmatch=True), json_values, max_size=3
)

object_refs = st.builds(ObjectRef, hex64, count, st.sampled_from(["dspatch", "zstd"]))
patch_refs = st.builds(PatchRef, versions, hex64, object_refs)
tensors = st.builds(
    TensorEntry, st.text(max_size=30), st.sampled_from(["BF16", "F32", "F8_E4M3"]),
    st.lists(st.integers(0, 2**40), max_size=4).map(tuple),
)


@st.composite
def group_entries(draw: Any, name: str | None = None) -> GroupEntry:
    name = name or draw(group_names)
    return GroupEntry(
        name, f"{name}.safetensors", draw(hex64), draw(count),
        tuple(draw(st.lists(tensors, max_size=3, unique_by=lambda t: t.name))),
        draw(object_refs), tuple(draw(st.lists(patch_refs, max_size=3))),
    )


file_paths = st.lists(path_parts, min_size=1, max_size=3).map("/".join)
file_entries = st.builds(FileEntry, file_paths, hex64, count, object_refs)


@st.composite
def release_indexes(draw: Any) -> ReleaseIndex:
    names = draw(st.lists(group_names, max_size=4, unique=True))
    groups = [draw(group_entries(n)) for n in names]
    seen: set[str] = set()
    unique_groups = []
    for g in groups:  # tensor names are unique across the index
        ts = tuple(t for t in g.tensors if t.name not in seen)
        seen.update(t.name for t in ts)
        unique_groups.append(GroupEntry(g.name, g.file, g.sha256, g.length, ts, g.full, g.patches))
    taken = {g.file for g in unique_groups}
    files = [f for f in draw(st.lists(file_entries, max_size=4, unique_by=lambda f: f.path))
             if f.path not in taken and f.path != "model.safetensors.index.json"]
    paths = taken | {f.path for f in files}
    files = [f for f in files if not any(
        p.startswith(f.path + "/") or f.path.startswith(p + "/") for p in paths)]
    return ReleaseIndex(
        draw(versions), draw(times), tuple(unique_groups), tuple(files),
        tuple(draw(st.lists(versions, max_size=3))), draw(unknown),
        repository_id=draw(repository_ids),
    )


pointers = st.builds(
    ReleasePointer, versions,
    st.builds(ObjectRef, hex64, count, st.just("json")),
)
manifests = st.builds(
    Manifest, count, times, times, pointers, st.sampled_from(["release", "revert"]), unknown,
    repository_id=repository_ids,
)
records = st.builds(
    ReleaseRecord, versions, count, times, st.builds(ObjectRef, hex64, count, st.just("json")),
    unknown, repository_id=repository_ids,
)
timestamps = st.builds(
    Timestamp, count, times, st.integers(1, 2**40), manifests, unknown,
    repository_id=repository_ids,
)


@st.composite
def roots(draw: Any) -> Root:
    seeds = draw(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=4,
                          unique=True))
    signing = [SigningKey(s, draw(st.text(max_size=8))) for s in seeds]
    keys = {k.keyid: k.public_key for k in signing}
    ids = list(keys)
    roles = {}
    for name in (*Root.ROLES, *draw(st.lists(group_names, max_size=2))):
        chosen = draw(st.lists(st.sampled_from(ids), min_size=1, unique=True))
        roles[name] = Role(tuple(chosen), draw(st.integers(1, len(chosen))))
    return Root(draw(count), draw(times), keys, roles, draw(unknown),
                repository_id=draw(repository_ids))


@pytest.mark.parametrize(
    ("strategy", "parse"),
    [
        pytest.param(object_refs, lambda d: ObjectRef.from_dict(d, "o"), id="ObjectRef"),
        pytest.param(patch_refs, lambda d: PatchRef.from_dict(d, "p"), id="PatchRef"),
        pytest.param(tensors, lambda d: TensorEntry.from_dict(d, "t"), id="TensorEntry"),
        pytest.param(group_entries(), lambda d: GroupEntry.from_dict(d, "g"), id="GroupEntry"),
        pytest.param(file_entries, lambda d: FileEntry.from_dict(d, "f"), id="FileEntry"),
        pytest.param(pointers, lambda d: ReleasePointer.from_dict(d, "c"), id="ReleasePointer"),
        pytest.param(release_indexes(), ReleaseIndex.from_dict, id="ReleaseIndex"),
        pytest.param(manifests, Manifest.from_dict, id="Manifest"),
        pytest.param(timestamps, Timestamp.from_dict, id="Timestamp"),
        pytest.param(records, ReleaseRecord.from_dict, id="ReleaseRecord"),
        pytest.param(roots(), Root.from_dict, id="Root"),
    ],
)
def test_round_trip(strategy: Any, parse: Callable[[Any], Any]) -> None:
    @settings(max_examples=60, deadline=None)
    @given(strategy)
    def check(x: Any) -> None:
        d = x.to_dict()
        wire = canonical_json(d)  # every document is signable: no floats, str keys
        assert parse(loads_object(wire, "doc")) == x
        assert parse(d).to_dict() == d

    check()


def test_unknown_fields_round_trip_at_top_level() -> None:
    extra = {"x_future": {"nested": [1, "two", None]}, "z": True}
    for cls, d in (
        (Root, root_doc([key(1)]).to_dict()),
        (Manifest, _manifest_dict()),
        (Timestamp, _timestamp_dict()),
        (ReleaseIndex, index_doc().to_dict()),
        (ReleaseRecord, _record_dict()),
    ):
        parsed = cls.from_dict({**d, **extra})
        assert dict(parsed.unrecognized) == extra
        assert parsed.to_dict() == {**d, **extra}


def test_known_fields_win_over_unrecognized_on_output() -> None:
    """``unrecognized`` cannot smuggle a second value for a known field into to_dict."""
    m = Manifest.from_dict(_manifest_dict())
    forged = Manifest(m.sequence, m.expires, m.published_at, m.current, m.action,
                      {"sequence": 10**6, "_type": "deltaship.root",
                       "repository_id": OTHER_REPO_ID}, repository_id=m.repository_id)
    assert forged.to_dict()["sequence"] == m.sequence
    assert forged.to_dict()["_type"] == "deltaship.manifest"


def test_times_are_utc_seconds() -> None:
    m = Manifest.from_dict(_manifest_dict())
    assert m.expires == NOW + timedelta(days=30) and m.expires.tzinfo is UTC
    assert file_entry("a").to_dict()["path"] == "a"


def test_index_may_not_ship_the_weight_index_or_clash_files_with_folders() -> None:
    """Devices write model.safetensors.index.json; a file cannot also be a folder."""
    from manifest.errors import UnsafeNameError as _Unsafe
    from manifest.metadata import ReleaseIndex as _Index

    def index_with(paths: list[str]) -> dict[str, object]:
        obj = {"sha256": "a" * 64, "length": 1, "encoding": "zstd"}
        return {"_type": "deltaship.release", "spec_version": 3, "version": "v1",
                "repository_id": REPO_ID,
                "released_at": "2026-01-01T00:00:00Z", "groups": [],
                "files": [{"path": p, "sha256": "b" * 64, "length": 1, "object": obj}
                          for p in paths]}

    _Index.from_dict(index_with(["a/b", "a/c", "ab"]))
    for bad in (["model.safetensors.index.json"], ["a", "a/b"], ["x/y", "x/y/z"]):
        with pytest.raises(_Unsafe):
            _Index.from_dict(index_with(bad))


def test_unknown_fields_round_trip_in_nested_entries() -> None:
    """A newer publisher may add fields to groups, tensors, patches, files and object
    references: an older reader keeps them, and writes them back unchanged."""
    d = index_doc().to_dict()
    g = d["groups"][0]
    g["x_group"] = {"experts": [1, 2]}
    g["tensors"][0]["x_quant"] = "nf4"
    g["full"]["x_mirrors"] = ["https://cdn.example/a"]
    for p in g["patches"]:
        p["x_codec_hint"] = 3
        p["object"]["x_region"] = "eu"
    for f in d["files"]:
        f["x_mode"] = "0644"
        f["object"]["x_region"] = "us"
    parsed = ReleaseIndex.from_dict(d)
    assert parsed.to_dict() == d
    assert dict(parsed.groups[0].full.unrecognized) == {"x_mirrors": ["https://cdn.example/a"]}
    assert parsed.groups[0].tensors[0].unrecognized == {"x_quant": "nf4"}
    # Known fields still win, and unknown ones do not change what an entry equals.
    forged = dataclasses.replace(parsed.groups[0].full, unrecognized={"sha256": "0" * 64})
    assert forged.to_dict()["sha256"] == parsed.groups[0].full.sha256
    assert forged == parsed.groups[0].full
