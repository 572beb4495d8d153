"""The validation layer itself (dgq_utils.config.validation): what each check accepts, refuses, and that every
message names the argument, what was given, what is allowed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dgq_utils.config import validation as V


def refused(fn, *args, name, **kw):
    with pytest.raises(V.InvalidArgumentError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert msg.startswith(f"{name}: got "), msg
    assert "allowed:" in msg, msg
    return msg


def test_error_is_both_value_and_type_error():
    assert issubclass(V.InvalidArgumentError, ValueError) and issubclass(V.InvalidArgumentError, TypeError)


def test_prompts():
    assert V.check_prompts(("a", "b")) == ["a", "b"]
    assert V.check_prompts(p for p in ["x"]) == ["x"]
    assert V.check_prompts([], allow_empty=True) == []
    msg = refused(V.check_prompts, "a small red circle", name="prompts")
    assert "wrap it: ['a small red circle']" in msg and "one-character prompts" in msg
    refused(V.check_prompts, None, name="prompts")
    refused(V.check_prompts, 3, name="prompts")
    msg = refused(V.check_prompts, ["ok", 5, None], "calibration_prompts", name="calibration_prompts")
    assert "item 1" in msg and "1 more" in msg
    assert "prompt list is empty" in refused(V.check_prompts, [], name="prompts")


def test_seeds():
    assert V.check_seeds(3) == [3] and V.check_seeds([np.int64(2), 0]) == [2, 0]
    for bad in (None, "0", [], [1.5], [-1], [True], [1, 1]):
        refused(V.check_seeds, bad, name="seeds")
    assert "duplicate seeds [1]" in refused(V.check_seeds, [1, 1, 2], name="seeds")
    refused(V.check_seed, -3, name="seed")
    refused(V.check_seed, "0", name="seed")


@pytest.mark.parametrize("bad", [0, -1, "abc", "25", 2.5, None, True, float("nan")])
def test_counts(bad):
    refused(V.check_steps, bad, name="num_inference_steps")
    refused(V.check_batch_size, bad, name="batch_size")


def test_counts_accept_integral_numbers():
    assert V.check_steps(np.int32(4)) == 4 and V.check_steps(8.0) == 8
    assert V.check_count(0, "n_show", 0) == 0
    refused(V.check_count, 17, "bits", 2, 16, name="bits")


def test_sizes_numbers_choices():
    assert V.check_size(None, "height") is None and V.check_size(64, "width") == 64
    for bad in (0, 30, -8, "64", 63.5):
        assert "multiple of 8" in refused(V.check_size, bad, "height", name="height")
    assert V.check_number(7, "guidance_scale") == 7.0
    for bad in ("x", float("inf"), None, True):
        refused(V.check_number, bad, "guidance_scale", name="guidance_scale")
    refused(V.check_number, 2.0, "ci_level", maximum=0.999, name="ci_level")
    assert "'png', 'jpg'" in refused(V.check_choice, "webp", "image_format", ("png", "jpg"), name="image_format")
    refused(V.check_recipes, "dgq-w8a8", name="recipes")
    assert V.check_recipes(("dgq-w8a8",)) == ["dgq-w8a8"]


def test_sampling_names_each_argument():
    for kw, name in [({"num_inference_steps": 0}, "num_inference_steps"), ({"guidance_scale": "7"}, "guidance_scale"),
                     ({"seed": -1}, "seed"), ({"batch_size": 0}, "batch_size"), ({"height": 31}, "height"),
                     ({"width": 0}, "width")]:
        refused(V.check_sampling, name=name, **kw)


def test_device_and_dtype():
    assert V.check_device("cpu") == torch.device("cpu")
    refused(V.check_device, "gpu", name="device")
    refused(V.check_device, 3.5, name="device")
    if not torch.cuda.is_available():
        assert "no usable CUDA" in refused(V.check_device, "cuda", name="device")
    assert V.check_dtype("fp16") is torch.float16 and V.check_dtype(torch.bfloat16) is torch.bfloat16
    assert V.check_dtype("torch.float32") is torch.float32
    refused(V.check_dtype, torch.int8, name="dtype")
    refused(V.check_dtype, "float8", name="dtype")
