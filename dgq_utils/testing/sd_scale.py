"""Stable Diffusion v1.5 *architecture* with random weights, built in code: a real ``StableDiffusionPipeline`` of
SD's size for benchmarks on a GPU, without downloading anything.

UNet (859.5 M parameters), VAE (83.7 M) and CLIP ViT-L/14 text encoder (123 M) use SD v1.5's configurations
(the values of its ``*/config.json`` that define the architecture); the tokenizer is the offline word-level
``CLIPTokenizer`` of :mod:`dgq_utils.model.tokenizer` over :data:`BENCH_WORDS` (SD's BPE vocabulary cannot be
downloaded here; the token count per prompt, 77 positions with ``<start>`` first, is SD's). Weights are drawn from
a seeded generator directly on the target device, so a pipeline of SD's size is ready in seconds on a GPU.

With random weights the images are noise-like; what is measured with this pipeline is speed, memory and
agreement between execution paths (the same work as with real weights), never quality.
"""
from __future__ import annotations

import tempfile

import torch

from dgq_utils.model.tokenizer import build_word_level_tokenizer
from dgq_utils.testing.tiny import make_scheduler

__all__ = ["SD15_UNET", "SD15_VAE", "SD15_TEXT", "BENCH_WORDS", "bench_prompts", "build_sd15_pipeline"]

#: SD v1.5 ``unet/config.json`` (architecture-defining values)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, act_fn="silu", norm_eps=1e-5,
)
#: SD v1.5 ``vae/config.json``
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu",
)
#: SD v1.5 ``text_encoder/config.json`` (CLIP ViT-L/14 text tower)
SD15_TEXT = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
#: the same structure, tiny (CPU smoke tests of the benchmarks)
TINY_UNET = dict(SD15_UNET, sample_size=8, layers_per_block=1, block_out_channels=(32, 32, 64, 64),
                 cross_attention_dim=32, attention_head_dim=2)
TINY_VAE = dict(SD15_VAE, sample_size=64, layers_per_block=1, block_out_channels=(16, 16, 32, 32), norm_num_groups=8)
TINY_TEXT = dict(SD15_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=32)

BENCH_WORDS = ("a", "an", "the", "of", "in", "on", "at", "with", "and", "near", "under", "over", "photo",
               "painting", "drawing", "dog", "bird", "horse", "car", "bus", "house", "flower", "river", "beach",
               "forest", "city", "snow", "sky", "cup", "apple", "clock", "red", "blue", "green", "yellow", "white",
               "black", "small", "large", "old", "new", "bright", "dark", "sitting", "flying", "parked", "night",
               "day")


def bench_prompts(n: int) -> list[str]:
    """``n`` deterministic prompts over :data:`BENCH_WORDS` (distinct up to n = 10,000)."""
    w = BENCH_WORDS
    out = []
    for i in range(n):
        out.append(f"a {w[31 + i % 17]} {w[15 + (i // 17) % 16]} {w[4 + (i // 272) % 8]} the "
                   f"{w[21 + (i // 2176) % 10]} at {w[46 + (i // 21760) % 2]}")
    return out


def build_sd15_pipeline(*, device: str | torch.device = "cuda", dtype: torch.dtype = torch.float16, seed: int = 0,
                        tiny: bool = False, scheduler: str = "pndm"):
    """A random-weight ``StableDiffusionPipeline`` with SD v1.5's architecture (``tiny=True``: the same structure,
    a few thousand times smaller, for CPU smoke tests). ``scheduler``: ``"pndm"`` (SD's default) or ``"ddim"``."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory(prefix="dgq_sd15_tok_") as folder:
        tokenizer = build_word_level_tokenizer(BENCH_WORDS, folder, model_max_length=77)
    rng = torch.random.get_rng_state()
    try:
        with torch.device(device):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
            torch.manual_seed(seed + 1)
            vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
            torch.manual_seed(seed + 2)
            text = CLIPTextModel(CLIPTextConfig(
                **(TINY_TEXT if tiny else SD15_TEXT), vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    finally:
        torch.random.set_rng_state(rng)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_scheduler(scheduler), safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    for m in (unet, vae, text):
        m.eval()
    return pipe
