"""CUDAGraphUNet on the CPU: what it refuses (the replay itself is a GPU test in test_gpu_speed_paths.py)."""
from __future__ import annotations

import pytest
import torch

from dgq_utils.config import SamplerSettings
from dgq_utils.quantize.graphs import CUDAGraphUNet
from dgq_utils.quantize.pipeline import get_quant_state, quantize_pipeline


def test_refuses_cpu_inputs_bad_warmup_and_non_unets(pipe):
    graphed = CUDAGraphUNet(pipe)
    with pytest.raises(ValueError, match="CUDA device"):
        graphed(torch.randn(2, 4, 8, 8), 10, encoder_hidden_states=torch.randn(2, 77, 32))
    with pytest.raises(ValueError, match="warmup"):
        CUDAGraphUNet(pipe, warmup=0)
    with pytest.raises(TypeError, match="UNet"):
        CUDAGraphUNet(object())


def test_refuses_a_unet_being_calibrated(pipe, calib_prompts):
    quantize_pipeline(pipe, "dgq-w8a8", calib_prompts[:1], SamplerSettings(num_inference_steps=2), progress=False)
    qs = get_quant_state(pipe)
    qs.controller.mode = "calibrate"
    try:
        with pytest.raises(RuntimeError, match="being calibrated"):
            CUDAGraphUNet(pipe)._controller()
    finally:
        qs.controller.mode = "infer"
