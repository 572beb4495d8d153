"""Fused quantized attention (dgq_utils.kernels) against the materialising reference.

CPU tests (default): the scale formula from row statistics vs the max of the materialised probabilities
(hypothesis), the kernel spec, the processor's dispatch and fallbacks, and -- in a subprocess under Triton's
interpreter -- the kernel itself on tiny shapes.

GPU tests (``-m gpu``): the kernel and the processor's fused path vs the reference at SD v1.5 attention shapes,
every option of the recipe, fp16 / bf16 / fp32. Tolerances (stated once, here):

* level flips -- the fraction of quantized probabilities that land on a different level than the reference's
  (a probability within float32 rounding of a level boundary can go either way, the kernel's float order
  differs): at most ``FLIP_TOL`` = 1e-4 per case (expected ~1e-6; each flip moves that probability by one level);
* arithmetic -- relative L2 error of the output vs the float64 product of the *kernel's own* quantized
  probabilities with V, at most ``OUT_TOL[dtype]``: fp32 1e-5 (3xTF32 products), fp16 2e-3, bf16 1.6e-2 (about
  2x the dtype's epsilon, which the output store alone costs);
* output vs the reference's levels (the same product with the reference's quantized probabilities) is
  recorded, and bounded by ``FLIPPED_OUT_TOL`` = 2e-2: a single flipped *large* probability moves its whole
  output row (measured on the H200: up to 5e-3 rel L2 over a (2, 8, 1024, d) output with fp32 inputs, where the
  3xTF32 logits flip more than exact fp16 products do). The processor-level comparison (fused vs today's
  reference processor, whose fp16 path rounds ``levels @ V``, the scale and the ``<start>`` term separately, flips
  included) uses ``2 * OUT_TOL``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dgq_utils.core.quantizers import SCALE_FLOOR
from dgq_utils.kernels import ProbQuantSpec, prob_multiplier, unsupported_reason
from dgq_utils.kernels.reference import (probabilities_reference, quant_attention_reference,
                                         quantize_probs_reference, row_statistics_reference)
from dgq_utils.model.attention import BACKEND_ENV, DGQAttnProcessor, ProbQuantizer

FLIP_TOL = 1e-4
OUT_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FLIPPED_OUT_TOL = 2e-2
REPO = Path(__file__).resolve().parents[1]


def _qkv(b, h, nq, nk, d, dtype=torch.float32, device="cpu", seed=0, sink=0.0):
    """Random (B, h, N, d) Q/K/V in the processor's layout (a transposed view of (B, N, h, d))."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, nq, h, d, generator=g, device=device).transpose(1, 2)
    k = torch.randn(b, nk, h, d, generator=g, device=device).transpose(1, 2) * 1.5
    v = torch.randn(b, nk, h, d, generator=g, device=device).transpose(1, 2)
    if sink:
        k[:, :, 0] += sink * q.mean(dim=2)  # key 0 aligned with the queries: a <start>-like sink
    return q.to(dtype), k.to(dtype), v.to(dtype)


def level_flip_fraction(p_kernel: torch.Tensor, p_ref: torch.Tensor) -> float:
    """Fraction of quantized probabilities on a different level (a flip changes a log2 level by 2x and a uniform
    code by at least 1/(2^b-1) relative; both scales agree to ~1e-6 relative, so 1e-4 separates the two)."""
    diff = (p_kernel - p_ref).abs() > 1e-4 * torch.maximum(p_kernel.abs(), p_ref.abs())
    return diff.float().mean().item()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------------------------------------------
# CPU: the math outside the kernel
# ---------------------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), nq=st.integers(1, 9), nk=st.integers(1, 12),
       keep_start=st.booleans(), scale=st.sampled_from(["per_prompt", "batch", "static"]),
       quantizer=st.sampled_from(["log2", "uniform"]), bits=st.sampled_from([4, 6, 8]),
       spread=st.floats(0.1, 8.0), seed=st.integers(0, 2**16))
