"""Both command lines (found in review): a command group run without a command shows its help
as it is (exit 2, as click does), not glued into a one-line error."""

from __future__ import annotations

import subprocess

import pytest

from .conftest import BIN


@pytest.mark.parametrize("argv", [["deltaship-publish"], ["deltaship-publish", "root"],
                                  ["deltaship-publish", "fleet"], ["deltaship-publish", "cache"],
                                  ["deltaship-agent"]])
def test_a_group_without_a_command_shows_its_help(argv: list[str]) -> None:
    p = subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith(f"Usage: {' '.join(argv)} [OPTIONS] COMMAND [ARGS]..."), p.stderr
    assert "Commands:" in p.stderr
    assert "error:" not in p.stderr and "(see `" not in p.stderr, p.stderr
    # The same help as --help prints on stdout.
    h = subprocess.run([str(BIN / argv[0]), *argv[1:], "--help"], capture_output=True,
                       text=True, timeout=120)
    assert h.returncode == 0 and h.stdout.strip() == p.stderr.strip()
