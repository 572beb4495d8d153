"""The trace harness (calibrate.trace), the attention record hook, sampler= and the extension-point registries."""
from __future__ import annotations

import pytest
import torch

from conftest import STEPS, generate
from dgq_utils.calibrate.trace import TRACE_SAMPLER, Trace, layer_selector
from dgq_utils.config import ActQuantConfig, AttentionQuantConfig, SamplerSettings
from dgq_utils.core.grouping import AXIS_RULES, GROUPING_METHODS, GroupingMethod, AxisStats, assign_groups
from dgq_utils.core.quantizers import PROB_QUANTIZERS
from dgq_utils.core.registry import Registry
from dgq_utils.model.attention import DGQAttnProcessor

SAMPLER = TRACE_SAMPLER.replace(num_inference_steps=STEPS)


def test_trace_sees_every_call_and_leaves_the_pipeline_as_it_was(pipe, fp_latents):
    procs = dict(pipe.unet.attn_processors)
    seen, probs_seen = [], []
    prompts = ["a horse in the snow", "a red car parked in the city", "a small bird"]
    with Trace(pipe, SAMPLER.replace(batch_size=2), seed=3, progress=False) as trace:
        names = trace.on_layer_input(lambda name, module, x: seen.append((trace.state.set_index, x.shape[0])),
                                     layers="conv_in")
        made = trace.on_attention(lambda proc, p, q, k, v: probs_seen.append((proc.kind, p.shape, v.shape)),
                                  layers="*attn2")
        schedule = trace.run(prompts)
    assert names == ["conv_in"]
    assert made and all(isinstance(p, DGQAttnProcessor) and n.endswith("attn2") for n, p in made.items())
    assert schedule == trace.timesteps and len(schedule) == STEPS
    # two batches (2 + 1 prompts), classifier-free guidance doubles each, one conv_in call per UNet call
    assert seen == [(i, 4) for i in range(STEPS)] + [(i, 2) for i in range(STEPS)]
    assert {k for k, _, _ in probs_seen} == {"cross"} and all(s[-1] == 77 for _, s, _ in probs_seen)
    assert all(pipe.unet.attn_processors[k] is v for k, v in procs.items())
    assert torch.equal(generate(pipe), fp_latents)


def test_layer_selector_forms():
    assert layer_selector(None)("anything")
    assert layer_selector("down_*")("down_blocks.0") and not layer_selector("down_*")("up_blocks.0")
    assert layer_selector(["a", "b*"])("bc") and not layer_selector(["a"])("b")
    assert layer_selector({"x"}.__contains__)("x")


def test_record_hook_gets_the_reference_probabilities(pipe):
    attn_name = next(k for k in pipe.unet.attn_processors if "attn2" in k)[: -len(".processor")]
    attn = pipe.unet.get_submodule(attn_name)
    original = pipe.unet.attn_processors[f"{attn_name}.processor"]
    proc = DGQAttnProcessor(attn_name, "cross", original)
    got = []
    proc.record = lambda p, probs, q, k, v: got.append((probs, q, k, v))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    context = torch.randn(2, 77, attn.to_k.in_features, generator=g)
    with torch.no_grad():
        out = proc(attn, hidden, context)
        ref = original(attn, hidden, context)
    (probs, q, k, v), = got
    assert probs.dtype == torch.float32 and probs.shape == (2, attn.heads, 16, 77)
    assert torch.equal(probs, (torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale).softmax(-1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_old_sampler_keywords_raise_a_type_error_naming_sampler(pipe):
    from dgq_utils.calibrate.observe import collect_activation_stats
    from dgq_utils.quantize.pipeline import quantize_pipeline
    from dgq_utils.report import capture_attention, group_error_sweep

    prompts = ["a horse in the snow"]
    calls = [
        lambda: collect_activation_stats(pipe, prompts, num_inference_steps=2),
        lambda: quantize_pipeline(pipe, "dgq-w8a8", prompts, guidance_scale=3.0, batch_size=2),
        lambda: capture_attention(pipe, prompts, height=32),
        lambda: group_error_sweep(pipe, None, prompts, width=32),
        lambda: Trace(pipe, num_inference_steps=2),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"sampler=SamplerSettings\("):
            call()
    with pytest.raises(TypeError, match="sampler must be a SamplerSettings"):
        collect_activation_stats(pipe, prompts, 25)  # the old positional num_inference_steps
    assert SamplerSettings(num_inference_steps=3).replace(batch_size=2) == SamplerSettings(num_inference_steps=3,
                                                                                          batch_size=2)


def test_registries_are_what_the_config_validates_against():
    assert ActQuantConfig.GROUPINGS == GROUPING_METHODS.names() == ("kmeans", "contiguous", "sorted")
    assert ActQuantConfig.AXIS_RULES == ("official_spread", "outlier_ratio")
    assert tuple(AXIS_RULES) == ("official_spread", "outlier_ratio", "channel", "pixel")
    assert AttentionQuantConfig.QUANTIZERS == PROB_QUANTIZERS.names() == ("log2", "uniform")
    with pytest.raises(ValueError, match="grouping must be one of 'kmeans'.*Did you mean 'kmeans'"):
        ActQuantConfig(grouping="kmean")
    with pytest.raises(ValueError, match="Did you mean 'log2'"):
        AttentionQuantConfig(quantizer="Log2")


def test_adding_a_grouping_method_is_one_registration():
    def reversed_blocks(stats, k, seed):
        return assign_groups(stats, k, method="contiguous").flip(0)

    GROUPING_METHODS.register("reversed", GroupingMethod(assign=reversed_blocks))
    try:
        cfg = ActQuantConfig(grouping="reversed")  # the recipe validation accepts it at once
        s = AxisStats(torch.zeros(6), torch.arange(6.0))
        assert assign_groups(s, 3, method=cfg.grouping).tolist() == [2, 2, 1, 1, 0, 0]
    finally:
        GROUPING_METHODS.unregister("reversed")
    with pytest.raises(ValueError, match="unknown grouping method 'reversed'"):
        assign_groups(AxisStats(torch.zeros(2), torch.ones(2)), 2, method="reversed")


def test_registry_basics():
    r: Registry[int] = Registry("colour")
    r.register("red", 1)

    @r.register("blue")
    def blue():
        return 2

    assert list(r) == ["red", "blue"] and r.lookup("blue") is blue and len(r) == 2
    with pytest.raises(ValueError, match="already registered"):
        r.register("red", 3)
    with pytest.raises(ValueError, match=r"unknown colour 'rde'; valid colours: red, blue\. Did you mean 'red'\?"):
        r.lookup("rde")