def test_scale_from_row_statistics_equals_materialised_max(b, h, nq, nk, keep_start, scale, quantizer, bits,
                                                           spread, seed):
    """prob_multiplier(row maxima) == what ProbQuantizer uses on the materialised probabilities (scale or step)."""
    q, k, _ = _qkv(b, h, nq, nk, 8, seed=seed)
    k = k * spread
    probs = probabilities_reference(q, k, 8**-0.5)
    spec = ProbQuantSpec(quantizer, bits, scale, keep_start)
    pq = ProbQuantizer("p", bits, quantizer=quantizer, scale=scale, keep_start=keep_start)
    pq.static = {0: torch.tensor(0.37)}
    expected = pq.max_of(probs).float().reshape(-1).expand(b) if scale != "per_prompt" else \
        pq.max_of(probs).reshape(b)
    if quantizer == "uniform":
        expected = (expected / (2**bits - 1)).clamp_min(SCALE_FLOOR)
    _, _, pmax = row_statistics_reference(q, k, 8**-0.5, keep_start and nk > 1)
    got = prob_multiplier(pmax, spec, pq.static[0] if scale == "static" else None)
    assert got.shape == (b,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=0)


def test_row_statistics_reference_reconstructs_softmax():
    q, k, _ = _qkv(2, 3, 5, 7, 8, seed=1)
    m, l_, pmax = row_statistics_reference(q, k, 0.3, exclude_first=True)
    t = torch.matmul(q * 0.3, k.transpose(-1, -2)) * math.log2(math.e)
    probs = torch.exp2(t - m[..., None]) / l_[..., None]
    torch.testing.assert_close(probs, probabilities_reference(q, k, 0.3), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pmax, probs[..., 1:].amax(-1), rtol=1e-6, atol=0)


def test_prob_multiplier_static_needs_a_value_and_none_gives_ones():
    pmax = torch.rand(2, 3, 4)
    with pytest.raises(ValueError, match="static_max"):
        prob_multiplier(pmax, ProbQuantSpec("log2", 8, "static"))
    assert torch.equal(prob_multiplier(pmax, ProbQuantSpec(None, 8)), torch.ones(2))
    # a zero scale floors the uniform step (as the reference) instead of dividing by zero
    assert prob_multiplier(torch.zeros(2, 1, 1), ProbQuantSpec("uniform", 8)).min() == SCALE_FLOOR


def test_spec_rejects_bad_options():
    with pytest.raises(ValueError, match="quantizer"):
        ProbQuantSpec("log3")
    with pytest.raises(ValueError, match="scale"):
        ProbQuantSpec("log2", 8, "per_head")
    with pytest.raises(ValueError, match="bits"):
        ProbQuantSpec("log2", 1)


@pytest.mark.parametrize("quantizer,scale,keep_start,zero_level", [
    ("log2", "per_prompt", True, True), ("uniform", "batch", False, True), ("log2", "static", True, False)])
def test_kernel_spec_mirrors_the_quantizer(quantizer, scale, keep_start, zero_level):
    pq = ProbQuantizer("p", 6, quantizer=quantizer, scale=scale, keep_start=keep_start, zero_level=zero_level)
    assert pq.kernel_spec() == ProbQuantSpec(quantizer, 6, scale, keep_start, zero_level)


@pytest.mark.parametrize("quantizer,scale,keep_start,zero_level", [
    ("log2", "per_prompt", True, True), ("log2", "batch", False, False), ("uniform", "static", True, True)])
def test_reference_math_equals_the_processor_reference(quantizer, scale, keep_start, zero_level):
    """kernels.reference (the interpreter test's oracle) quantizes exactly like ProbQuantizer.quantize."""
    q, k, _ = _qkv(2, 2, 6, 9, 8, seed=3, sink=2.0)
    probs = probabilities_reference(q, k, 0.35)
    pq = ProbQuantizer("p", 6, quantizer=quantizer, scale=scale, keep_start=keep_start, zero_level=zero_level)
    pq.static = {0: torch.tensor(0.2)}
    pq.mode = "quant"
    spec = pq.kernel_spec()
    assert torch.equal(quantize_probs_reference(probs, spec, pq.static[0]), pq.quantize(probs))


