"""Plain-torch reference of the fused quantized attention's math (materialises the probabilities).

The oracle of :mod:`dgq_utils.kernels.quant_attention` on the CPU and under Triton's interpreter: the same
function, computed the way :class:`dgq_utils.model.attention.DGQAttnProcessor`'s reference path computes it (float32
softmax of ``(q * scale) @ k^T``, the scale as the max of the materialised probabilities, the quantizers of
:mod:`dgq_utils.core.quantizers`, the ``<start>`` column passed through, ``P.to(v.dtype) @ v``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from dgq_utils.core.quantizers import SCALE_FLOOR, fake_quant_log2, fake_quant_uniform
from .quant_attention import ProbQuantSpec

__all__ = ["probabilities_reference", "prob_scale_reference", "quantize_probs_reference",
           "quant_attention_reference", "row_statistics_reference"]


def probabilities_reference(query: Tensor, key: Tensor, softmax_scale: float) -> Tensor:
    """float32 ``softmax((query * scale) @ key^T)``, ``(B, heads, Nq, Nk)``."""
    return torch.matmul(query.float() * softmax_scale, key.float().transpose(-1, -2)).softmax(dim=-1)


def row_statistics_reference(query: Tensor, key: Tensor, softmax_scale: float, exclude_first: bool):
    """``(m, l, pmax)`` as :func:`~dgq_utils.kernels.quant_attention.row_statistics` returns them, from the
    materialised logits: ``m`` the max base-2 logit, ``l = sum 2^(t - m)``, ``pmax`` the largest probability
    over keys ``1..`` (``exclude_first`` and more than one key) or over all keys."""
    t = torch.matmul(query.float() * softmax_scale, key.float().transpose(-1, -2)) * math.log2(math.e)
    m = t.amax(dim=-1)
    l_ = torch.exp2(t - m[..., None]).sum(dim=-1)
    rest = t[..., 1:] if exclude_first and t.shape[-1] > 1 else t
    pmax = torch.exp2(rest.amax(dim=-1) - m) / l_
    return m, l_, pmax


def prob_scale_reference(probs: Tensor, spec: ProbQuantSpec, static_max: Tensor | float | None = None) -> Tensor:
    """The quantizer's scale from materialised probabilities, broadcastable to ``probs``."""
    rest = probs[..., 1:] if spec.keep_start and probs.shape[-1] > 1 else probs
    if spec.scale == "per_prompt":
        return rest.amax(dim=(1, 2, 3), keepdim=True)
    if spec.scale == "batch":
        return rest.amax()
    if static_max is None:
        raise ValueError("prob_scale_reference: spec.scale is 'static' but static_max is None.")
    return torch.as_tensor(static_max, dtype=torch.float32, device=probs.device)


def quantize_probs_reference(probs: Tensor, spec: ProbQuantSpec, static_max: Tensor | float | None = None) -> Tensor:
    """Quantized probabilities (float32), the ``<start>`` column FP where ``spec.keep_start``."""
    if spec.quantizer is None:
        return probs
    m = prob_scale_reference(probs, spec, static_max)
    if spec.quantizer == "log2":
        out = fake_quant_log2(probs, m, spec.bits, zero_level=spec.zero_level)
    else:
        step = (m / (2**spec.bits - 1)).clamp_min(SCALE_FLOOR)
        out = fake_quant_uniform(probs, step, 0.0, spec.bits)
    if spec.keep_start and probs.shape[-1] > 1:
        out[..., :1] = probs[..., :1]
    return out


def quant_attention_reference(query: Tensor, key: Tensor, value: Tensor, softmax_scale: float,
                              spec: ProbQuantSpec, static_max: Tensor | float | None = None) -> Tensor:
    """What :func:`~dgq_utils.kernels.quant_attention.quant_attention` computes, materialised."""
    probs = quantize_probs_reference(probabilities_reference(query, key, softmax_scale), spec, static_max)
    return torch.matmul(probs.to(value.dtype), value)
