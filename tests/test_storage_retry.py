"""The retry policy of the storage layer: pure functions and a budget, tested without a clock."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manifest.errors import RetryableError, TransportError
from manifest.storage.retry import RetryPolicy, RetryState, give_up

DEFAULT = RetryPolicy()


@pytest.mark.parametrize(
    ("policy", "attempt", "retry_after", "rand", "delay"),
    [
        (DEFAULT, 1, None, 0.0, 0.5),
        (DEFAULT, 2, None, 0.0, 1.0),
        (DEFAULT, 3, None, 0.5, 2.0 * 0.75),
        (DEFAULT, 4, None, 0.999, 4.0 * (1 - 0.4995)),
        (DEFAULT, 9, None, 0.0, 60.0),  # 128 s capped
        (DEFAULT, 10_000, None, 0.0, 60.0),  # no overflow
        (DEFAULT, 0, None, 0.0, 0.5),  # treated as the first
        (DEFAULT, 1, 3.0, 0.0, 3.0),  # Retry-After longer than the backoff wins
        (DEFAULT, 5, 3.0, 0.0, 8.0),  # shorter: the backoff stands
        (DEFAULT, 1, 86_400.0, 0.0, 60.0),  # capped
        (RetryPolicy(jitter=0.0), 2, None, 0.9, 1.0),
        (RetryPolicy(jitter=1.0), 2, None, 0.5, 0.5),
        (RetryPolicy(base=2.0, cap=5.0), 2, None, 0.0, 4.0),
        (RetryPolicy(base=2.0, cap=5.0), 3, None, 0.0, 5.0),
    ],
)
def test_retry_delay(policy: RetryPolicy, attempt: int, retry_after: float | None, rand: float,
                     delay: float) -> None:
    assert policy.delay(attempt, retry_after, rand) == pytest.approx(delay)


@given(attempt=st.integers(1, 200), rand=st.floats(0, 1, exclude_max=True),
       retry_after=st.none() | st.floats(0, 1e9))
def test_retry_delay_bounds(attempt: int, rand: float, retry_after: float | None) -> None:
    d = DEFAULT.delay(attempt, retry_after, rand)
    assert 0 <= d <= DEFAULT.cap
    assert d <= DEFAULT.delay(attempt + 1, retry_after, 0.0)  # never shrinks with failures
    if retry_after is not None:
        assert d >= min(retry_after, DEFAULT.cap)


@pytest.mark.parametrize(
    ("policy", "events", "results"),
    [
        (RetryPolicy(attempts=3, jitter=0), "fff", [0.5, 1.0, None]),
        (RetryPolicy(attempts=1), "f", [None]),
        # bytes arrived: the budget and the backoff start again
        (RetryPolicy(attempts=3, jitter=0), "ffpfff", [0.5, 1.0, 0.5, 1.0, None]),
        (RetryPolicy(attempts=3, jitter=0), "fpfpfpff", [0.5, 0.5, 0.5, 0.5, 1.0]),
    ],
)
def test_retry_state(policy: RetryPolicy, events: str, results: list[float | None]) -> None:
    state = RetryState(policy, rand=lambda: 0.0)
    out: list[float | None] = []
    for event in events:
        if event == "p":
            state.progress()
        else:
            out.append(state.failed(OSError("boom"), None))
    assert out == results
    assert isinstance(state.last_error, OSError)


def test_retry_state_passes_retry_after_on() -> None:
    state = RetryState(RetryPolicy(jitter=0), rand=lambda: 0.0)
    assert state.failed(OSError(), 12.0) == 12.0
    assert state.failed(OSError(), None) == 1.0


@pytest.mark.parametrize("kwargs", [{"attempts": 0}, {"base": -1.0}, {"jitter": 1.5}])
def test_retry_policy_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_give_up_is_a_final_transport_error_that_keeps_retry_after() -> None:
    final = give_up(RetryableError("GET x failed: HTTP 503", retry_after=7.0), 6)
    assert type(final) is TransportError and final.exit_code == 4
    assert final.retry_after == 7.0
    assert str(final) == ("GET x failed: HTTP 503; gave up after 6 tries in a row: check the "
                          "network and the store URL, then retry later")
    assert "gave up" not in str(give_up(RetryableError("cannot reach x")))
