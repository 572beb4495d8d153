"""Streaming statistics of activations and attention probabilities (min/max per index, EMA, percentiles,
log2 histograms): the accumulators that observation and calibration feed. Pure tensor code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from dgq_utils.core.grouping import AxisStats

__all__ = [
    "TensorStats",
    "AttentionStats",
    "axes_for",
    "LOG2_HIST_EDGES",
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
@dataclass
class TensorStats:
    """Running statistics of one activation (one layer, one timestep set).

    ``channel`` / ``pixel``: :class:`AxisStats` (``None`` if not requested or the input has no such axis).
    ``shape``: the input shape without the batch dim (pixel groups are tied to it). ``min``/``max``: per tensor.
    ``ema_min``/``ema_max``: exponential moving averages (``m * old + (1 - m) * new``, first call initialises).
    ``abs_percentiles``: running sums of the approximate ``|x|`` percentiles (divide by ``calls``).
    """

    channel: AxisStats | None = None
    pixel: AxisStats | None = None
    shape: tuple[int, ...] | None = None
    min: float = math.inf
    max: float = -math.inf
    ema_min: float | None = None
    ema_max: float | None = None
    calls: int = 0
    abs_percentiles: dict[float, float] = field(default_factory=dict)

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
        """Fold one observed input ``x`` into the statistics (raises ``FloatingPointError`` on NaN / inf)."""
        xd = x.detach()
        mn, mx = torch.aminmax(xd.reshape(-1))
        mn_f, mx_f = float(mn), float(mx)
        if not (math.isfinite(mn_f) and math.isfinite(mx_f)):
            n_nan = int(torch.isnan(xd).sum())
            n_inf = int(torch.isinf(xd).sum())
            raise FloatingPointError(
                f"Non-finite activation at {where}: {n_nan} NaN and {n_inf} inf values in an input of shape "
                f"{tuple(xd.shape)}. Check the model weights / the layers upstream of this one."
            )
        shape = tuple(xd.shape[1:])
        if self.shape is not None and shape != self.shape:
            raise ValueError(
                f"{where}: input shape changed during calibration from {self.shape} to {shape} (batch dim "
                "excluded). All calibration batches must use the same resolution."
            )
        self.shape = shape
        self.min, self.max = min(self.min, mn_f), max(self.max, mx_f)
        if self.ema_min is None:
            self.ema_min, self.ema_max = mn_f, mx_f
        else:
            m = ema_momentum
            self.ema_min = m * self.ema_min + (1 - m) * mn_f
            self.ema_max = m * self.ema_max + (1 - m) * mx_f
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
