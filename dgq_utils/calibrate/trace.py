"""The trace harness: run prompts through a pipeline in seeded batches (latents only), with one
progress bar, so that hooks installed on the UNet see every call.
"""
from __future__ import annotations

import torch


def check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not a single string; wrap it: [prompt].")
    prompts = list(prompts) if prompts is not None else []
    if not prompts:
        raise ValueError("The prompt list is empty; calibration / statistics need at least one prompt.")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings; got {type(bad[0]).__name__} ({bad[0]!r}).")
    return prompts


def run_prompts(pipe, prompts, num_inference_steps, guidance_scale, seed, batch_size, height, width,
                 progress, desc, tqdm, on_batch=None):
    """Run ``prompts`` through ``pipe`` in seeded batches (latents only); ``on_batch(i)`` after each."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    old_bar = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.set_progress_bar_config(**{**old_bar, "disable": True})  # one bar (ours), not one per batch
    try:
        for i, batch in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
            pipe(
                prompt=list(batch),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                generator=torch.Generator(device="cpu").manual_seed(int(seed) + i),
                output_type="latent",
            )
            if on_batch is not None:
                on_batch(i)
    finally:
        pipe._progress_bar_config = old_bar
