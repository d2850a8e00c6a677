"""A release stopped (Ctrl-C, a failure elsewhere) while it uploads over a slow uplink stops
its uploads at once, instead of waiting for the rest of each object in flight, and leaves no
multipart upload open in the bucket (S3 charges for the parts of one).

A real moto S3 server behind :class:`tests._served_store.SlowUplink` (a TCP proxy that sends at
most a few MB/s to the server); a real ``deltaship-publish`` process for the end-to-end case.
Each test's expectation is relative to the upload speed measured in the same run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest

from devtools import modelgen
from manifest.errors import CancelledError
from manifest.storage.store import StoreOptions, open_store

from ._served_store import SlowUplink
from .conftest import BIN, Cli

RATE = 4e6  # bytes per second to the server, per connection: a slow uplink
MIB = 1 << 20


def _bucket(endpoint: str) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


def _open_uploads(endpoint: str, bucket: str) -> list[str]:
    r = boto3.client("s3", endpoint_url=endpoint).list_multipart_uploads(Bucket=bucket)
    return [u["Key"] for u in r.get("Uploads", [])]


def _wait_for_upload(proxy_wire: object, at_least: int, proc: subprocess.Popen[str] | None,
                     thread: threading.Thread | None) -> float:
    """Seconds until ``at_least`` bytes went up through the proxy."""
    t0 = time.monotonic()
    while proxy_wire.up < at_least:  # type: ignore[attr-defined]
        if proc is not None:
            assert proc.poll() is None, proc.communicate()
        if thread is not None:
            assert thread.is_alive()
        time.sleep(0.01)
    return time.monotonic() - t0


@pytest.mark.parametrize(("size", "threshold"), [(24 * MIB, 8 * MIB), (24 * MIB, 64 * MIB)],
                         ids=["multipart", "single-part"])
def test_a_cancelled_s3_upload_stops_at_its_next_block(
    s3_endpoint: str, tmp_path: Path, size: int, threshold: int,
) -> None:
    """``put_file(..., cancel)``: set while the body goes up, the upload raises
    CancelledError within a small part of the time the rest would take, and the bucket has
    neither the object nor an open multipart upload."""
    bucket = _bucket(s3_endpoint)
    src = tmp_path / "obj"
    src.write_bytes(os.urandom(size))
    port = urlparse(s3_endpoint).port
    assert port is not None
    with SlowUplink(port, RATE) as proxy:
        store = open_store(f"s3://{bucket}/p", StoreOptions(
            endpoint_url=f"http://127.0.0.1:{proxy.port}", multipart_threshold=threshold))
        cancel = threading.Event()
        raised: list[BaseException] = []

        def upload() -> None:
            try:
                store.put_file("objects/x", str(src), cancel)
            except BaseException as e:  # the test looks at it
                raised.append(e)

        t = threading.Thread(target=upload)
        t.start()
        first = _wait_for_upload(proxy.wire, MIB, None, t)
        connections = proxy.wire.connections
        cancel.set()
        t0 = time.monotonic()
        t.join(timeout=120)
        stopped_after = time.monotonic() - t0
        again = proxy.wire.connections - connections
    assert not t.is_alive()
    # Not retried (botocore's standard mode retries what it thinks a network error, with
    # backoff); a multipart upload makes one more request: the abort.
    assert again <= (1 if size > threshold else 0), again
    assert len(raised) == 1 and isinstance(raised[0], CancelledError), raised
    rest = first * (size - MIB) / MIB  # the rest at the speed measured in this run
    assert stopped_after < rest / 4, (stopped_after, rest)
    assert _open_uploads(s3_endpoint, bucket) == []
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)  # no object/x


def test_ctrl_c_while_a_release_uploads_over_a_slow_uplink_exits_at_once(
    cli: Cli, release_key: Path, tmp_path: Path,
) -> None:
    """SIGINT to a real ``release`` while its objects go up at 1 MB/s each: "interrupted", exit
    130, within a small part of the time the rest of the upload would take; no manifest, no
    open multipart upload, no staging left in the cache."""
    bucket = _bucket(cli.endpoint)
    cfg = modelgen.MoEConfig(layers=1, experts=2, hidden=512, ffn=2048, vocab=8192, seed=5)
    model = modelgen.generate_moe(tmp_path / "model", cfg)  # 29 MB of groups
    url = f"s3://{bucket}/m"
    cli.publish("init", "--store", url, "--key", release_key)
    dry = cli.publish("release", model, "--store", url, "--version", "v1", "--key", release_key,
                      "--cache-dir", tmp_path / "dry-cache", "--dry-run", "--json")
    objects = int(json.loads(dry.stdout)["full_download_bytes"])  # what v1 uploads
    port = urlparse(cli.endpoint).port
    assert port is not None
    cache = tmp_path / "cache"
    with SlowUplink(port, RATE / 4) as proxy:  # 4 uploads at once: 4 MB/s in all
        env = cli.env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}")
        cmd = [str(BIN / "deltaship-publish"), "release", str(model), "--store", url,
               "--version", "v1", "--key", str(release_key), "--cache-dir", str(cache)]
        p = subprocess.Popen(cmd, cwd=cli.cwd, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            up0 = proxy.wire.up
            _wait_for_upload(proxy.wire, up0 + 64 * 1024, p, None)  # the first object began
            up1 = proxy.wire.up
            first = _wait_for_upload(proxy.wire, up1 + 2 * MIB, p, None)
            sent = proxy.wire.up - up0
            p.send_signal(signal.SIGINT)
            t0 = time.monotonic()
            _, err = p.communicate(timeout=300)
            stopped_after = time.monotonic() - t0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    rest = (objects - sent) * first / (2 * MIB)  # the rest at the speed measured in this run
    assert objects > 4 * sent
    assert (p.returncode, err.strip()) == (130, "deltaship-publish: interrupted"), err
    assert stopped_after < rest / 4, (stopped_after, rest)
    s3 = boto3.client("s3", endpoint_url=cli.endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert "m/manifest.json" not in keys  # no release was published
    assert not [k for k in keys if k.startswith("m/releases/")]
    assert _open_uploads(cli.endpoint, bucket) == []
    assert not list(cache.glob("release-*"))
