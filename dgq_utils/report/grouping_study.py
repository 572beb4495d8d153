"""Notebook 02: channel- vs pixel-wise decisions and the group-count error sweep.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from dgq_utils.calibrate.trace import TRACE_SAMPLER, Trace
from dgq_utils.config.sampler import SamplerSettings, check_sampler, takes_sampler
from dgq_utils.core.grouping import (
    assign_groups,
    axis_scores,
    decide_axis,
    fake_quant_along_axis,
    per_index_qparams,
)
from dgq_utils.core.quantizers import fake_quant_uniform, uniform_qparams
from dgq_utils.core.stats import axes_for
from dgq_utils.report.layer_names import (
    block_of,
    quantized_inputs,
    short_name,
    unet_rank,
)
from dgq_utils.report.outliers import stats_rows
from dgq_utils.timing import timed_stage

__all__ = [
    "axis_decision_table",
    "decision_summary",
    "group_error_sweep",
    "error_curve",
    "axis_rule_accuracy",
    "example_groups",
]


# ==============================================================================================================
# 02: grouping decisions
# ==============================================================================================================
RULES = ("official_spread", "outlier_ratio")


def axis_decision_table(stats, rules: Sequence[str] = RULES, *, quantized_only: bool = True) -> pd.DataFrame:
    """Channel- vs pixel-wise decision per (layer, timestep) under each rule (:func:`grouping.decide_axis`).

    Columns: ``layer``, ``short``, ``block``, ``layer_type``, ``timestep_index``, ``n_channels``, ``n_pixels``,
    per rule ``<rule>_channel`` / ``<rule>_pixel`` (the two scores) and ``<rule>`` (the decision). An input
    with one axis only (the 2-D time-embedding inputs) is ``"channel (only axis)"``: it is quantized per tensor
    in group mode anyway.
    """
    rows = []
    for st, row in stats_rows(stats, quantized_only):
        for rule in rules:
            if st.channel is not None and st.pixel is not None:
                c, p = axis_scores(st.channel, st.pixel, rule)
                row[f"{rule}_channel"], row[f"{rule}_pixel"] = c, p
                row[rule] = decide_axis(st.channel, st.pixel, rule)
            else:
                row[f"{rule}_channel"] = row[f"{rule}_pixel"] = math.nan
                row[rule] = "channel (only axis)"
        rows.append(row)
    return pd.DataFrame(rows)


def decision_summary(decisions: pd.DataFrame, rules: Sequence[str] = RULES) -> pd.DataFrame:
    """Per layer: share of timesteps grouped channel-wise under each rule, the majority axis, and how often the
    two rules agree."""
    d = decisions[decisions[rules[0]] != "channel (only axis)"]
    g = d.groupby("layer", sort=False)
    out = g.agg(short=("short", "first"), block=("block", "first"), layer_type=("layer_type", "first"),
                n_channels=("n_channels", "first"), n_pixels=("n_pixels", "first"))
    for rule in rules:
        out[f"{rule}_channel_share"] = g[rule].apply(lambda s: float((s == "channel").mean()))
        out[f"{rule}_majority"] = np.where(out[f"{rule}_channel_share"] >= 0.5, "channel", "pixel")
    if len(rules) >= 2:
        out["rules_agree"] = g.apply(lambda x: float((x[rules[0]] == x[rules[1]]).mean()), include_groups=False)
    return out.reset_index()


@timed_stage("group_error_sweep")
@takes_sampler
@torch.no_grad()
def group_error_sweep(
    pipe,
    calib,
    prompts: Sequence[str],
    sampler: SamplerSettings | None = None,
    seed: int = 1,
    *,
    bits: int = 6,
    ks: Sequence[int] = (1, 2, 4, 8, 16),
    methods: Sequence[str] = ("contiguous", "sorted", "kmeans"),
    layers: Sequence[str] | None = None,
    timestep_indices: Sequence[int] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Quantization error of held-out activations, per layer, from per-tensor to ``K`` groups.

    Groups and ranges come from the calibration statistics ``calib`` (an
    :class:`~dgq_utils.calibrate.observe.ActivationStats` of *other* prompts, same ``sampler`` -- default
    :data:`~dgq_utils.calibrate.trace.TRACE_SAMPLER`; batch ``i`` seeded ``seed + i``); the error is
    measured on the inputs every ``nn.Linear`` / ``nn.Conv2d`` of the FP UNet sees while ``prompts`` are sampled
    (``layers``: names to include, default all in ``calib``; ``timestep_indices``: UNet-call indices, default
    all), so clipping of values outside the calibrated ranges counts -- this is how a calibrated quantizer is
    used. For each input: per tensor (min/max with 0 included, as the baseline's range), and for each axis
    (channel / pixel), method (``contiguous``, ``sorted``, ``kmeans``: :func:`grouping.assign_groups`) and
    ``K`` in ``ks`` (clamped to the axis size) the DGQ group ranges (min / max of the members, 0 not forced in).

    Returns one row per (layer, timestep_index, axis, method, k): ``mse``, ``rel_mse`` (vs per tensor),
    ``sqnr_db`` (``10 log10(E[x^2] / mse)``), ``k_used``, ``official_axis`` / ``ratio_axis`` (what the two
    rules pick on the calibration statistics).
    """
    sampler = check_sampler(sampler, TRACE_SAMPLER, "group_error_sweep")
    names = quantized_inputs(sorted((n for n, (lt, _) in calib.layers.items() if lt in ("linear", "conv")),
                                    key=unet_rank))
    if layers is not None:
        wanted = set(layers)
        missing = wanted - set(names)
        if missing:
            raise KeyError(f"no calibration statistics for {sorted(missing)[:3]}")
        names = [n for n in names if n in wanted]
    all_ti = sorted({ti for n in names for ti in calib.layers[n][1]})
    tis = set(all_ti if timestep_indices is None else timestep_indices)
    acc: dict[tuple, list[float]] = {}  # (layer, ti, axis, method, k) -> [sum sq err, count]
    energy: dict[tuple, list[float]] = {}
    plans: dict[tuple, tuple] = {}
    trace = Trace(pipe, sampler, seed, progress=progress, desc="group-error sweep")
    state = trace.state

    def plan(name, ti, axis, method, k, st_axis):
        key = (name, ti, axis, method, k)
        if key not in plans:
            k_used = min(k, st_axis.n)
            ids = assign_groups(st_axis, k_used, method=method, seed=0)
            scale, zp = per_index_qparams(st_axis, ids, k_used, bits, include_zero=False)
            plans[key] = (scale, zp, k_used)
        return plans[key]

    def add(key, err):
        a = acc.setdefault(key, [0.0, 0])
        a[0] += err

    def hook(_name, mod, x):
        ti = state.set_index
        if ti not in tis:
            return
        _lt = calib.layers[_name][0]
        x = x.detach().float()
        st = calib.stats(_name, ti)
        ch, px = axes_for(x, "linear" if _lt == "linear" else "conv")
        e = energy.setdefault((_name, ti), [0.0, 0])
        e[0] += float(x.double().pow(2).sum())
        e[1] += x.numel()
        s, z = uniform_qparams(torch.tensor(st.min, device=x.device), torch.tensor(st.max, device=x.device), bits,
                               include_zero=True)
        add((_name, ti, "tensor", "per-tensor", 1), float((fake_quant_uniform(x, s, z, bits) - x).double().pow(2).sum()))
        for axis, dims in (("channel", ch), ("pixel", px)):
            st_axis = st.axis(axis)
            if dims is None or st_axis is None:
                continue
            for method in methods:
                for k in ks:
                    if k <= 1:
                        continue
                    scale, zp, _ = plan(_name, ti, axis, method, k, st_axis)
                    err = fake_quant_along_axis(x, scale.to(x.device), zp.to(x.device), bits, dims) - x
                    add((_name, ti, axis, method, k), float(err.double().pow(2).sum()))

    selected = set(names)
    with trace:
        trace.on_layer_input(hook, selected.__contains__)
        schedule = trace.run(list(prompts))
    if calib.timesteps and schedule[: len(calib.timesteps)] != list(calib.timesteps)[: len(schedule)]:
        raise ValueError("the sweep's sampling schedule differs from the calibration statistics' schedule; use "
                         "the same scheduler and num_inference_steps for both")

    rows = []
    for (name, ti, axis, method, k), (sq, _) in acc.items():
        e_sum, count = energy[(name, ti)]
        st = calib.stats(name, ti)
        two_axes = st.channel is not None and st.pixel is not None
        rows.append({
            "layer": name, "short": short_name(name), "block": block_of(name), "layer_type": calib.layers[name][0],
            "timestep_index": ti, "timestep": schedule[ti] if ti < len(schedule) else math.nan,
            "axis": axis, "method": method, "k": k,
            "k_used": plans[(name, ti, axis, method, k)][2] if axis != "tensor" else 1,
            "mse": sq / count, "energy": e_sum / count,
            "official_axis": decide_axis(st.channel, st.pixel, "official_spread") if two_axes else "channel",
            "ratio_axis": decide_axis(st.channel, st.pixel, "outlier_ratio") if two_axes else "channel",
        })
    df = pd.DataFrame(rows)
    base = df[df["axis"] == "tensor"].set_index(["layer", "timestep_index"])["mse"]
    df["rel_mse"] = df["mse"] / base.reindex(pd.MultiIndex.from_frame(df[["layer", "timestep_index"]])).to_numpy()
    df["sqnr_db"] = 10 * np.log10(df["energy"] / df["mse"].clip(lower=1e-30))
    return df.sort_values(["layer", "timestep_index", "axis", "method", "k"], kind="stable").reset_index(drop=True)


