"""When the agent polls: the pure schedule (tables and properties), and the service loop run
in-process against a real HTTP store whose 429/503 answers carry Retry-After.

The service takes its randomness (``rand``) and its wait between polls (``pause``) from the
test, so every delay it chose is observed exactly and nothing sleeps.
"""

from __future__ import annotations

import email.utils
import time
from pathlib import Path

import botocore.exceptions
import pytest
from hypothesis import given
from hypothesis import strategies as st

from devtools.faulty_http import Faults
from edge_agent.config import load_config
from edge_agent.schedule import (
    BACKOFF_BASE,
    MAX_BACKOFF,
    MAX_RETRY_AFTER,
    MIN_DELAY,
    PollSchedule,
)
from edge_agent.service import Service
from manifest.errors import RetryableError, TransportError
from manifest.storage.retry import RetryPolicy
from manifest.storage.s3 import s3_error
from manifest.storage.source import open_source

from ._fleet_store import AgentDevice, FleetStore
from ._served_store import ServedStore

# -- the pure schedule -------------------------------------------------------------------------


@pytest.mark.parametrize(("interval", "failures", "retry_after", "rand", "delay"), [
    (300.0, 0, None, 0.0, 240.0),  # the shortest jittered interval: 80 %
    (300.0, 0, None, 0.5, 300.0),
    (300.0, 0, None, 1.0, 360.0),  # the longest: 120 %
    (300.0, 1, None, 1.0, 30.0),  # backoff ceiling min(300 / 8, 30 s) after a first failure
    (300.0, 2, None, 1.0, 60.0),  # doubled
    (300.0, 4, None, 1.0, 240.0),
    (300.0, 5, None, 1.0, 300.0),  # capped at the interval
    (300.0, 50, None, 0.5, 150.0),  # full jitter: anywhere below the ceiling
    (300.0, 1, None, 0.0, MIN_DELAY),  # ...but never a tight loop
    (8.0, 1, None, 1.0, 1.0),  # a short interval: base interval / 8
    (86400.0, 30, None, 1.0, MAX_BACKOFF),  # a day's interval: backoff at most 6 h
    (300.0, 1, 120.0, 0.5, 120.0),  # Retry-After above the backoff: a lower bound
    (300.0, 0, 1000.0, 0.5, 1000.0),  # ...and above the interval
    (300.0, 0, 10.0, 0.5, 300.0),  # a short Retry-After does not make polls faster
    (300.0, 1, 10**9, 0.5, MAX_RETRY_AFTER),  # a store cannot park a device for ever
    (86400.0, 0, 10**9, 1.0, 86400.0 * 1.2),  # nor shorten a longer interval
])
def test_delay_table(interval: float, failures: int, retry_after: float | None, rand: float,
                     delay: float) -> None:
    assert PollSchedule(interval).next(failures, retry_after, rand) == pytest.approx(delay)


@given(st.floats(1, 365 * 86400), st.integers(0, 10_000), st.floats(0, 1, exclude_max=True),
       st.none() | st.floats(0, 1e12))
def test_delay_bounds(interval: float, failures: int, rand: float,
                      retry_after: float | None) -> None:
    s = PollSchedule(interval)
    d = s.next(failures, retry_after, rand)
    if failures == 0:
        low, high = 0.8 * interval, 1.2 * interval
    else:
        low, high = 0.0, min(interval, MAX_BACKOFF)
        assert d >= min(MIN_DELAY, s.backoff_cap) or retry_after
    if retry_after is not None:
        low = max(low, min(retry_after, MAX_RETRY_AFTER))
        high = max(high, min(retry_after, MAX_RETRY_AFTER))
    assert low - 1e-6 <= d <= high + 1e-6
    assert 0 <= s.first(rand) < interval
    assert s.backoff_base == min(interval / 8, BACKOFF_BASE)


def test_backoff_spreads_a_fleet() -> None:
    """Full jitter: 1000 devices failing together retry over the whole ceiling, not at once."""
    s = PollSchedule(300.0)
    delays = sorted(s.after_failure(3, i / 1000) for i in range(1000))
    assert delays[0] == MIN_DELAY and delays[-1] == pytest.approx(120 * 0.999)
    assert len({round(d) for d in delays}) > 100


# -- the service loop, in-process, against a real HTTP store ------------------------------------


def _device(tmp_path: Path, url: str, trust: bytes, interval: float = 300.0) -> AgentDevice:
    return AgentDevice(tmp_path / "dev", url, trust, "edge-1", interval=interval)


