"""Learned weight rounding (AdaRound): the optimisation, the input sampler, the config, and the pipeline path
(inputs captured during calibration, masks in the state file, reuse across recipes)."""
import tempfile

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgq_utils.calibrate import observation_memo
from dgq_utils.config import AdaRoundConfig, QuantRecipe, SamplerSettings, WeightQuantConfig, get_preset, recipe_hash
from dgq_utils.core import weight_memo
from dgq_utils.core.adaround import (
    adaround,
    beta_at,
    fake_quant_rounded,
    nearest_round_up,
    output_error,
    pack_mask,
    unpack_mask,
)
from dgq_utils.core.input_sample import InputSample
from dgq_utils.core.quantizers import fake_quant_uniform, qrange, weight_qparams
from dgq_utils.quantize.pipeline import dequantize_pipeline, get_quant_state, quantize_pipeline
from dgq_utils.quantize.state import QuantStateError, content_hash, load_quant_state, save_quant_state
from safetensors import safe_open
from safetensors.torch import save_file

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROMPTS = ["a red car parked in the city", "a blue house near a river"]
S = SamplerSettings(num_inference_steps=2, batch_size=2, height=32, width=32)
QUICK = {"iters": 10, "samples": 48, "batch_size": 16}


def _layer(seed, o=12, i=20, m=96, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, i, generator=g) * scale
    mix = torch.randn(i, i, generator=g)
    x = torch.randn(m, i, generator=g) @ mix  # correlated inputs: where rounding jointly matters
    return w, x


# ----------------------------------------------------------------------------------------------------------
# the optimisation
# ----------------------------------------------------------------------------------------------------------
@FAST
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 3, 4, 8]), symmetric=st.booleans(),
       granularity=st.sampled_from(["per_channel", "per_tensor"]), keep=st.booleans())
def test_every_weight_is_floor_or_ceil_within_one_step_of_nearest(seed, bits, symmetric, granularity, keep):
    w, x = _layer(seed)
    s, z = weight_qparams(w, bits, granularity=granularity, symmetric=symmetric, range_method="mse")
    res = adaround(w, s, z, bits, x, symmetric=symmetric, iters=15, batch_size=16, seed=seed, keep_better=keep)
    wq = fake_quant_rounded(w, s, z, bits, res.round_up, symmetric=symmetric)
    near = fake_quant_uniform(w, s, z, bits, symmetric=symmetric)
    step = s.expand_as(w)
    assert bool(((wq - near).abs() <= step * (1 + 1e-5)).all())  # at most one level from nearest
    t = w / s
    lvl = torch.round(wq / s)  # the integer level (zero point already removed)
    qmin, qmax = qrange(bits, symmetric)
    zz = torch.zeros_like(s) if symmetric else z
    lo = torch.clamp(torch.floor(t) + zz, qmin, qmax) - zz
    hi = torch.clamp(torch.floor(t) + 1 + zz, qmin, qmax) - zz
    assert bool(((lvl == lo) | (lvl == hi)).all())  # floor or ceil of w / s, clamped to the grid
    if keep:
        assert res.loss_adaround <= res.loss_nearest


@FAST
@given(seed=st.integers(0, 2**16), bits=st.integers(2, 8), symmetric=st.booleans())
def test_nearest_mask_reproduces_round_to_nearest_bit_for_bit(seed, bits, symmetric):
    w, _ = _layer(seed, o=7, i=9)
    s, z = weight_qparams(w, bits, symmetric=symmetric, range_method="mse")
    got = fake_quant_rounded(w, s, z, bits, nearest_round_up(w, s), symmetric=symmetric)
    assert torch.equal(got, fake_quant_uniform(w, s, z, bits, symmetric=symmetric))


@pytest.mark.parametrize("bits", [3, 4])
def test_reconstruction_loss_goes_down_vs_nearest(bits):
    w, x = _layer(1, o=16, i=32, m=256)
    s, z = weight_qparams(w, bits, range_method="mse")
    res = adaround(w, s, z, bits, x, iters=300, batch_size=32, seed=0, keep_better=False)
    near = fake_quant_uniform(w, s, z, bits)
    assert res.loss_nearest == pytest.approx(output_error(x, near, w))
    assert res.loss_adaround < 0.9 * res.loss_nearest
    assert 0 < res.flipped < 0.5 and not res.kept_nearest


