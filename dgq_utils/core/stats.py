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
_SEQ = itertools.count()  # global order of observations (names the *first* non-finite input of the deferred path)


@dataclass
class TensorStats:
    """Running statistics of one activation (one layer, one timestep set).

    ``channel`` / ``pixel``: :class:`AxisStats` (``None`` if not requested or the input has no such axis).
    ``shape``: the input shape without the batch dim (pixel groups are tied to it). ``min``/``max``: per tensor.
    ``ema_min``/``ema_max``: exponential moving averages (``m * old + (1 - m) * new``, first call initialises).
    ``abs_percentiles``: running sums of the approximate ``|x|`` percentiles (divide by ``calls``).

    ``deferred`` (default ``None``: for inputs on a GPU): an update only launches the reductions -- the input's
    min / max (kept per call, 0-d) and the per-index min / max along each axis (merged on the device in the input's
    dtype, exact) -- and never waits for the device. The rest -- the NaN / inf check, the per-tensor min / max and
    the EMA in Python floats, the float32 :class:`AxisStats` -- is done on the host by :func:`stats_to_host` after
    one copy for all statistics, with the CPU path's arithmetic, so both paths give the same numbers. The check
    then raises the ``FloatingPointError`` for the first non-finite input in observation order. Reading ``min`` /
    ``max`` / ``ema_*`` / ``channel`` / ``pixel`` earlier brings this one object to the host first.
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
    deferred: bool | None = None
    _pending: list = field(default_factory=list, repr=False)  # deferred: (seq, min, max, where, shape) per call
    _axis_acc: dict = field(default_factory=dict, repr=False)  # deferred: axis -> [mins, maxs, count]
    _ema_m: float = field(default=0.95, repr=False)

    def __getattribute__(self, name):
        if name in _FINISHED_FIELDS:
            d = object.__getattribute__(self, "__dict__")
            if d.get("_pending") or d.get("_axis_acc"):
                stats_to_host([self])
        return object.__getattribute__(self, name)

    @property
    def is_pending(self) -> bool:
        """Whether deferred updates still wait for :func:`stats_to_host`."""
        d = self.__dict__
        return bool(d["_pending"] or d["_axis_acc"])

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
        """Fold one observed input ``x`` into the statistics (raises ``FloatingPointError`` on NaN / inf; on the
        deferred path at :func:`stats_to_host`)."""
        xd = x.detach()
        d = self.__dict__
        shape = tuple(xd.shape[1:])
        if d["shape"] is not None and shape != d["shape"]:
            raise ValueError(
                f"{where}: input shape changed during calibration from {d['shape']} to {shape} (batch dim "
                "excluded). All calibration batches must use the same resolution."
            )
        deferred = self.deferred if self.deferred is not None else xd.device.type != "cpu"
        todo = []
        if axes:
            ch_axis, px_axis = axes_for(xd, layout)
            todo = [("channel", ch_axis)] if "channel" in axes else []
            if "pixel" in axes and px_axis is not None:
                todo.append(("pixel", px_axis))
        reduced = {name: _axis_reduce(xd, ax) for name, ax in todo} if deferred else {}
        if deferred and reduced:
            # the input's min / max from the first axis's per-index min / max: the same (exact) values, NaN
            # propagated, without another pass over the input
            mins, maxs = next(iter(reduced.values()))
            mn, mx = mins.amin(), maxs.amax()
        else:
            mn, mx = torch.aminmax(xd.reshape(-1))
        if deferred:
            d["_pending"].append((next(_SEQ), mn, mx, where, tuple(xd.shape)))
            d["_ema_m"] = ema_momentum
        else:
            mn_f, mx_f = float(mn), float(mx)
            if not (math.isfinite(mn_f) and math.isfinite(mx_f)):
                raise _nonfinite(where, xd)
            self._fold(mn_f, mx_f, ema_momentum)
        d["shape"] = shape
        d["calls"] += 1
        for name, ax in todo:
            if deferred:
                acc = d["_axis_acc"]
                mins, maxs = reduced[name]
                if name in acc:
                    old = acc[name]
                    acc[name] = [torch.minimum(old[0], mins), torch.maximum(old[1], maxs), old[2] + 1]
                else:
                    acc[name] = [mins, maxs, 1]
            else:
                s = AxisStats.from_tensor(xd, ax)
                cur = d[name]
                d[name] = s if cur is None else cur.merge(s)
        if percentiles:
            flat = xd.reshape(-1)
            step = max(1, flat.numel() // PERCENTILE_SAMPLES)
            sample = flat[::step].abs().float()
            levels = torch.tensor([p / 100.0 for p in percentiles], dtype=sample.dtype, device=sample.device)
            qs = torch.quantile(sample, levels)
            for p, q in zip(percentiles, qs.tolist()):
                self.abs_percentiles[p] = self.abs_percentiles.get(p, 0.0) + q

    def _fold(self, mn_f: float, mx_f: float, m: float) -> None:
        """Per-tensor min / max / EMA update with one call's values (Python floats: the same on both paths)."""
        d = self.__dict__
        d["min"], d["max"] = min(d["min"], mn_f), max(d["max"], mx_f)
        if d["ema_min"] is None:
            d["ema_min"], d["ema_max"] = mn_f, mx_f
        else:
            d["ema_min"] = m * d["ema_min"] + (1 - m) * mn_f
            d["ema_max"] = m * d["ema_max"] + (1 - m) * mx_f

    def axis(self, name: str) -> AxisStats | None:
        if name not in ("channel", "pixel"):
            raise ValueError(f"axis must be 'channel' or 'pixel'; got {name!r}.")
        return self.channel if name == "channel" else self.pixel


