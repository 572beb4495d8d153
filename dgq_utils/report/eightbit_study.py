"""Notebook 04's real 8-bit section: its W8A8 recipes run with 8-bit weights and 8-bit GEMMs, on the same prompts and
seeds as their fake-quantized versions.

For each W8A8 recipe and each backend (:func:`eight_bit_backends`), :func:`eight_bit_study` does these steps.

1. **Copy.** It copies the FP UNet into a second pipeline, which shares the text encoders and the VAE with the first
   and casts nothing (:func:`dgq_utils.model.copying.pipeline_with_unet`). It loads the recipe's calibrated state,
   the one the comparison above made; anything else is an error.
2. **Fake-quant timing batch.** It generates the grid's first batch with the fake-quantized copy, with the same noise
   and generators as the grid (:func:`dgq_utils.generate.images.batch_call_kwargs`). The first UNet call records
   each convertible layer's input, one unconditional and one conditional row.
3. **Control batch.** It generates the same batch with every convertible layer's output multiplied by
   ``1 + eps * N(0, 1)``, where eps is the machine epsilon of the UNet's dtype. This is relative noise of standard
   deviation eps, a few times a round-to-nearest error.
4. **Convert.** It converts the copy with :func:`dgq_utils.quantize.int8.convert_to_8bit`:
   - the UNet's weights are stored as int8 codes, and the FP weights are freed;
   - Linear and 1x1-conv layers run 8-bit GEMMs;
   - 3x3 convolutions keep 8-bit storage and fake-quant compute;
   - attention stays simulated.
5. **Layer check.** It runs every converted layer and its fake-quant predecessor on the recorded input, under every
   calibrated timestep set, and compares them. The two get identical inputs and parameters, so this tests the 8-bit
   arithmetic; the predecessors are freed after the check.
6. **8-bit batch and images.** It times the 8-bit batch, then generates the grid's images into the shared image cache.
   The cache key names the backend, so the 8-bit images never mix with the fake-quant ones.

What is measured:

- **UNet weight bytes:** FP, fake quant (FP weights plus the fake-quantized copy), and 8-bit.
- **Layer agreement:** relative L2 per converted layer and set.
- **Image PSNR:** against the fake-quant image and against FP, on the grid. On the timing batch it is measured for
  both the 8-bit and the control images against the fake-quant ones.
- **Median UNet call time:** both paths, in the same run and with no hooks on the layers.

The images differ more than the layers do. Every quantizer turns a small difference at its input into a whole
quantization step for the few values near a rounding threshold, and across the steps and the ~100 quantized layers
this grows. The control is one sample of how far noise of that size alone moves the fake-quant images. A float
implementation of the same recipe that rounds differently moves them about as far, so image identity is not the
test.

Where the GEMMs run:

- **CUDA:** the Triton kernels of :mod:`dgq_utils.kernels.int8_gemm`. On Hopper, fp8 e4m3 runs as well; it
  re-rounds the fake-quantized operands, an approximation, so its images are expected further from fake quant.
- **CPU:** exact integer arithmetic with no int8 tensor-core kernel:
  - ``torch._int_mm`` for the pixel / tensor groups;
  - one float64 GEMM of the exact terms for the channel groups.

  Its time therefore shows what the emulation costs, not an 8-bit speed-up.
"""
from __future__ import annotations

import copy
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from dgq_utils.config import get_preset
from dgq_utils.config.validation import check_choice
from dgq_utils.evaluate.metrics.pairwise import psnr_per_image
from dgq_utils.generate.images import GenerationResult, batch_call_kwargs, generate_images
from dgq_utils.model.copying import pipeline_with_unet
from dgq_utils.model.int8_layers import BACKENDS
from dgq_utils.quantize.int8 import EightBitReport, convert_to_8bit, fallback_reason, unet_weight_bytes
from dgq_utils.quantize.pipeline import is_quantized, require_state
from dgq_utils.timing import stage

__all__ = ["CONTROL_MARGIN_DB", "EIGHT_BIT_RECIPES", "EightBitRun", "EightBitStudy", "describe_eight_bit",
           "eight_bit_backends", "eight_bit_study", "rounding_nudge"]

#: the W8A8 recipes of notebook 04 that have an 8-bit execution path
EIGHT_BIT_RECIPES = ("baseline-w8a8", "dgq-w8a8")
#: how much further (dB of PSNR) the int8 images may lie from the fake-quant ones than the control's before the
#: prose says so
CONTROL_MARGIN_DB = 3.0


