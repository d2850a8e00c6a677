"""The release path end to end: real CLI processes against a real S3 API server (moto)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import boto3
import numpy as np
import pytest
from safetensors import safe_open

from manifest.storage.store import StoreOptions, open_store

from ._agent_checks import raw_tensors
from ._device import current_index, group_files, materialise
from .conftest import BIN, Cli, MoEFamily


def _tensors(model_dir: Path) -> dict[str, bytes]:
    """Every tensor's raw bytes, read with the official safetensors library."""
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, framework="numpy") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[name] = _raw(st, name)
    return out


def _raw(st: object, name: str) -> bytes:
    sl = st.get_slice(name)  # type: ignore[attr-defined]
    dtype = sl.get_dtype()
    if dtype in ("BF16", "F8_E4M3", "F8_E5M2"):
        # numpy cannot hold these: compare the raw bytes the library reports for the header
        # against our own reader instead (see _raw_bytes below).
        raise LookupError(dtype)
    return np.ascontiguousarray(st.get_tensor(name)).tobytes()  # type: ignore[attr-defined]




def _release(cli: Cli, store: str, model: Path, version: str, key: Path,
             *extra: object) -> dict:
    p = cli.publish("release", model, "--store", store, "--version", version, "--key", key,
                    "--json", "--cache-dir", cli.cwd / "cache", *extra)
    return json.loads(p.stdout)


def test_release_story(cli: Cli, bucket: str, release_key: Path, moe_family: MoEFamily,
                       tmp_path: Path) -> None:
    store_url = f"s3://{bucket}/models/moe"
    out = cli.publish("init", "--store", store_url, "--key", release_key,
                      "--out", tmp_path / "root.json")
    assert "root.json" in out.stdout
    s1 = _release(cli, store_url, moe_family.v1, "v1", release_key)
    assert s1["groups_changed"] == s1["groups_total"] and s1["bases"] == []
    s2 = _release(cli, store_url, moe_family.v2, "v2", release_key)
    s3 = _release(cli, store_url, moe_family.v3, "v3", release_key)
    s4 = _release(cli, store_url, moe_family.v4, "v4", release_key)

    # Two experts and every layer's router trained: 2 expert groups + 2 layer groups.
    assert s2["groups_changed"] == 4
    (b2,) = s2["bases"]
    assert b2["version"] == "v1" and b2["download_bytes"] < 0.25 * b2["full_bytes"]
    # Dense fine-tune: every group but the final norm changes (its bf16 values near 1.0 do not
    # move at a low learning rate); the delta still beats the full download.
    assert s3["groups_changed"] == s3["groups_total"] - 1
    assert s3["bases"][0]["download_bytes"] < 0.8 * s3["bases"][0]["full_bytes"]
    # Vocabulary expansion: embeddings and lm_head change, by a few rows.
    assert s4["groups_changed"] == 2
    assert [b["version"] for b in s4["bases"]] == ["v3", "v2", "v1"]
    assert s4["bases"][0]["download_bytes"] < 0.1 * s4["bases"][0]["full_bytes"]

    hist = json.loads(cli.publish("history", "--store", store_url, "--json").stdout)
    assert [r["version"] for r in hist["releases"]] == ["v1", "v2", "v3", "v4"]
    assert hist["current"] == "v4" and hist["sequence"] == 4

    # A device that verifies everything and rebuilds each version bit for bit, by patches.
    store = open_store(store_url, StoreOptions(cli.endpoint))
    root_bytes = (tmp_path / "root.json").read_bytes()
    _, idx4 = current_index(store, root_bytes)
    assert idx4.version == "v4"
    have: dict[str, Path] = {}
    for version, model in [("v1", moe_family.v1), ("v2", moe_family.v2),
                           ("v3", moe_family.v3), ("v4", moe_family.v4)]:
        from publisher.repository import Repository

        repo = Repository(store, idx4.released_at)
        idx = repo.index(repo.release(version).record.pointer)
        dest = tmp_path / "device" / version
        fetched = materialise(store, idx, dest, have, tmp_path / "work")
        if version != "v1":
            assert fetched["full"] == 0, f"{version}: every changed group should come as a patch"
            assert fetched["patch"] > 0
        assert raw_tensors(dest) == raw_tensors(model)
        have.update(group_files(dest, idx))
        # The device copy loads with the official library, names and shapes intact.
        for f in dest.glob("*.safetensors"):
            with safe_open(f, framework="numpy") as st:
                assert len(list(st.keys())) >= 1
        assert (dest / "config.json").read_bytes() == (model / "config.json").read_bytes()

    # Skipping versions: a device at v1 goes straight to v4 with patches from v1.
    fetched = materialise(store, idx4, tmp_path / "skip", group_files(tmp_path / "device" / "v1",
                          Repository(store, idx4.released_at).index(
                              Repository(store, idx4.released_at).release("v1").record.pointer)),
                          tmp_path / "work2")
    assert fetched["full"] == 0
    assert raw_tensors(tmp_path / "skip") == raw_tensors(moe_family.v4)


def test_f32_checkpoint_loads_with_official_library(cli: Cli, bucket: str, release_key: Path,
                                                     tmp_path: Path) -> None:
    from devtools import modelgen

    cfg = modelgen.MoEConfig(layers=1, experts=2, hidden=32, ffn=64, vocab=64, dtype="F32",
                             shards=2)
    v1 = modelgen.generate_moe(tmp_path / "f32", cfg)
    store_url = f"s3://{bucket}/f32"
    cli.publish("init", "--store", store_url, "--key", release_key, "--out", tmp_path / "r.json")
    _release(cli, store_url, v1, "v1", release_key)
    store = open_store(store_url, StoreOptions(cli.endpoint))
    _, idx = current_index(store, (tmp_path / "r.json").read_bytes())
    dest = tmp_path / "dev"
    materialise(store, idx, dest, {}, tmp_path / "w")
    assert _tensors(dest) == _tensors(v1)


