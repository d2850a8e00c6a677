"""Publisher side (found in review of the command lines): `gc --json` prints JSON and nothing
else on stdout, also when a long deletion's progress lines would be due (stdout no terminal)."""

from __future__ import annotations

import hashlib
import json
import os
import time
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

import manifest.progress
from publisher.cli import main
from publisher.cli_gc import PROGRESS_FROM

from .conftest import Cli, MoEFamily


def test_gc_json_stdout_is_only_the_json_when_progress_lines_are_due(
        cli: Cli, tmp_path: Path, release_key: Path, moe_family: MoEFamily,
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    store.mkdir()
    cli.publish("init", "--store", store, "--key", release_key)
    cli.publish("release", moe_family.v1, "--store", store, "--version", "v1",
                "--key", release_key)
    # Enough unreferenced objects for gc's progress, written long before the grace period.
    old = time.time() - 7 * 86400
    for i in range(PROGRESS_FROM):
        data = f"orphan {i}".encode()
        path = store / "objects" / hashlib.sha256(data).hexdigest()
        path.write_bytes(data)
        os.utime(path, (old, old))
    # A deletion that lasts long enough for a progress line every LINE_INTERVAL: a clock that
    # moves on a minute each time the progress reads it (no sleeping, no timing threshold).
    ticks = [0.0]

    def monotonic() -> float:
        ticks[0] += 60.0
        return ticks[0]

    monkeypatch.setattr(manifest.progress, "time", types.SimpleNamespace(monotonic=monotonic))
    result = CliRunner().invoke(main, ["gc", "--store", str(store), "--keep", "1",
                                       "--grace", "1h", "--json"])
    assert result.exit_code == 0, (result.output, result.stderr)
    out = json.loads(result.stdout)  # the JSON document and nothing else
    assert out["deleted_objects"] == PROGRESS_FROM
    assert result.stderr == ""
    assert len(list((store / "objects").iterdir())) == out["reachable_objects"]
