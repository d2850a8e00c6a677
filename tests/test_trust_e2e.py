"""The trust lifecycle end to end: real publisher and agent processes, on moto's S3 server and
on a store served over plain HTTP (issue 10's must-show (a), (b) and (c)).

(a) a device offline through three root rotations catches up in one poll;
(b) the compromise drill: a stolen release key publishes a bad release with sequence 10^9 that
    devices take; the owners rotate the key out with the offline root key and release a good
    version; every device installs it without a new ``init`` and then refuses everything the
    stolen key signs;
(c) the clock moved forward 400 days in steps with ``faketime``: a device whose store is
    refreshed weekly (the systemd unit's own command) keeps following releases; one whose
    store is not refreshed stops with one line naming ``deltaship-publish refresh``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from manifest.canonical import loads_object
from manifest.metadata import Manifest, Timestamp
from manifest.trust import manifest_wire
from publisher.keys import load_signing_key

from ._agent_checks import assert_same_model
from ._served_store import ServedStore
from .conftest import BIN, Cli, MoEFamily

REPO = Path(__file__).resolve().parent.parent
REFRESH_UNIT = REPO / "scripts" / "deltaship-refresh.service"


@dataclass
class Keys:
    dir: Path

    def __getitem__(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def pub(self, name: str) -> Path:
        return self.dir / f"{name}.pub"


@pytest.fixture
def keys(cli: Cli, tmp_path: Path) -> Keys:
    for name in ("root1", "root2", "root3", "rel1", "rel2", "ts1", "ts2", "thief"):
        cli.publish("keygen", "--out", tmp_path / "keys", "--name", name)
    return Keys(tmp_path / "keys")


@dataclass
class Site:
    """Where the publisher writes (``publish_url``) and where devices read (``device_url``):
    the same S3 prefix, or a directory that a plain HTTP server serves."""

    publish_url: str
    device_url: str
    served: ServedStore | None = None


@pytest.fixture(params=["s3", "http"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    if request.param == "s3":
        bucket = request.getfixturevalue("bucket")
        yield Site(f"s3://{bucket}/fleet", f"s3://{bucket}/fleet")
        return
    store = tmp_path / "www" / "fleet"
    store.mkdir(parents=True)
    with ServedStore(store, "fleet") as served:
        yield Site(str(store), served.url, served)


class Device:
    def __init__(self, cli: Cli, site: Site, root: Path, model_dir: Path, name: str) -> None:
        self.cli, self.model_dir = cli, model_dir
        self.config = model_dir.parent / f"{name}.toml"
        cli.run("deltaship-agent", "init", "--store", site.device_url, "--trust", root,
                "--model-dir", model_dir, "--config", self.config, "--device-id", name)

    def run(self, *, check: bool = True, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        return self.cli.run("deltaship-agent", "run", "--once", "--config", self.config,
                            check=check, env=env)

    def live(self) -> str:
        return os.readlink(self.model_dir / "current").rsplit("/", 1)[-1]

    def pinned_root(self) -> bytes:
        found = list(self.model_dir.rglob("root.json"))
        assert len(found) == 1, found
        return found[0].read_bytes()


def _release(cli: Cli, site: Site, model: Path, version: str, *keys: Path,
             env: dict[str, str] | None = None) -> None:
    args = [a for k in keys for a in ("--key", k)]
    cli.run("deltaship-publish", "release", model, "--store", site.publish_url, "--version",
            version, *args, "--cache-dir", cli.cwd / "cache", env=env)


def _rotate(cli: Cli, site: Site, tmp: Path, signers: list[Path], *edits: str,
            env: dict[str, str] | None = None) -> None:
    """root edit -> root sign (each signer, one by one) -> root publish."""
    draft = tmp / "root-draft.json"
    draft.unlink(missing_ok=True)
    cli.run("deltaship-publish", "root", "edit", "--store", site.publish_url, *edits,
            "--out", draft, env=env)
    for key in signers:
        cli.run("deltaship-publish", "root", "sign", draft, "--key", key, env=env)
    cli.run("deltaship-publish", "root", "publish", draft, "--store", site.publish_url,
            env=env)


def _store_key(cli: Cli, site: Site, key: str) -> bytes:
    if site.served is None:
        bucket, prefix = site.publish_url[5:].split("/", 1)
        s3 = boto3.client("s3", endpoint_url=cli.endpoint)
        body: bytes = s3.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()
        return body
    return (Path(site.publish_url) / key).read_bytes()


def _put_store_key(cli: Cli, site: Site, key: str, data: bytes) -> None:
    if site.served is None:
        bucket, prefix = site.publish_url[5:].split("/", 1)
        boto3.client("s3", endpoint_url=cli.endpoint).put_object(
            Bucket=bucket, Key=f"{prefix}/{key}", Body=data)
        return
    (Path(site.publish_url) / key).write_bytes(data)


def _init(cli: Cli, site: Site, tmp: Path, *args: object) -> Path:
    root = tmp / "root.json"
    cli.run("deltaship-publish", "init", "--store", site.publish_url, *args, "--out", root)
    return root


def _one_line(p: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# -- (a) offline through three root rotations ---------------------------------------------------


@pytest.mark.slow  # scheduled first (tests/conftest.py)
def test_device_offline_through_three_rotations_catches_up_in_one_poll(
        cli: Cli, site: Site, keys: Keys, moe_family: MoEFamily, tmp_path: Path) -> None:
    root = _init(cli, site, tmp_path, "--root-key", keys["root1"], "--release-key",
                 keys.pub("rel1"), "--timestamp-key", keys.pub("ts1"))
    _release(cli, site, moe_family.v1, "v1", keys["rel1"], keys["ts1"])
    dev = Device(cli, site, root, tmp_path / "dev", "dev-a")
    dev.run()
    assert dev.live() == "v1"
    # The device is offline while the owners rotate three times: the root key, then the
    # release key, then the timestamp key (with a threshold of 2 of two root keys).
    _rotate(cli, site, tmp_path, [keys["root1"], keys["root2"]],
            "--remove-key", f"root={keys.pub('root1')}", "--add-key", f"root={keys.pub('root2')}")
    _rotate(cli, site, tmp_path, [keys["root2"], keys["root3"]],
            "--add-key", f"root={keys.pub('root3')}", "--threshold", "root=2",
            "--remove-key", f"release={keys.pub('rel1')}",
            "--add-key", f"release={keys.pub('rel2')}")
    _rotate(cli, site, tmp_path, [keys["root2"], keys["root3"]],
            "--remove-key", f"timestamp={keys.pub('ts1')}",
            "--add-key", f"timestamp={keys.pub('ts2')}")
    _release(cli, site, moe_family.v2, "v2", keys["rel2"], keys["ts2"])
    mark = site.served.mark() if site.served else None
    dev.run()
    assert dev.live() == "v2"
    assert_same_model(dev.model_dir / "current", moe_family.v2)
    assert dev.pinned_root() == _store_key(cli, site, "roots/4.json")
    assert json.loads(dev.pinned_root())["signed"]["version"] == 4
    if site.served is not None and mark is not None:
        requests, _ = site.served.since(mark)
        roots = [r.path for r in requests if "/roots/" in r.path]
        assert sorted(roots) == [f"/fleet/roots/{n}.json" for n in (2, 3, 4)], roots
        # The next poll is unchanged: one conditional request, no root fetched again.
        mark = site.served.mark()
        dev.run()
        requests, _ = site.served.since(mark)
        assert [(r.path, r.status) for r in requests] == [("/fleet/manifest.json", 304)]


# -- (b) the compromise drill --------------------------------------------------------------------


def _forge(cli: Cli, site: Site, thief: Path, *, sequence: int, root_version: int) -> bytes:
    """What a thief holding a release (and timestamp) key writes: the store's manifest
    re-signed with an absurd sequence."""
    key = load_signing_key(thief, insecure_permissions=True)
    doc = loads_object(_store_key(cli, site, "manifest.json"), "manifest")
    ts = Timestamp.from_dict(doc["signed"])
    manifest = Manifest(sequence, ts.manifest.expires, ts.manifest.published_at,
                        ts.manifest.current, ts.manifest.action,
                        repository_id=ts.manifest.repository_id)
    forged = Timestamp(sequence, ts.expires, root_version, manifest,
                       repository_id=ts.repository_id)
    body = forged.to_dict()
    data = manifest_wire(body, [key.sign(body)], [key.sign(body["manifest"])])
    _put_store_key(cli, site, "manifest.json", data)
    return data


@pytest.mark.slow  # scheduled first (tests/conftest.py)
def test_compromise_drill(cli: Cli, site: Site, keys: Keys, moe_family: MoEFamily,
                          tmp_path: Path) -> None:
    # The stolen key is the release key (which also times stamps: no --timestamp-key). The
    # root key stays offline.
    root = _init(cli, site, tmp_path, "--root-key", keys["root1"], "--release-key",
                 keys.pub("rel1"))
    _release(cli, site, moe_family.v1, "v1", keys["rel1"])
    devices = [Device(cli, site, root, tmp_path / f"dev{i}", f"dev-{i}") for i in range(3)]
    for d in devices:
        d.run()
    # The thief releases "bad" (here: the dense fine-tune) and re-signs it at sequence 10^9.
    _release(cli, site, moe_family.v3, "bad", keys["rel1"])
    stolen = _forge(cli, site, keys["rel1"], sequence=10**9, root_version=1)
    for d in devices:
        d.run()
        assert d.live() == "bad"
    # The owners rotate the stolen key out with the offline root key, and release "good".
    _rotate(cli, site, tmp_path, [keys["root1"]],
            "--remove-key", f"release={keys.pub('rel1')}",
            "--add-key", f"release={keys.pub('rel2')}",
            "--remove-key", f"timestamp={keys.pub('rel1')}",
            "--add-key", f"timestamp={keys.pub('ts2')}")
    _release(cli, site, moe_family.v4, "good", keys["rel2"], keys["ts2"])
    good = loads_object(_store_key(cli, site, "manifest.json"), "manifest")["signed"]
    assert good["sequence"] < 10**9 and good["manifest"]["sequence"] < 10**9  # a fresh count
    for d in devices:
        d.run()  # no new init: the device walks to root v2 and forgets the thief's floor
        assert d.live() == "good"
        assert_same_model(d.model_dir / "current", moe_family.v4)
    # Everything the stolen key signs is refused now, whatever sequence or root it names.
    for forged in (stolen,
                   _forge(cli, site, keys["rel1"], sequence=10**9 + 1, root_version=2),
                   _forge(cli, site, keys["rel1"], sequence=10**9 + 2, root_version=1)):
        _put_store_key(cli, site, "manifest.json", forged)
        for d in devices:
            _one_line(d.run(check=False), 3, "signature")
            assert d.live() == "good"


# -- (c) 400 days of clock: weekly refresh vs none -----------------------------------------------


def _faketime_env(cli: Cli, day: int) -> dict[str, str]:
    """The environment that runs a process ``day`` days from now (libfaketime)."""
    env = cli.env()
    env["FAKETIME"] = f"+{day}d"
    env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
    env["FAKETIME_DONT_RESET"] = "1"
    lib = subprocess.run(["dpkg", "-L", "libfaketime"], text=True, capture_output=True,
                         check=False).stdout.split()
    # The thread-safe build: the agent and publisher read the clock from several threads at
    # once, and the plain libfaketime.so.1 is not safe for that (it crashed an agent with
    # SIGSEGV once in this suite; libfaketime's README and wolfcw/libfaketime#151).
    so = next((p for p in lib if p.endswith("libfaketimeMT.so.1")), None)
    assert so, "libfaketime is missing: scripts/test.sh installs Debian's faketime package"
    env["LD_PRELOAD"] = so
    return env


def _refresh_command(store: str, key: Path) -> list[str]:
    """The refresh timer's own command (ExecStart of the unit), with its variables set."""
    text = REFRESH_UNIT.read_text().replace("\\\n", " ")  # systemd's line continuations
    exec_start = next(line.split("=", 1)[1] for line in text.splitlines()
                      if line.startswith("ExecStart="))
    words = shlex.split(exec_start)
    out = []
    for w in words:
        w = w.replace("${DELTASHIP_STORE}", store).replace("$DELTASHIP_STORE", store)
        w = w.replace("${DELTASHIP_TIMESTAMP_KEY}", str(key))
        w = w.replace("$DELTASHIP_TIMESTAMP_KEY", str(key))
        out.append(w)
    assert Path(out[0]).name == "deltaship-publish", out
    return [str(BIN / "deltaship-publish"), *out[1:]]


