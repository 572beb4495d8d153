"""dgq_utils — DGQ (distribution-aware group quantization) for diffusers text-to-image pipelines."""

__version__ = "0.1.0"
