"""One call → the results table: FP vs the baseline vs DGQ at W8A8 / W8A6 / W4A8, every number with a CI.

:func:`run_comparison` does, for the FP model and then for each recipe:

1. **calibrate** (quantized recipes only): ``quantize_pipeline`` on *calibration* prompts, which must be disjoint
   from the evaluation prompts (checked); the calibrated state is saved atomically to
   ``<out_dir>/quant_states/<recipe>-<key>.safetensors`` (key: model, recipe, calibration prompts and settings)
   and loaded instead of recalibrating when the run is resumed;
2. **generate** with :func:`dgq_utils.generate.generate_images` into the shared image cache (FP once, reused);
3. **measure** the requested metrics (:mod:`dgq_utils.evaluate.metrics`) with bootstrap CIs, and the paired difference
   to FP on the same prompts and seeds (:mod:`dgq_utils.evaluate.confidence`);
4. **append** the recipe's rows to ``results.csv/.md`` and ``paired_vs_fp.csv/.md`` (atomic rewrites) and its
   per-image values to ``per_image/<recipe>.csv``.

A recipe whose rows are already in the table is not recomputed; its images and features come from the caches.
So killing the run at any point and calling it again with the same arguments finishes it, and the final files
equal those of an uninterrupted run (tested).

The embedded world (the default model, trained on a synthetic captioned world of shapes) plugs in through the
``embedded_*`` functions at the bottom, which call the world module's own API (:mod:`dgq_utils.world`);
:func:`run_embedded_comparison` is the one call behind the report's central table.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from dgq_utils import paths
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
from dgq_utils.evaluate.results import ResultsTable, make_row, row_from_ci
from dgq_utils.generate.images import (
    GenerationResult,
    count_missing,
    describe_recipe,
    generate_images,
    model_identity,
)
from dgq_utils.quantize.pipeline import dequantize_pipeline, quantize_pipeline
from dgq_utils.quantize.state import load_quant_state, save_quant_state

#: the report's central comparison (FP is always added first)
DEFAULT_RECIPES = ("baseline-w8a8", "dgq-w8a8", "baseline-w8a6", "dgq-w8a6", "baseline-w4a8", "dgq-w4a8")
DEFAULT_METRICS = ("fid", "kid", "isc", "clip_score", "alignment", "psnr", "ssim", "lpips")


# --------------------------------------------------------------------------------------------------------------
# quantization adapter
# --------------------------------------------------------------------------------------------------------------
class PipelineQuantizer:
    """Calibrate / save / load / undo a recipe on a pipeline through :mod:`dgq_utils.quantize.pipeline` (the engine).

    Any object with the same four methods can be passed to :func:`run_comparison` as ``quantizer=``.
    """

    def __init__(self, **calibration_kwargs):
        self.kw = calibration_kwargs

    def quantize(self, pipe, recipe, calibration_prompts, **kw) -> None:
        quantize_pipeline(pipe, recipe, list(calibration_prompts), **{**self.kw, **kw})

    def save(self, pipe, path) -> None:
        save_quant_state(pipe, path)

    def load(self, pipe, recipe, path) -> None:
        load_quant_state(pipe, path)

    def dequantize(self, pipe) -> None:
        dequantize_pipeline(pipe)


# --------------------------------------------------------------------------------------------------------------
# what to compare against
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Reference:
    """Real-image reference for FID/KID.

    * ``stats``: a ``{"mu", "sigma"}`` dict or an ``.npz`` path (pytorch-fid layout) — FID only;
    * ``images``: real images (paths / uint8 tensor) — features extracted (and cached) with the same extractor,
      enabling FID *and* KID;
    * ``features``: precomputed features of real images (``(N, D)`` array, from the same extractor/layer).
    * ``"fp"`` (pass the string to ``run_comparison(reference="fp")``): the FP model's own images — FID-to-FP,
      a proxy for "how far did quantization move the image distribution" when no real images exist.
    """

    stats: Any = None
    images: Any = None
    features: Any = None
    name: str = "reference"


@dataclass
class ComparisonResult:
    table: pd.DataFrame
    paired: pd.DataFrame
    generations: dict[str, GenerationResult]
    out_dir: Path
    per_image: dict[str, pd.DataFrame] = field(default_factory=dict)

    def report(self) -> pd.DataFrame:
        from dgq_utils.evaluate.results import report_view

        return report_view(self.table)


@dataclass
class _Ctx:
    metrics: list[str]
    extractor: str
    extractor_weights: Any
    metric_size: Any
    clip_scorer: Any
    clip_convention: str
    clip_first_n: int | None
    alignment_evaluator: Any
    lpips: Any
    lpips_reason: str
    n_boot: int
    n_boot_set: int
    seed: int
    level: float
    feature_dir: Path
    device: str
    ref_stats: dict | None = None
    ref_features: np.ndarray | None = None
    ref_is_fp: bool = False


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
    return M.extract_features(gen, ctx.extractor, weights_path=ctx.extractor_weights, size=ctx.metric_size,
                              cache_dir=ctx.feature_dir, device=ctx.device)


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
            yield M.load_images(ps[i:i + chunk], ctx.metric_size)

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
        k = n if ctx.clip_first_n is None else min(n, int(ctx.clip_first_n))
        s = np.concatenate([ctx.clip_scorer.scores(x, prompts_all[i * chunk:i * chunk + len(x)], ctx.clip_convention)
                            for i, x in enumerate(chunks(paths, k))])
        per["clip_score"] = np.concatenate([s, np.full(n - k, np.nan)])
        add_mean("clip_score", s, f"{ctx.clip_scorer.name}, {ctx.clip_convention}"
                 + (f", first {k} images" if k < n else ""))
        add_paired("clip_score", s)

    if "alignment" in ctx.metrics:
        tab = pd.concat([M.alignment_table(x, prompts_all[i * chunk:i * chunk + len(x)], ctx.alignment_evaluator)
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


def run_comparison(
    model: Any,
    recipes: Sequence[Any] = DEFAULT_RECIPES,
    prompts: Sequence[str] = (),
    seeds: Sequence[int] = (0,),
    out_dir: str | os.PathLike = "outputs/comparison",
    *,
    calibration_prompts: Sequence[str] = (),
    metrics: Sequence[str] = DEFAULT_METRICS,
    settings: SamplerSettings | None = None,
    cache_root: str | os.PathLike | None = None,
    feature_dir: str | os.PathLike | None = None,
    reference: Reference | str | None = None,
    extractor: str = M.INCEPTION,
    extractor_weights: str | os.PathLike | None = None,
    metric_size: int | None = None,
    clip_scorer: M.ClipScorer | None = None,
    clip_convention: str = "cosine",
    clip_first_n: int | None = None,
    alignment_evaluator: Callable | None = None,
    lpips_net: str = "alex",
    lpips_weights: str | os.PathLike | None = None,
    n_boot: int = 1000,
    n_boot_set: int = 100,
    seed: int = 0,
    ci_level: float = 0.95,
    quantizer: Any = None,
    calibration_kwargs: dict | None = None,
    model_id: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    on_image: Callable[[dict], None] | None = None,
    title: str = "FP vs baseline vs DGQ",
) -> ComparisonResult:
    """Generate and evaluate FP + ``recipes`` on ``prompts × seeds``; write and return the results tables.

    Args:
        model: a zero-argument callable returning a fresh FP pipeline (preferred), a ready pipeline (it is
            quantized/dequantized in place between recipes), or a model id/path for
            ``dgq_utils.model.loading.load_pipeline`` (``None`` = the embedded default model).
        recipes: preset names or ``QuantRecipe``s (FP is always evaluated first, as the reference of the paired
            comparisons and of PSNR/SSIM/LPIPS).
        prompts, seeds: evaluation prompts and seeds (one image per pair).
        out_dir: results (``results.csv/.md``, ``paired_vs_fp.csv/.md``, ``per_image/``, ``quant_states/``,
            ``features/``); the image cache defaults to ``<out_dir>/images`` and the feature cache to
            ``<out_dir>/features`` (pass ``cache_root`` / ``feature_dir`` to share them between comparisons: their
            keys include model, sampler settings and recipe, so sharing is safe).
        calibration_prompts: prompts for calibrating quantized recipes; must not overlap ``prompts``.
        metrics: any of :data:`dgq_utils.evaluate.metrics.METRICS`.
        settings: sampler settings (steps, guidance, size, batch size) for every recipe.
        reference: :class:`Reference` for FID/KID, or ``"fp"`` (FID/KID to the FP images).
        extractor / extractor_weights: torch-fidelity feature extractor name and local weights.
        metric_size: resize images to this side before every metric (the paper: 256).
        clip_scorer / clip_convention: a :class:`~dgq_utils.evaluate.metrics.ClipScorer`; ``"cosine"`` or
            ``"torchmetrics"``. ``clip_first_n``: score only the first n images (the paper: 3,000 of 30,000).
        alignment_evaluator: ``(uint8 images, prompts) -> DataFrame`` (see ``metrics.alignment_table``).
        lpips_net / lpips_weights: LPIPS backbone and its local weights (skipped, with a note row, if absent).
        n_boot / n_boot_set: bootstrap replicates for per-image means / for FID, KID, IS.
        quantizer: object with ``quantize/save/load/dequantize`` (default: :class:`PipelineQuantizer`).
        calibration_kwargs: extra keyword arguments for ``quantize_pipeline`` (default: ``sampler=`` the
            resolved ``settings``, ``seed``).
        on_image: passed to the generation runner (called after each new image).
    """
    metrics = M.check_metrics(metrics)
    prompts = V.check_prompts(prompts)
    seeds = V.check_seeds(seeds)
    V.check_comparison_numbers(n_boot=n_boot, n_boot_set=n_boot_set, seed=seed, ci_level=ci_level, device=device)
    V.check_instance(settings, "settings", SamplerSettings, allow_none=True, fix="pass SamplerSettings(...).")
    recipes = _recipe_list(recipes)
    needs_quant = len(recipes) > 1
    calibration_prompts = V.check_prompts(calibration_prompts, "calibration_prompts", allow_empty=True)
    if needs_quant and not calibration_prompts:
        raise ValueError("quantized recipes need calibration_prompts (disjoint from the evaluation prompts)")
    _check_disjoint(prompts, calibration_prompts)
    if "clip_score" in metrics and clip_scorer is None:
        raise ValueError("metric 'clip_score' needs clip_scorer=ClipScorer.from_open_clip(...) or .from_embedded()")
    if "alignment" in metrics and alignment_evaluator is None:
        raise ValueError("metric 'alignment' needs alignment_evaluator= (the embedded world's evaluator)")
    settings = settings or SamplerSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_root = Path(cache_root) if cache_root is not None else out_dir / "images"
    quantizer = quantizer or PipelineQuantizer()

    set_metrics = [m for m in M.SET_METRICS if m in metrics]
    ctx = _Ctx(metrics, extractor, extractor_weights, metric_size, clip_scorer, clip_convention, clip_first_n,
               alignment_evaluator, None, "", n_boot, n_boot_set, seed, ci_level,
               Path(feature_dir) if feature_dir is not None else out_dir / "features", device)
    if set_metrics:
        info = M.extractor_info(extractor)  # unknown names fail here, before any generation
        M.resolve_weights(extractor, extractor_weights)  # a missing weights file fails here too
        if reference is None and ("fid" in set_metrics or "kid" in set_metrics):
            raise ValueError("FID/KID need reference=Reference(stats=..., images=... or features=...) or "
                             "reference='fp'")
        if isinstance(reference, str):
            if reference != "fp":
                raise ValueError(f"reference must be a Reference or 'fp', got {reference!r}")
            ctx.ref_is_fp = True
        elif reference is not None:
            if reference.features is not None:
                ctx.ref_features = np.asarray(reference.features)
            elif reference.images is not None:
                ctx.ref_features = M.extract_features(reference.images, extractor, weights_path=extractor_weights,
                                                      size=metric_size, cache_dir=ctx.feature_dir, device=device,
                                                      layers=[info.fid_layer, info.kid_layer])[info.kid_layer]
            if reference.stats is not None:
                ctx.ref_stats = (M.load_reference_statistics(reference.stats)
                                 if isinstance(reference.stats, (str, os.PathLike)) else reference.stats)
            elif ctx.ref_features is not None:
                ctx.ref_stats = M.fid_statistics(ctx.ref_features)
    if "lpips" in metrics:
        try:
            ctx.lpips = M.LpipsScorer.create(lpips_net, lpips_weights)
        except M.LpipsUnavailable as e:
            ctx.lpips_reason = str(e)
            warnings.warn(str(e))

    table = ResultsTable(out_dir / "results", title=title)
    paired_table = ResultsTable(out_dir / "paired_vs_fp", title=f"{title}: paired differences vs FP")
    per_dir = out_dir / "per_image"
    per_dir.mkdir(exist_ok=True)
    state_dir = out_dir / "quant_states"

    pipe_holder: dict[str, Any] = {"quantized": False}

    def fresh_pipe():
        if hasattr(model, "unet"):  # one pipeline, quantized and restored in place
            if pipe_holder["quantized"]:
                quantizer.dequantize(model)
                pipe_holder["quantized"] = False
            return model
        if callable(model):
            return model()
        from dgq_utils.model.loading import load_pipeline

        return load_pipeline(model, device=device)

    fp_pipe = fresh_pipe()
    pipe_holder["pipe"] = fp_pipe
    mid = model_identity(fp_pipe, model_id)
    res = settings.resolved(fp_pipe)  # calibrate at the resolution we generate at (pixel groups are positional)
    cal_kw = {"sampler": res, "seed": seed, "progress": progress, **(calibration_kwargs or {})}
    # the cache key's description of the calibration (the same fields as before the sampler became one object)
    key_kw = {"num_inference_steps": res.num_inference_steps, "guidance_scale": res.guidance_scale,
              "height": res.height, "width": res.width, "seed": seed, "batch_size": res.batch_size,
              **({"negative_prompt": res.negative_prompt, "eta": res.eta}  # calibrated with them too
                 if res.negative_prompt is not None or res.eta else {}),
              **{k: v for k, v in (calibration_kwargs or {}).items() if k != "progress"}}

    def _quantized_pipe(recipe, name, rhash):
        pipe = fresh_pipe()
        pipe_holder["pipe"] = pipe
        # keyed by everything that shapes the calibrated state: model, recipe, calibration prompts and settings
        shaping = key_kw
        key = hashlib.sha256(json.dumps([mid, rhash, calibration_prompts, shaping], sort_keys=True,
                                        default=str).encode()).hexdigest()[:12]
        state = state_dir / f"{name}-{key}.safetensors"
        if state.is_file():
            try:
                pipe_holder["quantized"] = True
                quantizer.load(pipe, recipe, state)
                return pipe
            except Exception as e:  # a corrupt state file is recalibrated, not fatal
                warnings.warn(f"could not load calibrated state {state} ({e}); recalibrating")
                state.unlink(missing_ok=True)
                pipe = fresh_pipe()
                pipe_holder["pipe"] = pipe
        pipe_holder["quantized"] = True
        quantizer.quantize(pipe, recipe, calibration_prompts, **cal_kw)
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state.with_name(f".{state.stem}.tmp-{os.getpid()}{state.suffix}")
        quantizer.save(pipe, tmp)
        os.replace(tmp, state)
        return pipe

    def _done(name) -> bool:
        if not (per_dir / f"{name}.csv").is_file():
            return False
        for m in metrics:
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
        name, rhash, _ = describe_recipe(recipe)
        gen_kw = dict(recipe=recipe, model_id=mid, settings=settings, progress=progress, on_image=on_image)
        if name == "fp":
            gen = generate_images(fp_pipe, prompts, seeds, cache_root, **gen_kw)
        elif count_missing(fp_pipe, prompts, seeds, cache_root, recipe=recipe, model_id=mid, settings=settings) == 0:
            # every image is cached: no need to calibrate or load a quantized pipeline at all
            gen = generate_images(fp_pipe, prompts, seeds, cache_root, require_cached=True, **gen_kw)
        else:
            pipe = _quantized_pipe(recipe, name, rhash)
            gen = generate_images(pipe, prompts, seeds, cache_root, **gen_kw)
        generations[name] = gen
        per_path = per_dir / f"{name}.csv"
        if _done(name):
            per = pd.read_csv(per_path)
            feats = _features(gen, ctx) if set_metrics else None
        else:
            rows, prow, per, feats = _measure(name, gen, generations["fp"], fp_per, fp_feats, ctx)
            _save_per_image(per_path, per)
            if prow:
                paired_table.add(prow)
            table.add(rows)  # last: a recipe counts as done only once all its files are written
        per_image[name] = per
        if name == "fp":
            fp_per, fp_feats = per, feats
    if hasattr(model, "unet") and pipe_holder["quantized"]:
        quantizer.dequantize(model)
    return ComparisonResult(table.df, paired_table.df, generations, out_dir, per_image)


# ==============================================================================================================
# the embedded world (default model): prompts, reference images, CLIP, alignment evaluator
# ==============================================================================================================
#: default number of evaluation prompts for the embedded comparison (one image per prompt and seed); see
#: :func:`run_embedded_comparison` for the time budget and CI widths it gives
EMBEDDED_N_PROMPTS = 96
#: image and feature caches shared by every embedded comparison (git-ignored)
EMBEDDED_CACHE = paths.data_dir() / "cache"


def _embedded_dirs(embedded_dir=None) -> dict[str, Path]:
    from dgq_utils.model.loading import EMBEDDED_DIR

    root = Path(embedded_dir) if embedded_dir is not None else EMBEDDED_DIR
    return {"root": root, "pipeline": root / "pipeline", "evaluator": root / "evaluator", "clip": root / "clip"}


def embedded_prompts(n: int = EMBEDDED_N_PROMPTS, *, seed: int = 0, heldout_share: float = 0.25,
                     two_object_share: float = 0.5) -> tuple[list[str], list[bool]]:
    """Evaluation captions of the world and their held-out flags.

    ``n`` prompts from the world's standard evaluation sets (:func:`dgq_utils.world.quality.standard_prompt_sets`):
    ``test`` one-object and two-object captions plus a ``heldout_share`` of captions whose first object is a
    held-out colour-shape combination (never seen in training). Deterministic in ``seed``; a smaller ``n`` is a
    prefix of each set.
    """
    from dgq_utils.world import scenes as W
    from dgq_utils.world.quality import standard_prompt_sets

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    n_held = int(round(n * heldout_share))
    n_two = int(round((n - n_held) * two_object_share))
    n_one = n - n_held - n_two
    prompts, held = [], []
    for name, sc in standard_prompt_sets(n_one, n_two, n_held, seed).items():
        caps = W.captions(sc)
        prompts += caps
        held += [name == "heldout"] * len(caps)
    return prompts, held


def embedded_calibration_prompts(n: int = 32, *, exclude: Sequence[str] = (), seed: int = 0) -> list[str]:
    """``n`` distinct calibration captions from the world's ``val`` split, none of them in ``exclude``."""
    from dgq_utils.world import scenes as W

    out: list[str] = []
    banned = set(exclude)
    k = 0
    while len(out) < n:
        k += 1
        for c in W.captions(W.sample_scenes(4 * n * k, "val", seed=seed + 7919, p_two=0.5)):
            if c not in banned and c not in out:
                out.append(c)
                if len(out) == n:
                    break
        if k > 20:
            raise RuntimeError("could not find enough distinct calibration captions")
    return out


