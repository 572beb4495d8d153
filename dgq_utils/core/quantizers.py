"""Quantizer arithmetic as pure, vectorised tensor functions.

Nothing in this module holds state or knows about models: every function takes tensors (and a bit-width) and
returns tensors. The model integration (``layers.py``, ``attention.py``) keeps the calibrated parameters and
calls these functions on the hot path; the notebooks call them directly on recorded activations.

Two quantizers
--------------
* **Uniform affine** (weights, every activation, and the baseline's softmax quantizer)::

      q   = clamp(round(x / scale) + zero_point, 0, 2^b - 1)          (asymmetric)
      x^  = (q - zero_point) * scale

      q   = clamp(round(x / scale), -2^(b-1), 2^(b-1) - 1)           (symmetric, zero_point = 0)
      x^  = q * scale

  ``round`` is ``torch.round``, i.e. round-half-to-even, as in the official DGQ code. ``scale`` and
  ``zero_point`` broadcast against ``x``: a scalar-shaped tensor (per tensor), a ``(O, 1, ...)`` tensor (per
  output channel of a weight) or an ``(n,)``-per-index tensor reshaped onto one axis (DGQ's groups, where every
  index carries its group's parameters; see :mod:`dgq_utils.core.grouping`).

  The symmetric grid uses the full two's-complement range ``[-2^(b-1), 2^(b-1) - 1]``. Because the symmetric
  scale is ``absmax / (2^(b-1) - 1)``, every value inside the calibrated range ``[-absmax, absmax]`` is served
  by the balanced levels; the extra most-negative level is only reached by values below ``-absmax``, i.e.
  outside the calibration range, where it slightly reduces clipping. It is the range a real int8 kernel stores.

* **Log2** (the softmax output in DGQ's attention-aware quantization)::

      e   = clamp(round(-log2(x / scale)), 0, 2^b - 1)       # rounding in the log domain, half-to-even
      x^  = scale * 2^-e

  for probabilities ``x`` in ``[0, scale]``; see :func:`fake_quant_log2` for the treatment of exact zeros.

Faithful-vs-sound choices in this module (default first)
--------------------------------------------------------
* ``uniform_qparams(include_zero=True)``: the official *per-tensor* init forces 0 into the range; the official
  *group* ranges and the MSE weight search do not (``include_zero=False``). The zero point is a float tensor and is
  **not** clamped to ``[0, 2^b - 1]`` (official); with ``include_zero=False`` a range that excludes 0 gives a zero
  point outside the code range, and 0 itself is then not representable (it clamps to the nearest range end).
* ``fake_quant_log2(zero_level=True)`` (sound): an exact zero stays 0, and the largest exponent code ``2^b - 1``
  is *spent* on the zero level, so the quantizer is a true b-bit code: levels ``scale * 2^-e`` for
  ``e = 0 .. 2^b - 2`` plus 0 (values whose rounded exponent is ``>= 2^b - 1`` become 0).
  ``zero_level=False`` is the official behaviour: no zero level, ``x = 0`` becomes ``scale * 2^-(2^b - 1)``
  (which underflows to exactly 0 in float32 at 8 bits but is ``~1e-19 * scale`` at 6 bits). The two differ only
  below ``scale * 2^-(2^b - 2)``, i.e. by less than ``1e-18 * scale`` at 6 bits and not at all at 8 bits in
  float32 (both underflow there).
* Negative inputs to the log2 quantizer are clamped to 0 instead of raising (it sits on the attention hot path
  and softmax outputs are never negative); values above ``scale`` clamp to ``scale``.
* :func:`weight_qparams` ``range_method="mse"`` follows the official search exactly: raw per-channel min/max
  (0 not forced in), shrink factors ``alpha = 1 - 0.01 i`` for ``i = 0 .. 79`` (i.e. 1.00 down to 0.21: 80
  candidates), score ``mean |Q(w) - w|^2.4`` per channel, first strict minimum. ``"minmax"`` forces 0 in.

Gradients
---------
All fake-quant functions are usable in training: with autograd active and ``x.requires_grad``, they return
``x + (x^ - x).detach()``-style straight-through outputs. For the uniform quantizer the default is the *clipped*
straight-through estimator (gradient exactly 1 where ``x`` is inside the representable range, 0 where it is
clamped; this is what ``clamp(ste_round(x / s) + z)`` gives in the official code); ``ste="identity"`` passes the
gradient everywhere. No gradient flows into ``scale``/``zero_point``. Without autograd (inference, calibration)
the functions take a cheaper path with in-place arithmetic on one float32 work buffer.

Dtypes: work is done in float32 (float64 stays float64) and the result is cast back to ``x.dtype``, so fp16 and
bf16 activations come back as fp16 / bf16.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from dgq_utils.core.registry import Registry

__all__ = [
    "MIN_BITS",
    "MAX_BITS",
    "SCALE_FLOOR",
    "check_bits",
    "qrange",
    "uniform_qparams",
    "fake_quant_uniform",
    "quantize_uniform",
    "dequantize_uniform",
    "fake_quant_log2",
    "quantize_log2",
    "minmax_range",
    "weight_qparams",
    "fake_quant_weight",
    "weight_error",
    "MSE_SEARCH_ALPHAS",
    "MSE_CHUNK_ELEMENTS",
    "ProbQuantizerKind",
    "PROB_QUANTIZERS",
    "log2_levels_",
    "uniform_levels_",
]

MIN_BITS = 2
MAX_BITS = 16
#: Smallest scale a uniform quantizer may have (the official code floors the step at 1e-8 as well).
SCALE_FLOOR = 1e-8

_GRANULARITIES = ("per_channel", "per_tensor")
_RANGE_METHODS = ("minmax", "mse")
_STE_MODES = ("clipped", "identity")


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------
def check_bits(bits: int, *, what: str = "bits") -> int:
    """Return ``bits`` if it is an integer in ``[2, 16]``; raise ``ValueError`` otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(
            f"{what} must be an integer in [{MIN_BITS}, {MAX_BITS}]; got {bits!r}. "
            f"Use 8 for W8A8, 6 for the A6 activations of W8A6/W4A6, 4 for W4 weights."
        )
    return int(bits)


