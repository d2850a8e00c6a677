"""Issue 9, points 9, 11 and 12: configuration, local input and exit codes, with real processes.

Every refusal here is checked the same way (:func:`refused`): the exact exit code, exactly one
line on stderr (``PROG: error: ...``) and no traceback, the live model unchanged (a hash of
``current`` and everything it holds) and nothing written outside the model directory (a
snapshot of the test's whole sandbox, which is also ``$HOME`` and the working directory).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from manifest import errors
from manifest.errors import EXIT_CODES
from manifest.metadata import Manifest, Root, Timestamp
from manifest.trust import manifest_wire, sign_document
from publisher.keys import load_signing_keys

from .conftest import MoEFamily

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


# -- running the real command lines in a sandbox --------------------------------------------


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "DELTASHIP_", "XDG_"))}
    env.update(HOME=str(home), PYTHONDONTWRITEBYTECODE="1", AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(home / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(home / "no-aws-credentials"))
    env.update(extra)
    return env


def run(cwd: Path, prog: str, *args: object, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / prog), *map(str, args)], cwd=cwd, env=_env(cwd, **env),
                          text=True, capture_output=True, timeout=300)


def ok(p: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert p.returncode == 0, (p.args, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    return p


def snapshot(top: Path, skip: Path | None = None) -> dict[str, str]:
    """Every entry under ``top`` (but ``skip``): file content hashes, link targets, dirs."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        d = Path(dirpath)
        if skip is not None and (d == skip or skip in d.parents):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = d / name
            rel = str(p.relative_to(top))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def live_hash(model_dir: Path) -> str:
    """What serving code sees: where ``current`` points and every byte under it."""
    link = model_dir / "current"
    if not os.path.lexists(link):
        return "nothing installed"
    h = hashlib.sha256(os.readlink(link).encode())
    for rel, v in sorted(snapshot(link.resolve()).items()):
        h.update(f"{rel}\0{v}\0".encode())
    return h.hexdigest()


@dataclass
class Sandbox:
    """A test's whole world: working directory, $HOME, configuration and model directory."""

    top: Path

    @property
    def dev(self) -> Path:
        return self.top / "dev"

    @property
    def config(self) -> Path:
        return self.top / "agent.toml"

    def agent(self, *args: object, **env: str) -> subprocess.CompletedProcess[str]:
        return run(self.top, "deltaship-agent", *args, **env)

    def publish(self, *args: object, **env: str) -> subprocess.CompletedProcess[str]:
        return run(self.top, "deltaship-publish", *args, **env)

    @classmethod
    def new(cls, top: Path) -> Sandbox:
        top.mkdir(parents=True, exist_ok=True)
        return cls(top)


@dataclass
class Refusal:
    """Take the pictures before a command that must fail; :meth:`check` it afterwards."""

    box: Sandbox
    outside: dict[str, str]
    live: str
    model: dict[str, str] | None

    @classmethod
    def expect(cls, box: Sandbox, model_untouched: bool = False) -> Refusal:
        model = snapshot(box.dev) if model_untouched and box.dev.exists() else None
        return cls(box, snapshot(box.top, skip=box.dev), live_hash(box.dev), model)

    def check(self, p: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
        prog = Path(p.args[0]).name
        assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
        assert "Traceback" not in p.stderr, p.stderr
        lines = p.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), p.stderr
        for n in needles:
            assert n in lines[0], (n, lines[0])
        assert live_hash(self.box.dev) == self.live, "the live model changed"
        assert snapshot(self.box.top, skip=self.box.dev) == self.outside, \
            "something was written outside the model directory"
        if self.model is not None:
            assert snapshot(self.box.dev) == self.model, "the model directory changed"
        return lines[0]


