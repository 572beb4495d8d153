"""quantize_pipeline and calibrate: bad inputs are refused before any work, naming the argument; the pipeline is
left unquantized."""
from __future__ import annotations

import pytest
from conftest import STEPS, sampler_kw

from dgq_utils.calibrate.calibration import calibrate
from dgq_utils.config import SamplerSettings, get_preset
from dgq_utils.config.validation import InvalidArgumentError
from dgq_utils.quantize.pipeline import (
    dequantize_pipeline,
    install,
    is_quantized,
    quantize_pipeline,
)

RECIPE = get_preset("dgq-w8a6").replace(name="small", activations={"num_groups": 4})

BAD_PROMPTS = [("a small red circle", "not a single string"), (None, "got None"), ([1, 2], "item 0"),
               (["ok", None], "item 1"), ([], "prompt list is empty")]
BAD_SAMPLER = [({"num_inference_steps": 0}, "num_inference_steps"),
               ({"num_inference_steps": "abc"}, "num_inference_steps"),
               ({"num_inference_steps": 2.5}, "num_inference_steps"), ({"batch_size": 0}, "batch_size"),
               ({"seed": -1}, "seed"), ({"guidance_scale": "high"}, "guidance_scale"), ({"height": 30}, "height"),
               ({"width": -8}, "width")]


@pytest.mark.parametrize("prompts,why", BAD_PROMPTS)
def test_quantize_refuses_bad_calibration_prompts(pipe, prompts, why):
    with pytest.raises(InvalidArgumentError, match=f"^calibration_prompts: .*{why}"):
        quantize_pipeline(pipe, RECIPE, prompts, sampler=SamplerSettings(num_inference_steps=STEPS), progress=False)
    assert not is_quantized(pipe)


@pytest.mark.parametrize("kw,name", BAD_SAMPLER)
def test_quantize_refuses_bad_sampler_arguments(pipe, calib_prompts, kw, name):
    kw = {"num_inference_steps": STEPS, **kw}
    with pytest.raises(InvalidArgumentError, match=f"^{name}: got"):
        quantize_pipeline(pipe, RECIPE, calib_prompts, progress=False, **sampler_kw(**kw))
    assert not is_quantized(pipe)


def test_quantize_refuses_bad_policy_and_recipe(pipe, calib_prompts):
    with pytest.raises(InvalidArgumentError, match="^on_timestep_mismatch: got str \\('closest'\\).*'nearest'"):
        quantize_pipeline(pipe, RECIPE, calib_prompts, sampler=SamplerSettings(num_inference_steps=STEPS), on_timestep_mismatch="closest")
    with pytest.raises(TypeError, match="recipe must be"):
        quantize_pipeline(pipe, 8, calib_prompts)
    assert not is_quantized(pipe)


@pytest.fixture()
def installed(pipe):
    qs = install(pipe, RECIPE, quantize_weights=True, on_timestep_mismatch="error")
    yield qs
    dequantize_pipeline(pipe)


@pytest.mark.parametrize("prompts,why", BAD_PROMPTS)
def test_calibrate_refuses_bad_prompts(pipe, installed, prompts, why):
    with pytest.raises(InvalidArgumentError, match=f"^prompts: .*{why}"):
        calibrate(pipe, installed, prompts, sampler=SamplerSettings(num_inference_steps=STEPS), progress=False)


@pytest.mark.parametrize("kw,name", BAD_SAMPLER)
def test_calibrate_refuses_bad_sampler_arguments(pipe, installed, calib_prompts, kw, name):
    with pytest.raises(InvalidArgumentError, match=f"^{name}: got"):
        calibrate(pipe, installed, calib_prompts, progress=False, **sampler_kw(**{"num_inference_steps": STEPS, **kw}))
