"""Every error the release path promises: one clear line, the right exit code, no traceback."""

from __future__ import annotations

import json
import socket
import stat
from pathlib import Path

import boto3
import pytest

from .conftest import Cli, MoEFamily


def _one_line_error(p: object, code: int, *needles: str) -> None:
    rc, err = p.returncode, p.stderr  # type: ignore[attr-defined]
    assert rc == code, (rc, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltaship-publish: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def ready_store(cli: Cli, bucket: str, release_key: Path, moe_family: MoEFamily) -> str:
    url = f"s3://{bucket}/m"
    cli.publish("init", "--store", url, "--key", release_key)
    cli.publish("release", moe_family.v1, "--store", url, "--version", "v1", "--key",
                release_key, "--cache-dir", cli.cwd / "cache")
    return url


def _rel(cli: Cli, url: str, model: Path, key: Path | None, version: str = "v2",
         **kw: object) -> object:
    args: list[object] = ["release", model, "--store", url, "--version", version,
                          "--cache-dir", cli.cwd / "cache"]
    if key is not None:
        args += ["--key", key]
    return cli.publish(*args, check=False, **kw)


def test_missing_model_dir(cli: Cli, ready_store: str, release_key: Path) -> None:
    _one_line_error(_rel(cli, ready_store, cli.cwd / "nope", release_key), 2, "nope",
                    "does not exist")


def test_directory_without_safetensors(cli: Cli, ready_store: str, release_key: Path) -> None:
    d = cli.cwd / "empty"
    d.mkdir()
    (d / "config.json").write_text("{}")
    _one_line_error(_rel(cli, ready_store, d, release_key), 2, "no *.safetensors")


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_malformed_safetensors(cli: Cli, ready_store: str, release_key: Path,
                               moe_family: MoEFamily, damage: str) -> None:
    import shutil

    d = cli.cwd / "bad"
    shutil.copytree(moe_family.v2, d)
    f = next(d.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[:-10] if damage == "truncate" else data[:8] + b"{not json" + data[17:])
    _one_line_error(_rel(cli, ready_store, d, release_key), 2, f.name,
                    "not a valid safetensors file")


def test_version_already_released(cli: Cli, ready_store: str, release_key: Path,
                                  moe_family: MoEFamily) -> None:
    _one_line_error(_rel(cli, ready_store, moe_family.v2, release_key, version="v1"), 2,
                    "'v1' is already released")


def test_missing_key_option(cli: Cli, ready_store: str, moe_family: MoEFamily) -> None:
    _one_line_error(_rel(cli, ready_store, moe_family.v2, None), 2, "--key")


def test_missing_key_file(cli: Cli, ready_store: str, moe_family: MoEFamily) -> None:
    _one_line_error(_rel(cli, ready_store, moe_family.v2, cli.cwd / "gone.key"), 2,
                    "gone.key", "does not exist")


def test_public_key_instead_of_private(cli: Cli, ready_store: str, release_key: Path,
                                       moe_family: MoEFamily) -> None:
    _one_line_error(_rel(cli, ready_store, moe_family.v2, release_key.with_suffix(".pub")), 2,
                    "not a deltaship private key", "public half")


def test_key_not_in_trust_root(cli: Cli, ready_store: str, moe_family: MoEFamily) -> None:
    cli.publish("keygen", "--out", cli.cwd / "other", "--name", "rogue")
    _one_line_error(_rel(cli, ready_store, moe_family.v2, cli.cwd / "other" / "rogue.key"), 2,
                    "not one of the trust root", "rogue.key")


def test_below_threshold(cli: Cli, bucket: str, moe_family: MoEFamily) -> None:
    for n in ("a", "b"):
        cli.publish("keygen", "--out", cli.cwd / "k", "--name", n)
    url = f"s3://{bucket}/t"
    cli.publish("init", "--store", url, "--key", cli.cwd / "k/a.key", "--key",
                cli.cwd / "k/b.key", "--threshold", "2")
    _one_line_error(_rel(cli, url, moe_family.v1, cli.cwd / "k/a.key", version="v1"), 2,
                    "needs 2", "signatures")
    ok = cli.publish("release", moe_family.v1, "--store", url, "--version", "v1", "--key",
                     cli.cwd / "k/a.key", "--key", cli.cwd / "k/b.key", "--cache-dir",
                     cli.cwd / "cache", "--json")
    assert json.loads(ok.stdout)["sequence"] == 1


def test_store_unreachable(cli: Cli, release_key: Path, moe_family: MoEFamily) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = cli.env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    p = cli.publish("release", moe_family.v1, "--store", "s3://b/m", "--version", "v1",
                    "--key", release_key, env=env, check=False)
    _one_line_error(p, 4, "cannot reach the store", f"127.0.0.1:{port}")


def test_missing_credentials(cli: Cli, ready_store: str, release_key: Path,
                             moe_family: MoEFamily) -> None:
    env = cli.env()
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(k)
    env.update(AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
               AWS_EC2_METADATA_DISABLED="true")
    _one_line_error(_rel(cli, ready_store, moe_family.v2, release_key, env=env), 2,
                    "no S3 credentials", "AWS_ACCESS_KEY_ID")


def test_bucket_missing(cli: Cli, s3_endpoint: str, release_key: Path,
                        moe_family: MoEFamily) -> None:
    p = cli.publish("init", "--store", "s3://no-such-bucket-x/m", "--key", release_key,
                    check=False)
    _one_line_error(p, 2, "bucket 'no-such-bucket-x' does not exist")


def test_store_not_initialised(cli: Cli, bucket: str, release_key: Path,
                               moe_family: MoEFamily) -> None:
    _one_line_error(_rel(cli, f"s3://{bucket}/m", moe_family.v1, release_key, version="v1"), 2,
                    "no trust root", "deltaship-publish init")


def test_init_twice(cli: Cli, ready_store: str, release_key: Path) -> None:
    p = cli.publish("init", "--store", ready_store, "--key", release_key, check=False)
    _one_line_error(p, 2, "already exists")


def test_keygen_never_overwrites(cli: Cli, release_key: Path) -> None:
    assert stat.S_IMODE(release_key.stat().st_mode) == 0o600
    before = release_key.read_bytes()
    p = cli.publish("keygen", "--out", release_key.parent, "--name", "release", check=False)
    _one_line_error(p, 2, "already exists")
    assert release_key.read_bytes() == before


def test_tampered_base_object_is_refused(cli: Cli, ready_store: str, release_key: Path,
                                         moe_family: MoEFamily, bucket: str) -> None:
    """The publisher verifies what it builds on: a tampered base object stops the release."""
    s3 = boto3.client("s3", endpoint_url=cli.endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="m/objects/")["Contents"]]
    for k in keys:
        body = s3.get_object(Bucket=bucket, Key=k)["Body"].read()
        s3.put_object(Bucket=bucket, Key=k, Body=body[:-1] + bytes([body[-1] ^ 1]))
    _one_line_error(_rel(cli, ready_store, moe_family.v2, release_key), 3, "sha256")


def test_tampered_manifest_is_refused(cli: Cli, ready_store: str, release_key: Path,
                                      moe_family: MoEFamily, bucket: str) -> None:
    s3 = boto3.client("s3", endpoint_url=cli.endpoint)
    doc = json.loads(s3.get_object(Bucket=bucket, Key="m/manifest.json")["Body"].read())
    doc["signed"]["sequence"] = 99
    s3.put_object(Bucket=bucket, Key="m/manifest.json", Body=json.dumps(doc).encode())
    _one_line_error(_rel(cli, ready_store, moe_family.v2, release_key), 3, "manifest",
                    "valid signature")


def test_bad_group_pattern(cli: Cli, ready_store: str, release_key: Path,
                           moe_family: MoEFamily) -> None:
    p = cli.publish("inspect", moe_family.v1, "--group-pattern", "layers\\.(\\d+)",
                    check=False)
    _one_line_error(p, 2, "named capture")
