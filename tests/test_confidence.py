"""Bootstrap CIs: determinism, equivariance, coverage, paired differences, bad input."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dgq_utils.evaluate.confidence import (
    CI,
    bootstrap_indices,
    bootstrap_mean,
    bootstrap_statistic,
    mean_ci_halfwidth,
    paired_difference,
    paired_statistic_difference,
)


def test_seeded_and_reproducible():
    x = np.random.default_rng(1).normal(size=40)
    a, b = bootstrap_mean(x, seed=3), bootstrap_mean(x, seed=3)
    assert a == b
    assert bootstrap_mean(x, seed=4) != a
    assert a.low < a.value < a.high and a.n == 40 and a.method == "percentile"


def test_indices_shape_and_range():
    idx = bootstrap_indices(7, 11, seed=0)
    assert idx.shape == (11, 7) and idx.min() >= 0 and idx.max() < 7
    with pytest.raises(ValueError, match="empty"):
        bootstrap_indices(0, 5)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=30), st.floats(-100, 100), st.floats(0.1, 10))
def test_translation_and_scale_equivariance(xs, shift, scale):
    x = np.array(xs)
    base = bootstrap_mean(x, n_boot=200, seed=0)
    moved = bootstrap_mean(x * scale + shift, n_boot=200, seed=0)
    tol = 1e-6 * (1 + abs(shift) + scale * np.abs(x).max())
    assert moved.value == pytest.approx(base.value * scale + shift, abs=tol)
    assert moved.low == pytest.approx(base.low * scale + shift, abs=tol)
    assert moved.high == pytest.approx(base.high * scale + shift, abs=tol)
    assert base.low <= base.high


def test_constant_sample_has_zero_width():
    ci = bootstrap_mean([0.25] * 10)
    assert ci.low == ci.high == ci.value == 0.25


def test_coverage_close_to_nominal():
    rng = np.random.default_rng(0)
    hits = 0
    trials = 300
    for t in range(trials):
        ci = bootstrap_mean(rng.normal(size=60), n_boot=400, seed=t)
        hits += ci.low <= 0.0 <= ci.high
    assert 0.89 <= hits / trials <= 0.99


def test_width_shrinks_like_root_n():
    rng = np.random.default_rng(0)
    w_small = np.mean([(lambda c: c.high - c.low)(bootstrap_mean(rng.normal(size=25), seed=i)) for i in range(20)])
    w_big = np.mean([(lambda c: c.high - c.low)(bootstrap_mean(rng.normal(size=400), seed=i)) for i in range(20)])
    assert w_small / w_big == pytest.approx(4.0, rel=0.2)
    assert mean_ci_halfwidth(1.0, 400) == pytest.approx(1.96 / 20, rel=1e-3)


def test_paired_difference_detects_shift_and_not_noise():
    rng = np.random.default_rng(0)
    a = rng.normal(size=100)
    same = paired_difference(a, a)
    assert same.value == 0 and same.low == 0 and same.high == 0 and not same.significant and same.p_value == 1.0
    shifted = paired_difference(a + 0.5 + 0.1 * rng.normal(size=100), a)
    assert shifted.significant and shifted.low > 0.4 and shifted.p_value < 0.01
    noisy = paired_difference(a + rng.normal(size=100), a + rng.normal(size=100))
    assert noisy.low < 0 < noisy.high and not noisy.significant


def test_paired_statistic_difference_uses_the_same_indices():
    x = np.random.default_rng(2).normal(size=(50, 3))
    ci = paired_statistic_difference(lambda i: x[i].var(), lambda i: x[i].var(), 50, n_boot=50)
    assert ci.value == 0 and ci.low == 0 and ci.high == 0  # identical statistics ⇒ every replicate's diff is 0


def test_set_statistic_methods():
    x = np.random.default_rng(3).normal(size=80)
    stat = lambda idx: float(np.var(x[idx]))  # noqa: E731
    for method in ("percentile", "bc", "basic", "shifted"):
        ci = bootstrap_statistic(stat, 80, n_boot=300, method=method)
        assert ci.low < ci.value < ci.high, method
    with pytest.raises(ValueError, match="valid: percentile, bc, basic, shifted"):
        bootstrap_statistic(stat, 80, n_boot=10, method="bca")


def test_shifted_interval_keeps_a_biased_statistic_inside():
    # replicates sit wholly above the estimate (like FID of resampled sets at n < d): percentile and BC miss it
    x = np.random.default_rng(4).normal(size=60)
    stat = lambda idx: float(np.var(x[idx])) + 3.0 * (1 - len(np.unique(idx)) / len(idx))  # noqa: E731
    pct = bootstrap_statistic(stat, 60, n_boot=400, method="percentile")
    bc = bootstrap_statistic(stat, 60, n_boot=400, method="bc")
    shifted = bootstrap_statistic(stat, 60, n_boot=400)
    assert shifted.method == "shifted" and shifted.low < shifted.value < shifted.high
    assert pct.low > pct.value and not (bc.low <= bc.value <= bc.high)
    assert shifted.high - shifted.low == pytest.approx(pct.high - pct.low, rel=0.25)
    d = paired_statistic_difference(stat, lambda idx: float(np.var(x[idx])), 60, n_boot=200)
    assert d.low < d.value < d.high and 0 <= d.p_value <= 1


def test_bad_input():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_mean([])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean([1.0, math.nan])
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1, 2, 3], [1, 2])
    one = bootstrap_mean([3.0])
    assert one.value == 3.0 and math.isnan(one.low)
    assert isinstance(one, CI) and "n=1" in str(one)
