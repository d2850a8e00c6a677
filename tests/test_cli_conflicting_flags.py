"""Publisher side (found in review of the command lines): a flag that the chosen operation
would ignore is refused in one line (exit 2), before anything is uploaded or signed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import Cli, MoEFamily


def _one_usage_line(p: subprocess.CompletedProcess[str], *words: str) -> None:
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stdout == "" and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith("deltaship-publish: error: "), p.stderr
    for w in words:
        assert w in p.stderr, p.stderr


@pytest.fixture
def store(cli: Cli, tmp_path: Path, release_key: Path, moe_family: MoEFamily) -> Path:
    s = tmp_path / "store"
    s.mkdir()
    cli.publish("init", "--store", s, "--key", release_key)
    cli.publish("release", moe_family.v1, "--store", s, "--version", "v1", "--key", release_key)
    return s


def test_release_dry_run_with_draft_is_refused(cli: Cli, tmp_path: Path, release_key: Path,
                                               moe_family: MoEFamily, store: Path) -> None:
    draft = tmp_path / "draft.json"
    p = cli.publish("release", moe_family.v2, "--store", store, "--version", "v2", "--key",
                    release_key, "--dry-run", "--draft", draft, check=False)
    # It printed "would release" and wrote no draft: the --draft the user asked for was lost.
    _one_usage_line(p, "--dry-run", "--draft")
    assert not draft.exists()


@pytest.mark.parametrize("flag", [("--stages", "1,2"), ("--every", "1h"),
                                  ("--max-failure-rate", "5%"), ("--min-devices", "3"),
                                  ("--revoke-on-failure",)])
def test_rollout_advance_only_flags_without_advance_are_refused(
        cli: Cli, release_key: Path, moe_family: MoEFamily, store: Path,
        flag: tuple[str, ...]) -> None:
    cli.publish("release", moe_family.v2, "--store", store, "--version", "v2", "--key",
                release_key, "--rollout", "5")
    before = (store / "manifest.json").read_bytes()
    p = cli.publish("rollout", "--store", store, "--halt", *flag, "--key", release_key,
                    check=False)
    _one_usage_line(p, flag[0], "--advance")
    assert (store / "manifest.json").read_bytes() == before  # nothing signed or published
    # The same flags with --advance still work (the documented cron line).
    out = cli.publish("rollout", "--store", store, "--advance", *flag, "--key", release_key,
                      "--json")
    assert json.loads(out.stdout)["channel"] == "stable"