def test_deterministic_given_a_seed():
    w, x = _layer(3)
    s, z = weight_qparams(w, 4, range_method="mse")
    a = adaround(w, s, z, 4, x, iters=60, batch_size=8, seed=5, keep_better=False)
    b = adaround(w, s, z, 4, x, iters=60, batch_size=8, seed=5, keep_better=False)
    assert torch.equal(a.round_up, b.round_up) and a.loss_adaround == b.loss_adaround


def test_beta_schedule_and_errors():
    assert beta_at(0, 100, 20, 2, 0.2) is None and beta_at(19, 100, 20, 2, 0.2) is None
    assert beta_at(20, 100, 20, 2, 0.2) == 20 and beta_at(99, 100, 20, 2, 0.2) == 2
    w, x = _layer(0)
    s, z = weight_qparams(w, 4)
    with pytest.raises(ValueError, match="input rows have 7 features, the weight 20"):
        adaround(w, s, z, 4, x[:, :7], iters=1)
    with pytest.raises(ValueError, match="non-empty"):
        adaround(w, s, z, 4, x[:0], iters=1)


@FAST
@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=4), seed=st.integers(0, 100))
def test_mask_packing_round_trip(shape, seed):
    m = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5
    assert torch.equal(unpack_mask(pack_mask(m), shape), m)
    with pytest.raises(ValueError, match="packed mask"):
        unpack_mask(torch.zeros(100, dtype=torch.uint8), shape)


# ----------------------------------------------------------------------------------------------------------
# the input sample
# ----------------------------------------------------------------------------------------------------------
def test_input_sample_is_bounded_seeded_and_exact_for_convs():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 3, 9, 7, generator=g) for _ in range(4)]
    geo = {"kernel_size": (3, 3), "stride": (2, 1), "padding": (1, 1), "dilation": (1, 1)}
    a, b = InputSample(40, seed=1, conv=geo), InputSample(40, seed=1, conv=geo)
    for x in xs:
        a.add(x)
        b.add(x)
    assert len(a) == 40 and a.seen == 4 * 2 * 5 * 7 and torch.equal(a.rows, b.rows)
    patches = torch.cat([F.unfold(x, 3, padding=1, stride=(2, 1)).transpose(1, 2).reshape(-1, 27) for x in xs])
    assert all(bool((patches == r).all(1).any()) for r in a.rows)  # every row is a real patch, bit for bit
    assert len({tuple(r.tolist()) for r in a.rows}) == 40  # without replacement
    c = InputSample(40, seed=2, conv=geo)
    for x in xs:
        c.add(x)
    assert not torch.equal(a.rows, c.rows)
    lin = InputSample(1000, seed=0)
    lin.add(torch.randn(2, 5, 6))
    assert len(lin) == 10  # fewer rows than n: all of them
    lin.close()
    with pytest.raises(RuntimeError, match="after close"):
        lin.add(torch.randn(1, 6))


def test_input_sample_is_uniform_over_calls():
    s = InputSample(200, seed=0)
    for call in range(10):
        s.add(torch.full((100, 1), float(call)))
    counts = torch.bincount(s.rows[:, 0].long(), minlength=10)
    assert int(counts.sum()) == 200 and int(counts.min()) >= 8  # ~20 from each call, not the first/last only


