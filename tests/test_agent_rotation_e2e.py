"""Root rotation and compromise recovery end to end: real ``deltaship-publish`` and
``deltaship-agent`` processes, a store on moto's S3 server or served over plain HTTP.

A device stays offline while the owners rotate three times with the offline root keys (the
release key, the timestamp key, then the root key itself) and release once more; its first
poll walks ``roots/2.json`` … ``roots/4.json``, forgets the floors the old keys set and
installs the new release; then a manifest signed by the rotated-out keys (stolen) with
sequence 10^9 is refused, and an unchanged poll is one conditional GET again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from edge_agent.layout import DeviceLayout
from publisher.keys import load_signing_key

from ._attack_helpers import Device, forge_manifest, refused
from ._served_store import ServedStore
from .conftest import Cli, MoEFamily

KEYS = ("root1", "root2", "rel1", "rel2", "ts1", "ts2")


@dataclass
class Fleet:
    cli: Cli
    keys: Path
    store: str  # what the publisher writes to
    device_store: str  # what devices read
    served: ServedStore | None = None

    def publish(self, *args: object) -> str:
        return self.cli.publish(*args).stdout

    def key(self, name: str) -> Path:
        return self.keys / f"{name}.key"

    def rotate(self, n: int, *edits: str, signers: tuple[str, ...]) -> None:
        draft = self.keys.parent / f"root-{n}.json"
        self.publish("root", "edit", "--store", self.store, *edits, "--out", draft)
        for s in signers:  # each on its holder's machine
            self.publish("root", "sign", draft, "--key", self.key(s))
        self.publish("root", "publish", draft, "--store", self.store)


@pytest.fixture(params=["http", "s3"])
def fleet(request: pytest.FixtureRequest, cli: Cli, tmp_path: Path) -> Iterator[Fleet]:
    keys = tmp_path / "keys"
    for name in KEYS:
        cli.publish("keygen", "--out", keys, "--name", name)
    if request.param == "s3":
        bucket = request.getfixturevalue("bucket")
        url = f"s3://{bucket}/fleet"
        yield Fleet(cli, keys, url, url)
        return
    store = tmp_path / "store"
    store.mkdir()
    with ServedStore(store, "fleet") as served:
        yield Fleet(cli, keys, str(store), served.url, served)


def test_offline_device_catches_up_through_three_rotations_and_refuses_stolen_keys(
        fleet: Fleet, moe_family: MoEFamily, tmp_path: Path) -> None:
    k = fleet.key
    fleet.publish("init", "--store", fleet.store, "--root-key", k("root1"),
                  "--release-key", k("rel1"), "--timestamp-key", k("ts1"),
                  "--out", tmp_path / "root.json")
    fleet.publish("release", moe_family.v1, "--store", fleet.store, "--version", "v1",
                  "--key", k("rel1"), "--key", k("ts1"), "--cache-dir", tmp_path / "cache")
    dev = Device(fleet.cli, tmp_path / "root.json", fleet.device_store, tmp_path / "dev")
    dev.update("v1")

    # Offline: release key, timestamp key, then the root key rotated; a release by the new keys.
    pub = fleet.keys
    fleet.rotate(2, "--remove-key", f"release={pub / 'rel1.pub'}",
                 "--add-key", f"release={pub / 'rel2.pub'}", signers=("root1",))
    fleet.rotate(3, "--remove-key", f"timestamp={pub / 'ts1.pub'}",
                 "--add-key", f"timestamp={pub / 'ts2.pub'}", signers=("root1",))
    fleet.rotate(4, "--remove-key", f"root={pub / 'root1.pub'}",
                 "--add-key", f"root={pub / 'root2.pub'}", signers=("root1", "root2"))
    fleet.publish("release", moe_family.v2, "--store", fleet.store, "--version", "v2",
                  "--key", k("rel2"), "--key", k("ts2"), "--cache-dir", tmp_path / "cache")

    mark = fleet.served.mark() if fleet.served else None
    dev.update("v2")  # one poll
    if fleet.served is not None and mark is not None:
        paths = [r.path.split("/fleet/", 1)[1] for r in fleet.served.since(mark)[0]]
        assert [p for p in paths if p.startswith("roots/")] == [
            "roots/2.json", "roots/3.json", "roots/4.json"]
    pinned = json.loads(DeviceLayout(dev.model_dir).read_root())
    assert pinned["signed"]["version"] == 4
    state = dev.state()
    assert set(state["floor_keys"]["release"]["keyids"]) == {
        load_signing_key(k("rel2")).keyid}

    if fleet.served is not None:  # an unchanged poll is one conditional GET, answered 304
        mark = fleet.served.mark()
        assert dev.run_once().returncode == 0
        reqs, _ = fleet.served.since(mark)
        assert [(r.path.rsplit("/", 1)[1], r.status) for r in reqs] == [("manifest.json", 304)]

    # The old release and timestamp keys were stolen: sequence 10^9, signed by them.
    stolen = [load_signing_key(k("rel1")), load_signing_key(k("ts1"))]
    if fleet.served is None:  # S3: forge in a local copy, then upload it
        s3 = boto3.client("s3", endpoint_url=fleet.cli.endpoint)
        bucket = fleet.store.split("/")[2]
        local = tmp_path / "forged"
        local.mkdir()
        body = s3.get_object(Bucket=bucket, Key="fleet/manifest.json")["Body"].read()
        (local / "manifest.json").write_bytes(body)
        data = forge_manifest(local, stolen, lambda m: m.update(sequence=10**9),
                              edit_timestamp=lambda t: t.update(sequence=10**9))
        s3.put_object(Bucket=bucket, Key="fleet/manifest.json", Body=data)
    else:
        forge_manifest(Path(fleet.store), stolen, lambda m: m.update(sequence=10**9),
                       edit_timestamp=lambda t: t.update(sequence=10**9))
    refused(dev.run_once(), "manifest timestamp has 0 valid signature(s)",
            "not one of its 'timestamp' keys")
    assert dev.current() == "v2" and dev.state()["highest_sequence"] < 10**9
