"""Tests for dgq_utils.config: recipe dataclasses, validation, serialisation, presets, hashing."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgq_utils.config import (
    PRESETS,
    ActQuantConfig,
    AttentionQuantConfig,
    QuantRecipe,
    WeightQuantConfig,
    get_preset,
    list_presets,
    recipe_hash,
)

REQUIRED_PRESETS = [
    "fp",
    "baseline-w8a8",
    "baseline-w8a6",
    "baseline-w4a8",
    "dgq-w8a8",
    "dgq-w8a6",
    "dgq-w4a8",
    "dgq-w4a6",
    "dgq-w8a8-g8",
]


# ----------------------------------------------------------------------------------------------------------
# presets and serialisation
# ----------------------------------------------------------------------------------------------------------
def test_required_presets_exist():
    names = list_presets()
    for n in REQUIRED_PRESETS:
        assert n in names
    assert names == list(PRESETS)
    assert all(get_preset(n).name == n for n in names)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_round_trips_exactly(name):
    r = get_preset(name)
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d  # JSON-serialisable, nothing lost
    assert QuantRecipe.from_dict(d) == r
    assert QuantRecipe.from_dict(d).to_dict() == d
    assert QuantRecipe.from_json(r.to_json()) == r
    assert QuantRecipe.from_json(r.to_json(indent=2)) == r


def test_dict_layout_is_nested_and_plain():
    d = get_preset("dgq-w8a6").to_dict()
    assert d["activations"]["num_groups"] == 16
    assert isinstance(d["skip_layers"], list)
    assert get_preset("fp").to_dict()["weights"] is None


def test_from_dict_accepts_partial_dicts_and_lists():
    r = QuantRecipe.from_dict({"name": "x", "weights": {"bits": 4}, "skip_layers": ["conv_in"]})
    assert r.weights == WeightQuantConfig(bits=4)
    assert r.skip_layers == ("conv_in",)
    assert r.activations is None


def test_from_dict_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown key\(s\) for QuantRecipe: 'wieghts'.*Did you mean 'weights'"):
        QuantRecipe.from_dict({"wieghts": None})
    with pytest.raises(ValueError, match=r"ActQuantConfig: 'groups', 'foo'"):
        QuantRecipe.from_dict({"activations": {"groups": 8, "foo": 1}})


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 16),
    granularity=st.sampled_from(ActQuantConfig.GRANULARITIES),
    num_groups=st.integers(1, 64),
    axis=st.sampled_from(ActQuantConfig.AXES),
    rule=st.sampled_from(ActQuantConfig.AXIS_RULES),
    grouping=st.sampled_from(ActQuantConfig.GROUPINGS),
    inc0=st.booleans(),
    est=st.sampled_from(ActQuantConfig.RANGE_ESTIMATORS),
    mom=st.floats(0.0, 0.999),
    layout=st.sampled_from(ActQuantConfig.CONV_INPUT_LAYOUTS),
    upstream=st.sampled_from(ActQuantConfig.CALIBRATION_UPSTREAMS),
    att_bits=st.one_of(st.none(), st.integers(2, 16)),
    scale=st.sampled_from(AttentionQuantConfig.SCALES),
    per_timestep=st.booleans(),
    skip=st.lists(st.text("abcdefgh_.*", min_size=1, max_size=8), max_size=3),
)
def test_random_recipes_round_trip(bits, granularity, num_groups, axis, rule, grouping, inc0, est, mom, layout,
                                   upstream, att_bits, scale, per_timestep, skip):
    r = QuantRecipe(
        name="r",
        weights=WeightQuantConfig(bits=max(2, bits // 2)),
        activations=ActQuantConfig(bits=bits, granularity=granularity, num_groups=num_groups, axis=axis,
                                   axis_rule=rule, grouping=grouping, group_range_includes_zero=inc0,
                                   range_estimator=est, ema_momentum=mom, conv_input_layout=layout,
                                   calibration_upstream=upstream),
        attention=AttentionQuantConfig(bits=att_bits, scale=scale),
        skip_layers=tuple(skip),
        per_timestep=per_timestep,
    )
    assert QuantRecipe.from_json(r.to_json()) == r
    assert recipe_hash(QuantRecipe.from_json(r.to_json())) == recipe_hash(r)


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 17, 0, 8.5, True])
@pytest.mark.parametrize("cls", [WeightQuantConfig, ActQuantConfig, AttentionQuantConfig])
def test_bits_validation(cls, bits):
    with pytest.raises(ValueError, match=rf"{cls.__name__}.bits must be an integer in \[2, 16\]; got"):
        cls(bits=bits)


@pytest.mark.parametrize("n", [0, -3, 2.0])
def test_num_groups_validation(n):
    with pytest.raises(ValueError, match=r"num_groups must be an integer >= 1.*Use 16 or 8"):
        ActQuantConfig(num_groups=n)


@pytest.mark.parametrize(
    "cls, field, bad, hint",
    [
        (WeightQuantConfig, "granularity", "per_chanel", "per_channel"),
        (WeightQuantConfig, "range_method", "MSE", "mse"),
        (ActQuantConfig, "grouping", "kmean", "kmeans"),
        (ActQuantConfig, "axis", "channels", "channel"),
        (ActQuantConfig, "range_estimator", "emma", "ema"),
        (ActQuantConfig, "conv_input_layout", "unfolded", "unfold"),
        (ActQuantConfig, "calibration_upstream", "FP", "fp"),
        (AttentionQuantConfig, "quantizer", "log", "log2"),
        (AttentionQuantConfig, "scale", "per-prompt", "per_prompt"),
        (AttentionQuantConfig, "apply_to", "crossattn", "cross"),
        (AttentionQuantConfig, "start_in", "both_", "both"),
        (QuantRecipe, "timestep_mapping", "exactly", "exact"),
    ],
)
def test_unknown_option_strings(cls, field, bad, hint):
    pattern = rf"{cls.__name__}\.{field} must be one of .*got '{bad}'\. Did you mean '{hint}'"
    with pytest.raises(ValueError, match=pattern):
        cls(**{field: bad})


def test_other_validation_messages():
    with pytest.raises(ValueError, match="set axis='channel' instead"):
        ActQuantConfig(axis_rule="channel")
    with pytest.raises(ValueError, match=r"ema_momentum must be a number in \[0, 1\)"):
        ActQuantConfig(ema_momentum=1.0)
    with pytest.raises(ValueError, match="must be True or False"):
        WeightQuantConfig(symmetric="yes")
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        ActQuantConfig(seed=-1)
    with pytest.raises(ValueError, match="skip_layers must be a list/tuple"):
        QuantRecipe(skip_layers="conv_in")
    with pytest.raises(ValueError, match="activations is None"):
        QuantRecipe(attention=AttentionQuantConfig())
    with pytest.raises(ValueError, match="must be a WeightQuantConfig"):
        QuantRecipe(weights=ActQuantConfig())
    # explicit attention bits without activations is fine
    assert QuantRecipe(attention=AttentionQuantConfig(bits=8)).softmax_bits == 8


def test_configs_are_frozen():
    r = get_preset("dgq-w8a8")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.name = "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.activations.bits = 4


def test_unknown_preset_suggests_close_match():
    with pytest.raises(ValueError, match=r"unknown preset 'dgq-w8a7'; choose one of: fp, .*Did you mean 'dgq-w8a8'"):
        get_preset("dgq-w8a7")
    with pytest.raises(ValueError, match="unknown preset 'zzz'; choose one of"):
        get_preset("zzz")


# ----------------------------------------------------------------------------------------------------------
# replace / properties / preset contents
# ----------------------------------------------------------------------------------------------------------
def test_replace_flat_and_nested():
    r = get_preset("dgq-w8a6")
    r2 = r.replace(name="dgq-contig", activations={"grouping": "contiguous"})
    assert r2.activations.grouping == "contiguous" and r2.activations.num_groups == 16
    assert r.activations.grouping == "kmeans"  # original untouched
    assert r.replace(attention=None).attention is None
    r3 = get_preset("fp").replace(weights={"bits": 4})
    assert r3.weights == WeightQuantConfig(bits=4)
    assert r.activations.replace(num_groups=8).num_groups == 8
    with pytest.raises(ValueError, match=r"unknown field\(s\) 'num_group'.*Did you mean 'num_groups'"):
        r.activations.replace(num_group=8)
    with pytest.raises(ValueError, match="num_groups must be an integer >= 1"):
        r.replace(activations={"num_groups": 0})


def test_properties():
    assert get_preset("fp").is_fp and get_preset("fp").softmax_bits is None and get_preset("fp").tag == "FP"
    r = get_preset("dgq-w4a6")
    assert not r.is_fp and r.softmax_bits == 6 and r.tag == "W4A6"
    assert "16 kmeans groups" in r.summary()
    assert r.replace(attention={"bits": 8}).softmax_bits == 8
    assert QuantRecipe(attention=AttentionQuantConfig(enabled=False)).is_fp
    att = AttentionQuantConfig()
    assert att.applies_to("self") and att.applies_to("cross")
    assert att.start_fp_in("cross") and not att.start_fp_in("self")
    assert att.replace(start_in="both").start_fp_in("self")
    assert not att.replace(apply_to="cross").applies_to("self")
    assert ActQuantConfig(granularity="per_tensor").effective_num_groups == 1


@pytest.mark.parametrize("wa", ["w8a8", "w8a6", "w4a8", "w4a6"])
def test_preset_contents(wa):
    w, a = int(wa[1]), int(wa[3])
    b = get_preset(f"baseline-{wa}")
    assert b.weights == WeightQuantConfig(bits=w, granularity="per_channel", range_method="mse")
    assert b.activations.granularity == "per_tensor" and b.activations.range_estimator == "ema"
    assert b.activations.bits == a and b.activations.ema_momentum == 0.95
    assert b.attention.quantizer == "uniform" and b.softmax_bits == a
    assert not b.attention.keep_start_fp and not b.attention.keep_start_key_fp
    assert b.per_timestep and not get_preset(f"baseline-{wa}-shared").per_timestep
    d = get_preset(f"dgq-{wa}")
    assert d.weights.bits == w and d.weights.range_method == "mse"
    act = d.activations
    assert (act.bits, act.granularity, act.num_groups, act.grouping, act.axis, act.axis_rule) == (
        a, "group", 16, "kmeans", "auto", "official_spread")
    assert not act.group_range_includes_zero and act.range_estimator == "minmax"
    att = d.attention
    assert (att.quantizer, att.scale, att.keep_start_fp, att.start_in, att.apply_to) == (
        "log2", "per_prompt", True, "cross", "both")
    assert d.per_timestep and d.skip_layers == ("conv_in", "conv_out")
    assert get_preset(f"dgq-{wa}-g8").activations.num_groups == 8
    o = get_preset(f"dgq-official-{wa}")
    assert o.activations.conv_input_layout == "unfold"
    assert o.activations.calibration_upstream == "per_tensor_quantized"
    assert o.attention.scale == "batch" and not o.attention.zero_level and o.timestep_mapping == "official"


# ----------------------------------------------------------------------------------------------------------
# hashing
# ----------------------------------------------------------------------------------------------------------
def test_recipe_hash_stable_and_distinct():
    hashes = {n: recipe_hash(get_preset(n)) for n in list_presets()}
    assert len(set(hashes.values())) == len(hashes)
    assert all(len(h) == 12 and int(h, 16) >= 0 for h in hashes.values())
    # content-hash variant is distinct across presets too (presets differ in content, not only in name)
    assert len({recipe_hash(get_preset(n), include_name=False) for n in list_presets()}) == len(hashes)
    for n in list_presets():
        r = get_preset(n)
        # independent of dict key order and of how the recipe was built
        d = r.to_dict()
        keys = list(d)
        random.Random(0).shuffle(keys)
        assert recipe_hash(QuantRecipe.from_dict({k: d[k] for k in keys})) == hashes[n]
    renamed = get_preset("dgq-w8a8").replace(name="other")
    assert recipe_hash(renamed) != hashes["dgq-w8a8"]
    assert recipe_hash(renamed, include_name=False) == recipe_hash(get_preset("dgq-w8a8"), include_name=False)
    assert recipe_hash(get_preset("dgq-w8a8").replace(activations={"seed": 1})) != hashes["dgq-w8a8"]