def eight_bit_backends(device: Any) -> tuple[str, ...]:
    """The backends worth running on ``device``: ``int8`` everywhere; ``fp8`` (e4m3) too on a GPU with fp8 tensor
    cores (compute capability >= 8.9: Ada, Hopper). On the CPU fp8 would only be emulated."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(dev) >= (8, 9):
        return ("int8", "fp8")
    return ("int8",)


def rounding_nudge(dtype: torch.dtype) -> float:
    """The control's noise: the machine epsilon of the UNet's dtype (float32 1.2e-7, float16 9.8e-4), used as the
    standard deviation of a relative perturbation of each layer's output."""
    return float(torch.finfo(dtype).eps)


@dataclass
class EightBitRun:
    """One (recipe, backend).

    - ``report``: what :func:`convert_to_8bit` did.
    - ``images``: the grid's 8-bit images.
    - ``agreement``: per converted layer, the largest relative L2 over the calibrated sets, on the recorded input.
    - ``call_ms``: median UNet call, ``fake_quant`` / ``8bit``.
    - ``weight_bytes``: ``fp`` / ``fake_quant`` / ``8bit``.
    - ``n_layers``: the quantized layers. ``n_sets``: the calibrated timestep sets.
    - ``n_timed``: the prompts of the timing batch.
    - ``nudge``: the control's noise size (:func:`rounding_nudge`).
    - ``latent_rel_l2`` / ``timed_psnr``: the timing batch's final latents / decoded images, ``8bit_vs_fake_quant``
      and the control's ``nudged_vs_fake_quant``; ``timed_psnr["fake_quant_vs_grid"]``: the timed fake-quant images
      against the grid's cached ones (the same noise and generators: identical, the PSNR cap, on the CPU).
    - ``psnr_vs_fake_quant``: per grid image, against the fake-quant image of the same prompt.
    - ``peak_mib``: CUDA only, the peak during each timing batch.
    """

    recipe: str
    backend: str
    report: EightBitReport
    images: GenerationResult
    agreement: dict[str, float]
    call_ms: dict[str, float]
    weight_bytes: dict[str, int]
    n_layers: int = 0
    n_sets: int = 0
    n_timed: int = 0
    nudge: float = 0.0
    latent_rel_l2: dict[str, float] = field(default_factory=dict)
    timed_psnr: dict[str, Any] = field(default_factory=dict)
    psnr_vs_fake_quant: list[float] = field(default_factory=list)
    peak_mib: dict[str, float] = field(default_factory=dict)


@dataclass
class EightBitStudy:
    """What :func:`eight_bit_study` returns: one row per (recipe, backend) in ``table``, the ``runs`` behind it."""

    table: pd.DataFrame
    runs: list[EightBitRun]
    device: str


# ---------------------------------------------------------------------------------------------------- hooks
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _CallTimer:
    """Wall time of every UNet call (device-synchronised before and after, so each call is timed alone)."""

    def __init__(self, unet, device: torch.device):
        self.ms: list[float] = []
        self._device = device
        self._t0 = 0.0
        self._handles = [unet.register_forward_pre_hook(self._start), unet.register_forward_hook(self._stop)]

    def _start(self, module, args):
        _sync(self._device)
        self._t0 = time.perf_counter()

    def _stop(self, module, args, out):
        _sync(self._device)
        self.ms.append((time.perf_counter() - self._t0) * 1e3)

    def remove(self) -> float:
        for h in self._handles:
            h.remove()
        return statistics.median(self.ms) if self.ms else float("nan")