_FINISHED_FIELDS = frozenset({"min", "max", "ema_min", "ema_max", "channel", "pixel"})


def _axis_reduce(x: Tensor, axis) -> tuple[Tensor, Tensor]:
    """Per-index (min, max) of ``x`` along ``axis`` in ``x``'s dtype (the reduction of :meth:`AxisStats.from_tensor`,
    without its float32 copies: the deferred path converts once, on the host; min / max are exact in any dtype)."""
    axes = (axis,) if isinstance(axis, int) else tuple(sorted(axis))
    others = tuple(d for d in range(x.ndim) if d not in axes)
    if not others:
        return x.reshape(-1), x.reshape(-1)
    return torch.amin(x, dim=others).reshape(-1), torch.amax(x, dim=others).reshape(-1)


def _nonfinite(where: str, xd: Tensor | None, shape=None) -> FloatingPointError:
    if xd is not None:
        n_nan, n_inf = int(torch.isnan(xd).sum()), int(torch.isinf(xd).sum())
        what = f"{n_nan} NaN and {n_inf} inf values in an input of shape {tuple(xd.shape)}"
    else:
        what = f"NaN or inf values in an input of shape {shape}"
    return FloatingPointError(
        f"Non-finite activation at {where}: {what}. Check the model weights / the layers upstream of this one."
    )


def stats_to_host(stats) -> None:
    """Finish the deferred updates of every :class:`TensorStats` in ``stats`` on the host, in place: one device ->
    host copy per device for all of them, then the NaN / inf check (the first non-finite input in observation
    order raises ``FloatingPointError`` naming where it was seen), the per-tensor min / max / EMA in Python floats
    and float32 :class:`AxisStats` -- what the CPU path computes, bit for bit."""
    stats = [st for st in stats if st.is_pending]
    if not stats:
        return
    by_device: dict[torch.device, list] = {}
    for st in stats:
        d = st.__dict__
        for seq, mn, mx, where, shape in d["_pending"]:
            by_device.setdefault(mn.device, []).append(
                (st, ("call", seq, where, shape), torch.stack([mn, mx]).to(torch.float64)))
        for name, (mins, maxs, count) in d["_axis_acc"].items():
            by_device.setdefault(mins.device, []).append(
                (st, ("axis", name, count), torch.cat([mins, maxs]).to(torch.float64)))
    calls, axes = [], []
    for items in by_device.values():
        flat = torch.cat([t for _, _, t in items]).cpu()
        pos = 0
        for st, what, t in items:
            part = flat[pos : pos + t.numel()]
            pos += t.numel()
            (calls if what[0] == "call" else axes).append((st, what, part))
    calls.sort(key=lambda c: c[1][1])  # observation order
    for _st, (_, _, where, shape), part in calls:
        if not (math.isfinite(float(part[0])) and math.isfinite(float(part[1]))):
            raise _nonfinite(where, None, shape)
    for st, _, part in calls:
        st._fold(float(part[0]), float(part[1]), st.__dict__["_ema_m"])
    for st, (_, name, count), part in axes:
        half = part.numel() // 2
        st.__dict__[name] = AxisStats(part[:half].float(), part[half:].float(), count)
    for st in stats:
        st.__dict__["_pending"] = []
        st.__dict__["_axis_acc"] = {}


def check_finite(stats) -> None:
    """Raise ``FloatingPointError`` for the first non-finite input any of ``stats`` saw (finishes deferred ones)."""
    stats_to_host(stats)


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