def test_unsupported_reasons(monkeypatch):
    q, k, v = _qkv(1, 2, 4, 5, 8)
    assert "cuda" in unsupported_reason(q, k, v).lower()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the device check passes; nothing is launched here
    assert unsupported_reason(q, k, v) is None
    assert "mask" in unsupported_reason(q, k, v, torch.zeros(1, 2, 4, 5))
    assert "dtype" in unsupported_reason(q.double(), k.double(), v.double())
    assert "mixed" in unsupported_reason(q.half(), k, v)
    big = torch.zeros(1, 2, 4, 300)
    assert "head dim" in unsupported_reason(big, big, big)
    assert "head dims differ" in unsupported_reason(q, k, v[..., :4])


def _processor(attn_kind="cross", backend="auto", **pq_kw):
    pq = ProbQuantizer("p", 6, **pq_kw)
    pq.mode = "quant"
    return DGQAttnProcessor("blk.attn2", attn_kind, None, prob_quant=pq, key_start_fp=True, backend=backend)


def test_processor_dispatch_reasons(monkeypatch):
    q, k, v = _qkv(1, 2, 4, 5, 8)
    proc = _processor()
    assert proc.fused_unavailable(q, k, v, None) == "not on CUDA"  # CPU, auto: today's path, unchanged
    proc.backend = "fused"
    assert "cuda" in proc.fused_unavailable(q, k, v, None).lower()  # no interpreter: the kernel cannot run
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert proc.fused_unavailable(q, k, v, None) is None
    assert "mask" in proc.fused_unavailable(q, k, v, torch.zeros(1, 2, 4, 5))
    for mode in ("observe", "observe_quant", "init", "off"):  # calibration modes: the max from row statistics
        proc.prob_quant.mode = mode
        assert proc.fused_unavailable(q, k, v, None) is None
    proc.prob_quant.mode = "quant"
    proc.record_attention = True
    assert "recording" in proc.fused_unavailable(q, k, v, None)
    proc.record_attention = False
    qg = q.clone().requires_grad_(True)
    assert "autograd" in proc.fused_unavailable(qg, k, v, None)
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert "reference" in proc.fused_unavailable(q, k, v, None)
    monkeypatch.setenv(BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        proc.fused_unavailable(q, k, v, None)
    with pytest.raises(ValueError, match="backend"):
        DGQAttnProcessor("a", "self", None, backend="triton")


def test_cpu_path_is_the_reference():
    """On the CPU the default processor takes today's path: bit-identical to backend='reference'."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8).eval()
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    outs = []
    for backend in ("auto", "reference"):
        pq = ProbQuantizer("p", 6, keep_start=True)
        pq.mode = "quant"
        proc = DGQAttnProcessor("a", "cross", AttnProcessor2_0(), prob_quant=pq, backend=backend)
        with torch.no_grad():
            outs.append(proc(attn, x, ctx))
        assert proc.last_path == "reference"
    assert torch.equal(outs[0], outs[1])


_INTERPRETER_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    sys.path.insert(0, sys.argv[1])
    from dgq_utils.kernels import ProbQuantSpec, quant_attention, row_statistics
    from dgq_utils.kernels.reference import (probabilities_reference, quantize_probs_reference,
                                             row_statistics_reference)
    from test_kernels_attention import _qkv, level_flip_fraction, rel_l2
    torch.manual_seed(0)
    cases = [  # (quantizer, scale, keep_start, zero_level, bits, nk, dtype); nk 32/64: no key masks (EVEN_N)
        ("log2", "per_prompt", True, True, 6, 19, torch.float32),
        ("log2", "batch", False, False, 4, 32, torch.float32),
        ("uniform", "per_prompt", True, True, 8, 64, torch.float32),
        ("log2", "static", False, True, 8, 21, torch.float16),
        ("uniform", "static", True, True, 6, 64, torch.float16),
        (None, "per_prompt", False, True, 8, 21, torch.float32),
    ]
    out = []
    for quantizer, scale, keep_start, zero_level, bits, nk, dtype in cases:
        q, k, v = _qkv(2, 2, 17, nk, 24, dtype=dtype, sink=2.0)
        spec = ProbQuantSpec(quantizer, bits, scale, keep_start, zero_level)
        o, p = quant_attention(q, k, v, 24 ** -0.5, spec, 0.3, return_probs=True)
        rp = quantize_probs_reference(probabilities_reference(q, k, 24 ** -0.5), spec, 0.3)
        m, l_, pm = row_statistics(q, k, 24 ** -0.5, keep_start)
        mr, lr, pr = row_statistics_reference(q, k, 24 ** -0.5, keep_start)
        out.append(dict(case=str((quantizer, scale, keep_start, zero_level, bits, nk, str(dtype))),
                        flips=level_flip_fraction(p, rp), out_err=rel_l2(o, p.double() @ v.double()),
                        layout=list(o.stride()), pmax_err=rel_l2(pm, pr), m_err=(m - mr).abs().max().item()))
    print(json.dumps(out))
""")


