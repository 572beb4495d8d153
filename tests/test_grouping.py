"""Tests for dgq_utils.core.grouping: statistics, channel/pixel decision, group assignment, group parameters."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgq_utils.core.grouping import (
    AXIS_RULES,
    AxisStats,
    assign_groups,
    assign_groups_many,
    axis_scores,
    kmeans_workers,
    decide_axis,
    fake_quant_along_axis,
    group_qparams,
    group_quant_error,
    group_ranges,
    params_view,
    per_index_qparams,
    plan_groups,
    quantization_error,
)
from dgq_utils.core import kmeans as kmeans_memo
from dgq_utils.core.quantizers import fake_quant_uniform, uniform_qparams

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def channel_outlier_tokens(seed=0, n=128, c=32, outlier=5, factor=50.0):
    """(B, N, C) activations with one channel x ``factor`` whose range is the same at every position."""
    x = torch.randn(2, n, c, generator=_gen(seed))
    x[0, :, outlier] = factor
    x[1, :, outlier] = -factor
    return x


# ----------------------------------------------------------------------------------------------------------
# AxisStats
# ----------------------------------------------------------------------------------------------------------
def test_from_tensor_matches_naive_reduction():
    x = torch.randn(3, 5, 4, 6, generator=_gen(1))
    s = AxisStats.from_tensor(x, 1)
    assert s.n == 5 and s.mins.dtype == torch.float32
    for i in range(5):
        assert s.mins[i] == x[:, i].min() and s.maxs[i] == x[:, i].max()
    # a tuple of dims is flattened row-major: pixel index = h * W + w
    p = AxisStats.from_tensor(x, (2, 3))
    assert p.n == 24
    for h in range(4):
        for w in range(6):
            assert p.maxs[h * 6 + w] == x[:, :, h, w].max()
            assert p.mins[h * 6 + w] == x[:, :, h, w].min()
    # negative axes and unsorted tuples are normalised
    assert torch.equal(AxisStats.from_tensor(x, (-1, -2)).maxs, p.maxs)
    assert torch.equal(AxisStats.from_tensor(x.half(), -1).maxs, AxisStats.from_tensor(x.half().float(), 3).maxs)


def test_merge_is_elementwise_min_max_and_equals_concatenation():
    a = torch.randn(4, 7, 3, generator=_gen(2))
    b = torch.randn(2, 7, 3, generator=_gen(3)) * 3
    merged = AxisStats.from_tensor(a, 1).merge(AxisStats.from_tensor(b, 1))
    whole = AxisStats.from_tensor(torch.cat([a, b]), 1)
    assert torch.equal(merged.mins, whole.mins) and torch.equal(merged.maxs, whole.maxs)
    assert merged.count == 2


def test_merge_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(7,\).*\(5,\)"):
        AxisStats(torch.zeros(7), torch.ones(7)).merge(AxisStats(torch.zeros(5), torch.ones(5)))


def test_axisstats_validation_and_dict_round_trip():
    with pytest.raises(ValueError, match="same length"):
        AxisStats(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="1-D"):
        AxisStats(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="out of range"):
        AxisStats.from_tensor(torch.zeros(2, 3), 2)
    s = AxisStats(torch.tensor([-1.0, 0.5]), torch.tensor([2.0, 3.0]), count=4)
    t = AxisStats.from_dict(s.to_dict())
    assert torch.equal(t.mins, s.mins) and torch.equal(t.maxs, s.maxs) and t.count == 4


# ----------------------------------------------------------------------------------------------------------
# decide_axis
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["official_spread", "outlier_ratio"])
def test_decide_axis_channel_outliers(rule):
    x = channel_outlier_tokens()
    ch, px = AxisStats.from_tensor(x, 2), AxisStats.from_tensor(x, 1)
    assert decide_axis(ch, px, rule) == "channel"


@pytest.mark.parametrize("rule", ["official_spread", "outlier_ratio"])
def test_decide_axis_pixel_outliers(rule):
    x = channel_outlier_tokens().transpose(1, 2)  # now dim 1 holds the outlier *position*
    ch, px = AxisStats.from_tensor(x, 2), AxisStats.from_tensor(x, 1)
    assert decide_axis(ch, px, rule) == "pixel"


@pytest.mark.parametrize("rule", ["official_spread", "outlier_ratio"])
def test_decide_axis_tie_goes_to_pixel(rule):
    s = AxisStats(torch.tensor([-1.0, -2.0, 0.0]), torch.tensor([1.0, 5.0, 2.0]))
    c, p = axis_scores(s, s, rule)
    assert c == p
    assert decide_axis(s, s, rule) == "pixel"


def test_official_spread_formula():
    ch = AxisStats(torch.tensor([-1.0, -3.0]), torch.tensor([2.0, 10.0]))  # (10-2) + (-1+3) = 10
    px = AxisStats(torch.tensor([-2.0, -2.0, -9.0]), torch.tensor([3.0, 3.0, 3.0]))  # 0 + 7 = 7
    assert axis_scores(ch, px) == (10.0, 7.0)
    assert decide_axis(ch, px) == "channel"
    assert decide_axis(px, ch) == "pixel"


def test_decide_axis_forcing_and_unknown_rule():
    a = AxisStats(torch.zeros(3), torch.ones(3))
    b = AxisStats(torch.zeros(3), torch.tensor([1.0, 9.0, 1.0]))
    assert decide_axis(a, b, "channel") == "channel"
    assert decide_axis(b, a, "pixel") == "pixel"
    with pytest.raises(ValueError) as ei:
        decide_axis(a, b, "spread")
    for r in AXIS_RULES:
        assert r in str(ei.value)


def test_outlier_ratio_constant_activation():
    s = AxisStats(torch.ones(4), torch.ones(4))
    assert axis_scores(s, s, "outlier_ratio") == (1.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# assign_groups
# ----------------------------------------------------------------------------------------------------------
def _clustered_stats(seed=0, per=10):
    """Four well-separated clusters of (min, max) points, interleaved in index order."""
    g = _gen(seed)
    centers = torch.tensor([[-1.0, 1.0], [-8.0, 20.0], [-3.0, 3.0], [-40.0, 60.0]])
    pts = centers.repeat_interleave(per, 0) + 0.05 * torch.randn(4 * per, 2, generator=g)
    perm = torch.randperm(4 * per, generator=g)
    pts = pts[perm]
    true = torch.arange(4).repeat_interleave(per)[perm]
    return AxisStats(pts[:, 0], pts[:, 1]), true


def test_kmeans_is_deterministic_and_canonical():
    stats, true = _clustered_stats()
    ids = [assign_groups(stats, 4, "kmeans", seed=s) for s in range(4)]
    assert all(i.dtype == torch.long and i.shape == (stats.n,) for i in ids)
    assert torch.equal(ids[0], assign_groups(stats, 4, "kmeans", seed=0))  # same seed -> same ids
    for i in ids[1:]:  # well-separated data: any seed finds the same partition, and labels are canonical
        assert torch.equal(i, ids[0])
    # canonical order: group g's mean max increases with g; here that maps true cluster (0,2,1,3) -> (0,1,2,3)
    expected = torch.tensor([0, 2, 1, 3])[true]
    assert torch.equal(ids[0], expected)


def test_assign_groups_many_matches_one_by_one_in_parallel_and_serially():
    """The batched K-means (worker processes) gives exactly the ids of assign_groups, in order, for any n_jobs."""
    g = _gen(3)
    jobs = []
    for j in range(70):  # >= PARALLEL_MIN_FITS, so n_jobs=2 really uses the worker pool
        n = 8 + j % 13
        mins = -torch.rand(n, generator=g) * (1 + j)
        jobs.append((AxisStats(mins, mins.abs() + torch.rand(n, generator=g) * 5), 1 + j % 6))
    jobs.append((AxisStats(torch.zeros(5), torch.ones(5)), 3))  # fewer distinct points than K
    expected = [assign_groups(s, k, "kmeans", seed=2) for s, k in jobs]
    for n_jobs, fresh in ((1, True), (2, True), (2, False)):  # the last pass is answered by the memo
        if fresh:
            kmeans_memo.clear_memo()
        got = assign_groups_many(jobs, "kmeans", seed=2, n_jobs=n_jobs)
        assert len(got) == len(jobs)
        for a, b in zip(got, expected):
            assert a.dtype == torch.long and torch.equal(a, b)
    s, _ = _clustered_stats()
    assert torch.equal(assign_groups_many([(s, 4)], "sorted")[0], assign_groups(s, 4, "sorted"))
    assert assign_groups_many([], "kmeans") == []
    with pytest.raises(ValueError, match="larger than"):
        assign_groups_many([(s, s.n + 1)], "kmeans")


def test_kmeans_memo_returns_copies_and_keys_on_points_k_and_seed():
    import numpy as np

    kmeans_memo.clear_memo()
    pts = np.random.default_rng(0).normal(size=(30, 2)).astype(np.float32)
    first = kmeans_memo.kmeans_many([(pts, 4, 0), (pts, 4, 0), (pts, 3, 0), (pts, 4, 1)])
    assert len(kmeans_memo._memo) == 3  # duplicates inside one call are fitted once
    assert np.array_equal(first[0], first[1]) and first[0] is not first[1]
    first[0][:] = -1  # callers may modify what they get: the memo keeps its own copy
    again = kmeans_memo.kmeans_many([(pts, 4, 0)])[0]
    assert np.array_equal(again, kmeans_memo.kmeans_ids(pts, 4, 0))
    moved = pts.copy()
    moved[0, 0] += 1e-3  # any change of the input is a new fit
    kmeans_memo.kmeans_many([(moved, 4, 0)])
    assert len(kmeans_memo._memo) == 4


def test_kmeans_workers_reads_the_environment(monkeypatch):
    monkeypatch.setenv("DGQ_KMEANS_JOBS", "3")
    assert kmeans_workers() == 3
    assert kmeans_workers(5) == 5
    monkeypatch.setenv("DGQ_KMEANS_JOBS", "many")
    with pytest.raises(ValueError, match="DGQ_KMEANS_JOBS"):
        kmeans_workers()
    monkeypatch.delenv("DGQ_KMEANS_JOBS")
    assert kmeans_workers() >= 1
    with pytest.raises(ValueError, match=">= 1"):
        kmeans_workers(0)


def test_kmeans_labels_follow_points_not_index_order():
    stats, _ = _clustered_stats(seed=5)
    ids = assign_groups(stats, 4)
    perm = torch.randperm(stats.n, generator=_gen(9))
    ids_p = assign_groups(AxisStats(stats.mins[perm], stats.maxs[perm]), 4)
    assert torch.equal(ids_p, ids[perm])


def test_contiguous_exact_layout():
    s = AxisStats(torch.zeros(10), torch.ones(10))
    assert assign_groups(s, 4, "contiguous").tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert assign_groups(s, 5, "contiguous").tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert assign_groups(s, 10, "contiguous").tolist() == list(range(10))
    assert assign_groups(s, 1, "contiguous").tolist() == [0] * 10


def test_sorted_grouping_bins_by_range():
    ranges = torch.tensor([5.0, 1.0, 3.0, 0.5, 4.0, 2.0])
    s = AxisStats(torch.zeros(6), ranges)
    ids = assign_groups(s, 3, "sorted")
    assert ids.tolist() == [2, 0, 1, 0, 2, 1]


@pytest.mark.parametrize("method", ["kmeans", "contiguous", "sorted"])
def test_num_groups_validation(method):
    s = AxisStats(torch.zeros(6), torch.arange(6.0))
    with pytest.raises(ValueError, match=r"num_groups=7 is larger than the n=6 indices.*at most n groups"):
        assign_groups(s, 7, method)
    with pytest.raises(ValueError, match="num_groups"):
        assign_groups(s, 0, method)
    ids = assign_groups(s, 6, method)  # K == n is allowed: every index its own group
    assert sorted(ids.tolist()) == list(range(6))


def test_unknown_grouping_method():
    with pytest.raises(ValueError, match="kmeans, contiguous, sorted"):
        assign_groups(AxisStats(torch.zeros(3), torch.ones(3)), 2, "random")


def test_kmeans_with_duplicate_points_uses_fewer_groups_without_nan():
    mins = torch.tensor([0.0] * 6 + [-5.0] * 4)
    maxs = torch.tensor([1.0] * 6 + [9.0] * 4)
    s = AxisStats(mins, maxs)
    ids = assign_groups(s, 5, "kmeans")
    assert set(ids.tolist()) == {0, 1}  # two distinct points -> two effective groups, canonical 0, 1
    assert ids[:6].tolist() == [0] * 6 and ids[6:].tolist() == [1] * 4
    lo, hi = group_ranges(s, ids, 5)
    assert lo.tolist() == [0.0, -5.0, 0.0, 0.0, 0.0] and hi.tolist() == [1.0, 9.0, 1.0, 1.0, 1.0]  # empty -> [0, 1]
    scale, zp = per_index_qparams(s, ids, 5, 8)
    assert torch.isfinite(scale).all() and torch.isfinite(zp).all()
    # all points identical
    same = AxisStats(torch.full((8,), 2.0), torch.full((8,), 3.0))
    assert assign_groups(same, 4).tolist() == [0] * 8


# ----------------------------------------------------------------------------------------------------------
# group ranges / parameters
# ----------------------------------------------------------------------------------------------------------
def _naive_group_ranges(mins, maxs, ids, k, include_zero):
    lo, hi = [], []
    for g in range(k):
        members = [i for i in range(len(ids)) if ids[i] == g]
        if not members:
            a, b = 0.0, 1.0
        else:
            a = min(mins[i] for i in members)
            b = max(maxs[i] for i in members)
        if include_zero:
            a, b = min(a, 0.0), max(b, 0.0)
        lo.append(a)
        hi.append(b)
    return lo, hi


@FAST
@given(
    data=st.data(),
    n=st.integers(1, 40),
    include_zero=st.booleans(),
)
def test_group_ranges_against_naive_loop(data, n, include_zero):
    k = data.draw(st.integers(1, n + 3))  # k > n forces empty groups (group_ranges accepts any ids < k)
    ids = data.draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    a = data.draw(st.lists(st.floats(-100, 100, width=32), min_size=n, max_size=n))
    b = data.draw(st.lists(st.floats(-100, 100, width=32), min_size=n, max_size=n))
    mins = [min(x, y) for x, y in zip(a, b)]
    maxs = [max(x, y) for x, y in zip(a, b)]
    s = AxisStats(torch.tensor(mins), torch.tensor(maxs))
    lo, hi = group_ranges(s, torch.tensor(ids), k, include_zero=include_zero)
    rlo, rhi = _naive_group_ranges(mins, maxs, ids, k, include_zero)
    assert lo.tolist() == pytest.approx(rlo) and hi.tolist() == pytest.approx(rhi)


def test_group_ranges_validation():
    s = AxisStats(torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        group_ranges(s, torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        group_ranges(s, torch.tensor([0, 1, 2, 0]), 2)
    with pytest.raises(ValueError, match="integer"):
        group_ranges(s, torch.zeros(4), 2)


def test_per_index_qparams_are_group_params_indexed():
    stats, _ = _clustered_stats(seed=2)
    ids = assign_groups(stats, 4)
    s_g, z_g = group_qparams(stats, ids, 4, 6)
    s_i, z_i = per_index_qparams(stats, ids, 4, 6)
    assert s_i.shape == z_i.shape == (stats.n,)
    assert torch.equal(s_i, s_g[ids]) and torch.equal(z_i, z_g[ids])
    lo, hi = group_ranges(stats, ids, 4)
    s_ref, z_ref = uniform_qparams(lo, hi, 6, include_zero=False)
    assert torch.equal(s_g, s_ref) and torch.equal(z_g, z_ref)


def test_include_zero_option():
    s = AxisStats(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))  # an all-positive group
    ids = torch.tensor([0, 0])
    lo, hi = group_ranges(s, ids, 1)
    assert (lo.item(), hi.item()) == (1.0, 4.0)  # official: 0 not in range
    lo, hi = group_ranges(s, ids, 1, include_zero=True)
    assert (lo.item(), hi.item()) == (0.0, 4.0)
    scale, zp = per_index_qparams(s, ids, 1, 8)
    assert zp[0].item() < 0  # official zero point outside the code range
    scale, zp = per_index_qparams(s, ids, 1, 8, include_zero=True)
    assert zp[0].item() == 0


@FAST
@given(seed=st.integers(0, 2**16), bits=st.integers(3, 8), k=st.integers(1, 6), include_zero=st.booleans(),
       method=st.sampled_from(["kmeans", "contiguous", "sorted"]))
def test_group_error_at_most_half_step(seed, bits, k, include_zero, method):
    g = _gen(seed)
    spread = torch.rand(1, 1, 12, generator=g).mul(20)
    x = torch.randn(3, 16, 12, generator=g) * spread + torch.randn(1, 1, 12, generator=g)
    stats = AxisStats.from_tensor(x, 2)
    ids = assign_groups(stats, k, method)
    scale, zp = per_index_qparams(stats, ids, k, bits, include_zero=include_zero)
    err = (fake_quant_along_axis(x, scale, zp, bits, 2) - x).abs().amax(dim=(0, 1))
    assert torch.all(err <= scale * (0.5 + 1e-4) + 1e-6 * x.abs().max() + 1e-7)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_outlier_channel_gets_its_own_group_and_protects_the_others(k):
    g = _gen(11)
    n, c, outlier = 256, 24, 7
    x = torch.randn(n, c, generator=g)
    x[:, outlier] *= 50
    stats = AxisStats.from_tensor(x, 1)
    ids = assign_groups(stats, k, "kmeans")
    assert (ids == ids[outlier]).sum().item() == 1  # alone in its group
    assert ids[outlier].item() == k - 1  # canonical order: the widest group comes last
    scale, zp = per_index_qparams(stats, ids, k, 6)
    xq = fake_quant_along_axis(x, scale, zp, 6, 1)
    others = torch.ones(c, dtype=torch.bool)
    others[outlier] = False
    grouped_err = (xq - x).abs()[:, others].max()
    s_t, z_t = uniform_qparams(x.min(), x.max(), 6)
    tensor_err = (fake_quant_uniform(x, s_t, z_t, 6) - x).abs()[:, others].max()
    assert grouped_err < tensor_err / 10
    assert group_quant_error(x, 1, k, 6) < group_quant_error(x, 1, 1, 6) / 10


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def test_params_view_shapes_and_mismatch():
    p = torch.arange(6.0)
    assert params_view(p, (2, 6, 4, 5), 1).shape == (1, 6, 1, 1)
    assert params_view(torch.arange(20.0), (2, 6, 4, 5), (2, 3)).shape == (1, 1, 4, 5)
    assert params_view(p, torch.zeros(3, 7, 6), -1).shape == (1, 1, 6)
    with pytest.raises(ValueError, match="calibration shape"):
        params_view(p, (2, 5, 3), 1)


def test_pixel_axis_params_round_trip_with_from_tensor():
    # per-pixel parameters computed from (2, 3) stats must land on the right pixels
    x = torch.randn(2, 3, 4, 5, generator=_gen(4))
    x[:, :, 1, 2] *= 100  # one outlier pixel
    stats = AxisStats.from_tensor(x, (2, 3))
    assert stats.ranges.argmax().item() == 1 * 5 + 2
    err_px = quantization_error(x, *per_index_qparams(stats, assign_groups(stats, 2), 2, 6), 6, axis=(2, 3),
                                metric="per_index")
    assert err_px.shape == (20,)
    assert group_quant_error(x, (2, 3), 2, 6) < group_quant_error(x, (2, 3), 1, 6) / 10


def test_quantization_error_metrics():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    s, z = torch.tensor(1.0), torch.tensor(0.0)
    assert quantization_error(x, s, z, 8).item() == 0.0
    assert quantization_error(x + 0.25, s, z, 8, metric="max").item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="needs an axis"):
        quantization_error(x, s, z, 8, metric="per_index")
    with pytest.raises(ValueError, match="unknown metric"):
        quantization_error(x, s, z, 8, metric="l1")


# ----------------------------------------------------------------------------------------------------------
# plan_groups (all three decisions in one call)
# ----------------------------------------------------------------------------------------------------------
def test_plan_groups_end_to_end():
    x = channel_outlier_tokens()
    ch, px = AxisStats.from_tensor(x, 2), AxisStats.from_tensor(x, 1)
    plan = plan_groups(ch, px, 4, 8)
    assert plan.axis == "channel" and plan.num_groups == 4 and plan.scores[0] > plan.scores[1]
    assert plan.scale.shape == plan.zero_point.shape == plan.group_ids.shape == (32,)
    assert plan.lo.shape == (4,)
    s_ref, z_ref = per_index_qparams(ch, plan.group_ids, 4, 8)
    assert torch.equal(plan.scale, s_ref) and torch.equal(plan.zero_point, z_ref)
    assert plan_groups(ch, px, 4, 8, axis="pixel").scale.shape == (128,)
    assert plan_groups(ch, px, 4, 8, rule="outlier_ratio").axis == "channel"
    assert set(plan.to_dict()) >= {"axis", "group_ids", "scale", "zero_point"}


def test_plan_groups_missing_axis_and_clamping():
    s = AxisStats(torch.arange(5.0) * -1, torch.arange(5.0))
    plan = plan_groups(s, None, 16, 8)  # a 2-D input has only channels; 16 groups clamp to its 5 indices
    assert plan.axis == "channel" and plan.num_groups == 5 and plan.scores is None
    assert plan_groups(None, s, 2, 8).axis == "pixel"
    with pytest.raises(ValueError, match="larger than the n=5"):
        plan_groups(s, None, 16, 8, clamp_groups=False)
    with pytest.raises(ValueError, match="no pixel statistics"):
        plan_groups(s, None, 2, 8, axis="pixel")
    with pytest.raises(ValueError, match="neither"):
        plan_groups(None, None, 2, 8)


def test_from_tensor_all_dims_is_elementwise():
    x = torch.randn(3, 4, generator=_gen(0))
    s = AxisStats.from_tensor(x, (0, 1))
    assert torch.equal(s.mins, x.reshape(-1)) and torch.equal(s.maxs, x.reshape(-1))
    with pytest.raises(ValueError, match="empty"):
        AxisStats.from_tensor(torch.zeros(0, 3), 1)
