"""How to sample: :class:`SamplerSettings`, everything besides prompt, seed and recipe that decides an image.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from dgq_utils.config import validation as V

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
        V.check_sampling(num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                         batch_size=self.batch_size, height=self.height, width=self.width)
        V.check_number(self.eta, "eta", minimum=0.0, maximum=1.0, fix="0 = deterministic DDIM (default).")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise V.fail("negative_prompt", self.negative_prompt, "a string or None")
        V.check_choice(self.image_format, "image_format", IMAGE_FORMATS)

    def resolved(self, pipe) -> "SamplerSettings":
        default = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        return SamplerSettings(**{**asdict(self), "height": int(self.height or default),
                                  "width": int(self.width or default)})
