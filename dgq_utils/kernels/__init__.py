"""GPU kernels of the quantized model (Triton), each with a plain-torch reference of the same math.

* :mod:`.quant_attention` -- fused attention with a quantized softmax (log2 / uniform grid, FP ``<start>``
  column, per-prompt / batch / static scale) that never holds the ``Nq x Nk`` probabilities in memory;
  :mod:`.triton_attention` holds its Triton kernels (imported only where Triton is installed).
* :mod:`.reference` -- the materialising reference (CPU, tests).
* :mod:`.fake_quant` -- one-kernel uniform fake quantization of activations and weights (per-timestep parameter
  sets stacked on the device, the set read from a device index tensor), bit-identical to
  :func:`dgq_utils.core.quantizers.fake_quant_uniform`.
"""
from .quant_attention import (ProbQuantSpec, prob_multiplier, quant_attention, row_statistics, triton_available,
                              unsupported_reason)

__all__ = ["ProbQuantSpec", "prob_multiplier", "quant_attention", "row_statistics", "triton_available",
           "unsupported_reason"]
