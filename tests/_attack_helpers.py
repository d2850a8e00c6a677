"""Helpers for the attack tests: stores to tamper with, devices, before/after snapshots.

A store is published once per module with the real ``deltaship-publish`` into a local
directory, and a snapshot of the whole directory is kept after each release. A test copies the
v1 snapshot and a device that a real ``deltaship-agent run --once`` brought to v1, then
"releases" v2 by copying the v2 snapshot over the store (objects are content-addressed, so
v2's store is v1's plus new objects and a new manifest) and tampers with what it wants.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge_agent.config import load_config, save_config
from edge_agent.layout import DeviceLayout
from manifest.canonical import canonical_json, loads_object
from manifest.signing import SigningKey
from manifest.trust import manifest_wire, sign_document
from publisher.keys import load_signing_key

from .conftest import BIN, Cli

ERROR_PREFIX = "deltaship-agent: error: "
Signed = dict[str, Any]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tool(prog: str, *args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a console script (no S3 involved); raise with its output when it fails."""
    cmd = [str(BIN / prog), *map(str, args)]
    p = subprocess.run(cmd, cwd=cwd, text=True, capture_output=True, timeout=120)
    if p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


# -- publishing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """Snapshots of a local store after each release, its trust root and its key files."""

    root: Path  # the root.json devices pin
    keys: tuple[Path, ...]  # private key files, in the order given to `init`
    snapshots: dict[str, Path]  # version -> copy of the store directory right after it
    content: dict[str, frozenset[str]]  # version -> sha256 of every group file and file

    def signing_keys(self) -> list[SigningKey]:
        return [load_signing_key(k) for k in self.keys]


def publish(work: Path, models: dict[str, Path], key_names: tuple[str, ...] = ("release",),
            threshold: int = 1) -> Published:
    """Init a store with ``key_names`` (threshold ``threshold``) and release ``models`` in order."""
    work.mkdir(parents=True, exist_ok=True)
    keys = []
    for name in key_names:
        tool("deltaship-publish", "keygen", "--out", work / "keys", "--name", name, cwd=work)
        keys.append(work / "keys" / f"{name}.key")
    store = work / "store"
    store.mkdir()
    key_args = [a for k in keys for a in ("--key", k)]
    tool("deltaship-publish", "init", "--store", store, *key_args, "--threshold", threshold,
         "--out", work / "root.json", cwd=work)
    snapshots, content = {}, {}
    for version, model in models.items():
        tool("deltaship-publish", "release", model, "--store", store, "--version", version,
             *key_args, "--cache-dir", work / "cache", cwd=work)
        snapshots[version] = work / f"store-{version}"
        shutil.copytree(store, snapshots[version], ignore=shutil.ignore_patterns(".lock"))
        index = current_index(store)
        content[version] = frozenset(
            [g["sha256"] for g in index["groups"]] + [f["sha256"] for f in index["files"]]
        )
    return Published(work / "root.json", tuple(keys), snapshots, content)


# -- reading and forging store documents -----------------------------------------------------


def open_doc(data: bytes) -> tuple[Signed, list[Any]]:
    doc = loads_object(data, "test document")
    return doc["signed"], doc["signatures"]


def timestamp_of(store: Path) -> Signed:
    """The store's timestamp (the outer, timestamp-signed part of ``manifest.json``)."""
    return open_doc((store / "manifest.json").read_bytes())[0]


def manifest_of(store: Path) -> Signed:
    """The store's manifest: what is current (the release-signed part of ``manifest.json``)."""
    return dict(timestamp_of(store)["manifest"])


def index_path(store: Path) -> Path:
    return store / "objects" / str(manifest_of(store)["current"]["index"]["sha256"])


def current_index(store: Path) -> Signed:
    """The current release index (unsigned canonical JSON, pinned by the manifest)."""
    return loads_object(index_path(store).read_bytes(), "test index")


def put_object(store: Path, data: bytes) -> tuple[str, int]:
    """Store ``data`` as ``objects/<sha256>``; returns its sha256 and length."""
    digest = sha(data)
    (store / "objects" / digest).write_bytes(data)
    return digest, len(data)


def sign(signed: Signed, keys: list[SigningKey]) -> bytes:
    return sign_document(signed, keys)


