"""Notebook 07: how the number of calibration prompts moves DGQ vs the baseline, which component causes it, and
the paper's grid (W4A6, K = 8) laid out like its Table 2.

* :func:`calibration_sweep_table` -- per number of calibration prompts, each recipe's paired difference to FP and
  DGQ − baseline per bit setting (long table, one row per size x comparison x metric);
* :func:`component_recipes` -- DGQ with one component moved toward the per-tensor baseline at a time (the
  baseline, and the baseline with DGQ's softmax quantizer, last); :func:`component_table` -- each variant's
  paired difference to DGQ and to the baseline, and the share of the DGQ − baseline gap it closes;
* :func:`paper_grid_recipes` / :func:`paper_table2_layout` -- the paper's settings x methods grid with the
  paper's numbers beside ours.

The sentences that go with these tables are :func:`dgq_utils.report.prose.describe_calibration_sizes` and
:func:`~dgq_utils.report.prose.describe_calibration_components`.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from dgq_utils.config import get_preset
from dgq_utils.report.comparison import paired_vs, paper_rows

__all__ = [
    "calibration_sweep_table",
    "component_recipes",
    "component_label",
    "COMPONENT_LABELS",
    "CPU_COMPONENTS",
    "component_table",
    "paper_grid_recipes",
    "paper_table2_layout",
    "sweep_sizes",
]

SWEEP_COLUMNS = ["n_calibration", "comparison", "setting", "recipe", "metric", "diff", "ci_low", "ci_high", "n",
                 "p_value"]


def _setting_of(recipe: str) -> str:
    """``"W8A8"`` from ``baseline-w8a8`` / ``dgq-w8a8-g8`` (empty if the name has no ``wXaY`` part)."""
    for part in str(recipe).split("-"):
        if len(part) == 4 and part[0] == "w" and part[2] == "a" and part[1].isdigit() and part[3].isdigit():
            return part.upper()
    return ""


def calibration_sweep_table(paired_by_size: Mapping[int, pd.DataFrame],
                            per_image_by_size: Mapping[int, Mapping[str, pd.DataFrame]], metrics: Sequence[str], *,
                            tables_by_size: Mapping[int, pd.DataFrame] | None = None, n_boot: int = 1000,
                            seed: int = 0) -> pd.DataFrame:
    """One row per (number of calibration prompts, comparison, recipe, metric).

    ``paired_by_size``: per size, :func:`~dgq_utils.evaluate.compare.run_comparison`'s paired-vs-FP table
    (``comparison = "vs fp"``); ``per_image_by_size``: per size, its per-image tables, from which DGQ − baseline
    is computed for every bit setting that has both (``comparison = "dgq - baseline"``, ``recipe`` the DGQ one).
    ``tables_by_size``: per size, the results table; a metric that is already a comparison to FP (PSNR, SSIM,
    LPIPS: no paired-vs-FP row) gives its ``vs fp`` row from there (its mean with the bootstrap CI).
    """
    rows = []
    for n_cal in sorted(paired_by_size):
        p = paired_by_size[n_cal]
        p = p[p["metric"].isin(metrics)]
        if tables_by_size is not None and n_cal in tables_by_size:
            t = tables_by_size[n_cal]
            have = set(zip(p["recipe"], p["metric"]))
            extra = t[t["metric"].isin(metrics) & (t["recipe"] != "fp")
                      & ~pd.Series(list(zip(t["recipe"], t["metric"])), index=t.index).isin(have)]
            p = pd.concat([p, extra[[c for c in p.columns if c in extra.columns]]], ignore_index=True)
        for r in p.itertuples():
            rows.append({"n_calibration": int(n_cal), "comparison": "vs fp", "setting": _setting_of(r.recipe),
                         "recipe": r.recipe, "metric": r.metric, "diff": r.value, "ci_low": r.ci_low,
                         "ci_high": r.ci_high, "n": getattr(r, "n", math.nan),
                         "p_value": getattr(r, "p_value", math.nan)})
        per = per_image_by_size.get(n_cal, {})
        for b in [name for name in per if name.startswith("baseline-")]:
            d = "dgq-" + b[len("baseline-"):]
            if d not in per:
                continue
            t = paired_vs({b: per[b], d: per[d]}, b, metrics, n_boot=n_boot, seed=seed)
            for r in t.itertuples():
                rows.append({"n_calibration": int(n_cal), "comparison": "dgq - baseline",
                             "setting": _setting_of(d), "recipe": d, "metric": r.metric, "diff": r.diff,
                             "ci_low": r.ci_low, "ci_high": r.ci_high, "n": r.n, "p_value": r.p_value})
    return pd.DataFrame(rows, columns=SWEEP_COLUMNS)


#: what each variant of :func:`component_recipes` changes (suffix of the DGQ / baseline name -> label)
COMPONENT_LABELS = {
    "": "DGQ (all components)",
    "-contiguous": "K-means → contiguous groups",
    "-zero-in-range": "group ranges include 0 (as the baseline's)",
    "-per-tensor": "groups → per-tensor (min/max)",
    "-per-tensor-ema": "groups → per-tensor EMA range (the baseline's activations)",
    "-shared-timesteps": "per-timestep → shared parameter sets",
    "-baseline-softmax": "log2 softmax → the baseline's uniform static one",
    "baseline": "per-tensor baseline",
    "baseline-log2-softmax": "baseline with DGQ's softmax quantizer",
}


#: the component changes notebook 07 runs by default on a CPU (where each costs a calibration and a generation)
CPU_COMPONENTS = ["-per-tensor"]


def component_recipes(setting: str = "w8a8", components: Sequence[str] | None = None) -> list:
    """DGQ at ``setting`` (first), then DGQ with one component moved to the per-tensor baseline's choice at a time,
    then the baseline and the baseline with DGQ's softmax quantizer (log2, per-prompt scale, ``<start>`` FP).

    ``components``: the changes to include, as :data:`COMPONENT_LABELS` keys (``"-contiguous"``, ...,
    ``"baseline-log2-softmax"``); ``None``: all. DGQ and the baseline are always included.
    The range estimator only applies to per-tensor ranges (group ranges are min/max, as in the official code), so
    it is measured as the step per-tensor min/max → per-tensor EMA.
    """
    allowed = [k for k in COMPONENT_LABELS if k not in ("", "baseline")]
    if components is not None:
        unknown = [c for c in components if c not in allowed]
        if unknown:
            raise ValueError(f"components: unknown change(s) {unknown}; allowed: {allowed} (or None for all).")
    d = get_preset(f"dgq-{setting}")
    b = get_preset(f"baseline-{setting}")
    base = d.name
    ema = {"granularity": "per_tensor", "range_estimator": "ema", "ema_momentum": b.activations.ema_momentum}
    changes = {
        "-contiguous": lambda: d.replace(name=f"{base}-contiguous", activations={"grouping": "contiguous"}),
        "-zero-in-range": lambda: d.replace(name=f"{base}-zero-in-range",
                                            activations={"group_range_includes_zero": True}),
        "-per-tensor": lambda: d.replace(name=f"{base}-per-tensor", activations={"granularity": "per_tensor"}),
        "-per-tensor-ema": lambda: d.replace(name=f"{base}-per-tensor-ema", activations=ema),
        "-shared-timesteps": lambda: d.replace(name=f"{base}-shared-timesteps", per_timestep=False),
        "-baseline-softmax": lambda: d.replace(name=f"{base}-baseline-softmax", attention=b.attention),
        "baseline-log2-softmax": lambda: b.replace(name=f"{b.name}-log2-softmax", attention=d.attention),
    }
    chosen = allowed if components is None else [c for c in allowed if c in components]
    out = [d] + [changes[c]() for c in chosen if c.startswith("-")] + [b]
    return out + [changes[c]() for c in chosen if not c.startswith("-")]


def component_label(name: str) -> str:
    """The label of a :func:`component_recipes` name (the name itself if it is none of them)."""
    if name.startswith("baseline-"):
        return COMPONENT_LABELS["baseline-log2-softmax"] if name.endswith("-log2-softmax") else \
            COMPONENT_LABELS["baseline"]
    if name.startswith("dgq-") and _setting_of(name):
        suffix = name.split(_setting_of(name).lower(), 1)[1]
        return COMPONENT_LABELS.get(suffix, name)
    return name


def component_table(per_image: Mapping[str, pd.DataFrame], metrics: Sequence[str], *, base: str, baseline: str,
                    n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per variant and metric: its paired difference to DGQ (``vs_dgq``) and to the baseline (``vs_baseline``),
    with CIs, and ``gap_closed = vs_dgq / gap`` where ``gap`` = baseline − DGQ: 1 = the variant is where the
    baseline is, 0 = no change from DGQ (the metric's direction does not matter: both are differences of the same
    sign). ``gap_resolved``: the DGQ − baseline CI excludes 0 (else ``gap_closed`` is NaN: a share of a gap that
    may not exist means nothing). The baseline's own row carries the gap (``vs_dgq``)."""
    if base not in per_image or baseline not in per_image:
        raise ValueError(f"component_table: per_image needs {base!r} and {baseline!r}; got {sorted(per_image)}")
    vs_d = paired_vs(dict(per_image), base, metrics, n_boot=n_boot, seed=seed).set_index(["recipe", "metric"])
    vs_b = paired_vs(dict(per_image), baseline, metrics, n_boot=n_boot, seed=seed).set_index(["recipe", "metric"])
    rows = []
    for name in per_image:
        if name in (base, "fp"):
            continue
        for m in metrics:
            if (name, m) not in vs_d.index or (baseline, m) not in vs_d.index:
                continue
            g = vs_d.loc[(baseline, m)]
            resolved = not (g.ci_low <= 0 <= g.ci_high)
            d = vs_d.loc[(name, m)]
            b = vs_b.loc[(name, m)] if (name, m) in vs_b.index else None
            closed = d["diff"] / g["diff"] if resolved and abs(g["diff"]) > 1e-12 else math.nan
            rows.append({"recipe": name, "label": component_label(name), "metric": m,
                         "vs_dgq": d["diff"], "vs_dgq_low": d.ci_low, "vs_dgq_high": d.ci_high,
                         "vs_baseline": math.nan if b is None else b["diff"],
                         "vs_baseline_low": math.nan if b is None else b.ci_low,
                         "vs_baseline_high": math.nan if b is None else b.ci_high,
                         "gap": g["diff"], "gap_low": g.ci_low, "gap_high": g.ci_high, "gap_resolved": resolved,
                         "gap_closed": closed, "n": int(d.n)})
    return pd.DataFrame(rows)


