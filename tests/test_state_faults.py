"""Fault tests for saved quantization states: every corrupted, edited, truncated, foreign or mismatched file is
refused with a QuantStateError naming the file (and, where it applies, the layer / tensor), never loaded."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import STEPS, generate
from safetensors import safe_open
from safetensors.torch import save

from dgq_utils.config import SamplerSettings
from dgq_utils.quantize.pipeline import is_quantized, quantize_pipeline
from dgq_utils.quantize.state import (
    QuantStateError,
    content_hash,
    load_quant_state,
    save_quant_state,
)
from dgq_utils.testing.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def state_file(tiny_pipe, calib_prompts, tmp_path_factory):
    from dgq_utils.quantize.pipeline import dequantize_pipeline

    dequantize_pipeline(tiny_pipe)
    quantize_pipeline(tiny_pipe, "dgq-w8a6", calib_prompts, sampler=SamplerSettings(num_inference_steps=STEPS), progress=False)
    try:
        path = save_quant_state(tiny_pipe, tmp_path_factory.mktemp("faults") / "state.safetensors")
        latents = generate(tiny_pipe)
    finally:
        dequantize_pipeline(tiny_pipe)
    return path, latents


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def write(path, tensors, meta, rehash=False):
    meta = dict(meta)
    if rehash:
        meta["content_hash"] = content_hash(tensors, meta)
    path.write_bytes(save(tensors, metadata=meta))
    return path


def refused(pipe, path, *patterns):
    with pytest.raises(QuantStateError) as info:
        load_quant_state(pipe, path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for p in patterns:
        assert p in msg, (p, msg)
    assert not is_quantized(pipe)
    return msg


def test_intact_file_loads_and_reproduces(pipe, state_file):
    load_quant_state(pipe, state_file[0])
    assert torch.equal(generate(pipe), state_file[1])


def test_flipped_bytes_in_tensor_data(pipe, state_file, tmp_path):
    data = bytearray(state_file[0].read_bytes())
    header = int.from_bytes(data[:8], "little") + 8
    for i in range(header + 100, len(data), max(1, (len(data) - header) // 300)):
        data[i] ^= 0x5A
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    refused(pipe, bad, "content hash does not match")


def test_single_flipped_bit(pipe, state_file, tmp_path):
    data = bytearray(state_file[0].read_bytes())
    data[-5] ^= 0x01
    bad = tmp_path / "bit.safetensors"
    bad.write_bytes(bytes(data))
    refused(pipe, bad, "content hash")


@pytest.mark.parametrize("keep", [0.3, 0.99, 0.0001])
def test_truncated_file_names_the_file(pipe, state_file, tmp_path, keep):
    data = state_file[0].read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: max(1, int(len(data) * keep))])
    refused(pipe, bad, "cannot be read as a safetensors file")


def test_tensor_removed_names_the_tensor(pipe, state_file, tmp_path):
    meta, tensors = read(state_file[0])
    gone = next(k for k in sorted(tensors) if k.endswith(".set1.ids"))
    del tensors[gone]
    refused(pipe, write(tmp_path / "stale.safetensors", tensors, meta), "content hash", gone)
    refused(pipe, write(tmp_path / "rehashed.safetensors", tensors, meta, rehash=True), gone, "missing")


def test_foreign_tensor_added(pipe, state_file, tmp_path):
    meta, tensors = read(state_file[0])
    tensors["something.else"] = torch.zeros(3)
    refused(pipe, write(tmp_path / "extra.safetensors", tensors, meta, rehash=True), "'something.else'")


def test_recipe_bits_edited(pipe, state_file, tmp_path):
    meta, tensors = read(state_file[0])
    recipe = json.loads(meta["recipe"])
    assert recipe["weights"]["bits"] == 8
    recipe["weights"]["bits"] = 4
    meta["recipe"] = json.dumps(recipe)
    refused(pipe, write(tmp_path / "edited.safetensors", tensors, meta), "content hash", "weights.bits=4")
    # a forger who also recomputes the hash is still caught by the recipe-vs-parameters check
    refused(pipe, write(tmp_path / "forged.safetensors", tensors, meta, rehash=True), "8-bit grid", "weights.bits=4")


def test_recipe_groups_and_timesteps_edited(pipe, state_file, tmp_path):
    meta, tensors = read(state_file[0])
    recipe = json.loads(meta["recipe"])
    recipe["activations"]["num_groups"] = 4
    recipe["per_timestep"] = False
    meta["recipe"] = json.dumps(recipe)
    msg = refused(pipe, write(tmp_path / "k.safetensors", tensors, meta, rehash=True), "num_groups=4", "mapping")
    assert "quantizer '" in msg                   # names the layer's quantizer


def test_group_ids_out_of_range(pipe, state_file, tmp_path):
    meta, tensors = read(state_file[0])
    key = next(k for k in sorted(tensors) if k.endswith(".ids"))
    tensors[key] = tensors[key] + 100
    bad = write(tmp_path / "ids.safetensors", tensors, meta, rehash=True)
    refused(pipe, bad, "group ids", key.rsplit(".set", 1)[0])


def test_recipe_json_cut_short(pipe, state_file, tmp_path):
    meta, tensors = read(state_file[0])
    meta["recipe"] = meta["recipe"][: len(meta["recipe"]) // 2]
    refused(pipe, write(tmp_path / "cut.safetensors", tensors, meta), "recipe cannot be read")
    meta, tensors = read(state_file[0])
    meta["quantizers"] = meta["quantizers"][:-7]
    refused(pipe, write(tmp_path / "cutq.safetensors", tensors, meta), "'quantizers' is not valid JSON")


def test_foreign_and_old_files(pipe, state_file, tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("these are not tensors")
    refused(pipe, text, "cannot be read")
    other = write(tmp_path / "weights.safetensors", {"w": torch.ones(2)}, {})
    refused(pipe, other, "not a DGQ quantization state")
    meta, tensors = read(state_file[0])
    meta["format"] = "dgq-quant-state/1"
    refused(pipe, write(tmp_path / "old.safetensors", tensors, meta), "old format", "recalibrate")
    meta, tensors = read(state_file[0])
    del meta["content_hash"]
    refused(pipe, write(tmp_path / "nohash.safetensors", tensors, meta), "content_hash")


def test_other_attention_layout_with_equal_shapes_is_refused(state_file):
    other = build_tiny_pipeline(seed=0, attention_heads=4)    # same weight shapes, 4 heads of 8 instead of 2 of 16
    msg = refused(other, state_file[0], "heads: the file has 2, this pipeline has 4",
                  "head_dim: the file has 16, this pipeline has 8")
    assert "attention 'down_blocks.0.attentions.0.transformer_blocks.0.attn1'" in msg


def test_other_sample_size_is_refused(state_file):
    other = build_tiny_pipeline(seed=0, sample_size=16)
    refused(other, state_file[0], "sample_size: the file has 8, this pipeline has 16")
