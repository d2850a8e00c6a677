"""Device reports from real agent processes (docs/FORMAT.md §15; issue 11 item 3).

Reports go to a store directory, to a real S3 API (moto) and by POST to a real HTTP server
that answers, fails, hangs or redirects on demand. A report must never fail or hold an update:
a failing endpoint leaves the update done and the report kept for the next cycle, and a
hanging one holds the process no longer than the report deadline (bounded against the same
cycle measured with a working endpoint, not against a fixed number of seconds).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest

from edge_agent.layout import DeviceLayout
from edge_agent.report import agent_version
from manifest.report import MAX_FAILED, MAX_REPORT_SIZE, DeviceReport

from ._agent_checks import BIN, agent_env
from ._fleet_store import AgentDevice, FleetStore
from ._signed_docs import REPO_ID
from .conftest import Cli


def ok(p: subprocess.CompletedProcess[str]) -> None:
    assert p.returncode == 0, (p.stdout, p.stderr)


@pytest.fixture
def store(tmp_path: Path) -> FleetStore:
    s = FleetStore(tmp_path / "store")
    s.manifest(s.index("v1"))
    return s


# -- a report endpoint -------------------------------------------------------------------------


@dataclass
class Posted:
    path: str
    content_type: str | None
    body: bytes
    current_then: str | None  # the device's live version when the request arrived


@dataclass
class Endpoint:
    """``mode``: "ok" (204), "fail" (500), "hang" (never answers), "redirect" (307 from
    ``/reports/in`` to ``location``)."""

    watch: Path | None = None  # a model directory whose live version each request records
    mode: str = "ok"
    location: str = ""
    posted: list[Posted] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    url: str = ""


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    yield from _serve(Endpoint())


def _serve(ep: Endpoint) -> Iterator[Endpoint]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            live = DeviceLayout(ep.watch).current() if ep.watch else None
            ep.posted.append(Posted(self.path, self.headers.get("Content-Type"), body, live))
            if ep.mode == "hang":
                ep.release.wait(60)
                return
            if ep.mode == "redirect" and self.path == "/reports/in":
                self.send_response(307)
                self.send_header("Location", ep.location)
            else:
                self.send_response(500 if ep.mode == "fail" else 204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ep.url = f"http://127.0.0.1:{server.server_address[1]}/reports/in"
    try:
        yield ep
    finally:
        ep.release.set()
        server.shutdown()
        server.server_close()


def read_report(path: Path) -> DeviceReport:
    data = path.read_bytes()
    assert len(data) <= MAX_REPORT_SIZE
    return DeviceReport.from_bytes(data)


def timed(dev: AgentDevice, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    p = dev.agent(*args)
    return p, time.monotonic() - t0


# -- to the store -----------------------------------------------------------------------------


def test_reports_in_a_directory_store_after_success_and_failure(store: FleetStore,
                                                                tmp_path: Path) -> None:
    dev = AgentDevice(tmp_path / "dev", str(store.path), store.signed_roots[0], "edge-00042",
                      report="store")
    ok(dev.agent("run", "--once"))
    path = store.path / "reports" / "edge-00042.json"
    r = read_report(path)
    assert (r.device_id, r.repository_id, r.channel) == ("edge-00042", REPO_ID, "stable")
    assert (r.state, r.current, r.target, r.last_error) == ("ok", "v1", "v1", None)
    assert r.last_update_bytes > 0 and r.agent_version == agent_version() != "unknown"
    assert r.started_at is not None and r.finished_at is not None
    assert r.started_at <= r.finished_at

    v2 = store.index("v2")
    (store.path / "objects" / v2.index.sha256).unlink()  # the store lost v2's index
    store.manifest(v2)
    p = dev.agent("run", "--once")
    assert p.returncode == 4, p.stderr
    r = read_report(path)
    assert (r.state, r.current, r.target) == ("failed", "v1", "v2")
    assert r.last_error is not None and "missing" in r.last_error
    assert dev.status()["report_pending"] is False


def test_a_report_is_bounded(store: FleetStore, tmp_path: Path) -> None:
    """40 long failed versions: the report keeps the 32 most recent and stays under 16 KiB."""
    dev = AgentDevice(tmp_path / "dev", str(store.path), store.signed_roots[0], "edge-1",
                      report="store")
    layout = DeviceLayout(dev.model_dir)
    state = layout.read_state()
    state.failed_versions = [f"old-{i:03d}-" + "x" * 100 for i in range(40)]
    layout.write_state(state)
    ok(dev.agent("run", "--once"))
    r = read_report(store.path / "reports" / "edge-1.json")
    assert len(r.failed_versions) == MAX_FAILED
    assert r.failed_versions[-1] == state.failed_versions[-1]


def test_reports_to_s3(cli: Cli, bucket: str, store: FleetStore, tmp_path: Path) -> None:
    """A device with write credentials puts reports/<id>.json into the bucket."""
    s3 = boto3.client("s3", endpoint_url=cli.endpoint)
    for f in store.path.rglob("*"):
        if f.is_file():
            s3.put_object(Bucket=bucket, Key=f"fleet/{f.relative_to(store.path)}",
                          Body=f.read_bytes())
    env = cli.env()
    dev = AgentDevice(tmp_path / "dev", f"s3://{bucket}/fleet", store.signed_roots[0],
                      "edge-s3", report="store", endpoint_url=cli.endpoint)
    ok(dev.agent("run", "--once", env=env))
    body = s3.get_object(Bucket=bucket, Key="fleet/reports/edge-s3.json")
    assert body["ContentType"] == "application/json"
    r = DeviceReport.from_bytes(body["Body"].read())
    assert (r.device_id, r.state, r.current) == ("edge-s3", "ok", "v1")


def test_report_store_needs_a_writable_store(store: FleetStore, tmp_path: Path) -> None:
    trust = tmp_path / "root.json"
    trust.write_bytes(store.signed_roots[0])
    p = subprocess.run([str(BIN / "deltaship-agent"), "init", "--store", "https://cdn.example/m",
                        "--trust", str(trust), "--model-dir", str(tmp_path / "m"),
                        "--config", str(tmp_path / "a.toml"), "--report", "store"],
                       env=agent_env(), text=True, capture_output=True, timeout=60)
    assert p.returncode == 2 and "--report-url" in p.stderr, p.stderr
    assert not (tmp_path / "a.toml").exists()


# -- by POST ----------------------------------------------------------------------------------


def test_reports_by_post_and_a_failing_endpoint_keeps_them(store: FleetStore, tmp_path: Path,
                                                            endpoint: Endpoint) -> None:
    dev = AgentDevice(tmp_path / "dev", str(store.path), store.signed_roots[0], "edge-2",
                      report_url=endpoint.url)
    ok(dev.agent("run", "--once"))
    [first] = endpoint.posted
    assert first.path == "/reports/in" and first.content_type == "application/json"
    assert DeviceReport.from_bytes(first.body).state == "ok"

    endpoint.mode = "fail"
    store.manifest(store.index("v2"))
    p = dev.agent("run", "--once")
    ok(p)  # the update stands
    assert dev.current == "v2" and "device report not sent" in p.stderr
    assert dev.status()["report_pending"] is True
    kept = DeviceReport.from_bytes(endpoint.posted[-1].body)
    assert (kept.current, kept.target) == ("v2", "v2")

    endpoint.mode = "ok"
    endpoint.posted.clear()
    store.manifest(store.index("v3"))  # (a kept report equal to the new one is sent once)
    ok(dev.agent("run", "--once"))
    old, new = (DeviceReport.from_bytes(p.body) for p in endpoint.posted)
    assert old == kept and new.current == "v3"
    assert new.started_at is not None and kept.finished_at is not None
    assert new.started_at >= kept.finished_at
    assert dev.status()["report_pending"] is False


def test_a_hanging_endpoint_holds_nothing_past_its_deadline(store: FleetStore, tmp_path: Path,
                                                            endpoint: Endpoint) -> None:
    """The same update on twin devices, with a working and with a hanging endpoint: the hang
    costs at most the report deadline more, and the switch was done before the report went."""
    deadline = 2.0
    twins = [AgentDevice(tmp_path / f"d{i}", str(store.path), store.signed_roots[0],
                         f"edge-t{i}", report_url=endpoint.url, report_deadline=deadline)
             for i in range(2)]
    for d in twins:
        ok(d.agent("run", "--once"))
    store.manifest(store.index("v2"))
    endpoint.watch = twins[0].model_dir
    p, reference = timed(twins[0], "run", "--once")
    ok(p)
    endpoint.mode, endpoint.watch = "hang", twins[1].model_dir
    p, took = timed(twins[1], "run", "--once")
    ok(p)
    assert twins[1].current == "v2" and endpoint.posted[-1].current_then == "v2"
    assert took >= deadline  # the hang was cut by the deadline, not by the server
    assert took - deadline <= 2 * reference, (took, reference)
    assert twins[1].status()["report_pending"] is True


def test_a_redirect_to_another_host_is_not_followed(store: FleetStore, tmp_path: Path,
                                                    endpoint: Endpoint) -> None:
    serving = _serve(Endpoint())
    other = next(serving)
    try:
        endpoint.mode = "redirect"
        endpoint.location = other.url.replace("127.0.0.1", "localhost")
        dev = AgentDevice(tmp_path / "dev", str(store.path), store.signed_roots[0], "edge-3",
                          report_url=endpoint.url)
        p = dev.agent("run", "--once")
        ok(p)
        assert "not followed" in p.stderr and other.posted == []
        assert dev.status()["report_pending"] is True
        endpoint.location = "/reports/again"  # the same host: followed, body and method kept
        endpoint.posted.clear()
        ok(dev.agent("run", "--once"))
        assert [p.path for p in endpoint.posted][-1] == "/reports/again"
        assert DeviceReport.from_bytes(endpoint.posted[-1].body).device_id == "edge-3"
        assert dev.status()["report_pending"] is False
    finally:
        serving.close()
