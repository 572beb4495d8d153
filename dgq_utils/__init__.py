"""dgq_utils — DGQ (distribution-aware group quantization) for diffusers text-to-image pipelines.

The public API, along the data flow (load → observe → quantize → generate → evaluate)::

    import dgq_utils as dgq
    pipe = dgq.load_pipeline()                                     # the embedded model (or an SD folder / id)
    report = dgq.quantize_pipeline(pipe, "dgq-w8a6", calibration_prompts)
    dgq.save_quant_state(pipe, "dgq-w8a6.safetensors")              # dgq.load_quant_state(fresh_pipe, ...)
    result = dgq.generate_images(pipe, prompts, seeds, cache_root="cache", settings=dgq.SamplerSettings())

Names are imported lazily (PEP 562), so ``import dgq_utils`` stays cheap -- worker processes that only need
:mod:`dgq_utils.core.kmeans` never import torch or diffusers. The stage subpackages: :mod:`.config`,
:mod:`.core`, :mod:`.kernels` (GPU kernels with plain-torch references), :mod:`.model`, :mod:`.calibrate`,
:mod:`.quantize`, :mod:`.generate`, :mod:`.evaluate`, :mod:`.report`, :mod:`.world` (the embedded model's synthetic world) and :mod:`.testing`.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> module that defines it
_API = {
    # what to quantize and how to sample
    "QuantRecipe": "dgq_utils.config",
    "WeightQuantConfig": "dgq_utils.config",
    "ActQuantConfig": "dgq_utils.config",
    "AttentionQuantConfig": "dgq_utils.config",
    "SamplerSettings": "dgq_utils.config",
    "get_preset": "dgq_utils.config",
    "list_presets": "dgq_utils.config",
    # load
    "load_pipeline": "dgq_utils.model.loading",
    # observe
    "collect_activation_stats": "dgq_utils.calibrate.observe",
    # quantize
    "quantize_pipeline": "dgq_utils.quantize.pipeline",
    "dequantize_pipeline": "dgq_utils.quantize.pipeline",
    "is_quantized": "dgq_utils.quantize.pipeline",
    "save_quant_state": "dgq_utils.quantize.state",
    "load_quant_state": "dgq_utils.quantize.state",
    # generate
    "generate_images": "dgq_utils.generate.images",
    # evaluate
    "run_comparison": "dgq_utils.evaluate.compare",
    "run_embedded_comparison": "dgq_utils.evaluate.compare",
    "run_paper_protocol": "dgq_utils.evaluate.protocol",
    # report
    "run_chain": "dgq_utils.report.chain",
    # errors and warnings a caller may want to catch or filter
    "InvalidArgumentError": "dgq_utils.config.validation",
    "QuantStateError": "dgq_utils.quantize.state",
    "UnknownWordsWarning": "dgq_utils.model.tokenizer",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'dgq_utils' has no attribute {name!r}; the public API is: {', '.join(__all__)}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
