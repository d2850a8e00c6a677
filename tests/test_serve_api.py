"""The reference server's HTTP API, on a real process: answers, version tags, bad requests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from devtools import modelgen
from edge_agent.serving.server import load_reference

from ._model_server import ModelServer, serving
from .conftest import BIN, Cli, MoEFamily
from .test_agent_e2e import Device, _release


@pytest.fixture
def device(cli: Cli, release_key: Path, moe_family: MoEFamily, tmp_path: Path) -> Device:
    store = tmp_path / "store"
    store.mkdir()
    cli.publish("init", "--store", store, "--key", release_key, "--out", tmp_path / "root.json")
    _release(cli, str(store), moe_family.v1, "v1", release_key)
    dev = Device(cli, tmp_path / "root.json", str(store), tmp_path / "dev")
    dev.agent("run", "--once")
    return dev


def _post(server: ModelServer, path: str, body: bytes) -> tuple[int, dict, str]:
    req = urllib.request.Request(server.url + path, data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), r.headers.get("X-Deltaship-Version", "")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers.get("X-Deltaship-Version", "")


def test_forward_and_generate_match_a_fresh_load(cli: Cli, device: Device,
                                                 moe_family: MoEFamily) -> None:
    ref = load_reference(moe_family.v1)
    with serving(cli, device.model_dir) as server:
        status, body, header = _post(server, "/v1/forward", b'{"tokens": [5, 6, 7]}')
        assert status == 200 and header == "v1" and body["version"] == "v1"
        out = ref.forward([5, 6, 7])
        assert body["logits_sha256"] == out.logits_sha256
        assert body["top"] == [list(t) for t in out.top(5)]
        assert body["next_token"] == out.top(1)[0][0]
        status, body, _ = _post(server, "/v1/generate",
                                b'{"tokens": [1, 2], "max_new_tokens": 4}')
        assert status == 200 and body == {"version": "v1", "tokens": ref.generate([1, 2], 4)}
        assert server.get("/healthz") == (200, {"status": "ok", "version": "v1"})
        assert server.get("/version")[1]["target"] == "v1"
        status, body, _ = _post(server, "/v1/reload", b'{"version": "v1"}')
        assert status == 202 and body["target"] == "v1"
        status, body, _ = _post(server, "/v1/reload", b'{"version": "v9"}')
        assert status == 409 and "current names v1, not v9" in body["error"]
        assert _post(server, "/v1/reload", b"")[0] == 202


BAD_REQUESTS = [
    ("/v1/forward", b"not json", "not JSON"),
    ("/v1/forward", b"[1, 2]", "'tokens' must be"),
    ("/v1/forward", b'{"tokens": []}', "'tokens' must be"),
    ("/v1/forward", b'{"tokens": [1, -1]}', "'tokens' must be"),
    ("/v1/forward", b'{"tokens": [1, 2.5]}', "'tokens' must be"),
    ("/v1/forward", b'{"tokens": [1, true]}', "'tokens' must be"),
    ("/v1/forward", b'{"tokens": [99999]}', "ids in 0..255"),
    ("/v1/forward", json.dumps({"tokens": [1] * 513}).encode(), "'tokens' must be"),
    ("/v1/generate", b'{"tokens": [1], "max_new_tokens": 65}', "'max_new_tokens'"),
    ("/v1/generate", b'{"tokens": [1], "max_new_tokens": "3"}', "'max_new_tokens'"),
    ("/v1/forward", b"[" * 60000, "not JSON"),  # nesting deeper than the JSON parser's stack
]


def test_bad_requests_get_400_with_a_reason(cli: Cli, device: Device) -> None:
    with serving(cli, device.model_dir) as server:
        for path, body, message in BAD_REQUESTS:
            status, answer, _ = _post(server, path, body)
            assert status == 400 and message in answer["error"], (body, answer)
        assert _post(server, "/v1/forward", b'{"tokens": [1]}')[0] == 200  # still serving


def test_sigterm_stops_the_server_and_removes_its_pidfile(cli: Cli, device: Device) -> None:
    server = ModelServer(cli, device.model_dir)
    assert server.pidfile.read_text().strip() == str(server.proc.pid)
    server.proc.send_signal(signal.SIGTERM)
    assert server.stop() == 0
    assert not server.pidfile.exists()


def test_a_plain_health_url_is_enough_to_refuse_a_bad_release(
        cli: Cli, device: Device, release_key: Path, moe_family: MoEFamily,
        tmp_path: Path) -> None:
    """Without --health-expect-version: /healthz answers 503 ("loading") until the server has
    followed `current`, so the agent cannot mistake the old version's health for the new's."""
    bad = modelgen.diverge(moe_family.v1, tmp_path / "bad",
                           ["model.layers.1.block_sparse_moe.gate.weight"])
    store = str(tmp_path / "store")
    with serving(cli, device.model_dir) as server:
        with open(device.config, "a") as f:
            f.write(f'\n[hooks]\nhealth = {{kind = "http", url = "{server.url}/healthz", '
                    "attempts = 20, interval = 0.1}\n")
        _release(cli, store, bad, "v2", release_key)
        p = device.agent("run", "--once", check=False)
        assert p.returncode == 6, p.stdout + p.stderr
        assert "non-finite" in p.stderr and "switched back to v1" in p.stderr
        assert server.get("/healthz") == (200, {"status": "ok", "version": "v1"})
        assert device.status()["failed_versions"] == ["v2"]


def test_sighup_at_once_after_start_does_not_kill_the_server(cli: Cli, device: Device,
                                                             tmp_path: Path) -> None:
    """The agent's signal hook may fire the moment the pid file appears."""
    pidfile = tmp_path / "fast.pid"
    proc = subprocess.Popen([str(BIN / "deltaship-agent"), "serve", "--model-dir",
                             str(device.model_dir), "--port", "0", "--pidfile", str(pidfile)],
                            env=cli.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 30
        while not pidfile.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.001)
        os.kill(int(pidfile.read_text()), signal.SIGHUP)
        assert proc.stdout is not None and "serving v1" in proc.stdout.readline()
        time.sleep(0.3)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert not pidfile.exists()


def test_a_malformed_config_json_is_one_clear_line(cli: Cli, device: Device) -> None:
    (device.live / "config.json").unlink()  # a hard link: replace, do not edit in place
    (device.live / "config.json").write_text('{"num_attention_heads": "four"}')
    p = cli.run("deltaship-agent", "serve", "--model-dir", device.model_dir, "--port", "0",
                check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "num_attention_heads must be a positive integer, not 'four'" in p.stderr
