"""Every figure of the report (matplotlib + seaborn), as functions of the tidy tables of :mod:`dgq_utils.report`.

Each function returns a ``matplotlib.figure.Figure`` and, given ``path``, also writes it as a PNG (atomically:
temporary file + rename). Figures are sized to be read at a glance in a notebook or a README: one message per
figure, labelled axes, a title that says what is plotted. Nothing here computes results; it only draws them.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

if not os.environ.get("MPLBACKEND") and "ipykernel" not in __import__("sys").modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from dgq_utils.report.layer_names import unet_rank
from dgq_utils.timing import stage
from dgq_utils.report.prose import prompt_length

__all__ = [
    "set_style", "save", "outlier_scatter", "range_over_timesteps", "layer_ranges", "heavy_tail",
    "axis_decisions", "kmeans_groups", "error_vs_groups", "start_sink", "prob_histograms", "prob_error",
    "scale_comparison", "attention_example", "image_grid", "metric_bars", "paired_bars", "paper_vs_ours",
    "ablation_bars", "recipe_family", "RECIPE_COLORS", "layer_explorer", "attention_explorer",
    "calibration_curve", "component_bars", "paper_grid_bars",
]

RECIPE_COLORS = {"fp": "#4d4d4d", "baseline": "#e08214", "dgq": "#2166ac", "other": "#8073ac"}
KIND_COLORS = {"cross": "#1b9e77", "self": "#d95f02"}


def set_style() -> None:
    """The report's look: seaborn whitegrid, readable font sizes."""
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.95)
    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 130, "axes.titleweight": "bold",
                         "axes.titlesize": 11, "figure.titlesize": 13})


set_style()


