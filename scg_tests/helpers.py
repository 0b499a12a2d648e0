"""Statistical assertions shared by the test files (``from helpers import assert_within_se``).

How the bounds are derived (see CONTRIBUTING.md, "How the suite is meant to fail"):

* A Monte Carlo mean of ``n`` i.i.d. draws is within ``k`` standard errors of its
  expectation except with probability ``2(1 − Φ(k))`` by the central limit
  theorem: ``k = 4`` is ``6.3e-5`` per coordinate, ``k = 4.5`` is ``6.8e-6``.
  Every statistical test uses a fixed seed, so a passing test stays passing;
  ``k`` says how unlucky a seed would have to be to fail the *right* code.
* Over ``m`` coordinates tested at once, the Bonferroni bound
  :func:`bonferroni_z` keeps the family-wise false-alarm rate at ``alpha``.
* A ratio of two sample variances: ``log s²`` has the delta-method standard
  error ``sqrt((κ − 1) / n)`` with ``κ`` the kurtosis of the draws (``κ = 3`` for
  Normal draws: ``sqrt(2 / n)``, the large-``n`` limit of the F-distribution's
  quantiles), so ``log(s_a² / s_b²)`` has the standard error of
  :func:`log_variance_ratio`. Heavy-tailed draws (score-function gradients of
  discrete sites) get the wider error their sample kurtosis implies.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def mc_mean_and_se(samples) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error along axis 0, in float64 (float32 sums lose digits over thousands of draws)."""
    samples = np.asarray(samples, dtype=np.float64)
    return samples.mean(0), samples.std(0, ddof=1) / np.sqrt(samples.shape[0])


def bonferroni_z(alpha: float, n_tests: int = 1) -> float:
    """The two-sided normal quantile ``Φ⁻¹(1 − alpha / (2 n_tests))``: ``|z|`` above it has
    probability ``≤ alpha`` over all ``n_tests`` coordinates together."""
    return NormalDist().inv_cdf(1.0 - alpha / (2.0 * max(int(n_tests), 1)))


def assert_within_se(samples, exact, k: float = 4.0, *, atol: float = 1e-6) -> np.ndarray:
    """``|mean − exact| < k·SE + atol`` for every coordinate; returns the z-scores.

    ``atol`` covers float32 rounding of coordinates without noise (SE = 0).
    """
    mean, se = mc_mean_and_se(samples)
    exact = np.asarray(exact, dtype=np.float64)
    z = np.abs(mean - exact) / np.where(se > 0, se, np.inf)
    assert np.all(np.abs(mean - exact) < k * se + atol), (
        f"Monte Carlo mean outside {k} standard errors: mean={mean}, exact={exact}, se={se}, |z|={z}")
    return z


def log_variance_ratio(a, b) -> tuple[float, float]:
    """``log(var(a) / var(b))`` of two independent samples and its delta-method standard error.

    ``Var(log s²) ≈ (κ − 1) / n`` with ``κ = m₄ / m₂²`` the sample kurtosis, so the
    error of the log ratio is ``sqrt((κ_a − 1)/n_a + (κ_b − 1)/n_b)``.
    """
    def log_var_and_var_of_it(x):
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        d = x - x.mean()
        m2, m4 = np.mean(d ** 2), np.mean(d ** 4)
        return math.log(np.var(x, ddof=1)), (m4 / m2 ** 2 - 1.0) / x.size

    la, va = log_var_and_var_of_it(a)
    lb, vb = log_var_and_var_of_it(b)
    return la - lb, math.sqrt(va + vb)


def assert_variance_ratio_above(a, b, bound: float, k: float = 4.0) -> float:
    """``var(a) / var(b) > bound`` with ``k`` standard errors of the log ratio to spare; returns the ratio."""
    log_ratio, se = log_variance_ratio(a, b)
    assert log_ratio - k * se > math.log(bound), (
        f"variance ratio {math.exp(log_ratio):.3g} (log {log_ratio:.3f} ± {se:.3f}) is not above {bound} "
        f"by {k} standard errors")
    return math.exp(log_ratio)