def forge_manifest(store: Path, keys: list[SigningKey],
                   edit: Callable[[Signed], None] = lambda m: None, *,
                   timestamp_keys: list[SigningKey] | None = None,
                   edit_timestamp: Callable[[Signed], None] = lambda t: None) -> bytes:
    """Rewrite the store's ``manifest.json``: ``edit`` the manifest and sign it with ``keys``
    (the release role's layer), ``edit_timestamp`` the timestamp around it and sign that with
    ``timestamp_keys`` (default: ``keys``)."""
    ts = timestamp_of(store)
    manifest = ts["manifest"]
    edit(manifest)
    edit_timestamp(ts)
    data = manifest_wire(ts, [k.sign(ts) for k in (keys if timestamp_keys is None
                                                  else timestamp_keys)],
                         [k.sign(manifest) for k in keys])
    (store / "manifest.json").write_bytes(data)
    return data


def point_at(signed: Signed, *, version: str, digest: str, length: int) -> None:
    signed["current"] = {"version": version, "index": {"sha256": digest, "length": length}}


def forge_index(store: Path, keys: list[SigningKey], edit: Callable[[Signed], None], *,
                timestamp_keys: list[SigningKey] | None = None) -> None:
    """Publish an edited copy of the current index (unsigned, like every index) and a manifest
    that pins it, signed by ``keys`` (and its timestamp by ``timestamp_keys``, default
    ``keys``)."""
    signed = current_index(store)
    edit(signed)
    digest, length = put_object(store, canonical_json(signed))
    forge_manifest(store, keys,
                   lambda m: point_at(m, version=m["current"]["version"], digest=digest,
                                      length=length), timestamp_keys=timestamp_keys)


def patch_object(store: Path, base_version: str) -> str:
    """The sha256 of a patch object of the current release made from ``base_version``."""
    for g in current_index(store)["groups"]:
        for p in g["patches"]:
            if p["base_version"] == base_version:
                return str(p["object"]["sha256"])
    raise AssertionError(f"the current release has no patch from {base_version}")


