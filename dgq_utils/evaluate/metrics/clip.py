"""CLIP score: cosine of normalised CLIP image and text embeddings (open_clip, a transformers CLIPModel, or any
model with open_clip's interface), per image, with a bootstrap CI."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from dgq_utils.evaluate.confidence import CI, bootstrap_mean
from dgq_utils.evaluate.metrics.images import load_images, to_pil

CLIP_CONVENTIONS = ("cosine", "torchmetrics")


class ClipScorer:
    """Image–text cosine similarity with one interface for open_clip models and transformers ``CLIPModel``s.

    ``encode_images(uint8 (N,3,H,W)) -> (N, D)`` and ``encode_texts(list[str]) -> (N, D)`` return L2-normalised
    embeddings; :meth:`scores` gives the per-image cosine of image *i* with text *i*.

    Conventions: ``"cosine"`` (default; the official DGQ/BK-SDM evaluation: plain cosine, not ×100, not clipped,
    so a score can be negative) or ``"torchmetrics"`` (``100 * max(cosine, 0)``, torchmetrics' ``CLIPScore``).
    """

    def __init__(self, encode_images: Callable, encode_texts: Callable, name: str, batch_size: int = 32):
        self._enc_img, self._enc_txt = encode_images, encode_texts
        self.name, self.batch_size = name, batch_size

    # constructors --------------------------------------------------------------------------------------------
    @classmethod
    def from_open_clip(cls, model_name: str, weights_path: str | os.PathLike, *, device: str = "cpu",
                       batch_size: int = 32) -> "ClipScorer":
        """An open_clip model (e.g. ``"ViT-g-14"``, the paper's, with the ``laion2b_s34b_b88k`` weights file)
        from a *local* weights file. Nothing is downloaded: a missing file raises, naming it."""
        import open_clip

        if model_name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models() "
                             "(the paper uses 'ViT-g-14')")
        p = Path(weights_path).expanduser() if weights_path else None
        if p is None or not p.is_file():
            raise FileNotFoundError(
                f"open_clip weights file not found: {weights_path}. For the paper's CLIP score this is "
                "ViT-g-14 'laion2b_s34b_b88k' (open_clip_pytorch_model.bin, ~5.5 GB, from the Hugging Face repo "
                "laion/CLIP-ViT-g-14-laion2B-s34B-b88K); download it on a connected machine and pass its path.")
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(p), device=device)
        return cls.from_open_clip_like(model.eval(), preprocess, open_clip.get_tokenizer(model_name),
                                       name=f"open_clip:{model_name}", device=device, batch_size=batch_size)

    @classmethod
    def from_open_clip_like(cls, model, preprocess, tokenizer, *, name: str, device: str = "cpu",
                            batch_size: int = 32, pil_input: bool = True) -> "ClipScorer":
        """Any model with open_clip's interface: ``model.encode_image(preprocessed batch)``,
        ``model.encode_text(tokenizer(list_of_str))``; ``preprocess`` maps one image (PIL if ``pil_input``, else a
        uint8 (3, H, W) tensor) to a tensor."""

        @torch.no_grad()
        def enc_img(x):
            batch = torch.stack([preprocess(to_pil(im) if pil_input else im) for im in x]).to(device)
            return model.encode_image(batch).float()

        @torch.no_grad()
        def enc_txt(texts):
            return model.encode_text(tokenizer(list(texts)).to(device)).float()

        return cls(enc_img, enc_txt, name, batch_size)

    @classmethod
    def from_transformers(cls, model, tokenizer, *, image_size: int | None = None, mean=None, std=None,
                          device: str = "cpu", batch_size: int = 32, name: str = "transformers-clip") -> "ClipScorer":
        """A transformers ``CLIPModel`` + tokenizer. Images are resized (bicubic) and centre-cropped to the vision
        tower's ``image_size`` and normalised with CLIP's mean/std (or those given)."""
        import torch.nn.functional as F

        vcfg = model.config.vision_config
        size = int(image_size or vcfg.image_size)
        mean = torch.tensor(mean or (0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
        std = torch.tensor(std or (0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
        model = model.to(device).eval()
        max_len = int(getattr(model.config.text_config, "max_position_embeddings", 77))

        def _pooled(out):
            return out if torch.is_tensor(out) else out.pooler_output

        @torch.no_grad()
        def enc_img(x):
            x = x.float() / 255.0
            h, w = x.shape[-2:]
            s = size / min(h, w)
            if (h, w) != (size, size):
                x = F.interpolate(x, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                                  align_corners=False, antialias=True).clamp(0, 1)
                top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
                x = x[..., top:top + size, left:left + size]
            x = ((x - mean) / std).to(device)
            return _pooled(model.get_image_features(pixel_values=x)).float()

        @torch.no_grad()
        def enc_txt(texts):
            tok = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len,
                            return_tensors="pt")
            kw = {"input_ids": tok["input_ids"].to(device)}
            if "attention_mask" in tok:
                kw["attention_mask"] = tok["attention_mask"].to(device)
            return _pooled(model.get_text_features(**kw)).float()

        return cls(enc_img, enc_txt, name, batch_size)

    # use -----------------------------------------------------------------------------------------------------
    def encode_images(self, images) -> torch.Tensor:
        x = load_images(images) if not torch.is_tensor(images) else images
        out = [self._enc_img(x[i:i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        out = [self._enc_txt(texts[i:i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def scores(self, images, texts: Sequence[str], convention: str = "cosine") -> np.ndarray:
        """Per-image score of image *i* with text *i*."""
        if convention not in CLIP_CONVENTIONS:
            raise ValueError(f"unknown CLIP-score convention {convention!r}; valid: {', '.join(CLIP_CONVENTIONS)}")
        texts = list(texts)
        x = load_images(images) if not torch.is_tensor(images) else images
        if len(texts) != len(x):
            raise ValueError(f"{len(x)} images but {len(texts)} texts; CLIP score pairs image i with text i")
        if len(texts) == 0:
            raise ValueError("no images/texts to score")
        cos = (self.encode_images(x) * self.encode_texts(texts)).sum(-1).double().cpu().numpy()
        return 100.0 * np.clip(cos, 0, None) if convention == "torchmetrics" else cos


def clip_score(scorer: ClipScorer, images, texts, *, convention: str = "cosine", n_boot: int = 2000,
               seed: int = 0) -> tuple[CI, np.ndarray]:
    """Mean CLIP score with a bootstrap CI, and the per-image scores."""
    s = scorer.scores(images, texts, convention)
    return bootstrap_mean(s, n_boot=n_boot, seed=seed), s
