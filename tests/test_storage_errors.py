"""One error mapping for both faces of the storage layer (docs/ERRORS.md), against real servers.

Each condition is set up for real (moto's S3 server, a second moto server that checks
credentials, a closed port, directories, a FIFO) and met once through the publisher's
:class:`Store` and once through the agent's :class:`Source`: both must raise the same class,
with the same exit code, as one line. The command lines are checked as real processes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from manifest.errors import (
    DeltashipError,
    FormatError,
    MissingKeyError,
    StoreConfigError,
    TransportError,
)
from manifest.storage.source import open_source
from manifest.storage.store import StoreOptions, open_store

from .conftest import BIN, Cli


@dataclass(frozen=True)
class Where:
    """A store URL (and S3 endpoint) at which a condition holds, and the key to read."""

    url: str
    endpoint: str | None = None
    key: str = "manifest.json"


@dataclass(frozen=True)
class Case:
    condition: str
    backend: str
    error: type[DeltashipError]
    exit_code: int
    setup: Callable[[pytest.FixtureRequest], Where]


CASES: list[Case] = []


def case(condition: str, backend: str, error: type[DeltashipError], exit_code: int) -> Callable[
        [Callable[[pytest.FixtureRequest], Where]], Callable[[pytest.FixtureRequest], Where]]:
    def register(setup: Callable[[pytest.FixtureRequest], Where]) -> Callable[
            [pytest.FixtureRequest], Where]:
        CASES.append(Case(condition, backend, error, exit_code, setup))
        return setup

    return register


def _s3(request: pytest.FixtureRequest) -> Where:
    bucket = request.getfixturevalue("bucket")
    return Where(f"s3://{bucket}/pre", request.getfixturevalue("s3_endpoint"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens there


@case("missing key", "s3", MissingKeyError, 4)
def _missing_s3_key(request: pytest.FixtureRequest) -> Where:
    return _s3(request)


@case("missing key", "file", MissingKeyError, 4)
def _missing_file(request: pytest.FixtureRequest) -> Where:
    root = request.getfixturevalue("tmp_path") / "store"
    root.mkdir()
    return Where(str(root))


@case("missing bucket", "s3", StoreConfigError, 2)
def _missing_bucket(request: pytest.FixtureRequest) -> Where:
    return Where("s3://no-such-bucket-here/p", request.getfixturevalue("s3_endpoint"))


@case("missing directory", "file", StoreConfigError, 2)
def _missing_directory(request: pytest.FixtureRequest) -> Where:
    return Where(f"file://{request.getfixturevalue('tmp_path')}/nowhere")


@case("not a regular file", "file", FormatError, 3)
def _fifo(request: pytest.FixtureRequest) -> Where:
    root = request.getfixturevalue("tmp_path")
    os.mkfifo(root / "manifest.json")  # no writer: opening it must not hang either face
    return Where(str(root))


@case("bad credentials", "s3", StoreConfigError, 2)
def _bad_credentials(request: pytest.FixtureRequest) -> Where:
    return Where("s3://b/p", request.getfixturevalue("s3_with_auth"))


@case("no credentials", "s3", StoreConfigError, 2)
def _no_credentials(request: pytest.FixtureRequest) -> Where:
    where = _s3(request)
    mp = request.getfixturevalue("monkeypatch")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        mp.delenv(name, raising=False)
    mp.setenv("AWS_CONFIG_FILE", "/nonexistent")
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return where


@case("unknown AWS profile", "s3", StoreConfigError, 2)
def _unknown_profile(request: pytest.FixtureRequest) -> Where:
    where = _s3(request)
    empty = request.getfixturevalue("tmp_path") / "aws-config"
    empty.write_text("")
    mp = request.getfixturevalue("monkeypatch")
    mp.setenv("AWS_PROFILE", "nope")
    mp.setenv("AWS_CONFIG_FILE", str(empty))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    return where


@case("unreachable endpoint", "s3", TransportError, 4)
def _unreachable(request: pytest.FixtureRequest) -> Where:
    request.getfixturevalue("s3_endpoint")  # the test credentials in the environment
    return Where("s3://b/p", f"http://127.0.0.1:{_closed_port()}")


@pytest.fixture(scope="module")
def s3_with_auth() -> Iterator[str]:
    """A second moto S3 server, in its own process, that refuses unknown access keys."""
    port = _closed_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "no moto_server"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


def _sync_error(where: Where) -> DeltashipError:
    try:
        open_store(where.url, StoreOptions(where.endpoint)).get(where.key, 100)
    except DeltashipError as e:
        return e
    raise AssertionError(f"the store read {where} without an error")


async def _async_error(where: Where) -> DeltashipError:
    async def no_sleep(seconds: float) -> None:
        await asyncio.sleep(0)

    try:
        source = open_source(where.url, endpoint_url=where.endpoint, sleep=no_sleep)
        try:
            await source.get_small(where.key, 100)
        finally:
            await source.close()
    except DeltashipError as e:
        return e
    raise AssertionError(f"the source read {where} without an error")


@pytest.mark.parametrize("c", CASES, ids=[f"{c.condition} ({c.backend})" for c in CASES])
async def test_both_faces_map_a_condition_alike(c: Case, request: pytest.FixtureRequest) -> None:
    where = c.setup(request)
    sync_error = await asyncio.to_thread(_sync_error, where)
    async_error = await _async_error(where)
    for face, error in (("Store", sync_error), ("Source", async_error)):
        assert type(error) is c.error, (face, error)
        assert error.exit_code == c.exit_code, face
        assert "\n" not in str(error) and str(error), face
    if c.condition == "unknown AWS profile":
        assert str(sync_error) == str(async_error)
        assert str(sync_error).startswith("AWS profile 'nope' not found")


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "objects/../../x", "a//b", "./a", ""])
@pytest.mark.parametrize("backend", ["s3", "file"])
async def test_both_faces_refuse_keys_that_leave_the_store(
        key: str, backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    (tmp_path / "store").mkdir()
    where = _s3(request) if backend == "s3" else Where(str(tmp_path / "store"))
    store = open_store(where.url, StoreOptions(where.endpoint))
    src = tmp_path / "f"
    src.write_bytes(b"x")
    calls: list[Callable[[], object]] = [
        lambda: store.get(key, 10), lambda: store.get_with_etag(key, 10),
        lambda: store.exists(key), lambda: store.put(key, b"x"),
        lambda: store.put_file(key, str(src)), lambda: store.put_if(key, b"x", None),
        lambda: store.download(key, str(tmp_path / "d")),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="not a store key"):
            call()
    source = open_source(where.url, endpoint_url=where.endpoint)
    try:
        with pytest.raises(ValueError, match="not a store key"):
            await source.get_small(key, 10)
        with pytest.raises(ValueError, match="not a store key"):
            await source.fetch(key, tmp_path / "d", 1)
    finally:
        await source.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "store"]  # nothing written


# --- the command lines: one line, the exit code, no traceback ---------------------------------


def _one_line(p: subprocess.CompletedProcess[str], prog: str, code: int, *needles: str) -> None:
    assert p.returncode == code, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), p.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _no_profile_env(cli: Cli, tmp_path: Path) -> dict[str, str]:
    empty = tmp_path / "aws-config"
    empty.write_text("")
    return cli.env(AWS_PROFILE="nope", AWS_CONFIG_FILE=str(empty),
                   AWS_SHARED_CREDENTIALS_FILE=str(empty))


def test_publisher_unknown_aws_profile(cli: Cli, bucket: str, tmp_path: Path) -> None:
    p = cli.publish("history", "--store", f"s3://{bucket}/m", env=_no_profile_env(cli, tmp_path),
                    check=False)
    _one_line(p, "deltaship-publish", 2, "AWS profile 'nope' not found")


def test_agent_unknown_aws_profile(cli: Cli, bucket: str, release_key: Path,
                                   tmp_path: Path) -> None:
    (tmp_path / "local").mkdir()
    cli.publish("init", "--store", tmp_path / "local", "--key", release_key)
    config = tmp_path / "agent.toml"
    cli.run("deltaship-agent", "init", "--store", f"s3://{bucket}/m", "--trust",
            tmp_path / "local" / "root.json", "--model-dir", tmp_path / "model", "--config",
            config)
    p = cli.run("deltaship-agent", "run", "--once", "--config", config,
                env=_no_profile_env(cli, tmp_path), check=False)
    _one_line(p, "deltaship-agent", 2, "AWS profile 'nope' not found")


def test_publisher_refuses_an_http_store(cli: Cli) -> None:
    p = cli.publish("history", "--store", "https://cdn.example/models", check=False)
    _one_line(p, "deltaship-publish", 2, "read-only")
