"""run_comparison and run_paper_protocol: bad inputs are refused before any model is loaded or image made,
naming the argument (a prompt list given as one string was the silent-wrong case). The configuration objects
(EvaluationSet, MetricsConfig, BootstrapConfig, ProtocolConfig, SamplerSettings) check their own fields, so the
message names the field of the object it was given to."""
from __future__ import annotations

import pytest

from dgq_utils.config import SamplerSettings
from dgq_utils.config.validation import InvalidArgumentError
from dgq_utils.evaluate.compare import run_comparison
from dgq_utils.evaluate.config import BootstrapConfig, EvaluationSet, MetricsConfig
from dgq_utils.evaluate.protocol import ProtocolConfig, ProtocolFiles, run_paper_protocol

PROMPTS = ["a red circle", "a blue square"]
CALIB = ["a green cross"]


def no_model():
    raise AssertionError("no model may be loaded for bad input")


def _compare(tmp_path, recipes=("dgq-w8a8",), prompts=PROMPTS, calibration=CALIB, seeds=(0,), bootstrap=None,
             device="cpu", sampler=None, data=None):
    data = data if data is not None else EvaluationSet(prompts, calibration, seeds)
    return run_comparison(no_model, recipes, data, tmp_path / "out", sampler=sampler,
                          metrics=MetricsConfig(["psnr"], device=device), bootstrap=BootstrapConfig(**(bootstrap or {})))


@pytest.mark.parametrize("kw,pattern", [
    ({"prompts": "a small red circle"}, "^prompts: .*not a single string"),
    ({"calibration": "a green cross"}, "^calibration: .*not a single string"),
    ({"prompts": None}, "^prompts: got None"),
    ({"prompts": [1, 2]}, "^prompts: .*item 0"),
    ({"seeds": "0"}, "^seeds: got str"),
    ({"seeds": [0, 0]}, "^seeds: .*duplicate"),
    ({"seeds": None}, "^seeds: got None"),
    ({"recipes": "dgq-w8a8"}, "^recipes: .*wrap it"),
    ({"bootstrap": {"n_boot": 0}}, "^n_boot: got int"),
    ({"bootstrap": {"n_set": "many"}}, "^n_set: got str"),
    ({"bootstrap": {"level": 95}}, "^level: got int"),
    ({"bootstrap": {"seed": -1}}, "^seed: got int"),
    ({"device": "gpu"}, "^device: got str"),
    ({"sampler": {"num_inference_steps": 2}}, "^sampler: got dict"),
    ({"data": (PROMPTS, CALIB)}, "^data: got tuple"),
])
def test_run_comparison_bad_inputs(tmp_path, kw, pattern):
    with pytest.raises(InvalidArgumentError, match=pattern):
        _compare(tmp_path, **kw)
    assert not (tmp_path / "out" / "images").exists()


def _protocol(tmp_path, recipes=("dgq-w8a8",), device="cpu", protocol=None, sampler=None, bootstrap=None):
    # the files do not exist: every check below must fire before any file is opened
    files = ProtocolFiles(tmp_path / "metadata.csv", tmp_path / "real.npz", None, "ViT-g-14", None)
    return run_paper_protocol(files, tmp_path / "out", recipes=recipes, protocol=ProtocolConfig(**(protocol or {})),
                              sampler=SamplerSettings(**(sampler or {})), bootstrap=BootstrapConfig(**(bootstrap or {})),
                              device=device, pipe_factory=no_model, progress=False)


@pytest.mark.parametrize("kw,pattern", [
    ({"protocol": {"n_images": 0}}, "^n_images: got int"),
    ({"protocol": {"n_clip": "3000"}}, "^n_clip: got str"),
    ({"protocol": {"resize": -1}}, "^resize: got int"),
    ({"protocol": {"n_calibration": 0}}, "^n_calibration: got int"),
    ({"recipes": "dgq-w8a8"}, "^recipes: .*wrap it"),
    ({"sampler": {"num_inference_steps": 0}}, "^num_inference_steps: got int"),
    ({"sampler": {"height": 500}}, "^height: got int"),
    ({"sampler": {"batch_size": 0}}, "^batch_size: got int"),
    ({"sampler": {"image_format": "gif"}}, "^image_format: got str"),
    ({"protocol": {"seed": "42"}}, "^seed: got str"),
    ({"bootstrap": {"n_boot": 0}}, "^n_boot: got int"),
    ({"device": "tpu"}, "^device: got str"),
])
def test_run_paper_protocol_bad_inputs(tmp_path, kw, pattern):
    with pytest.raises(InvalidArgumentError, match=pattern):
        _protocol(tmp_path, **kw)
    assert not (tmp_path / "out").exists()