def test_kernel_under_triton_interpreter():
    """The Triton kernels themselves, on the CPU (interpreter, tiny shapes) vs the materialising reference."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT, str(REPO / "tests")], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(rows) == 6
    for r in rows:
        tol = OUT_TOL[torch.float16] if "float16" in r["case"] else OUT_TOL[torch.float32]
        assert r["flips"] <= FLIP_TOL and r["out_err"] <= tol and r["pmax_err"] < 1e-5 and r["m_err"] < 1e-4, r
        # output laid out as (B, Nq, heads, d): strides of a transposed contiguous tensor
        assert r["layout"] == [17 * 2 * 24, 24, 2 * 24, 1], r


_INTERPRETER_PROCESSOR_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from diffusers.models.attention_processor import Attention
    from dgq_utils.model.attention import DGQAttnProcessor, ProbQuantizer
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16).eval()
    x, ctx = torch.randn(2, 20, 32), torch.randn(2, 9, 24)
    out = []
    for scale, modes in (("static", ["init", "init", "quant"]), ("static", ["observe", "init", "observe_quant"]),
                         ("per_prompt", ["observe", "observe_quant"])):
        res = {}
        for backend in ("reference", "fused"):
            pq = ProbQuantizer("p", 6, scale=scale, keep_start=True)
            proc = DGQAttnProcessor("a", "cross", None, prob_quant=pq, key_start_fp=True, backend=backend)
            outs, paths = [], []
            for mode in modes:
                pq.mode = mode
                with torch.no_grad():
                    outs.append(proc(attn, x * (1 + len(outs)), ctx))
                paths.append(proc.last_path)
            res[backend] = (outs, paths, {i: float(v) for i, v in pq.static.items()},
                            {i: float(v) for i, v in pq.observed_max.items()})
        (ro, rp, rs, rm), (fo, fp, fs, fm) = res["reference"], res["fused"]
        out.append(dict(scale=scale, paths=fp, ref_paths=rp,
                        out_err=max(float((a - b).norm() / b.norm()) for a, b in zip(fo, ro)),
                        static=[fs, rs], observed=[{str(k): v for k, v in fm.items()},
                                                    {str(k): v for k, v in rm.items()}]))
    print(json.dumps(out))
""")


def test_processor_calibration_modes_under_triton_interpreter():
    """The fused path's observe / observe_quant / init modes record the same maxima as the reference and give
    the same outputs (CPU, Triton interpreter, float32)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", _INTERPRETER_PROCESSOR_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    static, observe, dynamic = json.loads(res.stdout.strip().splitlines()[-1])
    assert static["paths"] == ["fused"] * 3 and static["ref_paths"] == ["reference"] * 3
    fs, rs = static["static"]
    assert list(fs) == list(rs) == ["0"] and fs["0"] == pytest.approx(rs["0"], rel=1e-5)  # set by the first call
    assert observe["paths"] == ["sdpa", "fused", "fused"]
    fm, rm = observe["observed"]  # the max over the observe and observe_quant calls
    assert list(fm) == list(rm) == ["0"] and fm["0"] == pytest.approx(rm["0"], rel=1e-5)
    # a per-prompt scale records no maximum (nothing uses it): observing is plain SDPA, no row statistics
    assert dynamic["paths"] == ["sdpa", "fused"] and dynamic["observed"] == [{}, {}]
    for r in (static, observe, dynamic):
        assert r["out_err"] < 1e-5, r


_INTERPRETER_COMPILE_SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from diffusers.models.attention_processor import Attention
    from dgq_utils.model.attention import DGQAttnProcessor, ProbQuantizer
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16).eval()
    x, ctx = torch.randn(2, 20, 32), torch.randn(2, 9, 24)
    pq = ProbQuantizer("p", 6, scale="static", keep_start=True)
    pq.mode, pq.static = "quant", {0: torch.tensor(0.3)}
    proc = DGQAttnProcessor("a", "cross", None, prob_quant=pq, key_start_fp=True, backend="fused")
    f = lambda x, ctx: proc(attn, x, ctx)
    with torch.no_grad():
        eager = f(x, ctx)
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x, ctx)  # fullgraph: a break raises
    assert proc.last_path == "fused", proc.last_path
    assert torch.equal(compiled, eager), (compiled - eager).abs().max()
    print("ok")
""")