def embedded_reference_images(n: int = 512, *, seed: int = 0):
    """Real rendered scenes of the world's ``test`` split (uint8 (n, 3, 64, 64)): the FID/KID reference."""
    import torch

    from dgq_utils.world import scenes as W

    sc = W.sample_scenes(n, "test", seed=seed + 104, p_two=0.5)
    return (W.render(sc, "cpu") * 255).round().to(torch.uint8)


def embedded_alignment_evaluator(evaluator_dir=None, *, device: str = "cpu") -> Callable:
    """The world's attribute evaluator as ``(uint8 images, prompts) -> DataFrame`` (see
    :func:`dgq_utils.evaluate.metrics.alignment_table`).

    Columns: ``count``, ``position`` (one-object prompts; NaN otherwise), ``relation`` (two-object; NaN
    otherwise), ``colour``, ``shape``, ``size`` (fraction of the stated objects right), ``objects_present``,
    ``caption`` (the world's ``whole``: every stated attribute right), flags ``two_objects`` and ``held_out``
    (some stated colour-shape pair is a held-out combination).
    """
    from dgq_utils.world import scenes as W
    from dgq_utils.world.evaluator import AttributeEvaluator

    ev = AttributeEvaluator.load(evaluator_dir or _embedded_dirs()["evaluator"], device=device)
    held_pairs = set(W.HELDOUT_COMBOS)

    def evaluate(images, prompts):
        al = ev.score(images, list(prompts))
        two = al["two"].numpy().astype(bool)
        df = pd.DataFrame({
            "count": al["count"].numpy().astype(float),
            "position": np.where(two, np.nan, al["position"].numpy().astype(float)),
            "relation": np.where(two, al["relation"].numpy().astype(float), np.nan),
            "colour": al["colour"].numpy().astype(float),
            "shape": al["shape"].numpy().astype(float),
            "size": al["size"].numpy().astype(float),
            "objects_present": al["objects_present"].numpy().astype(float),
            "caption": al["whole"].numpy().astype(float),
        })
        df["two_objects"] = two
        df["held_out"] = [any((o["colour"], o["shape"]) in held_pairs for o in W.parse_caption(p)["objects"])
                          for p in prompts]
        return df

    return evaluate


