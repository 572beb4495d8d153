"""Images as ``uint8`` tensors ``(N, 3, H, W)``: read from paths / PIL / arrays / a generation manifest, resize
(PIL bicubic, the filter the paper's 512 -> 256 resize used), and a lazy dataset for torch-fidelity."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def to_pil(img):
    from PIL import Image

    if isinstance(img, Image.Image):
        return img.convert("RGB")
    if isinstance(img, (str, os.PathLike)):
        if not Path(img).is_file():
            raise FileNotFoundError(f"image file not found: {img}")
        with Image.open(img) as im:
            return im.convert("RGB")
    if torch.is_tensor(img):
        arr = img.detach().cpu()
        if arr.dtype != torch.uint8:
            raise TypeError("image tensors must be uint8 (3, H, W)")
        return Image.fromarray(arr.permute(1, 2, 0).numpy())
    if isinstance(img, np.ndarray):
        return Image.fromarray(img.astype(np.uint8))
    raise TypeError(f"cannot read an image from {type(img).__name__}")


def image_to_tensor(img, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """One image (path, PIL, uint8 array/tensor) → ``uint8`` tensor ``(3, H, W)``, optionally resized."""
    from PIL import Image

    pil = to_pil(img)
    if size is not None:
        wh = (size, size) if isinstance(size, int) else (int(size[1]), int(size[0]))
        if pil.size != wh:
            pil = pil.resize(wh, Image.BICUBIC)
    return torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def paths_from(images) -> list:
    """Accept a manifest DataFrame (``file`` column, plus ``folder`` attribute or absolute files), a
    ``GenerationResult``, or a list of paths/images."""
    if hasattr(images, "paths") and hasattr(images, "manifest"):
        return list(images.paths)
    if isinstance(images, pd.DataFrame):
        if "path" in images.columns:
            return list(images["path"])
        raise ValueError("a manifest DataFrame needs a 'path' column (use GenerationResult.paths)")
    return list(images)


def load_images(images, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Images → one ``uint8`` tensor ``(N, 3, H, W)``. Without ``size`` all images must have the same size."""
    items = paths_from(images) if not torch.is_tensor(images) else images
    if torch.is_tensor(items):
        if items.dtype != torch.uint8 or items.dim() != 4 or items.shape[1] != 3:
            raise TypeError(f"expected a uint8 (N, 3, H, W) tensor, got {items.dtype} {tuple(items.shape)}")
        return items
    if len(items) == 0:
        raise ValueError("no images given")
    tensors = [image_to_tensor(x, size) for x in items]
    shapes = sorted({tuple(t.shape) for t in tensors})
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {shapes[:4]}; pass size=... to resize them to one size")
    return torch.stack(tensors)


def check_same_size(a: torch.Tensor, b: torch.Tensor, what: str = "images") -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ {tuple(a.shape)} vs {tuple(b.shape)} — compare images of the same "
                         "prompts/seeds at the same resolution (resize both with size=...)")


class ImageDataset(torch.utils.data.Dataset):
    """Lazily loaded uint8 images for torch-fidelity's dataset path (30k images do not fit in RAM at once)."""

    def __init__(self, items, size=None):
        self.items, self.size = list(items), size
        self._shape = None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        t = self.items[i] if torch.is_tensor(self.items[i]) else image_to_tensor(self.items[i], self.size)
        if self._shape is None:
            self._shape = t.shape
        elif t.shape != self._shape:
            raise ValueError(f"image {i} has shape {tuple(t.shape)}, earlier ones {tuple(self._shape)}; "
                             "pass size=... to resize")
        return t
