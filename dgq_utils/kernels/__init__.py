"""GPU kernels (Triton) for the quantized hot paths; each module keeps a pure-PyTorch reference beside it."""
