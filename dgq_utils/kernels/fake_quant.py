"""Fused uniform fake quantization: one GPU kernel per quantizer call.

The reference, :func:`dgq_utils.core.quantizers.fake_quant_uniform`, runs ~7 elementwise PyTorch kernels through a
float32 copy of the input (cast, divide, round, add, clamp, subtract, multiply, cast back). On a CUDA device,
:func:`fake_quant_uniform_fused` does the same arithmetic in one Triton kernel: it reads the input in its own
dtype, computes in float32 *with the reference's operation order and IEEE rounding* (correctly rounded division
``div_rn``, round-half-to-even ``rint``, the same clamp), and writes the result in the input's dtype -- so it is
bit-identical to the reference (tested on the GPU; ``-0.0`` and ``+0.0`` may differ in sign only).

Parameters (``ParamStack``): the quantizer's per-timestep sets stacked into ``(S, C)`` *channel* vectors and
``(S, P)`` *pixel* vectors, the parameter set chosen **on the device** by a 0-d integer tensor (the timestep
state's set index), so a call needs no host synchronisation and a compiled graph does not specialise on the set.
Every set is written in this two-vector form exactly: a channel-wise set has pixel scale 1 and pixel zero point
0, a pixel-wise set channel scale 1 / zero point 0, a per-tensor set its value in every channel entry -- the
product ``scale_c * scale_p`` and the sum ``zp_c + zp_p`` then equal the set's own parameters bit for bit.

Where the channel / pixel indices are: ``channel_dim`` is one dim of ``x``; ``pixel_dims`` one or two dims (e.g.
``(2, 3)`` for a ``(B, C, H, W)`` conv input, flattened row-major into ``P = H * W``) or none. Any dense layout of
``x`` works (a transposed Q/K/V view too): the kernel walks memory order and recovers each index from the
strides.

Triton is a dependency of PyTorch's CUDA builds; where it (or a CUDA device) is missing, callers keep the
reference path (:func:`available`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dgq_utils.core.quantizers import fake_quant_uniform, qrange

__all__ = ["ParamStack", "available", "fake_quant_stacked_reference", "fake_quant_uniform_fused",
           "fake_quant_stacked_op"]

try:  # pragma: no cover - depends on the installation
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    _HAVE_TRITON = True
except Exception:  # noqa: BLE001 - any import problem means: no kernel
    _HAVE_TRITON = False


def available(x: Tensor) -> bool:
    """Whether the fused kernel can run on ``x`` (a CUDA tensor of a float dtype, Triton importable)."""
    return _HAVE_TRITON and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class ParamStack:
    """Per-set parameters of one activation quantizer in the two-vector form (see the module docstring).

    ``chan_scale`` / ``chan_zp``: ``(S, C)`` float32; ``pix_scale`` / ``pix_zp``: ``(S, P)`` or ``None`` (no set
    is pixel-wise); ``channel_dim``, ``pixel_dims``: dims of the input they index; ``valid``: ``(S,)`` bool, which
    set indices were calibrated (the rest are filled with scale 1 and must not be used).
    """

    chan_scale: Tensor
    chan_zp: Tensor
    pix_scale: Tensor | None
    pix_zp: Tensor | None
    channel_dim: int
    pixel_dims: tuple[int, ...]
    valid: Tensor

    @property
    def num_sets(self) -> int:
        return int(self.chan_scale.shape[0])

    def to(self, device) -> ParamStack:
        mv = (lambda t: None if t is None else t.to(device))
        return ParamStack(mv(self.chan_scale), mv(self.chan_zp), mv(self.pix_scale), mv(self.pix_zp),
                          self.channel_dim, self.pixel_dims, self.valid.to(device))

    def fits(self, x: Tensor) -> bool:
        """Whether ``x``'s sizes match the stacked parameters (else the reference path explains the mismatch)."""
        if x.ndim <= self.channel_dim:
            return False
        c = self.chan_scale.shape[1]
        if c != 1 and x.shape[self.channel_dim] != c:
            return False
        if self.pix_scale is not None:
            n = 1
            for d in self.pixel_dims:
                if d >= x.ndim:
                    return False
                n *= x.shape[d]
            if n != self.pix_scale.shape[1]:
                return False
        return True

    @classmethod
    def from_sets(cls, sets: dict[int, tuple[Tensor, Tensor]], channel_dim: int,
                  pixel_dims: tuple[int, ...]) -> ParamStack:
        """Stack ``sets[i] = (scale, zero_point)``, each broadcast-shaped onto the input (per tensor, channel-wise
        along ``channel_dim`` or pixel-wise along ``pixel_dims``). A vector the sets never need is length 1."""
        if not sets:
            raise ValueError("ParamStack.from_sets needs at least one parameter set.")
        n_sets = max(sets) + 1
        c = p = 1
        for s, _ in sets.values():
            nontrivial = [d for d in range(s.ndim) if s.shape[d] != 1]
            if nontrivial == [channel_dim]:
                c = s.shape[channel_dim]
            elif nontrivial and set(nontrivial) <= set(pixel_dims):
                p = 1
                for d in pixel_dims:
                    p *= s.shape[d] if d < s.ndim else 1
            elif nontrivial:
                raise ValueError(f"a parameter set of shape {tuple(s.shape)} lies neither along channel dim "
                                 f"{channel_dim} nor pixel dims {pixel_dims}.")
        dev = next(iter(sets.values()))[0].device
        cs = torch.ones(n_sets, c, device=dev)
        cz = torch.zeros(n_sets, c, device=dev)
        kinds: dict[str, list] = {"tensor": [], "channel": [], "pixel": []}  # one batched write per kind
        for i, (s, z) in sorted(sets.items()):
            nontrivial = [d for d in range(s.ndim) if s.shape[d] != 1]
            kind = "tensor" if not nontrivial else "channel" if nontrivial == [channel_dim] else "pixel"
            if kind == "pixel" and s.numel() != p:
                raise ValueError(f"pixel-wise sets of different sizes ({s.numel()} vs {p}).")
            kinds[kind].append((i, s, z))
        need_pix = bool(kinds["pixel"])
        ps = torch.ones(n_sets, p, device=dev) if need_pix else None
        pz = torch.zeros(n_sets, p, device=dev) if need_pix else None
        valid = torch.zeros(n_sets, dtype=torch.bool)
        for kind, members in kinds.items():
            if not members:
                continue
            idx = torch.tensor([i for i, _, _ in members], dtype=torch.long)
            valid[idx] = True
            s32 = torch.stack([s.reshape(-1) for _, s, _ in members]).to(dev, torch.float32)
            z32 = torch.stack([z.reshape(-1) for _, _, z in members]).to(dev, torch.float32)
            idx = idx.to(dev)
            if kind == "pixel":
                ps.index_copy_(0, idx, s32)
                pz.index_copy_(0, idx, z32)
            else:  # per tensor: the value in every channel entry (broadcast over the row)
                cs.index_copy_(0, idx, s32.expand(-1, c) if kind == "tensor" else s32)
                cz.index_copy_(0, idx, z32.expand(-1, c) if kind == "tensor" else z32)
        return cls(cs.contiguous(), cz.contiguous(), ps, pz, int(channel_dim),
                   tuple(pixel_dims) if need_pix else (), valid)


