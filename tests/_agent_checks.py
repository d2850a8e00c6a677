"""Devices run by the real ``deltaship-agent`` and checks of their model directory from outside.

:class:`Dev` is one device: its configuration file and model directory; every command is the
real console script in a subprocess. Devices are cloned with ``cp -a`` (hard links between
``objects/`` and ``versions/`` survive, as the agent's garbage collector relies on them).

The checks read the store's release indexes directly (what the publisher released, not what
the device saved) and re-hash the device's files themselves: :func:`check_layout` asserts the
crash invariants of ``edge_agent/layout.py`` at any instant; :func:`leftovers` lists what a
finished update should not leave behind; :func:`official_tensors` opens a model with the
official safetensors library.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import deserialize, safe_open

from edge_agent.config import load_config, save_config
from edge_agent.layout import META_DIR, STALE_TMP_SECONDS
from manifest.constants import WEIGHT_INDEX_FILE as INDEX
from manifest.safetensors_format import SafetensorsFile

BIN = Path(sys.executable).parent


def agent_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k != "DELTASHIP_AGENT_CONFIG"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


# -- what was released --------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """The expected content of one version, from the store's release index."""

    version: str
    groups: dict[str, str]  # group file -> sha256
    files: dict[str, str]  # other file path -> sha256
    weight_map: dict[str, str]
    index_sha256: str
    index_length: int
    # The packed forms of the index its record names (zstd, deltas): sha256 -> length.
    index_forms: dict[str, int] = dataclasses.field(default_factory=dict)
    index_deltas: dict[str, str] = dataclasses.field(default_factory=dict)  # from -> delta

    @property
    def expected(self) -> dict[str, str]:
        return {**self.groups, **self.files}


def store_releases(store: Path) -> dict[str, Release]:
    """Every release of a local store, read from its release records and index objects."""
    out = {}
    for p in sorted((store / "releases").glob("*.json")):
        record = json.loads(p.read_text())["signed"]  # a release-signed record
        sha, length = record["index"]["sha256"], record["index"]["length"]
        data = (store / "objects" / sha).read_bytes()
        assert len(data) == length and hashlib.sha256(data).hexdigest() == sha
        index = json.loads(data)  # unsigned, pinned by the record
        groups = {g["file"]: g["sha256"] for g in index["groups"]}
        files = {f["path"]: f["sha256"] for f in index["files"]}
        wm = {t["name"]: g["file"] for g in index["groups"] for t in g["tensors"]}
        ref = record["index"]
        forms = {f["sha256"]: f["length"] for f in [ref.get("zstd"), *ref.get("deltas", [])]
                 if f is not None}
        deltas = {d["from"]: d["sha256"] for d in ref.get("deltas", [])}
        out[index["version"]] = Release(index["version"], groups, files, wm, sha, length, forms,
                                        deltas)
    return out


# -- devices -------------------------------------------------------------------------------