def save(fig, path: str | os.PathLike | None) -> Path | None:
    """Write ``fig`` to ``path`` (PNG) atomically; ``None`` does nothing."""
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    with stage("figure", file=path.name):
        fig.savefig(tmp, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    os.replace(tmp, path)
    return path


def _plain_log_ticks(fig):
    """Log axes labelled 0.5, 1, 2, 5 ... instead of 5x10^-1, 10^0, 2x10^0."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def fmt(v, _):
        return f"{v:g}"

    for ax in fig.axes:
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            if scale != "log":
                continue
            lo, hi = sorted(ax.get_xlim() if axis is ax.xaxis else ax.get_ylim())
            if lo > 0 and hi / lo < 1000:
                axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(FuncFormatter(fmt))
                axis.set_minor_formatter(NullFormatter())


def _finish(fig, path):
    _plain_log_ticks(fig)
    fig.tight_layout()
    save(fig, path)
    return fig


def _block_order(blocks) -> list[str]:
    return sorted(dict.fromkeys(blocks), key=unet_rank)


def recipe_family(name: str) -> str:
    if name == "fp":
        return "fp"
    if name.startswith("baseline"):
        return "baseline"
    if name.startswith("dgq"):
        return "dgq"
    return "other"


# ==============================================================================================================
# 01: outliers
# ==============================================================================================================
def outlier_scatter(summary: pd.DataFrame, *, threshold: float = 4.0, path=None, title: str | None = None):
    """Per quantized input: widest / median channel range (x) vs widest / median pixel range (y), log-log."""
    d = summary.dropna(subset=["channel_ratio", "pixel_ratio"])
    fig, ax = plt.subplots(figsize=(7, 5.5))
    sns.scatterplot(data=d, x="channel_ratio", y="pixel_ratio", hue="layer_type", style="layer_type", s=45,
                    alpha=0.8, ax=ax)
    ax.set(xscale="log", yscale="log")
    lo = max(0.9, min(d["channel_ratio"].min(), d["pixel_ratio"].min()) * 0.9) if len(d) else 1
    hi = max(d["channel_ratio"].max(), d["pixel_ratio"].max(), threshold) * 1.2 if len(d) else 10
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="channel = pixel")
    ax.axvline(threshold, color="grey", lw=0.8, ls=":")
    ax.axhline(threshold, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("channel outlier ratio (widest / median channel range)")
    ax.set_ylabel("pixel outlier ratio (widest / median pixel range)")
    for _, r in d.nlargest(3, "channel_ratio").iterrows():
        ax.annotate(r["short"], (r["channel_ratio"], r["pixel_ratio"]), fontsize=7, alpha=0.8)
    for _, r in d.nlargest(3, "pixel_ratio").iterrows():
        ax.annotate(r["short"], (r["channel_ratio"], r["pixel_ratio"]), fontsize=7, alpha=0.8)
    ax.set_title(title or "Where the outliers are: one point per quantized input (median over timesteps)")
    ax.legend(fontsize=8, loc="upper left")
    return _finish(fig, path)


def range_over_timesteps(table: pd.DataFrame, *, path=None, title: str | None = None):
    """Per UNet block: median over its inputs of ``absmax(t) / median_t absmax`` along the sampling trajectory."""
    d = table.copy()
    med = d.groupby("layer")["absmax"].transform("median")
    d["relative_absmax"] = d["absmax"] / med.where(med > 0)
    g = d.groupby(["block", "timestep_index"], sort=False)["relative_absmax"].median().reset_index()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    order = _block_order(d["block"])
    palette = sns.color_palette("viridis", n_colors=max(len(order), 1))
    for c, b in zip(palette, order):
        s = g[g["block"] == b]
        ax.plot(s["timestep_index"], s["relative_absmax"], marker="o", ms=3, lw=1.5, color=c, label=b)
    ax.axhline(1, color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("UNet call (sampling step; left = pure noise)")
    ax.set_ylabel("absmax / its median over steps")
    ax.set_title(title or "Activation range along the sampling trajectory (median over each block's inputs)")
    ax.legend(fontsize=7, ncol=2, loc="best")
    return _finish(fig, path)


def layer_ranges(channel, pixel, *, pixel_shape: Sequence[int] | None = None, path=None, title: str = ""):
    """One input at one timestep: per-channel [min, max] (left) and per-pixel range (right; an image for a
    spatial axis). ``channel`` / ``pixel``: :class:`~dgq_utils.core.grouping.AxisStats` (``pixel`` may be None)."""
    ncols = 2 if pixel is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 + 4.5 * (ncols - 1), 4), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6, 1][:ncols]})
    ax = axes[0, 0]
    mins, maxs = channel.mins.cpu().numpy(), channel.maxs.cpu().numpy()
    idx = np.arange(len(mins))
    ax.vlines(idx, mins, maxs, color="#2166ac", lw=max(0.3, min(2.0, 300 / max(len(idx), 1))))
    r = maxs - mins
    top = np.argsort(r)[-3:]
    ax.scatter(idx[top], maxs[top], color="#b2182b", s=14, zorder=3, label="3 widest channels")
    ax.set(xlabel="channel index", ylabel="activation value", title="per-channel range [min, max]")
    ax.legend(fontsize=8)
    if pixel is not None:
        ax = axes[0, 1]
        pr = (pixel.maxs - pixel.mins).cpu().numpy()
        side = int(round(math.sqrt(len(pr))))
        if pixel_shape is not None and len(pixel_shape) == 2 and pixel_shape[0] * pixel_shape[1] == len(pr):
            img = pr.reshape(pixel_shape)
        elif side * side == len(pr):
            img = pr.reshape(side, side)
        else:
            img = None
        if img is not None:
            im = ax.imshow(img, cmap="magma")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="max − min")
            ax.set(title="per-pixel range (latent grid)", xticks=[], yticks=[])
            ax.grid(False)
        else:
            ax.plot(pr, color="#b2182b", lw=1)
            ax.set(xlabel="token / pixel index", ylabel="max − min", title="per-pixel (token) range")
    fig.suptitle(title)
    return _finish(fig, path)


def heavy_tail(summary: pd.DataFrame, *, path=None, title: str | None = None):
    """Left: distribution of ``absmax / p99.9`` over inputs (heavy tails). Right: channel and pixel outlier
    ratios per UNet block."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.6]})
    d = summary.dropna(subset=["tail_ratio"])
    if len(d):
        sns.histplot(data=d, x="tail_ratio", hue="layer_type", multiple="stack", log_scale=True, bins=25,
                     ax=axes[0])
    axes[0].set(xlabel="absmax / 99.9th percentile of |x|", ylabel="inputs",
                title="How far the extremes sit from the bulk")
    long = summary.melt(id_vars=["block"], value_vars=["channel_ratio", "pixel_ratio"], var_name="axis",
                        value_name="ratio").dropna()
    long["axis"] = long["axis"].str.replace("_ratio", "")
    if len(long):
        sns.boxplot(data=long, x="block", y="ratio", hue="axis", ax=axes[1], fliersize=2,
                    order=_block_order(long["block"]),
                    palette={"channel": "#2166ac", "pixel": "#b2182b"})
    axes[1].set_yscale("log")
    axes[1].set(xlabel="", ylabel="widest / median index range", title="Outlier ratio per block")
    axes[1].tick_params(axis="x", rotation=35)
    fig.suptitle(title or "Heavy tails and outlier ratios")
    return _finish(fig, path)


# ==============================================================================================================
# 02: grouping
# ==============================================================================================================
def axis_decisions(summary: pd.DataFrame, *, rules: Sequence[str] = ("official_spread", "outlier_ratio"),
                   path=None, title: str | None = None):
    """Share of inputs grouped channel-wise (majority over timesteps) per UNet block, under each rule."""
    rows = []
    for rule in rules:
        g = summary.groupby("block", sort=False)[f"{rule}_majority"].apply(lambda s: float((s == "channel").mean()))
        for b, v in g.items():
            rows.append({"block": b, "rule": rule.replace("_", " "), "channel_share": v})
    d = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(9, 4.2))
    sns.barplot(data=d, x="block", y="channel_share", hue="rule", ax=ax, palette="Set2",
                order=_block_order(d["block"]))
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set(ylim=(0, 1.05), xlabel="", ylabel="share of inputs grouped channel-wise")
    ax.tick_params(axis="x", rotation=35)
    ax.set_title(title or "Channel- vs pixel-wise groups per block (rest: pixel-wise)")
    ax.legend(fontsize=8, title="rule")
    return _finish(fig, path)


