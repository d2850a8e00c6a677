"""The release index shipped packed (docs/FORMAT.md §5.3): the codec, the pointer fields, the
publisher's forms, and real agents that download a delta, fall back to the zstd form, and
refuse a wrong delta."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.layout import DeviceLayout
from manifest.entries import IndexDelta, IndexPacking, ObjectRef, PackedIndex, index_dict, index_ref
from manifest.errors import FormatError, HashMismatchError, LocalError, OversizeError
from manifest.index_packing import pack_delta, pack_index, pack_zstd, unpack_index

from ._attack_helpers import (
    Device,
    Published,
    forge_manifest,
    manifest_of,
    publish,
    put_object,
    refused,
    tool,
    untouched,
)
from ._served_store import ServedStore
from .conftest import MoEFamily


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pin(data: bytes) -> ObjectRef:
    return ObjectRef(sha(data), len(data), "json")


BASE = json.dumps({"groups": [{"name": f"g{i}", "sha256": sha(b"%d" % i)} for i in range(50)]},
                  separators=(",", ":")).encode()
NEW = BASE.replace(sha(b"7").encode(), sha(b"seven").encode())

# -- the codec -----------------------------------------------------------------------------


def test_round_trip_and_sizes() -> None:
    forms = pack_index(NEW, [BASE])
    assert forms.packing.zstd is not None and len(forms.packing.deltas) == 1
    delta = forms.packing.deltas[0]
    assert delta.base == sha(BASE) and delta.length < forms.packing.zstd.length < len(NEW)
    z = forms.objects[forms.packing.zstd.sha256]
    assert unpack_index(z, forms.packing.zstd, pin(NEW)) == NEW
    assert unpack_index(forms.objects[delta.sha256], delta, pin(NEW), BASE) == NEW
    # kept forms are reused, not encoded again; a delta from the index itself is left out
    again = pack_index(NEW, [NEW, BASE], forms.packing)
    assert again.packing == forms.packing and again.objects == {}
    assert pack_index(NEW, [BASE], max_deltas=0).packing.deltas == ()


json_ish = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=6) | st.dictionaries(st.text(max_size=8), kids,
                                                              max_size=6), max_leaves=40)


@settings(max_examples=60, deadline=None)
@given(json_ish, json_ish, st.binary(max_size=64))
def test_decode_of_encode_is_identity(a: Any, b: Any, noise: bytes) -> None:
    base = json.dumps(a).encode()
    new = json.dumps([b, a]).encode() + noise
    assert unpack_index(pack_zstd(new), _form(pack_zstd(new)), pin(new)) == new
    packed = pack_delta(new, base)
    assert unpack_index(packed, _form(packed, base), pin(new), base) == new


def _form(packed: bytes, base: bytes | None = None) -> PackedIndex | IndexDelta:
    if base is None:
        return PackedIndex(sha(packed), len(packed))
    return IndexDelta(sha(base), sha(packed), len(packed))


def test_refusals() -> None:
    packed = pack_delta(NEW, BASE)
    form = _form(packed, BASE)
    other = bytearray(packed)
    other[-3] ^= 1
    with pytest.raises(HashMismatchError, match="tampered"):  # packed bytes differ from pin
        unpack_index(bytes(other), form, pin(NEW), BASE)
    with pytest.raises(LocalError, match="as its base"):  # the base is another index
        unpack_index(packed, form, pin(NEW), NEW)
    big = pack_zstd(NEW + b" ")  # declares one byte more than the pin
    with pytest.raises(HashMismatchError, match=f"declares {len(NEW) + 1} bytes"):
        unpack_index(big, _form(big), pin(NEW))
    trailing = pack_zstd(NEW) + b"\0"
    with pytest.raises(FormatError, match="one whole zstd frame"):
        unpack_index(trailing, _form(trailing), pin(NEW))
    wrong = pack_zstd(BASE.replace(b"g1", b"h1"))  # same length, other bytes
    with pytest.raises(HashMismatchError, match="decodes to an index"):
        unpack_index(wrong, _form(wrong), ObjectRef(sha(BASE), len(BASE), "json"))


def test_pointer_fields_round_trip_and_validate() -> None:
    h = [sha(b"%d" % i) for i in range(10)]
    lo, hi = sorted([h[2], h[4]])
    d = {"sha256": h[0], "length": 100, "zstd": {"sha256": h[1], "length": 40},
         "deltas": [{"from": lo, "sha256": h[3], "length": 9},
                    {"from": hi, "sha256": h[5], "length": 8, "x": 1}], "later": True}
    ref = index_ref(json.loads(json.dumps(d)), "index")
    assert index_dict(ref) == d and ref.packing.delta_from(hi) == IndexDelta(hi, h[5], 8)
    assert sorted(ref.packing.objects()) == sorted([h[1], h[3], h[5]])
    bad: list[tuple[dict[str, Any], type[Exception]]] = [
        ({"zstd": {"sha256": h[1].upper(), "length": 4}}, FormatError),
        ({"zstd": {"sha256": h[1], "length": 0}}, FormatError),
        ({"zstd": {"sha256": h[1], "length": 1 << 30}}, OversizeError),
        ({"deltas": [d["deltas"][1], d["deltas"][0]]}, FormatError),  # not sorted
        ({"deltas": [d["deltas"][0]] * 2}, FormatError),  # one base twice
        ({"deltas": [{"from": h[0], "sha256": h[1], "length": 1}] * 9}, OversizeError),
    ]
    for extra, error in bad:
        with pytest.raises(error):
            index_ref({"sha256": h[0], "length": 100, **extra}, "index")
    with pytest.raises(OversizeError):
        IndexPacking(None, tuple(IndexDelta(x, h[0], 1) for x in sorted(h[:9])))


# -- the publisher -------------------------------------------------------------------------


def _index_ref(store: Path, signed: dict[str, Any] | None = None) -> dict[str, Any]:
    m = signed if signed is not None else manifest_of(store)
    return dict(m["current"]["index"])


def _decode(store: Path, ref: dict[str, Any], base: bytes | None = None) -> bytes:
    """The index a packed form of ``ref`` decodes to (a delta if ``base`` is given)."""
    p = index_ref(ref, "index")
    form: PackedIndex | IndexDelta | None = (
        p.packing.zstd if base is None else p.packing.delta_from(sha(base)))
    assert form is not None
    return unpack_index((store / form.key).read_bytes(), form, p, base)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, moe_family: MoEFamily) -> Published:
    return publish(tmp_path_factory.mktemp("packing"),
                   {"v1": moe_family.v1, "v2": moe_family.v2})


def _raw(store: Path, ref: dict[str, Any]) -> bytes:
    return (store / "objects" / ref["sha256"]).read_bytes()


def test_release_writes_zstd_and_a_delta_from_the_current_index(published: Published) -> None:
    s1, s2 = published.snapshots["v1"], published.snapshots["v2"]
    r1, r2 = _index_ref(s1), _index_ref(s2)
    assert "deltas" not in r1 and _decode(s1, r1) == _raw(s1, r1)  # the first: zstd only
    assert [d["from"] for d in r2["deltas"]] == [r1["sha256"]]
    assert _decode(s2, r2) == _decode(s2, r2, _raw(s1, r1)) == _raw(s2, r2)
    record = json.loads((s2 / "releases" / "v2.json").read_bytes())["signed"]
    assert record["index"] == r2  # the record names the same forms (promote reuses them)


def test_index_deltas_0_revert_and_gc(published: Published, tmp_path: Path,
                                      moe_family: MoEFamily) -> None:
    work = tmp_path
    store = work / "store"
    shutil.copytree(published.snapshots["v2"], store)
    # The v1 and v2 objects are an hour old: gc's clock has whole seconds, so an object
    # written in the second gc starts counts as young even with --grace 0s.
    hour_ago = time.time() - 3600
    for obj in (store / "objects").iterdir():
        os.utime(obj, (hour_ago, hour_ago))
    keys = [a for k in published.keys for a in ("--key", k)]
    tool("deltaship-publish", "release", moe_family.v3, "--store", store, "--version", "v3",
         "--index-deltas", "0", *keys, "--cache-dir", work / "cache", cwd=work)
    r3 = _index_ref(store)
    assert "deltas" not in r3 and _decode(store, r3) == _raw(store, r3)
    tool("deltaship-publish", "revert", "--store", store, "--to", "v1", *keys, cwd=work)
    r1 = _index_ref(store)
    assert [d["from"] for d in r1["deltas"]] == [r3["sha256"]]  # from what devices ran
    assert _decode(store, r1, _raw(store, r3)) == _decode(store, r1) == _raw(store, r1)
    tool("deltaship-publish", "gc", "--store", store, "--keep", "1", "--grace", "0s", cwd=work)
    assert _decode(store, r1, _raw(store, r3)) == _raw(store, r1)  # kept: current
    assert _decode(store, r3) == _raw(store, r3)  # kept: the last record
    r2 = _index_ref(published.snapshots["v2"])
    assert not (store / "objects" / r2["zstd"]["sha256"]).exists()  # v2 is no longer kept


# -- real agents ---------------------------------------------------------------------------


def _device_at_v1(pub: Published, tmp: Path, store_url: str) -> Device:
    """A device brought to v1 by a real agent from ``store_url`` (the v1 store)."""
    dev = Device(None, pub.root, store_url, tmp / "dev")
    dev.update("v1")
    return dev


def test_device_downloads_the_delta_not_the_index(published: Published, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(published.snapshots["v1"], store)
    with ServedStore(store) as served:
        dev = _device_at_v1(published, tmp_path, served.url)
        shutil.copytree(published.snapshots["v2"], store, dirs_exist_ok=True)
        ref = _index_ref(store)
        mark = served.mark()
        dev.update("v2")
        reqs, _ = served.since(mark)
    got = {r.path.rsplit("/", 1)[1]: r.sent for r in reqs}
    [delta] = ref["deltas"]
    assert got[delta["sha256"]] == delta["length"]  # the delta, whole, once
    assert ref["sha256"] not in got and ref["zstd"]["sha256"] not in got
    saved = DeviceLayout(dev.model_dir).load_index_bytes("v2")
    assert saved == _raw(published.snapshots["v2"], ref)


def test_device_without_the_base_takes_the_zstd_form(published: Published,
                                                      tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(published.snapshots["v2"], store)
    with ServedStore(store) as served:
        dev = Device(None, published.root, served.url, tmp_path / "dev")
        mark = served.mark()
        dev.update("v2")
        reqs, _ = served.since(mark)
    ref = _index_ref(store)
    got = {r.path.rsplit("/", 1)[1]: r.sent for r in reqs}
    assert got[ref["zstd"]["sha256"]] == ref["zstd"]["length"]
    assert ref["sha256"] not in got and ref["deltas"][0]["sha256"] not in got
    assert DeviceLayout(dev.model_dir).load_index_bytes("v2") == _raw(store, ref)


def _attack(pub: Published, dev: Device, tmp: Path, *needles: str) -> None:
    before = dev.snapshot(tmp)
    p = dev.run_once()
    untouched(dev, before, pub.content["v1"] | pub.content["v2"], around=tmp)
    refused(p, *needles, code=3)


def test_device_refuses_a_wrong_delta(published: Published, tmp_path: Path) -> None:
    """(a) a mirror serving other bytes under the delta's key; (b) a correctly signed manifest
    whose delta decodes to other bytes than the index it pins."""
    store = tmp_path / "store"
    shutil.copytree(published.snapshots["v1"], store)
    dev = _device_at_v1(published, tmp_path, f"file://{store}")
    shutil.copytree(published.snapshots["v2"], store, dirs_exist_ok=True)
    ref = _index_ref(store)
    v1_index, v2_index = _raw(store, _index_ref(published.snapshots["v1"])), _raw(store, ref)
    [delta] = ref["deltas"]
    path = store / "objects" / delta["sha256"]
    genuine = path.read_bytes()
    path.write_bytes(pack_delta(v2_index.replace(b'"v2"', b'"v9"'), v1_index))
    _attack(published, dev, tmp_path, "release index delta from", "tampered with")
    path.write_bytes(genuine)

    forged = v2_index.replace(b'"v2"', b'"v9"')  # the pin stays the genuine index's
    h, n = put_object(store, pack_delta(forged, v1_index))

    def edit(m: dict[str, Any]) -> None:
        m["current"]["index"]["deltas"] = [{"from": delta["from"], "sha256": h, "length": n}]
    forge_manifest(store, published.signing_keys(), edit)
    _attack(published, dev, tmp_path, "decodes to an index with sha256",
            "not the manifest's")
    assert dev.current() == "v1"