@pytest.mark.slow  # ~10 s (dynamo + AOT tracing, Triton interpreter)
def test_fused_processor_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) traces the fused processor: the kernel is the registered op
    dgq::quant_attention (opaque, with a fake implementation); CPU, Triton interpreter, aot_eager backend."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", _INTERPRETER_COMPILE_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# SD v1.5 attention shapes (latent 64x64 -> 8x8; 8 heads; head dim 40/80/160) plus head dim 64; batch 2
SD_SHAPES = [  # (nq, nk_self, d)
    (4096, 4096, 40), (1024, 1024, 80), (256, 256, 160), (64, 64, 160), (1024, 1024, 64)]
GPU_CASES = [  # (quantizer, scale, keep_start, zero_level, bits)
    ("log2", "per_prompt", True, True, 8), ("log2", "per_prompt", False, True, 6), ("log2", "batch", True, False, 6),
    ("log2", "static", True, True, 4), ("uniform", "batch", False, True, 8), ("uniform", "per_prompt", True, True, 6),
    ("uniform", "static", False, True, 8), (None, "per_prompt", False, True, 8)]
GPU_RESULTS: list[dict] = []  # written to $DGQ_GPU_TEST_OUT (json) at the end, for the committed record


@pytest.fixture(scope="module", autouse=True)
def _dump_gpu_results():
    yield
    path = os.environ.get("DGQ_GPU_TEST_OUT")
    if path and GPU_RESULTS:
        Path(path).write_text(json.dumps(GPU_RESULTS, indent=1))


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SD_SHAPES, ids=lambda s: f"nq{s[0]}-d{s[2]}")
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_gpu_kernel_matches_reference(shape, cross, dtype):
    from dgq_utils.kernels import quant_attention

    nq, nk, d = shape
    if cross:
        nk = 77
    if dtype == torch.float32 and nq > 1024:
        nq = 1024  # the reference's fp32 N x N tensor and the IEEE-fp32 kernel are slow; smaller is enough
    q, k, v = _qkv(2, 8, nq, nk, d, dtype=dtype, device="cuda", seed=nq + d, sink=3.0 if cross else 0.0)
    scale = d**-0.5
    probs = probabilities_reference(q, k, scale)
    for quantizer, sc, keep_start, zero_level, bits in GPU_CASES:
        spec = ProbQuantSpec(quantizer, bits, sc, keep_start, zero_level)
        static = probs[..., 1:].amax() * 0.7  # a calibrated max below the true one: the clamp is exercised
        o, p = quant_attention(q, k, v, scale, spec, static, return_probs=True)
        rp = quantize_probs_reference(probs, spec, static)
        flips = level_flip_fraction(p, rp)
        exact = (rp.double() @ v.double())
        err = rel_l2(o, exact)
        own = rel_l2(o, p.double() @ v.double())
        ref_err = rel_l2(quant_attention_reference(q, k, v, scale, spec, static), exact)
        o2 = quant_attention(q, k, v, scale, spec, static)  # the production variant (no probability output)
        GPU_RESULTS.append(dict(test="kernel", dtype=str(dtype), nq=nq, nk=nk, d=d, quantizer=quantizer, scale=sc,
                                keep_start=keep_start, zero_level=zero_level, bits=bits, flips=flips,
                                out_rel_l2=err, own_levels_rel_l2=own, reference_out_rel_l2=ref_err))
        assert rel_l2(o2, o) <= OUT_TOL[dtype] / 10, spec  # the same arithmetic without the extra stores
        assert flips <= FLIP_TOL, (spec, flips)
        assert own <= OUT_TOL[dtype], (spec, own, err)
        assert err <= FLIPPED_OUT_TOL, (spec, err, ref_err)


