"""DGQAttnProcessor / ProbQuantizer: exact FP math, <start> pass-through, per-prompt independence, log2 levels."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from conftest import STEPS, generate
from dgq_utils.model.attention import DGQAttnProcessor, ProbQuantizer
from dgq_utils.model.layers import ActQuantizer
from dgq_utils.core.quantizers import fake_quant_log2


def _attn(cross: bool, seed: int = 0):
    torch.manual_seed(seed)
    return Attention(query_dim=32, cross_attention_dim=24 if cross else None, heads=4, dim_head=8).eval()


@pytest.mark.parametrize("cross", [False, True])
def test_processor_without_quantization_matches_diffusers(cross):
    attn = _attn(cross)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 20, 32, generator=g)
    ctx = torch.randn(3, 7, 24, generator=g) if cross else None
    with torch.no_grad():
        ref = AttnProcessor2_0()(attn, x, ctx)
        ref_classic = AttnProcessor()(attn, x, ctx)
        proc = DGQAttnProcessor("a", "cross" if cross else "self", AttnProcessor2_0())
        out = proc(attn, x, ctx)
        # chunked over the batch (tiny workspace limit) gives the same result
        proc.max_prob_elements = 1
        out_chunked = proc(attn, x, ctx)
    assert (out - ref).abs().max() < 1e-5 and (out - ref_classic).abs().max() < 1e-5
    assert (out - out_chunked).abs().max() < 1e-6  # BLAS blocking differs with the batch size
    # with autograd the reference path is used and agrees
    xg = x.clone().requires_grad_(True)
    out_grad = DGQAttnProcessor("a", "self", AttnProcessor2_0())(attn, xg, ctx)
    assert (out_grad.detach() - ref).abs().max() < 1e-5
    out_grad.sum().backward()
    assert xg.grad is not None
    # disabled -> the original processor itself (bit-identical)
    proc.enabled = False
    with torch.no_grad():
        assert torch.equal(proc(attn, x, ctx), ref)


def _probs(b=3, h=2, nq=5, nk=9, seed=0, sink=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, h, nq, nk, generator=g) * 2
    if sink:
        s[..., 0] += 4.0  # a <start> sink
    return s.softmax(-1)


@pytest.mark.parametrize("quantizer", ["log2", "uniform"])
@pytest.mark.parametrize("scale", ["per_prompt", "batch"])
def test_start_column_passes_through_bit_exactly(quantizer, scale):
    p = _probs()
    pq = ProbQuantizer("p", 4, quantizer=quantizer, scale=scale, keep_start=True)
    pq.mode = "quant"
    for out in (pq.quantize(p), pq.quantize_(p.clone())):
        assert torch.equal(out[..., 0], p[..., 0])
        assert not torch.equal(out[..., 1:], p[..., 1:])
        # the scale ignores the start column: every other column is <= max(rest)
        assert float(out[..., 1:].max()) <= float(p[..., 1:].max()) + 1e-7
    pq.keep_start = False
    assert not torch.equal(pq.quantize(p)[..., 0], p[..., 0])


@pytest.mark.parametrize("zero_level", [True, False])
@pytest.mark.parametrize("bits", [3, 6])
def test_log2_outputs_are_scale_times_powers_of_two(bits, zero_level):
    p = _probs(sink=False)
    p[0, 0, 0, 3] = 0.0
    pq = ProbQuantizer("p", bits, scale="per_prompt", zero_level=zero_level)
    pq.mode = "quant"
    scale = p.amax(dim=(1, 2, 3), keepdim=True)
    emax = 2**bits - 1
    for out in (pq.quantize(p), pq.quantize_(p.clone())):
        ratio = (out / scale).double()
        nz = ratio[ratio > 0]
        k = -torch.log2(nz)
        assert torch.equal(k, k.round()) and k.min() >= 0
        assert k.max() <= (emax - 1 if zero_level else emax)
        if zero_level:
            assert out[0, 0, 0, 3] == 0.0
        else:
            assert out[0, 0, 0, 3] == scale[0, 0, 0, 0] * 2.0**-emax


def test_fast_log2_agrees_with_reference():
    p = _probs(b=4, h=4, nq=64, nk=77, seed=3)
    s = p.amax(dim=(1, 2, 3), keepdim=True)
    pq = ProbQuantizer("p", 6, scale="per_prompt", zero_level=False)
    pq.mode = "quant"
    fast, ref = pq.quantize_(p.clone()), fake_quant_log2(p, s, 6, zero_level=False)
    differ = fast != ref
    assert differ.float().mean() < 1e-4  # only float32-log2 rounding ties near a threshold
    if differ.any():
        r = (fast[differ] / ref[differ]).double()
        assert torch.all((r == 2.0) | (r == 0.5))


def test_static_scale_needs_calibration():
    pq = ProbQuantizer("down.attn2.prob", 8, scale="static")
    pq.mode = "quant"
    with pytest.raises(RuntimeError, match="down.attn2.prob.*no static softmax scale"):
        pq(_probs())
    pq.mode = "observe"
    p = _probs()
    assert torch.equal(pq(p), p) and pq.observed_max[0] == float(p.max())


def _qkv_quantizers(bits=6):
    out = {}
    for part in ("q", "k", "v"):
        q = ActQuantizer(part, bits, layout="qkv")
        q.set_params(0, torch.tensor(0.05), torch.tensor(2.0 ** (bits - 1)))
        q.mode = "quant"
        out[part] = q
    return out


@pytest.mark.parametrize("scale,independent", [("per_prompt", True), ("batch", False)])
def test_per_prompt_scale_makes_samples_independent(scale, independent):
    attn = _attn(cross=True)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 20, 32, generator=g)
    ctx_a, ctx_b, ctx_c = (torch.randn(1, 7, 24, generator=g) * f for f in (1.0, 1.0, 6.0))
    pq = ProbQuantizer("p", 4, scale=scale, keep_start=True)
    pq.mode = "quant"
    proc = DGQAttnProcessor("a", "cross", AttnProcessor2_0(), prob_quant=pq, key_start_fp=True, **{
        f"{k}_quant": v for k, v in _qkv_quantizers().items()})
    with torch.no_grad():
        ab = proc(attn, torch.cat([x, x]), torch.cat([ctx_a, ctx_b]))
        ac = proc(attn, torch.cat([x, x]), torch.cat([ctx_a, ctx_c]))
    assert torch.equal(ab[0], ac[0]) is independent


def test_per_prompt_independence_in_the_pipeline(pipe, calib_prompts):
    """Whole quantized pipeline (dgq-w8a8, per-prompt softmax scale): prompt a's image does not depend on b/c."""
    from dgq_utils.calibrate.trace import TRACE_SAMPLER
    from dgq_utils.quantize.pipeline import quantize_pipeline

    quantize_pipeline(pipe, "dgq-w8a6", calib_prompts, TRACE_SAMPLER.replace(num_inference_steps=STEPS), progress=False)
    a, b, c = "a blue house near a river", "a horse in the snow", "a small bird flying over the beach"
    ab = generate(pipe, [a, b])
    ac = generate(pipe, [a, c])
    assert torch.equal(ab[0], ac[0])
    assert not torch.equal(ab[1], ac[1])


