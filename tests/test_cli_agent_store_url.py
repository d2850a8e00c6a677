"""Device side (found in review of the command lines): `deltaship-agent init` checks the store
URL it is given and records a directory store so that `run` finds it from any directory."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .conftest import BIN, Cli, MoEFamily


@pytest.mark.parametrize("url", ["ftp://host/models", "s3://", "https:///prefix",
                                 "file://otherhost/srv/models"])
def test_init_refuses_a_store_url_it_cannot_use(cli: Cli, tmp_path: Path, release_key: Path,
                                               url: str) -> None:
    (tmp_path / "store").mkdir()
    cli.publish("init", "--store", tmp_path / "store", "--key", release_key,
                "--out", tmp_path / "root.json")
    config = tmp_path / "agent.toml"
    p = cli.run("deltaship-agent", "init", "--store", url, "--trust", tmp_path / "root.json",
                "--model-dir", tmp_path / "model", "--config", config, check=False)
    # docs/ERRORS.md: a bad store URL is StoreConfigError, exit 2, one line; nothing written.
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith("deltaship-agent: error: ") and url in p.stderr
    assert p.stdout == ""
    assert not config.exists() and not (tmp_path / "model").exists()


def test_a_relative_store_path_is_found_from_any_working_directory(
        cli: Cli, tmp_path: Path, release_key: Path, moe_family: MoEFamily) -> None:
    (tmp_path / "store").mkdir()
    cli.publish("init", "--store", "store", "--key", release_key, "--out", "root.json")
    cli.publish("release", moe_family.v1, "--store", "store", "--version", "v1",
                "--key", release_key)
    config = tmp_path / "agent.toml"
    # As the README's quick start does: the store given as a path relative to here.
    cli.run("deltaship-agent", "init", "--store", "store", "--trust", "root.json",
            "--model-dir", "model", "--config", config)
    elsewhere = tmp_path / "elsewhere"  # a service runs with another working directory
    elsewhere.mkdir()
    p = subprocess.run([str(BIN / "deltaship-agent"), "run", "--once", "--config", str(config)],
                       cwd=elsewhere, env=cli.env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "model" / "current").resolve().name == "v1"
    assert not (elsewhere / "store").exists() and not (elsewhere / "model").exists()
