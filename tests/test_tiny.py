"""The tiny random-weight SD pipeline: deterministic, offline, SD-shaped, fast."""
from __future__ import annotations

import time

import pytest
import torch

from conftest import generate
from dgq_utils.testing.tiny import TINY_PROMPTS, add_start_sink, build_tiny_pipeline, make_scheduler
from dgq_utils.model.tokenizer import out_of_vocabulary_words


def test_same_seed_same_weights(tiny_pipe):
    other = build_tiny_pipeline(seed=0)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(tiny_pipe, name).state_dict(), getattr(other, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    different = build_tiny_pipeline(seed=1)
    w0 = tiny_pipe.unet.conv_in.weight
    assert not torch.equal(w0, different.unet.conv_in.weight)


def test_shapes_and_speed(tiny_pipe):
    t0 = time.perf_counter()
    images = generate(tiny_pipe, steps=2, output_type="np")
    elapsed = time.perf_counter() - t0
    assert images.shape == (2, 32, 32, 3)
    assert elapsed < 10.0  # "well under a second" on an idle core; generous for a shared test machine
    unet = tiny_pipe.unet
    assert unet.config.sample_size == 8 and tiny_pipe.vae_scale_factor == 4
    assert tiny_pipe.tokenizer.model_max_length == 77
    assert tiny_pipe.text_encoder.config.max_position_embeddings == 77
    kinds = {type(p).__name__ for p in unet.attn_processors.values()}
    assert kinds  # attention present
    cross = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    assert cross and all(m.is_cross_attention for m in cross)


def test_prompts_in_vocabulary(tiny_pipe):
    for prompt in TINY_PROMPTS:
        assert out_of_vocabulary_words(tiny_pipe.tokenizer, prompt) == [], prompt


def test_pndm_scheduler_repeats_a_timestep():
    s = make_scheduler("pndm")
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [751, 501, 501, 251, 1]
    with pytest.raises(ValueError, match="Unknown scheduler"):
        make_scheduler("euler")


def test_start_sink_scaffolding():
    """add_start_sink (test scaffolding) makes cross-attention put most of its mass on key 0."""
    from dgq_utils.calibrate.observe import collect_activation_stats
    from dgq_utils.calibrate.trace import TRACE_SAMPLER

    one_step = TRACE_SAMPLER.replace(num_inference_steps=1)
    pipe = build_tiny_pipeline(seed=0)
    before = collect_activation_stats(pipe, TINY_PROMPTS[:1], one_step, layers=["*attn2*"],
                                      include_qkv=False, percentiles=(), progress=False).attention_frame()
    add_start_sink(pipe, strength=8.0)
    after = collect_activation_stats(pipe, TINY_PROMPTS[:1], one_step, layers=["*attn2*"],
                                     include_qkv=False, percentiles=(), progress=False).attention_frame()
    assert before["start_mass"].mean() < 0.1
    assert after["start_mass"].mean() > 0.5
    assert set(after["kind"]) == {"cross"}
