"""Image grids with captions (PIL only) for the model card and the training logs."""
from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


def save_grid(images: torch.Tensor, captions: list[str] | None, path: str | Path, ncol: int = 8, scale: int = 3,
              wrap: int = 30) -> Path:
    """uint8 (N, 3, H, W) or float [0, 1] images -> one PNG, each tile captioned below (optional)."""
    if images.dtype != torch.uint8:
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    n, _, h, w = images.shape
    font = ImageFont.load_default()
    lines = [textwrap.wrap(c, wrap) for c in captions] if captions else [[] for _ in range(n)]
    text_h = 11 * max((len(l) for l in lines), default=0) + (4 if captions else 0)
    tile_w, tile_h = max(w * scale, 6 * wrap + 4), h * scale + text_h
    nrow = (n + ncol - 1) // ncol
    canvas = Image.new("RGB", (ncol * tile_w, nrow * tile_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, ncol)
        im = Image.fromarray(images[i].permute(1, 2, 0).cpu().numpy()).resize((w * scale, h * scale), Image.NEAREST)
        x0, y0 = c * tile_w + (tile_w - w * scale) // 2, r * tile_h
        canvas.paste(im, (x0, y0))
        for j, line in enumerate(lines[i]):
            draw.text((c * tile_w + 2, y0 + h * scale + 2 + 11 * j), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