# -- a store with v1, a device at v1 -------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    keys: Path
    root: Path  # root.json
    store: Path  # holds v1
    device: Path  # a model directory at v1, to copy
    groups: tuple[str, ...]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, moe_family: MoEFamily) -> Fleet:
    d = tmp_path_factory.mktemp("fleet")
    box = Sandbox.new(d)
    ok(box.publish("keygen", "--out", d / "keys", "--name", "release"))
    (d / "store").mkdir()
    ok(box.publish("init", "--store", d / "store", "--key", d / "keys/release.key",
                   "--out", d / "root.json"))
    rel = ok(box.publish("release", moe_family.v1, "--store", d / "store", "--version", "v1",
                         "--key", d / "keys/release.key", "--cache-dir", d / "cache", "--json"))
    assert json.loads(rel.stdout)["version"] == "v1"
    ok(box.agent("init", "--store", d / "store", "--trust", d / "root.json", "--model-dir",
                 box.dev, "--config", box.config, "--device-id", "dev-1"))
    ok(box.agent("run", "--once", "--config", box.config))
    index = json.loads((box.dev / "current" / "model.safetensors.index.json").read_text())
    groups = tuple(sorted({Path(f).stem for f in index["weight_map"].values()}))
    return Fleet(d / "keys", d / "root.json", d / "store", box.dev, groups)


def device(fleet: Fleet, tmp_path: Path, **settings: str | None) -> Sandbox:
    """A sandbox holding a copy of the device at v1 and its configuration; ``settings`` are
    TOML values replacing (None: removing) those ``init`` wrote."""
    box = Sandbox.new(tmp_path / "box")
    subprocess.run(["cp", "-a", str(fleet.device), str(box.dev)], check=True)
    doc = {"store": json.dumps(str(fleet.store)), "model_dir": json.dumps(str(box.dev)),
           "device_id": '"dev-1"', **settings}
    box.config.write_text("".join(f"{k} = {v}\n" for k, v in doc.items() if v is not None))
    return box


def init_flags(fleet: Fleet, box: Sandbox, *flags: object) -> list[object]:
    return ["init", "--store", fleet.store, "--trust", fleet.root, "--model-dir", box.dev,
            "--config", box.config, "--device-id", "dev-1", *flags]


# == point 9: --include that matches nothing ==================================================


def test_fleet_groups_are_what_the_messages_name(fleet: Fleet) -> None:
    assert "layers.0.experts.0" in fleet.groups and "embeddings" in fleet.groups


@pytest.mark.parametrize("flags,needles", [
    (["--include", "layer.0.*"], ["'layer.0.*'", "match no group of release v1", "embeddings",
                                  "--include"]),
    (["--include", "layers.0.*", "--include", "nope"], ["'nope'", "embeddings"]),
    (["--include", ""], ["--include", "non-empty"]),
    (["--include", "  "], ["--include", "non-empty"]),
], ids=["typo", "one of two", "empty", "blank"])
def test_init_refuses_include_matching_nothing(fleet: Fleet, tmp_path: Path, flags: list[str],
                                               needles: list[str]) -> None:
    box = Sandbox.new(tmp_path / "box")
    r = Refusal.expect(box)
    r.check(box.agent(*init_flags(fleet, box, *flags)), 2, *needles)
    assert not box.config.exists() and not box.dev.exists()


def test_init_accepts_include_that_matches(fleet: Fleet, tmp_path: Path) -> None:
    box = Sandbox.new(tmp_path / "box")
    ok(box.agent(*init_flags(fleet, box, "--include", "layers.0.*")))
    assert 'include = ["layers.0.*"]' in box.config.read_text()


@pytest.mark.parametrize("include,needles", [
    ('["layer.0.*"]', ["'layer.0.*'", "match no group of release v1", "embeddings"]),
    ('"layers.0.*"', ["include", "list of non-empty group-name patterns"]),
    ('["layers.0.*", ""]', ["include", "non-empty"]),
    ("[1]", ["include"]),
], ids=["matches nothing", "a string", "an empty pattern", "not text"])
def test_run_refuses_include_matching_nothing(fleet: Fleet, tmp_path: Path, include: str,
                                              needles: list[str]) -> None:
    """The device is at v1; its `include` was edited since. Every run refuses it."""
    box = device(fleet, tmp_path, include=include)
    for cmd in (["run", "--once"], ["run", "--once"]):  # every run, not only the first
        r = Refusal.expect(box)
        r.check(box.agent(*cmd, "--config", box.config), 2, *needles)


