"""devtools/bench_models.py: the helpers scripts/bench_scale.py measures with."""

from __future__ import annotations

import itertools
import sys
import urllib.request
from pathlib import Path

import pytest

from devtools.bench_models import cached_model, moe_bytes, run_timed, scaled_moe, serve_store


@pytest.mark.parametrize("gb", [0.5, 1, 2, 4, 8, 16])
def test_scaled_moe_has_the_size_asked_and_the_same_largest_tensor(gb: float) -> None:
    total, largest = moe_bytes(scaled_moe(gb))
    assert abs(total / (gb * 1e9) - 1) < 0.05
    assert largest == 32000 * 1024 * 2  # the embedding, whatever the size: a flat memory bound


def test_scaled_moe_grows_layers_and_experts() -> None:
    cfgs = [scaled_moe(gb) for gb in (0.5, 1, 2, 4)]
    assert [c.layers for c in cfgs] == [1, 2, 4, 8]
    assert all(a.experts <= b.experts for a, b in itertools.pairwise(cfgs))
    assert all(a.layers * a.experts < b.layers * b.experts
               for a, b in itertools.pairwise(cfgs))


def test_cached_model_makes_once_and_leaves_no_partial_directory(tmp_path: Path) -> None:
    calls: list[Path] = []

    def make(out: Path) -> None:
        calls.append(out)
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"x")

    target = tmp_path / "v1"
    assert cached_model(target, make) == target
    assert cached_model(target, make) == target
    assert len(calls) == 1 and calls[0].name == "v1.partial"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]

    def fail(out: Path) -> None:
        out.mkdir()
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cached_model(tmp_path / "v2", fail)
    assert not (tmp_path / "v2").exists()  # the next run generates it again


def test_serve_store_serves_the_directory_over_http(tmp_path: Path) -> None:
    (tmp_path / "objects").mkdir()
    (tmp_path / "objects" / "a").write_bytes(b"hello" * 1000)
    with serve_store(tmp_path) as server, urllib.request.urlopen(
            f"{server.url}/objects/a", timeout=10) as r:
        assert r.read() == b"hello" * 1000
    # After the server stopped: the handler counts what it wrote after the client has it.
    assert [(q.path, q.status, q.sent) for q in server.requests] == [
        ("/store/objects/a", 200, 5000)]


def test_run_timed_reports_the_child_peak_rss_and_stdout() -> None:
    big = run_timed([sys.executable, "-c", "b = bytearray(200 * 2**20); print(len(b))"])
    small = run_timed([sys.executable, "-c", "print(1)"])
    assert big.stdout.strip() == str(200 * 2**20) and small.stdout.strip() == "1"
    assert big.peak_rss - small.peak_rss > 150 * 2**20
    with pytest.raises(SystemExit, match="exit 3"):
        run_timed([sys.executable, "-c", "import sys; sys.exit(3)"])
