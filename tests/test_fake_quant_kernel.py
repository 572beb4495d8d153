"""The fused activation fake-quant (dgq_utils.kernels.fake_quant) against the reference quantizer.

CPU (always): the stacked two-vector parameter form gives bit-identical results to the set's own parameters
through the PyTorch path (what ``torch.compile`` traces). GPU (``-m gpu``): the Triton kernel is bit-identical to
``core.quantizers.fake_quant_uniform`` for every layout, axis, dtype, set and grid.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

from dgq_utils.core.quantizers import fake_quant_uniform, uniform_qparams
from dgq_utils.core.stats import axes_for
from dgq_utils.kernels.fake_quant import (
    ParamStack,
    available,
    fake_quant_stacked_op,
    fake_quant_stacked_reference,
    fake_quant_uniform_fused,
)

LAYOUT_SHAPES = {"linear": (2, 6, 5), "linear2d": (3, 7), "conv": (2, 3, 4, 5), "unfold": (2, 6, 7),
                 "qkv": (2, 3, 6, 4)}


def _sets(shape, layout, kinds, bits, symmetric, seed):
    """Parameter sets (broadcast-shaped) of the given kinds ('tensor', 'channel', 'pixel') for an input shape."""
    g = torch.Generator().manual_seed(seed)
    lay = "linear" if layout == "linear2d" else layout
    ch, px = axes_for(torch.empty(shape, device="meta"), lay)
    sets = {}
    for i, kind in enumerate(kinds):
        if kind == "pixel" and px is None:
            kind = "channel"
        view = [1] * len(shape)
        if kind == "channel":
            view[ch] = shape[ch]
        elif kind == "pixel":
            for d in (px,) if isinstance(px, int) else px:
                view[d] = shape[d]
        lo = -torch.rand(view, generator=g) * 3
        hi = torch.rand(view, generator=g) * 3
        if kind == "tensor":
            lo, hi = lo.reshape(()), hi.reshape(())
        sets[i] = uniform_qparams(lo, hi, bits, symmetric=symmetric, include_zero=False)
    pdims = () if px is None else ((px,) if isinstance(px, int) else tuple(px))
    return sets, ch, pdims, lay


def _input(shape, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.5
    x.view(-1)[:: 7] = 0.0  # exact zeros and ties
    x.view(-1)[1:: 11] = 0.5
    return x.to(device, dtype)


@settings(max_examples=40, deadline=None)
@given(layout=hs.sampled_from(sorted(LAYOUT_SHAPES)),
       kinds=hs.lists(hs.sampled_from(["tensor", "channel", "pixel"]), min_size=1, max_size=4),
       bits=hs.sampled_from([4, 6, 8]), symmetric=hs.booleans(), seed=hs.integers(0, 10_000))
def test_stacked_form_equals_each_set(layout, kinds, bits, symmetric, seed):
    shape = LAYOUT_SHAPES[layout]
    sets, ch, pdims, _ = _sets(shape, layout, kinds, bits, symmetric, seed)
    st = ParamStack.from_sets(sets, ch if any(s.ndim for s, _ in sets.values()) else 0, pdims)
    x = _input(shape, seed)
    assert st.fits(x)
    for i, (s, z) in sets.items():
        ref = fake_quant_uniform(x, s, z, bits, symmetric=symmetric)
        got = fake_quant_stacked_reference(x, st, torch.tensor(i, dtype=torch.int32), bits, symmetric)
        assert torch.equal(got, ref), (layout, kinds, i)


def test_stack_rejects_mismatched_input():
    sets, ch, pdims, _ = _sets((2, 6, 5), "linear", ["pixel"], 8, False, 0)
    st = ParamStack.from_sets(sets, ch, pdims)
    assert st.fits(torch.zeros(4, 6, 5)) and not st.fits(torch.zeros(2, 7, 5))
    with pytest.raises(ValueError, match="neither along channel"):
        ParamStack.from_sets({0: (torch.ones(1, 3, 3), torch.zeros(1, 3, 3))}, 2, (1,))


def test_cpu_tensor_is_refused_by_the_kernel():
    sets, ch, pdims, _ = _sets((2, 6, 5), "linear", ["channel"], 8, False, 0)
    st = ParamStack.from_sets(sets, ch, pdims)
    x = torch.zeros(2, 6, 5)
    assert not available(x)
    with pytest.raises(RuntimeError, match="CUDA"):
        fake_quant_uniform_fused(x, st, torch.tensor(0), 8)


@pytest.mark.parametrize("layout", ["conv", "qkv"])
def test_registered_op_equals_the_reference_and_compiles_without_breaks(layout):
    """torch.ops.dgq.fake_quant_stacked (what compiled graphs call on CUDA; the reference off CUDA) gives the
    reference's result, keeps a dense input's strides and traces with fullgraph=True (aot_eager, CPU)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    shape = LAYOUT_SHAPES[layout]
    sets, ch, pdims, _ = _sets(shape, layout, ["pixel", "channel", "tensor"], 8, False, 2)
    st = ParamStack.from_sets(sets, ch, pdims)
    x = _input(shape, 2)
    if layout == "qkv":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)  # a transposed view, as Q/K/V arrive
    idx = torch.tensor(1, dtype=torch.int32)
    ref = fake_quant_stacked_reference(x, st, idx, 8, False)
    got = fake_quant_stacked_op(x, st, idx, 8, False)
    assert torch.equal(got, ref) and got.stride() == x.stride()
    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(lambda t: fake_quant_stacked_op(t, st, idx, 8, False) * 2, backend="aot_eager",
                       fullgraph=True)
    for i in range(3):
        idx.fill_(i)
        assert torch.equal(fn(x), fake_quant_stacked_reference(x, st, idx, 8, False) * 2)
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_registered_op_under_inductor_is_the_eager_kernel():
    import torch._dynamo

    sets, ch, pdims, _ = _sets((4, 30, 20, 25), "conv", ["pixel", "channel"], 8, False, 5)
    st = ParamStack.from_sets(sets, ch, pdims).to("cuda")
    x = _input((4, 30, 20, 25), 5, torch.float16, "cuda")
    idx = torch.tensor(0, dtype=torch.int32, device="cuda")
    torch._dynamo.reset()
    fn = torch.compile(lambda t: fake_quant_stacked_op(t, st, idx, 8, False) + 1, fullgraph=True)
    for i in (0, 1, 0):
        idx.fill_(i)
        assert torch.equal(fn(x), fake_quant_uniform_fused(x, st, idx, 8) + 1)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", sorted(LAYOUT_SHAPES))
