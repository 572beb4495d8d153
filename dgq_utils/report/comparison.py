"""Notebook-level computations of the report (everything the notebooks compute that is not plotting).

The notebooks (``notebooks/01_...`` to ``06_...``) stay thin: a ``parameters`` cell, calls into this module and
:mod:`dgq_utils.report.plots`, and sentences generated from the numbers. What lives here:

* **Model and prompts** -- :func:`open_model` gives a :class:`ModelContext`: the FP pipeline (the embedded default,
  a local folder / cached hub id such as SD v1.4, or ``"tiny"``: the random test pipeline), the evaluation and
  calibration prompts that suit it, and a work folder for caches keyed by the model's identity.
* **Where the outliers are** (notebook 01) -- :func:`outlier_table`: per layer and timestep, how far the widest
  channel / pixel range sticks out of the median one, and the heavy-tail ratio ``absmax / p99.9``.
* **Grouping decisions** (02) -- :func:`axis_decision_table` (channel- vs pixel-wise per layer under the official
  spread rule and the outlier-ratio alternative) and :func:`group_error_sweep` (quantization error of *held-out*
  activations with groups calibrated on other prompts, from per-tensor to K groups, contiguous vs sorted vs
  K-means, channel vs pixel axis).
* **Attention** (03) -- :func:`capture_attention` (softmax probabilities and values of chosen layers and
  timesteps, and per-key mass of all of them), :func:`prob_error_table` (log2 vs uniform, per-prompt vs batch
  scale, ``<start>`` FP or not, measured on the attention *output*), :func:`scale_table`.
* **Evaluation** (04-06) -- :func:`comparison_setup` (metrics and references for the model at hand; the
  calibrated states shared by notebooks 04, 05 and 06 are :meth:`ModelContext.state_cache`), :func:`ablation_recipes`,
  :func:`paired_vs`, the paper's Table 2 (:data:`PAPER_TABLE2`) and :func:`paper_comparison`.

Everything is deterministic for fixed arguments (seeded generators, seeded K-means and bootstrap); CSVs are
written atomically (:func:`write_table`).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from dgq_utils.config import get_preset
from dgq_utils.evaluate import metrics as M
from dgq_utils.evaluate.confidence import paired_difference
from dgq_utils.evaluate.config import MetricsConfig
from dgq_utils.evaluate.results import report_view
from dgq_utils.protocol.paper import paper_table2
from dgq_utils.report.context import ModelContext
from dgq_utils.world.comparison import embedded_metrics

__all__ = [
    "comparison_setup",
    "ablation_recipes",
    "ablation_label",
    "ABLATION_LABELS",
    "paired_vs",
    "PAPER_TABLE2",
    "PAPER_MODEL_OF_FAMILY",
    "paper_comparison",
    "paper_model_for",
    "paper_rows",
    "ci_halfwidths",
    "wide_table",
]


# ==============================================================================================================
# 04-06: evaluation
# ==============================================================================================================
#: metrics that need the embedded world's evaluator, small CLIP or rendered reference scenes
WORLD_METRICS = ("fid", "kid", "clip_score", "alignment")


def comparison_setup(ctx: ModelContext, metrics: Sequence[str] | None = None, *, n_reference: int = 512,
                     seed: int = 0, log=print) -> tuple[list[str], MetricsConfig]:
    """``(metric names, MetricsConfig)`` for :func:`dgq_utils.evaluate.compare.run_comparison` on the model at hand.

    * embedded: FID / KID on the world's attribute-evaluator features against rendered test scenes, the world's
      small CLIP score, attribute alignment accuracy, PSNR / SSIM vs FP (and LPIPS when its backbone weights are
      on disk) -- :func:`dgq_utils.world.comparison.embedded_metrics`, the set-up of ``run_embedded_comparison``;
    * tiny / external (SD 1.x / 2.x / SDXL / SDXL-Turbo folders): fidelity to FP only (PSNR, SSIM, LPIPS if
      available): the world's evaluator and small CLIP were trained on the embedded model's images and would score
      another model's images meaninglessly, and no offline reference exists (for SD v1.4 and SDXL-Turbo, notebook
      05's ``coco_captions`` & co. run the paper's protocol instead: :mod:`dgq_utils.report.paper_protocol`).

    ``metrics`` filters the set. Every metric asked for (or, with ``metrics=None``, every metric of the embedded
    model) that the model cannot support is named through ``log`` with the reason -- never dropped silently.
    """
    lpips_ok = M.lpips_backbone_file("alex")[1].is_file()
    fidelity = ["psnr", "ssim"] + (["lpips"] if lpips_ok else [])
    device = "cuda" if str(ctx.device).startswith("cuda") else "cpu"
    if ctx.kind == "embedded":
        available = list(WORLD_METRICS) + fidelity
        chosen = [m for m in (metrics or available) if m in available]
        _note_dropped(ctx, metrics or available, chosen, lpips_ok, log)
        return chosen, embedded_metrics(chosen, embedded_dir=ctx.embedded_dir, n_reference=n_reference, seed=seed,
                                        device=ctx.device).replace(device=device)
    chosen = [m for m in (metrics or fidelity) if m in fidelity]
    _note_dropped(ctx, metrics or [*WORLD_METRICS, "psnr", "ssim", "lpips"], chosen, lpips_ok, log)
    return chosen, MetricsConfig(chosen, device=device)


def _note_dropped(ctx: ModelContext, asked: Sequence[str], chosen: Sequence[str], lpips_ok: bool, log) -> None:
    """One line through ``log`` naming each metric of ``asked`` not in ``chosen`` and why."""
    dropped = [m for m in asked if m not in chosen]
    if not dropped:
        return
    why = []
    world = [m for m in dropped if m in WORLD_METRICS]
    if world:
        why.append(f"{', '.join(world)}: they use the embedded world's evaluator / small CLIP / rendered scenes, "
                   f"which score only the embedded model's images (this is {ctx.label}, family {ctx.family}); "
                   "for SD v1.4 or SDXL-Turbo set notebook 05's coco_captions, fid_reference, inception_weights "
                   "and clip_weights to run the paper's protocol")
    if "lpips" in dropped and not lpips_ok:
        why.append(f"lpips: its backbone weights are not on disk ({M.lpips_backbone_file('alex')[1]})")
    other = [m for m in dropped if m not in WORLD_METRICS and m != "lpips"]
    if other:
        why.append(f"{', '.join(other)}: not a metric of this comparison")
    log(f"metrics not computed -- {'; '.join(why)}. The tables hold: {', '.join(chosen) or 'nothing'}.")


def ablation_recipes(base: str = "dgq-w8a6") -> list:
    """DGQ with one component switched off at a time (each a named recipe), plus MixDQ's BOS-aware variant and
    the official-code variant of ``base``. Order: the full method first."""
    r = get_preset(base)
    tag = base[len("dgq-"):] if base.startswith("dgq-") else base
    variants = [
        r,
        r.replace(name=f"{base}-per-tensor", activations={"granularity": "per_tensor"}),
        r.replace(name=f"{base}-contiguous", activations={"grouping": "contiguous"}),
        r.replace(name=f"{base}-uniform-softmax", attention={"quantizer": "uniform"}),
        r.replace(name=f"{base}-no-start-fp", attention={"keep_start_fp": False, "keep_start_key_fp": False}),
        r.replace(name=f"{base}-batch-scale", attention={"scale": "batch"}),
        r.replace(name=f"{base}-shared-timesteps", per_timestep=False),
        r.replace(name=f"{base}-mixdq-bos", attention={"bos_kv_fp": True}),
    ]
    official = f"dgq-official-{tag}"
    try:
        variants.append(get_preset(official))
    except ValueError:
        pass
    return variants


ABLATION_LABELS = {
    "": "DGQ (all components)",
    "-per-tensor": "grouping → per-tensor",
    "-contiguous": "K-means → contiguous groups",
    "-uniform-softmax": "log2 softmax → uniform",
    "-no-start-fp": "<start> FP → quantized",
    "-batch-scale": "per-prompt → batch softmax scale",
    "-shared-timesteps": "per-timestep → shared parameters",
    "-mixdq-bos": "+ MixDQ BOS-aware (K, V of <start> FP)",
}


def ablation_label(name: str, base: str = "dgq-w8a6") -> str:
    if name.startswith("dgq-official"):
        return "official-code variant"
    if name.startswith(base):
        return ABLATION_LABELS.get(name[len(base):], name)
    return name


def paired_vs(per_image: dict[str, pd.DataFrame], reference: str, metrics: Sequence[str], *, n_boot: int = 2000,
              seed: int = 0) -> pd.DataFrame:
    """Paired bootstrap difference ``recipe - reference`` per metric on the same prompts and seeds, from
    :func:`run_comparison`'s per-image tables (rows aligned by prompt index and seed)."""
    ref = per_image[reference]
    rows = []
    for name, df in per_image.items():
        if name == reference:
            continue
        a = df.set_index(["prompt_index", "seed"])
        b = ref.set_index(["prompt_index", "seed"]).reindex(a.index)
        for m in metrics:
            if m not in a.columns or m not in b.columns:
                continue
            x, y = a[m].to_numpy(dtype=float), b[m].to_numpy(dtype=float)
            ok = ~(np.isnan(x) | np.isnan(y))
            if ok.sum() < 2:
                continue
            ci = paired_difference(x[ok], y[ok], n_boot=n_boot, seed=seed)
            rows.append({"recipe": name, "metric": m, "diff": ci.value, "ci_low": ci.low, "ci_high": ci.high,
                         "n": int(ok.sum()), "p_value": getattr(ci, "p_value", math.nan)})
    return pd.DataFrame(rows, columns=["recipe", "metric", "diff", "ci_low", "ci_high", "n", "p_value"])


