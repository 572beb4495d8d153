"""One call → the results table: FP vs the baseline vs DGQ at W8A8 / W8A6 / W4A8, every number with a CI.

:func:`run_comparison` does, for the FP model and then for each recipe:

1. **calibrate** (quantized recipes only) through the workspace's :class:`~dgq_utils.quantize.cache.StateCache`
   on the :class:`~dgq_utils.evaluate.config.EvaluationSet`'s calibration prompts, which must be disjoint from the
   evaluation prompts (checked); a state calibrated before (same model, recipe, calibration prompts, sampler,
   seed, device/dtype) is loaded instead;
2. **generate** with :func:`dgq_utils.generate.images.generate_images` into the shared image cache (FP once,
   reused);
3. **measure** the requested metrics (:mod:`dgq_utils.evaluate.metrics`, set up by a
   :class:`~dgq_utils.evaluate.config.MetricsConfig`) with bootstrap CIs, and the paired difference to FP on the
   same prompts and seeds (:mod:`dgq_utils.evaluate.confidence`);
4. **append** the recipe's rows to ``results.csv/.md`` and ``paired_vs_fp.csv/.md`` (atomic rewrites) and its
   per-image values to ``per_image/<recipe>.csv``.

A recipe whose rows are already in the table is not recomputed; its images and features come from the caches.
So killing the run at any point and calling it again with the same arguments finishes it, and the final files
equal those of an uninterrupted run (tested).

The embedded world's set-up of this call (its prompts, reference scenes, CLIP and attribute evaluator) lives in
:mod:`dgq_utils.world.comparison` (``run_embedded_comparison``): the engine knows nothing of the world.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from dgq_utils.atomic import atomic_write_text
from dgq_utils.config import SamplerSettings
from dgq_utils.config import validation as V
from dgq_utils.evaluate import metrics as M
from dgq_utils.evaluate.confidence import (
    CI,
    bootstrap_mean,
    paired_difference,
    paired_statistic_difference,
)
from dgq_utils.evaluate.config import (
    DEFAULT_METRICS,
    BootstrapConfig,
    EvaluationSet,
    MetricsConfig,
    Reference,
    Workspace,
)
from dgq_utils.evaluate.results import ResultsTable, make_row, report_view, row_from_ci
from dgq_utils.generate.images import (
    GenerationResult,
    count_missing,
    describe_recipe,
    generate_images,
)
from dgq_utils.model.identity import model_identity
from dgq_utils.model.loading import load_pipeline
from dgq_utils.quantize.pipeline import dequantize_pipeline, is_quantized
from dgq_utils.timing import stage

__all__ = ["DEFAULT_METRICS", "DEFAULT_RECIPES", "ComparisonResult", "Reference", "run_comparison"]

#: the report's central comparison (FP is always added first)
DEFAULT_RECIPES = ("baseline-w8a8", "dgq-w8a8", "baseline-w8a6", "dgq-w8a6", "baseline-w4a8", "dgq-w4a8")


@dataclass
class ComparisonResult:
    table: pd.DataFrame
    paired: pd.DataFrame
    generations: dict[str, GenerationResult]
    out_dir: Path
    per_image: dict[str, pd.DataFrame] = field(default_factory=dict)

    def report(self) -> pd.DataFrame:
        return report_view(self.table)


@dataclass
class _Ctx:
    """The resolved metric set-up of one run (references loaded, LPIPS created), read by :func:`_measure`."""

    cfg: MetricsConfig
    boot: BootstrapConfig
    feature_dir: Path
    lpips: Any = None
    lpips_reason: str = ""
    ref_stats: dict | None = None
    ref_features: np.ndarray | None = None
    ref_is_fp: bool = False

    @property
    def metrics(self):
        return self.cfg.metrics

    @property
    def extractor(self):
        return self.cfg.extractor

    @property
    def n_boot(self):
        return self.boot.n_boot

    @property
    def n_boot_set(self):
        return self.boot.n_set

    @property
    def seed(self):
        return self.boot.seed

    @property
    def level(self):
        return self.boot.level


def _check_disjoint(prompts: Sequence[str], calibration_prompts: Sequence[str]) -> None:
    overlap = set(prompts) & set(calibration_prompts)
    if overlap:
        raise ValueError(f"{len(overlap)} calibration prompt(s) are also evaluation prompts (e.g. "
                         f"{sorted(overlap)[:2]}); calibration and evaluation prompts must be disjoint")


def _recipe_list(recipes) -> list:
    out = ["fp"]
    for r in V.check_recipes(recipes):
        name = describe_recipe(r)[0]
        if name == "fp":
            continue
        if name in [describe_recipe(x)[0] for x in out]:
            raise ValueError(f"recipe {name!r} is listed twice")
        out.append(r)
    return out


def _features(gen: GenerationResult, ctx: _Ctx) -> dict[str, np.ndarray]:
    with stage("features", n=len(gen)):
        return M.extract_features(gen, ctx.cfg.extractor, weights_path=ctx.cfg.extractor_weights, size=ctx.cfg.resize,
                                  cache_dir=ctx.feature_dir, device=ctx.cfg.device)


def _save_per_image(path: Path, df: pd.DataFrame) -> None:
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    atomic_write_text(path, buf.getvalue())


def _measure(name: str, gen: GenerationResult, fp: GenerationResult, fp_per_image: pd.DataFrame | None,
             fp_feats: dict | None, ctx: _Ctx) -> tuple[list[dict], list[dict], pd.DataFrame, dict | None]:
    """Rows, paired rows, per-image table and features of one recipe."""
    rows, paired = [], []
    man = gen.manifest
    per = pd.DataFrame({"prompt_index": man["prompt_index"], "seed": man["seed"], "prompt": man["prompt"]})
    n = len(man)
    is_fp = name == "fp"
    paths = list(gen.paths)
    chunk = 256  # images in memory at once: the paper protocol scores 30k images

    def chunks(ps, k=None):
        ps = ps[:k] if k is not None else ps
        for i in range(0, len(ps), chunk):
            yield M.load_images(ps[i:i + chunk], ctx.cfg.resize)

    def add_paired(metric, values):
        if not is_fp and fp_per_image is not None and metric in fp_per_image:
            a = np.asarray(values, dtype=float)
            b = fp_per_image[metric].to_numpy(dtype=float)[:len(a)]
            ok = ~(np.isnan(a) | np.isnan(b))
            if ok.any():
                ci = paired_difference(a[ok], b[ok], n_boot=ctx.n_boot, seed=ctx.seed, level=ctx.level)
                paired.append(row_from_ci(name, metric, ci, note="recipe − fp, same prompts/seeds"))

    def add_mean(metric, values, note):
        v = np.asarray(values, dtype=float)
        v = v[~np.isnan(v)]
        if len(v):
            rows.append(row_from_ci(name, metric, bootstrap_mean(v, n_boot=ctx.n_boot, seed=ctx.seed,
                                                                 level=ctx.level), note=note))

    prompts_all = list(man["prompt"])
    if "clip_score" in ctx.metrics:
        k = n if ctx.cfg.clip_first_n is None else min(n, int(ctx.cfg.clip_first_n))
        s = np.concatenate([ctx.cfg.clip_scorer.scores(x, prompts_all[i * chunk:i * chunk + len(x)], ctx.cfg.clip_convention)
                            for i, x in enumerate(chunks(paths, k))])
        per["clip_score"] = np.concatenate([s, np.full(n - k, np.nan)])
        add_mean("clip_score", s, f"{ctx.cfg.clip_scorer.name}, {ctx.cfg.clip_convention}"
                 + (f", first {k} images" if k < n else ""))
        add_paired("clip_score", s)

    if "alignment" in ctx.metrics:
        tab = pd.concat([M.alignment_table(x, prompts_all[i * chunk:i * chunk + len(x)], ctx.cfg.alignment_evaluator)
                         for i, x in enumerate(chunks(paths))], ignore_index=True)
        for c in M.alignment_columns(tab):
            per[f"alignment_{c}"] = tab[c].astype(float).to_numpy()
        if "held_out" in tab.columns:
            held = tab["held_out"].astype(bool).to_numpy()
            per["held_out"] = held
            if "caption" in tab.columns:  # per-image columns for the subsets, so they get paired diffs too
                cap = tab["caption"].astype(float).to_numpy()
                per["alignment_caption_heldout"] = np.where(held, cap, np.nan)
                per["alignment_caption_seen"] = np.where(held, np.nan, cap)
        for metric, ci in M.alignment_cis(tab, n_boot=ctx.n_boot, seed=ctx.seed).items():
            rows.append(row_from_ci(name, metric, ci, note="embedded attribute classifier"))
            if metric in per:
                add_paired(metric, per[metric].to_numpy())

    fid_metrics = [m for m in ("psnr", "ssim", "lpips") if m in ctx.metrics]
    if fid_metrics and not is_fp:
        if list(fp.manifest["prompt_index"]) != list(man["prompt_index"]) or list(fp.manifest["seed"]) != list(man["seed"]):
            raise RuntimeError("FP and recipe manifests are not aligned by prompt and seed")
        vals: dict[str, list] = {m: [] for m in fid_metrics}
        fns = {"psnr": M.psnr_per_image, "ssim": M.ssim_per_image,
               "lpips": ctx.lpips.per_image if ctx.lpips is not None else None}
        for x, r in zip(chunks(paths), chunks(list(fp.paths))):
            for m in fid_metrics:
                if fns[m] is not None:
                    vals[m].append(fns[m](x, r))
        for m in fid_metrics:
            if m == "lpips" and ctx.lpips is None:
                rows.append(make_row(name, "lpips", math.nan, n=0, note=ctx.lpips_reason))
                continue
            per[m] = np.concatenate(vals[m])
            add_mean(m, per[m], "vs FP image of the same prompt and seed")

    feats = None
    set_metrics = [m for m in M.SET_METRICS if m in ctx.metrics]
    if set_metrics:
        info = M.extractor_info(ctx.extractor)
        feats = _features(gen, ctx)
        if is_fp:
            fp_feats = feats
        ref_stats = M.fid_statistics(fp_feats[info.fid_layer]) if ctx.ref_is_fp else ctx.ref_stats
        ref_feats = fp_feats[info.kid_layer] if ctx.ref_is_fp else ctx.ref_features
        note = f"{ctx.extractor}, vs {'FP images' if ctx.ref_is_fp else 'reference'}"
        if "fid" in set_metrics and not (is_fp and ctx.ref_is_fp):
            f = feats[info.fid_layer]
            rows.append(row_from_ci(name, "fid", M.fid_ci(f, ref_stats, n_boot=ctx.n_boot_set, seed=ctx.seed,
                                                         level=ctx.level), note=note))
            if not is_fp and not ctx.ref_is_fp:
                g = fp_feats[info.fid_layer]
                ci = paired_statistic_difference(M.FidReplicates(f, ref_stats), M.FidReplicates(g, ref_stats),
                                                 n, n_boot=ctx.n_boot_set, seed=ctx.seed, level=ctx.level)
                est = M.fid(f, ref_stats) - M.fid(g, ref_stats)  # the reported difference: torch-fidelity's FIDs
                ci = CI(est, ci.low, ci.high, ci.n, ci.n_boot, ci.level, ci.method, ci.p_value)
                paired.append(row_from_ci(name, "fid", ci, note="recipe − fp, same prompts/seeds resampled jointly"))
        if "kid" in set_metrics and not (is_fp and ctx.ref_is_fp):
            if ref_feats is None:
                rows.append(make_row(name, "kid", math.nan, n=0,
                                     note="skipped: KID needs reference images/features, not only statistics"))
            else:
                f = feats[info.kid_layer]
                rows.append(row_from_ci(name, "kid", M.kid_ci(f, ref_feats, n_boot=ctx.n_boot_set, seed=ctx.seed,
                                                             level=ctx.level), note=note))
        if "isc" in set_metrics:
            if info.isc_layer is None:
                rows.append(make_row(name, "isc", math.nan, n=0, note=f"skipped: {ctx.extractor} has no logits"))
            else:
                rows.append(row_from_ci(name, "isc", M.isc_ci(feats[info.isc_layer], n_boot=ctx.n_boot_set,
                                                             seed=ctx.seed, level=ctx.level), note=ctx.extractor))
    return rows, paired, per, feats


def _fresh_pipe_source(model: Any, device: str) -> Callable[[], Any] | None:
    """A zero-argument FP pipeline factory for ``model`` (None when ``model`` is one pipeline reused in place)."""
    if hasattr(model, "unet"):
        return None
    if callable(model):
        return model

    def load():
        return load_pipeline(model, device=device)

    return load


def _resolve_reference(cfg: MetricsConfig, ctx: _Ctx) -> None:
    """Load / extract the FID-KID reference into ``ctx`` (fails, naming what is missing, before any generation)."""
    set_metrics = [m for m in M.SET_METRICS if m in cfg.metrics]
    if not set_metrics:
        return
    info = M.extractor_info(cfg.extractor)  # unknown names fail here, before any generation
    M.resolve_weights(cfg.extractor, cfg.extractor_weights)  # a missing weights file fails here too
    reference = cfg.reference
    if reference is None and ("fid" in set_metrics or "kid" in set_metrics):
        raise ValueError("FID/KID need reference=Reference(stats=..., images=... or features=...) or "
                         "reference='fp' in the MetricsConfig")
    if isinstance(reference, str):
        if reference != "fp":
            raise ValueError(f"reference must be a Reference or 'fp', got {reference!r}")
        ctx.ref_is_fp = True
    elif reference is not None:
        if reference.features is not None:
            ctx.ref_features = np.asarray(reference.features)
        elif reference.images is not None:
            ctx.ref_features = M.extract_features(reference.images, cfg.extractor, weights_path=cfg.extractor_weights,
                                                  size=cfg.resize, cache_dir=ctx.feature_dir, device=cfg.device,
                                                  layers=[info.fid_layer, info.kid_layer])[info.kid_layer]
        if reference.stats is not None:
            ctx.ref_stats = (M.load_reference_statistics(reference.stats)
                             if isinstance(reference.stats, (str, os.PathLike)) else reference.stats)
        elif ctx.ref_features is not None:
            ctx.ref_stats = M.fid_statistics(ctx.ref_features)


def run_comparison(
    model: Any,
    recipes: Sequence[Any],
    data: EvaluationSet,
    work: Workspace | str | Path,
    *,
    sampler: SamplerSettings | None = None,
    metrics: MetricsConfig | None = None,
    bootstrap: BootstrapConfig | None = None,
    model_id: str | None = None,
    progress: bool = True,
    on_image: Callable[[dict], None] | None = None,
    title: str = "FP vs baseline vs DGQ",
) -> ComparisonResult:
    """Generate and evaluate FP + ``recipes`` on ``data.prompts × data.seeds``; write and return the results tables.

    Args:
        model: a zero-argument callable returning a fresh FP pipeline (preferred), a ready pipeline (it is
            quantized/dequantized in place between recipes), or a model id/path for
            ``dgq_utils.model.loading.load_pipeline`` (``None`` = the embedded default model), loaded on
            ``metrics.device``.
        recipes: preset names or ``QuantRecipe``s (FP is always evaluated first, as the reference of the paired
            comparisons and of PSNR/SSIM/LPIPS); e.g. :data:`DEFAULT_RECIPES`.
        data: :class:`~dgq_utils.evaluate.config.EvaluationSet`: evaluation prompts and seeds (one image per
            pair), calibration prompts (must not overlap the evaluation prompts) and calibration seed.
        work: :class:`~dgq_utils.evaluate.config.Workspace` (or its folder): results (``results.csv/.md``,
            ``paired_vs_fp.csv/.md``, ``per_image/``), the image and feature caches and the calibrated-state cache.
        sampler: sampler settings (steps, guidance, size, batch size) for every recipe and for calibration
            (default ``SamplerSettings()``).
        metrics: :class:`~dgq_utils.evaluate.config.MetricsConfig` (default: every metric, Inception features).
        bootstrap: :class:`~dgq_utils.evaluate.config.BootstrapConfig` (replicates, level, seed of every CI).
        model_id: the model's identity in every cache key (default: from the pipeline,
            :func:`dgq_utils.model.identity.model_identity`).
        on_image: passed to the generation runner (called after each new image).
    """
    # the objects check their own fields when they are made (naming the field); here: that they are the objects
    V.check_instance(data, "data", EvaluationSet, fix="pass EvaluationSet(prompts, calibration, seeds).")
    V.check_instance(sampler, "sampler", SamplerSettings, allow_none=True, fix="pass SamplerSettings(...).")
    V.check_instance(metrics, "metrics", MetricsConfig, allow_none=True, fix="pass MetricsConfig([...]).")
    V.check_instance(bootstrap, "bootstrap", BootstrapConfig, allow_none=True, fix="pass BootstrapConfig(...).")
    cfg = metrics if metrics is not None else MetricsConfig()
    boot = bootstrap if bootstrap is not None else BootstrapConfig()
    sampler = sampler or SamplerSettings()
    work = Workspace.of(work)
    prompts, seeds, calibration_prompts = list(data.prompts), list(data.seeds), list(data.calibration)
    recipes = _recipe_list(recipes)
    if len(recipes) > 1 and not calibration_prompts:
        raise ValueError("quantized recipes need calibration_prompts (EvaluationSet(calibration=...), disjoint "
                         "from the evaluation prompts)")
    _check_disjoint(prompts, calibration_prompts)
    if "clip_score" in cfg.metrics and cfg.clip_scorer is None:
        raise ValueError("metric 'clip_score' needs clip_scorer=ClipScorer.from_open_clip(...) or another scorer")
    if "alignment" in cfg.metrics and cfg.alignment_evaluator is None:
        raise ValueError("metric 'alignment' needs alignment_evaluator= (e.g. the embedded world's evaluator)")
    out_dir = work.root
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_root = work.images
    states = work.state_cache()

    set_metrics = [m for m in M.SET_METRICS if m in cfg.metrics]
    ctx = _Ctx(cfg, boot, work.features)
    _resolve_reference(cfg, ctx)
    if "lpips" in cfg.metrics:
        try:
            ctx.lpips = M.LpipsScorer.create(cfg.lpips_net, cfg.lpips_weights)
        except M.LpipsUnavailable as e:
            ctx.lpips_reason = str(e)
            warnings.warn(str(e))

    table = ResultsTable(out_dir / "results", title=title)
    paired_table = ResultsTable(out_dir / "paired_vs_fp", title=f"{title}: paired differences vs FP")
    per_dir = out_dir / "per_image"
    per_dir.mkdir(exist_ok=True)

    factory = _fresh_pipe_source(model, cfg.device)

    def fresh_pipe():
        if factory is None:  # one pipeline, quantized and restored in place
            if is_quantized(model):
                dequantize_pipeline(model)
            return model
        return factory()

    fp_pipe = fresh_pipe()
    mid = model_identity(fp_pipe, model_id)

    def calibrated_as(recipe) -> str:
        """The calibrated state's file name (recipe, calibration prompts, sampler, seed): part of the image cache
        key, so the same recipe calibrated on other prompts never reuses these images."""
        return states.path(fp_pipe, recipe, calibration_prompts, sampler, seed=data.calibration_seed,
                           model_id=mid).name

    def _done(name) -> bool:
        if not (per_dir / f"{name}.csv").is_file():
            return False
        for m in cfg.metrics:
            if name == "fp" and (m in M.FIDELITY_METRICS or (m in ("fid", "kid") and ctx.ref_is_fp)):
                continue
            if m == "alignment":
                if not any(str(x).startswith("alignment_") for x in table.df.loc[table.df["recipe"] == name, "metric"]):
                    return False
            elif not table.has(name, m):
                return False
        return True

    generations: dict[str, GenerationResult] = {}
    per_image: dict[str, pd.DataFrame] = {}
    fp_per, fp_feats = None, None
    for recipe in recipes:
        name = describe_recipe(recipe)[0]
        gen_kw = dict(recipe=recipe, model_id=mid, settings=sampler, progress=progress, on_image=on_image)
        if name == "fp":
            with stage("generate", recipe=name, n=len(prompts)):
                gen = generate_images(fp_pipe, prompts, seeds, cache_root, **gen_kw)
        elif count_missing(fp_pipe, prompts, seeds, cache_root, recipe=recipe, model_id=mid, settings=sampler,
                           calibration=calibrated_as(recipe)) == 0:
            # every image is cached: no need to calibrate or load a quantized pipeline at all
            gen = generate_images(fp_pipe, prompts, seeds, cache_root, require_cached=True,
                                  calibration=calibrated_as(recipe), **gen_kw)
        else:
            pipe = fresh_pipe()
            hits_before = len(states.hits)
            with stage("calibrate", recipe=name) as info:
                states.quantize(pipe, recipe, calibration_prompts, sampler, seed=data.calibration_seed, model_id=mid,
                                progress=progress)
                info["cached"] = len(states.hits) > hits_before
            with stage("generate", recipe=name, n=len(prompts)):
                gen = generate_images(pipe, prompts, seeds, cache_root, calibration=calibrated_as(recipe), **gen_kw)
        generations[name] = gen
        per_path = per_dir / f"{name}.csv"
        if _done(name):
            per = pd.read_csv(per_path)
            feats = _features(gen, ctx) if set_metrics else None
        else:
            with stage("metrics", recipe=name, n=len(prompts)):
                rows, prow, per, feats = _measure(name, gen, generations["fp"], fp_per, fp_feats, ctx)
            _save_per_image(per_path, per)
            if prow:
                paired_table.add(prow)
            table.add(rows)  # last: a recipe counts as done only once all its files are written
        per_image[name] = per
        if name == "fp":
            fp_per, fp_feats = per, feats
    if factory is None and is_quantized(model):
        dequantize_pipeline(model)
    return ComparisonResult(table.df, paired_table.df, generations, out_dir, per_image)
