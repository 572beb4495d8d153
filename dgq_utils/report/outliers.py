"""Notebook 01: activation outliers per layer (channel vs pixel range ratios) as tables and prose.
"""
from __future__ import annotations

import math

import pandas as pd

from dgq_utils.report.layer_names import (
    block_of,
    quantized_inputs,
    short_name,
    unet_rank,
)

__all__ = [
    "outlier_ratio",
    "outlier_table",
    "outlier_summary",
    "describe_outliers",
]


# ==============================================================================================================
# 01: where the outliers are
# ==============================================================================================================
def pct(x: float) -> str:
    """``0.25`` -> ``"25%"`` (for generated sentences)."""
    return f"{100 * x:.0f}%"


def outlier_ratio(s) -> float:
    """``max(range_i) / median(range_i)`` of one axis's :class:`~dgq_utils.core.grouping.AxisStats` (NaN for None)."""
    if s is None:
        return math.nan
    r = s.ranges.double()
    top, med = float(r.max()), float(r.median())
    if top <= 0:
        return 1.0
    return top / max(med, top * 1e-12)


def _kind(cr: float, pr: float, threshold: float) -> str:
    c = not math.isnan(cr) and cr >= threshold
    p = not math.isnan(pr) and pr >= threshold
    return "both" if c and p else "channel" if c else "pixel" if p else "none"


def outlier_table(stats, *, threshold: float = 4.0, quantized_only: bool = True) -> pd.DataFrame:
    """Per (layer, timestep index): how outlier-ridden the activation is, and along which axis.

    Columns: ``layer``, ``short``, ``block``, ``layer_type``, ``timestep_index``, ``timestep``, ``n_channels``,
    ``n_pixels``, ``channel_ratio`` / ``pixel_ratio`` (``max range / median range`` over channels / pixels, where
    ``range = max - min`` of an index over the batch and the other axis), ``absmax``, ``p99.9`` (approximate, of
    ``|x|``), ``tail_ratio`` = ``absmax / p99.9`` (heavy tail: large), ``outliers`` -- ``"channel"``,
    ``"pixel"``, ``"both"`` or ``"none"`` (ratio >= ``threshold``). Rows in UNet forward order;
    ``quantized_only`` drops the inputs every recipe keeps FP (``conv_in``, ``conv_out``).
    """
    rows = []
    for st, row in stats_rows(stats, quantized_only, with_timestep=True):
        cr, pr = outlier_ratio(st.channel), outlier_ratio(st.pixel)
        calls = max(st.calls, 1)
        p999 = st.abs_percentiles.get(99.9, math.nan) / calls if st.abs_percentiles else math.nan
        absmax = max(abs(st.min), abs(st.max))
        rows.append({**row, "channel_ratio": cr, "pixel_ratio": pr, "absmax": absmax, "p99.9": p999,
                     "tail_ratio": absmax / p999 if p999 and p999 > 0 else math.nan,
                     "outliers": _kind(cr, pr, threshold)})
    return pd.DataFrame(rows)


def stats_rows(stats, quantized_only: bool, *, with_timestep: bool = False):
    """``(TensorStats, identity columns)`` per (layer, timestep index) of collected statistics, layers in UNet
    forward order: ``layer``, ``short``, ``block``, ``layer_type``, ``timestep_index`` (, ``timestep``),
    ``n_channels``, ``n_pixels``."""
    names = sorted(stats.layers, key=unet_rank)
    if quantized_only:
        names = quantized_inputs(names)
    for name in names:
        lt, per_t = stats.layers[name]
        for ti, st in sorted(per_t.items()):
            row = {"layer": name, "short": short_name(name), "block": block_of(name), "layer_type": lt,
                   "timestep_index": ti}
            if with_timestep:
                row["timestep"] = stats.timesteps[ti] if ti < len(stats.timesteps) else math.nan
            row["n_channels"] = st.channel.n if st.channel is not None else 0
            row["n_pixels"] = st.pixel.n if st.pixel is not None else 0
            yield st, row


def outlier_summary(table: pd.DataFrame, *, threshold: float = 4.0) -> pd.DataFrame:
    """One row per layer: median ratios over timesteps, the timestep spread of ``absmax`` (max / min over
    timesteps) and the outlier kind of the median ratios."""
    g = table.groupby("layer", sort=False)
    out = g.agg(short=("short", "first"), block=("block", "first"), layer_type=("layer_type", "first"),
                n_channels=("n_channels", "first"), n_pixels=("n_pixels", "first"),
                channel_ratio=("channel_ratio", "median"), pixel_ratio=("pixel_ratio", "median"),
                tail_ratio=("tail_ratio", "median"), absmax_max=("absmax", "max"), absmax_min=("absmax", "min"))
    out["absmax_over_time"] = out["absmax_max"] / out["absmax_min"].where(out["absmax_min"] > 0)
    out["outliers"] = [_kind(c, p, threshold) for c, p in zip(out["channel_ratio"], out["pixel_ratio"])]
    return out.reset_index()


def describe_outliers(summary: pd.DataFrame, *, threshold: float = 4.0) -> str:
    """Markdown sentences describing :func:`outlier_summary` (every number computed, nothing assumed)."""
    n = len(summary)
    counts = summary["outliers"].value_counts().to_dict()
    top_c = summary.sort_values("channel_ratio", ascending=False).iloc[0]
    lines = [
        f"Of {n} quantized inputs, **{counts.get('channel', 0)}** have outlier channels only, "
        f"**{counts.get('pixel', 0)}** outlier pixels only, **{counts.get('both', 0)}** both and "
        f"**{counts.get('none', 0)}** neither (widest index range ≥ {threshold:g}× the median one, median over "
        "timesteps).",
        f"The most channel-outlier-ridden input is `{top_c['layer']}`: its widest channel range is "
        f"{top_c['channel_ratio']:.1f}× the median channel's.",
    ]
    px = summary.dropna(subset=["pixel_ratio"])
    if len(px):
        top_p = px.sort_values("pixel_ratio", ascending=False).iloc[0]
        lines.append(f"The strongest pixel outliers are in `{top_p['layer']}` ({top_p['pixel_ratio']:.1f}× the "
                     "median pixel's range).")
    tr = summary["tail_ratio"].dropna()
    if len(tr):
        heavy = float((tr >= 2).mean())
        lines.append(f"Heavy tails: the largest |activation| is a median {tr.median():.1f}× the 99.9th percentile "
                     f"(up to {tr.max():.1f}×); for {pct(heavy)} of the inputs it is at least 2×, i.e. a range set "
                     "by the extremes spends at least half of its levels on values rarer than 1 in 1,000.")
    ot = summary["absmax_over_time"].dropna()
    if len(ot):
        lines.append(f"Across timesteps a layer's absmax varies by a median factor of {ot.median():.2f} "
                     f"(max {ot.max():.1f}), which is what per-timestep parameters absorb.")
    return " ".join(lines)
