"""Issue 9, the publisher's input: model directories (8), its cache (15), key files (16).

Every case drives real ``deltaship-publish`` processes and checks the exact exit code, one
line on stderr without a traceback, and that nothing was written outside where it belongs
(the store, the cache, the working directory's files are compared before and after).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import zstandard

from devtools import modelgen
from manifest.constants import WEIGHT_INDEX_FILE
from manifest.errors import ModelError, OversizeError
from manifest.metadata import ReleaseIndex
from manifest.safetensors_format import SafetensorsFile
from manifest.storage.store import StoreOptions, open_store
from publisher import ship_files
from publisher.cache import PublisherCache

from ._device import current_index
from .conftest import BIN, Cli, MoEFamily
from .test_publish_errors import _one_line_error

Snapshot = dict[str, tuple[int, int]]


def _tree(*roots: Path) -> Snapshot:
    """Every file (and symlink) under ``roots``: size and modification time. The cache's empty
    ``.lock`` file (flock only, taken by every release) is not content and not listed."""
    out: Snapshot = {}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for fn in files:
                p = Path(dirpath, fn)
                if fn == ".lock" and p.stat().st_size == 0:
                    continue
                st = p.lstat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def env(cli: Cli, tmp_path: Path) -> dict[str, str]:
    """HOME and XDG_CACHE_HOME inside the test directory: the default cache lands there."""
    (tmp_path / "home").mkdir()
    return cli.env(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "xdg"))


@pytest.fixture
def store(cli: Cli, release_key: Path, env: dict[str, str], tmp_path: Path) -> Path:
    """An initialised directory store."""
    d = tmp_path / "store"
    d.mkdir()
    cli.publish("init", "--store", d, "--key", release_key, env=env)
    return d


def _release(cli: Cli, env: dict[str, str], store: Path, model: Path, version: str,
             key: Path, *extra: object, check: bool = False) -> subprocess.CompletedProcess[str]:
    return cli.publish("release", model, "--store", store, "--version", version, "--key", key,
                       "--cache-dir", cli.cwd / "cache", *extra, env=env, check=check)


def _index(store: Path) -> ReleaseIndex:
    return current_index(open_store(str(store)), (store / "root.json").read_bytes())[1]


# --------------------------------------------------------------------------- 8: model input


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_index_naming_a_file_outside_the_directory_is_refused(
    cli: Cli, env: dict[str, str], store: Path, release_key: Path, moe_family: MoEFamily,
    tmp_path: Path, where: str,
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    shard = next(moe_family.v1.glob("*.safetensors"))
    shutil.copy(shard, outside / shard.name)
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(moe_family.v1 / "config.json", model)
    name = str(outside / shard.name) if where == "absolute" else f"../outside/{shard.name}"
    with SafetensorsFile(shard) as st:
        weight_map = dict.fromkeys(st.tensors, name)
    (model / WEIGHT_INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    before = _tree(tmp_path)
    p = _release(cli, env, store, model, "v1", release_key)
    _one_line_error(p, 2, WEIGHT_INDEX_FILE, repr(name), "refusing to read outside it")
    assert _tree(tmp_path) == before  # nothing read into the store or cache
    assert not (store / "objects").exists()


def _hf_snapshot(src: Path, cache: Path, with_subdir: bool = True) -> Path:
    """``src`` laid out as a Hugging Face cache entry: every file of the snapshot a relative
    symlink to ``../../blobs/<sha256>``; returns the snapshot directory."""
    repo = cache / "models--org--moe"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    files["tokenizer_config.json"] = b'{"model_max_length": 4096}'
    files[".gitattributes"] = b"*.safetensors filter=lfs\n"
    if with_subdir:
        files["1_Pooling/config.json"] = b'{"pooling_mode_mean_tokens": true}'
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        (blobs / sha).write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        depth = "../" * (name.count("/") + 2)
        link.symlink_to(f"{depth}blobs/{sha}")
    return snap


def test_hugging_face_cache_snapshot_ships_every_file(
    cli: Cli, env: dict[str, str], store: Path, release_key: Path, moe_family: MoEFamily,
    tmp_path: Path,
) -> None:
    snap = _hf_snapshot(moe_family.v1, tmp_path / "hf")
    shipped = ["1_Pooling/config.json", "config.json", "tokenizer.json", "tokenizer_config.json"]
    tensor_files = sorted(p.name for p in moe_family.v1.glob("*.safetensors"))
    hf_before = _tree(tmp_path / "hf")

    dry = _release(cli, env, store, snap, "v1", release_key, "--dry-run", "--json", check=True)
    d = json.loads(dry.stdout)
    assert (d["tensor_files"], sorted(d["other_files"])) == (tensor_files, shipped)
    assert d["skipped_files"] == [".gitattributes"]
    assert not (store / "objects").exists()

    text = _release(cli, env, store, snap, "v1", release_key, check=True)
    out = text.stdout
    assert f"other files shipped (4): {', '.join(d['other_files'])}" in out
    assert f"tensor files read ({len(tensor_files)}): {', '.join(tensor_files)}" in out
    assert "hidden, not shipped (1): .gitattributes" in out
    assert text.stderr == ""

    index = _index(store)
    assert sorted(f.path for f in index.files) == shipped
    for f in index.files:  # each file ships with the content its symlink points to
        obj = (store / f.object.key).read_bytes()
        data = zstandard.ZstdDecompressor().decompress(obj, max_output_size=f.length)
        assert data == (snap / f.path).read_bytes()
    assert _tree(tmp_path / "hf") == hf_before  # the Hugging Face cache is only read


def _peak_rss_of(cli: Cli, env: dict[str, str], report: Path, *args: object) -> int:
    """Peak RSS (bytes) of one ``deltaship-publish`` process, read by a tiny parent (the
    ru_maxrss of its only child), which must succeed."""
    code = ("import resource, subprocess, sys\n"
            "p = subprocess.run(sys.argv[2:])\n"
            "open(sys.argv[1], 'w').write(str(resource.getrusage("
            "resource.RUSAGE_CHILDREN).ru_maxrss * 1024))\n"
            "sys.exit(p.returncode)\n")
    p = subprocess.run([sys.executable, "-c", code, str(report),
                        str(BIN / "deltaship-publish"), *map(str, args)],
                       cwd=cli.cwd, env=env, text=True, capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return int(report.read_text())


def test_a_large_non_tensor_file_is_streamed_in_bounded_memory(
    cli: Cli, env: dict[str, str], store: Path, release_key: Path, moe_family: MoEFamily,
    tmp_path: Path,
) -> None:
    """A 256 MiB ``original/consolidated.00.pth`` beside the safetensors (as Hugging Face
    repositories of Llama ship) costs the release no more than a small fraction of its size
    in memory, measured against the same release without it; the stored object rebuilds
    the file exactly, and the next release reuses it without reading it into memory."""
    big = 256 << 20
    plain = tmp_path / "plain"
    shutil.copytree(moe_family.v1, plain)
    model = tmp_path / "model"
    shutil.copytree(moe_family.v1, model)
    (model / "original").mkdir()
    pth = model / "original" / "consolidated.00.pth"
    block = os.urandom(1 << 20)
    with open(pth, "wb") as f:
        for i in range(big >> 20):  # compressible, but every MiB differs from the last
            f.write(block[i:] + block[:i])
    other = tmp_path / "other-store"
    other.mkdir()
    cli.publish("init", "--store", other, "--key", release_key, env=env)
    baseline = _peak_rss_of(cli, env, tmp_path / "rss0", "release", plain, "--store", other,
                            "--version", "v1", "--key", release_key, "--cache-dir",
                            tmp_path / "cache0")
    rss = _peak_rss_of(cli, env, tmp_path / "rss1", "release", model, "--store", store,
                       "--version", "v1", "--key", release_key, "--cache-dir",
                       tmp_path / "cache1")
    assert rss < baseline + big // 4, (rss, baseline)

    entry = {f.path: f for f in _index(store).files}["original/consolidated.00.pth"]
    want = hashlib.sha256(pth.read_bytes()).hexdigest()
    assert (entry.sha256, entry.length) == (want, big)
    got = hashlib.sha256()
    with open(store / entry.object.key, "rb") as obj:
        assert hashlib.sha256(obj.read()).hexdigest() == entry.object.sha256
        obj.seek(0)
        reader = zstandard.ZstdDecompressor().stream_reader(obj)
        while chunk := reader.read(1 << 20):
            got.update(chunk)
    assert got.hexdigest() == want
    assert entry.object.length < big // 8

    objects = set(os.listdir(store / "objects"))
    (model / "config.json").write_text('{"note": "v2"}')
    again = _peak_rss_of(cli, env, tmp_path / "rss2", "release", model, "--store", store,
                         "--version", "v2", "--key", release_key, "--cache-dir",
                         tmp_path / "cache1")
    assert again < baseline + big // 4, (again, baseline)
    reused = {f.path: f for f in _index(store).files}["original/consolidated.00.pth"]
    assert reused.object == entry.object
    added = set(os.listdir(store / "objects")) - objects
    assert entry.object.sha256 not in added and len(added) <= 4  # index, its forms, config


def test_a_file_that_changes_while_it_is_shipped_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between hashing a large file and compressing it, another process appends to it: the
    release stops with a ModelError rather than ship bytes its index does not describe."""
    src = tmp_path / "weights.pth"
    src.write_bytes(os.urandom(1 << 16) * ((ship_files.SMALL_FILE >> 16) + 1))
    hash_file = ship_files.hash_file

    def hash_then_grow(path: Path) -> tuple[str, int]:
        out = hash_file(path)
        with open(path, "ab") as f:
            f.write(b"appended")
        return out

    monkeypatch.setattr(ship_files, "hash_file", hash_then_grow)
    with pytest.raises(ModelError, match="changed while it was read"):
        ship_files.ship_file(src, "weights.pth", {}, tmp_path / "staged", 3)

    same_size = tmp_path / "same-size.pth"
    same_size.write_bytes(src.read_bytes())

    def hash_then_flip(path: Path) -> tuple[str, int]:
        out = hash_file(path)
        with open(path, "r+b") as f:
            f.seek(12345)
            byte = f.read(1)
            f.seek(12345)
            f.write(bytes([byte[0] ^ 1]))
        return out

    monkeypatch.setattr(ship_files, "hash_file", hash_then_flip)
    with pytest.raises(ModelError, match="changed while it was read"):
        ship_files.ship_file(same_size, "same-size.pth", {}, tmp_path / "staged", 3)


