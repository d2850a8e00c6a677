"""Device side (found in review of the command lines): every `deltaship-agent` command that
changes the device has a `--json` like `status` and all of `deltaship-publish`: one JSON
document on stdout and nothing else, errors still one line on stderr with their exit code."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from .conftest import Cli, MoEFamily


def _json(p: subprocess.CompletedProcess[str], code: int = 0) -> Any:
    assert p.returncode == code, (p.stdout, p.stderr)
    return json.loads(p.stdout)  # the one document, nothing before or after it


def test_agent_commands_print_json(cli: Cli, tmp_path: Path, release_key: Path,
                                   moe_family: MoEFamily) -> None:
    store = tmp_path / "store"
    store.mkdir()
    cli.publish("init", "--store", store, "--key", release_key, "--out", tmp_path / "root.json")
    cli.publish("release", moe_family.v1, "--store", store, "--version", "v1",
                "--key", release_key)
    config = tmp_path / "agent.toml"

    def agent(*args: object, code: int = 0) -> Any:
        p = cli.run("deltaship-agent", *args, "--json", "--config", config, check=False)
        if code == 0:
            assert p.stderr == "", p.stderr
        return _json(p, code), p

    doc, _ = agent("init", "--store", store, "--trust", tmp_path / "root.json",
                   "--model-dir", tmp_path / "model", "--device-id", "dev-1")
    assert doc == {"config": str(config), "store": str(store),
                   "trust_root": str(tmp_path / "model" / ".deltaship" / "root.json"),
                   "model_dir": str(tmp_path / "model"), "device_id": "dev-1",
                   "channel": "stable"}
    cli.run("deltaship-agent", "run", "--once", "--config", config)
    cli.publish("release", moe_family.v2, "--store", store, "--version", "v2",
                "--key", release_key)
    cli.run("deltaship-agent", "run", "--once", "--config", config)

    # The text form lists versions as names (it printed a Python list: "['v2', 'v1']").
    text = cli.run("deltaship-agent", "status", "--config", config).stdout
    retained = [ln for ln in text.splitlines() if ln.startswith("retained ")]
    assert retained and retained[0].split(None, 1)[1] in ("v2, v1", "v1, v2"), text
    assert "['" not in text and any(ln.split() == ["failed", "versions", "-"]
                                    for ln in text.splitlines()), text

    doc, _ = agent("verify")
    assert doc == {"version": "v2", "damaged": [], "repaired": False, "healthy": True}
    doc, _ = agent("rollback")
    assert doc == {"previous": "v2", "version": "v1", "pinned": True, "healthy": True}
    doc, _ = agent("resume")
    assert doc == {"was_pinned": "v1"}
    doc, _ = agent("resume")
    assert doc == {"was_pinned": None}

    # A damaged live file: the JSON names it, then exit 2 with its one error line.
    live = (tmp_path / "model" / "current").resolve()
    victim = live / "config.json"
    victim.chmod(0o644)
    victim.write_text("{}")
    doc, p = agent("verify", code=2)
    assert doc == {"version": "v1", "damaged": ["config.json"], "repaired": False,
                   "healthy": True}
    assert p.stderr.startswith("deltaship-agent: error: v1: 1 damaged file(s)")
    assert len(p.stderr.strip().splitlines()) == 1
    doc, _ = agent("verify", "--repair")
    assert doc == {"version": "v1", "damaged": ["config.json"], "repaired": True,
                   "healthy": True}

    # A user error: nothing on stdout, one line on stderr.
    p = cli.run("deltaship-agent", "rollback", "--to", "nope", "--json", "--config", config,
                check=False)
    assert p.returncode == 2 and p.stdout == "" and len(p.stderr.strip().splitlines()) == 1
