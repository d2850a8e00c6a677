"""Shared fixtures: a real S3 API server (moto, server mode) on 127.0.0.1, keys, models, CLI."""

from __future__ import annotations

import compileall
import logging
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from devtools import modelgen

BIN = Path(sys.executable).parent
logging.getLogger("werkzeug").setLevel(logging.WARNING)
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_MAX_ATTEMPTS": "2",
}


def pytest_configure(config: pytest.Config) -> None:
    """Compile the project's modules once, before the workers start.

    The tests start several hundred ``deltaship-agent`` and ``deltaship-publish`` processes,
    most with ``PYTHONDONTWRITEBYTECODE=1`` (``agent_env``); without bytecode on disk each of
    them would compile every module it imports again. Python still reads ``__pycache__``
    under that setting, and checks each file against its source's mtime and size, so an edited
    module is never run stale.
    """
    if hasattr(config, "workerinput"):  # an xdist worker: the controller did it
        return
    root = Path(__file__).resolve().parent.parent
    for package in ("edge_agent", "manifest", "publisher", "devtools"):
        compileall.compile_dir(root / package, quiet=2)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first: tests marked ``slow`` run before the others (otherwise in file order).

    With ``-n 2 --dist loadgroup`` each worker takes the next test when it is almost idle, so
    a long end-to-end test collected last (``test_trust_e2e.py``) would keep one worker busy
    while the other has nothing left; started first, the short tests fill in around them and
    both workers finish together. (xdist groups are scheduled before single tests anyway.)
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _atomic_conditional_puts() -> None:
    """Give moto's server S3's guarantee for racing conditional PUTs.

    S3 applies a PUT with If-Match / If-None-Match atomically: of writers racing with the same
    precondition exactly one succeeds and the others get 412 (or 409). moto 5 checks the
    precondition and then writes without a lock (`S3Response.put_object`), so two racers can
    both win (seen once in CI, `test_racing_conditional_puts_one_wins[s3]`). Serializing that
    one handler makes the test server keep the guarantee our manifest writes rely on.
    """
    from moto.s3.responses import S3Response

    original = S3Response.put_object
    lock = threading.Lock()

    def put_object(self: S3Response) -> Any:
        with lock:
            return original(self)

    S3Response.put_object = put_object  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server over real HTTP on 127.0.0.1, for the whole session."""
    for k, v in S3_ENV.items():
        os.environ.setdefault(k, v)
    _atomic_conditional_puts()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@dataclass
class Cli:
    """Runs the real console scripts as subprocesses with the S3 endpoint configured."""

    endpoint: str
    cwd: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(S3_ENV)
        env["AWS_ENDPOINT_URL"] = self.endpoint
        env.update(extra)
        return env

    def run(self, prog: str, *args: object, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(BIN / prog), *map(str, args)]
        p = subprocess.run(cmd, cwd=self.cwd, env=env or self.env(), text=True,
                           capture_output=True, timeout=300)
        if check and p.returncode != 0:
            raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    def publish(self, *args: object, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run("deltaship-publish", *args, **kw)  # type: ignore[arg-type]


@pytest.fixture
def cli(s3_endpoint: str, tmp_path: Path) -> Cli:
    return Cli(s3_endpoint, tmp_path)


@pytest.fixture
def release_key(cli: Cli, tmp_path: Path) -> Path:
    cli.publish("keygen", "--out", tmp_path / "keys", "--name", "release")
    return tmp_path / "keys" / "release.key"


@dataclass(frozen=True)
class MoEFamily:
    """v1 and its realistic updates: two experts trained, dense fine-tune, vocabulary +64."""

    v1: Path
    v2: Path
    v3: Path
    v4: Path


@pytest.fixture(scope="session")
def moe_family(tmp_path_factory: pytest.TempPathFactory) -> MoEFamily:
    d = tmp_path_factory.mktemp("moe")
    cfg = modelgen.MoEConfig(layers=2, experts=4, hidden=64, ffn=128, vocab=256, seed=1)
    v1 = modelgen.generate_moe(d / "v1", cfg)
    v2 = modelgen.train_experts(v1, d / "v2", experts=[(0, 1), (1, 3)], seed=2)
    v3 = modelgen.dense_finetune(v2, d / "v3", seed=3)
    v4 = modelgen.expand_vocab(v3, d / "v4", rows=64, seed=4)
    return MoEFamily(v1, v2, v3, v4)