class Dev:
    def __init__(self, model_dir: Path, config: Path) -> None:
        self.model_dir = model_dir
        self.config = config

    @classmethod
    def init(cls, root_json: Path, store: str, model_dir: Path, *extra: object) -> Dev:
        dev = cls(model_dir, model_dir.parent / f"{model_dir.name}.toml")
        dev.run("init", "--store", store, "--trust", root_json, "--model-dir", model_dir,
                "--device-id", model_dir.name, *extra)
        return dev

    def clone(self, model_dir: Path, **changes: Any) -> Dev:
        """A copy of this device at ``model_dir`` (hard links kept), config fields changed."""
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", str(self.model_dir), str(model_dir)], check=True)
        cfg = dataclasses.replace(load_config(self.config), model_dir=model_dir, **changes)
        dev = Dev(model_dir, model_dir.parent / f"{model_dir.name}.toml")
        save_config(cfg, dev.config)
        return dev

    def reconfigure(self, **changes: Any) -> None:
        save_config(dataclasses.replace(load_config(self.config), **changes), self.config)

    def cmd(self, *args: object) -> list[str]:
        return [str(BIN / "deltaship-agent"), *map(str, args), "--config", str(self.config)]

    def run(self, *args: object, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(self.cmd(*args), env=agent_env(), text=True,
                           capture_output=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"deltaship-agent {' '.join(map(str, args))} failed "
                                 f"({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    def popen(self, *args: object) -> subprocess.Popen[str]:
        return subprocess.Popen(self.cmd(*args), env=agent_env(), text=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def status(self) -> dict[str, Any]:
        return json.loads(self.run("status", "--json").stdout)  # type: ignore[no-any-return]

    def current(self) -> str | None:
        try:
            return Path(os.readlink(self.model_dir / "current")).name
        except FileNotFoundError:
            return None

    @property
    def live(self) -> Path:
        return self.model_dir / "current"

    @property
    def meta(self) -> Path:
        return self.model_dir / META_DIR

    def remove(self) -> None:
        shutil.rmtree(self.model_dir, ignore_errors=True)
        self.config.unlink(missing_ok=True)


# -- checks ---------------------------------------------------------------------------------


class Hasher:
    """sha256 of files, each inode hashed once (version files are hard links to objects)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, int], str] = {}

    def __call__(self, path: Path) -> str:
        st = path.stat()
        key = (st.st_dev, st.st_ino)
        if key not in self._seen:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
            self._seen[key] = h.hexdigest()
        return self._seen[key]


def _files_under(d: Path) -> dict[str, Path]:
    return {p.relative_to(d).as_posix(): p for p in d.rglob("*") if p.is_file()}


def check_version_dir(vdir: Path, rel: Release, sha: Hasher) -> None:
    """A version directory holds exactly the released files, each with its pinned sha256."""
    files = _files_under(vdir)
    assert set(files) == set(rel.expected) | {INDEX}, (
        f"{vdir}: files {sorted(set(files) ^ (set(rel.expected) | {INDEX}))} differ")
    bad = [n for n, want in rel.expected.items() if sha(files[n]) != want]
    assert not bad, f"{vdir}: {bad} do not hash to the release index"
    index = json.loads(files[INDEX].read_text())
    assert index["weight_map"] == rel.weight_map, f"{vdir}: wrong {INDEX}"


def check_layout(model_dir: Path, releases: dict[str, Release],
                 allowed: set[str | None]) -> str | None:
    """The crash invariants, checked from outside at any instant; returns the live version.

    Every file in ``objects/`` has the content its name says; every directory in
    ``versions/`` is a complete release; ``current`` is absent or a relative link to one of
    them, a version in ``allowed``, whose release index the device kept with the pin it was
    verified against.
    """
    sha = Hasher()
    objects = model_dir / "objects"
    if objects.is_dir():
        wrong = [p.name for p in objects.iterdir() if sha(p) != p.name]
        assert not wrong, f"objects whose content differs from their name: {wrong}"
    versions = model_dir / "versions"
    if versions.is_dir():
        for vdir in versions.iterdir():
            assert vdir.name in releases, f"unexpected version directory {vdir}"
            check_version_dir(vdir, releases[vdir.name], sha)
    link = model_dir / "current"
    if not os.path.lexists(link):
        assert None in allowed, "current is missing"
        return None
    target = os.readlink(link)
    version = Path(target).name
    assert target == f"versions/{version}", f"current -> {target}"
    assert version in allowed, f"current is {version}, expected one of {allowed}"
    assert (versions / version).is_dir(), f"current -> {target}, which does not exist"
    indexes = model_dir / META_DIR / "indexes"
    saved = (indexes / f"{version}.json").read_bytes()
    rel = releases[version]
    assert len(saved) == rel.index_length and sha(indexes / f"{version}.json") == rel.index_sha256
    # The pin it is re-verified against (the index is unsigned) is the one the store released.
    assert json.loads((indexes / f"{version}.pin.json").read_text()) == {
        "sha256": rel.index_sha256, "length": rel.index_length}
    return version


def leftovers(model_dir: Path) -> list[str]:
    """What a finished update should not leave: partial work, temp files, orphan objects."""
    meta = model_dir / META_DIR
    out = [str(p.relative_to(model_dir)) for d in ("downloads", "staging", "tmp")
           for p in (meta / d).iterdir()] if meta.is_dir() else []
    out += [p.name for p in model_dir.glob(".current.tmp-*")]
    # Temp files of atomic writes: the agent removes those of the index at once, those next
    # to state.json (which other commands write too) once they are stale.
    now = time.time()
    out += [str(p.relative_to(model_dir)) for p in meta.rglob(".tmp-*")
            if p.parent != meta or now - p.stat().st_mtime > STALE_TMP_SECONDS]
    linked = {p.stat().st_ino for p in (model_dir / "versions").rglob("*") if p.is_file()}
    out += [f"orphan objects/{p.name}" for p in (model_dir / "objects").iterdir()
            if p.stat().st_ino not in linked]
    return out


def official_tensors(model_dir: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """Every tensor, through the official safetensors library: via the index when present.

    ``safe_open`` lists names, dtypes and shapes; ``deserialize`` gives the raw bytes (numpy
    has no bfloat16, so the bytes are compared, never the values).
    """
    index = model_dir / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    out: dict[str, tuple[str, list[int], bytes]] = {}
    for name in files:
        path = model_dir / name
        with safe_open(str(path), framework="numpy") as st:
            meta = {k: (st.get_slice(k).get_dtype(), list(st.get_slice(k).get_shape()))
                    for k in st.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
        for k, d in deserialize(path.read_bytes()):
            assert meta[k] == (d["dtype"], list(d["shape"]))
            out[k] = (d["dtype"], list(d["shape"]), bytes(d["data"]))
    if weight_map is not None:
        assert {k: weight_map[k] for k in out} == weight_map, "index and files disagree"
    return out


def raw_tensors(model_dir: Path) -> dict[str, bytes]:
    """Every tensor's bytes through deltaship's own strict reader."""
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with SafetensorsFile(f) as st:
            for t in st.tensors.values():
                out[t.name] = st.read(t)
    return out


def assert_same_model(live: Path, released: Path) -> None:
    """The device's live directory holds the released tensors and files, byte for byte."""
    mine, theirs = official_tensors(live), official_tensors(released)
    assert mine.keys() == theirs.keys()
    diff = [k for k in mine if mine[k] != theirs[k]]
    assert not diff, f"tensors differ from the release: {diff[:5]}"
    assert raw_tensors(live) == raw_tensors(released)
    for p in released.iterdir():
        if p.suffix != ".safetensors" and p.name != INDEX:
            assert (live / p.name).read_bytes() == p.read_bytes(), p.name
