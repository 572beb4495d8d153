"""Shared fixtures: one tiny random-weight Stable Diffusion pipeline per session (no downloads).

Tests that quantize use the function-scoped ``pipe`` fixture, which hands out the session pipeline and
dequantizes it afterwards, so every test starts from (and leaves) the exact FP pipeline.

Threads: the test machines are small and shared; torch is limited to ``DGQ_TEST_THREADS`` threads (default 1),
which is also faster than oversubscribing two busy cores.
"""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("DGQ_TEST_THREADS", "1")))

STEPS = 3  # sampling steps used by the quantization tests (DDIM: 3 UNet calls)


@pytest.fixture(scope="session")
def tiny_pipe():
    """The session's tiny DDIM pipeline (32x32 images, 8x8x4 latents). Do not leave it quantized."""
    from dgq_utils.testing.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0, scheduler="ddim")


@pytest.fixture()
def pipe(tiny_pipe):
    """``tiny_pipe``, dequantized again after the test (whatever the test did)."""
    from dgq_utils.quantize.pipeline import dequantize_pipeline

    dequantize_pipeline(tiny_pipe)
    yield tiny_pipe
    dequantize_pipeline(tiny_pipe)


@pytest.fixture(scope="session")
def calib_prompts():
    from dgq_utils.testing.tiny import TINY_PROMPTS

    return list(TINY_PROMPTS[:4])


@pytest.fixture(scope="session")
def fp_latents(tiny_pipe):
    """FP latents of the reference generation (2 prompts, STEPS steps, seed 0)."""
    return generate(tiny_pipe)


def generate(pipe, prompts=None, steps: int = STEPS, seed: int = 0, output_type: str = "latent"):
    """Seeded generation; returns latents (default) or a float numpy image batch (``output_type="np"``)."""
    from dgq_utils.testing.tiny import TINY_PROMPTS

    prompts = list(prompts) if prompts is not None else [TINY_PROMPTS[0], TINY_PROMPTS[1]]
    out = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(seed), output_type=output_type)
    return out.images


def psnr(a, b, peak: float | None = None) -> float:
    """PSNR in dB of ``a`` against reference ``b`` (peak: max |b| unless given)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    mse = float(((a - b) ** 2).mean())
    peak = float(b.abs().max()) if peak is None else peak
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(peak**2 / mse)).item()


_SAMPLER_FIELDS = ("num_inference_steps", "guidance_scale", "height", "width", "batch_size", "negative_prompt", "eta")


def sampler_kw(**kw) -> dict:
    """Sampler keywords folded into ``sampler=SamplerSettings(...)`` (the other keywords, e.g. ``seed``, pass
    through): for tests that try bad sampler values through an entry point."""
    from dgq_utils.config import SamplerSettings

    fields = {k: kw.pop(k) for k in list(kw) if k in _SAMPLER_FIELDS}
    return {"sampler": SamplerSettings(**fields), **kw}