@pytest.mark.parametrize("bad", ["dangling", "directory", "fifo", "unsafe-name"])
def test_unusable_entries_are_refused_not_skipped(
    cli: Cli, env: dict[str, str], store: Path, release_key: Path, moe_family: MoEFamily,
    tmp_path: Path, bad: str,
) -> None:
    model = tmp_path / "model"
    shutil.copytree(moe_family.v1, model)
    entry = model / "extra"
    if bad == "dangling":
        entry.symlink_to("../nowhere/blob")
        needles = ["'extra'", "dangling symlink"]
    elif bad == "directory":
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "secret.txt").write_text("x")
        entry.symlink_to(tmp_path / "elsewhere")
        needles = ["'extra'", "symlink to a directory"]
    elif bad == "fifo":
        os.mkfifo(entry)
        needles = [str(entry), "not a regular file"]
    else:
        (model / "bad\\name.json").write_text("{}")
        needles = ["cannot ship file", "unsafe file name"]
    before = _tree(store, tmp_path / "cache")
    p = _release(cli, env, store, model, "v1", release_key)
    _one_line_error(p, 2, *needles)
    assert _tree(store, tmp_path / "cache") == before


def test_inspect_lists_symlinked_files(cli: Cli, env: dict[str, str], moe_family: MoEFamily,
                                       tmp_path: Path) -> None:
    snap = _hf_snapshot(moe_family.v1, tmp_path / "hf", with_subdir=False)
    p = cli.publish("inspect", snap, "--json", env=env)
    d = json.loads(p.stdout)
    assert d["files"] == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    assert d["skipped_files"] == [".gitattributes"]
    assert d["tensor_files"] == sorted(f.name for f in moe_family.v1.glob("*.safetensors"))
    text = cli.publish("inspect", snap, env=env).stdout
    assert "  file tokenizer_config.json\n" in text
    assert "  skipped (hidden) .gitattributes\n" in text


