"""Calibration: errors, NaN detection, K clamping, determinism, per-timestep sets and the official mapping."""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import STEPS, generate
from dgq_utils.calibrate.trace import TRACE_SAMPLER
from dgq_utils.config import get_preset
from dgq_utils.quantize.pipeline import (
    dequantize_pipeline,
    get_quant_state,
    is_quantized,
    quantize_pipeline,
    set_timestep_mismatch_policy,
)

SMALL = get_preset("dgq-w8a8").replace(name="small", activations={"num_groups": 4})


def _q(pipe, recipe, prompts, seed=0, **sampler):
    sampler.setdefault("num_inference_steps", STEPS)
    return quantize_pipeline(pipe, recipe, prompts, TRACE_SAMPLER.replace(**sampler), seed, progress=False)


def test_empty_or_bad_prompt_list(pipe):
    with pytest.raises(ValueError, match="prompt list is empty"):
        _q(pipe, SMALL, [])
    with pytest.raises(ValueError, match="list of strings"):
        _q(pipe, SMALL, "a horse in the snow")
    assert not is_quantized(pipe)
    _q(pipe, "fp", [])  # nothing to calibrate: no prompts needed
    dequantize_pipeline(pipe)
    _q(pipe, get_preset("dgq-w8a8").replace(name="w-only", activations=None, attention=None), [])


def test_nan_is_reported_with_layer_and_timestep(pipe, calib_prompts):
    conv1 = pipe.unet.down_blocks[0].resnets[0].conv1
    saved_b, saved_w = conv1.bias.detach().clone(), conv1.weight.detach().clone()
    try:
        with torch.no_grad():
            conv1.bias[0] = float("nan")  # conv1's output, i.e. (after norm) conv2's input, becomes NaN
        with pytest.raises(FloatingPointError, match=r"down_blocks\.0\.resnets\.0\.conv2.*timestep index 0, t=667"):
            _q(pipe, SMALL, calib_prompts[:1])
        assert not is_quantized(pipe)  # left clean
        with torch.no_grad():
            conv1.bias.copy_(saved_b)
            conv1.weight[0, 0, 0, 0] = float("nan")
        with pytest.raises(FloatingPointError, match=r"down_blocks\.0\.resnets\.0\.conv1.*non-finite"):
            _q(pipe, SMALL, calib_prompts[:1])
        assert not is_quantized(pipe)
    finally:
        with torch.no_grad():
            conv1.bias.copy_(saved_b)
            conv1.weight.copy_(saved_w)


def test_num_groups_clamped_per_layer_or_rejected(pipe, calib_prompts):
    report = _q(pipe, get_preset("dgq-w8a8").replace(name="k48", activations={"num_groups": 48, "grouping": "contiguous"}),
                calib_prompts[:1])
    assert any("K = n" in n for n in report.notes)
    sets = report.sets[report.sets["axis"] != "tensor"]
    assert (sets["k"] <= sets["n"]).all() and (sets["k"] == 48).any() and (sets["k"] < 48).any()
    dequantize_pipeline(pipe)
    with pytest.raises(ValueError, match="num_groups=100000 is larger than the axis size of every"):
        _q(pipe, get_preset("dgq-w8a8").replace(name="k-huge", activations={"num_groups": 100000, "grouping": "contiguous"}),
           calib_prompts[:1])
    assert not is_quantized(pipe)


def _state_tensors(pipe, tmp_path, name):
    from safetensors.torch import load_file

    from dgq_utils.quantize.state import save_quant_state

    path = save_quant_state(pipe, tmp_path / f"{name}.safetensors")
    return load_file(str(path))


def test_deterministic_calibration(pipe, calib_prompts, tmp_path):
    _q(pipe, SMALL, calib_prompts, batch_size=2)
    t1, img1 = _state_tensors(pipe, tmp_path, "a"), generate(pipe)
    dequantize_pipeline(pipe)
    _q(pipe, SMALL, calib_prompts, batch_size=2)
    t2, img2 = _state_tensors(pipe, tmp_path, "b"), generate(pipe)
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert torch.equal(img1, img2)
    # a different calibration seed changes the parameters
    dequantize_pipeline(pipe)
    _q(pipe, SMALL, calib_prompts, batch_size=2, seed=1)
    t3 = _state_tensors(pipe, tmp_path, "c")
    assert any(not torch.equal(t1[k], t3[k]) for k in t1)


def _used_sets(pipe, steps):
    qs = get_quant_state(pipe)
    used = []
    h = pipe.unet.register_forward_pre_hook(lambda *a: used.append(qs.state.set_index))
    try:
        generate(pipe, steps=steps)
    finally:
        h.remove()
    return used


def test_per_timestep_sets_differ_and_are_used(pipe, calib_prompts):
    _q(pipe, SMALL, calib_prompts[:2])
    qs = get_quant_state(pipe)
    assert qs.controller.schedule == [667.0, 334.0, 1.0]
    assert _used_sets(pipe, STEPS) == [0, 1, 2]
    q = qs.layers["down_blocks.0.resnets.0.conv1"].act
    assert sorted(q.params) == [0, 1, 2]
    assert not torch.equal(q.params[0][0], q.params[2][0])
    dequantize_pipeline(pipe)
    _q(pipe, SMALL.replace(per_timestep=False), calib_prompts[:2])
    assert _used_sets(pipe, STEPS) == [0, 0, 0]
    assert sorted(get_quant_state(pipe).layers["down_blocks.0.resnets.0.conv1"].act.params) == [0]


