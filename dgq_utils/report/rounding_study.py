"""Notebook 06's weight-rounding section: round-to-nearest on the MSE-searched grid vs AdaRound, at W4A8 / W4A6.

The same recipe family is calibrated twice per bit-width -- ``weights.rounding="nearest"`` (the report's default
W4 recipes) and ``"adaround"`` (:mod:`dgq_utils.calibrate.reconstruction`) -- on the run's calibration prompts,
and generates the same seeded images; :func:`rounding_comparison` pairs every image with FP and with the nearest
recipe of its bit-width (bootstrap CIs). AdaRound's calibration is expensive on a CPU (its own observation passes,
which sample the layer inputs, plus the optimisation: about 2 minutes per recipe on the embedded model with 300
iterations, ``benchmarks/results/adaround_cpu.md``), so :func:`rounding_plan` runs it in full on a GPU, reduced in
the quick smoke run, and not at all in the default CPU chain, which must stay within its wall-time budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd

from dgq_utils.config import get_preset
from dgq_utils.report.comparison import paired_vs

__all__ = ["CPU_RESULT", "ROUNDING_MODES", "RoundingPlan", "describe_rounding", "rounding_comparison", "rounding_plan",
           "rounding_recipes"]

#: ``weight_rounding`` parameter values: ``"auto"`` picks by device / quick (see :func:`rounding_plan`)
ROUNDING_MODES = ("auto", "full", "reduced", "skip")
#: where the CPU measurement of the comparison lives (pointed to when the section is skipped)
CPU_RESULT = "benchmarks/results/adaround_cpu.md"


@dataclass(frozen=True)
class RoundingPlan:
    """What the section runs: ``bits`` (e.g. ``("w4a8", "w4a6")``; empty: skipped), ``iters`` (AdaRound iterations
    per layer; ``None``: the :class:`~dgq_utils.config.AdaRoundConfig` default), ``mode`` and ``why``."""

    mode: str
    bits: tuple
    iters: int | None
    why: str

    @property
    def runs(self) -> bool:
        return bool(self.bits)


def rounding_plan(mode: str = "auto", *, device: str = "cpu", quick: bool = False) -> RoundingPlan:
    """``"full"``: W4A8 and W4A6 with the default AdaRound settings; ``"reduced"``: W4A8 only, 20 iterations per
    layer (a smoke test of the path, not a measurement); ``"skip"``; ``"auto"``: full on a GPU, reduced in a quick
    run, skipped on the CPU default (AdaRound's calibration would take minutes of the chain's budget)."""
    if mode not in ROUNDING_MODES:
        raise ValueError(f"weight_rounding must be one of {ROUNDING_MODES}; got {mode!r}.")
    if mode == "auto":
        mode = "full" if str(device).startswith("cuda") else ("reduced" if quick else "skip")
        why = f"auto on device={device!r}, quick={quick}"
    else:
        why = "asked"
    if mode == "full":
        return RoundingPlan(mode, ("w4a8", "w4a6"), None, why)
    if mode == "reduced":
        return RoundingPlan(mode, ("w4a8",), 20, why)
    return RoundingPlan(mode, (), None, why)


def rounding_recipes(plan: RoundingPlan, family: str = "dgq") -> list:
    """Per bit-width of ``plan``: the nearest recipe, then its AdaRound twin (with ``plan.iters`` if set)."""
    out = []
    for bits in plan.bits:
        near, ada = get_preset(f"{family}-{bits}"), get_preset(f"{family}-{bits}-adaround")
        if plan.iters is not None:
            ada = ada.replace(weights={"adaround": {"iters": int(plan.iters)}})
        out += [near, ada]
    return out


def rounding_comparison(per_image: dict, recipes: Sequence, metrics: Sequence[str], *, n_boot: int = 1000,
                        seed: int = 0, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """Paired differences (``recipe - reference``, 95% CI) of every recipe vs FP (``reference="fp"``) and of each
    AdaRound recipe vs the nearest recipe of its bit-width (``reference="nearest"``); ``recipes`` as returned by
    :func:`rounding_recipes` (pairs nearest, AdaRound). One row per (recipe, reference, metric).

    Metrics that are themselves measured against FP (PSNR, SSIM, LPIPS: FP has no value of its own) have no paired
    difference to FP; with ``table`` (the comparison's per-recipe table: ``recipe, metric, value, ci_low,
    ci_high, n``) their values are added as the ``reference="fp"`` rows (``kind="measured vs FP"``)."""
    recipes = list(recipes)
    names = [r.name for r in recipes]
    vs_fp = paired_vs({k: per_image[k] for k in ["fp"] + names}, "fp", metrics, n_boot=n_boot, seed=seed)
    vs_fp.insert(1, "reference", "fp")
    vs_fp["kind"] = "paired difference"
    parts = [vs_fp]
    if table is not None:
        have = set(zip(vs_fp.recipe, vs_fp.metric))
        t = table[table.recipe.isin(names) & table.metric.isin(metrics)]
        t = t[[(r, m) not in have for r, m in zip(t.recipe, t.metric)]]
        parts.append(pd.DataFrame({"recipe": t.recipe, "reference": "fp", "metric": t.metric, "diff": t.value,
                                   "ci_low": t.ci_low, "ci_high": t.ci_high, "n": t.n,
                                   "kind": "measured vs FP"}))
    for near, ada in zip(recipes[0::2], recipes[1::2]):
        d = paired_vs({near.name: per_image[near.name], ada.name: per_image[ada.name]}, near.name, metrics,
                      n_boot=n_boot, seed=seed)
        d.insert(1, "reference", "nearest")
        d["kind"] = "paired difference"
        parts.append(d)
    out = pd.concat(parts, ignore_index=True)
    by_name = {r.name: r for r in recipes}
    out.insert(1, "bits", [f"W{by_name[n].weights.bits}A{by_name[n].activations.bits}" for n in out.recipe])
    out.insert(2, "rounding", [by_name[n].weights.rounding for n in out.recipe])
    return out


def describe_rounding(table: pd.DataFrame, metrics: Sequence[str]) -> str:
    """One line per (bit-width, metric): AdaRound minus nearest with its CI, and whether the CI excludes 0."""
    lines = []
    t = table[table.reference == "nearest"]
    for _, r in t[t.metric.isin(metrics)].iterrows():
        resolved = r.ci_low > 0 or r.ci_high < 0
        lines.append(f"{r.bits} {r.metric}: AdaRound - nearest = {r['diff']:+.4g} [{r.ci_low:+.4g}, {r.ci_high:+.4g}]"
                     f" (n={int(r.n)}){'' if resolved else ' -- not resolved (CI contains 0)'}")
    return "\n".join(lines)
