"""How to sample: :class:`SamplerSettings`, everything besides prompt, seed and recipe that decides an image.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, replace

from dgq_utils.config import validation as V

IMAGE_FORMATS = ("png", "jpg")

#: the keywords that a :class:`SamplerSettings` replaces in the functions that take ``sampler=``
SAMPLER_KEYWORDS = ("num_inference_steps", "guidance_scale", "height", "width", "batch_size")


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

    def replace(self, **changes) -> "SamplerSettings":
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)

    def resolved(self, pipe) -> "SamplerSettings":
        default = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        return SamplerSettings(**{**asdict(self), "height": int(self.height or default),
                                  "width": int(self.width or default)})


def check_sampler(sampler, default: SamplerSettings, caller: str) -> SamplerSettings:
    """``sampler`` if it is a :class:`SamplerSettings`, ``default`` if it is ``None``; else a ``TypeError``."""
    if sampler is None:
        return default
    if not isinstance(sampler, SamplerSettings):
        raise TypeError(f"{caller}: sampler must be a SamplerSettings (or None for {default}); got "
                        f"{type(sampler).__name__} {sampler!r}. Pass sampler=SamplerSettings(num_inference_steps=..., "
                        "guidance_scale=..., height=..., width=..., batch_size=...).")
    return sampler


def takes_sampler(func):
    """Decorator for functions with a ``sampler=`` argument: the loose keywords it replaced
    (:data:`SAMPLER_KEYWORDS`) raise a ``TypeError`` that names the new argument instead of Python's generic one."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        old = [k for k in SAMPLER_KEYWORDS if k in kwargs]
        if old:
            given = ", ".join(f"{k}={kwargs[k]!r}" for k in old)
            raise TypeError(f"{func.__qualname__}() takes the sampler as one argument now: pass "
                            f"sampler=SamplerSettings({given}) instead of {', '.join(old)}=.")
        return func(*args, **kwargs)

    return wrapper
