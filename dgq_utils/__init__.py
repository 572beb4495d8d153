"""dgq_utils — DGQ (distribution-aware group quantization) for diffusers text-to-image pipelines.

The public API, along the data flow (load → observe → quantize → generate → evaluate), with the verbs a
diffusers / torchao user expects (``load_pipeline`` like ``from_pretrained``, ``quantize_pipeline(pipe, recipe,
...)`` like torchao's ``quantize_(model, config)``, a frozen config object per concern)::

    import dgq_utils as dgq
    pipe = dgq.load_pipeline()                                     # the embedded model (or an SD folder / id)
    recipe = dgq.get_preset("dgq-w8a6")                             # a frozen QuantRecipe; recipe.replace(...)
    report = dgq.quantize_pipeline(pipe, recipe, calibration_prompts)
    image = pipe("a small red circle on the left", num_inference_steps=25).images[0]
    dgq.save_quant_state(pipe, "dgq-w8a6.safetensors")              # dgq.load_quant_state(fresh_pipe, ...)
    # W8A8 recipes only: weights stored in 8 bits, integer (or fp8) GEMMs on a GPU -- one way, FP weights freed
    # dgq.convert_to_8bit(pipe, backend="int8")
    result = dgq.generate_images(pipe, prompts, seeds, "cache", settings=dgq.SamplerSettings())

and, for a whole evaluation, ``dgq.run_comparison(model, recipes, dgq.EvaluationSet(prompts, calibration),
"out", sampler=..., metrics=dgq.MetricsConfig(...), bootstrap=dgq.BootstrapConfig(...))`` (the embedded world's
set-up in one call: ``dgq.run_embedded_comparison``; the paper's SD v1.4 protocol: ``dgq.run_paper_protocol``).
Where data and outputs live: :mod:`dgq_utils.paths` (``DGQ_DATA_DIR`` / ``DGQ_OUTPUT_DIR``).

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
    "AdaRoundConfig": "dgq_utils.config",
    "ActQuantConfig": "dgq_utils.config",
    "AttentionQuantConfig": "dgq_utils.config",
    "SamplerSettings": "dgq_utils.config",
    "PRESETS": "dgq_utils.config",
    "get_preset": "dgq_utils.config",
    "list_presets": "dgq_utils.config",
    "recipe_hash": "dgq_utils.config",
    # load
    "load_pipeline": "dgq_utils.model.loading",
    "model_family": "dgq_utils.model.loading",
    "model_identity": "dgq_utils.model.identity",
    # observe
    "collect_activation_stats": "dgq_utils.calibrate.observe",
    "ActivationStats": "dgq_utils.calibrate.observe",
    # quantize
    "quantize_pipeline": "dgq_utils.quantize.pipeline",
    "dequantize_pipeline": "dgq_utils.quantize.pipeline",
    "is_quantized": "dgq_utils.quantize.pipeline",
    "QuantizationReport": "dgq_utils.quantize.pipeline",
    "save_quant_state": "dgq_utils.quantize.state",
    "load_quant_state": "dgq_utils.quantize.state",
    "StateCache": "dgq_utils.quantize.cache",
    "CUDAGraphUNet": "dgq_utils.quantize.graphs",
    "convert_to_8bit": "dgq_utils.quantize.int8",
    "EightBitReport": "dgq_utils.quantize.int8",
    # generate
    "generate_images": "dgq_utils.generate.images",
    "GenerationResult": "dgq_utils.generate.images",
    "load_manifest": "dgq_utils.generate.images",
    # evaluate
    "run_comparison": "dgq_utils.evaluate.compare",
    "ComparisonResult": "dgq_utils.evaluate.compare",
    "DEFAULT_RECIPES": "dgq_utils.evaluate.compare",
    "EvaluationSet": "dgq_utils.evaluate.config",
    "MetricsConfig": "dgq_utils.evaluate.config",
    "BootstrapConfig": "dgq_utils.evaluate.config",
    "Workspace": "dgq_utils.evaluate.config",
    "Reference": "dgq_utils.evaluate.config",
    "ClipScorer": "dgq_utils.evaluate.metrics",
    "run_paper_protocol": "dgq_utils.evaluate.protocol",
    "ProtocolFiles": "dgq_utils.evaluate.protocol",
    "ProtocolConfig": "dgq_utils.evaluate.protocol",
    # the embedded world as an evaluation
    "run_embedded_comparison": "dgq_utils.world.comparison",
    "embedded_prompts": "dgq_utils.world.comparison",
    "embedded_calibration_prompts": "dgq_utils.world.comparison",
    "embedded_metrics": "dgq_utils.world.comparison",
    # report
    "run_chain": "dgq_utils.report.chain",
    # tests and demos
    "build_tiny_pipeline": "dgq_utils.testing.tiny",
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
