"""Calibration's batched finishing (one call per quantizer and axis, K-means for all sets at once) gives the
parameters of the set-at-a-time definition bit for bit, on every kind of recipe of the tiny pipeline; and the
batched pieces (axis scores, per-index parameters, parameter stacks) equal their one-at-a-time versions."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import STEPS
from dgq_utils.calibrate import calibration
from dgq_utils.calibrate.trace import TRACE_SAMPLER
from dgq_utils.core.grouping import (
    AxisStats,
    assign_groups,
    axis_scores,
    axis_scores_many,
    per_index_qparams,
    per_index_qparams_many,
)
from dgq_utils.kernels.fake_quant import ParamStack
from dgq_utils.quantize.pipeline import get_quant_state, quantize_pipeline


def _same_params(a, b) -> None:
    assert sorted(a.params) == sorted(b.params), a.name
    assert list(a.params) == list(b.params), a.name  # installed in set order (the report reads that order)
    for i in a.params:
        for x, y in zip(a.params[i], b.params[i]):
            assert x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y), (a.name, i)
        ia, ib = dict(a.info[i]), dict(b.info[i])
        ids_a, ids_b = ia.pop("ids"), ib.pop("ids")
        assert ia == ib, (a.name, i)
        assert (ids_a is None and ids_b is None) or torch.equal(ids_a, ids_b), (a.name, i)


@pytest.mark.parametrize("preset", ["dgq-w8a8", "baseline-w8a8", "dgq-official-w8a8",
                                    pytest.param("dgq-w8a6-g4", marks=pytest.mark.slow)])
def test_batched_finishing_equals_the_set_at_a_time_definition(pipe, calib_prompts, preset, monkeypatch):
    real = calibration.finalize_act_quantizers
    checked = []

    def spy(quantizers, cfg, **kw):
        quantizers = list(quantizers)
        copies = [copy.deepcopy(q) for q in quantizers]  # the statistics (and official per-tensor inits)
        out = real(quantizers, cfg, **kw)
        ref = [calibration.finalize_act_quantizer_reference(c, cfg) for c in copies]
        assert out == (sum(g for g, _ in ref), sum(c for _, c in ref))
        for q, c in zip(quantizers, copies):
            _same_params(q, c)
        checked.append(len(quantizers))
        return out

    monkeypatch.setattr(calibration, "finalize_act_quantizers", spy)
    quantize_pipeline(pipe, preset, calib_prompts[:2], TRACE_SAMPLER.replace(num_inference_steps=STEPS, batch_size=2),
                      progress=False)
    assert checked and checked[0] == len(get_quant_state(pipe).act_quantizers())


def _stats(g, n, scale=1.0):
    base = torch.randn(n, generator=g).abs() * scale * (1 + 8 * (torch.rand(n, generator=g) < 0.05))
    return AxisStats(-base * torch.rand(n, generator=g), base)


@pytest.mark.parametrize("rule", ["official_spread", "outlier_ratio"])
def test_axis_scores_many_equal_one_pair_at_a_time(rule):
    g = torch.Generator().manual_seed(0)
    ch = [_stats(g, 40, s) for s in (0.1, 1.0, 3.0, 7.0)] + [AxisStats(torch.zeros(40), torch.zeros(40))]
    px = [_stats(g, 64, s) for s in (2.0, 1.0, 0.5, 9.0)] + [AxisStats(torch.zeros(64), torch.zeros(64))]
    c, p = axis_scores_many(ch, px, rule)
    assert (c, p) == tuple(map(list, zip(*[axis_scores(a, b, rule) for a, b in zip(ch, px)])))
    with pytest.raises(ValueError, match="one length"):
        axis_scores_many([ch[0], _stats(g, 7)], px[:2], rule)


@pytest.mark.parametrize("include_zero,symmetric,bits", [(False, False, 8), (True, False, 6), (False, True, 4)])
def test_per_index_qparams_many_equal_one_row_at_a_time(include_zero, symmetric, bits):
    g = torch.Generator().manual_seed(1)
    stats = [_stats(g, 50, s) for s in (0.5, 1.0, 4.0)] + [AxisStats(torch.ones(50), torch.ones(50) * 2)]
    ids = [assign_groups(s, 6, seed=0) for s in stats[:3]] + [torch.zeros(50, dtype=torch.long)]  # empty groups
    scale, zp = per_index_qparams_many(torch.stack([s.mins for s in stats]), torch.stack([s.maxs for s in stats]),
                                       torch.stack(ids), 6, bits, include_zero=include_zero, symmetric=symmetric)
    for j, (s, i) in enumerate(zip(stats, ids)):
        rs, rz = per_index_qparams(s, i, 6, bits, include_zero=include_zero, symmetric=symmetric)
        assert torch.equal(scale[j], rs) and torch.equal(zp[j], rz)
    with pytest.raises(ValueError, match=r"lie in \[0, 6\)"):
        per_index_qparams_many(scale, scale, torch.stack(ids) + 6, 6, bits)


def test_param_stack_of_mixed_sets():
    sets = {0: (torch.tensor(0.5), torch.tensor(3.0)),
            2: (torch.arange(1.0, 5.0).reshape(1, 4, 1, 1), torch.arange(4.0).reshape(1, 4, 1, 1)),
            3: (torch.arange(1.0, 7.0).reshape(1, 1, 2, 3), -torch.arange(6.0).reshape(1, 1, 2, 3))}
    st = ParamStack.from_sets(sets, 1, (2, 3))
    assert st.valid.tolist() == [True, False, True, True]
    assert torch.equal(st.chan_scale, torch.tensor([[0.5] * 4, [1.0] * 4, [1.0, 2.0, 3.0, 4.0], [1.0] * 4]))
    assert torch.equal(st.chan_zp, torch.tensor([[3.0] * 4, [0.0] * 4, [0.0, 1.0, 2.0, 3.0], [0.0] * 4]))
    assert torch.equal(st.pix_scale[3], torch.arange(1.0, 7.0)) and torch.equal(st.pix_scale[0], torch.ones(6))
    assert torch.equal(st.pix_zp[3], -torch.arange(6.0)) and st.pixel_dims == (2, 3)
    only_channel = ParamStack.from_sets({1: sets[2]}, 1, (2, 3))
    assert only_channel.pix_scale is None and only_channel.valid.tolist() == [False, True]
