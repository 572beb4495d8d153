"""generate_images and SamplerSettings: bad inputs are refused before any image is made, naming the argument."""
from __future__ import annotations

import pytest

from dgq_utils.config import SamplerSettings
from dgq_utils.config.validation import InvalidArgumentError
from dgq_utils.generate.images import generate_images
from dgq_utils.testing.tiny import TINY_PROMPTS

SETTINGS = SamplerSettings(num_inference_steps=2, batch_size=2)


@pytest.mark.parametrize("prompts,why", [("a small red circle", "not a single string"), (None, "got None"),
                                         ([None], "item 0"), ([], "prompt list is empty"), (7, "got int")])
def test_bad_prompts(pipe, tmp_path, prompts, why):
    with pytest.raises(InvalidArgumentError, match=f"^prompts: .*{why}"):
        generate_images(pipe, prompts, [0], tmp_path, settings=SETTINGS, progress=False)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("seeds,why", [(None, "got None"), ("0", "got str"), ([], "seed list is empty"),
                                       ([0, 0], "duplicate seeds"), ([-1], "integer >= 0"), ([0.5], "integer")])
def test_bad_seeds(pipe, tmp_path, seeds, why):
    with pytest.raises(InvalidArgumentError, match=f"^seeds: .*{why}"):
        generate_images(pipe, list(TINY_PROMPTS[:1]), seeds, tmp_path, settings=SETTINGS, progress=False)
    assert not any(tmp_path.iterdir())


def test_bad_settings(pipe, tmp_path):
    with pytest.raises(InvalidArgumentError, match="^settings: got dict"):
        generate_images(pipe, list(TINY_PROMPTS[:1]), [0], tmp_path, settings={"num_inference_steps": 2})


@pytest.mark.parametrize("kw,name", [({"num_inference_steps": 0}, "num_inference_steps"),
                                     ({"num_inference_steps": "abc"}, "num_inference_steps"),
                                     ({"guidance_scale": None}, "guidance_scale"), ({"height": 30}, "height"),
                                     ({"width": 0}, "width"), ({"batch_size": 0}, "batch_size"),
                                     ({"batch_size": 1.5}, "batch_size"), ({"eta": 2.0}, "eta"),
                                     ({"negative_prompt": ["x"]}, "negative_prompt"),
                                     ({"image_format": "webp"}, "image_format")])
def test_sampler_settings(kw, name):
    with pytest.raises(InvalidArgumentError, match=f"^{name}: got"):
        SamplerSettings(**kw)


def test_sampler_settings_defaults_still_fine():
    s = SamplerSettings(num_inference_steps=8, guidance_scale=1, height=64, width=64)
    assert s.num_inference_steps == 8 and s.guidance_scale == 1