def wide_table(table: pd.DataFrame, metrics: Sequence[str], recipes: Sequence[str] | None = None,
               digits: int = 4) -> pd.DataFrame:
    """Recipe x metric table with cells ``value [lo, hi]`` (a thin wrapper of :func:`results.report_view`)."""
    t = table[table["metric"].isin(metrics)]
    return report_view(t, digits=digits, recipe_order=list(recipes) if recipes else None, metric_order=list(metrics))


def ci_halfwidths(table: pd.DataFrame) -> pd.DataFrame:
    """Median CI half-width per metric over recipes (what the chosen N buys)."""
    t = table.dropna(subset=["ci_low", "ci_high"]).copy()
    t["halfwidth"] = (t["ci_high"] - t["ci_low"]) / 2
    return t.groupby("metric", sort=False).agg(n=("n", "max"), median_halfwidth=("halfwidth", "median"),
                                               median_value=("value", "median")).reset_index()


# The paper's Table 2, SD v1.4 on MS-COCO (IS, FID, CLIP) and PartiPrompts CLIP, read from the project page image
# (see shared/dgq-official-code.md section 7; "Q-Diff"/"TFMQ" are the paper's per-tensor baselines). The numbers
# live in one file, dgq_utils/protocol/paper_table2.csv, which the protocol command reads too.
#: the paper's Table 2 rows that belong to a model family (the embedded model is compared with SD v1.4's, by
#: shape only); SD 2.x and SDXL have no rows in the paper
PAPER_MODEL_OF_FAMILY = {"embedded": "sd-v1.4", "sd1": "sd-v1.4", "sdxl-turbo": "sdxl-turbo"}


