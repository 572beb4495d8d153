"""Real 8-bit GEMMs for W8A8 group quantization: integer codes in, integer accumulation, scales in the epilogue.

Notation (one Linear ``Y = X W^T + b``, ``X`` of shape ``(M, K)``, ``W`` of shape ``(N, K)``). The calibrated
quantizers are uniform affine: ``q = clamp(rint(x / s) + z, qmin, qmax)`` and ``x^ = s (q - z)``. We store the
code shifted into int8, ``a = q - o`` (``o = 128`` for the asymmetric 0..255 grid, 0 for the symmetric one), and
keep the shifted zero point ``c = z - o`` (a float holding an integer), so ``x^ = s (a - c)`` exactly. The weight
is quantized per output channel the same way: ``w^[n, k] = s_w[n] (u[n, k] - c_w[n])``.

Then, with ``r[m] = sum_k x^[m, k]`` (a row sum of the dequantized activation)::

    Y[m, n] = s_w[n] * (D[m, n] - c_w[n] * r[m]) + b[n],      D[m, n] = sum_k x^[m, k] * u[n, k]

* **Rows** (per-tensor, or DGQ's pixel / token groups: ``s``, ``c`` depend on the row ``m`` only)::

      D[m, n] = s[m] * (sum_k a[m, k] u[n, k] - c[m] * U[n]),   U[n] = sum_k u[n, k]  (precomputed)

  one int8 x int8 -> int32 GEMM, the rest in the epilogue.
* **Blocked** (DGQ's channel groups: ``s``, ``c`` depend on the column ``k``): the channels are permuted so each
  group is contiguous and every group is padded to a multiple of the K-block (:func:`block_layout`); the
  activation is gathered into that order by the quantize kernel (pads are code 0), and the weight codes are
  gathered through the same permutation by a small kernel per call (pads 0; it also writes the per-block code sums
  ``U_b[n]``), so the GEMM reads both operands contiguously. Each K-block belongs to one group ``g``::

      D[m, n] = sum_blocks s_g * (sum_{k in block} a[m, k] u[n, k] - c_g * U_b[n])

  int32 accumulation inside a block, fp32 across blocks. Pads contribute exactly 0. (The permutation is per
  timestep set -- DGQ's K-means groups change with the timestep -- so the weight cannot be permuted once offline
  without one copy per set; the per-call gather costs ``N * Kp`` bytes.)

The per-timestep parameter sets only change which ``s`` / ``c`` vectors (and, for channel groups, which
permutation) are passed: nothing is recompiled per step. The fake-quant layer computes ``F.linear(x^, w^)`` from
the same codes, so the two agree up to floating-point rounding (the 8-bit path is the more exact one: the
integer part is exact, the fake-quant path rounds ``x^`` and ``w^`` to the activation dtype first).

This module holds the pure-torch references (exact integer arithmetic: ``torch._int_mm`` where it runs, else
float64 matmuls of the integer codes, exact below 2^53) and the Triton kernels (CUDA; ``TRITON_INTERPRET=1`` runs
them on the CPU in tests). Triton is optional: :func:`available` says whether the kernels can run. The GEMM's tile
configuration is picked per shape on the first CUDA call by timing a few candidates (:data:`TUNE`; never while a
CUDA graph is being captured).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from dgq_utils.core.quantizers import qrange

__all__ = ["BlockLayout", "BlockedParams", "Int8Weight", "RowsParams", "TUNE", "available", "block_layout",
           "blocked_gemm_reference", "blocked_params", "channel_gemm_reference", "code_offset", "int8_linear",
           "int8_linear_triton",
           "int8_gemm", "int_matmul", "quantize_act_int8", "quantize_act_reference", "quantize_weight_int8",
           "rows_gemm_reference", "rows_params",
           "tuned_configs"]

try:  # pragma: no cover - depends on the installation
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # noqa: BLE001 - any import problem means: no kernel
    _HAVE_TRITON = False

#: time a few GEMM tile configurations per shape on the first CUDA call and keep the fastest; off by default
#: (``DGQ_INT8_TUNE=1`` turns it on): the heuristic encodes what that tuning chose at SD shapes on an H200
TUNE = os.environ.get("DGQ_INT8_TUNE", "0") != "0"


def available(x: Tensor) -> bool:
    """Whether the Triton kernels can run on ``x`` (a CUDA float tensor, Triton importable)."""
    return _HAVE_TRITON and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


def code_offset(bits: int, symmetric: bool) -> int:
    """The shift ``o`` that moves a ``bits``-bit code into int8 (128 for the 0..255 grid, 0 if symmetric)."""
    qmin, qmax = qrange(bits, symmetric)
    if qmax - qmin > 255:
        raise ValueError(f"{bits}-bit codes do not fit in int8; the 8-bit path needs bits <= 8.")
    return 0 if symmetric else 128


# ----------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Int8Weight:
    """A weight stored in 8 bits: ``codes`` ``(N, K)`` int8, per output channel ``scale`` and shifted zero point
    ``offset`` (float32, ``(N,)``), ``code_sum`` ``(N,)`` int32 (``sum_k codes``, the rows path's correction)."""

    codes: Tensor
    scale: Tensor
    offset: Tensor
    code_sum: Tensor

    def to(self, device) -> Int8Weight:
        return Int8Weight(*(t.to(device) for t in (self.codes, self.scale, self.offset, self.code_sum)))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.offset, self.code_sum))

    def dequantize(self) -> Tensor:
        """``s_w (u - c_w)`` in float32: the fake-quantized weight (bit-identical to the fake quantizer's)."""
        return (self.codes.float() - self.offset[:, None]) * self.scale[:, None]