def kmeans_groups(example: pd.DataFrame, *, methods: Sequence[str] = ("contiguous", "sorted", "kmeans"),
                  path=None, title: str = ""):
    """Each index of one axis as a point (min, max), coloured by its group under each method, with the
    bounding box of each group (the group's quantization range is [box left, box top])."""
    fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 4.3), sharex=True, sharey=True,
                             squeeze=False)
    k = int(max(example[m].max() for m in methods)) + 1
    pal = sns.color_palette("tab20", n_colors=max(k, 2))
    for ax, m in zip(axes[0], methods):
        for gid, g in example.groupby(m):
            c = pal[int(gid) % len(pal)]
            ax.scatter(g["min"], g["max"], s=10, color=c, alpha=0.85)
            x0, x1, y0, y1 = g["min"].min(), g["min"].max(), g["max"].min(), g["max"].max()
            pad = 0.01 * (example["max"].max() - example["min"].min() + 1e-12)
            ax.add_patch(plt.Rectangle((x0 - pad, y0 - pad), x1 - x0 + 2 * pad, y1 - y0 + 2 * pad, fill=False,
                                       ec=c, lw=0.9, alpha=0.7))
        ax.set(xlabel="index min", title=f"{m} ({k} groups)")
    axes[0, 0].set_ylabel("index max")
    fig.suptitle(title)
    return _finish(fig, path)


def error_vs_groups(curves: pd.DataFrame, *, path=None, title: str | None = None):
    """Left: relative MSE (geometric mean over inputs, vs per tensor) against the number of groups, per method,
    on the axis the official rule picks. Right: K-means on the official / outlier-ratio / oracle axis and on a
    forced axis."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    off = curves[curves["axis_choice"] == "official"]
    base = off[off["method"] == "per-tensor"]
    pal = {"contiguous": "#e08214", "sorted": "#8073ac", "kmeans": "#2166ac"}
    for m, g in off[off["method"] != "per-tensor"].groupby("method"):
        g = pd.concat([base, g]).sort_values("k")
        axes[0].plot(g["k"], g["gmean_rel_mse"], marker="o", label=m, color=pal.get(m))
    axes[0].set(xscale="log", yscale="log", xlabel="groups K (1 = per tensor)",
                ylabel="quantization MSE / per-tensor MSE", title="Groups on the official rule's axis")
    axes[0].set_xticks(sorted(off["k"].unique()))
    axes[0].set_xticklabels([str(int(k)) for k in sorted(off["k"].unique())])
    axes[0].axhline(1, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    km = curves[(curves["method"].isin(["kmeans", "per-tensor"]))]
    for choice, g in km.groupby("axis_choice", sort=False):
        g = g.sort_values("k")
        axes[1].plot(g["k"], g["gmean_rel_mse"], marker="o", label=choice)
    axes[1].set(xscale="log", xlabel="groups K", title="K-means: which axis")
    axes[1].set_xticks(sorted(km["k"].unique()))
    axes[1].set_xticklabels([str(int(k)) for k in sorted(km["k"].unique())])
    axes[1].axhline(1, color="grey", lw=0.8, ls="--")
    axes[1].legend(fontsize=8, title="axis")
    fig.suptitle(title or "Quantization error of held-out activations vs number of groups")
    return _finish(fig, path)


# ==============================================================================================================
# 03: attention
# ==============================================================================================================
def start_sink(start: pd.DataFrame, *, path=None, title: str | None = None):
    """Probability on key 0 per attention layer relative to a uniform share ``1 / keys`` (left) and its mean
    along the trajectory (right), cross vs self."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1.5, 1]})
    per_layer = start.groupby(["short", "kind"], sort=False).agg(ratio=("start_over_uniform", "mean")).reset_index()
    sns.barplot(data=per_layer, x="short", y="ratio", hue="kind", palette=KIND_COLORS, ax=axes[0])
    axes[0].axhline(1, color="grey", ls="--", lw=1, label="uniform attention")
    axes[0].set_yscale("log")
    axes[0].set(xlabel="", ylabel="key-0 probability / (1 / number of keys)",
                title="Key 0 per layer, relative to a uniform share")
    axes[0].tick_params(axis="x", rotation=60, labelsize=7)
    axes[0].legend(fontsize=7)
    per_t = start.groupby(["timestep_index", "kind"]).agg(start_mass=("start_mass", "mean")).reset_index()
    sns.lineplot(data=per_t, x="timestep_index", y="start_mass", hue="kind", palette=KIND_COLORS, marker="o",
                 ax=axes[1])
    axes[1].set(xlabel="UNet call (sampling step)", ylabel="mean probability on key 0",
                title="Key 0 along the trajectory", ylim=(0, None))
    fig.suptitle(title or "The <start> sink: cross-attention (key 0 = <start>) vs self-attention (key 0 = a pixel)")
    return _finish(fig, path)