def error_curve(sweep: pd.DataFrame, *, axis: str = "official") -> pd.DataFrame:
    """Geometric-mean relative MSE over (layer, timestep) per method and K, on the axis chosen by
    ``axis``: ``"official"`` / ``"ratio"`` (the rule's choice, per input), ``"oracle"`` (the axis with the lower
    error at that K) or ``"channel"`` / ``"pixel"`` (forced; inputs without that axis are skipped)."""
    base = sweep[sweep["axis"] == "tensor"]
    grouped = sweep[sweep["axis"] != "tensor"]
    if axis in ("official", "ratio"):
        sel = grouped[grouped["axis"] == grouped[f"{axis}_axis"]]
    elif axis == "oracle":
        idx = grouped.groupby(["layer", "timestep_index", "method", "k"])["mse"].idxmin()
        sel = grouped.loc[idx]
    elif axis in ("channel", "pixel"):
        sel = grouped[grouped["axis"] == axis]
    else:
        raise ValueError(f"axis must be official, ratio, oracle, channel or pixel; got {axis!r}")
    rows = [{"method": "per-tensor", "k": 1, "gmean_rel_mse": 1.0, "median_sqnr_db": float(base["sqnr_db"].median()),
             "inputs": len(base)}]
    for (method, k), g in sel.groupby(["method", "k"], sort=True):
        rows.append({"method": method, "k": int(k),
                     "gmean_rel_mse": float(np.exp(np.log(g["rel_mse"].clip(lower=1e-30)).mean())),
                     "median_sqnr_db": float(g["sqnr_db"].median()), "inputs": len(g)})
    out = pd.DataFrame(rows)
    out["axis_choice"] = axis
    return out