def test_exact_mapping_mismatch_error_or_nearest(pipe, calib_prompts):
    _q(pipe, SMALL, calib_prompts[:2])
    with pytest.raises(RuntimeError, match="calibrated for 3 UNet calls.*num_inference_steps"):
        generate(pipe, steps=4)
    set_timestep_mismatch_policy(pipe, "nearest")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        used = _used_sets(pipe, 4)  # t = 751, 501, 251, 1 -> nearest of 667, 334, 1
    assert used == [0, 0, 1, 2]
    assert sum("nearest calibrated t" in str(w.message) for w in caught) == 1  # once per generation


def test_official_mapping_reproduces_the_off_by_one(calib_prompts):
    from dgq_utils.testing.tiny import build_tiny_pipeline

    pndm = build_tiny_pipeline(seed=0, scheduler="pndm")
    exact = SMALL.replace(name="exact", activations={"grouping": "contiguous"})
    _q(pndm, exact, calib_prompts[:1], num_inference_steps=4)
    assert get_quant_state(pndm).controller.schedule == [751.0, 501.0, 501.0, 251.0, 1.0]
    assert _used_sets(pndm, 4) == [0, 1, 2, 3, 4]  # the repeated t=501 gets its own set
    dequantize_pipeline(pndm)
    _q(pndm, exact.replace(timestep_mapping="official"), calib_prompts[:1], num_inference_steps=4)
    # (1000 - t) // (1000 // 4): both t=501 calls use set 1; t=251 uses set 2 (calibrated on the second
    # t=501 call); the last set (4) is never used
    assert _used_sets(pndm, 4) == [0, 1, 1, 2, 3]


def test_official_upstream_and_unfold_calibration(pipe, calib_prompts):
    report = _q(pipe, get_preset("dgq-official-w8a8").replace(name="official-k4", activations={"num_groups": 4}),
                calib_prompts[:2])
    assert report.calibration["upstream"] == "per_tensor_quantized"
    conv = get_quant_state(pipe).layers["down_blocks.0.resnets.0.conv1"]
    assert conv.layout == "unfold"
    info = conv.act.info[0]
    assert info["n"] in (32 * 9, 64)  # im2col rows (C*3*3) or output positions (8*8)
    # 2-D (time embedding) inputs keep the per-tensor init of the first batch (official)
    assert get_quant_state(pipe).layers["time_embedding.linear_1"].act.info[0]["source"] == "init"
    out = generate(pipe)
    assert torch.isfinite(out).all()


def test_collect_activation_stats_tidy_tables(pipe, fp_latents):
    from dgq_utils.calibrate.observe import collect_activation_stats

    procs = dict(pipe.unet.attn_processors)
    stats = collect_activation_stats(pipe, ["a horse in the snow", "a red car parked in the city"],
                                     TRACE_SAMPLER.replace(num_inference_steps=2, batch_size=1), progress=False)
    assert stats.timesteps == [501.0, 1.0]
    df = stats.axis_frame()
    assert list(df.columns) == ["layer", "layer_type", "timestep_index", "timestep", "axis", "index", "min", "max"]
    assert set(df["layer_type"]) == {"linear", "conv", "attn_q", "attn_k", "attn_v"}
    assert (df["min"] <= df["max"]).all() and set(df["timestep_index"]) == {0, 1}
    conv = df[(df["layer"] == "down_blocks.0.resnets.0.conv1") & (df["timestep_index"] == 0)]
    assert (conv["axis"] == "channel").sum() == 32 and (conv["axis"] == "pixel").sum() == 64  # C and H*W
    temb = df[df["layer"] == "time_embedding.linear_1"]
    assert set(temb["axis"]) == {"channel"}  # 2-D input: no pixel axis
    k_cross = df[df["layer"].str.endswith("attn2.k") & (df["axis"] == "pixel")]
    assert k_cross.groupby(["layer", "timestep_index"]).size().eq(77).all()  # all 77 text tokens
    tf = stats.tensor_frame()
    assert {"p99", "p99.9", "absmax", "ema_min"} <= set(tf.columns) and (tf["calls"] == 2).all()
    af = stats.attention_frame()
    assert set(af["kind"]) == {"self", "cross"} and af["start_mass"].between(0, 1).all()
    hist = stats.attention_histogram_frame()
    assert hist["count"].sum() > 0
    # the pipeline is left exactly as it was
    assert all(pipe.unet.attn_processors[k] is v for k, v in procs.items())
    assert torch.equal(generate(pipe), fp_latents)
    unf = collect_activation_stats(pipe, ["a horse in the snow"], TRACE_SAMPLER.replace(num_inference_steps=1),
                                   conv_layout="unfold",
                                   layers=["down_blocks.0.resnets.0.conv1"], include_qkv=False,
                                   include_attention=False, progress=False)
    assert unf.axis_stats("down_blocks.0.resnets.0.conv1", 0, "channel").n == 32 * 9
    with pytest.raises(ValueError, match="empty"):
        collect_activation_stats(pipe, [], progress=False)