def prob_histograms(hist: pd.DataFrame, *, bits: int = 6, max_prob: Mapping[str, float] | None = None, path=None,
                    title: str | None = None):
    """Share of attention probabilities per log2 bin, cross vs self, with the value below which a ``bits``-bit
    uniform quantizer (scale = max) rounds to 0 and the log2 quantizer's smallest level."""
    d = hist.groupby(["kind", "bin_low", "bin_high"], sort=False)["count"].sum().reset_index()
    d["share"] = d["count"] / d.groupby("kind")["count"].transform("sum")
    d["x"] = np.where(np.isinf(d["bin_low"]), d["bin_high"] - 1, (d["bin_low"] + d["bin_high"]) / 2)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for kind, g in d.groupby("kind"):
        ax.step(g["x"], g["share"], where="mid", color=KIND_COLORS.get(kind), lw=1.8, label=f"{kind}-attention")
    for kind, m in (max_prob or {}).items():
        thr = math.log2(m / (2 * (2**bits - 1)))
        ax.axvline(thr, color=KIND_COLORS.get(kind, "grey"), ls="--", lw=1,
                   label=f"uniform {bits}-bit → 0 below (max {m:.2f}, {kind})")
    ax.set(xlabel="log2(probability)  (leftmost bin: ≤ 2^-30, incl. exact 0)", ylabel="share of probabilities")
    ax.set_title(title or f"Attention probabilities are spread over many octaves (log2 {bits}-bit levels reach "
                          f"2^-{2**bits - 2})")
    ax.legend(fontsize=8)
    return _finish(fig, path)


def prob_error(err: pd.DataFrame, *, scale: str = "per_prompt", path=None, title: str | None = None):
    """Relative attention-output error vs bits, log2 vs uniform, per kind (``<start>`` FP in cross-attention)."""
    d = err[(err["scale"] == scale) & ((err["kind"] == "self") | err["start_fp"])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), sharey=True)
    for ax, kind in zip(axes, ("cross", "self")):
        g = d[d["kind"] == kind]
        if len(g):
            sns.lineplot(data=g, x="bits", y="out_rel_err", hue="quantizer", marker="o", ax=ax, errorbar=("pi", 80),
                         palette={"log2": "#2166ac", "uniform": "#e08214"})
        ax.set(yscale="log", xlabel="bits", ylabel="‖(P̂ − P)V‖ / ‖PV‖", title=f"{kind}-attention")
        ax.set_xticks(sorted(d["bits"].unique()))
    fig.suptitle(title or f"Softmax quantization error on the attention output ({scale.replace('_', '-')} scale; "
                          "median and 80% of layers × steps)")
    return _finish(fig, path)


