"""The real 8-bit path (issue #14, first step): integer GEMM math vs fake quantization, the channel permutation /
padding logic, the Triton kernels (interpreter on the CPU, ``gpu`` on CUDA), and the conversion of a tiny pipeline.

Tolerances (stated): the references compute the integer part exactly (int32 / float64) and the epilogue in float64,
so they equal ``F.linear(x^, w^)`` in float64 to 1e-9 relative (to ``sum |x^| |w^|``). Against the fake-quant layer
in float32 (which rounds ``x^`` / ``w^`` / the GEMM in float32) they agree to 1e-5 of the output scale. The Triton
kernels (fp32 epilogue) agree with the reference to 1e-5 relative in float32 and within fp16 rounding in float16.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import STEPS, generate, psnr
from dgq_utils.core.quantizers import fake_quant_uniform, uniform_qparams
from dgq_utils.kernels import int8_gemm as k8

REPO = Path(__file__).resolve().parents[1]


def _wq(n, k, gen, symmetric=False):
    w = torch.randn(n, k, generator=gen, dtype=torch.float64).float()
    s, z = uniform_qparams(w.amin(1), w.amax(1), 8, symmetric=symmetric, include_zero=False)
    return w, s, z, k8.quantize_weight_int8(w, s, z, 8, symmetric)


def _wh64(wq):
    return (wq.codes.double() - wq.offset.double()[:, None]) * wq.scale.double()[:, None]


def _rel(y, ref, xh, wh):
    return float((y.double() - ref).abs().max() / (xh.double().abs() @ wh.double().abs().t()).max())


# ---- permutation / padding --------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 7), min_size=1, max_size=90), block=st.sampled_from([1, 3, 16, 32]))
def test_block_layout_properties(ids, block):
    ids_t = torch.tensor(ids)
    lay = k8.block_layout(ids_t, block)
    perm = lay.perm.to(torch.long)
    real = perm[perm >= 0]
    assert sorted(real.tolist()) == list(range(len(ids)))  # every channel exactly once
    assert lay.padded_k % block == 0 and lay.block_group.numel() == lay.padded_k // block
    expected = sum(-(-int((ids_t == g).sum()) // block) * block for g in set(ids))
    assert lay.padded_k == expected
    for b in range(lay.padded_k // block):
        cols = perm[b * block:(b + 1) * block]
        members = cols[cols >= 0]
        assert members.numel() > 0  # a block is never all padding
        assert bool((ids_t[members] == lay.block_group[b]).all())  # one group per block
        assert cols[0] >= 0 and bool((torch.diff((cols < 0).int()) >= 0).all())  # pads only at a group's end
    assert lay.block_group.tolist() == sorted(lay.block_group.tolist())  # groups contiguous, in id order


def test_block_layout_rejects_bad_input():
    with pytest.raises(ValueError, match="block"):
        k8.block_layout(torch.tensor([0, 1]), 0)
    with pytest.raises(ValueError, match=">= 0"):
        k8.block_layout(torch.tensor([0, -1]), 4)


# ---- the integer math vs fake quantization ------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 70), n=st.integers(1, 24), sym=st.booleans(),
       per_row=st.booleans(), seed=st.integers(0, 2**16))
def test_rows_reference_equals_fake_quant_linear(m, k, n, sym, per_row, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3 + 0.5
    w, ws, wz, wq = _wq(n, k, g, sym)
    lo, hi = (x.amin(1), x.amax(1)) if per_row else (x.min().reshape(1), x.max().reshape(1))
    s, z = uniform_qparams(lo, hi, 8, symmetric=sym, include_zero=False)
    s_r, z_r = s.expand(m), z.expand(m)
    xh = fake_quant_uniform(x, s_r[:, None], z_r[:, None], 8, symmetric=sym)
    wh = fake_quant_uniform(w, ws[:, None], wz[:, None], 8, symmetric=sym)
    bias = torch.randn(n, generator=g)
    a, c = k8.quantize_act_reference(x, s_r[:, None], z_r[:, None], 8, sym)
    assert torch.equal((a.float() - c) * s_r[:, None], xh)  # the same codes as the fake quantizer
    assert torch.equal(wq.dequantize(), wh)
    xh, wh = (a.double() - c.double()) * s_r.double()[:, None], _wh64(wq)  # the same values in float64
    ref = F.linear(xh, wh, bias.double())
    y = k8.rows_gemm_reference(a, s_r, c.reshape(-1), wq, bias, out_dtype=torch.float64)
    assert _rel(y, ref, xh, wh) < 1e-9


def _grouped_input(m, k, groups, sym, seed):
    """A seeded ``(m, k)`` input with channel scales spread 0..4, scattered group ids and each group's 8-bit
    parameters from its range: ``(generator, x, ids, group_scale, group_zp)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(k, generator=g) * 4
    ids = torch.randint(0, groups, (k,), generator=g)
    lo = torch.stack([x[:, ids == i].min() if (ids == i).any() else torch.tensor(0.0) for i in range(groups)])
    hi = torch.stack([x[:, ids == i].max() if (ids == i).any() else torch.tensor(1.0) for i in range(groups)])
    gs, gz = uniform_qparams(lo, hi, 8, symmetric=sym, include_zero=False)
    return g, x, ids, gs, gz


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 30), k=st.integers(1, 80), n=st.integers(1, 20), groups=st.integers(1, 6),
       block=st.sampled_from([4, 16, 32]), sym=st.booleans(), seed=st.integers(0, 2**16))