class _FirstCall:
    """Each watched layer's input on the UNet's first call: rows 0 and B/2 (with classifier-free guidance one
    unconditional and one conditional row), kept on the CPU. The layer hooks remove themselves after that call, so
    the rest of the batch runs without them."""

    def __init__(self, layers: dict, unet):
        self.inputs: dict[str, torch.Tensor] = {}
        self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()]
        self._handles.append(unet.register_forward_hook(lambda module, args, out: self.remove()))

    def _hook(self, name):
        def hook(module, args, out):
            x = args[0]
            rows = sorted({0, x.shape[0] // 2})
            self.inputs[name] = x[rows].detach().to("cpu", copy=True)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class _Nudge:
    """Multiplies each watched layer's output by ``1 + r * noise``, with seeded standard-normal noise."""

    def __init__(self, layers: dict, r: float, seed: int):
        self.r = r
        self._gen: dict = {}
        self._seed = seed
        self._handles = [layer.register_forward_hook(self._hook) for layer in layers.values()]

    def _hook(self, module, args, out):
        g = self._gen.get(out.device)
        if g is None:
            g = self._gen[out.device] = torch.Generator(device=out.device).manual_seed(self._seed)
        noise = torch.randn(out.shape, generator=g, device=out.device, dtype=torch.float32)
        return (out.float() * (1 + self.r * noise)).to(out.dtype)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# ---------------------------------------------------------------------------------------------- measuring
def _timed(pipe, batch, settings, device: torch.device) -> tuple[float, float | None, torch.Tensor]:
    """One timing batch (the grid's noise and generators): the median UNet call (ms), the peak CUDA memory (MiB)
    during it and the final latents of its real items (float64, CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pipe.set_progress_bar_config(disable=True)
    timer = _CallTimer(pipe.unet, device)
    try:
        with torch.no_grad():
            out = pipe(**batch_call_kwargs(pipe, batch, settings, output_type="latent")).images
    finally:
        ms = timer.remove()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return ms, peak, out[:len(batch)].detach().double().cpu()


def _decoded(pipe, latents: torch.Tensor) -> torch.Tensor:
    """``latents`` through the pipeline's VAE and image post-processing, as the uint8 ``(N, 3, H, W)`` images the
    cache would have saved (the VAE in float32 where its config asks for the upcast, as SDXL's pipeline does)."""
    vae = pipe.vae
    dtype = torch.float32 if getattr(vae.config, "force_upcast", False) else vae.dtype
    keep = vae.dtype
    vae.to(dtype)
    try:
        with torch.no_grad():
            x = vae.decode(latents.to(device=vae.device, dtype=dtype) / vae.config.scaling_factor).sample
    finally:
        vae.to(keep)
    img = pipe.image_processor.postprocess(x.float(), output_type="pt")
    return (img * 255).round().clamp(0, 255).to(torch.uint8).cpu()


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _layer_agreement(old: dict, new: dict, inputs: dict, device: torch.device) -> dict[str, float]:
    """Per layer, the largest relative L2 of the 8-bit layer against its fake-quant predecessor over every
    calibrated set, both on the recorded input."""
    out = {}
    with torch.no_grad():
        for name, x in inputs.items():
            a, b = old[name], new[name]
            state = a.act.state
            keep = state.set_index
            x = x.to(device)
            worst = 0.0
            try:
                for i in sorted(a.act.params):
                    state.set_index = i
                    worst = max(worst, _rel_l2(b(x), a(x)))
            finally:
                state.set_index = keep
            out[name] = worst
    return out


# ------------------------------------------------------------------------------------------------- checks
def _check_recipes(recipes: Sequence[str]) -> list[str]:
    if isinstance(recipes, str) or not recipes:
        raise ValueError(f"recipes: expected a non-empty list of W8A8 preset names, e.g. {list(EIGHT_BIT_RECIPES)}; "
                         f"got {recipes!r}.")
    if len(set(recipes)) != len(recipes):
        raise ValueError(f"recipes: {list(recipes)} names a recipe twice.")
    out = []
    for name in recipes:
        r = get_preset(name)
        w = r.weights.bits if r.weights is not None else None
        a = r.activations.bits if r.activations is not None else None
        if (w, a) != (8, 8):
            raise ValueError(f"recipes: {name!r} is W{w}A{a}; only W8A8 recipes have an 8-bit execution path "
                             f"(e.g. {list(EIGHT_BIT_RECIPES)}).")
        out.append(name)
    return out


def _check_backends(backends, device) -> tuple[str, ...]:
    if backends is None:
        return eight_bit_backends(device)
    if isinstance(backends, str) or not backends or len(set(backends)) != len(backends):
        raise ValueError(f"backends: expected a non-empty list of distinct names from {list(BACKENDS)}; "
                         f"got {backends!r}.")
    for b in backends:
        check_choice(b, "backends", BACKENDS)
    return tuple(backends)


def _check_fake_quant(S, fake_quant, recipes, prompts) -> None:
    missing = [r for r in ["fp", *recipes] if r not in fake_quant.generations]
    if missing:
        raise ValueError(f"fake_quant: the comparison has no images of {missing}; run S.compare with "
                         f"{list(recipes)} first (notebook 04's res).")
    for r in ["fp", *recipes]:
        if len(fake_quant.generations[r]) != len(prompts):
            raise ValueError(f"fake_quant: {r} has {len(fake_quant.generations[r])} images but prompts has "
                             f"{len(prompts)}; pass the prompts the comparison ran on.")
    for r in recipes:
        made_with = fake_quant.generations[r].meta.get("calibration")
        here = S.states.path(S.ctx.pipe, r, S.calibration_set(None), S.sampler, seed=S.seed,
                             model_id=S.ctx.model_key).name
        if made_with != here:
            raise ValueError(f"fake_quant: its {r} images were made with the calibrated state {made_with!r}, but this "
                             f"session's is {here!r}; run the comparison and this study with the same session "
                             "(same calibration prompts, sampler, seed and device).")


# ----------------------------------------------------------------------------------------------- the study
def eight_bit_study(S, fake_quant, prompts: Sequence[str], *, recipes: Sequence[str] = EIGHT_BIT_RECIPES,
                    backends: Sequence[str] | None = None, progress: bool = True) -> EightBitStudy:
    """The 8-bit section for the session ``S`` (:func:`dgq_utils.report.setup`). See the module docstring.

    ``fake_quant`` is the comparison result whose generations hold the FP and fake-quant images of ``prompts``
    (notebook 04's ``res``); its states must be this session's. ``recipes`` are W8A8 presets. ``backends`` defaults to
    :func:`eight_bit_backends` of the run's device. The timing batch is the grid's first batch (``batch_size``
    prompts). The FP pipeline ``S.ctx.pipe`` is left as it was: every recipe works on a copy of its UNet, and the
    shared modules are neither cast nor moved."""
    recipes = _check_recipes(recipes)
    device = torch.device(S.config.device)
    backends = _check_backends(backends, device)
    prompts = list(prompts)
    _check_fake_quant(S, fake_quant, recipes, prompts)
    fp = S.ctx.pipe
    if is_quantized(fp):
        raise RuntimeError("eight_bit_study needs the FP pipeline (S.ctx.pipe is quantized); dequantize it first.")
    fp_bytes = unet_weight_bytes(fp.unet)
    fp_paths = fake_quant.generations["fp"].paths
    runs, rows = [], []
    for recipe in recipes:
        fq_paths = fake_quant.generations[recipe].paths
        for backend in backends:
            with stage("eight_bit", recipe=recipe, backend=backend, n=len(prompts)):
                run = _one(S, fp, recipe, backend, prompts, fq_paths, device, progress)
            run.weight_bytes["fp"] = fp_bytes
            run.psnr_vs_fake_quant = psnr_per_image(run.images.paths, fq_paths).tolist()
            runs.append(run)
            rows.append(_row(run, fp_paths, fq_paths, device))
    return EightBitStudy(pd.DataFrame(rows), runs, str(device))


def _one(S, fp, recipe: str, backend: str, prompts, fq_paths, device, progress) -> EightBitRun:
    pipe = pipeline_with_unet(fp, copy.deepcopy(fp.unet))
    settings = S.sampler.resolved(pipe)
    mid = S.ctx.model_key
    expected = S.states.path(fp, recipe, S.calibration_set(None), S.sampler, seed=S.seed, model_id=mid).name
    state = S.states.quantize(pipe, recipe, S.calibration_set(None), S.sampler, seed=S.seed, model_id=mid,
                              progress=progress)
    if state.name != expected:  # the copy must run on the device and dtype of the FP pipeline
        raise RuntimeError(f"eight_bit_study: the UNet copy loaded {state.name}, not the comparison's {expected}.")
    qs = require_state(pipe)
    fq_bytes = unet_weight_bytes(pipe.unet)
    old = {n: layer for n, layer in qs.layers.items() if layer.enabled and fallback_reason(layer, qs.recipe) is None}
    n_sets = max((len(layer.act.params) for layer in old.values()), default=0)
    batch = [(i, prompts[i], S.seed) for i in range(min(len(prompts), settings.batch_size))]
    first = _FirstCall(old, pipe.unet)
    try:
        fq_ms, fq_peak, fq_out = _timed(pipe, batch, settings, device)
    finally:
        first.remove()
    nudge = rounding_nudge(pipe.unet.dtype)
    nudged = _Nudge(old, nudge, S.seed + 1)
    try:
        _, _, nudged_out = _timed(pipe, batch, settings, device)
    finally:
        nudged.remove()
    report = convert_to_8bit(pipe, backend=backend)
    agreement = _layer_agreement(old, qs.layers, first.inputs, device)
    del old, first  # the fake-quant layers (FP weights and their fake-quantized copies) go now
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    q_ms, q_peak, q_out = _timed(pipe, batch, settings, device)
    images = generate_images(pipe, prompts, [S.seed], S.ctx.work_dir("images"), recipe=recipe, model_id=mid,
                             settings=S.sampler, progress=progress, calibration=f"{state.name}+8bit-{backend}")
    fq_images = _decoded(pipe, fq_out)
    run = EightBitRun(
        recipe, backend, report, images, agreement, call_ms={"fake_quant": fq_ms, "8bit": q_ms},
        weight_bytes={"fake_quant": fq_bytes, "8bit": unet_weight_bytes(pipe.unet)}, n_layers=len(qs.layers),
        n_sets=n_sets, n_timed=len(batch), nudge=nudge,
        latent_rel_l2={"8bit_vs_fake_quant": _rel_l2(q_out, fq_out),
                       "nudged_vs_fake_quant": _rel_l2(nudged_out, fq_out)},
        timed_psnr={"8bit_vs_fake_quant": psnr_per_image(_decoded(pipe, q_out), fq_images),
                    "nudged_vs_fake_quant": psnr_per_image(_decoded(pipe, nudged_out), fq_images),
                    "fake_quant_vs_grid": psnr_per_image(fq_images, fq_paths[:len(batch)])},
        peak_mib={k: v for k, v in (("fake_quant", fq_peak), ("8bit", q_peak)) if v is not None})
    del pipe, qs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return run


def _row(run: EightBitRun, fp_paths, fq_paths, device) -> dict:
    vs_fq = np.asarray(run.psnr_vs_fake_quant)
    vs_fp = psnr_per_image(run.images.paths, fp_paths)
    fq_vs_fp = psnr_per_image(fq_paths, fp_paths)
    agree = np.array(list(run.agreement.values())) if run.agreement else np.array([np.nan])
    mib = {k: v / 2**20 for k, v in run.weight_bytes.items()}
    row = {
        "recipe": run.recipe, "backend": run.backend, "device": str(device),
        "gemm_layers_8bit": len(run.report.converted), "quantized_layers": run.n_layers,
        "conv_weights_only": len(run.report.weights_only), "timestep_sets": run.n_sets,
        "k_inflation": run.report.plans.get("k_inflation"),
        "weight_mib_fp": mib["fp"], "weight_mib_fake_quant": mib["fake_quant"], "weight_mib_8bit": mib["8bit"],
        "weights_8bit_vs_fp": mib["8bit"] / mib["fp"],
        "call_ms_fake_quant": run.call_ms["fake_quant"], "call_ms_8bit": run.call_ms["8bit"],
        "time_8bit_vs_fake_quant": run.call_ms["8bit"] / run.call_ms["fake_quant"],
        "layer_rel_l2_median": float(np.median(agree)), "layer_rel_l2_max": float(np.max(agree)),
        "psnr_vs_fake_quant_mean": float(np.mean(vs_fq)), "psnr_vs_fake_quant_min": float(np.min(vs_fq)),
        "psnr_vs_fp_mean": float(np.mean(vs_fp)), "fake_quant_psnr_vs_fp_mean": float(np.mean(fq_vs_fp)),
        "latent_rel_l2_8bit_vs_fake_quant": run.latent_rel_l2["8bit_vs_fake_quant"],
        "latent_rel_l2_nudged_vs_fake_quant": run.latent_rel_l2["nudged_vs_fake_quant"],
        "timed_psnr_8bit_vs_fake_quant": float(np.mean(run.timed_psnr["8bit_vs_fake_quant"])),
        "timed_psnr_nudged_vs_fake_quant": float(np.mean(run.timed_psnr["nudged_vs_fake_quant"])),
        "timed_psnr_fake_quant_vs_grid": float(np.mean(run.timed_psnr["fake_quant_vs_grid"])),
        "n_images": len(run.images), "n_timed": run.n_timed, "control_nudge": run.nudge,
    }
    for k, v in run.peak_mib.items():
        row[f"peak_mib_{k}"] = v
    return row


# --------------------------------------------------------------------------------------------------- prose
def _control_sentence(r) -> str:
    gap = r.timed_psnr_nudged_vs_fake_quant - r.timed_psnr_8bit_vs_fake_quant
    if r.backend == "fp8":
        return ("fp8 re-rounds the fake-quantized operands to e4m3, an approximation, so its images are expected "
                f"further from fake quant than the control's ({gap:+.1f} dB).")
    if gap <= CONTROL_MARGIN_DB:
        side = "closer to" if gap < 0 else "further from"
        return (f"The int8 images are {abs(gap):.1f} dB {side} the fake-quant ones than the control's: no further "
                f"than rounding-size noise moves them, inside the {CONTROL_MARGIN_DB:.0f} dB margin.")
    return (f"The int8 images lie {gap:.1f} dB further from the fake-quant ones than the control's, more than the "
            f"{CONTROL_MARGIN_DB:.0f} dB margin. The control is one noise draw on {int(r.n_timed)} prompts. The layer "
            "check covers the converted layers on one recorded input per layer, so what it leaves out is other "
            "inputs and the layers that were not converted.")


def describe_eight_bit(study: EightBitStudy) -> str:
    """Sentences on the study's numbers: storage, agreement, images and time, with the device's caveat."""
    if study.table.empty:
        return "No 8-bit run."
    parts = []
    for r in study.table.itertuples(index=False):
        parts.append(
            f"**{r.recipe} ({r.backend})**: {r.gemm_layers_8bit} of {r.quantized_layers} quantized layers run 8-bit "
            f"GEMMs (+{r.conv_weights_only} convolutions with 8-bit weights only); UNet weights "
            f"{r.weight_mib_8bit:.1f} MiB against {r.weight_mib_fp:.1f} MiB FP ({r.weights_8bit_vs_fp:.2f}x) and "
            f"{r.weight_mib_fake_quant:.1f} MiB fake-quantized. On identical inputs, under each of the "
            f"{r.timestep_sets} timestep sets, the 8-bit layers match the fake-quant layers to a relative L2 of "
            f"{r.layer_rel_l2_median:.1e} (median over layers; max {r.layer_rel_l2_max:.1e}). Grid images: "
            f"{r.psnr_vs_fake_quant_mean:.1f} dB mean PSNR to the fake-quant image (min "
            f"{r.psnr_vs_fake_quant_min:.1f}), {r.psnr_vs_fp_mean:.1f} dB to FP (fake quant: "
            f"{r.fake_quant_psnr_vs_fp_mean:.1f} dB). Timing batch ({r.n_timed} prompts): the 8-bit images are "
            f"{r.timed_psnr_8bit_vs_fake_quant:.1f} dB from the fake-quant ones; the control (each converted layer's "
            f"output times 1 + {r.control_nudge:.1e} x N(0, 1)) is {r.timed_psnr_nudged_vs_fake_quant:.1f} dB from "
            f"them. {_control_sentence(r)} Median UNet call {r.call_ms_8bit:.1f} ms against "
            f"{r.call_ms_fake_quant:.1f} ms fake-quantized ({r.time_8bit_vs_fake_quant:.2f}x).")
    if torch.device(study.device).type == "cpu":
        parts.append(
            "On the CPU no 8-bit tensor-core kernel runs. The integer arithmetic is emulated exactly: "
            "`torch._int_mm` for the pixel and tensor groups, and one float64 GEMM of the exact terms for the "
            "channel groups. The time ratio is therefore the emulation's cost, not a speed result. The storage "
            "numbers are real. The Triton kernels run with `-p device cuda`; the SD-scale GPU measurements are in "
            "`benchmarks/results/8bit_sd15_h200*.md`.")
    parts.append(
        "Why the images differ more than the layers do: each quantizer turns a small difference at its input into "
        "a whole quantization step for the few values near a rounding threshold, and across the steps and layers "
        "this grows. The control is one sample of how far noise of rounding size moves the fake-quant images. The "
        "layer check, on identical inputs, is the test of the 8-bit arithmetic.")
    return "\n\n".join(parts)
