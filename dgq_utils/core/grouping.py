"""DGQ's outlier-preserving grouping decisions, as pure functions on activation statistics.

DGQ quantizes an activation not with one range per tensor but with ``K`` ranges, one per *group* of indices
along one axis -- channels, or pixels (token positions). Three decisions make a grouping, each a function here:

1. **Which axis** (:func:`decide_axis`): compare the per-channel statistics with the per-pixel statistics.
2. **Which indices share a group** (:func:`assign_groups`): K-means on each index's ``(min, max)`` point (DGQ),
   or simple baselines (contiguous blocks, equal-count bins sorted by range).
3. **Each group's range and quantizer parameters** (:func:`group_ranges`, :func:`per_index_qparams`): the
   group's range is the smallest min and largest max of its members; every index then carries its group's
   scale / zero point, an ``(n,)`` vector the run-time quantizer broadcasts along the chosen axis
   (:func:`params_view` shapes it for a given tensor).

The statistics are :class:`AxisStats`: per-index ``mins`` / ``maxs`` along one axis, reduced over everything
else and aggregated over calibration batches by elementwise min / max (the official aggregation -- there is no
averaging). Everything is vectorised (``scatter_reduce``, broadcasting); only K-means runs in scikit-learn.

Faithful-vs-sound choices (default first)
-----------------------------------------
* :func:`decide_axis` ``rule="official_spread"`` (official): ``spread = (max(maxs) - min(maxs)) +
  (max(mins) - min(mins))`` per axis; channel-wise iff the channel spread is strictly larger (ties -> pixel).
  It measures how much the range *vectors* vary, not where outliers live. ``rule="outlier_ratio"`` compares
  ``max(range_i) / median(range_i)`` of the two axes instead (how far the widest index sticks out of the
  typical one), also with ties -> pixel. ``"channel"`` / ``"pixel"`` force the axis.
* :func:`assign_groups` ``method="kmeans"`` (official): ``KMeans(n_clusters=K, random_state=seed, n_init=1,
  init="k-means++")`` on unscaled float32 ``(min_i, max_i)`` points -- exactly what the pinned official
  scikit-learn (``n_init="auto"`` = 1 run for k-means++) does; we pass ``n_init=1`` explicitly so the result does
  not depend on the scikit-learn version. Labels are made canonical (sorted by cluster mean max, then mean min,
  then smallest member index), so group 0 holds the indices with the smallest maxima.
* :func:`group_ranges` ``include_zero=False`` (official): a group's range is its members' min / max, 0 not
  forced in. ``True`` widens each group range to contain 0 (sound: 0 stays representable). An **empty group**
  gets the range ``[0, 1]`` (official); no index refers to it, so it never affects a quantized value.

Fewer distinct points than ``K``: scikit-learn's K-means then finds fewer clusters. We silence its warning and
return the clusters it found, canonically numbered ``0 .. k_eff - 1``; ids ``k_eff .. K - 1`` are simply empty
groups (range ``[0, 1]``, never used by any index), so no NaN or division by zero can arise.

Conv inputs: the callers pass *true* channel / pixel statistics (e.g. ``AxisStats.from_tensor(x, 1)`` and
``AxisStats.from_tensor(x, (2, 3))`` for an ``(B, C, H, W)`` input). The official code's unfolded-conv quirk (its
"channel" groups are im2col rows, its "pixel" groups are output positions, and the axis rule is applied to the
last dim vs dim 1, i.e. swapped relative to Linear layers) lives in the integration layer
(``ActQuantConfig.conv_input_layout="unfold"``), not here.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from dgq_utils.core.kmeans import kmeans_ids, kmeans_many, prestart_workers
from dgq_utils.core.quantizers import check_bits, fake_quant_uniform, uniform_qparams
from dgq_utils.core.registry import Registry

__all__ = [
    "AxisStats",
    "AXIS_RULES",
    "AxisRule",
    "GROUPING_METHODS",
    "GroupingMethod",
    "axis_scores",
    "axis_scores_many",
    "decide_axis",
    "assign_groups",
    "assign_groups_many",
    "prestart_kmeans_workers",
    "group_ranges",
    "group_qparams",
    "per_index_qparams",
    "per_index_qparams_many",
    "GroupPlan",
    "plan_groups",
    "params_view",
    "fake_quant_along_axis",
    "quantization_error",
    "group_quant_error",
]



@dataclass(frozen=True)
class AxisRule:
    """How :func:`decide_axis` picks the axis: ``score(AxisStats) -> float`` compares the two axes (the larger
    score wins, ties -> pixel), or ``forces`` names the axis outright (``"channel"`` / ``"pixel"``).
    ``score_many(mins, maxs) -> list[float]`` (optional): the scores of many statistics of one length at once,
    ``mins`` / ``maxs`` stacked to ``(S, n)``, equal to ``score`` row by row (:func:`axis_scores_many`)."""

    score: Callable[["AxisStats"], float] | None = None
    forces: str | None = None
    score_many: Callable[[Tensor, Tensor], list] | None = None


@dataclass(frozen=True)
class GroupingMethod:
    """How :func:`assign_groups` forms ``k >= 2`` groups: ``assign(stats, k, seed) -> ids``; optionally
    ``assign_many(jobs, seed, n_jobs) -> [ids]`` for many ``(stats, k)`` at once (:func:`assign_groups_many`)."""

    assign: Callable
    assign_many: Callable | None = None


#: Rules accepted by :func:`decide_axis` (the comparative ones first, then the two that force an axis).
AXIS_RULES: Registry[AxisRule] = Registry("axis rule")
#: Methods accepted by :func:`assign_groups`.
GROUPING_METHODS: Registry[GroupingMethod] = Registry("grouping method")


def _normalize_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not axes:
        raise ValueError("axis must be an int or a non-empty tuple of ints.")
    out = []
    for a in axes:
        if not isinstance(a, int) or isinstance(a, bool) or not -ndim <= a < ndim:
            raise ValueError(f"axis {a!r} is out of range for a tensor with {ndim} dims.")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis {axis!r} names the same dimension twice.")
    return tuple(sorted(out))


# ----------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class AxisStats:
    """Per-index statistics along one axis of an activation.

    ``mins[i]`` / ``maxs[i]`` are the min / max of every element whose index along the axis is ``i`` (over the
    batch and the other axes), aggregated over calibration batches by elementwise min / max. ``count`` is the
    number of tensors merged in (informational). Compared by identity (``eq=False``), since the fields are
    tensors.
    """

    mins: Tensor
    maxs: Tensor
    count: int = 1

    def __post_init__(self):
        mins = torch.as_tensor(self.mins).detach().to(torch.float32)
        maxs = torch.as_tensor(self.maxs).detach().to(torch.float32)
        if mins.ndim != 1 or mins.shape != maxs.shape:
            raise ValueError(
                f"AxisStats needs 1-D mins and maxs of the same length; got shapes {tuple(mins.shape)} and "
                f"{tuple(maxs.shape)}."
            )
        if mins.numel() == 0:
            raise ValueError("AxisStats needs at least one index; got empty mins/maxs.")
        self.mins, self.maxs = mins, maxs.to(mins.device)

    @property
    def n(self) -> int:
        """Number of indices along the axis."""
        return int(self.mins.numel())

    @property
    def ranges(self) -> Tensor:
        """``maxs - mins`` per index."""
        return self.maxs - self.mins

    def merge(self, other: "AxisStats") -> "AxisStats":
        """Elementwise min of mins and max of maxs (the official aggregation over calibration batches)."""
        if not isinstance(other, AxisStats):
            raise ValueError(f"AxisStats.merge needs another AxisStats; got {type(other).__name__}.")
        if self.mins.shape != other.mins.shape:
            raise ValueError(
                f"cannot merge AxisStats of shape {tuple(self.mins.shape)} with shape {tuple(other.mins.shape)}: "
                "statistics must come from the same layer and axis (and the same resolution for pixel axes)."
            )
        om, oM = other.mins.to(self.mins.device), other.maxs.to(self.mins.device)
        return AxisStats(torch.minimum(self.mins, om), torch.maximum(self.maxs, oM), self.count + other.count)

    @classmethod
    def from_tensor(cls, x: Tensor, axis: int | Sequence[int]) -> "AxisStats":
        """Statistics of ``x`` along ``axis``, reducing every other dimension.

        ``axis`` may be a tuple of dims, which are flattened in row-major order of the sorted dims -- e.g.
        ``(2, 3)`` gives one index per pixel ``h * W + w`` of a ``(B, C, H, W)`` conv input.
        """
        if x.ndim == 0:
            raise ValueError("AxisStats.from_tensor needs a tensor with at least one dimension.")
        axes = _normalize_axes(axis, x.ndim)
        others = tuple(d for d in range(x.ndim) if d not in axes)
        if x.numel() == 0:
            raise ValueError(f"AxisStats.from_tensor got an empty tensor (shape {tuple(x.shape)}).")
        xd = x.detach()
        if not others:
            return cls(xd.reshape(-1), xd.reshape(-1), 1)
        # reduce in place of a permute+copy; the kept dims stay in ascending order, so flattening them is row-major
        mins = torch.amin(xd, dim=others).reshape(-1)
        maxs = torch.amax(xd, dim=others).reshape(-1)
        return cls(mins, maxs, 1)

    def to(self, device) -> "AxisStats":
        return AxisStats(self.mins.to(device), self.maxs.to(device), self.count)

    def to_dict(self) -> dict:
        return {"mins": self.mins.tolist(), "maxs": self.maxs.tolist(), "count": self.count}

    @classmethod
    def from_dict(cls, d: dict) -> "AxisStats":
        return cls(torch.tensor(d["mins"]), torch.tensor(d["maxs"]), int(d.get("count", 1)))


# ----------------------------------------------------------------------------------------------------------
# channel vs pixel
# ----------------------------------------------------------------------------------------------------------
def _spread(s: AxisStats) -> float:
    return float((s.maxs.max() - s.maxs.min()) + (s.mins.max() - s.mins.min()))


def _outlier_ratio(s: AxisStats) -> float:
    r = s.ranges.double()
    med = float(r.median())
    top = float(r.max())
    if top <= 0:
        return 1.0  # constant activation: no outliers at all
    return top / max(med, top * 1e-12)


def _spread_many(mins: Tensor, maxs: Tensor) -> list[float]:
    # the float32 arithmetic of _spread, one row per statistics (max / min are exact, the rest elementwise)
    return ((maxs.amax(dim=1) - maxs.amin(dim=1)) + (mins.amax(dim=1) - mins.amin(dim=1))).tolist()


def _outlier_ratio_many(mins: Tensor, maxs: Tensor) -> list[float]:
    r = (maxs - mins).double()
    meds = r.median(dim=1).values.tolist()  # the lower median, as the 1-D median of _outlier_ratio
    tops = r.amax(dim=1).tolist()
    return [1.0 if top <= 0 else top / max(med, top * 1e-12) for med, top in zip(meds, tops)]


AXIS_RULES.register("official_spread", AxisRule(score=_spread, score_many=_spread_many))
AXIS_RULES.register("outlier_ratio", AxisRule(score=_outlier_ratio, score_many=_outlier_ratio_many))
AXIS_RULES.register("channel", AxisRule(forces="channel"))
AXIS_RULES.register("pixel", AxisRule(forces="pixel"))


def axis_scores(channel: AxisStats, pixel: AxisStats, rule: str = "official_spread") -> tuple[float, float]:
    """``(channel_score, pixel_score)`` under a comparative ``rule``; the larger one wins (ties -> pixel)."""
    entry = AXIS_RULES.get(rule)
    if entry is None or entry.score is None:
        comparative = AXIS_RULES.names(lambda r: r.score is not None)
        raise ValueError(
            f"unknown axis rule {rule!r}; axis_scores takes {' or '.join(map(repr, comparative))}"
            + (f" ({rule!r} forces an axis and has no score)." if entry is not None else ".")
        )
    return entry.score(channel), entry.score(pixel)


def _stacked(stats: Sequence[AxisStats]) -> tuple[Tensor, Tensor]:
    return torch.stack([s.mins for s in stats]), torch.stack([s.maxs for s in stats])


def axis_scores_many(channel: Sequence[AxisStats], pixel: Sequence[AxisStats],
                     rule: str = "official_spread") -> tuple[list[float], list[float]]:
    """:func:`axis_scores` of many ``(channel[j], pixel[j])`` pairs, in two lists; the statistics of each list
    share one length (e.g. one layer's timestep sets). The same numbers as one pair at a time."""
    entry = AXIS_RULES.get(rule)
    channel, pixel = list(channel), list(pixel)
    if len(channel) != len(pixel):
        raise ValueError(f"axis_scores_many needs as many channel as pixel statistics; got {len(channel)} "
                         f"and {len(pixel)}.")
    if entry is None or entry.score is None or entry.score_many is None or not channel:
        pairs = [axis_scores(c, p, rule) for c, p in zip(channel, pixel)]
        return [c for c, _ in pairs], [p for _, p in pairs]
    out = []
    for stats in (channel, pixel):
        if len({s.n for s in stats}) != 1:
            raise ValueError("axis_scores_many needs statistics of one length per axis (one layer's sets); got "
                             f"lengths {sorted({s.n for s in stats})}.")
        out.append(list(entry.score_many(*_stacked(stats))))
    return out[0], out[1]


def decide_axis(channel: AxisStats, pixel: AxisStats, rule: str = "official_spread") -> str:
    """``"channel"`` or ``"pixel"``: the axis along which to form groups.

    ``rule``: ``"official_spread"`` (official), ``"outlier_ratio"``, or ``"channel"`` / ``"pixel"`` to force.
    For the comparative rules the channel axis wins only with a strictly larger score (ties -> pixel, as in the
    official code).
    """
    entry = AXIS_RULES.lookup(rule)
    if entry.forces is not None:
        return entry.forces
    c, p = entry.score(channel), entry.score(pixel)
    return "channel" if c > p else "pixel"


# ----------------------------------------------------------------------------------------------------------
# group assignment
# ----------------------------------------------------------------------------------------------------------
def _check_num_groups(num_groups: int, n: int) -> int:
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)):
        raise ValueError(f"num_groups must be an integer >= 1; got {num_groups!r}.")
    k = int(num_groups)
    if k < 1:
        raise ValueError(f"num_groups must be >= 1; got {k}. Use 1 for a single (per-tensor) range.")
    if k > n:
        raise ValueError(
            f"num_groups={k} is larger than the n={n} indices along this axis; use at most n groups "
            "(or per-tensor quantization)."
        )
    return k


