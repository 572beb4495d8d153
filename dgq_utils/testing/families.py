"""Tiny random-weight SD 2.x, SDXL and SDXL-Turbo pipelines built in code (no downloads), for tests and demos.

They use the same diffusers/transformers classes and the same *structural* choices as the real checkpoints,
only very small, so every code path the engine takes on those families is exercised in a fraction of a second:

* :func:`build_tiny_sd2_pipeline` -- ``StableDiffusionPipeline`` like SD 2.x: per-level head counts
  (``attention_head_dim`` a tuple), ``use_linear_projection=True`` (Linear instead of 1x1 Conv proj_in/out),
  a GELU text encoder (OpenCLIP-H style) and a scheduler with ``prediction_type`` ``"v_prediction"`` (SD 2.x
  768-v) or ``"epsilon"`` (SD 2.x base).
* :func:`build_tiny_sdxl_pipeline` -- ``StableDiffusionXLPipeline``: two text encoders (``CLIPTextModel`` and
  ``CLIPTextModelWithProjection``) whose hidden states are concatenated along the feature axis (so key 0 of
  cross-attention is still the ``<start>`` token of both), the ``text_time`` added conditioning
  (``added_cond_kwargs``: pooled text embedding + size/crop ids), a first level without attention and several
  transformer layers per block. ``turbo=True`` gives SDXL-Turbo's sampler: Euler-ancestral with ``trailing``
  timestep spacing, meant for 1-4 steps at guidance 0.

Weights are drawn from seeded generators; the global RNG state is restored afterwards.
"""
from __future__ import annotations

import torch

from dgq_utils.testing.tiny import SD_SCHEDULER_KWARGS, build_tiny_tokenizer

__all__ = ["build_tiny_sd2_pipeline", "build_tiny_sdxl_pipeline"]

def _tiny_vae(sample_size: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=4 * sample_size)


def _text_config(tokenizer, hidden: int, layers: int, act: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, projection_dim=hidden, hidden_act=act)


def _finish(pipe, models, dtype):
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    for m in models:
        m.eval()
    return pipe


def build_tiny_sd2_pipeline(seed: int = 0, *, prediction_type: str = "v_prediction", sample_size: int = 8,
                            dtype: torch.dtype = torch.float32):
    """A tiny SD 2.x-like ``StableDiffusionPipeline`` (see the module docstring); 32x32 images by default."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    if prediction_type not in ("v_prediction", "epsilon"):
        raise ValueError(f"prediction_type must be 'v_prediction' or 'epsilon', got {prediction_type!r}.")
    tokenizer = build_tiny_tokenizer()
    rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=48,
            attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32)
        torch.manual_seed(seed + 1)
        vae = _tiny_vae(sample_size)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_text_config(tokenizer, 48, 2, "gelu"))
    finally:
        torch.random.set_rng_state(rng)
    scheduler = DDIMScheduler(**SD_SCHEDULER_KWARGS, clip_sample=False, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    return _finish(pipe, (unet, vae, text_encoder), dtype)


def build_tiny_sdxl_pipeline(seed: int = 0, *, turbo: bool = False, sample_size: int = 8,
                             dtype: torch.dtype = torch.float32):
    """A tiny SDXL-like (``turbo=True``: SDXL-Turbo-like) ``StableDiffusionXLPipeline``; 32x32 images."""
    from diffusers import (
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_tokenizer()
    hidden_1, hidden_2, time_dim = 32, 32, 8
    rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + hidden_2,
            cross_attention_dim=hidden_1 + hidden_2, norm_num_groups=32)
        torch.manual_seed(seed + 1)
        vae = _tiny_vae(sample_size)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_1, 2, "quick_gelu"))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_2, 2, "gelu"))
    finally:
        torch.random.set_rng_state(rng)
    sched_kw = dict(SD_SCHEDULER_KWARGS)
    sched_kw.pop("set_alpha_to_one")
    if turbo:
        scheduler = EulerAncestralDiscreteScheduler(**sched_kw, timestep_spacing="trailing")
    else:
        scheduler = EulerDiscreteScheduler(**sched_kw, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    return _finish(pipe, (unet, vae, text_encoder, text_encoder_2), dtype)