@torch.no_grad()
def quantize_weight_int8(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int = 8,
                         symmetric: bool = False) -> Int8Weight:
    """Codes of ``w`` (``(N, K)``, or ``(N, C, kh, kw)`` flattened to ``(N, C*kh*kw)``) with per-output-channel
    ``scale`` / ``zero_point`` (any shape with ``N`` entries): the same rounding as the fake-quant weight."""
    o = code_offset(bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    w2 = w.detach().reshape(w.shape[0], -1).float()
    s = scale.detach().reshape(-1, 1).float().to(w2.device)
    z = zero_point.detach().reshape(-1, 1).float().to(w2.device)
    if s.shape[0] != w2.shape[0] or z.shape[0] != w2.shape[0]:
        raise ValueError(f"quantize_weight_int8 needs one scale and zero point per output channel "
                         f"({w2.shape[0]}); got {s.shape[0]} / {z.shape[0]}.")
    q = torch.clamp(torch.round(w2 / s) + z, qmin, qmax)
    codes = (q - o).to(torch.int8)
    return Int8Weight(codes.contiguous(), s.reshape(-1).contiguous(), (z - o).reshape(-1).contiguous(),
                      codes.sum(dim=1, dtype=torch.int32))


# ----------------------------------------------------------------------------------------------------------
# channel-group layout (permutation + padding to the K-block)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class BlockLayout:
    """Channels regrouped for the blocked GEMM: ``perm`` ``(Kp,)`` int32, the source channel of every padded
    column (``-1`` = pad), ``block_group`` ``(Kp // block,)`` int64 the group of every block; ``block``."""

    perm: Tensor
    block_group: Tensor
    block: int

    @property
    def padded_k(self) -> int:
        return int(self.perm.numel())

    @property
    def num_blocks(self) -> int:
        return self.padded_k // self.block

    def to(self, device) -> BlockLayout:
        return BlockLayout(self.perm.to(device), self.block_group.to(device), self.block)


def block_layout(group_ids: Tensor, block: int) -> BlockLayout:
    """Permutation that makes every group contiguous (groups in increasing id, channels in increasing index
    inside a group) with each group padded to a multiple of ``block`` by ``-1`` entries. Empty groups take no
    block. Every channel appears exactly once; ``Kp = sum_g block * ceil(|g| / block)``."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer; got {block!r}.")
    ids = torch.as_tensor(group_ids).reshape(-1).to(torch.long).cpu()
    if ids.numel() == 0:
        raise ValueError("block_layout needs at least one channel.")
    if bool((ids < 0).any()):
        raise ValueError("group ids must be >= 0.")
    perm, groups = [], []
    order = torch.argsort(ids * (ids.numel() + 1) + torch.arange(ids.numel()))  # stable: by group, then index
    sorted_ids = ids[order]
    for g in torch.unique(sorted_ids).tolist():
        members = order[sorted_ids == g]
        nb = -(-members.numel() // block)
        pad = nb * block - members.numel()
        perm.append(torch.cat([members, torch.full((pad,), -1, dtype=torch.long)]))
        groups += [g] * nb
    return BlockLayout(torch.cat(perm).to(torch.int32), torch.tensor(groups, dtype=torch.long), int(block))


# ----------------------------------------------------------------------------------------------------------
# activation parameters, prepared once per parameter set (no per-call tensor work)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class RowsParams:
    """Per-row activation parameters of the rows path: ``scale`` / ``zp`` ``(PP,)`` float32 (``PP`` = 1 per
    tensor, else the number of pixel / token positions ``P``; row ``m`` uses entry ``(m mod P) mod PP``) and the
    shifted zero point ``offset = zp - o``."""

    scale: Tensor
    zp: Tensor
    offset: Tensor

    def to(self, device) -> RowsParams:
        return RowsParams(self.scale.to(device), self.zp.to(device), self.offset.to(device))


@dataclass
class BlockedParams:
    """Channel-group parameters of the blocked path: the ``layout``, every padded column's scale / calibrated
    zero point (``col_scale`` / ``col_zp`` ``(Kp,)``, for the quantize kernel) and every block's scale / shifted
    zero point (``block_scale`` / ``block_offset`` ``(Kp // block,)``, for the GEMM)."""

    layout: BlockLayout
    col_scale: Tensor
    col_zp: Tensor
    block_scale: Tensor
    block_offset: Tensor

    def to(self, device) -> BlockedParams:
        return BlockedParams(self.layout.to(device), self.col_scale.to(device), self.col_zp.to(device),
                             self.block_scale.to(device), self.block_offset.to(device))


def rows_params(scale: Tensor, zero_point: Tensor, bits: int = 8, symmetric: bool = False) -> RowsParams:
    """:class:`RowsParams` from a per-tensor (1 entry) or per-position scale / calibrated zero point."""
    o = code_offset(bits, symmetric)
    s = scale.detach().float().reshape(-1).contiguous()
    z = zero_point.detach().float().reshape(-1).contiguous()
    if s.shape != z.shape:
        raise ValueError(f"row scale {tuple(s.shape)} and zero point {tuple(z.shape)} differ in size.")
    return RowsParams(s, z, (z - o).contiguous())


def blocked_params(layout: BlockLayout, block_scale: Tensor, block_zp: Tensor, bits: int = 8,
                   symmetric: bool = False) -> BlockedParams:
    """:class:`BlockedParams` from every block's scale / calibrated zero point (``(Kp // block,)``)."""
    o = code_offset(bits, symmetric)
    bs = block_scale.detach().float().reshape(-1).contiguous()
    bz = block_zp.detach().float().reshape(-1).contiguous()
    if bs.numel() != layout.num_blocks or bz.numel() != layout.num_blocks:
        raise ValueError(f"the layout has {layout.num_blocks} blocks; got {bs.numel()} scales / {bz.numel()} "
                         "zero points.")
    blk = layout.block
    return BlockedParams(layout, bs.repeat_interleave(blk).contiguous(), bz.repeat_interleave(blk).contiguous(),
                         bs, (bz - o).contiguous())


# ----------------------------------------------------------------------------------------------------------
# references (CPU, tests)
# ----------------------------------------------------------------------------------------------------------
def quantize_act_reference(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int = 8,
                           symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """int8 codes ``a`` of ``x`` and the shifted zero point ``c`` (``scale`` / ``zero_point`` broadcast onto
    ``x``), computed in float32 with the fake quantizer's operation order."""
    o = code_offset(bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    s = scale.float()
    z = zero_point.float()
    q = torch.clamp(torch.round(x.float() / s) + z, qmin, qmax)
    return (q - o).to(torch.int8), (z - o)


def int_matmul(a: Tensor, b_t: Tensor) -> Tensor:
    """Exact ``a @ b_t.T`` of int8 matrices as int64 (``torch._int_mm`` where it runs, else float64)."""
    try:
        if a.shape[0] > 16 and a.shape[1] % 8 == 0 and b_t.shape[0] % 8 == 0:
            return torch._int_mm(a.contiguous(), b_t.t()).to(torch.int64)
    except RuntimeError:
        pass
    return torch.matmul(a.double(), b_t.double().t()).round().to(torch.int64)


def _epilogue(d: Tensor, r: Tensor, w: Int8Weight, bias: Tensor | None, out_dtype) -> Tensor:
    y = w.scale.double()[None, :] * (d - w.offset.double()[None, :] * r[:, None])
    if bias is not None:
        y = y + bias.double()[None, :]
    return y.to(out_dtype)


def rows_gemm_reference(a: Tensor, row_scale: Tensor, row_offset: Tensor, w: Int8Weight, bias: Tensor | None = None,
                        out_dtype=torch.float32) -> Tensor:
    """The rows path: ``a`` ``(M, K)`` int8 codes with per-row ``row_scale`` / shifted zero point ``row_offset``
    (``(M,)`` or a scalar); the exact integer GEMM, then the epilogue in float64."""
    m, k = a.shape
    s = row_scale.double().reshape(-1).expand(m)
    c = row_offset.double().reshape(-1).expand(m)
    acc = int_matmul(a, w.codes).double()
    d = s[:, None] * (acc - c[:, None] * w.code_sum.double()[None, :])
    r = s * (a.double().sum(dim=1) - k * c)
    return _epilogue(d, r, w, bias, out_dtype)


def blocked_gemm_reference(x: Tensor, group_scale: Tensor, group_zero_point: Tensor, layout: BlockLayout,
                           w: Int8Weight, bias: Tensor | None = None, bits: int = 8, symmetric: bool = False,
                           out_dtype=torch.float32) -> Tensor:
    """The blocked path from the float input ``x`` ``(M, K)``: codes per group (``group_scale`` /
    ``group_zero_point`` ``(G,)`` indexed by group id), gathered into ``layout`` order, one exact integer GEMM per
    K-block, per-block scaling, the epilogue -- the kernel's math, step by step."""
    dev = x.device
    perm = layout.perm.to(torch.long).to(dev)
    valid = perm >= 0
    src = perm.clamp_min(0)
    blk = layout.block
    col_group = layout.block_group.to(dev).repeat_interleave(blk)  # the group of every padded column
    s = group_scale.reshape(-1).float().to(dev)[col_group]
    z = group_zero_point.reshape(-1).float().to(dev)[col_group]
    a, c = quantize_act_reference(x[:, src], s[None, :], z[None, :], bits, symmetric)
    a = torch.where(valid[None, :], a, torch.zeros_like(a))
    codes = w.codes.to(dev)
    u = torch.where(valid[None, :], codes[:, src], torch.zeros((), dtype=torch.int8, device=dev))
    d = torch.zeros(x.shape[0], codes.shape[0], dtype=torch.float64, device=dev)
    for b in range(layout.num_blocks):
        cols = slice(b * blk, (b + 1) * blk)
        acc = int_matmul(a[:, cols], u[:, cols]).double()
        usum = u[:, cols].double().sum(dim=1)
        d += float(s[b * blk]) * (acc - float(c[0, b * blk]) * usum[None, :])
    xhat = (a.double() - c.double()) * s.double()[None, :]
    r = torch.where(valid[None, :], xhat, torch.zeros_like(xhat)).sum(dim=1)
    return _epilogue(d, r, w, bias, out_dtype)


def channel_gemm_reference(x: Tensor, channel_scale: Tensor, channel_zero_point: Tensor, w: Int8Weight,
                           bias: Tensor | None = None, bits: int = 8, symmetric: bool = False,
                           out_dtype=torch.float32) -> Tensor:
    """What :func:`blocked_gemm_reference` computes, without the blocks: ``x`` ``(M, K)`` quantized with a scale /
    zero point per channel (``(K,)``, each channel's group's), then ``sum_k s_k (a_k - c_k) u[n, k]`` as one float64
    GEMM in the channels' own order (no permutation, no padding) and the same epilogue.

    Every term is exact in float64 (an 8-bit code difference times a float32 scale times an int8 weight code), so it
    differs from the block-by-block sum only by float64 rounding of the additions (relative ~1e-16). The sum does
    not depend on the channel order, which is why the blocked kernel may permute. This is the CPU's execution of
    the channel-grouped layers: one GEMM instead of one small integer GEMM per 32-column block."""
    s = channel_scale.reshape(-1).float().to(x.device)
    z = channel_zero_point.reshape(-1).float().to(x.device)
    if s.numel() != x.shape[1] or z.numel() != x.shape[1]:
        raise ValueError(f"channel_scale / channel_zero_point need one value per input channel ({x.shape[1]}); got "
                         f"{s.numel()} / {z.numel()}.")
    a, c = quantize_act_reference(x, s[None, :], z[None, :], bits, symmetric)
    xhat = (a.double() - c.double()) * s.double()[None, :]
    d = xhat @ w.codes.to(x.device).double().t()
    return _epilogue(d, xhat.sum(dim=1), w, bias, out_dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
if _HAVE_TRITON:  # pragma: no cover - compiled on the GPU (or interpreted in tests)

    @triton.jit
    def _rint(v):
        """Round half to even (``torch.round``) exactly for every float32 (floor, exact fraction, tie rule);
        plain arithmetic, so Triton's interpreter runs it too (libdevice does not)."""
        r = tl.floor(v)
        f = v - r  # exact: r and v are within 1 of each other
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        up = (f > 0.5) | ((f == 0.5) & odd)
        return tl.where(up, r + 1.0, r)

    @triton.jit
    def _act_quant_kernel(x_ptr, a_ptr, r_ptr, perm_ptr, rs_ptr, rz_ptr, cs_ptr, cz_ptr,
                          M, P, PP, K_OUT, sxb, sxp, sxc, qmin, qmax, off,
                          HAS_PERM: tl.constexpr, ROW_PARAMS: tl.constexpr, ASYM: tl.constexpr,
                          BM: tl.constexpr, BK: tl.constexpr):
        """Quantize rows ``[pid*BM, pid*BM+BM)`` of the (B, P, C)-strided input into int8 codes (gathered by
        ``perm`` when given), write them to ``a`` (M, K_OUT) and the float row sum of the dequantized values."""
        pid = tl.program_id(0)
        rows = pid * BM + tl.arange(0, BM)
        rmask = rows < M
        bi = (rows // P).to(tl.int64)
        pi = rows % P
        base = bi * sxb + pi.to(tl.int64) * sxp
        if ROW_PARAMS:
            s_row = tl.load(rs_ptr + pi % PP, mask=rmask, other=1.0)
            z_row = tl.load(rz_ptr + pi % PP, mask=rmask, other=0.0)
        rsum = tl.zeros((BM,), dtype=tl.float32)
        for k0 in range(0, K_OUT, BK):
            cols = k0 + tl.arange(0, BK)
            cmask = cols < K_OUT
            if HAS_PERM:
                src = tl.load(perm_ptr + cols, mask=cmask, other=-1)
            else:
                src = cols
            valid = cmask & (src >= 0)
            src_c = tl.where(valid, src, 0).to(tl.int64)
            m2 = rmask[:, None] & valid[None, :]
            x = tl.load(x_ptr + base[:, None] + src_c[None, :] * sxc, mask=m2, other=0.0).to(tl.float32)
            if ROW_PARAMS:
                s = s_row[:, None] + tl.zeros((BM, BK), dtype=tl.float32)
                z = z_row[:, None] + tl.zeros((BM, BK), dtype=tl.float32)
            else:
                s = tl.load(cs_ptr + cols, mask=cmask, other=1.0)[None, :] + tl.zeros((BM, BK), dtype=tl.float32)
                z = tl.load(cz_ptr + cols, mask=cmask, other=0.0)[None, :] + tl.zeros((BM, BK), dtype=tl.float32)
            t = _rint(tl.math.div_rn(x, s))
            if ASYM:
                t = t + z
            t = tl.clamp(t, qmin, qmax)
            code = tl.where(m2, t - off, 0.0)
            if ASYM:
                xh = (t - z) * s
            else:
                xh = t * s
            rsum += tl.sum(tl.where(m2, xh, 0.0), axis=1)
            tl.store(a_ptr + rows[:, None].to(tl.int64) * K_OUT + cols[None, :], code.to(tl.int8),
                     mask=rmask[:, None] & cmask[None, :])
        tl.store(r_ptr + rows, rsum, mask=rmask)

    @triton.jit
    def _gather_weight_kernel(w_ptr, wp_ptr, usum_ptr, perm_ptr, N, K_W, K_P, NB,
                              BN: tl.constexpr, BLK: tl.constexpr):
        """``wp[n, j] = codes[n, perm[j]]`` (0 at pads) for one K-block ``j in [kb*BLK, kb*BLK+BLK)`` and rows
        ``[pid_n*BN, ...)``, and the block's code sum ``usum[n, kb]``."""
        pid_n = tl.program_id(0)
        kb = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        nmask = rn < N
        cols = kb * BLK + tl.arange(0, BLK)
        src = tl.load(perm_ptr + cols)
        valid = src >= 0
        m2 = nmask[:, None] & valid[None, :]
        u = tl.load(w_ptr + rn[:, None].to(tl.int64) * K_W + tl.where(valid, src, 0)[None, :], mask=m2, other=0)
        tl.store(wp_ptr + rn[:, None].to(tl.int64) * K_P + cols[None, :], u, mask=nmask[:, None])
        tl.store(usum_ptr + rn.to(tl.int64) * NB + kb, tl.sum(u.to(tl.int32), axis=1), mask=nmask)

    @triton.jit
    def _int8_gemm_kernel(a_ptr, w_ptr, y_ptr, bs_ptr, bc_ptr, bsum_ptr, rs_ptr, rc_ptr, usum_ptr,
                          ws_ptr, wc_ptr, r_ptr, bias_ptr,
                          M, N, K, P, PP, NB,
                          BLOCKED: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        """``y = epilogue(a @ w^T)``: ``a`` (M, K) and ``w`` (N, K) int8, both K-contiguous. Rows path: one int32
        accumulator, per-row scale / offset (entry ``(m mod P) mod PP``) and ``usum`` (N,) in the epilogue.
        Blocked path (``BK`` = the layout's block): per block an int32 product, scaled by the block's scale and
        corrected by its offset times ``bsum[n, block]`` into an fp32 accumulator."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        width = GROUP_M * num_n
        gid = pid // width
        first_m = gid * GROUP_M
        gsize = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % gsize
        pid_n = (pid % width) // gsize
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        mmask = rm < M
        nmask = rn < N
        rk = tl.arange(0, BK)
        a_rows = a_ptr + rm[:, None].to(tl.int64) * K
        w_rows = w_ptr + rn[None, :].to(tl.int64) * K
        if BLOCKED:
            d = tl.zeros((BM, BN), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.int32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            kmask = kk < K
            a = tl.load(a_rows + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0)
            b = tl.load(w_rows + kk[:, None], mask=kmask[:, None] & nmask[None, :], other=0)
            if BLOCKED:
                kb = k0 // BK
                blk = tl.dot(a, b, out_dtype=tl.int32)
                usum = tl.load(bsum_ptr + rn.to(tl.int64) * NB + kb, mask=nmask, other=0).to(tl.float32)
                sb = tl.load(bs_ptr + kb)
                cb = tl.load(bc_ptr + kb)
                d += sb * (blk.to(tl.float32) - cb * usum[None, :])
            else:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if not BLOCKED:
            pi = (rm % P) % PP
            s = tl.load(rs_ptr + pi, mask=mmask, other=1.0)
            c = tl.load(rc_ptr + pi, mask=mmask, other=0.0)
            usum_n = tl.load(usum_ptr + rn, mask=nmask, other=0).to(tl.float32)
            d = s[:, None] * (acc.to(tl.float32) - c[:, None] * usum_n[None, :])
        ws = tl.load(ws_ptr + rn, mask=nmask, other=1.0)
        wc = tl.load(wc_ptr + rn, mask=nmask, other=0.0)
        r = tl.load(r_ptr + rm, mask=mmask, other=0.0)
        y = ws[None, :] * (d - wc[None, :] * r[:, None])
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])


# ----------------------------------------------------------------------------------------------------------
# tile configurations
# ----------------------------------------------------------------------------------------------------------
#: (BM, BN, BK, warps, stages) candidates; the blocked path replaces BK by the layout's block
_ROWS_CANDIDATES = ((128, 64, 128, 4, 4), (128, 256, 128, 8, 3), (128, 128, 128, 8, 3))
_BLOCKED_CANDIDATES = ((128, 64, 32, 4, 5), (128, 128, 32, 8, 4))
_TUNED: dict[tuple, tuple[int, int, int, int, int]] = {}


def tuned_configs() -> dict[tuple, tuple[int, int, int, int, int]]:
    """The configurations chosen so far: ``(M, N, K, block) -> (BM, BN, BK, warps, stages)`` (a copy; ``K`` is
    the layer's unpadded K, ``block`` 0 on the rows path)."""
    return dict(_TUNED)


def _heuristic(m: int, n: int, k: int, blocked: bool) -> tuple[int, int, int, int, int]:
    """What the tuner picked at SD v1.5 shapes on an H200 (M 4k-65k, K 320-5120, N 320-10240): 128 x 64 tiles,
    except 128 x 256 where N is a multiple of 256 and there are >= 2 waves of such tiles; blocked: 128 x 64."""
    if blocked:
        return (128, 64, 32, 4, 5)
    if n % 256 == 0 and -(-m // 128) * (n // 256) >= 264:
        return (128, 256, 128, 8, 3)
    return (128, 64, 128, 4, 4)


def _capturing() -> bool:
    try:
        return torch.cuda.is_current_stream_capturing()
    except Exception:  # noqa: BLE001 - no CUDA: nothing is captured
        return False


def _choose(key: tuple, run, m: int, n: int, k: int, blocked: bool, cuda: bool):
    """The configuration for ``key``: cached, else timed among the candidates (CUDA, :data:`TUNE`, not while a
    graph is captured), else the heuristic. ``run(config)`` launches the GEMM once."""
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    if not (cuda and TUNE) or _capturing():
        return _heuristic(m, n, k, blocked)
    cands = list(_BLOCKED_CANDIDATES if blocked else _ROWS_CANDIDATES)
    if not blocked:
        cands = [c for c in cands if c[2] <= max(64, k)] or cands
    best, best_ms = None, float("inf")
    for c in cands:
        try:
            run(c)  # compile + warm
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                run(c)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end) / 3
        except Exception:  # noqa: BLE001 - e.g. out of shared memory: that candidate is out
            continue
        if ms < best_ms:
            best, best_ms = c, ms
    cfg = best or _heuristic(m, n, k, blocked)
    _TUNED[key] = cfg
    return cfg


# ----------------------------------------------------------------------------------------------------------
# the fused 8-bit linear
# ----------------------------------------------------------------------------------------------------------
def quantize_act_int8(x3: Tensor, params: RowsParams | BlockedParams, *, bits: int = 8,
                      symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """The quantize kernel alone: int8 codes ``(B * P, K or Kp)`` of ``x3`` ``(B, P, K)`` (gathered into the
    layout's order on the blocked path) and the float32 row sums ``r`` of the dequantized activation."""
    if not _HAVE_TRITON:
        raise RuntimeError("quantize_act_int8 needs Triton; use the reference path.")
    b, p, k = x3.shape
    m = b * p
    o = code_offset(bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    blocked = isinstance(params, BlockedParams)
    if blocked:
        k_out = params.layout.padded_k
        perm, cs, cz = params.layout.perm, params.col_scale, params.col_zp
        rs = rz = cs  # unused
        pp = 1
    else:
        rs, rz = params.scale, params.zp
        pp = rs.numel()
        if pp not in (1, p):
            raise ValueError(f"row parameters of length {pp} do not match the input's {p} positions.")
        k_out = k
        perm = cs = cz = rs  # unused
    a = torch.empty((m, k_out), dtype=torch.int8, device=x3.device)
    r = torch.empty((m,), dtype=torch.float32, device=x3.device)
    bmq, bkq = 32, 64
    _act_quant_kernel[(triton.cdiv(m, bmq),)](
        x3, a, r, perm, rs, rz, cs, cz, m, p, pp, k_out, x3.stride(0), x3.stride(1), x3.stride(2),
        float(qmin), float(qmax), float(o), HAS_PERM=blocked, ROW_PARAMS=not blocked, ASYM=not symmetric,
        BM=bmq, BK=bkq, num_warps=4)
    return a, r


def int8_gemm(a: Tensor, r: Tensor, w: Int8Weight, bias: Tensor | None, params: RowsParams | BlockedParams,
              positions: int, out_dtype, *, config: tuple[int, int, int, int, int] | None = None) -> Tensor:
    """The GEMM (and, on the blocked path, the weight gather) on codes from :func:`quantize_act_int8`:
    ``(M, N)`` in ``out_dtype``. ``positions``: ``P`` of the input (row ``m`` is position ``m mod P``)."""
    if not _HAVE_TRITON:
        raise RuntimeError("int8_gemm needs Triton; use the reference path.")
    m, k_out = a.shape
    n, k = w.codes.shape
    dev = a.device
    blocked = isinstance(params, BlockedParams)
    if blocked:
        lay = params.layout
        blk, nb, pp = lay.block, lay.num_blocks, 1
        wp = torch.empty((n, k_out), dtype=torch.int8, device=dev)
        bsum = torch.empty((n, nb), dtype=torch.int32, device=dev)
        _gather_weight_kernel[(triton.cdiv(n, 64), nb)](w.codes, wp, bsum, lay.perm, n, k, k_out, nb, BN=64,
                                                        BLK=blk, num_warps=4)
        bs, bc = params.block_scale, params.block_offset
        rs_g = rc_g = bs  # unused
        wcodes = wp
    else:
        blk, nb, pp = 0, 1, params.scale.numel()
        bsum = w.code_sum  # unused
        bs = bc = r  # unused
        rs_g, rc_g = params.scale, params.offset
        wcodes = w.codes
    y = torch.empty((m, n), dtype=out_dtype, device=dev)
    bias_arg = bias if bias is not None else w.scale

    def run(cfg):
        bm, bn, bk, warps, stages = cfg
        if blocked:
            bk = blk
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _int8_gemm_kernel[grid](
            a, wcodes, y, bs, bc, bsum, rs_g, rc_g, w.code_sum, w.scale, w.offset, r, bias_arg,
            m, n, k_out, positions, pp, nb, BLOCKED=blocked, HAS_BIAS=bias is not None,
            BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=stages)

    if config is None:  # keyed by the layer's own K: a new timestep set's padded K does not tune again
        config = _choose((m, n, k, blk), run, m, n, k_out, blocked, a.is_cuda)
    run(config)
    return y


def int8_linear(x3: Tensor, w: Int8Weight, bias: Tensor | None, params: RowsParams | BlockedParams, *,
                bits: int = 8, symmetric: bool = False,
                config: tuple[int, int, int, int, int] | None = None) -> Tensor:
    """Quantize ``x3`` ``(B, P, K)`` (any strides) with ``params`` and multiply with ``w`` in 8 bits; returns
    ``(B * P, N)`` in ``x3.dtype``. Launches: the quantize kernel, (blocked path) the weight gather, the GEMM.
    ``config``: ``(BM, BN, BK, warps, stages)`` of the GEMM (``BK`` is the layout's block on the blocked path);
    by default the heuristic, or tuned per shape with :data:`TUNE`."""
    a, r = quantize_act_int8(x3, params, bits=bits, symmetric=symmetric)
    return int8_gemm(a, r, w, bias, params, x3.shape[1], x3.dtype, config=config)


def int8_linear_triton(x3: Tensor, w: Int8Weight, bias: Tensor | None, *, bits: int = 8, symmetric: bool = False,
                       row_scale: Tensor | None = None, row_offset_zp: Tensor | None = None,
                       layout: BlockLayout | None = None, block_scale: Tensor | None = None,
                       block_zp: Tensor | None = None, config: tuple[int, int, int, int, int] | None = None) -> Tensor:
    """:func:`int8_linear` with the parameters given directly (tests, micro-benchmarks).

    Rows path: ``row_scale`` / ``row_offset_zp`` ``(P,)`` (or ``(1,)`` per tensor): the scale and the *calibrated*
    zero point of each pixel / token. Blocked path: ``layout`` plus ``block_scale`` / ``block_zp`` ``(Kp//block,)``
    (every block's group's scale and calibrated zero point).
    """
    if layout is not None:
        params = blocked_params(layout, block_scale, block_zp, bits, symmetric)
    else:
        if row_scale is None or row_offset_zp is None:
            raise ValueError("int8_linear_triton needs row_scale / row_offset_zp, or layout / block_scale / block_zp.")
        params = rows_params(row_scale, row_offset_zp, bits, symmetric)
    return int8_linear(x3, w, bias, params, bits=bits, symmetric=symmetric, config=config)