def paper_model_for(family: str) -> str | None:
    """``"sd-v1.4"`` / ``"sdxl-turbo"``: the paper's Table 2 rows for a model of ``family``; ``None``: the paper
    has none (SD 2.x, SDXL)."""
    return PAPER_MODEL_OF_FAMILY.get(family)


def paper_rows(paper_model: str) -> pd.DataFrame:
    """The paper's Table 2 rows of ``paper_model`` (``"sd-v1.4"`` or ``"sdxl-turbo"``), the columns notebook 05
    shows."""
    return paper_table2(paper_model)[["bits", "method", "k", "is", "fid", "clip_score", "parti_clip"]].astype(
        {"k": "float64"})


PAPER_TABLE2 = paper_rows("sd-v1.4")


def paper_comparison(table: pd.DataFrame, *, metrics: Sequence[str] = ("fid", "clip_score"),
                     settings: Sequence[str] = ("w8a8", "w8a6", "w4a8"),
                     paired: pd.DataFrame | None = None, paper_model: str = "sd-v1.4") -> pd.DataFrame:
    """Side by side, per bit setting and metric: FP, the per-tensor baseline and DGQ (K = 16) in the paper (the
    TFMQ row, the paper's per-timestep per-tensor baseline) and here, and whether DGQ beats the baseline and
    how much of the baseline's gap to FP it closes, in each.

    ``gap_closed`` = ``(baseline - DGQ) / (baseline - FP)`` in the metric's better direction (1 = DGQ at FP
    level, 0 = no better than the baseline, < 0 worse). Numbers are not comparable across models; the *shape*
    of the result (DGQ vs baseline, gap to FP) is. With ``paired`` (``run_comparison``'s paired-vs-FP table), our
    ``gap_closed`` is left NaN where the baseline's own difference to FP is not resolved (its CI contains 0): a
    share of a gap that may not exist is meaningless (``ours_baseline_gap_resolved`` says which).

    ``paper_model``: whose rows (``"sd-v1.4"``, or ``"sdxl-turbo"`` for an SDXL-Turbo run: the paper reports DGQ
    there with K = 8 only, so its DGQ column is K = 8 while ours is the ``dgq-wXaY`` preset, K = 16;
    ``paper_dgq_k`` says which K the paper's column is).
    """
    pr = paper_rows(paper_model)
    paper_k = 16 if (pr["k"] == 16).any() else float(pr["k"].max())
    resolved = {}
    if paired is not None and len(paired):
        for r in paired.itertuples():
            resolved[(r.recipe, r.metric)] = not (r.ci_low <= 0 <= r.ci_high)
    higher_better = {"fid": False, "kid": False, "clip_score": True, "is": True, "isc": True}
    ours = table.set_index(["recipe", "metric"])["value"]
    rows = []
    for s in settings:
        bits = s.upper()
        for m in metrics:
            hb = higher_better.get(m, True)
            paper_col = {"isc": "is"}.get(m, m)
            p_fp = pr.loc[pr["method"] == "FP", paper_col]
            p_base = pr.loc[(pr["bits"] == bits) & (pr["method"] == "TFMQ"), paper_col]
            p_dgq = pr.loc[(pr["bits"] == bits) & (pr["method"] == "DGQ") & (pr["k"] == paper_k), paper_col]
            o_fp = ours.get(("fp", m), math.nan)
            o_base = ours.get((f"baseline-{s}", m), math.nan)
            o_dgq = ours.get((f"dgq-{s}", m), math.nan)

            def closed(fp, base, dgq):
                gap = (base - fp) if not hb else (fp - base)
                gain = (base - dgq) if not hb else (dgq - base)
                return gain / gap if gap and not math.isnan(gap) and abs(gap) > 1e-12 else math.nan

            def beats(base, dgq):
                if math.isnan(base) or math.isnan(dgq):
                    return None
                return bool(dgq > base) if hb else bool(dgq < base)

            pf = float(p_fp.iloc[0]) if len(p_fp) else math.nan
            pb = float(p_base.iloc[0]) if len(p_base) else math.nan
            pd_ = float(p_dgq.iloc[0]) if len(p_dgq) else math.nan
            gap_ok = resolved.get((f"baseline-{s}", m), True)
            rows.append({"setting": bits, "metric": m, "higher_is_better": hb, "paper_model": paper_model,
                         "paper_dgq_k": int(paper_k),
                         "paper_fp": pf, "paper_baseline": pb, "paper_dgq": pd_,
                         "paper_dgq_beats_baseline": beats(pb, pd_), "paper_gap_closed": closed(pf, pb, pd_),
                         "ours_fp": o_fp, "ours_baseline": o_base, "ours_dgq": o_dgq,
                         "ours_dgq_beats_baseline": beats(o_base, o_dgq),
                         "ours_baseline_gap_resolved": gap_ok,
                         "ours_gap_closed": closed(o_fp, o_base, o_dgq) if gap_ok else math.nan})
    return pd.DataFrame(rows)
