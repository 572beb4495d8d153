"""The quantized UNet under torch.compile: no graph breaks, one graph for every timestep, eager's outputs.

Dynamo's counters on the tiny UNet on the CPU (``aot_eager`` backend: dynamo + AOT autograd tracing without
inductor's code generation, so the test stays fast); the SD-scale inductor numbers are in
``benchmarks/bench_sd_scale.py``'s results.
"""
from __future__ import annotations

import pytest
import torch

from dgq_utils.config import SamplerSettings
from dgq_utils.model.timesteps import TimestepState, _HostTimesteps, _timestep_value
from dgq_utils.quantize.pipeline import quantize_pipeline

STEPS = 4


# the baseline's static softmax scale is the other per-set parameter a graph could specialise on
@pytest.mark.parametrize("preset", ["dgq-w8a8", pytest.param("baseline-w8a8", marks=pytest.mark.slow)])
def test_compiled_quantized_unet_has_no_graph_breaks_nor_recompiles(pipe, calib_prompts, preset):
    import torch._dynamo
    from torch._dynamo.utils import counters

    quantize_pipeline(pipe, preset, calib_prompts[:1], SamplerSettings(num_inference_steps=STEPS), progress=False)
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        pipe.scheduler.set_timesteps(STEPS)
        ref = [unet(x, t, encoder_hidden_states=ehs).sample for t in pipe.scheduler.timesteps]
        torch._dynamo.reset()
        counters.clear()
        cu = torch.compile(unet, backend="aot_eager", fullgraph=True)
        pipe.scheduler.set_timesteps(STEPS)
        out = [cu(x, t, encoder_hidden_states=ehs).sample for t in pipe.scheduler.timesteps]
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # the same graph for every timestep's parameter set
    for a, b in zip(out, ref):
        assert torch.equal(a, b)  # same operations without inductor: bit-identical
    torch._dynamo.reset()


def test_timestep_read_from_the_host_copy_without_sync():
    ts = torch.tensor([961.0, 921.0, 921.0, 881.0])
    host = _HostTimesteps(ts)
    assert host.lookup(ts[2]) == 921.0 and host.lookup(ts[3]) == 881.0
    assert host.lookup(ts[1].expand(8)) == 921.0  # expanded to the batch: still one element
    assert host.lookup(torch.tensor(921.0)) is None  # another tensor: the general path reads it
    assert host.lookup(ts[1:3]) is None  # several distinct elements
    assert _timestep_value(ts[0], host) == 961.0 and _timestep_value(torch.tensor([5.0, 5.0]), host) == 5.0
    with pytest.raises(ValueError, match="mixes timesteps"):
        _timestep_value(torch.tensor([5.0, 6.0]), host)


def test_set_index_tensor_follows_the_state():
    st = TimestepState()
    buf = st.index_tensor(torch.device("cpu"))
    st.set_index = 3
    assert int(buf) == 3 and st.index_tensor(torch.device("cpu")) is buf
    st.set_index = 0
    assert int(buf) == 0 and st.set_index == 0