def scale_comparison(scales: pd.DataFrame, *, bits: int = 6, path=None, title: str | None = None):
    """Left: batch max / own max per sample (how much a batch-wide scale overshoots a prompt's own). Right:
    output error under the two scales, log2 and uniform."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    sns.histplot(data=scales, x="batch_over_sample", hue="kind", log_scale=True, bins=30, element="step",
                 palette=KIND_COLORS, ax=axes[0])
    axes[0].set(xlabel="batch max / this sample's max", ylabel="samples × layers × steps",
                title="How far a batch-wide scale is from the sample's own")
    long = []
    for q in ("log2", "uniform"):
        for s in ("per_prompt", "batch"):
            col = f"{q}_{s}_err"
            if col in scales:
                long.append(pd.DataFrame({"quantizer": q, "scale": s.replace("_", "-"), "err": scales[col]}))
    if long:
        sns.boxplot(data=pd.concat(long), x="quantizer", y="err", hue="scale", ax=axes[1], fliersize=1.5,
                    palette={"per-prompt": "#2166ac", "batch": "#b2182b"})
    axes[1].set(yscale="log", ylabel="relative attention-output error", xlabel="",
                title=f"{bits}-bit error per sample")
    fig.suptitle(title or "Per-prompt vs batch-wide softmax scale")
    return _finish(fig, path)


def attention_example(mass, *, kind: str, tokens: Sequence[str] | None = None, n_tokens: int | None = None,
                      path=None, title: str = ""):
    """Probability mass each key receives for one prompt (mean over heads and queries): bars over text tokens for
    cross-attention, a latent-grid heat map for self-attention."""
    mass = np.asarray(mass, dtype=float)
    fig, ax = plt.subplots(figsize=(9, 3.8) if kind == "cross" else (5, 4.4))
    if kind == "cross":
        n = n_tokens or len(mass)
        labels = [t.replace("</w>", "") for t in (tokens or [str(i) for i in range(len(mass))])][:n]
        labels[0] = "<start>" if labels and "start" in labels[0] else labels[0]
        colors = ["#b2182b"] + ["#2166ac"] * (n - 1)
        ax.bar(range(n), mass[:n], color=colors)
        rest = mass[n:].sum()
        ax.set_xticks(range(n))
        ax.set_xticklabels(labels, rotation=60, fontsize=8)
        ax.set(ylabel="mean probability", title=title + (f"   (remaining {len(mass) - n} padding keys: "
                                                          f"{rest:.3f} in total)" if len(mass) > n else ""))
    else:
        side = int(round(math.sqrt(len(mass))))
        im = ax.imshow(mass.reshape(side, side), cmap="viridis")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="mean probability received")
        ax.set(xticks=[], yticks=[], title=title)
        ax.grid(False)
    return _finish(fig, path)


# ==============================================================================================================
# 04-06: images and results
# ==============================================================================================================
def image_grid(images: Sequence[Sequence], *, row_labels: Sequence[str], col_labels: Sequence[str] | None = None,
               notes: Sequence[Sequence[str]] | None = None, path=None, title: str = "", cell: float = 1.6):
    """Rows of images (PIL images, uint8 arrays HxWx3 or paths) with a label per row, a caption per column and an
    optional note under each image."""
    from PIL import Image

    nr, nc = len(images), max(len(r) for r in images)
    fig, axes = plt.subplots(nr, nc, figsize=(cell * nc + 1.6, cell * nr + 0.9), squeeze=False)
    for i, row in enumerate(images):
        for j in range(nc):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            for s in ax.spines.values():
                s.set_visible(False)
            if j >= len(row):
                continue
            im = row[j]
            if isinstance(im, (str, os.PathLike)):
                im = Image.open(im).convert("RGB")
            ax.imshow(np.asarray(im), interpolation="nearest")
            if notes is not None and notes[i][j]:
                ax.set_xlabel(notes[i][j], fontsize=7, labelpad=1)
            if i == 0 and col_labels is not None:
                import textwrap

                ax.set_title("\n".join(textwrap.wrap(col_labels[j], 22)), fontsize=7)
        axes[i, 0].set_ylabel(row_labels[i], fontsize=8, rotation=0, ha="right", va="center", labelpad=8)
    fig.suptitle(title)
    fig.tight_layout()
    save(fig, path)
    return fig


def _ci_segments(ax, y, lo, hi):
    """Draw each CI as a black segment with end caps (drawn as given, even when it does not contain the value --
    e.g. bootstrap CIs of small-sample FID)."""
    for yi, a, b in zip(y, lo, hi):
        if np.isfinite(a) and np.isfinite(b):
            ax.plot([a, b], [yi, yi], color="black", lw=1.1)
            ax.plot([a, a], [yi - 0.15, yi + 0.15], color="black", lw=1.1)
            ax.plot([b, b], [yi - 0.15, yi + 0.15], color="black", lw=1.1)


def _order(recipes: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(recipes))


def _metric_panels(n_panels: int, n_rows_per_panel: int, ncols: int, *, width: float, row_height: float):
    """``(fig, axes)``: a grid of at most ``ncols`` columns for ``n_panels`` panels of ``n_rows_per_panel`` bars
    each; ``axes`` is the flat list of the panels used (the grid's spare cells are hidden)."""
    n = max(n_panels, 1)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(width * ncols, row_height * n_rows_per_panel * nrows + 2.2 * nrows),
                             squeeze=False)
    for ax in list(grid.flat)[n_panels:]:
        ax.set_visible(False)
    return fig, list(grid.flat)[:n_panels]


