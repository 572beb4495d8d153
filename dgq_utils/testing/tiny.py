"""A tiny, random-weight Stable Diffusion pipeline for tests, demos and quick experiments.

``build_tiny_pipeline()`` assembles a real ``diffusers.StableDiffusionPipeline`` from the same classes a
Stable Diffusion v1.x checkpoint uses (``UNet2DConditionModel`` with cross-attention down/up blocks,
``AutoencoderKL``, a causal ``CLIPTextModel``, a ``CLIPTokenizer`` and SD's scheduler configuration), only
very small and with random weights drawn from a seeded generator. Every code path the quantization engine
takes on SD v1.4 is exercised (Linear and Conv2d layers, self- and cross-attention, time embedding, skip
concatenations, CFG), but a two-step 32x32 generation runs in a fraction of a second on a CPU.

Nothing is downloaded: the tokenizer is built offline by :func:`dgq_utils.model.tokenizer.build_word_level_tokenizer`
from :data:`TINY_WORDS` in a temporary folder (deleted after loading; the tokenizer lives in memory).

Shapes (defaults): 32x32 images -> VAE with 3 levels (downsampling factor 4) -> 8x8x4 latents; UNet with
block_out_channels (32, 64), one layer per block, 2 attention heads, cross_attention_dim 32; CLIP text
encoder with 2 layers, hidden size 32 and 77 positions (so the text sequence has SD's length, 77 tokens, and
token 0 is the ``<start>``/BOS token, which under the causal mask sees only itself and is therefore the same
vector for every prompt -- exactly as in SD).

With random weights the attention is close to uniform; real SD concentrates most cross-attention mass on the
``<start>`` key ("attention sink"). :func:`add_start_sink` builds such a sink *by construction* -- it is test
scaffolding, not a model property, and says so in its docstring.
"""
from __future__ import annotations

import tempfile

import torch

from dgq_utils.model.tokenizer import build_word_level_tokenizer

TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "at", "with", "and", "near", "under", "over",
    "painting", "drawing", "picture", "sketch",
    "dog", "bird", "horse", "car", "bus", "house", "flower", "river", "beach", "forest", "city", "snow",
    "sky", "cup", "apple", "clock",
    "red", "blue", "green", "yellow", "white", "black", "small", "large", "old", "new", "bright", "dark",
    "sitting", "flying", "parked", "sunny", "rainy", "night", "day",
)
"""Vocabulary of the tiny tokenizer (every word is a single token). Words such as "photo", "cat" or "tree"
are left out on purpose: with the current ``write_word_level_vocab`` their merges collide with those of
other words, so they would not come out as one token (the tokenizer's self-check rejects them)."""

TINY_PROMPTS: tuple[str, ...] = (
    "a picture of a dog",
    "a red car parked in the city",
    "a blue house near a river",
    "a horse in the snow",
    "a painting of a forest and a river",
    "a small bird flying over the beach",
    "a yellow flower in a green forest",
    "an old clock near a white cup",
)
"""Prompts that use only :data:`TINY_WORDS` (for tests and the demo)."""

SD_SCHEDULER_KWARGS = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    steps_offset=1,
)
"""Stable Diffusion v1.x scheduler configuration (shared by its PNDM and our DDIM option)."""


def make_scheduler(kind: str = "ddim"):
    """SD v1.x scheduler: ``"pndm"`` (SD's default, PLMS with ``skip_prk_steps``: 26 UNet calls for 25 steps,
    one timestep repeated) or ``"ddim"`` (one UNet call per step)."""
    from diffusers import DDIMScheduler, PNDMScheduler

    if kind == "ddim":
        return DDIMScheduler(**SD_SCHEDULER_KWARGS, clip_sample=False)
    if kind == "pndm":
        return PNDMScheduler(**SD_SCHEDULER_KWARGS, skip_prk_steps=True)
    raise ValueError(f"Unknown scheduler {kind!r}; choose 'ddim' or 'pndm'.")


def build_tiny_tokenizer(words=TINY_WORDS, model_max_length: int = 77):
    """The offline word-level ``CLIPTokenizer`` for ``words`` (written to a temporary folder, then loaded)."""
    with tempfile.TemporaryDirectory(prefix="dgq_tiny_tok_") as folder:
        return build_word_level_tokenizer(words, folder, model_max_length=model_max_length)


def build_tiny_clip(seed: int = 0):
    """``(CLIPModel, tokenizer)``: a random-weight transformers CLIP on the tiny tokenizer (32 px images, width
    32, one layer per tower), for CLIP-score tests without downloads."""
    from transformers import CLIPConfig, CLIPModel

    tok = build_tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    return CLIPModel(cfg).eval(), tok