def test_exclude_leaves_out_other_files_and_says_so(
    cli: Cli, env: dict[str, str], store: Path, release_key: Path, moe_family: MoEFamily,
    tmp_path: Path,
) -> None:
    """``--exclude 'original/' --exclude '*.bin'``, as one leaves out the duplicate weights of
    a Hugging Face Llama repository: those files are listed as excluded (text and --json, by
    inspect and release), the index does not name them, the store has no object of them."""
    model = tmp_path / "model"
    shutil.copytree(moe_family.v1, model)
    (model / "original").mkdir()
    (model / "original" / "consolidated.00.pth").write_bytes(b"duplicate weights" * 1000)
    (model / "original" / "params.json").write_text('{"dim": 64}')
    (model / "training_args.bin").write_bytes(b"pickle" * 100)
    excl = ["--exclude", "original/", "--exclude", "*.bin"]
    # in the order of the walk: a directory's files, then its subdirectories
    excluded = ["training_args.bin", "original/consolidated.00.pth", "original/params.json"]

    d = json.loads(cli.publish("inspect", model, *excl, "--json", env=env).stdout)
    assert (d["files"], d["excluded_files"]) == (["config.json", "tokenizer.json"], excluded)
    text = cli.publish("inspect", model, *excl, env=env).stdout
    assert "  skipped (--exclude) original/params.json\n" in text

    out = _release(cli, env, store, model, "v1", release_key, *excl, check=True).stdout
    assert f"excluded, not shipped (3): {', '.join(excluded)}" in out
    index = _index(store)
    assert sorted(f.path for f in index.files) == ["config.json", "tokenizer.json"]
    shipped = {f.object.sha256 for f in index.files}
    for rel in excluded:  # no object in the store holds any of them
        frame = zstandard.ZstdCompressor(level=19).compress((model / rel).read_bytes())
        assert hashlib.sha256(frame).hexdigest() not in shipped
    assert len(shipped) == 2

    (model / "config.json").write_text('{"v": 2}')
    d = json.loads(_release(cli, env, store, model, "v2", release_key, *excl, "--json",
                            check=True).stdout)
    assert d["excluded_files"] == excluded and "original/params.json" not in d["other_files"]