def _block_sizes(n: int, k: int) -> Tensor:
    """Sizes of k near-equal contiguous blocks of n (the first n % k blocks are one larger, like array_split)."""
    return torch.full((k,), n // k, dtype=torch.long) + (torch.arange(k) < n % k).long()


def assign_groups(stats: AxisStats, num_groups: int, method: str = "kmeans", seed: int = 0) -> Tensor:
    """Group id (``LongTensor (n,)``, values in ``[0, num_groups)``) for every index of ``stats``.

    * ``"kmeans"`` (DGQ): K-means on the unscaled ``(min_i, max_i)`` points, ``random_state=seed``, one
      k-means++ run; canonical labels (group 0 = smallest maxima). With fewer distinct points than K, fewer
      groups are used (the top ids stay empty).
    * ``"contiguous"``: K near-equal blocks of consecutive indices (first ``n % K`` blocks one larger).
    * ``"sorted"``: indices sorted by range ``max_i - min_i`` (stable), cut into K near-equal bins; group 0 =
      narrowest ranges. A cheap deterministic stand-in for K-means.
    """
    if not isinstance(stats, AxisStats):
        raise ValueError(f"assign_groups needs AxisStats; got {type(stats).__name__}.")
    impl = GROUPING_METHODS.lookup(method)
    n = stats.n
    k = _check_num_groups(num_groups, n)
    if k == 1:
        return torch.zeros(n, dtype=torch.long, device=stats.mins.device)
    return impl.assign(stats, k, seed)


def _contiguous_groups(stats: AxisStats, k: int, seed: int) -> Tensor:
    return torch.repeat_interleave(torch.arange(k), _block_sizes(stats.n, k)).to(stats.mins.device)


def _sorted_groups(stats: AxisStats, k: int, seed: int) -> Tensor:
    order = torch.argsort(stats.ranges.cpu(), stable=True)
    ids = torch.empty(stats.n, dtype=torch.long)
    ids[order] = torch.repeat_interleave(torch.arange(k), _block_sizes(stats.n, k))
    return ids.to(stats.mins.device)


def _kmeans_groups(stats: AxisStats, k: int, seed: int) -> Tensor:
    return torch.from_numpy(kmeans_ids(_kmeans_points(stats), k, int(seed))).long().to(stats.mins.device)


def _kmeans_points(stats: AxisStats) -> np.ndarray:
    points = torch.stack([stats.mins, stats.maxs], dim=1).cpu().numpy().astype(np.float32)
    if not np.isfinite(points).all():
        raise ValueError("assign_groups got non-finite statistics (NaN/inf in mins or maxs); check the observer.")
    return points


#: Below this many K-means fits :func:`assign_groups_many` stays in-process (a worker pool costs ~1 s to start).
PARALLEL_MIN_FITS = 64


def kmeans_workers(n_jobs: int | None = None) -> int:
    """Worker processes for :func:`assign_groups_many`: ``n_jobs`` if given, else the ``DGQ_KMEANS_JOBS``
    environment variable, else the CPUs this process may use."""
    if n_jobs is None:
        env = os.environ.get("DGQ_KMEANS_JOBS", "").strip()
        if env:
            try:
                n_jobs = int(env)
            except ValueError:
                raise ValueError(f"DGQ_KMEANS_JOBS must be a positive integer; got {env!r}.") from None
        else:
            n_jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if isinstance(n_jobs, bool) or int(n_jobs) < 1:
        raise ValueError(f"n_jobs must be >= 1; got {n_jobs!r}.")
    return int(n_jobs)


def prestart_kmeans_workers(expected_fits: int, method: str = "kmeans", n_jobs: int | None = None) -> bool:
    """Start (or keep alive) the worker processes a later :func:`assign_groups_many` of about ``expected_fits``
    K-means fits will use, without waiting (calibration calls it while the GPU runs its passes, so the fits do
    not wait for the workers to start and import scikit-learn). Returns whether workers were started."""
    if method != "kmeans" or expected_fits < PARALLEL_MIN_FITS:
        return False
    workers = min(kmeans_workers(n_jobs), max(1, int(expected_fits) // 16))
    if workers <= 1:
        return False
    prestart_workers(workers)
    return True


def assign_groups_many(jobs: Sequence[tuple[AxisStats, int]], method: str = "kmeans", seed: int = 0,
                       n_jobs: int | None = None) -> list[Tensor]:
    """:func:`assign_groups` for many ``(stats, num_groups)`` pairs; returns the same ids, in order.

    Calibrating DGQ runs one K-means per (layer, timestep) -- about 4000 small fits for a 25-step schedule,
    each a few milliseconds of mostly Python overhead in scikit-learn, so threads do not help. With
    ``method="kmeans"`` and at least :data:`PARALLEL_MIN_FITS` new fits, they run in ``n_jobs`` worker processes
    (loky, the process pool joblib and scikit-learn use; default :func:`kmeans_workers`; they end with this
    process, see :mod:`dgq_utils.core.kmeans`); fits whose exact input was seen before in this process are
    answered from a memo (DGQ's W8A8 / W8A6 / W4A8 recipes, and ablations that change only the attention,
    observe the same FP statistics and so share their groups). Each
    fit is seeded on its own, so the result depends neither on the number of workers nor on the memo.
    """
    jobs = list(jobs)
    if not jobs:
        return []
    impl = GROUPING_METHODS.lookup(method)
    if impl.assign_many is None:
        return [assign_groups(s, k, method=method, seed=seed) for s, k in jobs]
    return impl.assign_many(jobs, seed, n_jobs)


def _kmeans_groups_many(jobs: list, seed: int, n_jobs: int | None) -> list[Tensor]:
    for s, _ in jobs:
        if not isinstance(s, AxisStats):
            raise ValueError(f"assign_groups_many needs AxisStats; got {type(s).__name__}.")
    ks = [_check_num_groups(k, s.n) for s, k in jobs]
    todo = [(i, _kmeans_points(s), k) for i, ((s, _), k) in enumerate(zip(jobs, ks)) if k > 1]
    labels = kmeans_many([(points, k, int(seed)) for _, points, k in todo], n_jobs=kmeans_workers(n_jobs),
                         min_parallel=PARALLEL_MIN_FITS)
    out: list[Tensor] = [torch.zeros(s.n, dtype=torch.long, device=s.mins.device) for s, _ in jobs]
    for (i, _, _), ids in zip(todo, labels):
        out[i] = torch.from_numpy(ids).long().to(jobs[i][0].mins.device)
    return out


GROUPING_METHODS.register("kmeans", GroupingMethod(assign=_kmeans_groups, assign_many=_kmeans_groups_many))
GROUPING_METHODS.register("contiguous", GroupingMethod(assign=_contiguous_groups))
GROUPING_METHODS.register("sorted", GroupingMethod(assign=_sorted_groups))


# ----------------------------------------------------------------------------------------------------------
# group ranges and quantizer parameters
# ----------------------------------------------------------------------------------------------------------
def _check_ids(stats: AxisStats, group_ids: Tensor, num_groups: int) -> Tensor:
    ids = torch.as_tensor(group_ids)
    if ids.shape != (stats.n,):
        raise ValueError(f"group_ids must have shape ({stats.n},) to match the statistics; got {tuple(ids.shape)}.")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor; got dtype {ids.dtype}.")
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise ValueError(f"num_groups must be an integer >= 1; got {num_groups!r}.")
    ids = ids.long().to(stats.mins.device)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_groups):
        raise ValueError(
            f"group_ids must lie in [0, {num_groups}); got values in [{int(ids.min())}, {int(ids.max())}]."
        )
    return ids


def group_ranges(
    stats: AxisStats, group_ids: Tensor, num_groups: int, *, include_zero: bool = False
) -> tuple[Tensor, Tensor]:
    """``(lo, hi)``, each ``(K,)``: min of the members' mins and max of the members' maxs per group.

    Empty groups get ``[0, 1]`` (official). ``include_zero=True`` widens every range to contain 0.
    """
    ids = _check_ids(stats, group_ids, num_groups)
    k = int(num_groups)
    dev = stats.mins.device
    lo = torch.full((k,), math.inf, dtype=torch.float32, device=dev).scatter_reduce(
        0, ids, stats.mins, reduce="amin", include_self=True
    )
    hi = torch.full((k,), -math.inf, dtype=torch.float32, device=dev).scatter_reduce(
        0, ids, stats.maxs, reduce="amax", include_self=True
    )
    empty = torch.bincount(ids, minlength=k) == 0
    lo = lo.masked_fill(empty, 0.0)
    hi = hi.masked_fill(empty, 1.0)
    if include_zero:
        lo, hi = lo.clamp_max(0.0), hi.clamp_min(0.0)
    return lo, hi


def group_qparams(
    stats: AxisStats,
    group_ids: Tensor,
    num_groups: int,
    bits: int,
    *,
    include_zero: bool = False,
    symmetric: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(scale, zero_point)`` per group, each ``(K,)`` (see :func:`per_index_qparams`)."""
    lo, hi = group_ranges(stats, group_ids, num_groups, include_zero=include_zero)
    return uniform_qparams(lo, hi, check_bits(bits), symmetric=symmetric, include_zero=include_zero)


def per_index_qparams(
    stats: AxisStats,
    group_ids: Tensor,
    num_groups: int,
    bits: int,
    *,
    include_zero: bool = False,
    symmetric: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(scale, zero_point)``, each ``(n,)``: every index gets its group's parameters.

    This is what the run-time quantizer broadcasts along the grouped axis (see :func:`params_view`).
    """
    scale, zp = group_qparams(stats, group_ids, num_groups, bits, include_zero=include_zero, symmetric=symmetric)
    ids = _check_ids(stats, group_ids, num_groups)
    return scale[ids], zp[ids]


def per_index_qparams_many(
    mins: Tensor,
    maxs: Tensor,
    group_ids: Tensor,
    num_groups: int,
    bits: int,
    *,
    include_zero: bool = False,
    symmetric: bool = False,
) -> tuple[Tensor, Tensor]:
    """:func:`per_index_qparams` of ``S`` statistics of one length at once: ``mins`` / ``maxs`` / ``group_ids``
    stacked to ``(S, n)`` (row ``j`` one :class:`AxisStats` and its ids); returns ``(scale, zero_point)``, each
    ``(S, n)``, equal row by row to :func:`per_index_qparams` (the same float32 operations, batched)."""
    mins = torch.as_tensor(mins).to(torch.float32)
    maxs = torch.as_tensor(maxs).to(device=mins.device, dtype=torch.float32)
    if mins.ndim != 2 or mins.shape != maxs.shape or mins.shape[1] == 0:
        raise ValueError(f"per_index_qparams_many needs (S, n) mins and maxs of one shape; got "
                         f"{tuple(mins.shape)} and {tuple(maxs.shape)}.")
    ids = torch.as_tensor(group_ids)
    if ids.shape != mins.shape:
        raise ValueError(f"group_ids must have shape {tuple(mins.shape)} to match the statistics; got "
                         f"{tuple(ids.shape)}.")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor; got dtype {ids.dtype}.")
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise ValueError(f"num_groups must be an integer >= 1; got {num_groups!r}.")
    k = int(num_groups)
    ids = ids.long().to(mins.device)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k):
        raise ValueError(f"group_ids must lie in [0, {k}); got values in [{int(ids.min())}, {int(ids.max())}].")
    rows = mins.shape[0]
    lo = torch.full((rows, k), math.inf, dtype=torch.float32, device=mins.device).scatter_reduce(
        1, ids, mins, reduce="amin", include_self=True)
    hi = torch.full((rows, k), -math.inf, dtype=torch.float32, device=mins.device).scatter_reduce(
        1, ids, maxs, reduce="amax", include_self=True)
    empty = torch.zeros((rows, k), dtype=torch.long, device=mins.device).scatter_add_(
        1, ids, torch.ones_like(ids)) == 0
    lo = lo.masked_fill(empty, 0.0)
    hi = hi.masked_fill(empty, 1.0)
    if include_zero:
        lo, hi = lo.clamp_max(0.0), hi.clamp_min(0.0)
    scale, zp = uniform_qparams(lo, hi, check_bits(bits), symmetric=symmetric, include_zero=include_zero)
    return scale.gather(1, ids), zp.gather(1, ids)


@dataclass(eq=False)
class GroupPlan:
    """The outcome of the three grouping decisions for one activation (one layer, one timestep)."""

    axis: str  # "channel" | "pixel"
    num_groups: int  # K actually used (after clamping to n, see plan_groups)
    group_ids: Tensor  # (n,) long
    lo: Tensor  # (K,) group ranges
    hi: Tensor
    scale: Tensor  # (n,) per-index parameters along `axis`
    zero_point: Tensor
    scores: tuple[float, float] | None = None  # (channel, pixel) scores of the axis rule, when one was applied

    def to_dict(self) -> dict:
        return {
            "axis": self.axis,
            "num_groups": self.num_groups,
            "group_ids": self.group_ids.tolist(),
            "lo": self.lo.tolist(),
            "hi": self.hi.tolist(),
            "scale": self.scale.tolist(),
            "zero_point": self.zero_point.tolist(),
            "scores": list(self.scores) if self.scores is not None else None,
        }


def plan_groups(
    channel: AxisStats | None,
    pixel: AxisStats | None,
    num_groups: int,
    bits: int,
    *,
    axis: str = "auto",
    rule: str = "official_spread",
    method: str = "kmeans",
    include_zero: bool = False,
    symmetric: bool = False,
    seed: int = 0,
    clamp_groups: bool = True,
) -> GroupPlan:
    """Decide the axis, form the groups and compute per-index parameters in one call.

    ``axis``: ``"auto"`` (use ``rule``), ``"channel"`` or ``"pixel"``. Either statistics may be ``None`` when the
    activation has only one axis (e.g. the 2-D time-embedding inputs); ``"auto"`` then takes the other one.
    ``clamp_groups=True`` uses ``min(num_groups, n)`` groups when the chosen axis has fewer than ``num_groups``
    indices (the official code would fail there); ``False`` raises instead.
    """
    if axis not in ("auto", "channel", "pixel"):
        raise ValueError(f"axis must be 'auto', 'channel' or 'pixel'; got {axis!r}.")
    if channel is None and pixel is None:
        raise ValueError("plan_groups needs channel or pixel statistics (got neither).")
    scores = None
    if axis == "auto":
        if channel is None or pixel is None:
            axis = "channel" if pixel is None else "pixel"
        else:
            if rule not in ("channel", "pixel"):
                scores = axis_scores(channel, pixel, rule)
            axis = decide_axis(channel, pixel, rule)
    stats = channel if axis == "channel" else pixel
    if stats is None:
        raise ValueError(f"axis={axis!r} was requested but no {axis} statistics were given.")
    k = int(num_groups)
    if clamp_groups and k > stats.n:
        k = stats.n
    ids = assign_groups(stats, k, method=method, seed=seed)
    lo, hi = group_ranges(stats, ids, k, include_zero=include_zero)
    s_g, z_g = uniform_qparams(lo, hi, check_bits(bits), symmetric=symmetric, include_zero=include_zero)
    return GroupPlan(axis, k, ids, lo, hi, s_g[ids], z_g[ids], scores)


# ----------------------------------------------------------------------------------------------------------
# applying per-index parameters (helpers for the integration layer and notebook 02)
# ----------------------------------------------------------------------------------------------------------
def params_view(p: Tensor, x_shape: Sequence[int] | Tensor, axis: int | Sequence[int]) -> Tensor:
    """Reshape a per-index vector ``p`` of length ``n`` so it broadcasts onto a tensor of shape ``x_shape``
    along ``axis`` (an int, or a tuple of dims flattened row-major as in :meth:`AxisStats.from_tensor`).

    E.g. ``(C,)`` onto ``(B, C, H, W)`` with ``axis=1`` -> ``(1, C, 1, 1)``; ``(H*W,)`` with ``axis=(2, 3)`` ->
    ``(1, 1, H, W)``; ``(N,)`` onto ``(B, N, C)`` with ``axis=1`` -> ``(1, N, 1)``.
    """
    shape = tuple(x_shape.shape) if isinstance(x_shape, Tensor) else tuple(int(s) for s in x_shape)
    axes = _normalize_axes(axis, len(shape))
    n = math.prod(shape[a] for a in axes)
    if p.numel() != n:
        raise ValueError(
            f"per-index parameters have {p.numel()} entries but axis {axis} of a tensor of shape {shape} has {n} "
            "indices; parameters are tied to the calibration shape (e.g. the latent resolution for pixel groups)."
        )
    view = [1] * len(shape)
    for a in axes:
        view[a] = shape[a]
    return p.reshape(view)


def fake_quant_along_axis(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    bits: int,
    axis: int | Sequence[int],
    *,
    symmetric: bool = False,
) -> Tensor:
    """Fake-quantize ``x`` with per-index ``(n,)`` parameters laid along ``axis``."""
    return fake_quant_uniform(
        x, params_view(scale, x.shape, axis), params_view(zero_point, x.shape, axis), bits, symmetric=symmetric
    )


def quantization_error(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    bits: int,
    *,
    axis: int | Sequence[int] | None = None,
    symmetric: bool = False,
    metric: str = "mse",
) -> Tensor:
    """Error of fake-quantizing ``x``: ``metric`` ``"mse"`` (scalar), ``"max"`` (scalar max abs error) or
    ``"per_index"`` (MSE per index along ``axis``, shape ``(n,)``).

    ``axis=None``: ``scale``/``zero_point`` are used as given (scalars or already broadcastable); otherwise they
    are per-index ``(n,)`` vectors laid along ``axis``.
    """
    if axis is None:
        if metric == "per_index":
            raise ValueError("metric='per_index' needs an axis.")
        xq = fake_quant_uniform(x, scale, zero_point, bits, symmetric=symmetric)
    else:
        xq = fake_quant_along_axis(x, scale, zero_point, bits, axis, symmetric=symmetric)
    err = xq.detach().double() - x.detach().double()
    if metric == "mse":
        return err.pow(2).mean()
    if metric == "max":
        return err.abs().max()
    if metric == "per_index":
        axes = _normalize_axes(axis, x.ndim)  # type: ignore[arg-type]
        others = [d for d in range(x.ndim) if d not in axes]
        n = math.prod(x.shape[a] for a in axes)
        return err.pow(2).permute(*others, *axes).reshape(-1, n).mean(dim=0)
    raise ValueError(f"unknown metric {metric!r}; use 'mse', 'max' or 'per_index'.")


def group_quant_error(
    x: Tensor,
    axis: int | Sequence[int],
    num_groups: int,
    bits: int,
    *,
    method: str = "kmeans",
    include_zero: bool = False,
    symmetric: bool = False,
    seed: int = 0,
    metric: str = "mse",
) -> Tensor:
    """End to end on one tensor: statistics of ``x`` along ``axis`` -> groups -> parameters -> error of ``x``.

    Handy for notebook 02 (error vs K, channel vs pixel, K-means vs contiguous). Calibrates on ``x`` itself.
    """
    stats = AxisStats.from_tensor(x, axis)
    ids = assign_groups(stats, num_groups, method=method, seed=seed)
    scale, zp = per_index_qparams(stats, ids, num_groups, bits, include_zero=include_zero, symmetric=symmetric)
    return quantization_error(x, scale, zp, bits, axis=axis, symmetric=symmetric, metric=metric)
