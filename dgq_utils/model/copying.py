"""A second pipeline object around another UNet, sharing everything else with the first.

``diffusers``' own ``DiffusionPipeline.from_pipe`` does this too. But it finishes with ``.to(dtype=...)`` (float32
unless told otherwise) on the new pipeline, and that also casts the text encoders and the VAE it shares with the
original. An fp16 pipeline would come back half float32. :func:`pipeline_with_unet` builds the same object without
the cast.
"""
from __future__ import annotations

import copy
import inspect

__all__ = ["pipeline_with_unet"]


def pipeline_with_unet(pipe, unet):
    """A pipeline of ``pipe``'s class around ``unet``. The text encoders, tokenizers and VAE are the same objects as
    ``pipe``'s, and nothing is cast or moved. The scheduler is a copy, because a pipeline call changes its scheduler's
    state. The constructor flags come from ``pipe``'s config (e.g. ``requires_safety_checker``,
    ``force_zeros_for_empty_prompt``)."""
    params = inspect.signature(type(pipe).__init__).parameters
    kwargs = {name: comp for name, comp in pipe.components.items() if name in params}
    kwargs["unet"] = unet
    if "scheduler" in kwargs:
        kwargs["scheduler"] = copy.deepcopy(pipe.scheduler)
    for key, value in pipe.config.items():
        if key in params and key not in kwargs and not key.startswith("_"):
            kwargs[key] = value
    return type(pipe)(**kwargs)