def test_dry_run_uploads_nothing(cli: Cli, bucket: str, release_key: Path,
                                 moe_family: MoEFamily) -> None:
    store_url = f"s3://{bucket}/m"
    cli.publish("init", "--store", store_url, "--key", release_key)
    _release(cli, store_url, moe_family.v1, "v1", release_key)
    s3 = boto3.client("s3", endpoint_url=cli.endpoint)
    before = {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    s = _release(cli, store_url, moe_family.v2, "v2", release_key, "--dry-run")
    assert s["dry_run"] and s["uploaded_objects"] == 0
    assert s["bases"][0]["download_bytes"] < s["full_download_bytes"]
    after = {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert after == before
    text = cli.publish("release", moe_family.v2, "--store", store_url, "--version", "v2",
                       "--key", release_key, "--dry-run").stdout
    assert "would release v2" in text and "nothing uploaded" in text


def test_revert(cli: Cli, bucket: str, release_key: Path, moe_family: MoEFamily,
                tmp_path: Path) -> None:
    store_url = f"s3://{bucket}/m"
    cli.publish("init", "--store", store_url, "--key", release_key, "--out", tmp_path / "r.json")
    _release(cli, store_url, moe_family.v1, "v1", release_key)
    _release(cli, store_url, moe_family.v2, "v2", release_key)
    out = cli.publish("revert", "--store", store_url, "--to", "v1", "--key", release_key,
                      "--json")
    result = json.loads(out.stdout)
    assert (result["kind"], result["current"], result["sequence"]) == ("revert", "v1", 3)
    assert result["timestamp_sequence"] == 3 and result["written"] == ["manifest.json"]
    hist = json.loads(cli.publish("history", "--store", store_url, "--json").stdout)
    assert hist["current"] == "v1" and hist["sequence"] == 3
    assert [r["current"] for r in hist["releases"]] == [True, False]
    store = open_store(store_url, StoreOptions(cli.endpoint))
    _, idx = current_index(store, (tmp_path / "r.json").read_bytes())
    assert idx.version == "v1"
    again = cli.publish("revert", "--store", store_url, "--to", "v1", "--key", release_key,
                        check=False)
    assert again.returncode == 2 and "already the current" in again.stderr
    missing = cli.publish("revert", "--store", store_url, "--to", "v9", "--key", release_key,
                          check=False)
    assert missing.returncode == 2 and "never released" in missing.stderr
    # A release after a revert builds on the reverted state and still goes up in sequence.
    s3 = _release(cli, store_url, moe_family.v3, "v3", release_key)
    assert s3["sequence"] == 4 and s3["bases"][0]["version"] == "v1"


@pytest.mark.slow  # scheduled first (tests/conftest.py)
def test_concurrent_releases_exactly_one_wins(cli: Cli, bucket: str, release_key: Path,
                                              moe_family: MoEFamily, tmp_path: Path) -> None:
    from devtools import modelgen

    store_url = f"s3://{bucket}/race"
    cli.publish("init", "--store", store_url, "--key", release_key)
    _release(cli, store_url, moe_family.v1, "v1", release_key)
    # Big enough, and coded slowly enough, that both read the manifest before either writes.
    cfg = modelgen.MoEConfig(layers=2, experts=4, hidden=256, ffn=512, vocab=512, seed=9)
    a = modelgen.generate_moe(tmp_path / "a", cfg)
    b = modelgen.dense_finetune(a, tmp_path / "b", seed=10)
    procs = [
        subprocess.Popen(
            [str(BIN / "deltaship-publish"), "release", m, "--store", store_url, "--version",
             v, "--key", release_key, "--level", "19", "--workers", "1",
             "--cache-dir", tmp_path / f"cache-{v}"],
            env=cli.env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for m, v in ((a, "va"), (b, "vb"))
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 5], results
    loser = next(r for r in results if r[0] == 5)
    assert "another release or revert was published" in loser[2]
    assert "Traceback" not in loser[2] and len(loser[2].strip().splitlines()) == 1
    hist = json.loads(cli.publish("history", "--store", store_url, "--json").stdout)
    winner = hist["current"]
    assert winner in ("va", "vb") and hist["sequence"] == 2
    assert [r["version"] for r in hist["releases"]] == ["v1", winner]
    # The loser re-runs and lands on top of the winner.
    lost = "vb" if winner == "va" else "va"
    _release(cli, store_url, b if lost == "vb" else a, lost, release_key)
    hist = json.loads(cli.publish("history", "--store", store_url, "--json").stdout)
    assert hist["current"] == lost and hist["sequence"] == 3


@pytest.mark.parametrize("scheme", ["plain", "file"])
def test_local_directory_store(cli: Cli, release_key: Path, moe_family: MoEFamily,
                               tmp_path: Path, scheme: str) -> None:
    d = tmp_path / "store"
    d.mkdir()
    url = str(d) if scheme == "plain" else f"file://{d}"
    cli.publish("init", "--store", url, "--key", release_key, "--out", tmp_path / "r.json")
    _release(cli, url, moe_family.v1, "v1", release_key)
    s = _release(cli, url, moe_family.v2, "v2", release_key)
    assert s["bases"][0]["download_bytes"] < s["full_download_bytes"]
    store = open_store(url)
    _, idx = current_index(store, (tmp_path / "r.json").read_bytes())
    materialise(store, idx, tmp_path / "dev", {}, tmp_path / "w")
    assert raw_tensors(tmp_path / "dev") == raw_tensors(moe_family.v2)
    assert all(oct(p.stat().st_mode)[-3:] == "644" for p in (d / "objects").iterdir())
