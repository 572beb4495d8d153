"""Tests for dgq_utils.core.quantizers: uniform affine, log2 and weight quantizers (fast, CPU)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgq_utils.core.quantizers import (
    MSE_SEARCH_ALPHAS,
    check_bits,
    dequantize_uniform,
    fake_quant_log2,
    fake_quant_uniform,
    fake_quant_weight,
    minmax_range,
    qrange,
    quantize_log2,
    quantize_uniform,
    uniform_qparams,
    weight_error,
    weight_qparams,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, width=32)


def _ranges(draw_lo, draw_hi):
    lo, hi = sorted((draw_lo, draw_hi))
    return lo, hi


def _tol(scale, absmax):
    """Half a step plus float32 slack."""
    return scale * (0.5 + 1e-4) + 1e-6 * absmax + 1e-7


# ----------------------------------------------------------------------------------------------------------
# check_bits / qrange
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 6, 8, 16])
def test_check_bits_accepts(bits):
    assert check_bits(bits) == bits


@pytest.mark.parametrize("bits", [1, 0, 17, -8, 8.0, "8", True, None])
def test_check_bits_rejects_with_helpful_message(bits):
    with pytest.raises(ValueError, match=r"must be an integer in \[2, 16\]; got") as ei:
        check_bits(bits)
    assert "Use 8 for W8A8" in str(ei.value)


def test_check_bits_names_the_field():
    with pytest.raises(ValueError, match=r"^weights.bits must be an integer in \[2, 16\]; got 1"):
        check_bits(1, what="weights.bits")


def test_qrange():
    assert qrange(8) == (0, 255)
    assert qrange(8, symmetric=True) == (-128, 127)
    assert qrange(4, True) == (-8, 7)


# ----------------------------------------------------------------------------------------------------------
# uniform_qparams
# ----------------------------------------------------------------------------------------------------------
def test_uniform_qparams_official_example_all_positive():
    # official doc: all-positive [0.5, 1, 2] -> lo = 0, scale = 2/255, z = 0
    s, z = uniform_qparams(torch.tensor(0.5), torch.tensor(2.0), 8)
    assert torch.isclose(s, torch.tensor(2 / 255))
    assert z.item() == 0.0
    assert z.dtype == torch.float32


def test_uniform_qparams_zero_point_not_clamped_without_zero():
    # official group behaviour: range excluding 0 -> zero point far outside [0, 255]
    s, z = uniform_qparams(torch.tensor(10.0), torch.tensor(11.0), 8, include_zero=False)
    assert torch.isclose(s, torch.tensor(1 / 255))
    assert z.item() == -2550.0
    # 0 is then not representable: it clamps to the lower end of the range
    out = fake_quant_uniform(torch.tensor([0.0, 10.5]), s, z, 8)
    assert out[0].item() == pytest.approx(10.0, abs=1e-3)
    assert abs(out[1].item() - 10.5) <= s.item() / 2 + 1e-5


def test_uniform_qparams_symmetric_and_broadcasting():
    lo = torch.tensor([[-1.0], [-4.0], [0.5]])
    hi = torch.tensor([2.0, 3.0])
    s, z = uniform_qparams(lo, hi, 8, symmetric=True)
    assert s.shape == z.shape == (3, 2)
    assert torch.all(z == 0)
    expected = torch.maximum(lo.abs(), hi.abs()) / 127
    assert torch.allclose(s, expected)


def test_uniform_qparams_floor_and_errors():
    s, z = uniform_qparams(torch.tensor(0.0), torch.tensor(0.0), 8)
    assert s.item() == pytest.approx(1e-8) and z.item() == 0.0
    with pytest.raises(ValueError, match="lo <= hi"):
        uniform_qparams(torch.tensor([1.0]), torch.tensor([0.0]), 8, include_zero=False)
    with pytest.raises(ValueError, match="non-finite"):
        uniform_qparams(torch.tensor(float("nan")), torch.tensor(1.0), 8)
    with pytest.raises(ValueError, match=r"\[2, 16\]"):
        uniform_qparams(torch.tensor(0.0), torch.tensor(1.0), 1)


def test_uniform_qparams_half_to_even_zero_point():
    # -lo/scale = 2.5 exactly -> round half to even -> 2
    s, z = uniform_qparams(torch.tensor(-2.5), torch.tensor(0.5), 2)  # scale = 3/3 = 1
    assert s.item() == 1.0 and z.item() == 2.0


# ----------------------------------------------------------------------------------------------------------
# fake_quant_uniform: hand-checked values, error bound, idempotence, monotonicity in bits
# ----------------------------------------------------------------------------------------------------------
def test_fake_quant_uniform_hand_values_asymmetric():
    # bits=2, range [0, 3] -> scale 1, z 0, codes 0..3; round half to even
    x = torch.tensor([0.4, 0.5, 1.5, 2.5, 3.7, -1.0])
    s, z = uniform_qparams(torch.tensor(0.0), torch.tensor(3.0), 2)
    assert fake_quant_uniform(x, s, z, 2).tolist() == [0.0, 0.0, 2.0, 2.0, 3.0, 0.0]
    assert quantize_uniform(x, s, z, 2).tolist() == [0, 0, 2, 2, 3, 0]


def test_fake_quant_uniform_hand_values_symmetric_full_range():
    # bits=3, absmax 3 -> scale 1, codes [-4, 3] (the extra most-negative level is used)
    s, z = uniform_qparams(torch.tensor(-3.0), torch.tensor(3.0), 3, symmetric=True)
    assert s.item() == 1.0
    x = torch.tensor([-5.0, -4.4, -3.5, 3.5, 2.5, 0.0])
    assert fake_quant_uniform(x, s, z, 3, symmetric=True).tolist() == [-4.0, -4.0, -4.0, 3.0, 2.0, 0.0]
    assert quantize_uniform(x, s, z, 3, symmetric=True).tolist() == [-4, -4, -4, 3, 2, 0]


@FAST
@given(a=finite, b=finite, bits=st.integers(2, 12), symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_error_at_most_half_step_inside_range_per_tensor(a, b, bits, symmetric, seed):
    lo, hi = _ranges(a, b)
    s, z = uniform_qparams(torch.tensor(lo), torch.tensor(hi), bits, symmetric=symmetric)
    if symmetric:
        m = max(abs(lo), abs(hi))
        lo_r, hi_r = -m, m
    else:
        lo_r, hi_r = min(lo, 0.0), max(hi, 0.0)
    g = torch.Generator().manual_seed(seed)
    x = lo_r + (hi_r - lo_r) * torch.rand(257, generator=g, dtype=torch.float64)
    x = torch.cat([x, torch.tensor([lo_r, hi_r, 0.0], dtype=torch.float64)]).float().clamp(lo_r, hi_r)
    err = (fake_quant_uniform(x, s, z, bits, symmetric=symmetric) - x).abs().max().item()
    assert err <= _tol(s.item(), max(abs(lo_r), abs(hi_r)))


@FAST
@given(bits=st.integers(2, 10), seed=st.integers(0, 2**16), include_zero=st.booleans())
def test_error_at_most_half_step_per_channel_rows(bits, seed, include_zero):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 50, generator=g) * torch.rand(6, 1, generator=g) * 10 + torch.randn(6, 1, generator=g) * 5
    lo, hi = minmax_range(x, (1,))
    s, z = uniform_qparams(lo, hi, bits, include_zero=include_zero)
    assert s.shape == (6, 1)
    err = (fake_quant_uniform(x, s, z, bits) - x).abs()
    assert torch.all(err <= s * (0.5 + 1e-4) + 1e-6 * x.abs().amax(dim=1, keepdim=True) + 1e-7)


@FAST
@given(x=st.lists(finite, min_size=1, max_size=64), bits=st.integers(2, 8), symmetric=st.booleans())
def test_fake_quant_is_idempotent(x, bits, symmetric):
    xt = torch.tensor(x, dtype=torch.float32)
    s, z = uniform_qparams(xt.min(), xt.max(), bits, symmetric=symmetric)
    once = fake_quant_uniform(xt, s, z, bits, symmetric=symmetric)
    twice = fake_quant_uniform(once, s, z, bits, symmetric=symmetric)
    assert torch.equal(once, twice)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fake_quant_is_idempotent_in_half_precision(dtype):
    x = (torch.randn(512) * 3).to(dtype)
    s, z = uniform_qparams(x.float().min(), x.float().max(), 8)
    once = fake_quant_uniform(x, s, z, 8)
    assert torch.equal(fake_quant_uniform(once, s, z, 8), once)


@FAST
@given(a=finite, b=finite, bits=st.integers(2, 9), symmetric=st.booleans())
def test_more_bits_never_larger_max_error(a, b, bits, symmetric):
    lo, hi = _ranges(a, b)
    if hi - lo < 1e-3:
        hi = lo + 1.0
    x = torch.linspace(lo, hi, 20001, dtype=torch.float64).float()
    errs = []
    for bb in (bits, bits + 1):
        s, z = uniform_qparams(torch.tensor(lo), torch.tensor(hi), bb, symmetric=symmetric)
        errs.append((fake_quant_uniform(x, s, z, bb, symmetric=symmetric) - x).abs().max().item())
    assert errs[1] <= errs[0] + 1e-6 * max(abs(lo), abs(hi))


@FAST
@given(x=st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=64), bits=st.integers(2, 16),
       symmetric=st.booleans(), shrink=st.floats(0.05, 1.0))
def test_codes_in_range_and_dequantize_matches_fake_quant(x, bits, symmetric, shrink):
    xt = torch.tensor(x, dtype=torch.float32)
    # a deliberately too-small range so that clamping happens
    s, z = uniform_qparams(xt.min() * shrink, xt.max() * shrink, bits, symmetric=symmetric)
    q = quantize_uniform(xt, s, z, bits, symmetric=symmetric)
    qmin, qmax = qrange(bits, symmetric)
    assert q.dtype == torch.int32
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    deq = dequantize_uniform(q, s, z, symmetric=symmetric)
    fq = fake_quant_uniform(xt, s, z, bits, symmetric=symmetric)
    assert torch.allclose(deq, fq, rtol=0, atol=1e-6 * (1 + xt.abs().max().item()))


def test_zero_is_exact_when_range_includes_zero():
    for symmetric in (False, True):
        s, z = uniform_qparams(torch.tensor(-0.37), torch.tensor(5.1), 6, symmetric=symmetric)
        assert fake_quant_uniform(torch.zeros(3), s, z, 6, symmetric=symmetric).abs().max().item() == 0.0


def test_symmetric_vs_asymmetric_on_skewed_range():
    # an all-positive range wastes half of the symmetric grid: asymmetric has half the step
    s_a, _ = uniform_qparams(torch.tensor(0.0), torch.tensor(10.0), 8)
    s_s, _ = uniform_qparams(torch.tensor(0.0), torch.tensor(10.0), 8, symmetric=True)
    assert s_s.item() == pytest.approx(10 / 127) and s_a.item() == pytest.approx(10 / 255)
    x = torch.linspace(0, 10, 1001)
    e_a = (fake_quant_uniform(x, s_a, torch.tensor(0.0), 8) - x).abs().max()
    e_s = (fake_quant_uniform(x, s_s, torch.tensor(0.0), 8, symmetric=True) - x).abs().max()
    assert e_a < e_s


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_preserved(dtype):
    x = torch.randn(4, 8).to(dtype)
    s, z = uniform_qparams(x.float().amin(), x.float().amax(), 8)
    assert fake_quant_uniform(x, s, z, 8).dtype == dtype
    assert fake_quant_log2(x.abs(), x.abs().amax(), 8).dtype == dtype
    assert fake_quant_weight(x, 4).dtype == dtype


def test_input_not_modified():
    x = torch.randn(10)
    x0 = x.clone()
    s, z = uniform_qparams(x.min(), x.max(), 4)
    fake_quant_uniform(x, s, z, 4)
    fake_quant_log2(x.abs(), 1.0, 4)
    assert torch.equal(x, x0)


# ----------------------------------------------------------------------------------------------------------
# gradients (straight-through)
# ----------------------------------------------------------------------------------------------------------
def test_ste_gradient_is_one_inside_range_zero_outside():
    s, z = uniform_qparams(torch.tensor(-1.0), torch.tensor(1.0), 8)
    x = torch.tensor([-3.0, -0.5, 0.0, 0.3, 0.99, 3.0], requires_grad=True)
    out = fake_quant_uniform(x, s, z, 8)
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    # forward values equal the no-grad path
    assert torch.equal(out.detach(), fake_quant_uniform(x.detach(), s, z, 8))


def test_ste_identity_mode_and_half_precision_grad():
    s, z = uniform_qparams(torch.tensor(-1.0), torch.tensor(1.0), 8)
    x = torch.tensor([-3.0, 0.25, 3.0], dtype=torch.float16, requires_grad=True)
    fake_quant_uniform(x, s, z, 8, ste="identity").sum().backward()
    assert x.grad.dtype == torch.float16 and x.grad.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="ste must be one of"):
        fake_quant_uniform(x, s, z, 8, ste="nope")
    with pytest.raises(ValueError, match="ste must be one of"):
        fake_quant_uniform(x.detach(), s, z, 8, ste="nope")


def test_log2_ste_gradient():
    x = torch.tensor([0.0, 0.1, 0.7, 1.0], requires_grad=True)
    fake_quant_log2(x, 1.0, 4).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


# ----------------------------------------------------------------------------------------------------------
# log2 quantizer
# ----------------------------------------------------------------------------------------------------------
probs = st.lists(st.floats(0.0, 1.0, width=32), min_size=1, max_size=64)


@FAST
@given(x=probs, bits=st.integers(2, 6), scale=st.floats(1e-3, 10.0), zero_level=st.booleans())
def test_log2_outputs_are_scaled_powers_of_two(x, bits, scale, zero_level):
    s = torch.tensor(scale, dtype=torch.float32)
    xt = torch.tensor(x) * s
    out = fake_quant_log2(xt, s, bits, zero_level=zero_level)
    emax = 2**bits - 1
    nz = out != 0
    if not zero_level:
        assert bool(nz.all())  # no zero level in the official quantizer (no underflow at <= 6 bits)
    k = -torch.log2(out[nz] / s)
    assert torch.equal(k, k.round())
    assert bool((k >= 0).all()) and bool((k <= (emax - 1 if zero_level else emax)).all())
    assert torch.equal(out[nz], s * torch.exp2(-k))
    codes = quantize_log2(xt, s, bits, zero_level=zero_level)
    assert int(codes.min()) >= 0 and int(codes.max()) <= emax
    if zero_level:
        assert torch.equal(codes == emax, ~nz)


@FAST
@given(x=st.lists(st.floats(1e-6, 1.0), min_size=1, max_size=64), bits=st.integers(3, 8))
def test_log2_rounds_to_nearest_level_in_log_domain(x, bits):
    xt = torch.tensor(x)
    out = fake_quant_log2(xt, 1.0, bits, zero_level=False)
    # inside the level range every value is within half an octave of its level
    inside = xt >= 2.0 ** -(2**bits - 1)
    d = (torch.log2(out[inside]) - torch.log2(xt[inside])).abs()
    assert bool((d <= 0.5 + 1e-5).all())


def test_log2_special_values():
    x = torch.tensor([0.0, -0.2, 2**-1.4, 2**-1.6, 1.0, 2.5])
    out = fake_quant_log2(x, 1.0, 4)
    assert out.tolist() == [0.0, 0.0, 0.5, 0.25, 1.0, 1.0]  # zeros/negatives -> 0, > scale -> scale
    # official: no zero level
    off = fake_quant_log2(torch.tensor([0.0]), 2.0, 6, zero_level=False)
    assert off.item() == pytest.approx(2.0 * 2.0**-63, rel=1e-6)
    # ... which underflows to exactly 0 in float32 at 8 bits
    assert fake_quant_log2(torch.tensor([0.0]), 1.0, 8, zero_level=False).item() == 0.0
    # x == scale maps to scale for any scale
    for sc in (1e-4, 0.37, 1.0, 123.0):
        assert fake_quant_log2(torch.tensor([sc]), sc, 6).item() == pytest.approx(sc, rel=1e-7)


def test_log2_zero_level_reserves_the_last_code():
    # 2 bits: codes 0..3; with zero_level nonzero levels are 1, 1/2, 1/4 and code 3 means 0
    x = torch.tensor([1.0, 0.5, 0.25, 0.125, 0.0])
    assert fake_quant_log2(x, 1.0, 2).tolist() == [1.0, 0.5, 0.25, 0.0, 0.0]
    assert fake_quant_log2(x, 1.0, 2, zero_level=False).tolist() == [1.0, 0.5, 0.25, 0.125, 0.125]


def test_log2_zero_scale_gives_no_nan():
    out = fake_quant_log2(torch.zeros(5), torch.tensor(0.0), 6)
    assert torch.equal(out, torch.zeros(5))
    out = fake_quant_log2(torch.zeros(5), 0.0, 6, zero_level=False)
    assert torch.equal(out, torch.zeros(5))


def test_log2_per_sample_scale_broadcasting():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 2, 5, 7, generator=g) * torch.tensor([1.0, 3.0, 9.0]).view(3, 1, 1, 1), dim=-1)
    scale = p.amax(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    out = fake_quant_log2(p, scale, 6)
    for b in range(3):
        ref = fake_quant_log2(p[b], scale[b].item(), 6)
        assert torch.equal(out[b], ref)
        assert out[b].max().item() == pytest.approx(scale[b].item())


# ----------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 7), (8, 3, 3, 3), (4, 2, 1, 1)])
@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_weight_qparams_shapes(shape, method):
    w = torch.randn(shape)
    s, z = weight_qparams(w, 4, range_method=method)
    assert s.shape == z.shape == (shape[0],) + (1,) * (len(shape) - 1)
    s, z = weight_qparams(w, 4, granularity="per_tensor", range_method=method)
    assert s.shape == z.shape == (1,) * len(shape)


def test_weight_minmax_per_channel_error_bound_and_symmetric():
    w = torch.randn(16, 3, 3, 3) * torch.logspace(-2, 1, 16).view(16, 1, 1, 1)
    s, z = weight_qparams(w, 4)
    err = (fake_quant_uniform(w, s, z, 4) - w).abs().flatten(1).amax(1)
    assert torch.all(err <= s.flatten() * (0.5 + 1e-4) + 1e-7)
    s, z = weight_qparams(w, 8, symmetric=True)
    assert torch.all(z == 0)
    assert torch.allclose(s.flatten(), w.abs().flatten(1).amax(1) / 127)


def _mixed_sign_weight(g, o, i):
    w = torch.randn(o, i, generator=g) * torch.rand(o, 1, generator=g).add(0.1)
    w[:, 0] = -w[:, 0].abs() - 1e-3
    w[:, 1] = w[:, 1].abs() + 1e-3
    # a few outliers so that clipping pays off
    w[:, 2] *= 1 + 20 * torch.rand(o, generator=g)
    return w


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([3, 4, 6, 8]), symmetric=st.booleans())
def test_mse_search_never_worse_than_minmax(seed, bits, symmetric):
    g = torch.Generator().manual_seed(seed)
    w = _mixed_sign_weight(g, 8, 40)
    e_mm = weight_error(w, fake_quant_weight(w, bits, symmetric=symmetric, range_method="minmax"))
    e_mse = weight_error(w, fake_quant_weight(w, bits, symmetric=symmetric, range_method="mse"))
    assert torch.all(e_mse <= e_mm * (1 + 1e-4) + 1e-12)


def _mse_reference(w, bits, p=2.4):
    """Naive per-channel loop over the official candidates (test reference only)."""
    out_s, out_z = [], []
    for row in w:
        lo, hi = row.min(), row.max()
        best, best_sz = None, None
        for a in MSE_SEARCH_ALPHAS:
            s, z = uniform_qparams(lo * a, hi * a, bits, include_zero=False)
            score = (fake_quant_uniform(row, s, z, bits) - row).abs().pow(p).mean().item()
            if best is None or score < best:
                best, best_sz = score, (s, z)
        out_s.append(best_sz[0])
        out_z.append(best_sz[1])
    return torch.stack(out_s), torch.stack(out_z)


def test_mse_search_matches_naive_loop_and_is_chunk_invariant():
    g = torch.Generator().manual_seed(3)
    w = _mixed_sign_weight(g, 5, 30)
    s, z = weight_qparams(w, 4, range_method="mse")
    rs, rz = _mse_reference(w, 4)
    assert torch.allclose(s.flatten(), rs, rtol=1e-6) and torch.equal(z.flatten(), rz)
    s2, z2 = weight_qparams(w, 4, range_method="mse", max_chunk_elements=1)
    assert torch.equal(s, s2) and torch.equal(z, z2)
    assert len(MSE_SEARCH_ALPHAS) == 80 and MSE_SEARCH_ALPHAS[0] == 1.0
    assert MSE_SEARCH_ALPHAS[-1] == pytest.approx(0.21)


def test_mse_search_keeps_first_minimum_on_ties():
    # every alpha in this list gives the same (zero) error on a constant-zero channel -> the first one wins,
    # i.e. the result equals the alpha=1 range.
    w = torch.zeros(2, 5)
    w[1] = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    s, z = weight_qparams(w, 2, range_method="mse", alphas=[1.0, 1.0, 0.5])
    s1, z1 = weight_qparams(w, 2, range_method="mse", alphas=[1.0])
    assert torch.equal(s, s1) and torch.equal(z, z1)


def test_weight_qparams_validation():
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match="granularity must be one of"):
        weight_qparams(w, 8, granularity="per_group")
    with pytest.raises(ValueError, match="range_method must be one of"):
        weight_qparams(w, 8, range_method="percentile")
    with pytest.raises(ValueError, match=r"\[2, 16\]"):
        weight_qparams(w, 1)
    with pytest.raises(ValueError, match="floating-point"):
        weight_qparams(torch.ones(2, 2, dtype=torch.int64), 8)


def test_minmax_range_keepdim():
    x = torch.arange(24.0).reshape(2, 3, 4)
    lo, hi = minmax_range(x, None)
    assert lo.shape == (1, 1, 1) and lo.item() == 0 and hi.item() == 23
    lo, hi = minmax_range(x, (0, 2))
    assert lo.shape == (1, 3, 1) and lo.flatten().tolist() == [0, 4, 8]
    lo, hi = minmax_range(x, 1)
    assert hi.shape == (2, 1, 4)


def test_fake_quant_speed_on_a_large_activation():
    # the no-grad hot path on a UNet-sized activation stays cheap (sanity, not a benchmark)
    import time

    x = torch.randn(2, 320, 64, 64)
    s = torch.rand(1, 320, 1, 1) + 0.01
    z = torch.zeros(1, 320, 1, 1)
    t0 = time.perf_counter()
    fake_quant_uniform(x, s, z, 8)
    assert time.perf_counter() - t0 < 2.0
    assert math.isfinite(float(fake_quant_log2(x.abs(), x.abs().amax(), 8).sum()))