def build_tiny_open_clip(folder, name: str = "dgq-tiny-clip", seed: int = 0):
    """Register a random-weight open_clip model config ``name`` (32 px, width 32, one layer per tower) from a JSON
    file in ``folder`` and save its weights there; returns ``(model, weights_path)`` for tests of the local-file
    open_clip path (nothing downloaded)."""
    import json
    from pathlib import Path

    import open_clip

    folder = Path(folder)
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    weights = folder / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    return model, weights


def build_tiny_pipeline(
    seed: int = 0,
    scheduler: str = "ddim",
    cross_attention_dim: int = 32,
    block_out_channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    attention_heads: int = 2,
    sample_size: int = 8,
    text_hidden_size: int | None = None,
    text_layers: int = 2,
    dtype: torch.dtype = torch.float32,
):
    """A tiny random-weight ``StableDiffusionPipeline`` (deterministic from ``seed``, no downloads).

    Args:
        seed: seeds the weight initialisation of all three models (same seed -> bit-identical weights).
        scheduler: ``"ddim"`` (default: one UNet call per step, fast tests) or ``"pndm"`` (SD's default sampler).
        cross_attention_dim: width of the text embeddings (= CLIP hidden size unless ``text_hidden_size``).
        block_out_channels: UNet widths; every level is a CrossAttn block (as in SD's first three levels).
        layers_per_block: ResNet/Transformer pairs per UNet level.
        attention_heads: heads in every UNet attention (head dim = width / heads).
        sample_size: latent side length; image side = 4 * sample_size (default 32 px).
        text_hidden_size: CLIP width (default: ``cross_attention_dim``).
        text_layers: CLIP encoder layers.
        dtype: model dtype.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    n_levels = len(block_out_channels)
    text_hidden_size = text_hidden_size or cross_attention_dim

    cpu_rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * n_levels,
            up_block_types=("CrossAttnUpBlock2D",) * n_levels,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_heads,  # diffusers' historical name: it is the number of heads
            norm_num_groups=min(32, min(block_out_channels)),
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=4 * sample_size,
        )
        torch.manual_seed(seed + 2)
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden_size,
            intermediate_size=2 * text_hidden_size,
            num_hidden_layers=text_layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=text_hidden_size,
        )
        text_encoder = CLIPTextModel(text_config)
    finally:
        torch.random.set_rng_state(cpu_rng_state)

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    for model in (unet, vae, text_encoder):
        model.eval()
    return pipe


@torch.no_grad()
def start_token_embedding(pipe) -> torch.Tensor:
    """The text encoder's output at position 0 (``<start>``); identical for every prompt (causal mask)."""
    ids = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids.to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0][0, 0]


@torch.no_grad()
def add_start_sink(pipe, strength: float = 8.0) -> None:
    """TEST SCAFFOLDING: give every cross-attention of the UNet an attention sink on key 0 (``<start>``).

    Real Stable Diffusion puts most of its cross-attention mass on the ``<start>`` token; a random tiny
    model does not. This helper creates that behaviour by construction, in place: for each ``attn2`` it
    adds to the bias of the LayerNorm that precedes it (``norm2`` of the ``BasicTransformerBlock``) a vector
    beta chosen (least squares) so that every query gets a constant component along the direction
    ``W_k (e_0 - mean_j e_j)``, where ``e_0`` is the ``<start>`` embedding and ``e_j`` the embeddings of a
    reference prompt. Queries then score key 0 about ``strength`` logits higher (per head) than the others.
    Only LayerNorm biases change; the architecture and every layer name stay the same.
    """
    from diffusers.models.attention import BasicTransformerBlock

    tok = pipe.tokenizer
    ids = tok([TINY_PROMPTS[0]], padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids.to(pipe.text_encoder.device)
    emb = pipe.text_encoder(ids)[0][0].float()  # (77, D)
    direction_in = emb[0] - emb[1:].mean(0)
    for block in pipe.unet.modules():
        if not isinstance(block, BasicTransformerBlock) or block.attn2 is None or block.norm2 is None:
            continue
        attn = block.attn2
        w_k = attn.to_k.weight.float()  # (inner, D_text)
        w_q = attn.to_q.weight.float()  # (inner, D)
        v = w_k @ direction_in  # (inner,)
        heads = attn.heads
        vh = v.view(heads, -1)
        # per head: a query offset delta_h with delta_h . v_h = strength / attn.scale
        delta = (vh / vh.pow(2).sum(-1, keepdim=True).clamp_min(1e-12) * (strength / attn.scale)).reshape(-1)
        beta = torch.linalg.lstsq(w_q, delta.unsqueeze(-1)).solution.squeeze(-1)
        norm = block.norm2
        if getattr(norm, "bias", None) is None:
            raise RuntimeError("add_start_sink needs a LayerNorm with a bias before attn2.")
        norm.bias.add_(beta.to(norm.bias.dtype))