def metric_bars(table: pd.DataFrame, metrics: Sequence[str], *, recipes: Sequence[str] | None = None,
                labels: Mapping[str, str] | None = None, path=None, title: str = "", ncols: int = 3):
    """One panel per metric: value per recipe (dot, coloured by family: FP / baseline / DGQ) with its 95% CI
    (segment); the dashed line marks FP."""
    metrics = [m for m in metrics if m in set(table["metric"])]
    recipes = _order(recipes or table["recipe"])
    fig, axes = _metric_panels(len(metrics), len(recipes), ncols, width=4.4, row_height=0.28)
    for ax, m in zip(axes, metrics):
        d = table[(table["metric"] == m)].set_index("recipe").reindex(recipes).dropna(subset=["value"])
        y = np.arange(len(d))
        colors = [RECIPE_COLORS[recipe_family(r)] for r in d.index]
        _ci_segments(ax, y, d["ci_low"], d["ci_high"])
        ax.scatter(d["value"], y, color=colors, s=60, zorder=3, edgecolor="white")
        ax.set_yticks(y)
        ax.set_yticklabels([(labels or {}).get(r, r) for r in d.index], fontsize=8)
        ax.set_ylim(len(d) - 0.5, -0.5)
        ax.set_title(m)
        if "fp" in d.index:
            ax.axvline(d.loc["fp", "value"], color=RECIPE_COLORS["fp"], lw=0.8, ls="--")
    fig.suptitle(title or "Results with 95% bootstrap CIs")
    return _finish(fig, path)


