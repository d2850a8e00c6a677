"""The release pipeline's failure paths (issue 12; found in review): a full staging disk,
and Ctrl-C while a large non-tensor file is being shipped.

Real ``deltaship-publish`` processes against a directory store; the full disk is a small tmpfs
mounted for the test (root only: skipped otherwise).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import modelgen
from manifest.safetensors_format import SafetensorsFile
from manifest.storage.store import open_store

from ._device import current_index, materialise
from .conftest import BIN, Cli
from .test_publish_errors import _one_line_error


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: the publisher cache (and so the release's staging) lives on it."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    d = tmp_path / "small"
    d.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {p.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


@pytest.fixture
def store(cli: Cli, release_key: Path, tmp_path: Path) -> Path:
    d = tmp_path / "store"
    d.mkdir()
    cli.publish("init", "--store", d, "--key", release_key)
    return d


def _model(path: Path, hidden: int, extra: int) -> Path:
    cfg = modelgen.MoEConfig(layers=1, experts=2, hidden=hidden, ffn=2 * hidden,
                             vocab=4 * hidden, seed=11)
    model = modelgen.generate_moe(path, cfg)
    if extra:  # a non-tensor file that does not compress
        (model / "extra.bin").write_bytes(os.urandom(extra))
    return model


@pytest.mark.parametrize("what", ["group container", "non-tensor file"])
def test_a_full_staging_disk_names_the_cache_not_the_model(
    cli: Cli, store: Path, release_key: Path, small_disk: Path, tmp_path: Path, what: str,
) -> None:
    """Staging the objects fills the cache's disk: the one line says so and names the cache
    (not "cannot read" the model file, not "the working directory"), nothing is released and
    no staged file stays behind."""
    if what == "group container":
        model = _model(tmp_path / "model", hidden=256, extra=0)  # ~4 MB of random tensors
    else:
        model = _model(tmp_path / "model", hidden=16, extra=3 << 20)  # tiny tensors
    cache = small_disk / "cache"
    p = cli.publish("release", model, "--store", store, "--version", "v1", "--key",
                    release_key, "--cache-dir", cache, "--workers", "2", check=False)
    _one_line_error(p, 2, "no space left on the disk holding", str(cache))
    assert "cannot read" not in p.stderr and "working directory" not in p.stderr
    assert not (store / "manifest.json").exists()
    assert not list(cache.glob("release-*"))  # the staging went with the failed release


def test_a_large_group_waits_on_the_staging_disk_not_in_tmp(
    cli: Cli, store: Path, release_key: Path, small_disk: Path, tmp_path: Path,
) -> None:
    """A group whose coded payload passes the builder's 32 MiB in memory (a 65.5 MB
    embedding) spills the rest to the staging directory, not to $TMPDIR: with $TMPDIR on a
    1 MiB tmpfs (as /tmp is RAM on many distributions) the release succeeds, and a device
    rebuilds every group bit for bit from the store."""
    cfg = modelgen.MoEConfig(layers=1, experts=1, hidden=1024, ffn=64, vocab=32000, seed=3)
    model = modelgen.generate_moe(tmp_path / "model", cfg)
    env = cli.env(TMPDIR=str(small_disk))
    cli.publish("release", model, "--store", store, "--version", "v1", "--key", release_key,
                "--cache-dir", tmp_path / "cache", env=env)
    _, index = current_index(open_store(str(store)), (store / "root.json").read_bytes())
    big = max(index.groups, key=lambda g: g.full.length)
    assert big.full.length > 32 << 20  # it did pass the in-memory part
    out = tmp_path / "device"
    materialise(open_store(str(store)), index, out, {}, tmp_path / "work")
    with SafetensorsFile(model / "model.safetensors") as orig:  # one shard
        for g in index.groups:  # materialise checked each group's sha256; the tensors too:
            with SafetensorsFile(out / g.file) as built:
                for t in g.tensors:
                    assert built.read(built.tensors[t.name]) == orig.read(orig.tensors[t.name])
    assert os.listdir(small_disk) == []


def test_ctrl_c_while_a_large_file_is_shipped_stops_at_once(
    cli: Cli, store: Path, release_key: Path, tmp_path: Path,
) -> None:
    """SIGINT while a 20 MiB non-tensor file is streamed at level 19: the release says
    "interrupted" (exit 130) without compressing the rest of the file first. The anchor is the
    same release uninterrupted, in this run (almost all of it compressing that file)."""
    model = _model(tmp_path / "model", hidden=16, extra=20 << 20)
    args = ["release", model, "--version", "v1", "--key", release_key, "--level", "19",
            "--workers", "2"]
    other = tmp_path / "other-store"
    other.mkdir()
    cli.publish("init", "--store", other, "--key", release_key)
    t0 = time.monotonic()
    cli.publish(*args, "--store", other, "--cache-dir", tmp_path / "cache0")
    anchor = time.monotonic() - t0

    cache = tmp_path / "cache"
    cmd = [str(BIN / "deltaship-publish"), *map(str, args), "--store", str(store),
           "--cache-dir", str(cache)]
    p = subprocess.Popen(cmd, cwd=cli.cwd, env=cli.env(), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Every other file has its staged object open: the large one is being compressed.
        while len(list(cache.glob("release-*/file-*"))) < 3:
            assert p.poll() is None, p.communicate()
            time.sleep(0.01)
        p.send_signal(signal.SIGINT)
        t1 = time.monotonic()
        _, err = p.communicate(timeout=60 + 3 * anchor)
        stopped_after = time.monotonic() - t1
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert (p.returncode, err.strip()) == (130, "deltaship-publish: interrupted"), err
    assert stopped_after < anchor / 2, (stopped_after, anchor)
    assert not (store / "manifest.json").exists()
    assert not list(cache.glob("release-*"))
