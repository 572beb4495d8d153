"""The trace harness: run prompts through a pipeline in seeded batches (latents only) with hooks on the UNet's
layer inputs and attentions, and a :class:`~dgq_utils.model.timesteps.TimestepController` that tells every hook
which UNet call (timestep index) it is in. One harness for observation (:mod:`.observe`), calibration
(:mod:`.calibration`), the notebooks' captures (:mod:`dgq_utils.report`) and the embedded world's phenomena
check (:mod:`dgq_utils.world.phenomena`)::

    with Trace(pipe, SamplerSettings(num_inference_steps=25), seed=0, desc="my capture") as trace:
        trace.on_layer_input(lambda name, module, x: seen.append((name, trace.state.set_index, x.shape)))
        trace.on_attention(lambda proc, probs, q, k, v: masses.append(probs.mean((1, 2))), layers="*attn2")
        trace.run(prompts)
    trace.timesteps   # t of every UNet call of one generation

Batches of ``sampler.batch_size`` prompts; batch ``i`` uses ``torch.Generator("cpu").manual_seed(seed + i)``;
classifier-free guidance exactly as in sampling (``guidance_scale > 1`` doubles the batch); the VAE is not run
(``output_type="latent"``); one progress bar (ours) instead of one per batch. Leaving the ``with`` block removes
every hook and puts the original attention processors back, so the pipeline is exactly as before.

Attention: :meth:`Trace.on_attention` installs the engine's one attention implementation,
:class:`~dgq_utils.model.attention.DGQAttnProcessor` (all quantizers off), with a *record hook* that is called
with the probabilities and the head-split ``q, k, v`` as the processor's reference path computes them;
:meth:`Trace.set_attention_processors` installs processors built by the caller (observation's Q/K/V observers).
"""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch
from tqdm.auto import tqdm

from dgq_utils.config.sampler import SamplerSettings, check_sampler, takes_sampler
from dgq_utils.config.validation import check_prompts  # re-exported: the one prompt-list check
from dgq_utils.model.attention import DGQAttnProcessor
from dgq_utils.model.timesteps import TimestepController

__all__ = ["Trace", "TRACE_SAMPLER", "check_prompts", "run_prompts", "layer_selector"]

#: the default sampler of tracing, observation and calibration: 25 steps, guidance 7.5, the pipeline's default
#: resolution, 8 prompts per batch (larger batches than generation's default of 4)
TRACE_SAMPLER = SamplerSettings(batch_size=8)


def layer_selector(layers) -> Callable[[str], bool]:
    """A predicate on UNet module names: ``None`` (all), an ``fnmatch`` pattern, a sequence of patterns, or a
    callable ``name -> bool`` (returned as is)."""
    if layers is None:
        return lambda name: True
    if callable(layers):
        return layers
    patterns = [layers] if isinstance(layers, str) else list(layers)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


@takes_sampler
def run_prompts(pipe, prompts, sampler: SamplerSettings, seed: int, *, progress: bool = True,
                desc: str = "tracing", on_batch: Callable[[int], None] | None = None) -> None:
    """Run ``prompts`` through ``pipe`` in seeded batches (latents only); ``on_batch(i)`` after batch ``i``."""
    sampler = check_sampler(sampler, TRACE_SAMPLER, "run_prompts")
    bs = sampler.batch_size
    batches = [prompts[i : i + bs] for i in range(0, len(prompts), bs)]
    extra = {}
    if sampler.negative_prompt is not None:  # as generate_images passes them: calibrate as you sample
        extra["negative_prompt"] = sampler.negative_prompt
    if sampler.eta:
        extra["eta"] = sampler.eta
    old_bar = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.set_progress_bar_config(**{**old_bar, "disable": True})  # one bar (ours), not one per batch
    try:
        for i, batch in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
            pipe(
                prompt=list(batch),
                num_inference_steps=sampler.num_inference_steps,
                guidance_scale=sampler.guidance_scale,
                height=sampler.height,
                width=sampler.width,
                generator=torch.Generator(device="cpu").manual_seed(int(seed) + i),
                output_type="latent",
                **extra,
            )
            if on_batch is not None:
                on_batch(i)
    finally:
        pipe._progress_bar_config = old_bar


