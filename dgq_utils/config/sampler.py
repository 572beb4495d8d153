"""How to sample: :class:`SamplerSettings`, everything besides prompt, seed and recipe that decides an image.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

IMAGE_FORMATS = ("png", "jpg")


@dataclass(frozen=True)
class SamplerSettings:
    """Everything besides prompt, seed and recipe that decides an image. Part of the cache key.

    ``height``/``width`` ``None`` means the pipeline's default (``unet.sample_size × vae_scale_factor``); it is
    resolved to numbers before it enters the key. ``image_format`` ``"png"`` (lossless, default) or ``"jpg"``
    (what the official evaluation wrote, PIL's default quality 75 — offered only to reproduce that quirk).
    """

    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    eta: float = 0.0
    batch_size: int = 4
    image_format: str = "png"

    def __post_init__(self):
        if int(self.num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"unknown image_format {self.image_format!r}; valid: {', '.join(IMAGE_FORMATS)}")
        for side in ("height", "width"):
            v = getattr(self, side)
            if v is not None and (int(v) <= 0 or int(v) % 8):
                raise ValueError(f"{side} must be a positive multiple of 8, got {v}")

    def resolved(self, pipe) -> "SamplerSettings":
        default = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        return SamplerSettings(**{**asdict(self), "height": int(self.height or default),
                                  "width": int(self.width or default)})