# ==============================================================================================================
# the paper's grid
# ==============================================================================================================
def paper_grid_recipes(settings: Sequence[str] = ("w8a8", "w8a6", "w4a8", "w4a6"), ks: Sequence[int] = (8, 16)
                       ) -> list[str]:
    """Preset names of the paper's Table 2 grid: per setting the per-tensor baseline, then DGQ for each K
    (``dgq-wXaY`` is K = 16, ``dgq-wXaY-g8`` K = 8)."""
    out = []
    for s in settings:
        s = str(s).lower()
        out.append(f"baseline-{s}")
        for k in ks:
            name = f"dgq-{s}" if int(k) == 16 else f"dgq-{s}-g{int(k)}"
            get_preset(name)  # an unknown K / setting fails here, naming the preset
            out.append(name)
    return out


def _k_of(recipe: str) -> float:
    if not recipe.startswith("dgq-"):
        return math.nan
    tail = recipe.rsplit("-", 1)[-1]
    return float(tail[1:]) if tail.startswith("g") and tail[1:].isdigit() else 16.0


def paper_table2_layout(table: pd.DataFrame, recipes: Sequence[str], metrics: Sequence[str], *,
                        paper: pd.DataFrame | None = None, paper_model: str | None = "sd-v1.4",
                        paper_baseline: str = "TFMQ") -> pd.DataFrame:
    """The paper's Table 2 layout: one row per (setting, method, K) -- FP first, then per setting the baseline
    and DGQ per K -- with the paper's IS / FID / CLIP (its ``paper_baseline`` row for the baseline) and ours
    (``ours_<metric>`` with ``_low`` / ``_high``: the 95% CI) side by side.

    ``table``: :func:`run_comparison`'s results table (recipe, metric, value, ci_low, ci_high) with ``fp`` and
    ``recipes``. The paper's numbers are ``paper`` when given, else the rows of ``paper_model`` (``"sd-v1.4"``, the
    default and the embedded model's comparison, or ``"sdxl-turbo"``; :func:`dgq_utils.report.comparison.
    paper_model_for` maps a model family to it); ``paper_model=None`` (a family the paper did not run, SD 2.x or
    SDXL) leaves every paper cell NaN. A paper cell with no number (the paper has none for that row) is NaN; so is
    an ours cell whose recipe or metric is not in ``table``.
    """
    if paper is None:
        paper = (paper_rows(paper_model) if paper_model is not None
                 else pd.DataFrame(columns=["bits", "method", "k", "is", "fid", "clip_score"]))
    vals = table.set_index(["recipe", "metric"])

    def ours(recipe):
        out = {}
        for m in metrics:
            if (recipe, m) in vals.index:
                r = vals.loc[(recipe, m)]
                r = r.iloc[0] if isinstance(r, pd.DataFrame) else r
                out[f"ours_{m}"], out[f"ours_{m}_low"], out[f"ours_{m}_high"] = r["value"], r.ci_low, r.ci_high
            else:
                out[f"ours_{m}"] = out[f"ours_{m}_low"] = out[f"ours_{m}_high"] = math.nan
        return out

    def paper_row(bits, method, k):
        sel = (paper["bits"] == bits) & (paper["method"] == method)
        if not math.isnan(k):
            sel &= paper["k"] == k
        p = paper[sel]
        return {f"paper_{c}": (float(p[c].iloc[0]) if len(p) else math.nan) for c in ("is", "fid", "clip_score")}

    rows = [{"setting": "W32A32", "method": "FP", "k": math.nan, "recipe": "fp", **paper_row("W32A32", "FP", math.nan),
             **ours("fp")}]
    for r in recipes:
        s, k = _setting_of(r), _k_of(r)
        method = "DGQ" if r.startswith("dgq-") else "baseline"
        rows.append({"setting": s, "method": method, "k": k, "recipe": r,
                     **paper_row(s, "DGQ" if method == "DGQ" else paper_baseline, k), **ours(r)})
    return pd.DataFrame(rows)


def sweep_sizes(sizes: Sequence[int], *, available: int | None = None) -> list[int]:
    """``sizes`` sorted, duplicates dropped, each checked (an integer >= 1); ``available`` caps them."""
    out = []
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 1:
            raise ValueError(f"calibration_sizes: got {n!r} in {list(sizes)!r}; allowed: integers >= 1.")
        n = int(n) if available is None else min(int(n), int(available))
        if n not in out:
            out.append(n)
    return sorted(out)
