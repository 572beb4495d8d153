"""GPU kernels of the quantized model (Triton), each with a plain-torch reference of the same math.

* :mod:`.quant_attention` -- fused attention with a quantized softmax (log2 / uniform grid, FP ``<start>``
  column, per-prompt / batch / static scale) that never holds the ``Nq x Nk`` probabilities in memory;
  :mod:`.triton_attention` holds its Triton kernels (imported only where Triton is installed).
* :mod:`.reference` -- the materialising reference (CPU, tests).
* :mod:`.fake_quant` -- one-kernel uniform fake quantization of activations and weights (per-timestep parameter
  sets stacked on the device, the set read from a device index tensor), bit-identical to
  :func:`dgq_utils.core.quantizers.fake_quant_uniform`.
* :mod:`.int8_gemm` -- real 8-bit GEMMs for W8A8 group quantization (fused activation quantize with the channel
  permutation, int8 x int8 -> int32 GEMM with per-row or K-blocked per-group scales and zero-point correction in the
  epilogue), with exact pure-torch references.
"""
from .quant_attention import (ProbQuantSpec, prob_multiplier, quant_attention, row_statistics, triton_available,
                              unsupported_reason)

__all__ = ["ProbQuantSpec", "prob_multiplier", "quant_attention", "row_statistics", "triton_available",
           "unsupported_reason"]
