"""Save and load a calibrated quantization state: one safetensors file with the recipe JSON and
calibration metadata; loading onto a fresh pipeline reproduces images without calibration.
"""
from __future__ import annotations

import json
import os
import time
from itertools import zip_longest
from pathlib import Path

import torch

from dgq_utils.atomic import atomic_write_bytes
from dgq_utils.config import QuantRecipe
from dgq_utils.model.layers import ActQuantizer
from dgq_utils.quantize.pipeline import (
    QuantizationReport,
    QuantState,
    architecture,
    build_report,
    dequantize_pipeline,
    install,
    is_quantized,
    require_state,
)

__all__ = [
    "save_quant_state",
    "load_quant_state",
]

FORMAT = "dgq-quant-state/1"


# ----------------------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------------------
def _act_quantizers(qs: QuantState) -> list[ActQuantizer]:
    out = [layer.act for layer in qs.layers.values() if layer.act is not None]
    for proc in qs.processors.values():
        out += [q for role, q in proc.quantizers().items() if role != "prob"]
    return out


def save_quant_state(pipe, path: str | os.PathLike) -> Path:
    """Write the calibrated quantization state of ``pipe`` to ONE ``.safetensors`` file (atomically).

    Tensors: per quantized layer its weight scale / zero point (``{layer}.weight.scale|zero_point``); per
    activation quantizer and timestep set its scale / zero point (broadcast-shaped) and group ids
    (``{quantizer}.set{i}.scale|zero_point|ids``); static softmax maxima (``{attention}.prob.set{i}.max``).
    Metadata (strings): ``format``, ``recipe`` (JSON), ``architecture`` (the UNet's layer list with weight shapes),
    ``quantizers`` (per set: axis, K, n, source), ``calibration`` (steps, sampler and its config, timesteps, seed,
    prompts count, guidance, resolution), ``skipped``. The FP weights are *not* stored: load onto the same model.
    """
    from safetensors.torch import save

    qs = require_state(pipe)
    tensors: dict[str, torch.Tensor] = {}

    def put(key, t):
        tensors[key] = t.detach().to("cpu").contiguous().clone()

    for name, layer in qs.layers.items():
        if layer.weight_quantized:
            put(f"{name}.weight.scale", layer.weight_scale)
            put(f"{name}.weight.zero_point", layer.weight_zp)
    quant_meta = {}
    for q in _act_quantizers(qs):
        sets = {}
        for i, (scale, zp) in sorted(q.params.items()):
            put(f"{q.name}.set{i}.scale", scale)
            put(f"{q.name}.set{i}.zero_point", zp)
            info = dict(q.info.get(i, {}))
            ids = info.pop("ids", None)
            if ids is not None:
                put(f"{q.name}.set{i}.ids", ids.to(torch.int64))
            sets[str(i)] = info
        quant_meta[q.name] = sets
    for proc in qs.processors.values():
        pq = proc.prob_quant
        if pq is not None and pq.scale_mode == "static":
            for i, m in sorted(pq.static.items()):
                put(f"{pq.name}.set{i}.max", m.reshape(()))
    metadata = {
        "format": FORMAT,
        "recipe": qs.recipe.to_json(),
        "architecture": json.dumps(qs.architecture),
        "quantizers": json.dumps(quant_meta),
        "calibration": json.dumps(qs.calibration),
        "controller": json.dumps(qs.controller.to_dict()),
        "skipped": json.dumps(qs.skipped),
    }
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def _check_architecture(saved: list[dict], current: list[dict], path) -> None:
    for i, (s, c) in enumerate(zip_longest(saved, current)):
        if s == c:
            continue
        def fmt(d):
            return "nothing" if d is None else f"{d['name']!r} ({d['type']}, weight {tuple(d['weight_shape'])})"
        raise ValueError(
            f"Quantization state {str(path)!r} was calibrated for a different UNet architecture: first mismatch at "
            f"layer #{i}: the file has {fmt(s)}, this pipeline has {fmt(c)}."
        )


def load_quant_state(pipe, path: str | os.PathLike, *, on_timestep_mismatch: str = "error") -> QuantizationReport:
    """Quantize ``pipe`` from a file written by :func:`save_quant_state` -- no calibration.

    ``pipe`` must be unquantized and have the same UNet architecture (checked layer by layer; the first mismatch
    is named in the ``ValueError``) and the same weights as the calibrated one (weights are re-quantized from the
    stored scales / zero points, so identical FP weights give identical images).
    """
    from safetensors import safe_open

    if is_quantized(pipe):
        raise RuntimeError("This pipeline is already quantized; call dequantize_pipeline(pipe) first.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No quantization state at {str(path)!r}.")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not a DGQ quantization state (format {meta.get('format')!r}, "
                             f"expected {FORMAT!r}).")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    recipe = QuantRecipe.from_json(meta["recipe"])
    _check_architecture(json.loads(meta["architecture"]), architecture(pipe.unet), path)
    quant_meta = json.loads(meta["quantizers"])
    controller_meta = json.loads(meta["controller"])
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            qs = install(pipe, recipe, quantize_weights=False, on_timestep_mismatch=on_timestep_mismatch)
            qs.calibration = json.loads(meta["calibration"])
            if recipe.weights is not None:
                for name, layer in qs.layers.items():
                    layer.quantize_weight(scale=tensors[f"{name}.weight.scale"],
                                          zero_point=tensors[f"{name}.weight.zero_point"],
                                          bits=recipe.weights.bits, symmetric=recipe.weights.symmetric)
            for q in _act_quantizers(qs):
                sets = quant_meta.get(q.name)
                if sets is None:
                    raise ValueError(f"{str(path)!r} has no parameters for quantizer {q.name!r}.")
                device = next(pipe.unet.parameters()).device
                for i_str, info in sets.items():
                    i = int(i_str)
                    info = dict(info)
                    info["ids"] = tensors.get(f"{q.name}.set{i}.ids")
                    q.set_params(i, tensors[f"{q.name}.set{i}.scale"].to(device),
                                 tensors[f"{q.name}.set{i}.zero_point"].to(device), info)
            for proc in qs.processors.values():
                pq = proc.prob_quant
                if pq is not None and pq.scale_mode == "static":
                    prefix = f"{pq.name}.set"
                    pq.static = {int(k[len(prefix):-len(".max")]): v for k, v in tensors.items()
                                 if k.startswith(prefix) and k.endswith(".max")}
            c = qs.controller
            c.schedule = [float(t) for t in controller_meta.get("schedule", [])]
            c.num_inference_steps = controller_meta.get("num_inference_steps")
            c.num_train_timesteps = controller_meta.get("num_train_timesteps", 1000)
            c.mapping = controller_meta.get("mapping", c.mapping)
            c.mode = "infer"
            c.reset()
            for layer in qs.layers.values():
                layer.set_mode("quant")
            for proc in qs.processors.values():
                proc.set_mode("quant")
    except BaseException:
        dequantize_pipeline(pipe)
        raise
    return build_report(qs, time.perf_counter() - t0)