def test_first_install_refuses_include_matching_nothing(fleet: Fleet, moe_family: MoEFamily,
                                                        tmp_path: Path) -> None:
    """`init` before the first release cannot check `include`; the run refuses it before it
    downloads anything (nothing is installed, no object is fetched)."""
    box = Sandbox.new(tmp_path / "box")
    store = tmp_path / "store"
    store.mkdir()
    ok(box.publish("init", "--store", store, "--key", fleet.keys / "release.key",
                   "--out", tmp_path / "root.json"))
    ok(box.agent("init", "--store", store, "--trust", tmp_path / "root.json", "--model-dir",
                 box.dev, "--config", box.config, "--include", "layers.9.*"))
    ok(box.publish("release", moe_family.v1, "--store", store, "--version", "v1", "--key",
                   fleet.keys / "release.key", "--cache-dir", tmp_path / "cache"))
    r = Refusal.expect(box)
    line = r.check(box.agent("run", "--once", "--config", box.config), 2, "'layers.9.*'",
                   "match no group of release v1", "layers.0.experts.0")
    assert "updated" not in line
    assert not os.path.lexists(box.dev / "current")
    assert not any((box.dev / "objects").iterdir()) if (box.dev / "objects").exists() else True
    downloads = box.dev / ".deltaship" / "downloads"
    assert not downloads.exists() or not any(downloads.iterdir())


# == point 11: configuration values, unwritable directories, dates, S3 set-up ==================

CONFIG_CASES: dict[str, tuple[dict[str, str | None], list[str]]] = {
    "interval text": ({"interval": '"fast"'}, ['interval = "fast"', "number"]),
    "keep text": ({"keep": '"2"'}, ['keep = "2"', "whole number"]),
    "keep negative": ({"keep": "-1"}, ["keep = -1", "from 0"]),
    "keep float": ({"keep": "2.5"}, ["keep = 2.5", "whole number"]),
    "max_rate text": ({"max_rate": '"1M"'}, ['max_rate = "1M"', "bytes per second"]),
    "store number": ({"store": "5"}, ["store = 5", "store URL"]),
    "hooks text": ({"hooks": '"x"'}, ['hooks = "x"', "table"]),
    "hooks bad kind": ({"hooks": '{notify = [{kind = "ftp"}]}'}, ["hooks", "kind"]),
    "interval nan": ({"interval": "nan"}, ["interval = nan"]),
    "interval bool": ({"interval": "true"}, ["interval = true"]),
    "downloads zero": ({"downloads": "0"}, ["downloads = 0"]),
    "expiry grace overflow": ({"expiry_grace": "1e12"}, ["expiry_grace", "from 0 to"]),
    "missing store": ({"store": None}, ["missing setting 'store'"]),
    "missing model_dir": ({"model_dir": None}, ["missing setting 'model_dir'"]),
    "unknown setting": ({"intervall": "5"}, ["unknown setting 'intervall'"]),
    "three wrong": ({"interval": '"fast"', "keep": '"2"', "store": None},
                    ["3 wrong settings", "interval", "keep", "'store'"]),
}


