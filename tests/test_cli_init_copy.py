"""Publisher side (found in review of the command lines): when `init` wrote the trust root to
the store but not its --out copy, the one error line says the store is initialised and where
the root is (a re-run is refused as "already exists")."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import Cli


def test_init_whose_copy_cannot_be_written_says_the_store_is_initialised(
        cli: Cli, tmp_path: Path, release_key: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    out = tmp_path / "missing-dir" / "root.json"
    p = cli.publish("init", "--store", store, "--key", release_key, "--out", out, check=False)
    assert p.returncode == 2 and p.stdout == "", (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert f"written to file://{store}/root.json" in p.stderr and str(out) in p.stderr
    assert not out.exists()
    # What the line says holds: the store has its root, and a second init is refused.
    assert json.loads((store / "root.json").read_bytes())["signed"]["version"] == 1
    again = cli.publish("init", "--store", store, "--key", release_key, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