def test_blocked_reference_equals_fake_quant_linear(m, k, n, groups, block, sym, seed):
    g, x, ids, gs, gz = _grouped_input(m, k, groups, sym, seed)
    w, ws, wz, wq = _wq(n, k, g, sym)
    xh = fake_quant_uniform(x, gs[ids][None, :], gz[ids][None, :], 8, symmetric=sym)
    wh = fake_quant_uniform(w, ws[:, None], wz[:, None], 8, symmetric=sym)
    a, c = k8.quantize_act_reference(x, gs[ids][None, :], gz[ids][None, :], 8, sym)
    assert torch.equal((a.float() - c) * gs[ids][None, :], xh) and torch.equal(wq.dequantize(), wh)
    xh, wh = (a.double() - c.double()) * gs[ids].double()[None, :], _wh64(wq)
    ref = F.linear(xh, wh)
    y = k8.blocked_gemm_reference(x, gs, gz, k8.block_layout(ids, block), wq, None, 8, sym, torch.float64)
    assert _rel(y, ref, xh, wh) < 1e-9


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 30), k=st.integers(1, 80), n=st.integers(1, 20), groups=st.integers(1, 6),
       block=st.sampled_from([4, 16, 32]), sym=st.booleans(), seed=st.integers(0, 2**16))
def test_channel_form_equals_the_block_by_block_reference(m, k, n, groups, block, sym, seed):
    """The CPU's execution of channel groups (one float64 GEMM in channel order) against the kernel's math (one
    exact integer GEMM per padded K-block, scaled per block): equal up to float64 rounding."""
    g, x, ids, gs, gz = _grouped_input(m, k, groups, sym, seed)
    _, _, _, wq = _wq(n, k, g, sym)
    bias = torch.randn(n, generator=g)
    blocked = k8.blocked_gemm_reference(x, gs, gz, k8.block_layout(ids, block), wq, bias, 8, sym, torch.float64)
    channel = k8.channel_gemm_reference(x, gs[ids], gz[ids], wq, bias, 8, sym, torch.float64)
    assert (channel - blocked).abs().max() <= 1e-12 * max(1.0, float(blocked.abs().max()))


def test_channel_form_names_a_wrong_parameter_length():
    _, _, _, wq = _wq(3, 5, torch.Generator().manual_seed(0), False)
    with pytest.raises(ValueError, match="one value per input channel"):
        k8.channel_gemm_reference(torch.randn(2, 5), torch.ones(4), torch.zeros(4), wq)

