"""Architectures of the embedded model (SD v1.x classes at a small size) and of the attribute evaluator.

Every generative component is the class Stable Diffusion v1.x uses, so the embedded pipeline loads with
``StableDiffusionPipeline.from_pretrained`` and every code path of a real checkpoint is exercised:

* text encoder: transformers ``CLIPTextModel`` (causal), the text tower of a small ``CLIPModel``;
* VAE: diffusers ``AutoencoderKL``, 3x64x64 -> 4x16x16 latents (two down-samplings);
* UNet: diffusers ``UNet2DConditionModel`` on 16x16 latents, cross-attention at 8x8 and 4x4 (down, mid
  and up blocks); the 16x16 level has plain ResNet blocks (a size chosen to keep CPU generation under
  0.3 s per image, see the model card);
* scheduler: SD v1.4's ``PNDMScheduler`` config (scaled-linear betas 0.00085 -> 0.012, 1000 steps).

``ARCH`` holds the sizes; ``--smoke`` runs of the training script shrink nothing but the step counts.
"""
from __future__ import annotations

import torch
from torch import nn

from dgq_utils.world import scenes as W

ARCH = {
    "text": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu"),
    "vision": dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=4, hidden_act="quick_gelu"),
    "projection_dim": 256,
    "vae": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
                latent_channels=4, norm_num_groups=32, sample_size=64),
    "unet": dict(sample_size=16, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(64, 96, 128), layers_per_block=1, attention_head_dim=(2, 3, 4),
                 norm_num_groups=32),
}

SCHEDULER_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
                        steps_offset=1)


def make_clip(tok):
    from transformers import CLIPConfig, CLIPModel

    special = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.eos_token_id)
    cfg = CLIPConfig(text_config={**ARCH["text"], **special}, vision_config=dict(ARCH["vision"]),
                     projection_dim=ARCH["projection_dim"])
    return CLIPModel(cfg)


def text_encoder_from_clip(clip):
    """A standalone ``CLIPTextModel`` holding the CLIP text tower's weights (what the pipeline ships)."""
    from transformers import CLIPTextModel

    te = CLIPTextModel(clip.config.text_config)
    src = {k[len("text_model."):]: v for k, v in clip.state_dict().items() if k.startswith("text_model.")}
    keys = list(te.state_dict())
    if all(k in src for k in keys):                  # transformers 5: CLIPTextModel holds the layers itself
        te.load_state_dict({k: src[k] for k in keys}, strict=True)
    else:                                            # older layout: CLIPTextModel.text_model.<...>
        te.load_state_dict({k: src[k[len("text_model."):]] for k in keys}, strict=True)
    return te


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**ARCH["vae"])


def make_unet(cross_attention_dim: int = ARCH["text"]["hidden_size"]):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(cross_attention_dim=cross_attention_dim, **ARCH["unet"])


def make_scheduler(kind: str = "pndm"):
    from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

    cfg = dict(SCHEDULER_CONFIG)
    if kind == "pndm":
        return PNDMScheduler(**cfg)
    cfg.pop("skip_prk_steps")
    if kind == "ddim":
        return DDIMScheduler(clip_sample=False, **cfg)
    if kind == "ddpm":
        cfg.pop("set_alpha_to_one")
        cfg.pop("steps_offset")
        return DDPMScheduler(clip_sample=False, **cfg)
    raise ValueError(f"Unknown scheduler kind {kind!r}")


# ------------------------------------------------------------------------------------------- evaluator
HEADS = {
    "layout": len(W.LAYOUTS),
    "colour0": len(W.COLOUR_NAMES), "shape0": len(W.SHAPES), "size0": len(W.SIZES),
    "colour1": len(W.COLOUR_NAMES), "shape1": len(W.SHAPES), "size1": len(W.SIZES),
}


class AttributeClassifier(nn.Module):
    """Small CNN: 3x64x64 image in [0, 1] -> canonical attributes (one softmax head per attribute).

    Two coordinate channels are appended to the input so absolute positions are easy to read; the
    256-d ``penultimate`` features feed FID/KID.
    """

    def __init__(self, width: int = 32, feature_dim: int = 256):
        super().__init__()
        c = [5, width, 2 * width, 3 * width, 4 * width]

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU(),
                                 nn.Conv2d(o, o, 3, padding=1, stride=2), nn.GroupNorm(8, o), nn.SiLU())

        self.features = nn.Sequential(*[block(c[i], c[i + 1]) for i in range(4)])   # 64 -> 4
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c[-1] * 16, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, n) for k, n in HEADS.items()})
        self.config = {"width": width, "feature_dim": feature_dim}

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, Wd = x.shape
        ys = torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype).view(1, 1, H, 1).expand(B, 1, H, Wd)
        xs = torch.linspace(-1, 1, Wd, device=x.device, dtype=x.dtype).view(1, 1, 1, Wd).expand(B, 1, H, Wd)
        h = torch.cat([x * 2 - 1, xs, ys], 1)
        return self.fc(self.features(h))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.penultimate(x)
        return {k: h(f) for k, h in self.heads.items()}


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