@pytest.mark.parametrize("settings,needles", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
@pytest.mark.parametrize("cmd", [["run", "--once"], ["status"], ["verify"]])
def test_wrong_configuration_is_one_line(fleet: Fleet, tmp_path: Path, cmd: list[str],
                                         settings: dict[str, str | None],
                                         needles: list[str]) -> None:
    box = device(fleet, tmp_path, **settings)
    r = Refusal.expect(box, model_untouched=True)
    line = r.check(box.agent(*cmd, "--config", box.config), 2, str(box.config), *needles)
    assert "positional argument" not in line and "__init__" not in line


@pytest.mark.parametrize("content", [
    b"\xff\xfe\x00garbage\x80", b"\x00" * 64, b"store = [\n", b"store = 'a'\nstore = 'b'\n",
], ids=["not utf-8", "nul bytes", "truncated", "duplicate key"])
def test_garbage_configuration_is_one_line(fleet: Fleet, tmp_path: Path, content: bytes) -> None:
    box = device(fleet, tmp_path)
    box.config.write_bytes(content)
    r = Refusal.expect(box, model_untouched=True)
    r.check(box.agent("run", "--once", "--config", box.config), 2, str(box.config))


def test_configuration_written_by_init_is_valid(fleet: Fleet, tmp_path: Path) -> None:
    box = Sandbox.new(tmp_path / "box")
    ok(box.agent(*init_flags(fleet, box, "--keep", "0", "--max-rate", "1000",
                             "--expiry-grace", "86400", "--include", "layers.*")))
    ok(box.agent("status", "--config", box.config))


INIT_FLAG_CASES = {
    "expiry grace overflow": (["--expiry-grace", "1e12"], ["--expiry-grace", "from 0 to"]),
    "expiry grace inf": (["--expiry-grace", "inf"], ["--expiry-grace"]),
    "interval overflow": (["--interval", "1e300"], ["--interval"]),
    "interval below 1": (["--interval", "0"], ["--interval"]),
    "keep not a number": (["--keep", "two"], ["--keep"]),
}


@pytest.mark.parametrize("flags,needles", INIT_FLAG_CASES.values(), ids=INIT_FLAG_CASES.keys())
def test_init_flag_values_are_one_line(fleet: Fleet, tmp_path: Path, flags: list[str],
                                       needles: list[str]) -> None:
    box = Sandbox.new(tmp_path / "box")
    r = Refusal.expect(box)
    r.check(box.agent(*init_flags(fleet, box, *flags)), 2, *needles)
    assert not box.config.exists() and not box.dev.exists()


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    """A regular file where a directory should be (works as root, unlike chmod)."""
    (tmp_path / "box").mkdir(parents=True, exist_ok=True)
    f = tmp_path / "box" / "a-file"
    f.write_text("not a directory")
    return f


def test_init_with_unwritable_config_directory_pins_nothing(fleet: Fleet, tmp_path: Path,
                                                            blocker: Path) -> None:
    box = Sandbox.new(tmp_path / "box")
    r = Refusal.expect(box)
    r.check(box.agent(*init_flags(fleet, box)[:-4], "--config", blocker / "agent.toml",
                      "--device-id", "dev-1"), 2, "cannot write the agent configuration")
    assert not (box.dev / ".deltaship" / "root.json").exists()


def test_init_with_unwritable_model_directory_writes_no_configuration(
        fleet: Fleet, tmp_path: Path, blocker: Path) -> None:
    box = Sandbox.new(tmp_path / "box")
    cfg = box.top / "etc" / "deltaship" / "agent.toml"
    r = Refusal.expect(box)
    r.check(box.agent("init", "--store", fleet.store, "--trust", fleet.root, "--model-dir",
                      blocker / "dev", "--config", cfg), 2, "model directory", str(blocker))
    assert not (box.top / "etc").exists()


def test_reinit_failure_keeps_the_old_configuration(fleet: Fleet, tmp_path: Path,
                                                    blocker: Path) -> None:
    box = device(fleet, tmp_path)
    before = box.config.read_bytes()
    r = Refusal.expect(box, model_untouched=True)
    r.check(box.agent("init", "--store", fleet.store, "--trust", fleet.root, "--model-dir",
                      blocker / "dev", "--config", box.config), 2, "model directory")
    assert box.config.read_bytes() == before


def test_run_with_model_directory_under_a_file(fleet: Fleet, tmp_path: Path,
                                               blocker: Path) -> None:
    box = device(fleet, tmp_path, model_dir=json.dumps(str(blocker / "dev")))
    r = Refusal.expect(box, model_untouched=True)
    r.check(box.agent("run", "--once", "--config", box.config), 2, str(blocker))


def test_keygen_into_a_file(tmp_path: Path, blocker: Path) -> None:
    box = Sandbox.new(tmp_path / "box")
    r = Refusal.expect(box)
    r.check(box.publish("keygen", "--out", blocker / "keys"), 2, str(blocker))


def _read_only_run(ro: Path, cwd: Path, prog: str, *args: object
                   ) -> subprocess.CompletedProcess[str]:
    """Run ``prog`` with ``ro`` unwritable: mode 0555 for a normal user; for root (who ignores
    modes, as in CI) a read-only bind mount in a private mount namespace (util-linux)."""
    cmd = [str(BIN / prog), *map(str, args)]
    wrapped = cmd
    if os.geteuid() == 0:
        script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
        wrapped = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                   str(ro), *cmd]
    p = subprocess.run(wrapped, cwd=cwd, env=_env(cwd), text=True, capture_output=True,
                       timeout=300)
    p.args = cmd  # the program whose one error line is checked
    return p