# ----------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, bad, match", [
    ("iters", 0, r"AdaRoundConfig\.iters must be an integer >= 1; got 0"),
    ("iters", 2.5, r"AdaRoundConfig\.iters must be an integer"),
    ("lr", 0.0, r"AdaRoundConfig\.lr must be a finite number > 0.0; got 0.0"),
    ("lr", float("nan"), r"AdaRoundConfig\.lr must be a finite number"),
    ("batch_size", -1, r"AdaRoundConfig\.batch_size must be an integer >= 1"),
    ("samples", True, r"AdaRoundConfig\.samples must be an integer >= 1"),
    ("reg_weight", -0.1, r"AdaRoundConfig\.reg_weight must be a finite number >= 0.0.*official value is 0.01"),
    ("beta_start", 1.0, r"AdaRoundConfig\.beta_end must be <= beta_start"),
    ("warmup", 1.0, r"AdaRoundConfig\.warmup must be < 1"),
    ("warmup", -0.5, r"AdaRoundConfig\.warmup must be a finite number >= 0.0 and <= 1.0"),
    ("seed", -3, r"AdaRoundConfig\.seed must be an integer >= 0"),
    ("keep_better", "yes", r"AdaRoundConfig\.keep_better must be True or False"),
])
def test_bad_adaround_settings_name_the_field(field, bad, match):
    with pytest.raises(ValueError, match=match):
        AdaRoundConfig(**{field: bad})


def test_weight_config_rounding_options_and_hash_stability():
    with pytest.raises(ValueError, match=r"WeightQuantConfig\.rounding must be one of 'nearest', 'adaround'; "
                                         r"got 'adaroud'\. Did you mean 'adaround'"):
        WeightQuantConfig(rounding="adaroud")
    with pytest.raises(ValueError, match=r"WeightQuantConfig\.adaround must be an AdaRoundConfig"):
        WeightQuantConfig(adaround=3)
    with pytest.raises(ValueError, match=r"unknown key\(s\) for AdaRoundConfig: 'iter'"):
        WeightQuantConfig(adaround={"iter": 3})
    # round-to-nearest recipes serialise as before the option existed (hashes, caches unchanged)
    d = get_preset("dgq-w4a8").weights.to_dict()
    assert d == {"bits": 4, "granularity": "per_channel", "symmetric": False, "range_method": "mse"}
    r = get_preset("dgq-w4a8-adaround")
    assert r.weights.rounding == "adaround" and r.weights.adaround == AdaRoundConfig()
    assert r.activations == get_preset("dgq-w4a8").activations and "adaround" in r.summary()
    r2 = r.replace(weights={"adaround": {"iters": 7}})
    assert r2.weights.adaround.iters == 7 and r2.weights.rounding == "adaround"
    for rec in (r, r2, get_preset("baseline-w4a6-adaround")):
        assert QuantRecipe.from_json(rec.to_json()) == rec
        assert recipe_hash(QuantRecipe.from_json(rec.to_json())) == recipe_hash(rec)
    assert recipe_hash(r, include_name=False) != recipe_hash(get_preset("dgq-w4a8"), include_name=False)


# ----------------------------------------------------------------------------------------------------------
# the pipeline path
# ----------------------------------------------------------------------------------------------------------
def _masks(pipe):
    return {n: layer.weight_round_up.clone() for n, layer in get_quant_state(pipe).layers.items()
            if layer.weight_round_up is not None}


def _latents(pipe):
    return pipe(PROMPTS[:1], num_inference_steps=2, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="latent").images


