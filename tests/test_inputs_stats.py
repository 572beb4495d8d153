"""collect_activation_stats: bad inputs are refused before any UNet call, naming the argument."""
from __future__ import annotations

import pytest
from conftest import sampler_kw
from test_inputs_quantize import BAD_PROMPTS, BAD_SAMPLER

from dgq_utils.calibrate.observe import collect_activation_stats
from dgq_utils.config import SamplerSettings
from dgq_utils.config.validation import InvalidArgumentError


@pytest.fixture()
def counted(pipe):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    yield pipe, calls
    handle.remove()


@pytest.mark.parametrize("prompts,why", BAD_PROMPTS)
def test_bad_prompts(counted, prompts, why):
    pipe, calls = counted
    with pytest.raises(InvalidArgumentError, match=f"^prompts: .*{why}"):
        collect_activation_stats(pipe, prompts, sampler=SamplerSettings(num_inference_steps=2), progress=False)
    assert not calls


@pytest.mark.parametrize("kw,name", BAD_SAMPLER)
def test_bad_sampler_arguments(counted, calib_prompts, kw, name):
    pipe, calls = counted
    with pytest.raises(InvalidArgumentError, match=f"^{name}: got"):
        collect_activation_stats(pipe, calib_prompts, progress=False, **sampler_kw(**{"num_inference_steps": 2, **kw}))
    assert not calls


def test_bad_conv_layout(counted, calib_prompts):
    with pytest.raises(ValueError, match="conv_layout"):
        collect_activation_stats(counted[0], calib_prompts, sampler=SamplerSettings(num_inference_steps=2), conv_layout="im2col")