def paired_bars(paired: pd.DataFrame, metrics: Sequence[str], *, recipes: Sequence[str] | None = None,
                labels: Mapping[str, str] | None = None, value: str = "value", path=None, title: str = "",
                ncols: int = 3, reference: str = "FP"):
    """One panel per metric: paired difference ``recipe − reference`` (same prompts and seeds) with its CI;
    a CI that excludes 0 is a difference the evaluation resolves."""
    metrics = [m for m in metrics if m in set(paired["metric"])]
    recipes = _order(recipes or paired["recipe"])
    fig, axes = _metric_panels(len(metrics), len(recipes), ncols, width=4.6, row_height=0.3)
    for ax, m in zip(axes, metrics):
        d = paired[paired["metric"] == m].set_index("recipe").reindex(recipes).dropna(subset=[value])
        y = np.arange(len(d))
        colors = [RECIPE_COLORS[recipe_family(r)] for r in d.index]
        ax.barh(y, d[value], color=colors, alpha=0.9)
        _ci_segments(ax, y, d["ci_low"], d["ci_high"])
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y)
        ax.set_yticklabels([(labels or {}).get(r, r) for r in d.index], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{m}: recipe − {reference}")
    fig.suptitle(title or f"Paired differences vs {reference} (95% CI)")
    return _finish(fig, path)


def paper_vs_ours(comp: pd.DataFrame, *, path=None, title: str | None = None):
    """Share of the baseline's gap to FP that DGQ closes, per bit setting and metric: the paper (its SD v1.4 rows,
    or those of ``comp``'s ``paper_model``) vs this run."""
    paper = "paper (SD v1.4)" if "paper_model" not in comp or comp["paper_model"].iloc[0] == "sd-v1.4" else \
        f"paper ({comp['paper_model'].iloc[0]})"
    long = comp.melt(id_vars=["setting", "metric"], value_vars=["paper_gap_closed", "ours_gap_closed"],
                     var_name="source", value_name="gap_closed")
    long["source"] = long["source"].map({"paper_gap_closed": paper, "ours_gap_closed": "this run"})
    long["panel"] = long["metric"]
    metrics = list(dict.fromkeys(long["metric"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.2), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], metrics):
        d = long[long["metric"] == m]
        sns.barplot(data=d, x="setting", y="gap_closed", hue="source", ax=ax,
                    palette={paper: "#999999", "this run": "#2166ac"})
        ax.axhline(0, color="black", lw=0.8)
        ax.axhline(1, color="grey", lw=0.8, ls="--")
        vals = d["gap_closed"].dropna()
        if len(vals):
            ax.set_ylim(min(-0.25, vals.min() - 0.1), max(1.35, vals.max() + 0.1))
        for i, setting in enumerate(dict.fromkeys(d["setting"])):
            if d[(d["setting"] == setting) & (d["source"] == "this run")]["gap_closed"].isna().all():
                ax.annotate("baseline ≈ FP\n(gap not resolved)", (i + 0.2, 0.05), ha="center", fontsize=7)
        ax.set(xlabel="", ylabel="share of baseline→FP gap closed by DGQ", title=m)
        ax.legend(fontsize=8)
    fig.suptitle(title or "Does DGQ close the per-tensor baseline's gap to FP? Paper vs this run")
    return _finish(fig, path)


def ablation_bars(paired: pd.DataFrame, metrics: Sequence[str], *, labels: Mapping[str, str] | None = None,
                  order: Sequence[str] | None = None, path=None, title: str = "", reference: str = "full DGQ"):
    """Per metric, each variant's paired difference to the full method, with its 95% CI."""
    return paired_bars(paired, metrics, recipes=order, labels=labels, value="diff", path=path,
                       title=title or f"Ablations: change vs {reference} (same prompts and seeds, 95% CI)",
                       reference=reference, ncols=min(4, max(1, len(metrics))))


def calibration_curve(sweep: pd.DataFrame, metrics: Sequence[str], *, path=None, title: str = ""):
    """Notebook 07, one row of panels per metric: left, each recipe's paired difference to FP against the number
    of calibration prompts (log scale); right, DGQ − baseline per bit setting. Error bars: 95% CIs."""
    metrics = [m for m in metrics if m in set(sweep["metric"])]
    fig, axes = plt.subplots(max(1, len(metrics)), 2, figsize=(10.5, 3.2 * max(1, len(metrics))), squeeze=False)
    for row, m in zip(axes, metrics):
        for ax, comparison in zip(row, ("vs fp", "dgq - baseline")):
            d = sweep[(sweep["metric"] == m) & (sweep["comparison"] == comparison)]
            for j, (recipe, g) in enumerate(d.groupby("recipe", sort=False)):
                g = g.sort_values("n_calibration")
                fam = recipe_family(recipe)
                ls = "-" if "a8" in recipe else "--"
                ax.errorbar(g["n_calibration"] * (1 + 0.03 * j), g["diff"],
                            yerr=[g["diff"] - g["ci_low"], g["ci_high"] - g["diff"]], marker="o", capsize=3,
                            ls=ls, color=RECIPE_COLORS[fam],
                            label=recipe if comparison == "vs fp" else f"{g['setting'].iloc[0]}: DGQ − baseline")
            ax.axhline(0, color="black", lw=0.8)
            ax.set_xscale("log", base=2)
            to_fp = "to FP" if m in ("psnr", "ssim", "lpips") else "recipe − FP"
            ax.set(xlabel="calibration prompts", ylabel=f"{m}: " + (to_fp if comparison == "vs fp"
                                                                  else "DGQ − baseline"))
            if len(d):
                ax.legend(fontsize=7)
    fig.suptitle(title or "Calibration-set size: paired differences (95% CI)")
    return _finish(fig, path)


def component_bars(components: pd.DataFrame, metrics: Sequence[str], *, path=None, title: str = ""):
    """Notebook 07, one panel per metric: each variant's paired difference to DGQ (bar, 95% CI); the dashed line
    is where the baseline is (the gap): a bar that reaches it closes the gap."""
    metrics = [m for m in metrics if m in set(components["metric"])]
    labels = list(dict.fromkeys(components["label"]))
    fig, axes = _metric_panels(len(metrics), len(labels), min(3, max(1, len(metrics))), width=5.2, row_height=0.32)
    for ax, m in zip(axes, metrics):
        d = components[components["metric"] == m].set_index("label").reindex(labels).dropna(subset=["vs_dgq"])
        y = np.arange(len(d))
        colors = [RECIPE_COLORS[recipe_family(r)] for r in d["recipe"]]
        ax.barh(y, d["vs_dgq"], color=colors, alpha=0.9)
        _ci_segments(ax, y, d["vs_dgq_low"], d["vs_dgq_high"])
        ax.axvline(0, color="black", lw=0.8)
        ax.axvline(float(d["gap"].iloc[0]), color=RECIPE_COLORS["baseline"], lw=1.0, ls="--")
        ax.set_yticks(y)
        ax.set_yticklabels(d.index, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{m}: variant − DGQ (dashed: baseline)")
    fig.suptitle(title or "Which component closes DGQ's gap to the baseline? (95% CI)")
    return _finish(fig, path)


def paper_grid_bars(layout: pd.DataFrame, metric: str = "fid", *, paper_metric: str | None = None, path=None,
                    title: str = "", paper_label: str = "SD v1.4"):
    """The Table 2 grid (:func:`dgq_utils.report.calibration_study.paper_table2_layout`) as two panels: the
    paper's ``paper_metric`` (its ``paper_label`` model) and ours ``metric`` per setting and method (FP as a dashed
    line). A panel with no numbers (the paper did not run this model) is left out."""
    paper_metric = paper_metric or metric
    d = layout[layout["method"] != "FP"].copy()
    d["method_k"] = [m if m != "DGQ" else f"DGQ K={int(k)}" for m, k in zip(d["method"], d["k"])]
    fp = layout[layout["method"] == "FP"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), squeeze=False)
    panels = (f"paper_{paper_metric}", f"ours_{metric}")
    for ax, col, who in zip(axes[0], panels, (f"paper ({paper_label})", "this run")):
        if col not in d or d[col].isna().all():
            ax.set_visible(False)
            continue
        sns.barplot(data=d, x="setting", y=col, hue="method_k", ax=ax)
        if len(fp) and col in fp and np.isfinite(fp[col].iloc[0]):
            ax.axhline(float(fp[col].iloc[0]), color=RECIPE_COLORS["fp"], lw=0.9, ls="--", label="FP")
        ax.set(xlabel="", ylabel=col.split("_", 1)[1], title=who)
        ax.legend(fontsize=7)
    fig.suptitle(title or f"The paper's grid: {paper_metric} (paper) and {metric} (here)")
    return _finish(fig, path)


# ==============================================================================================================
# interactive explorers (JupyterLab); in a headless run they render their default view once
# ==============================================================================================================
def layer_explorer(stats_for, layers: Sequence[str], n_timesteps: int, prompts: Sequence[str], *,
                   default_layer: str | None = None, default_timestep: int = 0):
    """Widgets to pick a layer, a UNet call and a prompt; shows that input's per-channel / per-pixel ranges.

    ``stats_for(prompt_index or None)`` returns an :class:`~dgq_utils.calibrate.observe.ActivationStats` (``None``: all
    prompts); the notebook caches it, so each prompt is collected once, on demand.
    """
    import ipywidgets as W
    from IPython.display import display

    layer = W.Dropdown(options=list(layers), value=default_layer or layers[0], description="layer",
                       layout=W.Layout(width="90%"))
    step = W.IntSlider(min=0, max=max(n_timesteps - 1, 0), value=default_timestep, description="UNet call")
    prompt = W.Dropdown(options=[("all prompts", -1)] + [(p, i) for i, p in enumerate(prompts)], value=-1,
                        description="prompt", layout=W.Layout(width="90%"))

    def draw(layer, ti, prompt):
        st = stats_for(None if prompt < 0 else prompt)
        ts = st.stats(layer, ti)
        shape = ts.shape[1:] if ts.shape is not None and len(ts.shape) == 3 else None
        t = st.timesteps[ti] if ti < len(st.timesteps) else float("nan")
        who = "all prompts" if prompt < 0 else f"prompt {prompt}"
        layer_ranges(ts.channel, ts.pixel, pixel_shape=shape, title=f"{layer} — call {ti} (t = {t:g}), {who}")
        plt.show()

    out = W.interactive_output(draw, {"layer": layer, "ti": step, "prompt": prompt})
    box = W.VBox([layer, step, prompt, out])
    display(box)
    return box


def attention_explorer(cap, *, default_layer: str | None = None, default_timestep: int = 0):
    """Widgets to pick an attention layer, a UNet call, a prompt and the CFG half; shows the probability mass each
    key receives (:func:`attention_example`) from an :class:`~dgq_utils.report.AttentionCapture`."""
    import ipywidgets as W
    from IPython.display import display

    layers = list(cap.kinds)
    layer = W.Dropdown(options=layers, value=default_layer or layers[0], description="layer",
                       layout=W.Layout(width="90%"))
    step = W.IntSlider(min=0, max=max(len(cap.timesteps) - 1, 0), value=default_timestep, description="UNet call")
    prompt = W.Dropdown(options=[(p, i) for i, p in enumerate(cap.prompts)], value=0, description="prompt",
                        layout=W.Layout(width="90%"))
    half = W.ToggleButtons(options=["cond", "uncond"], value="cond", description="CFG half")

    def draw(layer, ti, prompt, half):
        mass = cap.key_mass[(layer, ti)]
        idx = [i for i, (p, h) in enumerate(zip(cap.sample_prompt, cap.sample_half)) if p == prompt and h == half]
        if not idx:
            print("no such sample (guidance off: only the conditional half exists)")
            return
        kind = cap.kinds[layer]
        toks = cap.tokens[prompt] if half == "cond" else None
        attention_example(mass[idx[0]].numpy(), kind=kind, tokens=toks,
                          n_tokens=prompt_length(cap.tokens[prompt]) if kind == "cross" else None,
                          title=f"{layer} — call {ti}, {half}")
        plt.show()

    out = W.interactive_output(draw, {"layer": layer, "ti": step, "prompt": prompt, "half": half})
    box = W.VBox([layer, step, prompt, half, out])
    display(box)
    return box