def _synthetic_layer(kind, c, n, sets, gen, sym, hw=(3, 3)):
    """A QuantLinear / 1x1 QuantConv2d with hand-made calibrated sets: ``sets`` is a list of ``"tensor"``,
    ``"pixel"`` or ``("channel", G)``; pixel sets have ``P`` positions (``hw`` for convs, 6 tokens for linears)."""
    from torch import nn

    from dgq_utils.model.layers import ActQuantizer, QuantConv2d, QuantLinear

    if kind == "linear":
        mod, layout, p = nn.Linear(c, n), "linear", 6
    else:
        mod, layout, p = nn.Conv2d(c, n, 1), "conv", hw[0] * hw[1]
    with torch.no_grad():
        mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen))
        mod.bias.copy_(torch.randn(n, generator=gen))
    act = ActQuantizer("syn.act", 8, symmetric=sym, layout=layout)
    for i, spec in enumerate(sets):
        lo = -torch.rand(1, generator=gen).item() * 4 - 0.1
        hi = torch.rand(1, generator=gen).item() * 4 + 0.1
        if spec == "tensor":
            s, z = uniform_qparams(torch.tensor(lo), torch.tensor(hi), 8, symmetric=sym)
            act.set_params(i, s, z)
            continue
        if spec == "pixel":
            los = lo * (0.2 + torch.rand(p, generator=gen))
            his = hi * (0.2 + torch.rand(p, generator=gen))
            s, z = uniform_qparams(los, his, 8, symmetric=sym, include_zero=False)
            shape = (1, p, 1) if kind == "linear" else (1, 1, *hw)
            act.set_params(i, s.reshape(shape), z.reshape(shape), {"axis": "pixel", "k": p, "n": p, "ids": None})
            continue
        g = spec[1]
        ids = torch.randint(0, g, (c,), generator=gen)  # scattered, uneven groups (like K-means)
        glo = lo * (0.2 + torch.rand(g, generator=gen))
        ghi = hi * (0.2 + torch.rand(g, generator=gen))
        gs, gz = uniform_qparams(glo, ghi, 8, symmetric=sym, include_zero=False)
        shape = (1, 1, c) if kind == "linear" else (1, c, 1, 1)
        act.set_params(i, gs[ids].reshape(shape), gz[ids].reshape(shape),
                       {"axis": "channel", "k": g, "n": c, "ids": ids})
    layer = QuantLinear(mod, "syn", act) if kind == "linear" else QuantConv2d(mod, "syn", act)
    w2 = mod.weight.detach().reshape(n, -1)
    ws, wz = uniform_qparams(w2.amin(1), w2.amax(1), 8, symmetric=sym)
    wshape = (n, 1) if kind == "linear" else (n, 1, 1, 1)
    layer.quantize_weight(scale=ws.reshape(wshape), zero_point=wz.reshape(wshape), bits=8, symmetric=sym)
    layer.set_mode("quant")
    return layer, p


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(["linear", "conv1x1"]), c=st.integers(1, 90), n=st.integers(1, 20),
       sets=st.lists(st.one_of(st.sampled_from(["tensor", "pixel"]), st.tuples(st.just("channel"),
                                                                                st.integers(1, 16))),
                     min_size=1, max_size=3),
       block=st.sampled_from([32, 48, 64]), sym=st.booleans(), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_eight_bit_layer_reference_equals_fake_quant_layer(kind, c, n, sets, block, sym, batch, seed):
    """The converted layer's CPU path (channel permutation + padding to the block, K-blocked accumulation,
    per-row / per-block scales with the zero-point corrections) against the fake-quant layer it replaces, for
    every timestep set: exact in float64 on the same codes, within float32 rounding of the layer itself."""
    from dgq_utils.model.int8_layers import EightBitLinear

    gen = torch.Generator().manual_seed(seed)
    layer, p = _synthetic_layer("linear" if kind == "linear" else "conv", c, n, sets, gen, sym)
    new = EightBitLinear(layer, block=block)
    state = layer.act.state
    for i in range(len(sets)):
        state.set_index = i
        x = torch.randn((batch, p, c) if kind == "linear" else (batch, c, 3, 3), generator=gen) * 3 + 0.2
        with torch.no_grad():
            ref, got = layer(x), new(x)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        # float64 F.linear of the fake-quantized activation and weight: the exact value of both paths
        xh = layer.act(x).double()
        wh = layer._weight().double().reshape(n, c)
        x2 = xh.reshape(-1, c) if kind == "linear" else xh.permute(0, 2, 3, 1).reshape(-1, c)
        exact = F.linear(x2, wh, layer.bias.detach().double())
        got2 = got.reshape(-1, n) if kind == "linear" else got.permute(0, 2, 3, 1).reshape(-1, n)
        ref2 = ref.reshape(-1, n) if kind == "linear" else ref.permute(0, 2, 3, 1).reshape(-1, n)
        scale = float((x2.abs() @ wh.abs().t()).max()) + float(layer.bias.detach().abs().max())
        assert float((got2.double() - exact).abs().max()) <= 1e-6 * scale, (i, sets[i])  # fp32 output rounding
        assert float((got2 - ref2).abs().max()) <= 1e-5 * scale, (i, sets[i])
        expect = "blocked" if isinstance(sets[i], tuple) and c > 1 else "rows"  # 1 channel: per tensor
        assert new.plans[i]["kind"] == expect
        if expect == "blocked":
            lay = new.plans[i]["layout"]
            ids = layer.act.info[i]["ids"]
            assert lay.padded_k == sum(-(-int((ids == g).sum()) // block) * block for g in ids.unique())


@settings(max_examples=15, deadline=None)
@given(sets=st.lists(st.one_of(st.sampled_from(["tensor", "pixel"]), st.tuples(st.just("channel"),
                                                                               st.integers(1, 8))),
                     min_size=1, max_size=2),
       c=st.integers(1, 12), n=st.integers(1, 10), k=st.sampled_from([1, 3]), sym=st.booleans(),
       seed=st.integers(0, 2**16))
def test_eight_bit_conv_storage_is_bit_identical_to_fake_quant_conv(sets, c, n, k, sym, seed):
    """k x k convs keep the fake-quant compute with the weight stored as int8 codes: the same outputs bit for bit."""
    from torch import nn

    from dgq_utils.model.int8_layers import EightBitConv2d
    from dgq_utils.model.layers import QuantConv2d

    gen = torch.Generator().manual_seed(seed)
    base, _ = _synthetic_layer("conv", c, n, sets, gen, sym, hw=(5, 5))
    conv = nn.Conv2d(c, n, k, padding=k // 2)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    layer = QuantConv2d(conv, "syn", base.act)
    ws, wz = uniform_qparams(conv.weight.detach().reshape(n, -1).amin(1), conv.weight.detach().reshape(n, -1).amax(1),
                             8, symmetric=sym)
    layer.quantize_weight(scale=ws.reshape(n, 1, 1, 1), zero_point=wz.reshape(n, 1, 1, 1), bits=8, symmetric=sym)
    layer.set_mode("quant")
    new = EightBitConv2d(layer)
    assert new.codes.dtype == torch.int8 and new.codes.numel() == conv.weight.numel()
    assert torch.equal(new.dequantized_weight(), layer._weight())
    for i in range(len(sets)):
        layer.act.state.set_index = i
        x = torch.randn(2, c, 5, 5, generator=gen) * 2
        with torch.no_grad():
            assert torch.equal(new(x), layer(x))


def test_int8_codes_refuse_wide_grids():
    with pytest.raises(ValueError, match="int8"):
        k8.code_offset(9, False)


# ---- the Triton kernels, interpreted on the CPU ---------------------------------------------------------------
_INTERPRETER_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.nn.functional as F
    from dgq_utils.core.quantizers import fake_quant_uniform, uniform_qparams
    from dgq_utils.kernels import int8_gemm as k8
    torch.manual_seed(0)
    out = []
    for (b, p, k, n, sym, transposed) in ((2, 24, 72, 40, False, False), (1, 33, 64, 16, True, True)):
        x = torch.randn(b, k, p).transpose(1, 2) if transposed else torch.randn(b, p, k)  # (B, P, K), any strides
        x = x * 2 + 0.3
        w = torch.randn(n, k)
        ws, wz = uniform_qparams(w.amin(1), w.amax(1), 8, symmetric=sym, include_zero=False)
        wq = k8.quantize_weight_int8(w, ws, wz, 8, sym)
        wh = wq.dequantize().double()
        bias = torch.randn(n)
        ps, pz = uniform_qparams(x.amin((0, 2)), x.amax((0, 2)), 8, symmetric=sym, include_zero=False)
        xh = fake_quant_uniform(x, ps.view(1, p, 1), pz.view(1, p, 1), 8, symmetric=sym).reshape(-1, k).double()
        ref = F.linear(xh, wh, bias.double())
        y = k8.int8_linear_triton(x, wq, bias, row_scale=ps, row_offset_zp=pz, symmetric=sym, config=(32, 32, 32, 4, 1))
        out.append({"path": "rows", "err": float((y.double() - ref).abs().max() / ref.abs().max())})
        y1 = k8.int8_linear_triton(x, wq, None, row_scale=ps[:1], row_offset_zp=pz[:1], symmetric=sym,
                                   config=(32, 32, 32, 4, 1))
        xt = fake_quant_uniform(x, ps[0], pz[0], 8, symmetric=sym).reshape(-1, k).double()
        ref1 = F.linear(xt, wh)
        out.append({"path": "tensor", "err": float((y1.double() - ref1).abs().max() / ref1.abs().max())})
        ids = torch.randint(0, 5, (k,))
        lo = torch.stack([x[..., ids == i].min() if (ids == i).any() else torch.tensor(0.) for i in range(5)])
        hi = torch.stack([x[..., ids == i].max() if (ids == i).any() else torch.tensor(1.) for i in range(5)])
        gs, gz = uniform_qparams(lo, hi, 8, symmetric=sym, include_zero=False)
        lay = k8.block_layout(ids, 32)
        y2 = k8.int8_linear_triton(x, wq, bias, layout=lay, block_scale=gs[lay.block_group],
                                   block_zp=gz[lay.block_group], symmetric=sym, config=(32, 32, 32, 4, 1))
        xg = fake_quant_uniform(x, gs[ids].view(1, 1, k), gz[ids].view(1, 1, k), 8, symmetric=sym)
        ref2 = F.linear(xg.reshape(-1, k).double(), wh, bias.double())
        out.append({"path": "blocked", "err": float((y2.double() - ref2).abs().max() / ref2.abs().max())})
    # the quantize kernel's codes equal the reference's bit for bit, at rounding ties and their neighbours too
    v = torch.tensor([0.49999997, 0.5, 1.5, 2.5, -0.5, -1.5, -0.49999997, -0.50000006, 126.5, 127.5, -127.5])
    v = torch.cat([v, torch.nextafter(v, torch.tensor(1e9)), torch.nextafter(v, torch.tensor(-1e9)),
                   torch.randn(64 * 64 - 33) * 60])
    for s0, z0, sym in ((1.0, 128.0, False), (0.037, 3.0, False), (0.5, 0.0, True)):
        x = (v * s0).reshape(1, 64, 64)
        a = torch.empty((64, 64), dtype=torch.int8)
        r = torch.empty(64)
        sv, zv = torch.full((1,), s0), torch.full((1,), z0)
        qmin, qmax = (-128, 127) if sym else (0, 255)
        k8._act_quant_kernel[(2,)](x, a, r, a, sv, zv, sv, zv, 64, 64, 1, 64, x.stride(0), x.stride(1), x.stride(2),
                                   float(qmin), float(qmax), 0.0 if sym else 128.0, HAS_PERM=False, ROW_PARAMS=True,
                                   ASYM=not sym, BM=32, BK=64)
        ra, _ = k8.quantize_act_reference(x.reshape(64, 64), sv, zv, 8, sym)
        out.append({"path": "codes", "err": float((a.int() - ra.int()).abs().max())})
    print(json.dumps(out))
""")


def test_int8_kernels_under_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert [r["path"] for r in rows] == ["rows", "tensor", "blocked"] * 2 + ["codes"] * 3
    assert all(r["err"] < 1e-5 for r in rows), rows


# ---- conversion of a calibrated tiny pipeline -----------------------------------------------------------------
@pytest.fixture(scope="module")
def calibrated_state(tiny_pipe, calib_prompts, tmp_path_factory):
    from dgq_utils.calibrate.trace import TRACE_SAMPLER
    from dgq_utils.quantize.pipeline import dequantize_pipeline, quantize_pipeline
    from dgq_utils.quantize.state import save_quant_state

    dequantize_pipeline(tiny_pipe)
    quantize_pipeline(tiny_pipe, "dgq-w8a8", calib_prompts, TRACE_SAMPLER.replace(num_inference_steps=STEPS),
                      progress=False)
    path = tmp_path_factory.mktemp("int8") / "dgq-w8a8.safetensors"
    save_quant_state(tiny_pipe, path)
    dequantize_pipeline(tiny_pipe)
    return path


def _fresh(path):
    from dgq_utils.quantize.state import load_quant_state
    from dgq_utils.testing.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0, scheduler="ddim")
    load_quant_state(pipe, path)
    return pipe


def test_layer_matches_fake_quant_layer(calibrated_state):
    """Every converted layer, on its own calibrated inputs' shapes: int8 output == fake-quant output (fp32)."""
    from dgq_utils.model.int8_layers import EightBitLinear
    from dgq_utils.quantize.int8 import fallback_reason
    from dgq_utils.quantize.pipeline import get_quant_state

    pipe = _fresh(calibrated_state)
    qs = get_quant_state(pipe)
    checked = {"rows": 0, "blocked": 0}
    g = torch.Generator().manual_seed(0)
    for name, layer in list(qs.layers.items())[:60]:
        if fallback_reason(layer, qs.recipe) is not None:
            continue
        new = EightBitLinear(layer)
        for i in sorted(new.plans):
            qs.state.set_index = i
            s, _ = layer.act.params[i]
            if new.kind == "conv1x1":
                hw = tuple(s.shape[2:]) if s.ndim == 4 and s.shape[2] * s.shape[3] > 1 else (3, 3)
                shape = (2, new.in_features, *hw)
            else:
                shape = (2, s.shape[1] if s.ndim == 3 and s.shape[1] > 1 else 5, new.in_features)
            x = torch.randn(*shape, generator=g) * 2
            with torch.no_grad():
                ref, got = layer(x), new(x)
            assert got.shape == ref.shape
            assert float((got - ref).abs().max()) <= 1e-5 * max(float(ref.abs().max()), 1.0), (name, i)
            checked[new.plans[i]["kind"]] += 1
    assert checked["rows"] > 0 and checked["blocked"] > 0, checked


def test_convert_drops_weight_bytes_and_matches_fake_quant_images(calibrated_state, caplog):
    import dgq_utils as dgq
    from dgq_utils.model.int8_layers import EightBitConv2d, EightBitLinear
    from dgq_utils.quantize.int8 import unet_weight_bytes
    from dgq_utils.quantize.pipeline import dequantize_pipeline, get_quant_state, set_quantization_enabled
    from dgq_utils.testing.tiny import build_tiny_pipeline

    fp16_bytes = unet_weight_bytes(build_tiny_pipeline(seed=0).unet) // 2  # the same UNet in fp16
    pipe = _fresh(calibrated_state)
    fq = generate(pipe)
    before = unet_weight_bytes(pipe.unet)
    with caplog.at_level(logging.WARNING, logger="dgq_utils.quantize.int8"):
        rep = dgq.convert_to_8bit(pipe, "int8")  # the public name
    assert isinstance(rep, dgq.EightBitReport)
    lines = [r.getMessage() for r in caplog.records if "convert_to_8bit" in r.getMessage()]
    assert len(lines) == 1 and "3x3 conv" in lines[0] and "attention" in lines[0]  # one line: what fell back
    assert rep.converted and rep.weights_only and rep.weight_bytes_before == before
    assert rep.plans["rows"] + rep.plans["blocked"] > 0 and rep.plans["k_inflation"] >= 1.0
    layers = get_quant_state(pipe).layers
    assert all(isinstance(layers[n], EightBitLinear) for n in rep.converted)
    assert all(isinstance(layers[n], EightBitConv2d) for n in rep.weights_only)
    assert not any(p.dtype.is_floating_point and p.numel() > 4096 for p in pipe.unet.parameters())  # no FP weights
    # weights in 8 bits: below 0.6x the fp16 UNet (the tiny UNet's unquantized norms / biases / conv_in / conv_out
    # are a larger share than at SD scale)
    assert rep.weight_bytes_after == unet_weight_bytes(pipe.unet) < 0.6 * fp16_bytes
    q8 = generate(pipe)
    assert psnr(q8, fq) > 30.0  # the same arithmetic; differences only from float rounding, amplified by steps
    assert torch.equal(generate(pipe), q8)  # deterministic
    for undo in (lambda: dequantize_pipeline(pipe), lambda: set_quantization_enabled(pipe, False)):
        with pytest.raises(RuntimeError, match="convert_to_8bit"):
            undo()
    assert torch.equal(generate(pipe), q8)  # the refusals changed nothing


def test_state_saved_from_a_converted_pipeline_loads_onto_a_fresh_one(calibrated_state, tmp_path):
    """The calibration parameters survive conversion: saved again, they give the original fake-quant images."""
    from dgq_utils.quantize.int8 import convert_to_8bit
    from dgq_utils.quantize.state import save_quant_state

    ref = generate(_fresh(calibrated_state))
    pipe = _fresh(calibrated_state)
    convert_to_8bit(pipe)
    save_quant_state(pipe, tmp_path / "again.safetensors")
    assert torch.equal(generate(_fresh(tmp_path / "again.safetensors")), ref)


def test_fp8_backend_close_to_fake_quant(calibrated_state):
    from dgq_utils.quantize.int8 import convert_to_8bit

    pipe = _fresh(calibrated_state)
    fq = generate(pipe)
    rep = convert_to_8bit(pipe, "fp8")
    assert rep.converted and rep.weight_bytes_after < rep.weight_bytes_before
    assert psnr(generate(pipe), fq) > 15.0  # an approximation of the 8-bit grid (e4m3: 3 mantissa bits)


def test_convert_rejects_bad_arguments(calibrated_state, pipe):
    from dgq_utils.quantize.int8 import convert_to_8bit

    with pytest.raises(RuntimeError, match="not quantized"):
        convert_to_8bit(pipe)
    q = _fresh(calibrated_state)
    with pytest.raises(ValueError, match="backend"):
        convert_to_8bit(q, "int4")
    with pytest.raises(ValueError, match="block"):
        convert_to_8bit(q, block=8)
    with pytest.raises(ValueError, match="conv_weights"):
        convert_to_8bit(q, conv_weights="yes")


def test_non_w8a8_recipe_falls_back_with_a_reason(pipe, calib_prompts):
    from dgq_utils.calibrate.trace import TRACE_SAMPLER
    from dgq_utils.quantize.int8 import convert_to_8bit
    from dgq_utils.quantize.pipeline import quantize_pipeline

    quantize_pipeline(pipe, "baseline-w8a6", calib_prompts[:1], TRACE_SAMPLER.replace(num_inference_steps=STEPS),
                      progress=False)
    rep = convert_to_8bit(pipe)
    assert not rep.converted and list(rep.fallback) == ["W8A6 (only W8A8 runs in 8 bits)"]


# ---- GPU ------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", [(16384, 320, 320), (4096, 640, 5120), (1024, 1280, 1280), (77 * 4, 768, 320)])
def test_gpu_kernels_match_reference(m, k, n):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(1)
    p = 64 if m % 64 == 0 else 77
    x = (torch.randn(m // p, p, k, generator=g) * 2).cuda().half()
    w = torch.randn(n, k, generator=g)
    ws, wz = uniform_qparams(w.amin(1), w.amax(1), 8, include_zero=False)
    wq = k8.quantize_weight_int8(w, ws, wz).to("cuda")
    bias = torch.randn(n, generator=g).cuda().half()
    xf = x.float().cpu()
    ps, pz = uniform_qparams(xf.amin((0, 2)), xf.amax((0, 2)), 8, include_zero=False)
    y = k8.int8_linear_triton(x, wq, bias, row_scale=ps.cuda(), row_offset_zp=pz.cuda())
    a, c = k8.quantize_act_reference(xf.reshape(-1, k), ps.repeat(m // p)[:, None], pz.repeat(m // p)[:, None])
    ref = k8.rows_gemm_reference(a, ps.repeat(m // p), c.reshape(-1), wq.to("cpu"), bias.float().cpu(),
                                 torch.float64)
    assert float((y.double().cpu() - ref).abs().max() / ref.abs().max()) < 2e-3  # fp16 output rounding
    ids = torch.randint(0, 16, (k,), generator=g)
    lo = torch.stack([xf[..., ids == i].min() if (ids == i).any() else torch.tensor(0.) for i in range(16)])
    hi = torch.stack([xf[..., ids == i].max() if (ids == i).any() else torch.tensor(1.) for i in range(16)])
    gs, gz = uniform_qparams(lo, hi, 8, include_zero=False)
    lay = k8.block_layout(ids, 32)
    y2 = k8.int8_linear_triton(x, wq, bias, layout=lay.to("cuda"), block_scale=gs[lay.block_group].cuda(),
                               block_zp=gz[lay.block_group].cuda())
    ref2 = k8.blocked_gemm_reference(xf.reshape(-1, k), gs, gz, lay, wq.to("cpu"), bias.float().cpu(),
                                     out_dtype=torch.float64)
    assert float((y2.double().cpu() - ref2).abs().max() / ref2.abs().max()) < 2e-3


@pytest.mark.gpu
def test_gpu_converted_tiny_pipeline_matches_fake_quant(calibrated_state):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from dgq_utils.quantize.int8 import convert_to_8bit

    pipe = _fresh(calibrated_state)
    pipe.to("cuda")
    fq = generate(pipe)
    for backend, floor in (("int8", 25.0), ("fp8", 12.0)):
        q = _fresh(calibrated_state)
        q.to("cuda")
        convert_to_8bit(q, backend)
        assert psnr(generate(q).cpu(), fq.cpu()) > floor, backend


@pytest.mark.gpu
def test_gpu_converted_unet_call_captures_in_a_cuda_graph(calibrated_state):
    """The int8 path launches no host-to-device copy and no sync once warm: one UNet call of a converted tiny
    pipeline captures in a CUDA graph and its replay equals the eager call (the benchmark's cudagraph rows)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from dgq_utils.quantize.int8 import convert_to_8bit
    from dgq_utils.quantize.pipeline import get_quant_state

    pipe = _fresh(calibrated_state)
    pipe.to("cuda")
    convert_to_8bit(pipe, "int8")
    qs = get_quant_state(pipe)
    unet = pipe.unet
    pipe.scheduler.set_timesteps(STEPS, device="cuda")
    ts = pipe.scheduler.timesteps
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, generator=g).cuda()
    cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).cuda()
    with torch.no_grad():
        for i in range(STEPS):  # warm every set
            qs.state.call_index = i - 1
            unet(lat, ts[i], encoder_hidden_states=cond)
        qs.state.call_index = 0
        eager = unet(lat, ts[1], encoder_hidden_states=cond).sample.clone()
        graph = torch.cuda.CUDAGraph()
        qs.state.call_index = 0
        with torch.cuda.graph(graph):
            out = unet(lat, ts[1], encoder_hidden_states=cond).sample
        qs.state.set_index = 1
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
