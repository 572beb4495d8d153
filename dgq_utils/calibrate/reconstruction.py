"""Weight reconstruction during calibration: layer-wise AdaRound (``WeightQuantConfig.rounding="adaround"``).

Where the inputs come from: the calibration passes already run every quantized layer on the calibration
prompts. When the recipe asks for AdaRound, :func:`attach` gives every quantized layer an
:class:`~dgq_utils.core.input_sample.InputSample` (at most ``adaround.samples`` rows, seeded with
``adaround.seed`` plus the layer's position) which the layer feeds with its raw input on every forward of those
passes -- so with the default ``calibration_upstream="fp"`` the inputs are those of the FP model (every quantizer
off, FP weights), over all timesteps, both CFG halves and every calibration prompt. (With the official
``"per_tensor_quantized"`` upstream only the ``"observe_quant"`` forward of each call is sampled: the inputs of
the per-tensor-quantized model, as in the official reconstruction, which also feeds quantized-model inputs.) No extra sampling pass is run; the observation memo
keeps the samples with the statistics.

What is optimised: :func:`reconstruct` runs :func:`~dgq_utils.core.adaround.adaround` per layer, independently
(layer-wise; the layers' inputs do not change while their neighbours are rounded), starting from the grid of the
range search (``range_method``, MSE by default) that ``quantize_weight`` already set, and installs the learned
rounding mask. Activations are not quantized during the optimisation (official). Layers it cannot handle (a
grouped convolution, or a non-zero padding mode) keep round-to-nearest, recorded as a mask equal to nearest and a
note. The official code reconstructs ResnetBlock2D / BasicTransformerBlock outputs jointly (BRECQ block-wise);
that is not implemented here.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict

from torch import nn

from dgq_utils.core.adaround import nearest_round_up
from dgq_utils.core.input_sample import InputSample
from dgq_utils.core.weight_memo import memo_adaround
from dgq_utils.timing import stage

logger = logging.getLogger(__name__)

__all__ = ["attach", "capture_key", "detach", "reconstruct", "wants_reconstruction"]


def wants_reconstruction(recipe) -> bool:
    """Whether ``recipe`` learns its weight rounding (and so needs calibration inputs)."""
    return recipe.weights is not None and recipe.weights.rounding == "adaround"


def capture_key(recipe) -> dict | None:
    """What the input capture depends on (for the observation memo's key), ``None`` when nothing is captured."""
    if not wants_reconstruction(recipe):
        return None
    ada = recipe.weights.adaround
    return {"samples": int(ada.samples), "seed": int(ada.seed)}


def _conv_geometry(layer) -> dict | None:
    conv = layer.original
    if not isinstance(conv, nn.Conv2d):
        return None
    return {"kernel_size": tuple(conv.kernel_size), "stride": tuple(conv.stride),
            "padding": tuple(conv.padding), "dilation": tuple(conv.dilation)}


def _supported(layer) -> bool:
    conv = layer.original
    if not isinstance(conv, nn.Conv2d):
        return True
    return conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def attach(qstate) -> None:
    """Give every quantized layer of ``qstate`` an input sample (see the module docstring)."""
    ada = qstate.recipe.weights.adaround
    for i, (name, layer) in enumerate(qstate.layers.items()):
        layer.capture = InputSample(ada.samples, seed=ada.seed * 1_000_003 + i,
                                    conv=_conv_geometry(layer)) if _supported(layer) else None


def detach(qstate) -> dict:
    """Stop capturing; returns the samples (layer name -> InputSample or None) and leaves them on the layers'
    ``capture`` attribute cleared."""
    out = {}
    for name, layer in qstate.layers.items():
        if layer.capture is not None:
            layer.capture.close()
        out[name] = layer.capture
        layer.capture = None
    return out


def reconstruct(qstate, samples: dict, *, notes: list | None = None) -> dict:
    """Learn every quantized layer's weight rounding from ``samples`` (as returned by :func:`detach`) and install
    it; returns a summary for the calibration metadata (per-layer losses, totals, seconds)."""
    w_cfg = qstate.recipe.weights
    ada = w_cfg.adaround
    settings = {k: v for k, v in asdict(ada).items() if k != "samples"}
    t0 = time.perf_counter()
    per_layer = {}
    skipped = []
    with stage("adaround", n=len(qstate.layers)):
        for name, layer in qstate.layers.items():
            if not layer.weight_quantized:
                continue
            w = layer.weight.detach()
            sample = samples.get(name)
            if sample is None or len(sample) == 0:
                skipped.append(name)
                layer.quantize_weight(scale=layer.weight_scale, zero_point=layer.weight_zp, bits=layer.weight_bits,
                                      symmetric=layer.weight_symmetric,
                                      round_up=nearest_round_up(w, layer.weight_scale.expand(w.shape)))
                continue
            res = memo_adaround(w, layer.weight_scale, layer.weight_zp, layer.weight_bits,
                                sample.rows.to(w.device), symmetric=layer.weight_symmetric, **settings)
            layer.quantize_weight(scale=layer.weight_scale, zero_point=layer.weight_zp, bits=layer.weight_bits,
                                  symmetric=layer.weight_symmetric, round_up=res.round_up)
            per_layer[name] = {"rows": len(sample), "seen": int(sample.seen), "loss_nearest": res.loss_nearest,
                               "loss_adaround": res.loss_adaround, "kept_nearest": res.kept_nearest,
                               "flipped": round(res.flipped, 6)}
    if skipped and notes is not None:
        msg = (f"AdaRound: {len(skipped)} layer(s) without captured inputs (grouped / non-zero-padded convs, or "
               f"never called) keep round-to-nearest: {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
        notes.append(msg)
        logger.info(msg)
    near = sum(d["loss_nearest"] for d in per_layer.values())
    learned = sum(d["loss_adaround"] for d in per_layer.values())
    return {
        "rounding": "adaround",
        "layers": len(per_layer),
        "kept_nearest": sum(d["kept_nearest"] for d in per_layer.values()),
        "loss_nearest": near,
        "loss_adaround": learned,
        "seconds": round(time.perf_counter() - t0, 3),
        "per_layer": per_layer,
    }
