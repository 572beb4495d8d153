"""Bootstrap confidence intervals for every number the results table reports.

Two kinds of numbers come out of an evaluation:

* **per-image metrics** (CLIP score, alignment accuracy, PSNR/SSIM/LPIPS vs FP): the reported number is a mean
  over images, so its CI comes from resampling the per-image values with replacement. Resampling is vectorised:
  one ``(n_boot, n)`` index matrix, one fancy-indexing op, one mean along an axis.
* **set metrics** (FID, KID, IS): the number is a function of the whole set of generated-image features. Its CI
  comes from resampling the *cached features* (never re-running the extractor) and recomputing the statistic
  through torch-fidelity's own functions for each replicate (:func:`bootstrap_statistic`). The reference side
  (real-image statistics) is held fixed: the interval covers the sampling noise of the generated images only.

FID, KID and IS are biased at small n, and a bootstrap replicate (which repeats images: about 63 % of them are
distinct) is biased further, so the replicates can sit wholly on one side of the point estimate — on the
embedded model at n = 128 < d = 256 features every FID replicate was ~25 % above the estimate. A percentile
interval then misses the estimate, and the bias-corrected percentile method (``"bc"``, Efron 1987) degenerates
(every quantile it asks for is the minimum). Set statistics therefore default to ``method="shifted"``: the
replicates' spread around their *median* is moved to the estimate, ``[θ̂ − (med − q_lo), θ̂ + (q_hi − med)]``
— the bootstrap measures the spread, not the location. With fewer distinct images per replicate the spread is
somewhat overstated, so these intervals err on the wide side. Paired differences (:func:`paired_difference`,
:func:`paired_statistic_difference`) resample the *same* prompt/seed indices for both recipes, so most of the bias,
and all the prompt-to-prompt variation, cancels — that is the test to use for "is W8A8 different from FP".

All resampling is seeded (``numpy.random.default_rng(seed)``), so a CI is reproducible to the last digit.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.stats import norm

METHODS = ("percentile", "bc", "basic", "shifted")


@dataclass(frozen=True)
class CI:
    """A point estimate with a two-sided bootstrap confidence interval."""

    value: float
    low: float
    high: float
    n: int
    n_boot: int
    level: float = 0.95
    method: str = "percentile"
    p_value: float | None = None  # only for differences: two-sided bootstrap p-value of "no difference"

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0 (meaningful for differences)."""
        return bool(self.low > 0 or self.high < 0)

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}] (n={self.n}, {self.level:.0%} {self.method})"