class Trace:
    """Hooks on a pipeline's UNet for one or more runs of prompts (see the module docstring).

    Args:
        pipe: a diffusers text-to-image pipeline with a ``unet``.
        sampler: how to sample (:class:`SamplerSettings`; ``None`` = :data:`TRACE_SAMPLER`).
        seed: batch ``i`` is seeded with ``seed + i``.
        controller: a :class:`TimestepController` already installed on the UNet (a quantized pipeline's, which
            calibration drives itself); by default the trace installs its own ``"exact"`` controller for its
            lifetime and records the schedule of every run (``timesteps``).
        progress / desc: the progress bar.

    Hooks are added with :meth:`on_layer_input`, :meth:`on_attention` and :meth:`set_attention_processors`
    (before :meth:`run`); :meth:`close` (or leaving the ``with`` block) removes them all.
    """

    @takes_sampler
    def __init__(self, pipe, sampler: SamplerSettings | None = None, seed: int = 0, *,
                 controller: TimestepController | None = None, progress: bool = True, desc: str = "tracing"):
        self.pipe = pipe
        self.unet = pipe.unet
        self.sampler = check_sampler(sampler, TRACE_SAMPLER, "Trace")
        self.seed = int(seed)
        self.progress, self.desc = progress, desc
        self._own_controller = controller is None
        self.controller = TimestepController(mapping="exact") if controller is None else controller
        self._handles: list = []
        self._original_processors = None
        self._installed = False

    @property
    def state(self):
        """The shared :class:`~dgq_utils.model.timesteps.TimestepState` (``set_index``, ``call_index``, ``t``)."""
        return self.controller.state

    @property
    def timesteps(self) -> list[float]:
        """The ``t`` of every UNet call of one generation (the controller's recorded schedule)."""
        return list(self.controller.schedule)

    # -- hooks -------------------------------------------------------------------------------------------------
    def on_layer_input(self, hook: Callable, layers=None, *,
                       types: tuple = (torch.nn.Linear, torch.nn.Conv2d)) -> list[str]:
        """Call ``hook(name, module, x)`` with the input ``x`` of every UNet module of ``types`` whose name
        ``layers`` selects (:func:`layer_selector`), before the module runs. Returns the selected names in
        module order. ``hook`` must not change ``x``."""
        select = layer_selector(layers)
        names = []
        for name, module in self.unet.named_modules():
            if not isinstance(module, types) or not select(name):
                continue

            def pre_hook(mod, args, _name=name):
                hook(_name, mod, args[0])

            self._handles.append(module.register_forward_pre_hook(pre_hook))
            names.append(name)
        return names

    def set_attention_processors(self, make: Callable, layers=None) -> dict:
        """Replace the processor of every selected ``Attention`` by ``make(name, kind, original)`` (``kind``:
        ``"self"`` / ``"cross"``; return ``None`` to keep the original). Returns ``{name: processor}`` of the
        replaced ones; the originals come back on :meth:`close`."""
        select = layer_selector(layers)
        current = dict(self.unet.attn_processors)
        originals = dict(current)
        made = {}
        for key, proc in current.items():
            name = key[: -len(".processor")]
            if not select(name):
                continue
            attn = self.unet.get_submodule(name)
            new = make(name, "cross" if attn.is_cross_attention else "self", proc)
            if new is not None:
                current[key] = made[name] = new
        if made:
            if self._original_processors is None:
                self._original_processors = originals
            self.unet.set_attn_processor(current)
        return made

    def on_attention(self, record: Callable, layers=None) -> dict:
        """Install a :class:`DGQAttnProcessor` with ``record`` as its record hook on every selected attention:
        ``record(processor, probs, query, key, value)`` gets the float32 probabilities ``(B, heads, Nq, Nk)`` and
        the head-split ``(B, heads, N, d)`` tensors of every call (``processor.name`` / ``.kind`` /
        ``.state.set_index`` say where). Returns ``{name: processor}``."""

        def make(name, kind, original):
            proc = DGQAttnProcessor(name, kind, original, state=self.state)
            proc.record = record
            return proc

        return self.set_attention_processors(make, layers)

    # -- running -----------------------------------------------------------------------------------------------
    def __enter__(self) -> "Trace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.no_grad()
    def run(self, prompts, *, on_batch: Callable[[int], None] | None = None) -> list[float]:
        """Run ``prompts`` (checked with :func:`check_prompts`) through the pipeline; returns :attr:`timesteps`.
        ``on_batch(i)`` is called after batch ``i``.

        With its own controller the trace records the schedule of this run (every batch must follow the same
        one) and leaves the controller in inference mode; a given controller is driven by its owner."""
        prompts = check_prompts(prompts)
        if self._own_controller:
            if not self._installed:
                self.controller.install(self.unet, self.pipe)
                self._installed = True
            self.controller.start_calibration()
        try:
            run_prompts(self.pipe, prompts, self.sampler, self.seed, progress=self.progress, desc=self.desc,
                        on_batch=on_batch)
        finally:
            if self._own_controller:
                self.controller.remove()
                self._installed = False
        if self._own_controller:
            self.controller.finish_calibration()
        return self.timesteps

    def close(self) -> None:
        """Remove every hook and put the original attention processors back (idempotent)."""
        if self._installed:
            self.controller.remove()
            self._installed = False
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._original_processors is not None:
            self.unet.set_attn_processor(self._original_processors)
            self._original_processors = None

