"""Start-up: what the agent imports when it has nothing to do (structure, not timing).

A cron job or a small device pays for every module the agent imports on every poll. An
up-to-date ``deltaship-agent run --once`` on a directory store must not import the HTTP client,
the S3 SDK, NumPy, zstd or the file watcher; on an HTTP store only the HTTP client; ``--help``
none of them. Each case runs the real console entry point in a subprocess and records
``sys.modules`` when it exits (``scripts/bench_startup.py`` measures the time).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools import modelgen
from devtools.bench_models import publish_store

from ._served_store import ServedStore

BIN = Path(sys.executable).parent
HEAVY = ("aiohttp", "boto3", "botocore", "numpy", "zstandard", "watchdog")

# Runs the agent's console entry point and writes the names of every imported module to
# argv[1] at exit (click ends with sys.exit, so an atexit hook sees the final state).
_DUMP = """
import atexit, sys
out = sys.argv[1]
atexit.register(lambda: open(out, "w").write("\\n".join(sorted(sys.modules))))
sys.argv = ["deltaship-agent", *sys.argv[2:]]
from edge_agent.cli import main
main()
"""


@dataclass(frozen=True)
class Published:
    store: Path
    work: Path


def _run(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([str(a) for a in args], cwd=cwd, text=True, capture_output=True,
                       timeout=120)
    assert p.returncode == 0, f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


def _modules(work: Path, *args: object) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    out = work / "modules.txt"
    out.unlink(missing_ok=True)
    p = subprocess.run([sys.executable, "-c", _DUMP, str(out), *map(str, args)], cwd=work,
                       text=True, capture_output=True, timeout=120)
    return set(out.read_text().split()), p


def _heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in HEAVY}


def _device(store_url: str, work: Path, name: str) -> Path:
    """A device initialised on ``store_url`` that installed its current release."""
    config = work / f"{name}.toml"
    _run(BIN / "deltaship-agent", "init", "--store", store_url, "--trust",
         work / "store" / "root.json", "--model-dir", work / name, "--device-id", name,
         "--config", config, cwd=work)
    first = _run(BIN / "deltaship-agent", "run", "--once", "--config", config, cwd=work)
    assert "-> v1" in first.stdout
    return config


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    """A directory store with one release (a tiny MoE: the size is irrelevant here)."""
    work = tmp_path_factory.mktemp("startup")
    model = modelgen.generate_moe(work / "m1", modelgen.MoEConfig(
        layers=1, experts=2, hidden=32, ffn=64, vocab=64, seed=1))
    return Published(publish_store(work, model), work)


def test_up_to_date_cycle_on_a_directory_store_imports_nothing_heavy(
        published: Published) -> None:
    config = _device(str(published.store), published.work, "dir-device")
    modules, p = _modules(published.work, "run", "--once", "--config", config)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "up to date at v1"
    assert "edge_agent.updater" in modules  # the cycle ran in this process
    assert _heavy(modules) == set()


def test_up_to_date_cycle_on_an_http_store_imports_only_the_http_client(
        published: Published) -> None:
    with ServedStore(published.store) as served:
        config = _device(served.url, published.work, "http-device")
        mark = served.mark()
        modules, p = _modules(published.work, "run", "--once", "--config", config)
        requests, _ = served.since(mark)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "up to date at v1"
    assert [r.status for r in requests] == [304]  # one conditional GET, nothing else
    assert "aiohttp" in modules
    assert _heavy(modules) == {m for m in modules if m.split(".")[0] == "aiohttp"}


@pytest.mark.parametrize("args", [("--help",), ("run", "--help"), ("init", "--help")])
def test_help_imports_nothing_heavy(published: Published, args: tuple[str, ...]) -> None:
    modules, p = _modules(published.work, *args)
    assert p.returncode == 0, p.stderr
    assert "Usage: deltaship-agent" in p.stdout
    assert "edge_agent.cli" in modules
    assert _heavy(modules) == set()
    assert "asyncio" not in modules  # nothing runs, so no event loop either