@pytest.mark.parametrize("which", ["config", "model", "keys"])
def test_read_only_directories(fleet: Fleet, tmp_path: Path, which: str) -> None:
    box = Sandbox.new(tmp_path / "box")
    ro = box.top / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = Refusal.expect(box)
        if which == "keys":
            p = _read_only_run(ro, box.top, "deltaship-publish", "keygen", "--out", ro / "keys")
        elif which == "config":
            p = _read_only_run(ro, box.top, "deltaship-agent", *init_flags(fleet, box)[:-4],
                               "--config", ro / "a.toml")
        else:
            p = _read_only_run(ro, box.top, "deltaship-agent", "init", "--store", fleet.store,
                               "--trust", fleet.root, "--model-dir", ro / "dev",
                               "--config", box.config)
        r.check(p, 2, str(ro))
        assert not box.config.exists()
    finally:
        ro.chmod(0o755)


def test_expires_days_overflow(tmp_path: Path, fleet: Fleet) -> None:
    box = Sandbox.new(tmp_path / "box")
    (box.top / "store").mkdir()
    r = Refusal.expect(box)
    r.check(box.publish("init", "--store", box.top / "store", "--key",
                        fleet.keys / "release.key", "--expires-days", "3000000"), 2,
            "--expires-days", "3000000")


def _resign(path: Path, keys: Path, edit: dict[str, object], kind: type[Root | Manifest]) -> None:
    """Edit and re-sign a root, or a manifest AND the timestamp around it."""
    doc = json.loads(path.read_bytes())
    (key,) = load_signing_keys([keys / "release.key"])
    signed = {**doc["signed"], **edit}
    if kind is Manifest:
        signed["manifest"] = {**signed["manifest"], **edit}
        Timestamp.from_dict(signed)  # still a valid document
        path.write_bytes(manifest_wire(signed, [key.sign(signed)],
                                       [key.sign(signed["manifest"])]))
        return
    kind.from_dict(signed)
    path.write_bytes(sign_document(signed, [key]))


YEAR_9999 = "9999-12-31T23:59:59Z"


def test_documents_expiring_in_year_9999(fleet: Fleet, moe_family: MoEFamily,
                                         tmp_path: Path) -> None:
    """A root and a manifest that expire at the calendar's end are valid, with any grace."""
    box = Sandbox.new(tmp_path / "box")
    shutil.copytree(fleet.store, box.top / "store")
    _resign(box.top / "store" / "root.json", fleet.keys, {"expires": YEAR_9999}, Root)
    shutil.copy(box.top / "store" / "root.json", box.top / "store" / "roots" / "1.json")
    _resign(box.top / "store" / "manifest.json", fleet.keys, {"expires": YEAR_9999}, Manifest)
    assert "v1" in ok(box.publish("history", "--store", box.top / "store")).stdout
    ok(box.agent("init", "--store", box.top / "store", "--trust", box.top / "store/root.json",
                 "--model-dir", box.dev, "--config", box.config, "--expiry-grace", "86400"))
    assert "v1" in ok(box.agent("run", "--once", "--config", box.config)).stdout


@pytest.mark.parametrize("prog", ["deltaship-publish", "deltaship-agent"])
@pytest.mark.parametrize("case", ["unknown AWS_PROFILE", "malformed --endpoint-url"])
def test_s3_setup_errors(fleet: Fleet, tmp_path: Path, prog: str, case: str) -> None:
    box = Sandbox.new(tmp_path / "box")
    env = {"AWS_PROFILE": "no-such-profile"} if case == "unknown AWS_PROFILE" else {}
    endpoint = ["--endpoint-url", "http://[::1"] if case != "unknown AWS_PROFILE" else []
    needle = "no-such-profile" if env else "endpoint"
    if prog == "deltaship-publish":
        r = Refusal.expect(box)
        r.check(box.publish("history", "--store", "s3://bucket/prefix", *endpoint, **env), 2,
                needle)
        return
    ok(box.agent("init", "--store", "s3://bucket/prefix", "--trust", fleet.root, "--model-dir",
                 box.dev, "--config", box.config, *endpoint))
    r = Refusal.expect(box, model_untouched=True)
    r.check(box.agent("run", "--once", "--config", box.config, **env), 2, needle)


# == point 12: exit codes that mislead ========================================================


