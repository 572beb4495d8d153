"""Quality of a pipeline on the world: alignment (evaluator), FID/KID/IS-style, CLIP score.

:func:`evaluate_pipeline` works for any pipeline that takes the world's prompts (the FP embedded model, or
a quantized copy of it): fixed prompt sets (``test`` one-object, ``test`` two-object, ``heldout``) sampled
deterministically, fixed CPU-generator initial latents (the same on every device), default sampling (the
pipeline's scheduler, 25 steps, guidance 7.5).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from dgq_utils.world import scenes as W
from dgq_utils.world.clip import clip_score
from dgq_utils.world.fidelity import fidelity_metrics, frechet_distance
from dgq_utils.world.evaluator import (
    AttributeEvaluator,
    alignment,
    inception_style_score,
    is_logits,
    predictions,
    summarize,
)


def prompt_set(split: str, n: int, p_two: float, seed: int = 0) -> W.Scenes:
    return W.sample_scenes(n, split, seed=seed, p_two=p_two)


def standard_prompt_sets(n_one: int, n_two: int, n_heldout: int, seed: int = 0) -> dict[str, W.Scenes]:
    """The evaluation prompt sets (deterministic; note that a different n draws a different set)."""
    sets = {}
    if n_one:
        sets["test_one_object"] = W.sample_scenes(n_one, "test", seed=seed + 101, p_two=0.0)
    if n_two:
        sets["test_two_objects"] = W.sample_scenes(n_two, "test", seed=seed + 102, p_two=1.0)
    if n_heldout:
        sets["heldout"] = W.sample_scenes(n_heldout, "heldout", seed=seed + 103, p_two=0.5)
    return sets


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int = 0, batch_size: int = 64, num_inference_steps: int = 25,
             guidance_scale: float = 7.5) -> torch.Tensor:
    """uint8 images (N, 3, H, W); batch i uses a CPU generator seeded ``seed + i`` (device-independent)."""
    out = []
    for bi, i in enumerate(range(0, len(prompts), batch_size)):
        g = torch.Generator().manual_seed(seed + bi)
        ims = pipe(prompts[i:i + batch_size], num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   generator=g, output_type="np").images
        out.append(torch.from_numpy((np.clip(ims, 0, 1) * 255).round().astype(np.uint8)).permute(0, 3, 1, 2))
    return torch.cat(out)


def evaluate_pipeline(pipe, evaluator: AttributeEvaluator, n_one: int = 500, n_two: int = 500, n_heldout: int = 500,
                      n_real: int = 2000, seed: int = 0, batch_size: int = 250, num_inference_steps: int = 25,
                      guidance_scale: float = 7.5, fidelity: bool = True, clip=None, cuda: bool = False,
                      evaluator_dir=None) -> tuple[dict, dict]:
    """Returns ``(metrics, samples)``; ``samples[name] = (uint8 images, captions)``."""
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    metrics: dict = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                     "scheduler": type(pipe.scheduler).__name__, "seed": seed}
    samples = {}
    gen_test = []
    for name, sc in standard_prompt_sets(n_one, n_two, n_heldout, seed).items():
        caps = W.captions(sc)
        t0 = time.time()
        ims = generate(pipe, caps, seed=seed * 1000 + len(samples) * 100, batch_size=batch_size,
                       num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        dt = time.time() - t0
        out = evaluator.outputs(ims)
        al = alignment(predictions(out), sc)
        metrics[name] = summarize(al)
        metrics[name]["generation_seconds"] = round(dt, 2)
        metrics[name]["is_style"] = round(inception_style_score(is_logits(out)), 3)
        if clip is not None:
            model, pre, tok = clip
            metrics[name]["clip_score"] = round(float(clip_score(ims, caps, model, pre, tok).mean()), 3)
        samples[name] = (ims, caps)
        if name.startswith("test"):
            gen_test.append(ims)
    if fidelity and gen_test:
        real_sc = W.sample_scenes(n_real, "test", seed=seed + 104, p_two=0.5)
        dev = getattr(pipe, "device", "cpu")
        real = (W.render(real_sc, dev).cpu() * 255).round().to(torch.uint8)
        ref_sc = W.sample_scenes(n_real, "val", seed=seed + 105, p_two=0.5)
        ref = (W.render(ref_sc, dev).cpu() * 255).round().to(torch.uint8)
        gen = torch.cat(gen_test)
        fid = {"n_generated": len(gen), "n_real": n_real}
        try:
            fid["generated_vs_real_test"] = fidelity_metrics(gen, real, evaluator_dir, cuda=cuda)
            fid["real_val_vs_real_test"] = fidelity_metrics(ref[: len(gen)], real, evaluator_dir, cuda=cuda)
            fid["backend"] = "torch-fidelity"
        except ImportError:
            fid["generated_vs_real_test"] = {"fid": frechet_distance(evaluator.features(gen), evaluator.features(real))}
            fid["real_val_vs_real_test"] = {"fid": frechet_distance(evaluator.features(ref[: len(gen)]),
                                                                    evaluator.features(real))}
            fid["backend"] = "own (torch-fidelity not installed)"
        out = evaluator.outputs(real)
        fid["is_style_real_test"] = round(inception_style_score(is_logits(out)), 3)
        metrics["fidelity"] = fid
        if clip is not None:
            model, pre, tok = clip
            metrics["clip_score_real_test"] = round(float(clip_score(real, W.captions(real_sc), model, pre, tok).mean()), 3)
    return metrics, samples