@pytest.mark.slow  # scheduled first (tests/conftest.py)
def test_a_weekly_refresh_keeps_devices_updating_for_400_days(
        cli: Cli, keys: Keys, moe_family: MoEFamily, tmp_path: Path) -> None:
    assert shutil.which("faketime"), "scripts/test.sh installs Debian's faketime package"
    probe = subprocess.run([str(BIN / "python"), "-c",
                            "import time; print(int(time.time()))"],
                           env=_faketime_env(cli, 400), text=True, capture_output=True,
                           check=True)
    real = subprocess.run(["date", "+%s"], text=True, capture_output=True, check=True)
    assert int(probe.stdout) - int(real.stdout) > 399 * 86400  # the clock really moved
    top = tmp_path / "www"
    sites = {}
    for name in ("kept", "quiet"):
        (top / name).mkdir(parents=True)
        sites[name] = Site(str(top / name), "")
    with ServedStore(top / "kept", "kept") as kept_http, \
            ServedStore(top / "quiet", "quiet") as quiet_http:
        sites["kept"].device_url, sites["quiet"].device_url = kept_http.url, quiet_http.url
        devices = {}
        for name, site in sites.items():
            (tmp_path / name).mkdir()
            root = _init(cli, site, tmp_path / name, "--root-key", keys["root1"],
                         "--release-key", keys.pub("rel1"), "--timestamp-key",
                         keys.pub("ts1"))
            _release(cli, site, moe_family.v1, "v1", keys["rel1"], keys["ts1"])
            devices[name] = Device(cli, site, root, tmp_path / name / "dev", f"dev-{name}")
            devices[name].run()
        releases = {98: ("v2", moe_family.v2), 203: ("v3", moe_family.v3),
                    357: ("v4", moe_family.v4)}
        refresh = _refresh_command(sites["kept"].publish_url, keys["ts1"])
        stopped_at = None
        for day in range(7, 401, 7):
            env = _faketime_env(cli, day)
            subprocess.run(refresh, env=env, text=True, capture_output=True, check=True)
            if day == 301:  # the yearly root renewal (runbook: root edit, sign, publish)
                _rotate(cli, sites["kept"], tmp_path, [keys["root1"]], env=env)
            for at, (version, model) in releases.items():
                if at - 7 < day <= at:
                    _release(cli, sites["kept"], model, version, keys["rel1"], keys["ts1"],
                             env=env)
            if day % 28 == 0 or any(at - 7 < day <= at for at in releases):
                out = devices["kept"].run(env=env)
                assert "Traceback" not in out.stderr
            if stopped_at is None or day + 7 > 400:  # until it stops, and at the end
                quiet = devices["quiet"].run(env=env, check=False)
                if quiet.returncode != 0 and stopped_at is None:
                    stopped_at = day
                    _one_line(quiet, 3, "expired", "deltaship-publish refresh")
                elif stopped_at is not None:  # day 400: its root has expired by now too
                    _one_line(quiet, 3, "expired")
        assert devices["kept"].live() == "v4"
        assert_same_model(devices["kept"].model_dir / "current", moe_family.v4)
        # Freshness lasts 28 days: the quiet store's device stopped within days 28..35.
        assert stopped_at is not None and 28 <= stopped_at <= 35, stopped_at
        assert devices["quiet"].live() == "v1"