def qrange(bits: int, symmetric: bool = False) -> tuple[int, int]:
    """Integer code range ``(qmin, qmax)``: ``(0, 2^b-1)`` asymmetric, ``(-2^(b-1), 2^(b-1)-1)`` symmetric."""
    bits = check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_tensor(v: Tensor | float, device: torch.device, dtype: torch.dtype) -> Tensor:
    if isinstance(v, Tensor):
        return v.to(device=device, dtype=dtype)
    return torch.tensor(v, device=device, dtype=dtype)


def _needs_grad(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


# ----------------------------------------------------------------------------------------------------------
# uniform affine quantizer
# ----------------------------------------------------------------------------------------------------------
def uniform_qparams(
    lo: Tensor | float,
    hi: Tensor | float,
    bits: int,
    *,
    symmetric: bool = False,
    include_zero: bool = True,
) -> tuple[Tensor, Tensor]:
    """Scale and zero point of a uniform quantizer covering ``[lo, hi]`` (elementwise, any broadcastable shape).

    Asymmetric: with ``include_zero`` the range is widened to contain 0; ``scale = (hi - lo) / (2^b - 1)``
    floored at 1e-8; ``zero_point = round(-lo / scale)`` (half-to-even) as a float tensor, **not** clamped to the
    code range (official behaviour: with ``include_zero=False`` and ``lo > 0`` the zero point is negative).

    Symmetric: ``scale = max(|lo|, |hi|) / (2^(b-1) - 1)`` floored at 1e-8, ``zero_point = 0``.

    Returns float32 tensors (float64 if ``lo``/``hi`` are float64) of the broadcast shape of ``lo`` and ``hi``.
    """
    bits = check_bits(bits)
    ref = lo if isinstance(lo, Tensor) else hi if isinstance(hi, Tensor) else None
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = _work_dtype(ref.dtype) if ref is not None else torch.float32
    lo_t = _as_tensor(lo, device, dtype)
    hi_t = _as_tensor(hi, device, dtype)
    lo_t, hi_t = torch.broadcast_tensors(lo_t, hi_t)
    if not (torch.isfinite(lo_t).all() and torch.isfinite(hi_t).all()):
        raise ValueError(
            "uniform_qparams got a non-finite range (NaN or inf in lo/hi); check the calibration statistics "
            "(an observer that never saw data, or an overflow in fp16 activations)."
        )
    if bool((lo_t > hi_t).any()):
        bad = int((lo_t > hi_t).sum())
        raise ValueError(
            f"uniform_qparams needs lo <= hi elementwise; {bad} entries have lo > hi. "
            "Pass (min, max) in that order."
        )
    return _uniform_qparams_unchecked(lo_t, hi_t, bits, symmetric, include_zero)


def _uniform_qparams_unchecked(lo_t: Tensor, hi_t: Tensor, bits: int, symmetric: bool,
                               include_zero: bool) -> tuple[Tensor, Tensor]:
    """The arithmetic of :func:`uniform_qparams` on ranges known to be finite and ordered (no checks, so no host
    synchronisation on a GPU: the MSE weight search calls it once per chunk of candidates)."""
    if symmetric:
        absmax = torch.maximum(lo_t.abs(), hi_t.abs())
        scale = (absmax / (2 ** (bits - 1) - 1)).clamp_min(SCALE_FLOOR)
        return scale, torch.zeros_like(scale)
    if include_zero:
        lo_t = lo_t.clamp_max(0)
        hi_t = hi_t.clamp_min(0)
    scale = ((hi_t - lo_t) / (2**bits - 1)).clamp_min(SCALE_FLOOR)
    zero_point = torch.round(-lo_t / scale)
    return scale, zero_point


def _check_ste(ste: str) -> None:
    if ste not in _STE_MODES:
        raise ValueError(f"ste must be one of {_STE_MODES}; got {ste!r}.")


def fake_quant_uniform(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | float,
    bits: int,
    *,
    symmetric: bool = False,
    ste: str = "clipped",
) -> Tensor:
    """Quantize-dequantize ``x`` on the uniform grid given by ``scale`` / ``zero_point`` (broadcast against x).

    See the module docstring for the formulas, the symmetric code range and the gradient (straight-through).
    The result has ``x.dtype``; the arithmetic is done in float32.
    """
    qmin, qmax = qrange(bits, symmetric)
    _check_ste(ste)
    wdt = _work_dtype(x.dtype)
    s = _as_tensor(scale, x.device, wdt)
    z = None if symmetric else _as_tensor(zero_point, x.device, wdt)

    if not _needs_grad(x):
        with torch.no_grad():
            t = x.to(wdt) / s  # fresh buffer: x is never modified
            t.round_()
            if z is not None:
                t.add_(z)
            t.clamp_(qmin, qmax)
            if z is not None:
                t.sub_(z)
            t.mul_(s)
            return t.to(x.dtype)

    xw = x.to(wdt)
    with torch.no_grad():
        t = torch.round(xw / s)
        if z is not None:
            t = t + z
        inside = (t >= qmin) & (t <= qmax)
        t = t.clamp(qmin, qmax)
        if z is not None:
            t = t - z
        out = t * s
    if ste == "identity":
        res = xw + (out - xw).detach()
    else:
        passthrough = xw * inside.to(wdt)
        res = passthrough + (out - passthrough).detach()
    return res.to(x.dtype)


def quantize_uniform(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | float,
    bits: int,
    *,
    symmetric: bool = False,
) -> Tensor:
    """Integer codes (``torch.int32``) of ``x``: in ``[0, 2^b-1]`` asymmetric, ``[-2^(b-1), 2^(b-1)-1]`` symmetric."""
    qmin, qmax = qrange(bits, symmetric)
    wdt = _work_dtype(x.dtype)
    with torch.no_grad():
        t = x.detach().to(wdt) / _as_tensor(scale, x.device, wdt)
        t.round_()
        if not symmetric:
            t.add_(_as_tensor(zero_point, x.device, wdt))
        t.clamp_(qmin, qmax)
        return t.to(torch.int32)


def dequantize_uniform(
    q: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | float,
    *,
    symmetric: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Inverse of :func:`quantize_uniform`: ``(q - zero_point) * scale`` (``q * scale`` if symmetric), as ``dtype``."""
    wdt = _work_dtype(dtype)
    t = q.to(wdt)
    if not symmetric:
        t = t - _as_tensor(zero_point, q.device, wdt)
    return (t * _as_tensor(scale, q.device, wdt)).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# log2 quantizer (attention probabilities)
# ----------------------------------------------------------------------------------------------------------
def quantize_log2(x: Tensor, scale: Tensor | float, bits: int, *, zero_level: bool = True) -> Tensor:
    """Exponent codes ``e`` (``torch.int32``) of the log2 quantizer, ``x^ = scale * 2^-e``.

    With ``zero_level=True`` the code ``2^b - 1`` means "exactly zero"; nonzero levels use ``e = 0 .. 2^b - 2``.
    """
    bits = check_bits(bits)
    wdt = _work_dtype(x.dtype)
    with torch.no_grad():
        e = _log2_exponent(x.detach().to(wdt), _as_tensor(scale, x.device, wdt), bits, zero_level)
        return e.to(torch.int32)


def _log2_exponent(xw: Tensor, s: Tensor, bits: int, zero_level: bool) -> Tensor:
    """Float tensor of exponent codes in ``[0, 2^b - 1]`` (``2^b - 1`` = zero when ``zero_level``)."""
    emax = 2**bits - 1
    tiny = torch.finfo(xw.dtype).tiny
    # ratio in [0, 1] after clamping negatives to 0 and values above scale to scale; a zero scale cannot
    # produce NaN (0 / tiny = 0 -> e = emax -> output scale * 2^-emax = 0).
    e = xw.clamp_min(0).div_(s.clamp_min(tiny))
    e.log2_().neg_().round_().clamp_(0, emax)  # -log2(0) = +inf -> clamps to emax
    # With zero_level the caller reads code emax as "zero": exact zeros land there (inf clamps to emax) and so
    # does anything whose rounded exponent is >= emax, i.e. below the smallest nonzero level scale*2^-(emax-1).
    return e


def fake_quant_log2(
    x: Tensor,
    scale: Tensor | float,
    bits: int,
    *,
    zero_level: bool = True,
) -> Tensor:
    """Log2 quantize-dequantize of non-negative ``x`` (attention probabilities) relative to ``scale``.

    ``e = clamp(round(-log2(x / scale)), 0, 2^b - 1)`` (half-to-even in the log domain), ``x^ = scale * 2^-e``.

    * ``scale``: a float or a tensor broadcastable to ``x`` -- e.g. ``x.amax()`` (the official per-batch scale) or
      ``(B, 1, 1, 1)`` per-prompt maxima.
    * ``zero_level=True`` (default, sound): code ``2^b - 1`` represents exact 0, so exact zeros stay exactly 0 and
      the quantizer is a genuine b-bit code (nonzero levels ``scale * 2^-e``, ``e = 0 .. 2^b - 2``).
      ``zero_level=False`` (official): ``x^ = scale * 2^-e`` for all codes, so 0 becomes ``scale * 2^-(2^b-1)``.
    * Inputs must be ``>= 0``: negative values are clamped to 0 (no check -- hot path). Values above ``scale``
      become ``scale``. NaN propagates.

    Returns ``x.dtype``; computed in float32. Straight-through (identity) gradient when autograd is active.
    """
    bits = check_bits(bits)
    emax = 2**bits - 1
    wdt = _work_dtype(x.dtype)
    s = _as_tensor(scale, x.device, wdt)
    with torch.no_grad():
        xw = x.detach().to(wdt)
        e = _log2_exponent(xw, s, bits, zero_level)
        if zero_level:
            is_zero = e == emax
        out = torch.exp2(e.neg_()).mul_(s)
        if zero_level:
            out.masked_fill_(is_zero, 0.0)
    if _needs_grad(x):
        xg = x.to(wdt)
        return (xg + (out - xg).detach()).to(x.dtype)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# ranges and weights
# ----------------------------------------------------------------------------------------------------------
def minmax_range(x: Tensor, reduce_dims: Sequence[int] | int | None) -> tuple[Tensor, Tensor]:
    """``(amin, amax)`` of ``x`` over ``reduce_dims`` (``None`` = all dims), with ``keepdim=True``."""
    if reduce_dims is None:
        dims: tuple[int, ...] = tuple(range(x.ndim))
    elif isinstance(reduce_dims, int):
        dims = (reduce_dims,)
    else:
        dims = tuple(reduce_dims)
    if x.ndim == 0:
        v = x.detach().reshape(())
        return v.clone(), v.clone()
    if not dims:
        return x.detach().clone(), x.detach().clone()
    xd = x.detach()
    return torch.amin(xd, dim=dims, keepdim=True), torch.amax(xd, dim=dims, keepdim=True)


#: Shrink factors of the official MSE weight-range search: 1.00, 0.99, ..., 0.21 (80 candidates).
MSE_SEARCH_ALPHAS: tuple[float, ...] = tuple(1.0 - 0.01 * i for i in range(80))
#: Weight elements x candidates evaluated at once by the MSE search, per device type (float32 work tensors of this
#: many elements: 64 MiB on the CPU, 256 MiB on a GPU).
MSE_CHUNK_ELEMENTS: dict[str, int] = {"cpu": 2**24, "cuda": 2**26}


def _check_weight_opts(w: Tensor, granularity: str, range_method: str) -> None:
    if granularity not in _GRANULARITIES:
        raise ValueError(f"granularity must be one of {_GRANULARITIES}; got {granularity!r}.")
    if range_method not in _RANGE_METHODS:
        raise ValueError(f"range_method must be one of {_RANGE_METHODS}; got {range_method!r}.")
    if w.ndim < 1 or w.numel() == 0:
        raise ValueError(f"weight_qparams needs a non-empty weight tensor; got shape {tuple(w.shape)}.")
    if not torch.is_floating_point(w):
        raise ValueError(f"weight_qparams needs a floating-point weight; got dtype {w.dtype}.")


def weight_qparams(
    w: Tensor,
    bits: int,
    *,
    granularity: str = "per_channel",
    symmetric: bool = False,
    range_method: str = "minmax",
    p: float = 2.4,
    alphas: Sequence[float] = MSE_SEARCH_ALPHAS,
    include_zero: bool | None = None,
    max_chunk_elements: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Scale and zero point for a weight ``w`` (Linear ``(O, I)``, Conv ``(O, I, kh, kw)``, any ``(O, ...)``).

    * ``granularity="per_channel"``: one parameter pair per output channel (dim 0), returned shaped
      ``(O, 1, ..., 1)`` (``w.ndim`` dims) so it broadcasts onto ``w``; ``"per_tensor"``: shape ``(1, ..., 1)``.
    * ``range_method="minmax"``: the channel (or tensor) min/max, widened to contain 0 (``include_zero`` default
      True). ``"mse"``: the official search -- candidate ranges ``[alpha * lo, alpha * hi]`` for ``alpha`` in
      ``alphas`` (default 1.00 .. 0.21, 80 values) over the raw min/max (``include_zero`` default False), scored by
      ``mean |Q(w) - w|^p`` per channel (``p = 2.4``), keeping the first strict minimum. Vectorised over channels
      and candidates; candidates are evaluated in chunks of at most ``max_chunk_elements`` weight elements
      (default :data:`MSE_CHUNK_ELEMENTS` for the weight's device type: 2^24 on the CPU, 2^26 on a GPU, where the
      search then takes 1-2 chunks for most layers instead of up to 80 and never waits for the device: the ranges
      are checked once, before the candidates).

    Returned tensors are float32 (float64 for a float64 weight).
    """
    bits = check_bits(bits)
    _check_weight_opts(w, granularity, range_method)
    wdt = _work_dtype(w.dtype)
    wd = w.detach().to(wdt)
    reduce = tuple(range(1, wd.ndim)) if granularity == "per_channel" else None
    if granularity == "per_channel" and wd.ndim == 1:
        lo, hi = wd.clone(), wd.clone()
    else:
        lo, hi = minmax_range(wd, reduce)
        if granularity == "per_tensor":
            lo, hi = lo.reshape((1,) * wd.ndim), hi.reshape((1,) * wd.ndim)

    if range_method == "minmax":
        inc = True if include_zero is None else include_zero
        return uniform_qparams(lo, hi, bits, symmetric=symmetric, include_zero=inc)

    inc = False if include_zero is None else include_zero
    if p <= 0:
        raise ValueError(f"p (the error exponent of the MSE search) must be > 0; got {p}.")
    alpha_t = torch.as_tensor(list(alphas), dtype=wdt, device=wd.device)
    if alpha_t.ndim != 1 or alpha_t.numel() == 0:
        raise ValueError("alphas must be a non-empty sequence of shrink factors, e.g. MSE_SEARCH_ALPHAS.")
    if not bool(((alpha_t > 0) & torch.isfinite(alpha_t)).all()):
        raise ValueError("alphas must be positive finite shrink factors (the candidates are alpha * range).")
    uniform_qparams(lo, hi, bits, symmetric=symmetric, include_zero=inc)  # checks the range once (finite, lo <= hi)
    n_cand = alpha_t.numel()
    cand_shape = (-1,) + (1,) * wd.ndim  # candidates on a new leading dim
    if max_chunk_elements is None:
        max_chunk_elements = MSE_CHUNK_ELEMENTS.get(wd.device.type, MSE_CHUNK_ELEMENTS["cpu"])
    chunk = max(1, min(n_cand, int(max_chunk_elements) // max(1, wd.numel())))
    qmin, qmax = qrange(bits, symmetric)
    scores = []
    for start in range(0, n_cand, chunk):
        a = alpha_t[start : start + chunk].reshape(cand_shape)  # (c, 1, ...)
        # (c, O, 1, ...); positive alphas keep the checked ranges finite and ordered
        s, z = _uniform_qparams_unchecked(*torch.broadcast_tensors(a * lo, a * hi), bits, symmetric, inc)
        t = torch.round(wd / s)
        if not symmetric:
            t.add_(z)
        t.clamp_(qmin, qmax)
        if not symmetric:
            t.sub_(z)
        t.mul_(s).sub_(wd).abs_().pow_(p)  # |Q(w) - w|^p, shape (c, O, I, ...)
        if granularity == "per_channel":
            scores.append(t.flatten(2).mean(dim=2) if wd.ndim > 1 else t)  # (c, O)
        else:
            scores.append(t.flatten(1).mean(dim=1, keepdim=True))  # (c, 1)
    score = torch.cat(scores, dim=0)  # (n_cand, O) or (n_cand, 1)
    best = torch.argmin(score, dim=0)  # first minimal index = first strict minimum along the search order
    best_alpha = alpha_t[best].reshape(lo.shape)
    return uniform_qparams(best_alpha * lo, best_alpha * hi, bits, symmetric=symmetric, include_zero=inc)


def fake_quant_weight(
    w: Tensor,
    bits: int,
    *,
    granularity: str = "per_channel",
    symmetric: bool = False,
    range_method: str = "minmax",
    **kwargs,
) -> Tensor:
    """``fake_quant_uniform(w, *weight_qparams(w, ...))``; extra keyword arguments go to :func:`weight_qparams`."""
    scale, zp = weight_qparams(
        w, bits, granularity=granularity, symmetric=symmetric, range_method=range_method, **kwargs
    )
    return fake_quant_uniform(w, scale, zp, bits, symmetric=symmetric)


def weight_error(w: Tensor, w_hat: Tensor, *, p: float = 2.4, per_channel: bool = True) -> Tensor:
    """``mean |w_hat - w|^p`` per output channel (shape ``(O,)``) or over the whole tensor (scalar)."""
    err = (w_hat.detach().double() - w.detach().double()).abs().pow(p)
    if per_channel and err.ndim > 1:
        return err.flatten(1).mean(dim=1)
    return err.mean()


# ----------------------------------------------------------------------------------------------------------
# probability (softmax output) quantizers: the registry that AttentionQuantConfig.quantizer names
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbQuantizerKind:
    """One probability quantizer, for probabilities ``p`` in ``[0, max]`` (``max`` broadcastable to ``p``).

    ``fake_quant(p, max, bits, zero_level=...)``: the reference (allocating, autograd-friendly) result.
    ``levels_(p, max, bits, zero_level=..., clamp_max=...)``: in place, ``p`` becomes the levels *before* the final
    multiplication; returns the multiplier (quantized = levels * multiplier). ``clamp_max``: clip ratios above 1
    (a static, calibrated max can be exceeded). ``zero_level`` applies to quantizers that have one.
    """

    fake_quant: Callable
    levels_: Callable


#: name -> :class:`ProbQuantizerKind`; ``AttentionQuantConfig.quantizer`` must be one of these names
PROB_QUANTIZERS: Registry[ProbQuantizerKind] = Registry("probability quantizer")

# sqrt(2) = 1.0110101000001001111001100110011... in binary: its 23-bit mantissa lies strictly between 0x3504F3 and
# 0x3504F4, so "mantissa >= sqrt(2)" is "mantissa bits >= 0x3504F4", i.e. adding 0x800000 - 0x3504F4 carries.
_SQRT2_CARRY = 0x800000 - 0x3504F4
_EXPONENT_MASK = 0x7F800000


def log2_levels_(p: Tensor, m: Tensor, bits: int, *, zero_level: bool = True, clamp_max: bool = False) -> Tensor:
    """In place on float32 ``p``: ``2^round(log2(p / m))`` (exact round-to-nearest in the log domain, by two
    integer operations on the float32 bits), the smallest level ``2^-(2^b-1)`` or 0 below it; returns ``m``."""
    emax = 2**bits - 1
    p.div_(m)
    raw = p.view(torch.int32)
    raw.add_(_SQRT2_CARRY)  # carry into the exponent iff mantissa >= sqrt(2): exact log-domain rounding
    raw.bitwise_and_(_EXPONENT_MASK)  # -> 2^round(log2 r)  (r >= 0)
    smallest = 2.0**-emax  # 0.0 in float32 for emax > 149
    if zero_level:
        torch.nn.functional.threshold_(p, smallest, 0.0)  # the exponent code 2^b - 1 means zero
    else:
        p.clamp_min_(smallest)
    if clamp_max:
        p.clamp_max_(1.0)
    return m


def uniform_levels_(p: Tensor, m: Tensor, bits: int, *, zero_level: bool = True, clamp_max: bool = False) -> Tensor:
    """In place on ``p``: the integer codes ``clamp(round(p / step), 0, 2^b - 1)`` with ``step = m / (2^b - 1)``
    (zero point 0; ``zero_level`` / ``clamp_max`` do not apply: 0 is a level and codes are clamped); returns
    ``step``."""
    step = (m / (2**bits - 1)).clamp_min(SCALE_FLOOR)
    p.div_(step).round_().clamp_(0, 2**bits - 1)
    return step


def _uniform_prob_fake_quant(p: Tensor, m: Tensor, bits: int, *, zero_level: bool = True) -> Tensor:
    step = (m / (2**bits - 1)).clamp_min(SCALE_FLOOR)
    return fake_quant_uniform(p, step, 0.0, bits)


PROB_QUANTIZERS.register("log2", ProbQuantizerKind(fake_quant=fake_quant_log2, levels_=log2_levels_))
PROB_QUANTIZERS.register("uniform", ProbQuantizerKind(fake_quant=_uniform_prob_fake_quant, levels_=uniform_levels_))