@pytest.mark.parametrize("pattern", ["*.safetensors", "model-0000?-of-*", "*.json"])
def test_exclude_matching_a_tensor_file_is_refused(
    cli: Cli, env: dict[str, str], store: Path, release_key: Path, tmp_path: Path,
    moe_family: MoEFamily, pattern: str,
) -> None:
    """A pattern that would leave out a file the release reads for its tensors (a shard, the
    sharded-checkpoint index) is a mistake: exit 2, one line naming the file, nothing
    written."""
    if pattern == "*.safetensors":
        model = moe_family.v1
    else:  # sharded: two shards and their index
        model = modelgen.generate_moe(tmp_path / "sharded", modelgen.MoEConfig(
            layers=1, experts=2, hidden=32, ffn=64, vocab=64, shards=2, seed=1))
    shards = sorted(p.name for p in model.glob("*.safetensors"))
    before = _tree(store)
    p = _release(cli, env, store, model, "v1", release_key, "--exclude", pattern)
    hit = WEIGHT_INDEX_FILE if pattern == "*.json" else shards[0]
    _one_line_error(p, 2, f"--exclude {pattern!r} matches {hit}", "exclude only other files")
    assert _tree(store) == before


# --------------------------------------------------------------------------- 15: the cache


def _base_object(store: Path, group: str) -> Path:
    g = next(g for g in _index(store).groups if g.name == group)
    return store / g.full.key


