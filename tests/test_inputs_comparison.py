"""run_comparison and run_paper_protocol: bad inputs are refused before any model is loaded or image made,
naming the argument (a prompt list given as one string was the silent-wrong case)."""
from __future__ import annotations

import pytest

from dgq_utils.config.validation import InvalidArgumentError
from dgq_utils.evaluate.compare import run_comparison
from dgq_utils.evaluate.protocol import run_paper_protocol

PROMPTS = ["a red circle", "a blue square"]
CALIB = ["a green cross"]


def no_model():
    raise AssertionError("no model may be loaded for bad input")


def _compare(tmp_path, **kw):
    args = dict(recipes=["dgq-w8a8"], prompts=PROMPTS, seeds=[0], calibration_prompts=CALIB, metrics=["psnr"])
    args.update(kw)
    return run_comparison(no_model, out_dir=tmp_path / "out", **args)


@pytest.mark.parametrize("kw,pattern", [
    ({"prompts": "a small red circle"}, "^prompts: .*not a single string"),
    ({"calibration_prompts": "a green cross"}, "^calibration_prompts: .*not a single string"),
    ({"prompts": None}, "^prompts: got None"),
    ({"prompts": [1, 2]}, "^prompts: .*item 0"),
    ({"seeds": "0"}, "^seeds: got str"),
    ({"seeds": [0, 0]}, "^seeds: .*duplicate"),
    ({"seeds": None}, "^seeds: got None"),
    ({"recipes": "dgq-w8a8"}, "^recipes: .*wrap it"),
    ({"n_boot": 0}, "^n_boot: got int"),
    ({"n_boot_set": "many"}, "^n_boot_set: got str"),
    ({"ci_level": 95}, "^ci_level: got int"),
    ({"seed": -1}, "^seed: got int"),
    ({"device": "gpu"}, "^device: got str"),
    ({"settings": {"num_inference_steps": 2}}, "^settings: got dict"),
])
def test_run_comparison_bad_inputs(tmp_path, kw, pattern):
    with pytest.raises(InvalidArgumentError, match=pattern):
        _compare(tmp_path, **kw)
    assert not (tmp_path / "out" / "images").exists()


def _protocol(tmp_path, **kw):
    # the files do not exist: every check below must fire before any file is opened
    args = dict(recipes=["dgq-w8a8"], device="cpu", pipe_factory=no_model, progress=False)
    args.update(kw)
    return run_paper_protocol(None, tmp_path / "metadata.csv", tmp_path / "real.npz", None, "ViT-g-14", None,
                              tmp_path / "out", **args)


@pytest.mark.parametrize("kw,pattern", [
    ({"n_images": 0}, "^n_images: got int"),
    ({"n_clip": "3000"}, "^n_clip: got str"),
    ({"resize": -1}, "^resize: got int"),
    ({"n_calibration": 0}, "^n_calibration: got int"),
    ({"recipes": "dgq-w8a8"}, "^recipes: .*wrap it"),
    ({"num_inference_steps": 0}, "^num_inference_steps: got int"),
    ({"height": 500}, "^height: got int"),
    ({"batch_size": 0}, "^batch_size: got int"),
    ({"image_format": "gif"}, "^image_format: got str"),
    ({"seed": "42"}, "^seed: got str"),
    ({"n_boot": 0}, "^n_boot: got int"),
    ({"device": "tpu"}, "^device: got str"),
])
def test_run_paper_protocol_bad_inputs(tmp_path, kw, pattern):
    with pytest.raises(InvalidArgumentError, match=pattern):
        _protocol(tmp_path, **kw)
    assert not (tmp_path / "out").exists()