def axis_rule_accuracy(sweep: pd.DataFrame, *, method: str = "kmeans", k: int | None = None) -> pd.DataFrame:
    """How often each rule picks the axis with the lower measured error (``method``, largest ``k`` by default),
    over inputs that have both axes; also the mean error penalty (in dB) of the rule's wrong picks."""
    g = sweep[(sweep["method"] == method) & (sweep["axis"].isin(["channel", "pixel"]))]
    k = int(g["k"].max()) if k is None else k
    g = g[g["k"] == k]
    wide = g.pivot_table(index=["layer", "timestep_index"], columns="axis", values="sqnr_db").dropna()
    axes = g.drop_duplicates(["layer", "timestep_index"]).set_index(["layer", "timestep_index"])
    best = np.where(wide["channel"] > wide["pixel"], "channel", "pixel")
    rows = []
    for rule, col in (("official_spread", "official_axis"), ("outlier_ratio", "ratio_axis")):
        pick = axes.loc[wide.index, col].to_numpy()
        right = pick == best
        loss = np.abs(wide["channel"] - wide["pixel"]).to_numpy()
        rows.append({"rule": rule, "method": method, "k": k, "inputs": len(wide),
                     "picks_better_axis": float(right.mean()) if len(right) else math.nan,
                     "mean_sqnr_loss_db_when_wrong": float(loss[~right].mean()) if (~right).any() else 0.0,
                     "share_channel_picked": float((pick == "channel").mean()) if len(pick) else math.nan,
                     "share_channel_better": float((best == "channel").mean()) if len(best) else math.nan})
    return pd.DataFrame(rows)


def example_groups(stats_axis, k: int = 8, methods: Sequence[str] = ("contiguous", "sorted", "kmeans"),
                   seed: int = 0) -> pd.DataFrame:
    """Per index of one axis: ``min``, ``max`` and the group id under each method (for the groups figure)."""
    k = min(k, stats_axis.n)
    df = pd.DataFrame({"index": np.arange(stats_axis.n), "min": stats_axis.mins.cpu().numpy(),
                       "max": stats_axis.maxs.cpu().numpy()})
    for m in methods:
        df[m] = assign_groups(stats_axis, k, method=m, seed=seed).cpu().numpy()
    return df
