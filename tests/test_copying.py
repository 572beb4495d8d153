"""``pipeline_with_unet``: a second pipeline around another UNet that shares the rest of the first and casts
nothing (diffusers' ``from_pipe`` casts the shared modules to float32 unless told a dtype)."""
from __future__ import annotations

import copy

import pytest
import torch

from dgq_utils.model.copying import pipeline_with_unet
from dgq_utils.testing.families import build_tiny_sdxl_pipeline
from dgq_utils.testing.tiny import build_tiny_pipeline


@pytest.mark.parametrize("build", [build_tiny_pipeline, lambda: build_tiny_sdxl_pipeline(turbo=True)],
                         ids=["sd1", "sdxl-turbo"])
def test_shares_everything_but_the_unet_and_scheduler_and_casts_nothing(build):
    pipe = build().to(torch.float16)
    unet = copy.deepcopy(pipe.unet)
    new = pipeline_with_unet(pipe, unet)
    assert type(new) is type(pipe) and new.unet is unet
    for name, comp in pipe.components.items():
        if name == "scheduler":
            assert new.scheduler is not comp and new.scheduler.config == comp.config
        elif name != "unet":
            assert new.components[name] is comp, name
    assert all(p.dtype == torch.float16 for m in (pipe.vae, pipe.unet, new.unet) for p in m.parameters())
    flags = {k: v for k, v in pipe.config.items() if not k.startswith("_") and k not in pipe.components}
    assert {k: new.config[k] for k in flags} == flags
