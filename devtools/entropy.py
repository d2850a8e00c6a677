"""Information floors for benchmark pairs: how few bytes any coder could spend on some values.

Pure functions, no I/O. Used by ``scripts/bench_floor.py`` to show where a byte target lies
below what the data allows.

    bf16_gaussian_entropy(sigma) -> bits    exact entropy of N(0, sigma^2) rounded to bf16
    plugin_entropy(codes) -> bits           empirical (plug-in) entropy of a sample's codes
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["bf16_gaussian_entropy", "plugin_entropy"]

_FINITE_POSITIVE = 0x7F80  # bf16 bit patterns 0x0000 .. 0x7F7F: zero and the finite positives


def _bf16_values(codes: npt.NDArray[np.uint32]) -> npt.NDArray[np.float64]:
    return (codes << np.uint32(16)).view(np.float32).astype(np.float64)


def bf16_gaussian_entropy(sigma: float) -> float:
    """Entropy in bits of X ~ N(0, sigma^2) rounded to the nearest bf16 value.

    Every finite bf16 value v owns the interval between the midpoints to its neighbours (round
    to nearest; a tie's parity does not change a probability), so P(v) is a difference of the
    normal CDF. Negative values mirror positive ones. No coder of independent samples from this
    distribution can spend fewer bits per sample on average (Shannon's source coding theorem).
    """
    if not sigma > 0:
        raise ValueError("sigma must be positive")
    v = _bf16_values(np.arange(_FINITE_POSITIVE, dtype=np.uint32))
    upper = np.append((v[:-1] + v[1:]) / 2, math.inf)
    lower = np.append(0.0, upper[:-1])
    z = 1 / (sigma * math.sqrt(2))
    # P(lower <= |X| < upper) / 2 for each sign: erfc keeps the far tail's precision
    tail = np.array([math.erfc(x * z) for x in lower]) - np.array(
        [math.erfc(x * z) if math.isfinite(x) else 0.0 for x in upper])
    p_zero = tail[0]  # +0 and -0 both round from (-upper0, upper0): one symbol
    p_side = tail[1:] / 2
    probs = np.concatenate([[p_zero], p_side, p_side])
    probs = probs[probs > 0]
    return float(-(probs * np.log2(probs)).sum())


def plugin_entropy(codes: npt.NDArray[np.integer]) -> float:
    """Entropy in bits per sample of the empirical distribution of ``codes``: an optimistic
    estimate for a finite sample (it ignores the cost of describing the distribution)."""
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())
