"""Triton kernels of the fused quantized attention (imported only where Triton is installed).

Two launches per attention call, neither of which writes an ``Nq x Nk`` tensor:

* :func:`row_stats_kernel` -- per query row, over all keys: the running max ``m`` of the base-2 logits
  ``t = (q . k) * softmax_scale * log2(e)``, the normaliser ``l = sum_j 2^(t_j - m)``, and the largest
  probability ``2^(x - m) / l`` where ``x`` is the max logit over keys ``1..Nk-1`` (``EXCL_FIRST``: the
  ``<start>`` column is excluded from the quantizer's scale) or over all keys (then it is ``1 / l``).
* :func:`quant_attention_kernel` -- recomputes ``p = 2^(t - m) / l`` block by block, divides by the per-sample
  multiplier (the scale for log2, the step for uniform), quantizes in registers, zeroes the FP ``<start>`` column,
  accumulates ``levels @ V`` in float32 (the levels cast to V's dtype first, as the reference does), multiplies
  by the multiplier once at the end and adds the FP ``p_0 v_0`` term.

Float32 inputs use 3xTF32 tensor-core products (about float32 accuracy; the IEEE FMA product spilled heavily);
fp16/bf16 products are exact in the float32 accumulator. The blockwise recomputation with an online max/normaliser is the flash-attention technique (Dao et al. 2022;
the Triton fused-attention tutorial); it is hand-written here because no library kernel exposes the
probabilities between the softmax and ``P V``, which is exactly where the quantizer has to sit.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["row_stats_kernel", "quant_attention_kernel", "QUANT_NONE", "QUANT_LOG2", "QUANT_UNIFORM",
           "SQRT2_CARRY", "EXPONENT_MASK"]

QUANT_NONE, QUANT_LOG2, QUANT_UNIFORM = 0, 1, 2
# Exact round-to-nearest in the log2 domain on the float32 bits (same trick as the in-place reference quantizer):
# sqrt(2)'s 23-bit mantissa lies strictly between 0x3504F3 and 0x3504F4, so adding 0x800000 - 0x3504F4 carries
# into the exponent exactly when the mantissa is >= sqrt(2); masking the mantissa then leaves 2^round(log2 r).
# (tl.constexpr: a @triton.jit function may only read module globals that are constexprs)
SQRT2_CARRY = tl.constexpr(0x800000 - 0x3504F4)
EXPONENT_MASK = tl.constexpr(0x7F800000)


@triton.jit
def _load_q(Q, b, h, offs_m, offs_d, s_b, s_h, s_n, s_d, NQ, D: tl.constexpr):
    ptrs = Q + b * s_b + h * s_h + offs_m[:, None] * s_n + offs_d[None, :] * s_d
    return tl.load(ptrs, mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _scores(q, K, b, h, kn, offs_d, s_b, s_h, s_n, s_d, NK, D: tl.constexpr, F32: tl.constexpr,
            EVEN_N: tl.constexpr):
    """Unscaled scores ``q . k`` of one (BLOCK_M, BLOCK_N) tile in float32; keys past NK are -inf (``EVEN_N``: NK
    is a multiple of BLOCK_N, there are none and the key masks are left out). The softmax scale (times log2 e) is
    applied by the caller inside the exponent, ``exp2(s * qk_scale - m)``: one fused multiply-add per score.
    ``D`` is a compile-time constant so that the head-dim mask (40 of 64, 80 of 128, 160 of 256 at SD v1.5) is
    known in 8-element runs: the K/V tiles load in 16-byte vectors and the loads can be pipelined (a run-time
    ``D`` made every masked load a 2-byte scalar one)."""
    k_ptrs = K + b * s_b + h * s_h + kn[None, :] * s_n + offs_d[:, None] * s_d  # (BLOCK_D, BLOCK_N)
    if EVEN_N:
        k = tl.load(k_ptrs, mask=offs_d[:, None] < D, other=0.0)
    else:
        k = tl.load(k_ptrs, mask=(kn[None, :] < NK) & (offs_d[:, None] < D), other=0.0)
    if F32:
        s = tl.dot(q, k, input_precision="tf32x3")
    else:
        s = tl.dot(q, k)
    if not EVEN_N:
        s = tl.where(kn[None, :] < NK, s, float("-inf"))
    return s


@triton.jit
def row_stats_kernel(Q, K, M_OUT, L_OUT, PMAX_OUT,
                     sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d,
                     H, NQ, NK, qk_scale,
                     D: tl.constexpr, EXCL_FIRST: tl.constexpr, F32: tl.constexpr, EVEN_N: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_q(Q, b, h, offs_m, offs_d, sq_b, sq_h, sq_n, sq_d, NQ, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    x_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    # the maxima are tracked on the unscaled scores (qk_scale > 0 and rounding is monotonic, so
    # max(s) * qk_scale == max(s * qk_scale) exactly); m_i is the running max in base-2 logits
    for start in range(0, NK, BLOCK_N):
        kn = start + offs_n
        s = _scores(q, K, b, h, kn, offs_d, sk_b, sk_h, sk_n, sk_d, NK, D, F32, EVEN_N)
        s_max = tl.max(s, axis=1)
        if EXCL_FIRST:  # the max over keys 1..: only the first block holds key 0
            if start == 0:
                x_blk = tl.max(tl.where(kn[None, :] >= 1, s, float("-inf")), axis=1)
            else:
                x_blk = s_max
            x_i = tl.maximum(x_i, x_blk)
        m_new = tl.maximum(m_i, s_max * qk_scale)
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s * qk_scale - m_new[:, None]), axis=1)
        m_i = m_new
    if EXCL_FIRST:
        x_i = x_i * qk_scale
    else:
        x_i = m_i  # the largest probability is 2^0 / l
    row = pid_bh * NQ + offs_m
    ok = offs_m < NQ
    tl.store(M_OUT + row, m_i, mask=ok)
    tl.store(L_OUT + row, l_i, mask=ok)
    tl.store(PMAX_OUT + row, tl.exp2(x_i - m_i) / l_i, mask=ok)


@triton.jit
def quant_attention_kernel(Q, K, V, O, M_IN, L_IN, MULT, P_OUT,
                           sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                           so_b, so_h, so_n, so_d,
                           H, NQ, NK, qk_scale, level_min, level_max,
                           D: tl.constexpr, QUANT: tl.constexpr, ZERO_LEVEL: tl.constexpr, KEEP_START: tl.constexpr,
                           WRITE_P: tl.constexpr, F32: tl.constexpr, EVEN_N: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``level_min``/``level_max``: log2 -- the smallest nonzero level ``2^-(2^b-1)`` (as float32) and 1;
    uniform -- 0 and ``2^b - 1``. ``MULT``: one float32 per sample (scale or step; 1 when QUANT_NONE).
    ``WRITE_P`` (tests only): also write the quantized probabilities, ``levels * mult`` with the FP ``<start>``
    column, to ``P_OUT`` (B, H, NQ, NK) contiguous float32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < NQ
    q = _load_q(Q, b, h, offs_m, offs_d, sq_b, sq_h, sq_n, sq_d, NQ, D)
    row = pid_bh * NQ + offs_m
    m_i = tl.load(M_IN + row, mask=row_ok, other=0.0)
    l_i = tl.load(L_IN + row, mask=row_ok, other=1.0)
    mult = tl.load(MULT + b)
    inv = 1.0 / (l_i * mult)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    p0 = tl.zeros([BLOCK_M], tl.float32)
    v_base = V + b * sv_b + h * sv_h
    for start in range(0, NK, BLOCK_N):
        kn = start + offs_n
        s = _scores(q, K, b, h, kn, offs_d, sk_b, sk_h, sk_n, sk_d, NK, D, F32, EVEN_N)
        e = tl.exp2(s * qk_scale - m_i[:, None])  # keys past NK: 0
        if KEEP_START:
            if start == 0:
                p0 = tl.sum(tl.where(kn[None, :] == 0, e, 0.0), axis=1)
        r = e * inv[:, None]
        if QUANT == 1:
            bits = r.to(tl.int32, bitcast=True)
            bits = (bits + SQRT2_CARRY) & EXPONENT_MASK
            lv = bits.to(tl.float32, bitcast=True)  # 2^round(log2 r)
            if ZERO_LEVEL:
                lv = tl.where(lv > level_min, lv, 0.0)  # at or below the zero code's level -> exactly 0
            else:
                lv = tl.maximum(lv, level_min)
            lv = tl.minimum(lv, level_max)  # only a static scale can give r > 1
        elif QUANT == 2:
            # round half to even, as torch.round: adding and subtracting 1.5 * 2^23 rounds any float32 in
            # [0, 2^22) to an integer in round-to-nearest-even (libdevice.rint does the same on the GPU, but
            # Triton's interpreter, which the CPU tests use, has no libdevice); r is first clipped to at most
            # 2^16 (the largest code is 2^16 - 1), so it is in range.
            lv = (tl.minimum(r, 65536.0) + 12582912.0) - 12582912.0
            lv = tl.minimum(tl.maximum(lv, level_min), level_max)
        else:
            lv = r
        if KEEP_START:
            if start == 0:
                lv = tl.where(kn[None, :] == 0, 0.0, lv)
        # keys past NK: e = 0 gives level 0 (or the smallest level without a zero level, times a zero row of V)
        v_ptrs = v_base + kn[:, None] * sv_n + offs_d[None, :] * sv_d
        if EVEN_N:
            v = tl.load(v_ptrs, mask=offs_d[None, :] < D, other=0.0)
        else:
            v = tl.load(v_ptrs, mask=(kn[:, None] < NK) & (offs_d[None, :] < D), other=0.0)
        if F32:
            acc += tl.dot(lv.to(v.dtype), v, input_precision="tf32x3")
        else:
            acc += tl.dot(lv.to(v.dtype), v)
        if WRITE_P:
            pq = lv * mult
            if KEEP_START:
                pq = tl.where(kn[None, :] == 0, e / l_i[:, None], pq)
            p_ptrs = P_OUT + row[:, None] * NK + kn[None, :]
            tl.store(p_ptrs, pq, mask=row_ok[:, None] & (kn[None, :] < NK))
    out = acc * mult
    if KEEP_START:
        v0 = tl.load(v_base + offs_d * sv_d, mask=offs_d < D, other=0.0).to(tl.float32)
        out += (p0 / l_i)[:, None] * v0[None, :]
    o_ptrs = O + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :] * so_d
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
