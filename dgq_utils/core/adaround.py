"""AdaRound: learn whether each weight rounds down or up, so that a layer's output stays close to FP.

Round-to-nearest minimises each weight's own error; what matters is the layer's *output* error on real inputs.
Nagel et al. (2020, "Up or Down? Adaptive Rounding for Post-Training Quantization") keep the grid (scale, zero
point) fixed and optimise, per weight, a continuous variable ``a`` with the soft rounding

    h(a) = clamp(1.2 * sigmoid(a) - 0.1, 0, 1),      W_soft = s * (clamp(floor(W / s) + h(a) + z, qmin, qmax) - z)

minimising ``|| X (W_soft - W)^T ||^2`` (squared output error summed over output channels, averaged over input
rows ``X``) plus ``lambda * sum(1 - |2 h(a) - 1|^beta)``, a regulariser that pushes every ``h`` to 0 or 1 as
``beta`` is annealed from large (flat; only the ends penalised) to small (every value between penalised). ``a``
starts where ``h(a)`` equals the fractional part of ``W / s`` (so ``W_soft = W`` inside the grid), the
regulariser is off for a warm-up fraction of the iterations, and the result is the hard rounding
``floor(W / s) + [a >= 0]`` -- every quantized weight is the floor or the ceiling of ``W / s`` (clamped to the
grid), i.e. within one step of nearest rounding.

This module is the numerical part only (tensors in, a boolean "round up" mask out): a layer is a matrix
``W (O, I)`` applied to rows ``X (M, I)`` -- a Linear's token vectors, or a Conv's kernel patches at sampled
output positions with ``W`` reshaped to ``(O, C * kh * kw)`` (see :mod:`dgq_utils.core.input_sample`). Which
layers, which inputs and when: :mod:`dgq_utils.calibrate.reconstruction`.

Deterministic: the mini-batches are drawn with a CPU ``torch.Generator`` seeded with ``seed``; with the same
inputs, settings and torch thread count the mask is bit-identical.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dgq_utils.core.quantizers import check_bits, qrange

__all__ = [
    "AdaRoundResult",
    "SoftRounding",
    "adaround",
    "optimise_rounding",
    "beta_at",
    "fake_quant_rounded",
    "nearest_round_up",
    "output_error",
    "pack_mask",
    "soft_rounding",
    "unpack_mask",
]

_ZETA, _GAMMA = 1.1, -0.1  # rectified sigmoid stretch: h = clamp(sigmoid(a) * (zeta - gamma) + gamma, 0, 1)


@dataclass
class AdaRoundResult:
    """``round_up``: bool, shape of the weight (``True``: ``ceil``-side level ``floor(W / s) + 1``).
    ``loss_nearest`` / ``loss_adaround``: output error (:func:`output_error`) of nearest and of the learned hard
    rounding on all rows given; ``kept_nearest``: the learned rounding was worse and nearest was kept
    (``keep_better``); ``flipped``: fraction of weights rounded differently from nearest."""

    round_up: Tensor
    loss_nearest: float
    loss_adaround: float
    kept_nearest: bool
    flipped: float


def soft_rounding(alpha: Tensor) -> Tensor:
    """``h(a) = clamp(1.2 sigmoid(a) - 0.1, 0, 1)``."""
    return torch.clamp(torch.sigmoid(alpha) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def _alpha_init(frac: Tensor) -> Tensor:
    """``a`` with ``h(a) = frac`` (``frac`` in [0, 1))."""
    p = (frac - _GAMMA) / (_ZETA - _GAMMA)  # in [1/12, 11/12): finite logits
    return torch.log(p) - torch.log1p(-p)


def beta_at(it: int, iters: int, beta_start: float, beta_end: float, warmup: float) -> float | None:
    """The regulariser's ``beta`` at iteration ``it`` (0-based), ``None`` during the warm-up (regulariser off):
    linear from ``beta_start`` at the end of the warm-up to ``beta_end`` at the last iteration."""
    start = int(warmup * iters)
    if it < start:
        return None
    span = max(1, iters - 1 - start)
    rel = min(1.0, (it - start) / span)
    return beta_end + (beta_start - beta_end) * (1.0 - rel)


def _grid(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, symmetric: bool):
    qmin, qmax = qrange(check_bits(bits), symmetric)
    wdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    wd = w.detach().to(wdt)
    s = scale.detach().to(device=w.device, dtype=wdt)
    z = torch.zeros((), dtype=wdt, device=w.device) if symmetric else zero_point.detach().to(w.device, wdt)
    return wd, s, z, qmin, qmax


def nearest_round_up(w: Tensor, scale: Tensor) -> Tensor:
    """The ``round_up`` mask that reproduces round-to-nearest (``round(W / s) > floor(W / s)``)."""
    t = w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32) / scale.to(w.device)
    return torch.round(t) > torch.floor(t)


def fake_quant_rounded(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, round_up: Tensor, *,
                       symmetric: bool = False) -> Tensor:
    """``s * (clamp(floor(W / s) + round_up + z, qmin, qmax) - z)`` in ``w``'s dtype. With
    :func:`nearest_round_up` this is bit-identical to :func:`~dgq_utils.core.quantizers.fake_quant_uniform`."""
    wd, s, z, qmin, qmax = _grid(w, scale, zero_point, bits, symmetric)
    if round_up.shape != w.shape:
        raise ValueError(f"round_up has shape {tuple(round_up.shape)}, the weight {tuple(w.shape)}.")
    with torch.no_grad():
        t = wd / s
        t.floor_()
        t.add_(round_up.to(device=t.device, dtype=t.dtype))
        t.add_(z)
        t.clamp_(qmin, qmax)
        t.sub_(z)
        t.mul_(s)
    return t.to(w.dtype)


def output_error(x: Tensor, w_q: Tensor, w: Tensor) -> float:
    """``mean over rows of sum over outputs (x (w_q - w)^T)^2`` for rows ``x (M, I)`` and weights ``(O, I)``."""
    d = (w_q.reshape(w_q.shape[0], -1) - w.reshape(w.shape[0], -1)).to(x.dtype)
    out = 0.0
    for start in range(0, x.shape[0], 4096):
        out += float((x[start:start + 4096] @ d.T).pow(2).sum())
    return out / max(1, x.shape[0])


class SoftRounding:
    """The rounding variables of one weight: ``alpha`` (a leaf tensor to optimise), started where the soft
    rounding equals the fractional part of ``W / s``; :meth:`weight` is the soft-quantized weight (differentiable
    in ``alpha``), :meth:`regulariser` the rounding regulariser, :meth:`round_up` the hard decision."""

    def __init__(self, w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, *, symmetric: bool = False):
        self.shape = w.shape
        self.bits, self.symmetric = int(bits), bool(symmetric)
        self.wd, self.s, self.z, self.qmin, self.qmax = _grid(w, scale, zero_point, bits, symmetric)
        t = self.wd / self.s
        self.base = torch.floor(t)
        self.alpha = _alpha_init(t - self.base).requires_grad_(True)

    def weight(self) -> Tensor:
        h = soft_rounding(self.alpha)
        return self.s * (torch.clamp(self.base + h + self.z, self.qmin, self.qmax) - self.z)

    def regulariser(self, beta: float) -> Tensor:
        return (1.0 - (2.0 * soft_rounding(self.alpha) - 1.0).abs().pow(beta)).sum()

    def round_up(self) -> Tensor:
        return (self.alpha.detach() >= 0).reshape(self.shape)


def optimise_rounding(softs, reconstruction_loss, *, iters: int = 1000, lr: float = 1e-2, reg_weight: float = 0.01,
                      beta_start: float = 20.0, beta_end: float = 2.0, warmup: float = 0.2) -> None:
    """Adam on the ``alpha`` of every :class:`SoftRounding` in ``softs`` jointly, minimising
    ``reconstruction_loss(it)`` (a scalar tensor computed with the soft weights at iteration ``it``) plus the
    annealed rounding regulariser of all of them (off during the warm-up). Leaves the learned ``alpha`` in place."""
    opt = torch.optim.Adam([sr.alpha for sr in softs], lr=lr)
    for it in range(int(iters)):
        loss = reconstruction_loss(it)
        beta = beta_at(it, int(iters), beta_start, beta_end, warmup)
        if beta is not None and reg_weight > 0:
            loss = loss + reg_weight * sum(sr.regulariser(beta) for sr in softs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def adaround(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, x: Tensor, *, symmetric: bool = False,
             iters: int = 1000, lr: float = 1e-2, batch_size: int = 64, reg_weight: float = 0.01,
             beta_start: float = 20.0, beta_end: float = 2.0, warmup: float = 0.2, seed: int = 0,
             keep_better: bool = True) -> AdaRoundResult:
    """Learn the rounding of ``w`` (``(O, ...)``; reshaped to ``(O, I)``) on input rows ``x (M, I)``.

    ``scale`` / ``zero_point`` broadcast onto ``w`` (per channel ``(O, 1, ...)`` or per tensor) and are not
    changed. Returns an :class:`AdaRoundResult`; see the module docstring for the objective.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"adaround needs a non-empty (rows, features) input; got shape {tuple(x.shape)}.")
    shape = w.shape
    sr = SoftRounding(w, scale, zero_point, bits, symmetric=symmetric)
    w2 = sr.wd.reshape(shape[0], -1)
    if x.shape[1] != w2.shape[1]:
        raise ValueError(f"adaround: input rows have {x.shape[1]} features, the weight {w2.shape[1]}.")
    xd = x.detach().to(device=w.device, dtype=sr.wd.dtype)
    gen = torch.Generator().manual_seed(int(seed))
    m = xd.shape[0]
    bs = min(int(batch_size), m)

    def rec(it):
        xb = xd.index_select(0, torch.randint(0, m, (bs,), generator=gen).to(xd.device))
        return (xb @ (sr.weight().reshape(shape[0], -1) - w2).T).pow(2).sum(dim=1).mean()

    optimise_rounding([sr], rec, iters=iters, lr=lr, reg_weight=reg_weight, beta_start=beta_start,
                      beta_end=beta_end, warmup=warmup)
    with torch.no_grad():
        up = sr.round_up()
        wd, s, z = sr.wd, sr.s, sr.z
        near = nearest_round_up(wd, s.expand(shape))
        w_near = fake_quant_rounded(wd, s, z, bits, near, symmetric=symmetric)
        w_ada = fake_quant_rounded(wd, s, z, bits, up, symmetric=symmetric)
        l_near, l_ada = output_error(xd, w_near, wd), output_error(xd, w_ada, wd)
    kept = bool(keep_better and l_ada > l_near)
    if kept:
        up, l_ada = near, l_near
    flipped = float((up != near).float().mean())
    return AdaRoundResult(round_up=up.cpu(), loss_nearest=l_near, loss_adaround=l_ada, kept_nearest=kept,
                          flipped=flipped)


def pack_mask(mask: Tensor) -> Tensor:
    """A bool mask as a flat ``uint8`` tensor, 8 entries per byte (``numpy.packbits`` order)."""
    return torch.from_numpy(np.packbits(mask.detach().to("cpu", torch.bool).reshape(-1).numpy()))


def unpack_mask(packed: Tensor, shape) -> Tensor:
    """Inverse of :func:`pack_mask` for a mask of ``shape``."""
    n = math.prod(shape)
    data = packed.detach().to("cpu", torch.uint8).reshape(-1)
    if data.numel() != (n + 7) // 8:
        raise ValueError(f"a packed mask for shape {tuple(shape)} has {(n + 7) // 8} bytes; got {data.numel()}.")
    bits = np.unpackbits(data.numpy(), count=n)
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))