def test_oversized_base_object_is_refused_before_download(
    cli: Cli, env: dict[str, str], store: Path, release_key: Path, moe_family: MoEFamily,
    tmp_path: Path,
) -> None:
    """Every base object 1 GiB (sparse) where the index pins a small one: refused at once, by
    its length, with nothing written to the cache."""
    _release(cli, env, store, moe_family.v1, "v1", release_key, "--cache-max-bytes", "0",
             check=True)
    for g in _index(store).groups:
        with open(store / g.full.key, "r+b") as f:
            f.truncate(1 << 30)
    cache = tmp_path / "cache"
    before = _tree(store, cache)
    t0 = time.monotonic()
    p = _release(cli, env, store, moe_family.v2, "v2", release_key)
    elapsed = time.monotonic() - t0
    _one_line_error(p, 3, "full object of group", f"is {1 << 30} bytes in the store",
                    "longer than", "not downloaded")
    assert elapsed < 30  # the copy alone took 7 s; now one stat
    assert _tree(store, cache) == before
    assert PublisherCache(cache).usage().total_bytes == 0


def test_oversized_base_object_on_s3_is_refused_by_its_head(
    cli: Cli, bucket: str, release_key: Path, moe_family: MoEFamily, tmp_path: Path,
    env: dict[str, str],
) -> None:
    url = f"s3://{bucket}/m"
    cli.publish("init", "--store", url, "--key", release_key, env=env)
    cli.publish("release", moe_family.v1, "--store", url, "--version", "v1", "--key",
                release_key, "--cache-dir", tmp_path / "cache", "--cache-max-bytes", "0",
                env=env)
    s3 = boto3.client("s3", endpoint_url=cli.endpoint)
    root = s3.get_object(Bucket=bucket, Key="m/root.json")["Body"].read()
    index = current_index(open_store(url, StoreOptions(cli.endpoint)), root)[1]
    g = next(g for g in index.groups if g.name == "layers.0.experts.1")
    key = f"m/{g.full.key}"
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=body + b"\0" * (1 << 20))
    p = cli.publish("release", moe_family.v2, "--store", url, "--version", "v2", "--key",
                    release_key, "--cache-dir", tmp_path / "cache", "--cache-max-bytes", "0",
                    env=env, check=False)
    _one_line_error(p, 3, "layers.0.experts.1", "longer than", "not downloaded")
    assert PublisherCache(tmp_path / "cache").usage().total_bytes == 0
    assert [v["Key"] for v in s3.list_objects_v2(Bucket=bucket, Prefix="m/releases/")
            ["Contents"]] == ["m/releases/v1.json"]


