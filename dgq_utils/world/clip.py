"""The small CLIP of the world, behind the interface open_clip models have.

``load_world_clip(path)`` returns ``(model, preprocess, tokenizer)`` like
``open_clip.create_model_and_transforms`` + ``open_clip.get_tokenizer``: ``model.encode_image(x)`` takes
the output of ``preprocess`` (batched), ``model.encode_text(ids)`` the output of ``tokenizer(list_of_str)``,
and ``model.logit_scale`` is the learnt log temperature. So CLIP-score code written for an open_clip model
(ViT-B/32 etc. for real SD) runs unchanged on this world; :func:`clip_score` is that computation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dgq_utils import paths
from dgq_utils.world import scenes as W
from dgq_utils.world.evaluator import images_to_tensor
from dgq_utils.world.text import load_world_tokenizer, tokenize

DEFAULT_CLIP_DIR = paths.embedded_dir() / "clip"


def pixel_values(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (B, 3, H, W) -> the CLIP vision tower's input (64x64, scaled to [-1, 1])."""
    if x.shape[-1] != W.IMAGE_SIZE or x.shape[-2] != W.IMAGE_SIZE:
        x = F.interpolate(x, size=(W.IMAGE_SIZE, W.IMAGE_SIZE), mode="bilinear", antialias=True)
    return x * 2 - 1


def image_embeds(clip, x01: torch.Tensor) -> torch.Tensor:
    """Projected (unnormalised) image embeddings of [0, 1] images; version-independent transformers calls."""
    return clip.visual_projection(clip.vision_model(pixel_values=pixel_values(x01)).pooler_output)


def text_embeds(clip, ids: torch.Tensor) -> torch.Tensor:
    return clip.text_projection(clip.text_model(input_ids=ids).pooler_output)


class WorldCLIP(nn.Module):
    """open_clip-style wrapper around a transformers ``CLIPModel``."""

    def __init__(self, clip, tokenizer):
        super().__init__()
        self.clip = clip.eval()
        self.hf_tokenizer = tokenizer

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``images``: batched output of ``preprocess`` (values in [-1, 1], 3x64x64)."""
        f = self.clip.visual_projection(self.clip.vision_model(pixel_values=images).pooler_output)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        f = text_embeds(self.clip, ids)
        return F.normalize(f, dim=-1) if normalize else f

    def forward(self, images, ids):
        return self.encode_image(images, True), self.encode_text(ids, True), self.logit_scale.exp()


class _Preprocess:
    """PIL image / HxWx3 array / 3xHxW tensor -> 3x64x64 tensor in [-1, 1]."""

    def __call__(self, image) -> torch.Tensor:
        if hasattr(image, "convert"):
            image = np.asarray(image.convert("RGB"))
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        return pixel_values(x[None])[0]


class _Tokenizer:
    def __init__(self, tok):
        self.tok = tok

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        return tokenize(self.tok, [texts] if isinstance(texts, str) else list(texts))


def load_world_clip(path: str | Path | None = None, device="cpu"):
    """``(model, preprocess, tokenizer)`` of the shipped small CLIP (``data/embedded/clip``), offline."""
    from transformers import CLIPModel  # the model class only when a CLIP is loaded

    path = Path(path) if path is not None else DEFAULT_CLIP_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"No small CLIP at {path}; train it with scripts/train_embedded.py.")
    clip = CLIPModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).to(device)
    tok = load_world_tokenizer(path)
    return WorldCLIP(clip, tok).to(device), _Preprocess(), _Tokenizer(tok)


@torch.no_grad()
def clip_score(images, prompts: Sequence[str], model=None, preprocess=None, tokenizer=None,
               batch_size: int = 256) -> torch.Tensor:
    """Per-image CLIP score ``100 * max(cos(image, text), 0)`` (the torchmetrics definition).

    ``images``: PIL list, uint8/float tensor (B, 3, H, W) or numpy (B, H, W, 3). With no model given, the
    world's small CLIP is loaded; an open_clip model + preprocess + tokenizer works the same way.
    """
    if model is None:
        model, preprocess, tokenizer = load_world_clip()
    dev = next(model.parameters()).device
    if isinstance(images, (list, tuple)) and hasattr(images[0], "convert"):
        x = torch.stack([preprocess(im) for im in images])
    else:
        x01 = images_to_tensor(images)
        x = torch.stack([preprocess(im) for im in x01])
    scores = []
    for i in range(0, len(x), batch_size):
        fi = model.encode_image(x[i:i + batch_size].to(dev))
        ft = model.encode_text(tokenizer(list(prompts[i:i + batch_size])).to(dev))
        cos = F.cosine_similarity(fi.float(), ft.float(), dim=-1)
        scores.append((100 * cos.clamp(min=0)).cpu())
    return torch.cat(scores)
