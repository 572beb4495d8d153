"""Streaming statistics of activations and attention probabilities (min/max per index, EMA, percentiles,
log2 histograms): the accumulators that observation and calibration feed. Pure tensor code.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dgq_utils.core.grouping import AxisStats

__all__ = [
    "LOG2_HIST_EDGES",
    "AttentionStats",
    "TensorStats",
    "axes_for",
    "check_finite",
    "stats_to_host",
]

#: Bin edges of the log2-probability histograms: (-inf, -30], (-30, -29], ..., (-1, 0].
LOG2_HIST_EDGES: tuple[float, ...] = tuple(float(e) for e in range(-30, 1))
PERCENTILE_SAMPLES = 65536


def axes_for(x: Tensor, layout: str) -> tuple[int | tuple[int, ...], int | tuple[int, ...] | None]:
    """``(channel_axis, pixel_axis)`` of an input of the given ``layout`` (see the module table).

    ``layout``: ``"linear"`` (channel = last dim, pixel = the dims between batch and channel, none for 2-D),
    ``"conv"`` (``(B, C, H, W)``: 1 and ``(2, 3)``), ``"unfold"`` (``(B, rows, L)``: 1 and 2),
    ``"qkv"`` (``(B, heads, N, d)``: 3 and 2).
    """
    if layout == "linear":
        if x.ndim < 2:
            raise ValueError(f"Linear input must have at least 2 dims; got shape {tuple(x.shape)}.")
        pixel = tuple(range(1, x.ndim - 1)) or None
        if pixel is not None and len(pixel) == 1:
            pixel = pixel[0]
        return x.ndim - 1, pixel
    if layout == "conv":
        return 1, (2, 3)
    if layout == "unfold":
        return 1, 2
    if layout == "qkv":
        return 3, 2
    raise ValueError(f"unknown layout {layout!r}; use 'linear', 'conv', 'unfold' or 'qkv'.")


# ----------------------------------------------------------------------------------------------------------
# per-tensor accumulator (one per layer x parameter set)
# ----------------------------------------------------------------------------------------------------------
_SEQ = itertools.count()  # global order of observations (names the *first* non-finite input on the GPU path)
_NO_BAD = 2**62


@dataclass
class TensorStats:
    """Running statistics of one activation (one layer, one timestep set).

    ``channel`` / ``pixel``: :class:`AxisStats` (``None`` if not requested or the input has no such axis).
    ``shape``: the input shape without the batch dim (pixel groups are tied to it). ``min``/``max``: per tensor.
    ``ema_min``/``ema_max``: exponential moving averages (``m * old + (1 - m) * new``, first call initialises).
    ``abs_percentiles``: running sums of the approximate ``|x|`` percentiles (divide by ``calls``).

    Inputs on a GPU are reduced on the GPU and kept there (min / max / EMA as float64 0-d tensors -- the same
    IEEE double arithmetic as the CPU path's Python floats, so the same numbers): an update never waits for the
    device. The NaN / inf check is then deferred: :func:`check_finite` (called by calibration before the
    parameters are made) raises the ``FloatingPointError`` for the first non-finite input in observation order.
    Reading ``min`` / ``max`` / ``ema_*`` synchronises once; :meth:`range_tensors` does not.
    """

    channel: AxisStats | None = None
    pixel: AxisStats | None = None
    shape: tuple[int, ...] | None = None
    calls: int = 0
    abs_percentiles: dict[float, float] = field(default_factory=dict)
    _min: float | Tensor = field(default=math.inf, repr=False)
    _max: float | Tensor = field(default=-math.inf, repr=False)
    _ema_min: float | Tensor | None = field(default=None, repr=False)
    _ema_max: float | Tensor | None = field(default=None, repr=False)
    _bad_seq: Tensor | None = field(default=None, repr=False)  # device path: first non-finite observation
    _where: str = field(default="activation", repr=False)
    _bad_shape: tuple[int, ...] | None = field(default=None, repr=False)

    # -- per-tensor values (floats) -----------------------------------------------------------------------
    def _f(self, v):
        if isinstance(v, Tensor):
            check_finite([self])
            return float(v)
        return v

    @property
    def min(self) -> float:
        return self._f(self._min)

    @property
    def max(self) -> float:
        return self._f(self._max)

    @property
    def ema_min(self) -> float | None:
        return self._f(self._ema_min)

    @property
    def ema_max(self) -> float | None:
        return self._f(self._ema_max)

    def range_tensors(self, ema: bool = False) -> tuple[Tensor, Tensor]:
        """``(lo, hi)`` as float32 0-d tensors on the statistics' device (no host sync on the GPU path)."""
        lo, hi = (self._ema_min, self._ema_max) if ema else (self._min, self._max)
        if isinstance(lo, Tensor):
            return lo.float(), hi.float()
        return torch.tensor(float(lo)), torch.tensor(float(hi))

    def update(
        self,
        x: Tensor,
        layout: str,
        *,
        axes: Sequence[str] = ("channel", "pixel"),
        ema_momentum: float = 0.95,
        percentiles: Sequence[float] = (),
        where: str = "activation",
    ) -> None:
        """Fold one observed input ``x`` into the statistics (raises ``FloatingPointError`` on NaN / inf; on a
        GPU at :func:`check_finite`)."""
        xd = x.detach()
        mn, mx = torch.aminmax(xd.reshape(-1))
        shape = tuple(xd.shape[1:])
        if self.shape is not None and shape != self.shape:
            raise ValueError(
                f"{where}: input shape changed during calibration from {self.shape} to {shape} (batch dim "
                "excluded). All calibration batches must use the same resolution."
            )
        if xd.device.type == "cpu":
            mn_f, mx_f = float(mn), float(mx)
            if not (math.isfinite(mn_f) and math.isfinite(mx_f)):
                raise _nonfinite(where, xd)
            self._min, self._max = min(self._min, mn_f), max(self._max, mx_f)
            if self._ema_min is None:
                self._ema_min, self._ema_max = mn_f, mx_f
            else:
                m = ema_momentum
                self._ema_min = m * self._ema_min + (1 - m) * mn_f
                self._ema_max = m * self._ema_max + (1 - m) * mx_f
        else:
            mn_d, mx_d = mn.double(), mx.double()
            bad = torch.where(torch.isfinite(mn_d) & torch.isfinite(mx_d), _NO_BAD, next(_SEQ))
            self._bad_seq = bad if self._bad_seq is None else torch.minimum(self._bad_seq, bad)
            if not isinstance(self._min, Tensor):
                self._where, self._bad_shape = where, tuple(xd.shape)
                self._min, self._max = mn_d, mx_d
                self._ema_min, self._ema_max = mn_d, mx_d
            else:
                self._min, self._max = torch.minimum(self._min, mn_d), torch.maximum(self._max, mx_d)
                m = ema_momentum
                self._ema_min = m * self._ema_min + (1 - m) * mn_d
                self._ema_max = m * self._ema_max + (1 - m) * mx_d
        self.shape = shape
        self.calls += 1
        if axes:
            ch_axis, px_axis = axes_for(xd, layout)
            if "channel" in axes:
                s = AxisStats.from_tensor(xd, ch_axis)
                self.channel = s if self.channel is None else self.channel.merge(s)
            if "pixel" in axes and px_axis is not None:
                s = AxisStats.from_tensor(xd, px_axis)
                self.pixel = s if self.pixel is None else self.pixel.merge(s)
        if percentiles:
            flat = xd.reshape(-1)
            step = max(1, flat.numel() // PERCENTILE_SAMPLES)
            sample = flat[::step].abs().float()
            levels = torch.tensor([p / 100.0 for p in percentiles], dtype=sample.dtype, device=sample.device)
            qs = torch.quantile(sample, levels)
            for p, q in zip(percentiles, qs.tolist()):
                self.abs_percentiles[p] = self.abs_percentiles.get(p, 0.0) + q

    def axis(self, name: str) -> AxisStats | None:
        if name not in ("channel", "pixel"):
            raise ValueError(f"axis must be 'channel' or 'pixel'; got {name!r}.")
        return self.channel if name == "channel" else self.pixel


def _nonfinite(where: str, xd: Tensor | None, shape=None) -> FloatingPointError:
    if xd is not None:
        n_nan, n_inf = int(torch.isnan(xd).sum()), int(torch.isinf(xd).sum())
        what = f"{n_nan} NaN and {n_inf} inf values in an input of shape {tuple(xd.shape)}"
    else:
        what = f"NaN or inf values in an input of shape {shape}"
    return FloatingPointError(
        f"Non-finite activation at {where}: {what}. Check the model weights / the layers upstream of this one."
    )


def check_finite(stats) -> None:
    """Raise ``FloatingPointError`` for the first non-finite input (in observation order) that any of ``stats``
    (:class:`TensorStats`, GPU path) saw. One host synchronisation per device for the whole list."""
    pending = [st for st in stats if st._bad_seq is not None]
    if not pending:
        return
    seqs = torch.stack([st._bad_seq.to(pending[0]._bad_seq.device) for st in pending]).cpu()
    first = int(seqs.argmin())
    if int(seqs[first]) < _NO_BAD:
        st = pending[first]
        raise _nonfinite(st._where, None, st._bad_shape)
    for st in pending:
        st._bad_seq = None  # checked: later reads need no sync for the check


def stats_to_host(stats) -> None:
    """Bring the GPU-path statistics of every :class:`TensorStats` in ``stats`` to the host, in place, with one
    device -> host copy per device (instead of one sync per value): afterwards they are exactly what the CPU path
    would hold (Python floats, CPU :class:`AxisStats`). Runs :func:`check_finite` first."""
    stats = list(stats)
    check_finite(stats)
    by_device: dict[torch.device, list] = {}
    for st in stats:
        for name in ("_min", "_max", "_ema_min", "_ema_max"):
            v = getattr(st, name)
            if isinstance(v, Tensor) and v.device.type != "cpu":
                by_device.setdefault(v.device, []).append((st, name, v.double().reshape(1)))
        for ax in ("channel", "pixel"):
            a = getattr(st, ax)
            if a is not None and a.mins.device.type != "cpu":
                by_device.setdefault(a.mins.device, []).append((st, ax, torch.cat([a.mins, a.maxs]).double()))
    for items in by_device.values():
        flat = torch.cat([t for _, _, t in items]).cpu()
        pos = 0
        for st, name, t in items:
            part = flat[pos : pos + t.numel()]
            pos += t.numel()
            if name.startswith("_"):
                setattr(st, name, float(part[0]))
            else:
                a = getattr(st, name)
                half = part.numel() // 2
                setattr(st, name, AxisStats(part[:half].float(), part[half:].float(), a.count))


# ----------------------------------------------------------------------------------------------------------
# attention-probability accumulator (one per attention layer x parameter set)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class AttentionStats:
    """Running statistics of the softmax probabilities ``(B, heads, Nq, Nk)`` of one attention layer.

    Per head: ``start_mass_sum`` (sum over samples of the mean probability on key 0), ``start_mass_max``,
    ``max_prob`` and ``max_prob_excl_start`` (max over everything), plus ``log2(p)`` histograms per head.
    ``samples``: number of samples folded in.
    """

    heads: int = 0
    start_mass_sum: Tensor | None = None
    start_mass_max: Tensor | None = None
    max_prob: Tensor | None = None
    max_prob_excl_start: Tensor | None = None
    hist: Tensor | None = None
    samples: int = 0
    num_keys: int = 0

    def update(self, probs: Tensor) -> None:
        p = probs.detach().float()
        b, h, _, nk = p.shape
        start = p[..., 0].mean(dim=2)  # (B, h): mean over queries
        mx = p.amax(dim=(0, 2, 3))
        mx_rest = p[..., 1:].amax(dim=(0, 2, 3)) if nk > 1 else torch.zeros(h, device=p.device)
        edges = torch.tensor(LOG2_HIST_EDGES, device=p.device)
        logp = p.clamp_min(2.0**-126).log2().transpose(0, 1).reshape(h, -1)  # (h, everything)
        idx = torch.bucketize(logp, edges)  # 0: <= -30, ..., len(edges): > 0 (never)
        hist = torch.zeros(h, len(edges) + 1, dtype=torch.float64, device=p.device)
        hist.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
        if self.start_mass_sum is None:
            self.heads, self.num_keys = h, nk
            self.start_mass_sum = start.sum(0).double()
            self.start_mass_max = start.amax(0)
            self.max_prob, self.max_prob_excl_start, self.hist = mx, mx_rest, hist
        else:
            self.start_mass_sum += start.sum(0).double()
            self.start_mass_max = torch.maximum(self.start_mass_max, start.amax(0))
            self.max_prob = torch.maximum(self.max_prob, mx)
            self.max_prob_excl_start = torch.maximum(self.max_prob_excl_start, mx_rest)
            self.hist += hist
        self.samples += b