def test_cache_is_bounded_and_can_be_shown_and_cleared(
    cli: Cli, env: dict[str, str], store: Path, release_key: Path, moe_family: MoEFamily,
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    cap = 200_000
    versions = [("v1", moe_family.v1), ("v2", moe_family.v2), ("v3", moe_family.v3),
                ("v4", moe_family.v4)]
    for v, model in versions:
        _release(cli, env, store, model, v, release_key, "--cache-max-bytes", str(cap),
                 check=True)
        info = json.loads(cli.publish("cache", "info", "--cache-dir", cache, "--json",
                                      env=env).stdout)
        assert info["bytes"] <= cap, (v, info)
    # v3 and v4 rebuilt base files (v2 and v3 contents): the cache keeps the newest of them.
    assert 0 < info["bytes"] <= cap and info["files"] >= 1
    assert info["path"] == str(cache)

    text = cli.publish("cache", "info", "--cache-dir", cache, env=env)
    assert text.stdout.startswith(f"{cache}: {info['files']} files")

    # `cache clear` waits for no release: while one holds the cache it is refused.
    with open(cache / ".lock", "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_SH)
        p = cli.publish("cache", "clear", "--cache-dir", cache, env=env, check=False)
        _one_line_error(p, 2, "a release is using the publisher cache", str(cache))
    assert json.loads(cli.publish("cache", "info", "--cache-dir", cache, "--json",
                                  env=env).stdout) == info

    cleared = json.loads(cli.publish("cache", "clear", "--cache-dir", cache, "--json",
                                     env=env).stdout)
    assert (cleared["files"], cleared["bytes"], cleared["removed"]) == (
        info["files"], info["bytes"], True)
    assert json.loads(cli.publish("cache", "info", "--cache-dir", cache, "--json",
                                  env=env).stdout)["bytes"] == 0


def test_default_cache_dir_follows_xdg_and_is_trimmed(
    cli: Cli, env: dict[str, str], store: Path, release_key: Path, moe_family: MoEFamily,
    tmp_path: Path,
) -> None:
    home_before = _tree(tmp_path / "home")
    for v, model in (("v1", moe_family.v1), ("v2", moe_family.v2)):
        cli.publish("release", model, "--store", store, "--version", v, "--key", release_key,
                    "--cache-max-bytes", "0", env=env)
    default = tmp_path / "xdg" / "deltaship" / "publisher"
    info = json.loads(cli.publish("cache", "info", "--json", env=env).stdout)
    assert info == {"path": str(default), "files": 0, "bytes": 0}
    assert not list((default / "groups").iterdir())
    assert not list(default.glob("release-*"))
    # Nothing of the cache under $HOME (the list of stores this machine signs lives there).
    def cache_free(tree: Snapshot) -> Snapshot:
        return {k: v for k, v in tree.items() if not k.endswith("deltaship/known-stores.json")}

    assert cache_free(_tree(tmp_path / "home")) == cache_free(home_before)


def test_cache_max_bytes_must_be_a_size(cli: Cli, env: dict[str, str], store: Path,
                                        release_key: Path, moe_family: MoEFamily) -> None:
    p = _release(cli, env, store, moe_family.v1, "v1", release_key, "--cache-max-bytes", "lots")
    assert p.returncode == 2
    assert "'lots' is not a size" in p.stderr
    assert "Traceback" not in p.stderr


def test_eviction_removes_least_recently_used_first(tmp_path: Path) -> None:
    cache = PublisherCache(tmp_path)
    cache.groups.mkdir(parents=True)
    now = time.time()
    for i, name in enumerate("abcd"):
        p = cache.group_path(name)
        p.write_bytes(b"x" * 100)
        os.utime(p, (now - 100 + i, now - 100 + i))  # a oldest ... d newest
    assert cache.lookup("a") is not None  # a use makes "a" the newest
    stale = tmp_path / "release-old"
    stale.mkdir()
    (stale / "full-x").write_bytes(b"y" * 10)
    os.utime(stale, (now - 2 * 86400, now - 2 * 86400))
    removed = cache.evict(200, now=now)
    assert sorted(p.stem for p in cache.groups.glob("*.safetensors")) == ["a", "d"]
    assert not stale.exists()
    assert (removed.files, removed.total_bytes) == (3, 210)


# --------------------------------------------------------------------------- 16: key files


@pytest.mark.parametrize(("command", "mode"), [
    ("init", 0o644), ("release", 0o644), ("release", 0o640), ("release", 0o604),
    ("revert", 0o644),
])
def test_private_key_readable_by_others_is_refused(
    cli: Cli, env: dict[str, str], release_key: Path, moe_family: MoEFamily, tmp_path: Path,
    command: str, mode: int,
) -> None:
    d = tmp_path / "store"
    d.mkdir()
    if command != "init":
        cli.publish("init", "--store", d, "--key", release_key, env=env)
    if command == "revert":
        for v, model in (("v1", moe_family.v1), ("v2", moe_family.v2)):
            _release(cli, env, d, model, v, release_key, check=True)
    args: list[object] = {
        "init": ["init", "--store", d],
        "release": ["release", moe_family.v1, "--store", d, "--version", "v1",
                    "--cache-dir", tmp_path / "cache"],
        "revert": ["revert", "--store", d, "--to", "v1"],
    }[command]
    release_key.chmod(mode)
    before = _tree(d, tmp_path / "cache")
    p = cli.publish(*args, "--key", release_key, env=env, check=False)
    _one_line_error(p, 2, str(release_key), f"mode {mode:04o}", f"chmod 600 {release_key}",
                    "--insecure-key-permissions")
    assert _tree(d, tmp_path / "cache") == before
    assert release_key.stat().st_mode & 0o777 == mode  # never changed behind the user's back

    ok = cli.publish(*args, "--key", release_key, "--insecure-key-permissions", "--json",
                     env=env)
    assert ok.returncode == 0 and ok.stderr == ""
    if command == "revert":
        assert json.loads(ok.stdout)["current"] == "v1"


def test_keygen_writes_a_key_the_commands_accept(cli: Cli, env: dict[str, str],
                                                 tmp_path: Path) -> None:
    cli.publish("keygen", "--out", tmp_path / "k", "--name", "a", env=env)
    key = tmp_path / "k" / "a.key"
    assert key.stat().st_mode & 0o777 == 0o600
    (tmp_path / "s").mkdir()
    p = cli.publish("init", "--store", tmp_path / "s", "--key", key, env=env)
    assert p.returncode == 0 and p.stderr == ""


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_download_stops_past_the_signed_length(kind: str, tmp_path: Path, bucket: str,
                                               s3_endpoint: str) -> None:
    """What `fetch_object` relies on if an object grows between its length check and the
    download: the store stops the transfer once more than the signed length arrived."""
    if kind == "file":
        (tmp_path / "store").mkdir()
        store = open_store(str(tmp_path / "store"))
    else:
        store = open_store(f"s3://{bucket}/m", StoreOptions(s3_endpoint))
    data = os.urandom(3 << 20)
    store.put("objects/x", data)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OversizeError, match="larger than its 1048576-byte cap"):
        store.download("objects/x", str(out / "x"), max_size=1 << 20)
    assert sum(p.stat().st_size for p in out.iterdir()) <= 1 << 20
    store.download("objects/x", str(out / "y"), max_size=len(data))
    assert (out / "y").read_bytes() == data


def test_cache_clear_removes_only_what_the_cache_owns(cli: Cli, env: dict[str, str],
                                                     tmp_path: Path) -> None:
    """A mistaken --cache-dir (a home directory, say) loses nothing but cache entries."""
    d = tmp_path / "not-a-cache"
    (d / "sub").mkdir(parents=True)
    (d / "precious.txt").write_text("keep me")
    (d / "sub" / "notes").write_text("and me")
    (d / "release-notes.md").write_text("and me too")  # a file, not a staging directory
    (d / "groups").mkdir()
    (d / "groups" / "ab.safetensors").write_bytes(b"z" * 10)
    (d / "release-x1").mkdir()
    (d / "release-x1" / "full-1").write_bytes(b"y" * 5)
    keep = {p: p.read_bytes() for p in (d / "precious.txt", d / "sub" / "notes",
                                        d / "release-notes.md")}
    before = json.loads(cli.publish("cache", "info", "--cache-dir", d, "--json",
                                    env=env).stdout)
    assert (before["files"], before["bytes"]) == (2, 15)
    out = json.loads(cli.publish("cache", "clear", "--cache-dir", d, "--json", env=env).stdout)
    assert (out["files"], out["bytes"]) == (2, 15)
    assert {p: p.read_bytes() for p in keep} == keep
    assert not (d / "release-x1").exists() and not list((d / "groups").iterdir())