def flip(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0x01
    return bytes(b)


def truncate(data: bytes) -> bytes:
    return data[: len(data) - 100]


def extend(data: bytes) -> bytes:
    return data + os.urandom(4 * 1024 * 1024)


TAMPER: dict[str, Callable[[bytes], bytes]] = {"flip": flip, "truncate": truncate,
                                                "extend": extend}


# -- devices ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What a failed update must leave unchanged on a device."""

    current: str | None
    live: dict[str, str]  # path under the live version -> sha256 (symlinks: "-> target")
    versions: list[str]
    objects: dict[str, str]  # name in objects/ -> sha256 of its content
    manifest_copy: bytes | None
    highest_sequence: int
    highest_timestamp: int
    top: list[str] = field(default_factory=list)  # entries of the model dir itself
    outside: dict[str, str] = field(default_factory=dict)  # files around the model dir


def tree(top: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(top))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = sha(p.read_bytes())
    return out


def clone_tree(src: Path, dst: Path) -> None:
    """Copy a directory like ``cp -a``: symlinks stay links, hard links stay linked."""
    seen: dict[tuple[int, int], Path] = {}
    dst.mkdir(parents=True)
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        for d in dirnames:
            s = Path(dirpath) / d
            if s.is_symlink():
                (dst / rel / d).symlink_to(os.readlink(s))
            else:
                (dst / rel / d).mkdir()
        for f in filenames:
            s, t = Path(dirpath) / f, dst / rel / f
            st = s.lstat()
            if s.is_symlink():
                t.symlink_to(os.readlink(s))
            elif (st.st_dev, st.st_ino) in seen:
                os.link(seen[st.st_dev, st.st_ino], t)
            else:
                shutil.copy2(s, t)
                seen[st.st_dev, st.st_ino] = t
    for dirpath, _, _ in os.walk(src):  # directory modes last (versions are 0700)
        rel = Path(dirpath).relative_to(src)
        shutil.copystat(dirpath, dst / rel)


class Device:
    """A device configured with a real ``deltaship-agent init``; runs real agent processes."""

    def __init__(self, cli: Cli | None, root: Path | None, store: str, model_dir: Path,
                 *extra: object, env: dict[str, str] | None = None) -> None:
        self.model_dir = model_dir
        self.config = model_dir.parent / f"{model_dir.name}.toml"
        self.env = env if env is not None else (cli.env() if cli else dict(os.environ))
        self.command = [str(BIN / "deltaship-agent")]  # how the agent is started
        if root is not None:
            self.agent("init", "--store", store, "--trust", root, "--model-dir", model_dir,
                       "--config", self.config, "--device-id", "dev-1", *extra)

    def clone(self, model_dir: Path, store: str) -> Device:
        """A copy of this device (its model dir, state and configuration) following ``store``."""
        clone_tree(self.model_dir, model_dir)
        dev = Device(None, None, store, model_dir, env=self.env)
        cfg = load_config(self.config)
        save_config(dataclasses.replace(cfg, store=store, model_dir=model_dir), dev.config)
        return dev

    def agent(self, *args: object, check: bool = True,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [*self.command, *map(str, args)]
        try:
            p = subprocess.run(cmd, cwd=self.model_dir.parent, env=self.env, text=True,
                               capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:  # run() has killed it
            raise AssertionError(f"{cmd} hung: killed after {timeout} s") from e
        if check and p.returncode != 0:
            raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    def run_once(self, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.agent("run", "--once", "--config", self.config, check=False,
                          timeout=timeout)

    def update(self, version: str) -> None:
        p = self.run_once()
        assert p.returncode == 0, f"clean update failed ({p.returncode}):\n{p.stderr}"
        assert self.current() == version, p.stdout

    def current(self) -> str | None:
        return DeviceLayout(self.model_dir).current()

    def state(self) -> dict[str, Any]:
        return json.loads(DeviceLayout(self.model_dir).state_file.read_text())  # type: ignore[no-any-return]

    def snapshot(self, around: Path | None = None) -> Snapshot:
        layout = DeviceLayout(self.model_dir)
        copy = layout.manifest_copy
        outside = {}
        if around is not None:  # everything next to the model dir (the store, the config)
            mine = self.model_dir.relative_to(around).parts[0]
            outside = {k: v for k, v in tree(around).items()
                       if Path(k).parts[0] != mine}
        return Snapshot(
            current=self.current(),
            live=tree(layout.current_link.resolve()),
            versions=sorted(p.name for p in layout.versions.iterdir()),
            objects={p.name: sha(p.read_bytes()) for p in layout.objects.iterdir()},
            manifest_copy=copy.read_bytes() if copy.is_file() else None,
            highest_sequence=int(self.state()["highest_sequence"]),
            highest_timestamp=int(self.state().get("highest_timestamp", 0)),
            top=sorted(p.name for p in self.model_dir.iterdir()),
            outside=outside,
        )


Needle = str | tuple[str, ...]  # a phrase, or alternative phrases one of which must appear


def refused(p: subprocess.CompletedProcess[str], *needles: Needle, code: int = 3) -> str:
    """A clear refusal: exit ``code``, one ``deltaship-agent: error:`` line naming the problem.

    Returns the message.
    """
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.splitlines()
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, f"expected one {ERROR_PREFIX!r} line:\n{p.stderr}"
    message = errors[0][len(ERROR_PREFIX):]
    assert p.returncode == code, f"exit code {p.returncode}, expected {code}: {message}"
    for needle in needles:
        options = (needle,) if isinstance(needle, str) else needle
        assert any(o in message for o in options), (
            f"{' or '.join(map(repr, options))} not in the error message {message!r}")
    assert lines == errors, f"stderr must be exactly one line, got {len(lines)}:\n{p.stderr}"
    return message


def untouched(dev: Device, before: Snapshot, verified: frozenset[str],
              *, around: Path | None = None, manifest_rejected: bool = False) -> None:
    """The live model is exactly as before, and ``objects/`` holds only verified content.

    ``verified``: sha256 of content a genuine (pinned) index names (new objects may appear
    when other groups of the update completed before the attack was noticed).
    ``manifest_rejected``: the manifest itself was refused, so the device must not have
    remembered it (no saved copy, no higher floor).
    """
    after = dev.snapshot(around)
    assert after.current == before.current
    assert after.live == before.live, "the live version changed"
    assert after.versions == before.versions, "a version directory appeared or vanished"
    for name, digest in after.objects.items():
        assert digest == name, f"objects/{name} does not hold the content its name says"
        assert name in before.objects or name in verified, f"unexpected object {name}"
    for name in before.objects:
        assert name in after.objects, f"objects/{name} of the live version was removed"
    if manifest_rejected:
        assert after.manifest_copy == before.manifest_copy
        assert after.highest_sequence == before.highest_sequence
        assert after.highest_timestamp == before.highest_timestamp
    assert after.top == before.top, "an entry appeared in or vanished from the model dir"
    assert after.outside == before.outside, "files outside the model dir changed"
    assert dev.state()["last_error"], "the failure was not recorded in the agent state"


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)