def bootstrap_indices(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """A seeded ``(n_boot, n)`` matrix of resampling indices (with replacement)."""
    if n <= 0:
        raise ValueError("cannot bootstrap an empty sample (n = 0)")
    if n_boot <= 0:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(estimate: float, reps: np.ndarray, level: float, method: str) -> tuple[float, float]:
    if method not in METHODS:
        raise ValueError(f"unknown CI method {method!r}; valid: {', '.join(METHODS)}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    reps = np.asarray(reps, dtype=np.float64)
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return (math.nan, math.nan)
    alpha = (1 - level) / 2
    if method == "percentile":
        lo, hi = np.quantile(reps, [alpha, 1 - alpha])
    elif method == "basic":
        qlo, qhi = np.quantile(reps, [alpha, 1 - alpha])
        lo, hi = 2 * estimate - qhi, 2 * estimate - qlo
    elif method == "shifted":  # the replicates' spread, re-centred on the estimate (see the module docstring)
        qlo, med, qhi = np.quantile(reps, [alpha, 0.5, 1 - alpha])
        lo, hi = estimate - (med - qlo), estimate + (qhi - med)
    else:  # bias-corrected percentile
        share = (np.sum(reps < estimate) + 0.5 * np.sum(reps == estimate)) / reps.size
        share = min(max(share, 0.5 / reps.size), 1 - 0.5 / reps.size)  # keep z0 finite
        z0 = norm.ppf(share)
        za = norm.ppf([alpha, 1 - alpha])
        lo, hi = np.quantile(reps, norm.cdf(2 * z0 + za))
    return float(lo), float(hi)


def _p_value(reps: np.ndarray) -> float:
    """Two-sided bootstrap p-value for "the difference is 0" (share of replicates on the other side of 0)."""
    reps = np.asarray(reps, dtype=np.float64)
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return math.nan
    below = (np.sum(reps < 0) + 0.5 * np.sum(reps == 0)) / reps.size
    return float(min(1.0, 2 * min(below, 1 - below)))


def _as_1d(values, name: str = "values") -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty: nothing to average")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN; drop or fix those images first")
    return arr


def bootstrap_mean(values: Sequence[float] | np.ndarray, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                   method: str = "percentile") -> CI:
    """Mean of per-image ``values`` with a bootstrap CI (vectorised resampling)."""
    arr = _as_1d(values)
    est = float(arr.mean())
    if arr.size == 1:
        return CI(est, math.nan, math.nan, 1, 0, level, method)
    reps = arr[bootstrap_indices(arr.size, n_boot, seed)].mean(axis=1)
    lo, hi = _interval(est, reps, level, method)
    return CI(est, lo, hi, int(arr.size), n_boot, level, method)


def bootstrap_statistic(statistic: Callable[[np.ndarray], float], n: int, *, n_boot: int = 200, level: float = 0.95,
                        seed: int = 0, method: str = "shifted") -> CI:
    """CI for an arbitrary set statistic. ``statistic(idx)`` receives an index array into the n items.

    The point estimate is ``statistic(arange(n))``; the replicates use seeded resampled index arrays.
    """
    est = float(statistic(np.arange(n)))
    if n < 2:
        return CI(est, math.nan, math.nan, n, 0, level, method)
    idx = bootstrap_indices(n, n_boot, seed)
    reps = np.array([statistic(row) for row in idx], dtype=np.float64)
    lo, hi = _interval(est, reps, level, method)
    return CI(est, lo, hi, n, n_boot, level, method)


def paired_difference(a, b, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                      method: str = "percentile") -> CI:
    """mean(a − b) for per-image values of two recipes on the *same* prompts and seeds, with CI and p-value."""
    a, b = _as_1d(a, "a"), _as_1d(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired values must have the same length (same prompts and seeds); got {a.size} vs {b.size}")
    d = a - b
    est = float(d.mean())
    if d.size == 1:
        return CI(est, math.nan, math.nan, 1, 0, level, method, math.nan)
    reps = d[bootstrap_indices(d.size, n_boot, seed)].mean(axis=1)
    lo, hi = _interval(est, reps, level, method)
    return CI(est, lo, hi, int(d.size), n_boot, level, method, _p_value(reps))


def paired_statistic_difference(statistic_a: Callable[[np.ndarray], float],
                                statistic_b: Callable[[np.ndarray], float], n: int, *, n_boot: int = 200,
                                level: float = 0.95, seed: int = 0, method: str = "shifted") -> CI:
    """statistic_a − statistic_b (e.g. FID of W8A8 minus FID of FP), both evaluated on the same resampled indices.

    Item i must be the same prompt and seed for both recipes. The small-n bias of FID/KID mostly cancels in the
    difference; the ``"shifted"`` default centres the interval on the estimate for whatever bias is left. The
    p-value is the share of (re-centred) replicates on the other side of 0.
    """
    def diff(idx):
        return statistic_a(idx) - statistic_b(idx)

    est = float(diff(np.arange(n)))
    if n < 2:
        return CI(est, math.nan, math.nan, n, 0, level, method, math.nan)
    reps = np.array([diff(row) for row in bootstrap_indices(n, n_boot, seed)], dtype=np.float64)
    lo, hi = _interval(est, reps, level, method)
    centred = reps - np.median(reps[np.isfinite(reps)]) + est if method == "shifted" else reps
    return CI(est, lo, hi, n, n_boot, level, method, _p_value(centred))


def mean_ci_halfwidth(std: float, n: int, level: float = 0.95) -> float:
    """Normal-approximation half-width of a mean's CI — for choosing n before running anything."""
    return float(norm.ppf(0.5 + level / 2) * std / math.sqrt(max(n, 1)))