def _view(v: Tensor, x: Tensor, dims: tuple[int, ...]) -> Tensor:
    shape = [1] * x.ndim
    if v.numel() != 1:  # a length-1 vector (the sets never need this axis) broadcasts
        for d in dims:
            shape[d] = x.shape[d]
    return v.reshape(shape)


def fake_quant_stacked_reference(x: Tensor, st: ParamStack, set_index: Tensor, bits: int, symmetric: bool) -> Tensor:
    """The same result as the kernel with PyTorch operations (``torch.compile`` fuses them into the neighbouring
    ops; the set is gathered with ``index_select``, so no host sync and no specialisation on the set index)."""
    idx = set_index.reshape(1).to(torch.long)
    s = _view(st.chan_scale.index_select(0, idx), x, (st.channel_dim,))
    z = _view(st.chan_zp.index_select(0, idx), x, (st.channel_dim,))
    if st.pix_scale is not None:
        s = s * _view(st.pix_scale.index_select(0, idx), x, st.pixel_dims)
        z = z + _view(st.pix_zp.index_select(0, idx), x, st.pixel_dims)
    return fake_quant_uniform(x, s, z, bits, symmetric=symmetric)


if _HAVE_TRITON:  # pragma: no cover - compiled on the GPU only

    @triton.jit
    def _fq_kernel(x_ptr, out_ptr, numel, set_ptr,
                   cs_ptr, cz_ptr, c_stride, C,
                   ps_ptr, pz_ptr, p0_stride, P0, p1_stride, P1,
                   qmin, qmax,
                   HAS_PIX: tl.constexpr, ASYM: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        si = tl.load(set_ptr).to(tl.int64)
        c = (offs // c_stride) % C
        s = tl.load(cs_ptr + si * C + c, mask=mask, other=1.0)
        if ASYM:
            z = tl.load(cz_ptr + si * C + c, mask=mask, other=0.0)
        if HAS_PIX:
            p = ((offs // p0_stride) % P0) * P1 + (offs // p1_stride) % P1
            s = s * tl.load(ps_ptr + si * (P0 * P1) + p, mask=mask, other=1.0)
            if ASYM:
                z = z + tl.load(pz_ptr + si * (P0 * P1) + p, mask=mask, other=0.0)
        t = libdevice.rint(tl.math.div_rn(x, s))
        if ASYM:
            t = t + z
        t = tl.clamp(t, qmin, qmax, propagate_nan=tl.PropagateNan.ALL)
        if ASYM:
            t = t - z
        out = t * s
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _dense_strides_ok(x: Tensor) -> bool:
    """``x`` covers its memory densely (some permutation of a contiguous tensor)."""
    if x.is_contiguous():
        return True
    dims = sorted(range(x.ndim), key=lambda d: x.stride(d))
    expected = 1
    for d in dims:
        if x.shape[d] == 1:
            continue
        if x.stride(d) != expected:
            return False
        expected *= x.shape[d]
    return True


def fake_quant_uniform_fused(x: Tensor, st: ParamStack, set_index: Tensor, bits: int, *,
                             symmetric: bool = False, block: int = 2048) -> Tensor:
    """One-kernel fake quantization of ``x`` with parameter set ``set_index`` (0-d int tensor on ``x``'s device)
    of ``st``; result in ``x.dtype`` with ``x``'s strides. Bit-identical to the reference (module docstring)."""
    if not available(x):
        raise RuntimeError("fake_quant_uniform_fused needs a CUDA float tensor and Triton; use the reference.")
    if not _dense_strides_ok(x):
        x = x.contiguous()
    qmin, qmax = qrange(bits, symmetric)
    out = torch.empty_like(x)  # same (dense) strides: the kernel walks memory order
    numel = x.numel()
    if numel == 0:
        return out
    if not st.fits(x):
        raise RuntimeError(f"input of shape {tuple(x.shape)} does not match the stacked parameters "
                           f"(channel dim {st.channel_dim}: {st.chan_scale.shape[1]}, pixel dims {st.pixel_dims}).")
    c_stride, n_c = x.stride(st.channel_dim), st.chan_scale.shape[1]
    has_pix = st.pix_scale is not None
    if has_pix:
        d0 = st.pixel_dims[0]
        d1 = st.pixel_dims[1] if len(st.pixel_dims) > 1 else None
        p0s, p0 = x.stride(d0), x.shape[d0]
        p1s, p1 = (x.stride(d1), x.shape[d1]) if d1 is not None else (1, 1)
        ps, pz = st.pix_scale, st.pix_zp
    else:
        p0s = p0 = p1s = p1 = 1
        ps, pz = st.chan_scale, st.chan_zp  # unused
    grid = (triton.cdiv(numel, block),)
    _fq_kernel[grid](x, out, numel, set_index, st.chan_scale, st.chan_zp, max(c_stride, 1), n_c,
                     ps, pz, max(p0s, 1), p0, max(p1s, 1), p1, float(qmin), float(qmax),
                     HAS_PIX=has_pix, ASYM=not symmetric, BLOCK=block, num_warps=8)
    return out


@torch.library.custom_op("dgq::fake_quant_stacked", mutates_args=())
def _fake_quant_stacked_op(x: Tensor, chan_scale: Tensor, chan_zp: Tensor, pix_scale: Tensor | None,
                           pix_zp: Tensor | None, channel_dim: int, pixel_dims: list[int], set_index: Tensor,
                           bits: int, symmetric: bool) -> Tensor:
    """:func:`fake_quant_stacked_op` as a registered op: opaque to ``torch.compile`` (the kernel, or off CUDA
    the reference, runs as in eager mode); its fake implementation gives the output's shape and strides."""
    st = ParamStack(chan_scale, chan_zp, pix_scale, pix_zp, channel_dim, tuple(pixel_dims),
                    torch.ones(chan_scale.shape[0], dtype=torch.bool))
    if available(x):
        return fake_quant_uniform_fused(x, st, set_index, bits, symmetric=symmetric)
    return fake_quant_stacked_reference(x, st, set_index, bits, symmetric).to(x.dtype)


@_fake_quant_stacked_op.register_fake
def _(x, chan_scale, chan_zp, pix_scale, pix_zp, channel_dim, pixel_dims, set_index, bits, symmetric):
    # the kernel keeps a dense input's strides and makes anything else contiguous
    return torch.empty_like(x) if _dense_strides_ok(x) else x.new_empty(x.shape)


def fake_quant_stacked_op(x: Tensor, st: ParamStack, set_index: Tensor, bits: int, symmetric: bool) -> Tensor:
    """The fused kernel as one opaque op ``torch.ops.dgq.fake_quant_stacked`` (for compiled graphs on CUDA).

    Inductor would otherwise re-derive the quantizer from :func:`fake_quant_stacked_reference`'s operations and
    generate its own code for every call site: a division it need not round like the eager kernel does (compiled
    outputs then drift from eager by flipped levels) and a much longer compile. Through the op the compiled UNet
    quantizes bit-identically to eager mode; the cost is one read and write of the activation per quantizer, as in
    eager mode. Off CUDA the op runs the reference (``x``'s dtype)."""
    return _fake_quant_stacked_op(x, st.chan_scale, st.chan_zp, st.pix_scale, st.pix_zp, int(st.channel_dim),
                                  [int(d) for d in st.pixel_dims], set_index, int(bits), bool(symmetric))
