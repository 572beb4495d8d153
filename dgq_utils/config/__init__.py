"""What to quantize and how to sample: the recipe dataclasses (:mod:`.recipe`), the named presets
(:mod:`.presets`) and :class:`SamplerSettings` (:mod:`.sampler`). Every ablation is ``recipe.replace(...)``."""
from dgq_utils.config.presets import PRESETS, get_preset, list_presets
from dgq_utils.config.recipe import *  # noqa: F401,F403  (the recipe dataclasses, validated on construction)
from dgq_utils.config.recipe import __all__ as _recipe_all
from dgq_utils.config.sampler import IMAGE_FORMATS, SamplerSettings

__all__ = [*_recipe_all, "PRESETS", "get_preset", "list_presets", "SamplerSettings", "IMAGE_FORMATS"]
