"""SD 2.x, SDXL and SDXL-Turbo through loading and the engine, on tiny random pipelines built in code."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dgq_utils.model.attention import DGQAttnProcessor
from dgq_utils.model.loading import (
    FAMILY_SAMPLER_DEFAULTS,
    UnsupportedPipeline,
    load_pipeline,
    model_family,
    pipeline_class_name,
)
from dgq_utils.quantize.pipeline import (
    dequantize_pipeline,
    get_quant_state,
    quantize_pipeline,
)
from dgq_utils.quantize.state import load_quant_state, save_quant_state
from dgq_utils.calibrate.trace import TRACE_SAMPLER
from dgq_utils.testing.families import build_tiny_sd2_pipeline, build_tiny_sdxl_pipeline
from dgq_utils.testing.tiny import TINY_PROMPTS, build_tiny_pipeline

FAMILIES = {
    "sd1": (lambda: build_tiny_pipeline(), "StableDiffusionPipeline", dict(num_inference_steps=2, guidance_scale=7.5)),
    "sd2": (lambda: build_tiny_sd2_pipeline(), "StableDiffusionPipeline", dict(num_inference_steps=2, guidance_scale=7.5)),
    "sdxl": (lambda: build_tiny_sdxl_pipeline(), "StableDiffusionXLPipeline", dict(num_inference_steps=2, guidance_scale=5.0)),
    "sdxl-turbo": (lambda: build_tiny_sdxl_pipeline(turbo=True), "StableDiffusionXLPipeline",
                   dict(num_inference_steps=2, guidance_scale=0.0)),
}
PROMPTS = list(TINY_PROMPTS[:2])
CALIB = list(TINY_PROMPTS[2:6])


def _images(pipe, sampler):
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="np", **sampler).images


def _quantize(pipe, recipe, sampler):
    return quantize_pipeline(pipe, recipe, CALIB, TRACE_SAMPLER.replace(**sampler), progress=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny family saved as a diffusers folder (what a user's checkpoint folder looks like)."""
    out = {}
    for fam, (build, _, _) in FAMILIES.items():
        folder = tmp_path_factory.mktemp(fam)
        build().save_pretrained(folder)
        out[fam] = folder
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_pipeline_builds_the_right_class_and_family(saved, family):
    build, cls, sampler = FAMILIES[family]
    pipe = load_pipeline(saved[family])
    assert type(pipe).__name__ == cls == pipeline_class_name(saved[family])
    assert model_family(saved[family]) == model_family(pipe) == family
    assert pipe.unet.dtype == torch.float32
    # loading a saved folder gives the very pipeline that was saved: same images
    np.testing.assert_array_equal(_images(pipe, sampler), _images(build(), sampler))


def test_sd2_v_prediction_is_kept(saved):
    pipe = load_pipeline(saved["sd2"])
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.use_linear_projection


def test_family_sampler_defaults_follow_the_model_cards():
    assert FAMILY_SAMPLER_DEFAULTS["sdxl-turbo"] == {"num_inference_steps": 4, "guidance_scale": 0.0}
    assert FAMILY_SAMPLER_DEFAULTS["sd1"]["num_inference_steps"] == 25


@pytest.mark.parametrize("family", ["sd2", "sdxl", "sdxl-turbo"])
def test_quantize_generate_dequantize_and_state_roundtrip(saved, family, tmp_path):
    _, _, sampler = FAMILIES[family]
    pipe = load_pipeline(saved[family])
    fp = _images(pipe, sampler)
    _quantize(pipe, "dgq-w8a8", sampler)
    q = _images(pipe, sampler)
    assert np.isfinite(q).all() and not np.array_equal(q, fp)
    assert np.abs(q - fp).mean() < 0.1  # W8A8 stays close to FP even on a random model
    state = save_quant_state(pipe, tmp_path / "s.safetensors")
    dequantize_pipeline(pipe)
    np.testing.assert_array_equal(_images(pipe, sampler), fp)  # back to the exact FP pipeline
    fresh = load_pipeline(saved[family])
    load_quant_state(fresh, state)
    np.testing.assert_array_equal(_images(fresh, sampler), q)  # the saved state reproduces the images


def test_sdxl_cross_attention_sees_the_start_token_of_the_concatenated_text_states(saved):
    """SDXL concatenates both encoders' hidden states along features: key 0 is still ``<start>``."""
    _, _, sampler = FAMILIES["sdxl"]
    pipe = load_pipeline(saved["sdxl"])
    _quantize(pipe, "dgq-w8a8", sampler)
    procs = {n: p for n, p in pipe.unet.attn_processors.items() if isinstance(p, DGQAttnProcessor)}
    cross = [p for n, p in procs.items() if "attn2" in n]
    assert cross and all(p.kind == "cross" for p in cross)
    for p in cross:
        p.record_attention = True
    _images(pipe, sampler)
    stats = [s for p in cross for s in p.attention_stats.values()]
    assert stats and all(s.num_keys == 77 for s in stats)
    assert get_quant_state(pipe).recipe.attention.keep_start_fp


def test_turbo_calibrates_one_set_per_step_without_cfg(saved):
    _, _, sampler = FAMILIES["sdxl-turbo"]
    pipe = load_pipeline(saved["sdxl-turbo"])
    report = _quantize(pipe, "dgq-w8a6", sampler)
    assert get_quant_state(pipe).controller.num_sets == sampler["num_inference_steps"]
    assert len(report.layers) > 0


def test_load_pipeline_refuses_a_transformer_pipeline_naming_why(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    with pytest.raises(UnsupportedPipeline, match="FluxPipeline.*transformer"):
        load_pipeline(tmp_path)


def test_load_pipeline_refuses_an_image_to_image_pipeline(saved, tmp_path):
    folder = tmp_path / "img2img"
    build_tiny_pipeline().save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionImg2ImgPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedPipeline, match="text-to-image"):
        load_pipeline(folder)


def test_load_pipeline_dtype_is_checked_and_half_precision_loads(saved):
    with pytest.raises(TypeError, match="dtype"):
        load_pipeline(saved["sdxl"], dtype="float16")
    pipe = load_pipeline(saved["sdxl"], dtype=torch.bfloat16)
    assert pipe.unet.dtype == pipe.text_encoder_2.dtype == torch.bfloat16


def test_the_embedded_model_is_its_own_family():
    from dgq_utils.model.loading import EMBEDDED_PIPELINE_DIR

    assert model_family(EMBEDDED_PIPELINE_DIR) == "embedded"
    assert model_family(load_pipeline()) == "embedded"