@pytest.mark.parametrize("symmetric", [False, True])
def test_kernel_bit_identical_to_reference(dtype, layout, symmetric):
    shape = LAYOUT_SHAPES[layout]
    shape = tuple(s * 5 if i > 0 else s for i, s in enumerate(shape))  # a few blocks
    for bits in (4, 6, 8):
        sets, ch, pdims, _ = _sets(shape, layout, ["tensor", "channel", "pixel", "channel"], bits, symmetric,
                                   bits)
        st = ParamStack.from_sets(sets, ch, pdims).to("cuda")
        x = _input(shape, bits, dtype, "cuda")
        for i, (s, z) in sets.items():
            ref = fake_quant_uniform(x, s.cuda(), z.cuda(), bits, symmetric=symmetric)
            idx = torch.tensor(i, dtype=torch.int32, device="cuda")
            got = fake_quant_uniform_fused(x, st, idx, bits, symmetric=symmetric)
            assert got.dtype == dtype and got.shape == x.shape
            assert torch.equal(got, ref), (layout, dtype, bits, i, (got != ref).sum().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_on_transposed_qkv_view_and_weights():
    # Q/K/V arrive as (B, h, N, d) views of (B, N, h, d): the kernel walks memory order
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 33, 4, 8, generator=g).cuda().half()
    x = base.transpose(1, 2)
    sets, ch, pdims, _ = _sets(tuple(x.shape), "qkv", ["pixel", "channel"], 8, False, 1)
    st = ParamStack.from_sets(sets, ch, pdims).to("cuda")
    for i, (s, z) in sets.items():
        ref = fake_quant_uniform(x, s.cuda(), z.cuda(), 8)
        got = fake_quant_uniform_fused(x, st, torch.tensor(i, device="cuda"), 8)
        assert torch.equal(got, ref)
    # per-output-channel weights: channel dim 0
    w = torch.randn(64, 32, 3, 3, generator=g).cuda().half()
    lo = w.float().amin(dim=(1, 2, 3), keepdim=True)
    hi = w.float().amax(dim=(1, 2, 3), keepdim=True)
    s, z = uniform_qparams(lo, hi, 8)
    st = ParamStack.from_sets({0: (s, z)}, 0, ())
    got = fake_quant_uniform_fused(w, st, torch.zeros((), dtype=torch.int32, device="cuda"), 8)
    assert torch.equal(got, fake_quant_uniform(w, s, z, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_reads_the_set_on_the_device_without_sync():
    sets, ch, pdims, _ = _sets((4, 64, 32), "linear", ["channel", "pixel", "tensor"], 8, False, 2)
    st = ParamStack.from_sets(sets, ch, pdims).to("cuda")
    x = _input((4, 64, 32), 0, torch.float16, "cuda")
    idx = torch.zeros((), dtype=torch.int32, device="cuda")
    outs = []
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside raises
    try:
        for i in range(3):
            idx.fill_(i)
            outs.append(fake_quant_uniform_fused(x, st, idx, 8))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for i, (s, z) in sets.items():
        assert torch.equal(outs[i], fake_quant_uniform(x, s.cuda(), z.cuda(), 8))


# ----------------------------------------------------------------------------------------------------------
# the deferred statistics of the GPU path (forced on the CPU: the same arithmetic as the immediate path)
# ----------------------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(layout=hs.sampled_from(["linear", "conv", "qkv"]), calls=hs.integers(1, 4),
       dtype=hs.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=hs.integers(0, 1000))
def test_deferred_statistics_equal_the_immediate_ones(layout, calls, dtype, seed):
    from dgq_utils.core.stats import TensorStats, stats_to_host

    shape = {"linear": (2, 6, 5), "conv": (2, 3, 4, 5), "qkv": (2, 3, 6, 4)}[layout]
    now, later = TensorStats(), TensorStats(deferred=True)
    for c in range(calls):
        x = _input(shape, seed + c, dtype)
        now.update(x, layout, ema_momentum=0.9)
        later.update(x, layout, ema_momentum=0.9)
    assert later.is_pending
    stats_to_host([later])
    assert not later.is_pending
    assert (later.min, later.max, later.ema_min, later.ema_max, later.calls) == \
        (now.min, now.max, now.ema_min, now.ema_max, now.calls)
    for ax in ("channel", "pixel"):
        a, b = now.axis(ax), later.axis(ax)
        assert torch.equal(a.mins, b.mins) and torch.equal(a.maxs, b.maxs) and a.count == b.count
        assert b.mins.dtype == torch.float32


def test_deferred_nan_check_names_the_first_bad_input():
    from dgq_utils.core.stats import TensorStats, check_finite

    first, second = TensorStats(deferred=True), TensorStats(deferred=True)
    x = torch.randn(2, 8, 6)
    second.update(x, "linear", where="second")
    first.update(x, "linear", where="first")
    y = x.clone()
    y[0, 0, 0] = float("inf")
    first.update(y, "linear", where="first (t=5)")  # observed before the next one
    second.update(y * float("nan"), "linear", where="second")
    with pytest.raises(FloatingPointError, match=r"at first \(t=5\)"):
        check_finite([second, first])
    lazy = TensorStats(deferred=True)
    lazy.update(x, "linear")
    assert lazy.max == float(x.max()) and not lazy.is_pending  # reading a value finishes the object
