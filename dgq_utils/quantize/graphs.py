"""CUDA graphs for UNet calls: one captured graph per input signature, replayed for every timestep.

An eager SD-scale UNet step launches a few thousand kernels; at batch 2 x 8 on an H200 the host needs about as
long to launch them as the device to run them, so the step is launch-bound. :class:`CUDAGraphUNet` captures the
UNet's ``forward`` once per input signature (shapes, dtypes, device, keyword names) into a
``torch.cuda.CUDAGraph`` and afterwards only copies the inputs into the graph's static buffers and replays it::

    graphed = CUDAGraphUNet(pipe)                      # a quantized or an FP pipeline (or a bare UNet)
    out = graphed(latents, t, encoder_hidden_states=text).sample

Quantized UNets replay correctly across timesteps because nothing the graph reads depends on the host's idea of
the timestep: before each replay the DGQ timestep controller runs eagerly
(:meth:`~dgq_utils.model.timesteps.TimestepController.before_call`, with the call's own ``t``), which writes the
parameter-set index into a 0-d device tensor; the fused fake-quant kernels, the Q/K/V quantizers and the static
softmax scales read their set through that tensor (under capture the quantizers refuse any path that would bake a
set in). Calibration is not graphed (the controller must be in inference mode).

What differs from calling the UNet: forward hooks registered on the UNet module itself do not run (the DGQ
controller's is called as above; hooks on submodules run at capture time only, as every host-side effect inside
the forward); the first call of a signature runs the forward eagerly ``warmup`` times (kernel compilation,
cuBLAS/cuDNN workspaces) on a side stream and captures it, so it is slower; the graph's memory pool holds the
activations of one forward per signature (:meth:`reset` frees them). The output is a fresh tensor (a copy of the
graph's output buffer), as from an eager call. Outputs equal the eager UNet's (same kernels; tested on the GPU,
``tests/test_gpu_speed_paths.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dgq_utils.quantize.pipeline import get_quant_state

__all__ = ["CUDAGraphUNet"]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    sample: Tensor
    timestep: Tensor
    kwargs: dict
    out: Tensor


def _signature(x) -> tuple:
    if isinstance(x, Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.device)
    if isinstance(x, dict):
        return ("dict", tuple((k, _signature(v)) for k, v in sorted(x.items())))
    if isinstance(x, (int, float)):
        return ("number", type(x).__name__)
    return ("value", repr(x))


class CUDAGraphUNet:
    """A UNet call that captures the UNet's ``forward`` in a CUDA graph per input signature and replays it.

    Args:
        pipe_or_unet: a pipeline with a ``unet`` (quantized or not) or a UNet on a CUDA device.
        warmup: eager forwards before capturing a signature (on a side stream; 2 is enough for lazy inits).

    Call it like the UNet: ``graphed(sample, timestep, encoder_hidden_states=..., return_dict=True, **kw)``;
    tensor keyword arguments are copied into static buffers, other keyword values are part of the signature.
    """

    def __init__(self, pipe_or_unet, *, warmup: int = 2):
        self.unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
        if not isinstance(self.unet, torch.nn.Module):
            raise TypeError(f"CUDAGraphUNet needs a pipeline with a UNet or a UNet module; got "
                            f"{type(pipe_or_unet).__name__}.")
        if int(warmup) < 1:
            raise ValueError(f"warmup must be >= 1 eager forward before capturing; got {warmup!r}.")
        self.warmup = int(warmup)
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None
        self.captures = 0  # graphs captured so far (one per signature)

    def reset(self) -> None:
        """Drop every captured graph and its memory pool (the next call captures again)."""
        self._graphs.clear()
        self._pool = None

    def _controller(self):
        qs = get_quant_state(self.unet)
        if qs is None:
            return None
        if qs.controller.mode != "infer" or qs.controller.callback is not None:
            raise RuntimeError("CUDAGraphUNet replays inference calls only; this UNet is being calibrated.")
        return qs.controller

    def __call__(self, sample: Tensor, timestep, encoder_hidden_states: Tensor | None = None, *,
                 return_dict: bool = True, **kwargs):
        if not (isinstance(sample, Tensor) and sample.is_cuda):
            raise ValueError("CUDAGraphUNet needs the sample on a CUDA device (CUDA graphs are CUDA only); got "
                             f"{getattr(sample, 'device', type(sample).__name__)}.")
        controller = self._controller()
        call_kwargs = dict(kwargs, encoder_hidden_states=encoder_hidden_states)
        if controller is not None:  # the set index for this call, written on the device before the replay
            controller.before_call(self.unet, (sample, timestep), call_kwargs)
        t = timestep if isinstance(timestep, Tensor) else torch.tensor(timestep)
        key = (_signature(sample), _signature(t), _signature(call_kwargs))
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._capture(sample, t, call_kwargs)
        g.sample.copy_(sample)
        g.timestep.copy_(t.to(g.timestep.device, non_blocking=True))
        for name, buf in g.kwargs.items():
            if isinstance(buf, Tensor):
                buf.copy_(call_kwargs[name])
        g.graph.replay()
        out = g.out.clone()
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    def _capture(self, sample: Tensor, t: Tensor, call_kwargs: dict) -> _Graph:
        device = sample.device
        static_sample = sample.clone()
        static_t = t.to(device).clone()  # on the device: the UNet's own conversion would copy from the host
        static_kwargs = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in call_kwargs.items()}

        def forward():
            return self.unet.forward(static_sample, static_t, return_dict=False, **static_kwargs)[0]

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(self.warmup):
                forward()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self._pool):
            out = forward()
        self.captures += 1
        return _Graph(graph, static_sample, static_t, static_kwargs, out)
