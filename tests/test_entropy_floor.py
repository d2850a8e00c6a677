"""devtools.entropy: the information floor behind scripts/bench_floor.py (issue 12)."""

from __future__ import annotations

import numpy as np
import pytest

from devtools.entropy import bf16_gaussian_entropy, plugin_entropy
from devtools.modelgen import f32_to_bf16_bits


def test_exact_entropy_matches_a_large_sample_of_the_same_distribution() -> None:
    """The generator's own path (float32 normal samples rounded to bf16): the plug-in entropy
    of 400,000 samples is within a few hundredths of a bit of the exact value (it is biased low
    by about (distinct codes - 1) / (2 n ln 2), under 0.01 bits here)."""
    rng = np.random.default_rng(7)
    sigma = 0.02
    codes = f32_to_bf16_bits(rng.standard_normal(400_000, dtype=np.float32) * np.float32(sigma))
    exact, sample = bf16_gaussian_entropy(sigma), plugin_entropy(codes)
    assert 10.40 < exact < 10.50
    assert 0 <= exact - sample < 0.03, (exact, sample)


def test_exact_entropy_is_the_same_for_every_power_of_two_scale() -> None:
    """Scaling by 2 shifts every bf16 cell by one binade: the distribution of codes, and so
    its entropy, is unchanged (far from the subnormal and overflow ends)."""
    base = bf16_gaussian_entropy(1.0)
    for k in (-20, -6, -1, 1, 10):
        assert bf16_gaussian_entropy(2.0 ** k) == pytest.approx(base, abs=1e-9)


def test_plugin_entropy_of_known_distributions() -> None:
    assert plugin_entropy(np.arange(256)) == pytest.approx(8.0)
    assert plugin_entropy(np.zeros(100, dtype=np.uint16)) == 0.0
    assert plugin_entropy(np.array([1, 1, 2, 3])) == pytest.approx(1.5)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan")])
def test_a_non_positive_sigma_is_refused(sigma: float) -> None:
    with pytest.raises(ValueError, match="sigma must be positive"):
        bf16_gaussian_entropy(sigma)