def _sd_attention(cross: bool, dim: int, dtype):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=dim, cross_attention_dim=768 if cross else None, heads=8, dim_head=dim // 8).to(
        "cuda", dtype).eval()


def _active_qkv(bits=8, device="cuda"):
    from dgq_utils.model.layers import ActQuantizer

    out = {}
    for part in ("q", "k", "v"):
        qz = ActQuantizer(part, bits, layout="qkv")
        qz.set_params(0, torch.tensor(0.03, device=device), torch.tensor(2.0 ** (bits - 1), device=device))
        qz.mode = "quant"
        out[f"{part}_quant"] = qz
    return out


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["dgq", "dgq-both-start", "baseline", "mixdq", "static", "no-prob", "no-qkv"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_gpu_processor_fused_matches_reference(cross, variant, dtype):
    """The whole processor (Q/K/V quantizers, key/value 0 FP, probability quantizer) fused vs reference."""
    dim, n = 320, 4096
    attn = _sd_attention(cross, dim, dtype)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, n, dim, generator=g, device="cuda", dtype=dtype)
    ctx = torch.randn(2, 77, 768, generator=g, device="cuda", dtype=dtype) if cross else None
    kind = "cross" if cross else "self"
    quantizer = "uniform" if variant == "baseline" else "log2"
    scale = {"baseline": "batch", "static": "static"}.get(variant, "per_prompt")
    keep_start = variant != "baseline" and (cross or variant == "dgq-both-start")
    outs, paths = {}, {}
    for backend in ("reference", "auto"):
        pq = None if variant == "no-prob" else ProbQuantizer("p", 8, quantizer=quantizer, scale=scale,
                                                             keep_start=keep_start)
        if pq is not None:
            pq.static = {0: torch.tensor(0.05)}
            pq.mode = "quant"
        qkv = {} if variant == "no-qkv" else _active_qkv()
        proc = DGQAttnProcessor("a", kind, None, prob_quant=pq, backend=backend,
                                key_start_fp=keep_start or variant == "mixdq",
                                value_start_fp=variant == "mixdq" and cross, **qkv)
        with torch.no_grad():
            outs[backend] = proc(attn, x, ctx).float()
        paths[backend] = proc.last_path
    assert paths == {"reference": "reference", "auto": "sdpa" if variant == "no-prob" else "fused"}
    err = rel_l2(outs["auto"], outs["reference"])
    GPU_RESULTS.append(dict(test="processor", dtype=str(dtype), kind=kind, variant=variant, out_rel_l2=err))
    assert err <= 2 * OUT_TOL[dtype], err


@cuda
@pytest.mark.gpu
def test_gpu_fallbacks_take_the_reference(monkeypatch):
    attn = _sd_attention(True, 320, torch.float16)
    x = torch.randn(2, 256, 320, device="cuda", dtype=torch.float16)
    ctx = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
    proc = _processor()
    with torch.no_grad():
        fused = proc(attn, x, ctx)
        assert proc.last_path == "fused"
        monkeypatch.setenv(BACKEND_ENV, "reference")
        ref = proc(attn, x, ctx)
        assert proc.last_path == "reference"
        monkeypatch.delenv(BACKEND_ENV)
        mask = torch.zeros(2, 77, device="cuda", dtype=torch.float16)
        masked = proc(attn, x, ctx, attention_mask=mask)
        assert proc.last_path == "reference"
    assert rel_l2(fused, ref) <= 2 * OUT_TOL[torch.float16]
    assert torch.equal(masked, ref)  # an all-zero additive mask changes nothing on the reference path
