"""Turn a calibrated W8A8 pipeline into one that really runs (part of) its UNet in 8 bits.

::

    quantize_pipeline(pipe, "dgq-w8a8", prompts, sampler)     # calibrate (fake quantization)
    report = convert_to_8bit(pipe, backend="int8")          # weights stored in int8, integer GEMMs
    print(report.summary()); images = pipe(prompts, ...).images

What converts: every quantized ``nn.Linear`` and 1x1 convolution (stride 1, no padding, groups 1) whose weight
and input activation are 8-bit, becomes an :class:`~dgq_utils.model.int8_layers.EightBitLinear`: the weight is
stored as int8 codes per output channel (``backend="int8"``, exact on the calibrated grid) or float8 e4m3
(``backend="fp8"``, an approximation of it), and the FP weight and its fake-quantized copy are **freed** (the
UNet's weight bytes really drop). Activations are quantized on the fly with the calibrated per-timestep group
parameters (pixel / token groups and per-tensor: one integer GEMM with per-row scales; channel groups: permuted,
padded, K-blocked accumulation).

What computes on the fake-quant path (reported in one log line and in the report):

* 3x3 (and other non-1x1) convolutions: there is no int8 implicit-GEMM conv kernel yet. With ``conv_weights=True``
  (default) their weights are still *stored* in 8 bits (:class:`~dgq_utils.model.int8_layers.EightBitConv2d`:
  dequantized per call, bit-identical to the fake-quant weight), so the UNet's weight bytes drop for them too;
  ``conv_weights=False`` leaves them as they are.
* layers that stay entirely as they were: the official ``unfold`` conv layout, layers whose weight or
  activation is not 8-bit, layers without an activation quantizer, disabled layers;
* the attention's Q/K/V / softmax quantization always stays simulated (the DGQ processors with the fused
  quantized-softmax kernel; ``Q K^T`` and ``P V`` run in fp16).

The conversion is one way: the FP weights are gone, so ``dequantize_pipeline`` raises (build or load the
pipeline again); ``set_quantization_enabled(pipe, False)`` is refused for converted layers likewise.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from dgq_utils.config.validation import check_choice
from dgq_utils.model.int8_layers import BACKENDS, EightBitConv2d, EightBitLinear
from dgq_utils.model.layers import QuantConv2d, QuantLinear
from dgq_utils.quantize.pipeline import require_state

__all__ = ["CONV_STORAGE_ONLY", "EightBitReport", "can_store_8bit", "convert_to_8bit", "fallback_reason",
           "unet_weight_bytes"]

logger = logging.getLogger(__name__)


@dataclass
class EightBitReport:
    """What :func:`convert_to_8bit` did: ``converted`` layer names (8-bit GEMMs), ``weights_only`` (8-bit weight
    storage, fake-quant compute), ``fallback`` reason -> layer names (every layer computing on the fake-quant path,
    the ``weights_only`` ones included), ``plans`` (how many timestep sets of the converted layers run the rows /
    blocked path, and the blocked path's K inflation), ``attention`` (processors left simulated), UNet weight
    bytes before / after, and the logged ``message``."""

    backend: str
    converted: list[str] = field(default_factory=list)
    weights_only: list[str] = field(default_factory=list)
    fallback: dict[str, list[str]] = field(default_factory=dict)
    plans: dict = field(default_factory=dict)
    attention: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    message: str = ""

    def summary(self) -> str:
        return self.message


def unet_weight_bytes(unet: nn.Module) -> int:
    """Bytes of every parameter and buffer the UNet holds (each storage once; fake-quant caches included)."""
    seen, total = set(), 0
    for t in list(unet.parameters()) + list(unet.buffers()):
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    for m in unet.modules():  # the wrapped originals of QuantLinear / QuantConv2d share their Parameters
        if isinstance(m, (QuantLinear, QuantConv2d)):
            fq = m.weight_fq
            if fq is not None and (fq.untyped_storage().data_ptr(), fq.device) not in seen:
                seen.add((fq.untyped_storage().data_ptr(), fq.device))
                total += fq.untyped_storage().nbytes()
    return total


#: the fallback reason of convolutions that keep the fake-quant compute but store their weights in 8 bits
CONV_STORAGE_ONLY = "{k} conv (8-bit weight storage, fake-quant compute: no int8 conv kernel yet)"


def fallback_reason(layer, recipe) -> str | None:
    """Why ``layer`` cannot run its GEMM in 8 bits (``None``: it can). A reason built from
    :data:`CONV_STORAGE_ONLY` means: its weight can still be stored in 8 bits (:func:`can_store_8bit`)."""
    if recipe.weights is None or recipe.weights.bits != 8 or recipe.activations is None or \
            recipe.activations.bits != 8:
        w = recipe.weights.bits if recipe.weights is not None else 32
        a = recipe.activations.bits if recipe.activations is not None else 32
        return f"W{w}A{a} (only W8A8 runs in 8 bits)"
    if layer.act is None or not layer.act.params:
        return "no calibrated activation quantizer"
    if not layer.weight_quantized or layer.weight_bits != 8:
        return "weight not 8-bit"
    if getattr(layer, "weight_round_up", None) is not None:
        return "learned (AdaRound) weight rounding (the 8-bit codes round to nearest)"
    if isinstance(layer, QuantConv2d):
        if layer.layout != "tensor":
            return "conv layout 'unfold'"
        one = (tuple(layer.kernel_size) == (1, 1) and tuple(layer.stride) == (1, 1) and layer.groups == 1
               and not isinstance(layer.padding, str) and tuple(layer.padding) == (0, 0))
        if not one:
            return CONV_STORAGE_ONLY.format(k="x".join(str(v) for v in layer.kernel_size))
    for i, info in layer.act.info.items():
        if info.get("axis") == "channel" and info.get("ids") is None:
            return "channel-wise set without group ids"
    return None


def can_store_8bit(layer, reason: str | None) -> bool:
    """Whether a layer that falls back for ``reason`` can still keep its weight in 8 bits only."""
    return (reason is not None and reason.endswith(CONV_STORAGE_ONLY.split("}", 1)[1])
            and isinstance(layer, QuantConv2d) and layer.original.padding_mode == "zeros")


def convert_to_8bit(pipe, backend: str = "int8", *, block: int = 32, conv_weights: bool = True) -> EightBitReport:
    """Convert the calibrated quantized UNet of ``pipe`` in place (module docstring). ``backend``: ``"int8"``
    (exact integer arithmetic) or ``"fp8"`` (e4m3, Hopper). ``block``: the K-block channel groups are padded to
    (a multiple of 16, >= 32, for the int8 tensor cores). ``conv_weights``: store the weights of the convolutions
    that keep the fake-quant compute (3x3) in 8 bits too. Returns an :class:`EightBitReport`; logs one line
    naming what computes on the fake-quant path."""
    check_choice(backend, "backend", BACKENDS)
    if isinstance(block, bool) or not isinstance(block, int) or block < 32 or block % 16:
        raise ValueError(f"block must be an integer >= 32 and a multiple of 16 (the int8 MMA's K); got {block!r}.")
    if not isinstance(conv_weights, bool):
        raise ValueError(f"conv_weights must be True or False; got {conv_weights!r}.")
    qs = require_state(pipe)
    if qs.controller.mode != "infer":
        raise RuntimeError("convert_to_8bit needs a calibrated pipeline (quantize_pipeline or load_quant_state "
                           "first); this one is still calibrating.")
    unet = pipe.unet
    device = next(unet.parameters()).device
    rep = EightBitReport(backend=backend, weight_bytes_before=unet_weight_bytes(unet))
    plans = {"rows": 0, "blocked": 0, "k": 0, "padded_k": 0}
    for name, layer in list(qs.layers.items()):
        if isinstance(layer, (EightBitLinear, EightBitConv2d)):
            rep.fallback.setdefault("already converted", []).append(name)
            continue
        reason = fallback_reason(layer, qs.recipe) if layer.enabled else "disabled (exact FP)"
        if reason is not None:
            rep.fallback.setdefault(reason, []).append(name)
            if not (conv_weights and can_store_8bit(layer, reason)):
                continue
            with torch.no_grad():
                new = EightBitConv2d(layer)
            rep.weights_only.append(name)
        else:
            with torch.no_grad():
                new = EightBitLinear(layer, backend=backend, block=block)
            rep.converted.append(name)
            for plan in new.plans.values():
                plans[plan["kind"]] += 1
                if plan["kind"] == "blocked":
                    plans["k"] += new.in_features
                    plans["padded_k"] += plan["layout"].padded_k
            new.prepare(device)
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, new.to(device))
        qs.layers[name] = new
        del layer, new
    plans["k_inflation"] = round(plans["padded_k"] / plans["k"], 3) if plans["k"] else None
    rep.plans = plans
    rep.attention = len(qs.processors)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rep.weight_bytes_after = unet_weight_bytes(unet)
    n_total = len(qs.layers)
    parts = [f"{reason}: {len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
             for reason, names in rep.fallback.items()]
    infl = f", K padded x{plans['k_inflation']}" if plans["k_inflation"] else ""
    rep.message = (f"convert_to_8bit({backend}): {len(rep.converted)} of {n_total} quantized layers run 8-bit GEMMs "
                   f"(timestep sets: {plans['rows']} rows, {plans['blocked']} channel-blocked{infl}); "
                   f"fake-quant compute for {n_total - len(rep.converted)}"
                   + (" -- " + "; ".join(parts) if parts else "")
                   + f"; attention Q/K/V/softmax quantization stays simulated in {rep.attention} processors; "
                   f"UNet weight bytes {rep.weight_bytes_before / 2**20:.1f} -> {rep.weight_bytes_after / 2**20:.1f} MiB")
    logger.warning(rep.message)
    return rep