async def _run(dev: AgentDevice, polls: int, rand: float = 0.5) -> Service:
    """The service until it chose ``polls`` delays (the first poll's included)."""
    service: Service

    async def pause(delay: float) -> None:
        if len(service.delays) >= polls:
            service.stop.set()

    service = Service(load_config(dev.config), rand=lambda: rand, pause=pause,
                      retry=RetryPolicy(attempts=3, base=0, cap=60))
    assert await service.run() == 0
    return service


async def test_first_poll_is_spread_then_jittered(tmp_path: Path) -> None:
    store = FleetStore(tmp_path / "store")
    store.manifest(store.index("v1"))
    dev = _device(tmp_path, str(store.path), store.signed_roots[0], interval=100.0)
    service = await _run(dev, 3, rand=0.25)
    assert service.delays == [25.0, 90.0, 90.0]  # 0.25 of the interval; then 80 % + 0.25 * 40 %
    assert dev.current == "v1"


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_retry_after_is_a_lower_bound_of_the_next_poll(tmp_path: Path, status: int,
                                                             form: str) -> None:
    """The store answers the manifest with 429/503 and Retry-After beyond the source's retry
    cap: the request gives up at once (no retry inside the cycle) and the next poll waits at
    least that long; once the store answers, the device updates and polls on its interval."""
    store = FleetStore(tmp_path / "store")
    store.manifest(store.index("v1"))
    after = 1800
    value = (str(after) if form == "seconds"
             else email.utils.formatdate(time.time() + after, usegmt=True))
    with ServedStore(store.path) as served:
        dev = _device(tmp_path, served.url, store.signed_roots[0])
        served.set_faults(Faults(fail=1, fail_status=status, retry_after=value,
                                 only=r"manifest\.json$"))
        service = await _run(dev, 3)
        manifests = [r for r in served.server.requests if r.path.endswith("manifest.json")]
    first, after_failure, after_success = service.delays
    assert first == 150.0
    assert after - 2 <= after_failure <= after  # the HTTP date loses the seconds it took
    assert after_success == 300.0
    assert [r.status for r in manifests] == [status, 200]
    assert dev.current == "v1"


async def test_transport_failures_back_off_with_full_jitter(tmp_path: Path) -> None:
    store = FleetStore(tmp_path / "store")
    store.manifest(store.index("v1"))
    with ServedStore(store.path) as served:
        dev = _device(tmp_path, served.url, store.signed_roots[0], interval=800.0)
        served.set_faults(Faults(fail=3 * 3, fail_status=500))  # three cycles of 3 tries
        service = await _run(dev, 5, rand=1.0)
    # first poll, then ceilings 30, 60, 120 s (base min(800 / 8, 30)), then the interval.
    assert service.delays[1:] == pytest.approx([30.0, 60.0, 120.0, 800.0 * 1.2])
    assert dev.current == "v1"


async def test_a_long_retry_after_ends_the_request_at_once(tmp_path: Path) -> None:
    store = FleetStore(tmp_path / "store")
    store.manifest(store.index("v1"))
    with ServedStore(store.path) as served:
        served.set_faults(Faults(fail=5, fail_status=503, retry_after="600"))
        source = open_source(served.url, retry=RetryPolicy(attempts=5, cap=60))
        try:
            with pytest.raises(TransportError) as e:
                await source.get_small("manifest.json", 65536)
        finally:
            await source.close()
        assert len(served.server.requests) == 1
    assert e.value.retry_after == 600


def test_s3_retry_after_is_read() -> None:
    err = botocore.exceptions.ClientError(
        {"Error": {"Code": "SlowDown", "Message": "reduce your request rate"},
         "ResponseMetadata": {"HTTPStatusCode": 503, "HTTPHeaders": {"retry-after": "42"}}},
        "GetObject")
    mapped = s3_error(err, "s3://b/p/manifest.json", "b", "AWS S3")
    assert isinstance(mapped, RetryableError) and mapped.retry_after == 42


def test_a_short_interval_still_waits_the_minimum_after_a_failure() -> None:
    """Found by hypothesis: interval 1 s, first failure, rand 0: the ceiling is 0.125 s, but
    the wait is never under MIN_DELAY (or the cap, if smaller)."""
    assert PollSchedule(1.0).next(1, None, 0.0) == pytest.approx(1.0)
    assert PollSchedule(0.5).next(1, None, 0.0) == pytest.approx(0.5)