def run_embedded_comparison(
    out_dir: str | os.PathLike = "outputs/comparison",
    *,
    recipes: Sequence[Any] = DEFAULT_RECIPES,
    n_prompts: int = EMBEDDED_N_PROMPTS,
    seeds: Sequence[int] = (0,),
    n_calibration: int = 32,
    n_reference: int = 512,
    metrics: Sequence[str] = DEFAULT_METRICS,
    settings: SamplerSettings | None = None,
    embedded_dir: str | os.PathLike | None = None,
    model: Any = None,
    seed: int = 0,
    **kwargs,
) -> ComparisonResult:
    """The report's central table on the embedded model: FP, baseline and DGQ at W8A8 / W8A6 / W4A8.

    Everything comes from the embedded world: evaluation captions (:func:`embedded_prompts`, ``n_prompts``, a
    quarter with held-out colour-shape pairs), disjoint calibration captions (``val`` split), real rendered scenes
    as the FID/KID reference, the world's attribute-evaluator features for FID/KID/IS (torch-fidelity extractor
    ``"dgq-world-evaluator"``), its small CLIP for the CLIP score, and its attribute classifier for alignment
    accuracy.

    **Default N = 96** prompts × 1 seed (36 one-object + 36 two-object ``test`` captions, 24 held-out), 32
    calibration captions, 25 PNDM steps, guidance 7.5, 64×64. Budget on the 2-core CPU
    (``benchmarks/bench_generation.py``): FP 0.25 s/image (quiet machine, 2 threads) to 0.41 s/image (busy machine,
    1 thread — use 1 torch thread on a 2-core machine that runs anything else: 2 threads there were up to 100×
    slower), quantized ×1.1–1.15 of FP, calibration 24–30 s for DGQ (less for the baselines), metrics ≈ 40 s for
    all seven → FP + the six recipes take ≈ 5 min on a quiet machine; measured end to end ≈ 10 min with another
    CPU-heavy process running alongside (1 thread).
    95 % CI half-widths measured on the embedded model at N = 128 (scale by √(128/96) ≈ 1.15 for the default):
    CLIP score ±0.04 (±0.015–0.04 paired vs FP); whole-caption alignment ±0.08 (±0.05–0.09 paired); held-out
    captions only ±0.16; colour/shape ±0.05; PSNR ±1 dB; SSIM ±0.01. So W8A6 (DGQ vs baseline: −0.08 vs −0.27 CLIP,
    −0.16 vs −0.31 alignment) is resolved, W8A8/W4A8 differences of ~0.01–0.02 are not. FID/KID at n < 256
    feature dimensions carry a large small-sample bias (FP's FID ≈ 200 at n = 128): compare recipes through the
    paired FID difference rather than absolute values.

    ``model``: a pipeline factory / pipeline / path (default: ``loading.load_pipeline`` of ``embedded_dir``).
    Other keyword arguments go to :func:`run_comparison`.
    """
    dirs = _embedded_dirs(embedded_dir)
    prompts, _ = embedded_prompts(n_prompts, seed=seed)
    calib = embedded_calibration_prompts(n_calibration, exclude=prompts, seed=seed)
    metrics = M.check_metrics(metrics)
    if model is None:
        from dgq_utils.model.loading import load_pipeline

        pipe_dir = dirs["pipeline"]
        device = kwargs.get("device", "cpu")
        model = lambda: load_pipeline(pipe_dir if embedded_dir is not None else None, device=device)  # noqa: E731
    if "clip_score" in metrics and "clip_scorer" not in kwargs:
        kwargs["clip_scorer"] = M.ClipScorer.from_embedded(dirs["clip"])
    if "alignment" in metrics and "alignment_evaluator" not in kwargs:
        kwargs["alignment_evaluator"] = embedded_alignment_evaluator(dirs["evaluator"])
    if any(m in metrics for m in M.SET_METRICS):
        kwargs.setdefault("extractor", M.EMBEDDED_EXTRACTOR)
        kwargs.setdefault("extractor_weights", str(dirs["evaluator"]))
        if "reference" not in kwargs:
            kwargs["reference"] = Reference(images=embedded_reference_images(n_reference, seed=seed),
                                            name="rendered test scenes")
    kwargs.setdefault("title", "Embedded model: FP vs baseline vs DGQ")
    kwargs.setdefault("cache_root", EMBEDDED_CACHE / "images")  # shared by every embedded comparison
    kwargs.setdefault("feature_dir", EMBEDDED_CACHE / "features")
    return run_comparison(model, recipes, prompts, seeds, out_dir, calibration_prompts=calib, metrics=metrics,
                          settings=settings or SamplerSettings(num_inference_steps=25, guidance_scale=7.5,
                                                               batch_size=16),
                          seed=seed, **kwargs)
