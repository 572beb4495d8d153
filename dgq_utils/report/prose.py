"""Sentences generated from the numbers (what the notebooks and the README say), and small helpers.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import pandas as pd

from dgq_utils.report.comparison import ablation_label, paired_vs
from dgq_utils.report.grouping_study import RULES
from dgq_utils.report.outliers import pct

__all__ = [
    "HIGHER_IS_BETTER",
    "higher_is_better",
    "headline_metrics",
    "prompt_length",
    "describe_decisions",
    "describe_error_curve",
    "describe_attention",
    "dgq_vs_baseline",
    "describe_comparison",
    "describe_ablations",
    "describe_fidelity",
    "describe_ci_widths",
    "describe_paper_agreement",
    "describe_calibration_sizes",
    "describe_calibration_components",
    "pixel_shape",
    "evenly_spaced",
]


# ==============================================================================================================
# sentences computed from the numbers (the notebooks print these instead of asserting results in prose)
# ==============================================================================================================
HIGHER_IS_BETTER = {"fid": False, "kid": False, "lpips": False, "clip_score": True, "isc": True, "psnr": True,
                    "ssim": True}


def higher_is_better(metric: str) -> bool:
    """Direction of a metric (alignment accuracies and unknown metrics: higher is better)."""
    return HIGHER_IS_BETTER.get(metric, True)


def headline_metrics(available: Iterable[str]) -> list[str]:
    """The few metrics the report leads with, among ``available`` (in this order)."""
    pref = ["alignment_caption", "clip_score", "fid", "kid", "psnr", "ssim", "lpips", "isc"]
    avail = list(available)
    return [m for m in pref if m in avail]


def prompt_length(tokens: Sequence[str]) -> int:
    """Number of leading tokens worth showing: ``<start>``, the words and the first end token."""
    for i, t in enumerate(tokens):
        if i > 0 and "endoftext" in t:
            return i + 1
    return len(tokens)


def describe_decisions(summary: pd.DataFrame, accuracy: pd.DataFrame | None = None,
                       decisions: pd.DataFrame | None = None) -> str:
    """Sentences about :func:`decision_summary` (and :func:`axis_rule_accuracy`)."""
    n = len(summary)
    parts = []
    for rule in RULES:
        col = f"{rule}_majority"
        if col in summary:
            c = int((summary[col] == "channel").sum())
            parts.append(f"the {rule.replace('_', ' ')} rule groups **{c} of {n}** inputs channel-wise and "
                         f"{n - c} pixel-wise (majority over timesteps)")
    text = "Per layer, " + "; ".join(parts) + "."
    if decisions is not None and all(r in decisions for r in RULES):
        d = decisions[decisions[RULES[0]] != "channel (only axis)"]
        if len(d):
            agree = float((d[RULES[0]] == d[RULES[1]]).mean())
            flips = d.groupby("layer")[RULES[0]].nunique()
            text += (f" The two rules agree on {pct(agree)} of the (layer, timestep) decisions; "
                     f"{int((flips > 1).sum())} inputs change axis between timesteps under the official rule.")
    if accuracy is not None and len(accuracy):
        a = accuracy.set_index("rule")
        k = int(a["k"].iloc[0])
        s = [f"{r.replace('_', ' ')} {pct(a.loc[r, 'picks_better_axis'])}" for r in a.index]
        text += (f" Measured on held-out activations with {k} K-means groups, the rule's axis is the one with the "
                 f"lower error for: {', '.join(s)} of {int(a['inputs'].iloc[0])} inputs (channel-wise is the "
                 f"better axis for {pct(a['share_channel_better'].iloc[0])} of them).")
    return text


def describe_error_curve(curves: pd.DataFrame, *, axis_choice: str = "official") -> str:
    """Sentences about :func:`error_curve` tables (relative MSE vs K, per method)."""
    c = curves[curves["axis_choice"] == axis_choice]
    g = c[c["method"] != "per-tensor"]
    if g.empty:
        return "No grouped errors were measured."
    kmax = int(g["k"].max())
    at = g[g["k"] == kmax].set_index("method")["gmean_rel_mse"]
    best = at.idxmin()
    parts = [f"{m} {at[m]:.2f}×" for m in at.index]
    text = (f"With {kmax} groups on the axis the {axis_choice} rule picks, the held-out quantization MSE is "
            f"{', '.join(parts)} that of per-tensor quantization (geometric mean over inputs); **{best}** is lowest "
            "here.")
    km = g[g["method"] == "kmeans"].sort_values("k")
    if len(km):
        kbest = int(km.loc[km["gmean_rel_mse"].idxmin(), "k"])
        if kbest < kmax:
            text += (f" K-means error is lowest at K = {kbest} and grows again towards K = {kmax}: ranges fitted on "
                     "few calibration prompts per group clip held-out values that fall outside them (0 is not "
                     "forced into a group's range).")
        else:
            text += " K-means error keeps falling up to the largest K measured."
    return text


def describe_attention(start: pd.DataFrame, err: pd.DataFrame, scales: pd.DataFrame, *, bits: int = 6) -> str:
    """Sentences about the ``<start>`` sink, log2 vs uniform and per-prompt vs batch scale."""
    out = []
    if len(start):
        s = start.groupby("kind").agg(mass=("start_mass", "mean"), ratio=("start_over_uniform", "mean"))
        if "cross" in s.index:
            out.append(f"In cross-attention, key 0 (`<start>`) receives on average **{s.loc['cross', 'mass']:.2f}** "
                       f"of each query's probability ({s.loc['cross', 'ratio']:.1f}× a uniform share).")
        if "self" in s.index:
            out.append(f"In self-attention key 0 is just the top-left latent pixel; it receives "
                       f"{s.loc['self', 'ratio']:.1f}× a uniform share.")
    if len(err):
        e = err[(err["bits"] == bits) & (err["scale"] == "per_prompt") & ((err["kind"] == "self") | err["start_fp"])]
        m = e.groupby(["kind", "quantizer"])["out_rel_err"].median()
        z = e.groupby(["kind", "quantizer"])["zeroed"].median()
        for kind in ("cross", "self"):
            if (kind, "log2") in m and (kind, "uniform") in m:
                lg, un = m[(kind, "log2")], m[(kind, "uniform")]
                better = "log2" if lg < un else "uniform"
                out.append(f"{kind.capitalize()}-attention at {bits} bits (per-prompt scale"
                           f"{', <start> FP' if kind == 'cross' else ''}): median relative output error "
                           f"{lg:.3g} with log2 vs {un:.3g} with uniform → **{better}** is "
                           f"{max(lg, un) / max(min(lg, un), 1e-30):.1f}× better; uniform rounds "
                           f"{pct(z[(kind, 'uniform')])} of the nonzero probabilities to 0 (log2: "
                           f"{pct(z[(kind, 'log2')])}).")
        c = err[(err["kind"] == "cross") & (err["bits"] == bits) & (err["scale"] == "per_prompt")
                & (err["quantizer"] == "log2")]
        if len(c):
            w = c.groupby("start_fp")["out_rel_err"].median()
            if True in w and False in w:
                out.append(f"Keeping `<start>` FP changes the median log2 cross-attention error from {w[False]:.3g} "
                           f"to {w[True]:.3g}.")
    if len(scales):
        r = scales["batch_over_sample"]
        out.append(f"A batch-wide scale (official code) exceeds a sample's own maximum by a median factor "
                   f"{r.median():.2f} (up to {r.max():.1f}×).")
        for q in ("log2", "uniform"):
            a, b = f"{q}_per_prompt_err", f"{q}_batch_err"
            if a in scales and b in scales:
                out.append(f"{q}: median error {scales[a].median():.3g} per-prompt vs {scales[b].median():.3g} "
                           "batch-wide.")
    return " ".join(out)


def dgq_vs_baseline(per_image: dict[str, pd.DataFrame], metrics: Sequence[str],
                    settings: Sequence[str] = ("w8a8", "w8a6", "w4a8"), *, n_boot: int = 2000,
                    seed: int = 0) -> pd.DataFrame:
    """Paired difference DGQ − baseline per bit setting and per-image metric (same prompts and seeds)."""
    rows = []
    for s in settings:
        b, d = f"baseline-{s}", f"dgq-{s}"
        if b in per_image and d in per_image:
            t = paired_vs({b: per_image[b], d: per_image[d]}, b, metrics, n_boot=n_boot, seed=seed)
            t.insert(0, "setting", s.upper())
            rows.append(t)
    if not rows:
        return pd.DataFrame(columns=["setting", "recipe", "metric", "diff", "ci_low", "ci_high", "n", "p_value"])
    return pd.concat(rows, ignore_index=True)


def _verdict(metric: str, lo: float, hi: float) -> str:
    if lo > 0 or hi < 0:
        up = lo > 0
        return "better" if up == higher_is_better(metric) else "worse"
    return "not resolved"


def describe_comparison(table: pd.DataFrame, versus: pd.DataFrame, metrics: Sequence[str]) -> str:
    """Per bit setting: is DGQ better than the baseline (paired CI excludes 0), and how far both are from FP."""
    vals = table.set_index(["recipe", "metric"])["value"]
    out = []
    for s in ("W8A8", "W8A6", "W4A8"):
        v = versus[versus["setting"] == s]
        bits = []
        for m in metrics:
            r = v[v["metric"] == m]
            if len(r):
                r = r.iloc[0]
                verdict = _verdict(m, r["ci_low"], r["ci_high"])
                bits.append(f"{m} {r['diff']:+.3g} [{r['ci_low']:+.3g}, {r['ci_high']:+.3g}] ({verdict})")
            elif m in ("fid", "kid"):
                b, d = vals.get((f"baseline-{s.lower()}", m)), vals.get((f"dgq-{s.lower()}", m))
                if b is not None and d is not None and not (math.isnan(b) or math.isnan(d)):
                    bits.append(f"{m} {d:.3g} vs {b:.3g} (no paired CI)")
        if bits:
            out.append(f"- **{s}**, DGQ − baseline: " + "; ".join(bits))
    return "\n".join(out)


def describe_ablations(versus: pd.DataFrame, metrics: Sequence[str], *, base: str = "dgq-w8a6") -> str:
    """One line per variant: which metrics change resolvably (paired CI excludes 0) when a component is off."""
    out = []
    for name in dict.fromkeys(versus["recipe"]):
        v = versus[(versus["recipe"] == name) & versus["metric"].isin(metrics)]
        changed = [f"{r.metric} {r.diff:+.3g} [{r.ci_low:+.3g}, {r.ci_high:+.3g}] (variant "
                   f"{_verdict(r.metric, r.ci_low, r.ci_high)})"
                   for r in v.itertuples() if _verdict(r.metric, r.ci_low, r.ci_high) != "not resolved"]
        label = ablation_label(name, base)
        out.append(f"- **{label}**: " + ("; ".join(changed) if changed else "no change resolved at this N"))
    return "\n".join(out)


def describe_fidelity(table: pd.DataFrame) -> str:
    """Notebook 04: mean PSNR to FP of DGQ vs the baseline at each bit setting, one bullet each."""
    m = table[table.metric == "psnr"].set_index("recipe")["value"]
    lines = [f"- {s.upper()}: DGQ {m.get('dgq-' + s, float('nan')):.1f} dB vs baseline "
             f"{m.get('baseline-' + s, float('nan')):.1f} dB" for s in ("w8a8", "w8a6", "w4a8")]
    return ("Mean PSNR to FP over the grid's prompts (see notebook 05 for the full evaluation with CIs):\n"
            + "\n".join(lines))


def describe_ci_widths(table: pd.DataFrame, versus: pd.DataFrame, widths: pd.DataFrame, metrics: Sequence[str],
                       n_prompts: int) -> str:
    """Notebook 05: DGQ vs baseline (:func:`describe_comparison`) and the median CI half-width N buys."""
    w = widths.set_index("metric")
    return ("**DGQ vs baseline, paired on the same prompts and seeds** (difference [95% CI]; *better* / *worse* "
            "when the CI excludes 0):\n" + describe_comparison(table, versus, metrics)
            + f"\n\n**What N = {n_prompts} buys:** median 95% CI half-width "
            + ", ".join(f"{m} ±{w.loc[m, 'median_halfwidth']:.3g}" for m in metrics if m in w.index)
            + ". Paired differences are tighter: see the second figure.")


def describe_paper_agreement(comp: pd.DataFrame) -> str:
    """Notebook 05: in how many (setting, metric) cells DGQ beats the baseline in the paper and here, and whether
    the direction agrees (``comp``: :func:`dgq_utils.report.comparison.paper_comparison`)."""
    agree = comp.dropna(subset=["ours_dgq_beats_baseline"])
    same = (agree.paper_dgq_beats_baseline == agree.ours_dgq_beats_baseline)
    return (f"DGQ beats the baseline in the paper in {int(agree.paper_dgq_beats_baseline.sum())} of "
            f"{len(agree)} (setting, metric) cells and here in {int(agree.ours_dgq_beats_baseline.sum())}; "
            f"the direction agrees in {int(same.sum())} of {len(agree)}.")


def _ci(diff: float, lo: float, hi: float) -> str:
    return f"{diff:+.3g} [{lo:+.3g}, {hi:+.3g}]"


def describe_calibration_sizes(sweep: pd.DataFrame, metric: str = "psnr") -> str:
    """Notebook 07: per bit setting, DGQ − baseline on ``metric`` at each number of calibration prompts, and at
    which sizes the difference is resolved (CI excludes 0) in which direction (``sweep``:
    :func:`dgq_utils.report.calibration_study.calibration_sweep_table`)."""
    t = sweep[(sweep["comparison"] == "dgq - baseline") & (sweep["metric"] == metric)]
    if not len(t):
        return f"No DGQ − baseline pair was measured on {metric}."
    out = []
    for setting, g in t.groupby("setting", sort=False):
        g = g.sort_values("n_calibration")
        cells = [f"{int(r.n_calibration)}: {_ci(r.diff, r.ci_low, r.ci_high)}" for r in g.itertuples()]
        verdict = {}
        for r in g.itertuples():
            verdict.setdefault(_verdict(metric, r.ci_low, r.ci_high), []).append(str(int(r.n_calibration)))
        said = "; ".join(f"DGQ {v} than the baseline at {', '.join(ns)} calibration prompts" if v != "not resolved"
                         else f"not resolved at {', '.join(ns)}" for v, ns in verdict.items())
        out.append(f"- **{setting}**, DGQ − baseline {metric} by number of calibration prompts: "
                   + "; ".join(cells) + f" — {said}.")
    return "\n".join(out)


def describe_calibration_components(components: pd.DataFrame, metric: str = "psnr", *, n_calibration: int | None = None,
                                    closes: float = 0.5) -> str:
    """Notebook 07: which component, moved toward the baseline, closes DGQ's gap to the baseline on ``metric``
    (``components``: :func:`dgq_utils.report.calibration_study.component_table`).

    A variant *closes the gap* when it recovers at least ``closes`` of it (``gap_closed``) and is no longer
    resolved worse than the baseline. Everything said comes from the table: the gap, each variant's share with its
    paired CI, and which (if any) close it.
    """
    t = components[components["metric"] == metric]
    if not len(t):
        return f"No component variant was measured on {metric}."
    g = t.iloc[0]
    where = f" with {n_calibration} calibration prompts" if n_calibration is not None else ""
    head = f"Baseline − DGQ{where} on {metric}: {_ci(g.gap, g.gap_low, g.gap_high)}"
    if not bool(g.gap_resolved):
        return head + " — not resolved at this N, so there is no gap to attribute to a component."
    hb = higher_is_better(metric)
    dgq_worse = (g.gap > 0) == hb
    variants = t[~t["recipe"].str.startswith("baseline-") | t["recipe"].str.endswith("-log2-softmax")]
    lines = [head + f" (DGQ {'worse' if dgq_worse else 'better'} than the baseline). Share of it each change "
             "recovers (variant − DGQ [95% CI]; 1 = at the baseline's level):"]
    for r in variants.sort_values("gap_closed", ascending=False).itertuples():
        lines.append(f"- {r.label}: {r.gap_closed:.0%} of the gap (variant − DGQ {_ci(r.vs_dgq, r.vs_dgq_low, r.vs_dgq_high)}, "
                     f"variant − baseline {_ci(r.vs_baseline, r.vs_baseline_low, r.vs_baseline_high)})")
    worse_than_baseline = (lambda r: (r.vs_baseline_high < 0) if hb else (r.vs_baseline_low > 0))
    closing = [r for r in variants.itertuples() if not r.recipe.startswith("baseline-")
               and r.gap_closed >= closes and not worse_than_baseline(r)]
    if closing:
        best = max(closing, key=lambda r: r.gap_closed)
        lines.append(f"**What closes the gap:** {best.label} ({best.gap_closed:.0%})"
                     + (f"; also {', '.join(f'{r.label} ({r.gap_closed:.0%})' for r in closing if r is not best)}"
                        if len(closing) > 1 else "") + ".")
    else:
        top = variants[~variants["recipe"].str.startswith("baseline-")].sort_values("gap_closed", ascending=False)
        lines.append("**No single component closes the gap** (none recovers "
                     f"{closes:.0%} without staying resolved worse than the baseline)"
                     + (f"; the largest share is {top.iloc[0].label} ({top.iloc[0].gap_closed:.0%})." if len(top) else "."))
    return "\n".join(lines)


def pixel_shape(stats, layer: str, timestep_index: int):
    """``(H, W)`` of a conv input's pixel axis (for drawing it as an image), else ``None``."""
    lt, per_t = stats.layers[layer]
    shape = per_t[timestep_index].shape
    return tuple(shape[1:]) if lt == "conv" and shape is not None and len(shape) == 3 else None


def evenly_spaced(n_total: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n_total)``, first and last included."""
    if k <= 1 or n_total <= 1:
        return [0]
    return sorted({int(round(i * (n_total - 1) / (k - 1))) for i in range(k)})
