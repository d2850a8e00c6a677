"""Device side (found in review): the agent's command line answers bad hook flags in one line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .conftest import BIN


@pytest.mark.parametrize("flag", ["--notify-http", "--health-url"])
def test_a_malformed_hook_url_is_one_clear_line(tmp_path: Path, flag: str) -> None:
    trust = tmp_path / "root.json"
    trust.write_text("{}")
    config = tmp_path / "agent.toml"
    p = subprocess.run(
        [str(BIN / "deltaship-agent"), "init", "--store", str(tmp_path / "store"), "--trust",
         str(trust), "--model-dir", str(tmp_path / "model"), "--config", str(config), flag,
         "http://[::1/reload"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert flag in p.stderr and "http://[::1/reload" in p.stderr
    assert not config.exists() and not (tmp_path / "model").exists()
