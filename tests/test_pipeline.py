"""quantize_pipeline / dequantize_pipeline / save & load: exactness guarantees and accuracy sanity checks."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import STEPS, generate, psnr
from dgq_utils.calibrate.trace import TRACE_SAMPLER
from dgq_utils.config import get_preset
from dgq_utils.quantize.pipeline import (
    dequantize_pipeline,
    get_quant_state,
    is_quantized,
    quantize_pipeline,
    set_quantization_enabled,
)
from dgq_utils.quantize.state import load_quant_state, save_quant_state
from dgq_utils.testing.tiny import build_tiny_pipeline

W4A4 = get_preset("baseline-w4a6").replace(name="baseline-w4a4", activations={"bits": 4})


def _q(pipe, recipe, prompts, **kw):
    return quantize_pipeline(pipe, recipe, prompts, TRACE_SAMPLER.replace(num_inference_steps=STEPS), progress=False,
                             **kw)


@pytest.fixture(scope="module")
def saved_state(tiny_pipe, calib_prompts, tmp_path_factory):
    """dgq-w8a6 calibrated once on the session pipeline: (path, quantized latents)."""
    dequantize_pipeline(tiny_pipe)
    _q(tiny_pipe, "dgq-w8a6", calib_prompts)
    path = save_quant_state(tiny_pipe, tmp_path_factory.mktemp("state") / "dgq-w8a6.safetensors")
    latents = generate(tiny_pipe)
    dequantize_pipeline(tiny_pipe)
    return path, latents


def test_quantization_off_is_bit_identical(pipe, saved_state, fp_latents):
    load_quant_state(pipe, saved_state[0])
    assert not torch.equal(generate(pipe), fp_latents)
    set_quantization_enabled(pipe, False)
    assert torch.equal(generate(pipe), fp_latents)
    set_quantization_enabled(pipe, True)
    assert torch.equal(generate(pipe), saved_state[1])


def test_dequantize_restores_everything(pipe, saved_state, fp_latents):
    unet = pipe.unet
    modules = dict(unet.named_modules())
    procs = dict(unet.attn_processors)
    keys = {k: v.clone() for k, v in unet.state_dict().items()}
    load_quant_state(pipe, saved_state[0])
    assert is_quantized(pipe)
    sd = unet.state_dict()
    assert sd.keys() == keys.keys() and all(torch.equal(sd[k], keys[k]) for k in keys)  # state dict untouched
    assert dequantize_pipeline(pipe) is True and not is_quantized(pipe)
    assert dequantize_pipeline(pipe) is False
    after = dict(unet.named_modules())
    assert after.keys() == modules.keys() and all(after[k] is modules[k] for k in modules)
    assert all(unet.attn_processors[k] is procs[k] for k in procs)
    assert torch.equal(generate(pipe), fp_latents)


def test_save_load_onto_fresh_pipeline_is_identical(saved_state):
    path, latents = saved_state
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        names = list(f.keys())
    assert meta["format"] == "dgq-quant-state/2" and len(meta["content_hash"]) == 64
    assert json.loads(meta["recipe"])["name"] == "dgq-w8a6"
    cal = json.loads(meta["calibration"])
    assert cal["num_inference_steps"] == STEPS and cal["scheduler"] == "DDIMScheduler"
    assert cal["timesteps"] == [667.0, 334.0, 1.0] and cal["num_prompts"] == 4
    assert any(n.endswith(".weight.scale") for n in names) and any(".set2.ids" in n for n in names)
    fresh = build_tiny_pipeline(seed=0)
    report = load_quant_state(fresh, path)
    assert torch.equal(generate(fresh), latents)
    assert report.calibration["timesteps"] == [667.0, 334.0, 1.0]
    with pytest.raises(RuntimeError, match="already quantized"):
        load_quant_state(fresh, path)


def test_load_onto_different_architecture_names_the_layer(saved_state):
    other = build_tiny_pipeline(seed=0, cross_attention_dim=16)
    with pytest.raises(ValueError, match=r"different UNet architecture.*down_blocks\.0\..*attn2\.to_k.*\(32, 32\).*\(32, 16\)"):
        load_quant_state(other, saved_state[0])
    assert not is_quantized(other)


def test_unknown_preset_and_double_quantization(pipe, calib_prompts):
    with pytest.raises(ValueError, match="unknown preset 'dgq-w8a9'"):
        _q(pipe, "dgq-w8a9", calib_prompts)
    with pytest.raises(TypeError, match="QuantRecipe or a preset name"):
        _q(pipe, 42, calib_prompts)
    _q(pipe, "fp", [])
    with pytest.raises(RuntimeError, match="already quantized"):
        _q(pipe, "fp", [])


def test_report_and_skipped_layers(pipe, saved_state):
    report = load_quant_state(pipe, saved_state[0])
    df = report.layers
    for col in ("layer", "role", "layer_type", "weight_bits", "act_bits", "granularity", "axis", "k", "n", "sets"):
        assert col in df.columns
    assert set(report.skipped) == {"conv_in", "conv_out"}
    assert df[df["skipped"]]["layer"].tolist() == ["conv_in", "conv_out"]
    assert type(pipe.unet.conv_in).__name__ == "Conv2d"  # FP, untouched
    grouped = df[(df["granularity"] == "group") & (df["axis"] != "tensor")]
    assert set(grouped["axis"]) <= {"channel", "pixel"} and (grouped["k"] <= 16).all()
    assert {"q", "k", "v", "prob"} <= set(df["role"])
    assert "dgq-w8a6" in report.summary()


@pytest.mark.parametrize("recipe", ["dgq-w8a8", "baseline-w8a8"])
def test_w8a8_stays_close_and_w4a4_does_not(pipe, calib_prompts, fp_latents, recipe):
    _q(pipe, recipe, calib_prompts)
    good = psnr(generate(pipe), fp_latents)
    dequantize_pipeline(pipe)
    _q(pipe, W4A4, calib_prompts)
    bad = psnr(generate(pipe), fp_latents)
    assert good > 25.0, good
    assert bad < good - 8.0, (good, bad)


def test_attention_only_static_recipe_and_skipped_attention(pipe, calib_prompts, fp_latents):
    from dgq_utils.config import AttentionQuantConfig, QuantRecipe

    att_only = QuantRecipe(name="att-only", attention=AttentionQuantConfig(bits=8, quantizer="uniform",
                                                                           scale="static", keep_start_fp=False))
    report = _q(pipe, att_only, calib_prompts[:2])
    qs = get_quant_state(pipe)
    assert not qs.layers and len(qs.processors) == len(pipe.unet.attn_processors)
    assert all(sorted(p.prob_quant.static) == [0, 1, 2] for p in qs.processors.values())
    assert set(report.layers[~report.layers["skipped"]]["role"]) == {"prob"}
    out = generate(pipe)
    assert not torch.equal(out, fp_latents) and psnr(out, fp_latents) > 30
    dequantize_pipeline(pipe)
    _q(pipe, get_preset("dgq-w8a8").replace(name="skip-attn2", skip_layers=("conv_in", "conv_out", "*attn2*"),
                                            activations={"num_groups": 4, "grouping": "contiguous"}),
       calib_prompts[:1])
    qs = get_quant_state(pipe)
    assert not any("attn2" in n for n in qs.layers) and not any(n.endswith("attn2") for n in qs.processors)
    assert any(n.endswith("attn1") for n in qs.processors)
