"""The embedded world as an evaluation: its prompts, reference scenes, CLIP and attribute evaluator, plugged into
the engine's :func:`dgq_utils.evaluate.compare.run_comparison`.

The world imports the engine, never the other way round: the engine's registries are the hooks (the world's
feature extractor registers itself in :mod:`dgq_utils.world.fidelity`; its CLIP is a
:class:`~dgq_utils.evaluate.metrics.ClipScorer` built with ``from_open_clip_like``; its evaluator is a plain
``(images, prompts) -> DataFrame`` callable). :func:`run_embedded_comparison` is the one call behind the report's
central table; :func:`embedded_metrics` is its metric set-up, which the notebooks use too.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from dgq_utils import paths
from dgq_utils.config import SamplerSettings
from dgq_utils.evaluate import metrics as M
from dgq_utils.evaluate.compare import DEFAULT_RECIPES, ComparisonResult, run_comparison
from dgq_utils.evaluate.config import (
    DEFAULT_METRICS,
    BootstrapConfig,
    EvaluationSet,
    MetricsConfig,
    Reference,
    Workspace,
)
from dgq_utils.model.loading import load_pipeline
from dgq_utils.world import scenes as W
from dgq_utils.world.clip import load_world_clip
from dgq_utils.world.evaluator import AttributeEvaluator
from dgq_utils.world.fidelity import EXTRACTOR
from dgq_utils.world.quality import standard_prompt_sets

__all__ = [
    "EMBEDDED_CACHE",
    "EMBEDDED_N_PROMPTS",
    "embedded_alignment_evaluator",
    "embedded_calibration_prompts",
    "embedded_clip_scorer",
    "embedded_metrics",
    "embedded_prompts",
    "embedded_reference_images",
    "run_embedded_comparison",
]

#: default number of evaluation prompts for the embedded comparison (one image per prompt and seed); see
#: :func:`run_embedded_comparison` for the time budget and CI widths it gives
EMBEDDED_N_PROMPTS = 96
#: image and feature caches shared by every embedded comparison (git-ignored)
EMBEDDED_CACHE = paths.cache_dir()


def _embedded_dirs(embedded_dir=None) -> dict[str, Path]:
    root = Path(embedded_dir) if embedded_dir is not None else paths.embedded_dir()
    return {"root": root, "pipeline": root / "pipeline", "evaluator": root / "evaluator", "clip": root / "clip"}


def embedded_prompts(n: int = EMBEDDED_N_PROMPTS, *, seed: int = 0, heldout_share: float = 0.25,
                     two_object_share: float = 0.5) -> tuple[list[str], list[bool]]:
    """Evaluation captions of the world and their held-out flags.

    ``n`` prompts from the world's standard evaluation sets (:func:`dgq_utils.world.quality.standard_prompt_sets`):
    ``test`` one-object and two-object captions plus a ``heldout_share`` of captions whose first object is a
    held-out colour-shape combination (never seen in training). Deterministic in ``seed``; a smaller ``n`` is a
    prefix of each set.
    """
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


def embedded_clip_scorer(path: str | os.PathLike | None = None, *, device: str = "cpu",
                         batch_size: int = 256) -> M.ClipScorer:
    """The world's small CLIP (a transformers ``CLIPModel`` behind open_clip's interface,
    :func:`dgq_utils.world.clip.load_world_clip`) as a CLIP scorer, from ``data/embedded/clip`` or ``path``."""
    model, preprocess, tokenizer = load_world_clip(path, device=device)
    return M.ClipScorer.from_open_clip_like(model, preprocess, tokenizer, name="embedded-clip", device=device,
                                            batch_size=batch_size, pil_input=False)


def embedded_metrics(metrics: Sequence[str] = DEFAULT_METRICS, *, embedded_dir: str | os.PathLike | None = None,
                     n_reference: int = 512, seed: int = 0, device: str = "cpu") -> MetricsConfig:
    """The embedded world's :class:`~dgq_utils.evaluate.config.MetricsConfig` for ``metrics``: FID/KID/IS on the
    attribute evaluator's features (extractor ``"dgq-world-evaluator"``) against ``n_reference`` rendered test
    scenes, the small CLIP for the CLIP score, the attribute classifier for alignment; PSNR/SSIM/LPIPS need
    nothing from the world. Only the models the chosen metrics need are loaded."""
    dirs = _embedded_dirs(embedded_dir)
    metrics = M.check_metrics(metrics)
    kw: dict[str, Any] = {}
    if "clip_score" in metrics:
        kw["clip_scorer"] = embedded_clip_scorer(dirs["clip"], device=device)
    if "alignment" in metrics:
        kw["alignment_evaluator"] = embedded_alignment_evaluator(dirs["evaluator"], device=device)
    if any(m in metrics for m in M.SET_METRICS):
        kw["extractor"] = EXTRACTOR
        kw["extractor_weights"] = str(dirs["evaluator"])
        kw["reference"] = Reference(images=embedded_reference_images(n_reference, seed=seed),
                                    name="rendered test scenes")
    return MetricsConfig(metrics, **kw)


def run_embedded_comparison(
    out_dir: str | os.PathLike = "outputs/comparison",
    *,
    recipes: Sequence[Any] = DEFAULT_RECIPES,
    n_prompts: int = EMBEDDED_N_PROMPTS,
    seeds: Sequence[int] = (0,),
    n_calibration: int = 32,
    n_reference: int = 512,
    metrics: Sequence[str] = DEFAULT_METRICS,
    sampler: SamplerSettings | None = None,
    bootstrap: BootstrapConfig | None = None,
    work: Workspace | None = None,
    embedded_dir: str | os.PathLike | None = None,
    model: Any = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
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
    ``metrics`` names the metrics (the models behind them come from :func:`embedded_metrics`); ``work``
    defaults to ``out_dir`` with the image and feature caches shared by every embedded comparison
    (:data:`EMBEDDED_CACHE`); ``states`` is a :class:`~dgq_utils.quantize.cache.StateCache` (default: on
    ``<out_dir>/quant_states``).
    """
    dirs = _embedded_dirs(embedded_dir)
    prompts, _ = embedded_prompts(n_prompts, seed=seed)
    calib = embedded_calibration_prompts(n_calibration, exclude=prompts, seed=seed)
    if model is None:
        pipe_dir = dirs["pipeline"] if embedded_dir is not None else None
        model = lambda: load_pipeline(pipe_dir, device=device)  # noqa: E731
    cfg = embedded_metrics(metrics, embedded_dir=embedded_dir, n_reference=n_reference, seed=seed, device=device)
    work = work or Workspace(out_dir, image_cache=EMBEDDED_CACHE / "images", feature_cache=EMBEDDED_CACHE / "features")
    return run_comparison(model, recipes, EvaluationSet(prompts, calib, seeds, calibration_seed=seed), work,
                          sampler=sampler or SamplerSettings(num_inference_steps=25, guidance_scale=7.5, batch_size=16),
                          metrics=cfg, bootstrap=bootstrap or BootstrapConfig(seed=seed),
                          progress=progress, title="Embedded model: FP vs baseline vs DGQ")