@pytest.mark.parametrize("version", ["v 2", "../v2", "", "v2/../x", "-" * 200])
def test_invalid_version_is_local(fleet: Fleet, moe_family: MoEFamily, tmp_path: Path,
                                  version: str) -> None:
    box = Sandbox.new(tmp_path / "box")
    shutil.copytree(fleet.store, box.top / "store")
    r = Refusal.expect(box)
    r.check(box.publish("release", moe_family.v2, "--store", box.top / "store", "--version",
                        version, "--key", fleet.keys / "release.key", "--cache-dir",
                        box.top / "cache"), 2, "--version", "not a valid version")


def _trust_files(fleet: Fleet, d: Path) -> Iterator[tuple[str, Path]]:
    good = json.loads(fleet.root.read_bytes())
    cases: dict[str, bytes] = {
        "not json": b"root",
        "empty object": b"{}",
        "binary": b"\xff\x00\xfe",
        "bad signature": json.dumps({**good, "signed": {**good["signed"], "version": 2}}).encode(),
        "no signatures": json.dumps({**good, "signatures": []}).encode(),
        "expired": b"",
    }
    for name, data in cases.items():
        p = d / f"{name.replace(' ', '-')}.json"
        if name == "expired":
            p.write_bytes(fleet.root.read_bytes())
            _resign(p, fleet.keys, {"expires": "2001-01-01T00:00:00Z"}, Root)
        else:
            p.write_bytes(data)
        yield name, p


def test_malformed_local_trust_file_is_local(fleet: Fleet, tmp_path: Path) -> None:
    box = Sandbox.new(tmp_path / "box")
    for name, trust in _trust_files(fleet, box.top):
        r = Refusal.expect(box)
        line = r.check(box.agent("init", "--store", fleet.store, "--trust", trust,
                                 "--model-dir", box.dev, "--config", box.config), 2, str(trust))
        assert "not a usable trust root" in line, (name, line)
        assert not box.config.exists() and not box.dev.exists()


def test_verify_on_damaged_files_exits_2(fleet: Fleet, tmp_path: Path) -> None:
    box = device(fleet, tmp_path)
    victim = box.dev / "current" / "layers.1.experts.2.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.chmod(0o644)
    victim.write_bytes(bytes(data))
    r = Refusal.expect(box, model_untouched=True)
    r.check(box.agent("verify", "--config", box.config), 2, "v1", "1 damaged file",
            "layers.1.experts.2.safetensors", "verify --repair")


def test_history_of_a_store_without_a_root(tmp_path: Path, fleet: Fleet) -> None:
    box = Sandbox.new(tmp_path / "box")
    (box.top / "typo").mkdir()
    r = Refusal.expect(box)
    r.check(box.publish("history", "--store", box.top / "typo"), 2, "no trust root",
            "deltaship-publish init")
    shutil.copytree(fleet.store, box.top / "store")
    assert "v1" in ok(box.publish("history", "--store", box.top / "store")).stdout


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    box = Sandbox.new(tmp_path / "box")
    r = Refusal.expect(box)
    r.check(box.agent("run", "--no-such-flag"), 2, "--no-such-flag", "deltaship-agent run --help")
    r.check(box.publish("frobnicate"), 2, "frobnicate")


# -- one table of exit codes: code, README, docs/ERRORS.md, --help ------------------------------


def _doc_table(path: Path) -> dict[int, str]:
    rows = re.findall(r"^\| (\d+) \| ([^|]+?) \|", path.read_text(), re.MULTILINE)
    return {int(code): meaning for code, meaning in rows}


def _help_table(prog: str, tmp_path: Path) -> dict[int, str]:
    out = ok(run(tmp_path, prog, "--help")).stdout
    block = out.split("Exit codes:", 1)[1].split("\n\n", 1)[0]
    return {int(m[0]): m[1] for m in re.findall(r"^\s+(\d+)\s+(.+?)\s*$", block, re.MULTILINE)}


def test_one_table_of_exit_codes(tmp_path: Path) -> None:
    assert _doc_table(REPO / "README.md") == EXIT_CODES
    assert _doc_table(REPO / "docs" / "ERRORS.md") == EXIT_CODES
    for prog in ("deltaship-publish", "deltaship-agent"):
        assert _help_table(prog, tmp_path) == EXIT_CODES, prog


def test_every_error_class_has_its_code_in_the_table() -> None:
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.DeltashipError)]
    assert len(classes) > 20
    assert {c.exit_code for c in classes} <= set(EXIT_CODES)