def test_calibration_learns_rounding_saves_and_loads_it(pipe):
    observation_memo.clear()
    weight_memo.clear_weight_memo()
    recipe = get_preset("baseline-w4a8-adaround").replace(weights={"adaround": QUICK})  # no K-means: fast
    rep = quantize_pipeline(pipe, recipe, PROMPTS, S, 0, progress=False)
    wr = rep.calibration["weight_rounding"]
    qs = get_quant_state(pipe)
    assert wr["rounding"] == "adaround" and wr["layers"] == len(qs.layers)
    assert wr["loss_adaround"] < wr["loss_nearest"]
    rows = [d["rows"] for d in wr["per_layer"].values()]
    assert max(rows) == 48 and min(rows) >= 1  # bounded (time-embedding linears see one row per call)
    masks, lat = _masks(pipe), _latents(pipe)
    assert masks and len(masks) == len(qs.layers)
    assert any(not torch.equal(m, nearest_round_up(qs.layers[n].weight, qs.layers[n].weight_scale))
               for n, m in masks.items())
    with tempfile.TemporaryDirectory() as d:
        path = save_quant_state(pipe, f"{d}/ada.safetensors")
        dequantize_pipeline(pipe)
        load_quant_state(pipe, path)
        loaded = _masks(pipe)
        assert loaded.keys() == masks.keys() and all(torch.equal(loaded[k], masks[k]) for k in masks)
        assert torch.equal(_latents(pipe), lat)  # bit-identical images from the state file
    dequantize_pipeline(pipe)
    # deterministic: the same calibration again, nothing remembered, gives the same masks
    observation_memo.clear()
    weight_memo.clear_weight_memo()
    quantize_pipeline(pipe, recipe, PROMPTS, S, 0, progress=False)
    again = _masks(pipe)
    assert all(torch.equal(again[k], masks[k]) for k in masks)
    dequantize_pipeline(pipe)
    # W4A6 observes the same inputs: observation and every layer's rounding are reused, same masks
    rep6 = quantize_pipeline(pipe, get_preset("baseline-w4a6-adaround").replace(weights={"adaround": QUICK}),
                             PROMPTS, S, 0, progress=False)
    assert rep6.calibration["observation_reused"] is True
    assert weight_memo.weight_memo_info()["rounding_hits"] >= len(masks)
    six = _masks(pipe)
    assert all(torch.equal(six[k], masks[k]) for k in masks)


def test_nearest_and_adaround_observations_are_kept_apart(pipe):
    observation_memo.clear()
    quantize_pipeline(pipe, get_preset("baseline-w4a8"), PROMPTS, S, 0, progress=False)
    dequantize_pipeline(pipe)
    rep = quantize_pipeline(pipe, get_preset("baseline-w4a8-adaround").replace(weights={"adaround": QUICK}),
                            PROMPTS, S, 0, progress=False)
    assert rep.calibration["observation_reused"] is False  # the nearest pass sampled no inputs
    dequantize_pipeline(pipe)
    rep = quantize_pipeline(pipe, get_preset("baseline-w4a8-adaround").replace(weights={"adaround": {**QUICK, "seed": 1}}),
                            PROMPTS, S, 0, progress=False)
    assert rep.calibration["observation_reused"] is False  # another sample seed: other rows


def test_weight_only_adaround_calibrates_and_a_state_without_masks_is_refused(pipe):
    recipe = QuantRecipe(name="w4-ada", weights={"bits": 4, "rounding": "adaround", "adaround": QUICK})
    rep = quantize_pipeline(pipe, recipe, PROMPTS, S, 0, progress=False)
    assert rep.calibration["weight_rounding"]["layers"] > 0
    with tempfile.TemporaryDirectory() as d:
        save_quant_state(pipe, f"{d}/a.safetensors")
        dequantize_pipeline(pipe)
        quantize_pipeline(pipe, QuantRecipe(name="w4", weights={"bits": 4}), [], S, 0, progress=False)
        nearest = save_quant_state(pipe, f"{d}/n.safetensors")
        dequantize_pipeline(pipe)
        # a nearest state relabelled as AdaRound (hash recomputed): the masks it lacks are named
        with safe_open(str(nearest), framework="pt") as f:
            meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
        meta["recipe"] = recipe.to_json()
        meta["content_hash"] = content_hash(tensors, meta)
        save_file(tensors, f"{d}/m.safetensors", metadata=meta)
        with pytest.raises(QuantStateError, match=r"weight\.round_up' is missing"):
            load_quant_state(pipe, f"{d}/m.safetensors")


def test_each_unet_call_is_sampled_once_whatever_the_upstream(pipe):
    base = get_preset("baseline-w4a8-adaround").replace(weights={"adaround": QUICK})
    seen = {}
    for upstream in ("fp", "per_tensor_quantized"):
        recipe = base.replace(name=f"b-{upstream}", activations={"calibration_upstream": upstream})
        rep = quantize_pipeline(pipe, recipe, PROMPTS, S, 0, progress=False)
        seen[upstream] = {n: d["seen"] for n, d in rep.calibration["weight_rounding"]["per_layer"].items()}
        dequantize_pipeline(pipe)
    # the official passes run the UNet 2-3 times per call; only the observing forward is sampled
    assert seen["fp"] == seen["per_tensor_quantized"] and all(v > 0 for v in seen["fp"].values())


