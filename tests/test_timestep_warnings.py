"""Timestep mappings that approximate warn once per pipeline run, counting the UNet calls that fell outside the
calibrated sets; the policy turns it into an error."""
from __future__ import annotations

import warnings

import pytest
from conftest import STEPS, generate

from dgq_utils.config import SamplerSettings, get_preset
from dgq_utils.quantize.pipeline import quantize_pipeline, set_timestep_mismatch_policy

SMALL = get_preset("dgq-w8a6").replace(name="small", activations={"num_groups": 4, "grouping": "contiguous"})


def dgq_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if "timestep mapping" in str(w.message)]


def test_official_mapping_other_step_count_errors_then_warns_once_per_run(pipe, calib_prompts):
    quantize_pipeline(pipe, SMALL.replace(timestep_mapping="official"), calib_prompts[:1],
                      sampler=SamplerSettings(num_inference_steps=STEPS), progress=False)
    with pytest.raises(RuntimeError, match="samples 8 steps but the parameter sets were calibrated for 3"):
        generate(pipe, steps=8)
    set_timestep_mismatch_policy(pipe, "nearest")
    msgs = dgq_warnings(lambda: (generate(pipe, steps=8), generate(pipe, steps=8)))
    assert len(msgs) == 2, msgs                        # once per pipeline call
    assert all("8 of 8 UNet calls" in m and "official timestep mapping" in m for m in msgs), msgs
    same = dgq_warnings(lambda: generate(pipe, steps=STEPS))          # calibrated steps: only DDIM's last call
    assert len(same) == 1 and "1 of 3 UNet calls" in same[0], same


def test_official_mapping_clamp_at_calibrated_steps_warns_and_strict_errors(pipe, calib_prompts):
    # DDIM (steps_offset=0), 3 steps: t = 667, 334, 1 -> official indices 1, 2, 3; the last is clamped to set 2
    quantize_pipeline(pipe, SMALL.replace(timestep_mapping="official"), calib_prompts[:1],
                      sampler=SamplerSettings(num_inference_steps=STEPS), progress=False)
    msgs = dgq_warnings(lambda: generate(pipe, steps=STEPS))
    assert len(msgs) == 1 and "1 of 3 UNet calls" in msgs[0], msgs
    set_timestep_mismatch_policy(pipe, "strict")
    with pytest.raises(RuntimeError, match="official index 3, outside the 3 calibrated sets.*strict"):
        generate(pipe, steps=STEPS)


def test_exact_mapping_nearest_counts_the_calls(pipe, calib_prompts):
    quantize_pipeline(pipe, SMALL, calib_prompts[:1], sampler=SamplerSettings(num_inference_steps=STEPS), progress=False)
    assert dgq_warnings(lambda: generate(pipe, steps=STEPS)) == []   # the calibrated schedule: silent
    with pytest.raises(RuntimeError, match="calibrated for 3 UNet calls"):
        generate(pipe, steps=4)
    set_timestep_mismatch_policy(pipe, "nearest")
    msgs = dgq_warnings(lambda: generate(pipe, steps=4))            # t = 751, 501, 251, 1 vs 667, 334, 1
    assert len(msgs) == 1 and "4 of 4 UNet calls" in msgs[0] and "exact timestep mapping" in msgs[0], msgs


def test_shared_mapping_never_warns(pipe, calib_prompts):
    quantize_pipeline(pipe, SMALL.replace(per_timestep=False), calib_prompts[:1], sampler=SamplerSettings(num_inference_steps=STEPS),
                      progress=False)
    assert dgq_warnings(lambda: generate(pipe, steps=6)) == []