def test_key_token_zero_stays_fp_and_is_not_grouped():
    attn = _attn(cross=True)
    k_quant = ActQuantizer("k", 8, layout="qkv")
    k_quant.mode = "observe"
    proc = DGQAttnProcessor("a", "cross", AttnProcessor2_0(), k_quant=k_quant, key_start_fp=True)
    with torch.no_grad():
        proc(attn, torch.randn(2, 10, 32), torch.randn(2, 7, 24))
    assert k_quant.stats[0].pixel.n == 6  # tokens 1..6 only
    assert k_quant.stats[0].channel.n == 8  # head dim, pooled over the 4 heads


def test_record_mode_collects_start_mass():
    attn = _attn(cross=True)
    proc = DGQAttnProcessor("a", "cross", AttnProcessor2_0())
    proc.record_attention = True
    with torch.no_grad():
        proc(attn, torch.randn(2, 10, 32), torch.randn(2, 7, 24))
        proc(attn, torch.randn(2, 10, 32), torch.randn(2, 7, 24))
    st = proc.attention_stats[0]
    assert st.samples == 4 and st.heads == 4 and st.num_keys == 7
    assert torch.all((st.start_mass_sum / st.samples > 0) & (st.start_mass_sum / st.samples < 1))
    assert st.hist.sum() == 4 * 4 * 10 * 7  # samples x heads x queries x keys: every probability once


@pytest.mark.parametrize("quantizer,scale", [("log2", "per_prompt"), ("uniform", "batch"), ("log2", "static")])
def test_fused_inference_path_matches_reference_path(quantizer, scale):
    """The no-grad path (workspace, in-place softmax/quantizer, multiplier folded into P V) vs the reference."""
    attn = _attn(cross=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 12, 32, generator=g)
    ctx = torch.randn(2, 7, 24, generator=g)
    pq = ProbQuantizer("p", 6, quantizer=quantizer, scale=scale, keep_start=True)
    pq.static = {0: torch.tensor(0.3)}
    pq.mode = "quant"
    proc = DGQAttnProcessor("a", "cross", AttnProcessor2_0(), prob_quant=pq, key_start_fp=True,
                            **{f"{k}_quant": v for k, v in _qkv_quantizers().items()})
    with torch.no_grad():
        fast = proc(attn, x, ctx)
    ref = proc(attn, x.clone().requires_grad_(True), ctx).detach()  # autograd -> reference path
    assert (fast - ref).abs().max() < 1e-5