# ----------------------------------------------------------------------------------------------------------
# block-wise (BRECQ-style) reconstruction: AdaRoundConfig.granularity="block"
# ----------------------------------------------------------------------------------------------------------
BLOCK = {**QUICK, "iters": 40, "granularity": "block", "block_calls": 4}


def _block_run(pipe, **ada):
    observation_memo.clear()
    weight_memo.clear_weight_memo()
    recipe = get_preset("baseline-w4a8-adaround").replace(weights={"adaround": {**BLOCK, **ada}})
    return quantize_pipeline(pipe, recipe, PROMPTS, S, 0, progress=False).calibration["weight_rounding"]


def test_block_rounding_lowers_the_block_loss_stays_within_one_step_and_is_deterministic(pipe):
    wr = _block_run(pipe, keep_better=False)  # the learned rounding whatever its loss: the loss itself must drop
    qs = get_quant_state(pipe)
    assert wr["granularity"] == "block" and wr["blocks"] > 0 and wr["block_layers"] > 0
    # every quantized layer is rounded exactly once: inside a block, or layer-wise outside every block
    assert wr["block_layers"] + wr["layers"] == len(qs.layers)
    assert not set(wr["per_layer"]) & {n for n in qs.layers if any(n.startswith(b + ".") for b in wr["per_block"])}
    for b, d in wr["per_block"].items():
        assert 1 <= d["calls"] <= 4 and d["seen"] >= d["calls"]
    assert wr["block_loss_adaround"] < wr["block_loss_nearest"]  # summed over blocks, vs nearest on the same calls
    assert sum(d["loss_adaround"] < d["loss_nearest"] for d in wr["per_block"].values()) > len(wr["per_block"]) / 2
    masks = _masks(pipe)
    assert len(masks) == len(qs.layers)
    flipped = 0
    for n, layer in qs.layers.items():
        assert layer.soft_weight is None  # the optimisation's soft weights are gone
        w, s = layer.weight.detach(), layer.weight_scale
        near = fake_quant_rounded(w, s, layer.weight_zp, layer.weight_bits, nearest_round_up(w, s.expand(w.shape)),
                                  symmetric=layer.weight_symmetric)
        step = (layer.weight_fq - near).abs() / s.expand(w.shape)
        assert float(step.max()) <= 1.0 + 1e-4, n  # within one grid step of nearest
        flipped += int((step > 0.5).sum())
    assert flipped > 0
    dequantize_pipeline(pipe)
    again = _block_run(pipe, keep_better=False)
    assert again["per_block"] == wr["per_block"]
    got = _masks(pipe)
    assert all(torch.equal(got[k], masks[k]) for k in masks)  # same seed: bit-identical rounding


def test_block_and_layer_granularity_are_kept_apart_and_keep_better_guards(pipe):
    layer = _block_run(pipe, granularity="layer")
    dequantize_pipeline(pipe)
    observation_memo.clear()
    wr = _block_run(pipe)  # keep_better=True: never worse than nearest on the block's calls
    assert layer["blocks"] == 0 and wr["blocks"] > 0
    for d in wr["per_block"].values():
        assert d["loss_adaround"] <= d["loss_nearest"]
        if d["kept_nearest"]:
            assert d["flipped"] == 0


def test_int8_conversion_leaves_learned_rounding_to_fake_quant():
    from types import SimpleNamespace

    from dgq_utils.quantize.int8 import fallback_reason

    layer = SimpleNamespace(act=SimpleNamespace(params={0: None}, info={}), weight_quantized=True, weight_bits=8,
                            weight_round_up=torch.ones(2, 2, dtype=torch.bool))
    assert "AdaRound" in fallback_reason(layer, get_preset("baseline-w8a8"))  # its int8 codes would round to nearest
