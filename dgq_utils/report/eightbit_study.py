"""Notebook 04's real 8-bit section: its W8A8 recipes run with 8-bit weights and 8-bit GEMMs, on the same prompts and
seeds as their fake-quantized versions.

For each W8A8 recipe and each backend (:func:`eight_bit_backends`), :func:`eight_bit_study` does four things.

1. It copies the FP UNet and loads the recipe's calibrated state from the run's state cache. This is the state the
   comparison above calibrated.
2. It generates one timing batch with the fake-quantized copy. While doing so it records each convertible layer's
   input and output on the first UNet call.
3. It converts the copy with :func:`dgq_utils.quantize.int8.convert_to_8bit`:
   - the UNet's weights are stored as int8 codes, and the FP weights are freed;
   - Linear and 1x1-conv layers run integer GEMMs;
   - 3x3 convolutions keep 8-bit storage and fake-quant compute;
   - attention stays simulated.
4. It times the same batch again, and generates the grid's images into the shared image cache. The cache key names
   the backend, so the 8-bit images never mix with the fake-quant ones.

What is measured:

- **UNet weight bytes:** FP, fake quant (FP weights plus the fake-quantized copy), and 8-bit.
- **Layer agreement:** the 8-bit layer run on the recorded input, against the fake-quant layer's output. Both get
  the same input and the same timestep set, so this is the fair check of the arithmetic.
- **Image PSNR:** against the fake-quant image and against FP.
- **Median UNet call time:** both paths, measured in the same run.

Layers agree to float rounding (relative L2 ~1e-7 on the CPU). Whole images do not, for a reason that has nothing
to do with 8 bits. Every quantizer turns a rounding-level difference at its input into a whole quantization step for
the few values near a rounding threshold. Across 25 steps of about 100 quantized layers, this grows to percent-level
latent differences. Two float implementations of the same recipe therefore diverge by the same mechanism, so the
PSNR against fake quant is a bound on that spread, not a measure of error.

Where the GEMMs run:

- **CUDA:** the Triton kernels of :mod:`dgq_utils.kernels.int8_gemm`. On Hopper, fp8 e4m3 runs as well.
- **CPU:** exact integer arithmetic with no int8 tensor-core kernel:
  - ``torch._int_mm`` for the pixel / tensor groups;
  - one float64 GEMM of the exact terms for the channel groups.

  Its time therefore shows what the emulation costs, not an 8-bit speed-up.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from diffusers.utils import logging as diffusers_logging

from dgq_utils.config import get_preset
from dgq_utils.config.validation import check_choice
from dgq_utils.evaluate.metrics.pairwise import psnr_per_image
from dgq_utils.generate.images import GenerationResult, generate_images
from dgq_utils.model.int8_layers import BACKENDS
from dgq_utils.quantize.int8 import EightBitReport, convert_to_8bit, fallback_reason, unet_weight_bytes
from dgq_utils.quantize.pipeline import is_quantized, require_state
from dgq_utils.timing import stage

__all__ = ["CONTROL_MARGIN_DB", "EIGHT_BIT_RECIPES", "EightBitRun", "EightBitStudy", "describe_eight_bit",
           "eight_bit_backends", "eight_bit_study", "rounding_nudge"]

#: the W8A8 recipes of notebook 04 that have an 8-bit execution path
EIGHT_BIT_RECIPES = ("baseline-w8a8", "dgq-w8a8")
#: how much further (dB of PSNR) the 8-bit images may lie from the fake-quant ones than the control before the
#: prose says the difference is more than rounding
CONTROL_MARGIN_DB = 3.0


def eight_bit_backends(device: Any) -> tuple[str, ...]:
    """The backends worth running on ``device``: ``int8`` everywhere; ``fp8`` (e4m3) too on a GPU with fp8 tensor
    cores (compute capability >= 8.9: Ada, Hopper). On the CPU fp8 would only be emulated."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(dev) >= (8, 9):
        return ("int8", "fp8")
    return ("int8",)


@dataclass
class EightBitRun:
    """One (recipe, backend): the conversion's ``report``, the grid's ``images``, per-layer ``agreement`` (relative
    L2 per converted layer on its recorded input), ``call_ms`` (median UNet call, ``fake_quant`` / ``8bit``),
    ``weight_bytes`` (``fp`` / ``fake_quant`` / ``8bit``), ``n_layers`` (quantized layers), ``latent_rel_l2``
    (the timing batch's final latents: ``8bit_vs_fake_quant``, and the control ``nudged_vs_fake_quant``: fake quant
    with every convertible layer's output moved by a relative :func:`rounding_nudge`), ``nudge`` (that size) and ``peak_mib`` (CUDA: peak during each timing batch)."""

    recipe: str
    backend: str
    report: EightBitReport
    images: GenerationResult
    agreement: dict[str, float]
    call_ms: dict[str, float]
    weight_bytes: dict[str, int]
    n_layers: int = 0
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


def rounding_nudge(dtype: torch.dtype) -> float:
    """Relative size of the control's perturbation: the machine epsilon of the UNet's dtype (float32 1.2e-7,
    float16 9.8e-4), the size of one rounding of a layer's output."""
    return float(torch.finfo(dtype).eps)


class _Nudge:
    """Multiplies each watched layer's output by ``1 + r * noise`` (seeded standard normal noise): a rounding-level
    difference at every layer, as two float implementations of the same layers would have."""

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


class _FirstCall:
    """Input, output and timestep set of each watched layer on its first call."""

    def __init__(self, layers: dict):
        self.io: dict[str, tuple] = {}
        self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name):
        def hook(module, args, out):
            if name not in self.io:
                # two rows of the batch suffice: the static activation quantizers of these layers treat every
                # batch row alike (and a batch of 16 inputs to ~100 layers would hold gigabytes)
                self.io[name] = (args[0][:2].detach().clone(), out[:2].detach().clone(), module.act.state.set_index)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _initial_latents(pipe, n: int, sampler, seed: int) -> torch.Tensor:
    """The timing batch's initial noise (float32, on the CPU generator, so it does not depend on the device)."""
    scale = pipe.vae_scale_factor
    h = sampler.height or pipe.unet.config.sample_size * scale
    w = sampler.width or pipe.unet.config.sample_size * scale
    shape = (n, pipe.unet.config.in_channels, h // scale, w // scale)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _timed(pipe, prompts, sampler, latents: torch.Tensor, device: torch.device) -> tuple[float, float | None, Any]:
    """One timing batch of ``prompts`` from ``latents`` with the run's sampler: the median UNet call (ms), the peak
    CUDA memory (MiB) during it and the final latents (float64, CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dtype = pipe.unet.dtype
    kw = dict(num_inference_steps=sampler.num_inference_steps, guidance_scale=sampler.guidance_scale,
              latents=latents.to(device=device, dtype=dtype), output_type="latent")
    if sampler.height is not None:
        kw["height"], kw["width"] = sampler.height, sampler.width
    pipe.set_progress_bar_config(disable=True)
    timer = _CallTimer(pipe.unet, device)
    try:
        with torch.no_grad():
            out = pipe(list(prompts), **kw).images
    finally:
        ms = timer.remove()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return ms, peak, out.detach().double().cpu()


def _decoded(pipe, latents: torch.Tensor) -> torch.Tensor:
    """``latents`` (float64, CPU) through the pipeline's VAE and image post-processing, as the uint8 ``(N, 3, H, W)``
    images the cache would have saved (SDXL's VAE in float32, as its pipeline upcasts it)."""
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
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _check_recipes(recipes: Sequence[str]) -> list[str]:
    if isinstance(recipes, str) or not recipes:
        raise ValueError(f"recipes: expected a non-empty list of W8A8 preset names, e.g. {list(EIGHT_BIT_RECIPES)}; "
                         f"got {recipes!r}.")
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


def eight_bit_study(S, fake_quant, prompts: Sequence[str], *, recipes: Sequence[str] = EIGHT_BIT_RECIPES,
                    backends: Sequence[str] | None = None, timing_prompts: Sequence[str] | None = None,
                    progress: bool = True) -> EightBitStudy:
    """The 8-bit section for the session ``S`` (:func:`dgq_utils.report.setup`). See the module docstring.

    ``fake_quant`` is the comparison result whose generations hold the FP and fake-quant images of ``prompts``
    (notebook 04's ``res``). ``recipes`` are W8A8 presets. ``backends`` defaults to :func:`eight_bit_backends` of
    the run's device. ``timing_prompts`` is the timed batch; the default is the first ``batch_size`` of
    ``prompts``. The FP pipeline ``S.ctx.pipe`` is left as it was, since every recipe works on a copy."""
    recipes = _check_recipes(recipes)
    device = torch.device(S.config.device)
    backends = tuple(backends) if backends is not None else eight_bit_backends(device)
    for b in backends:
        check_choice(b, "backends", BACKENDS)
    prompts = list(prompts)
    missing = [r for r in ["fp", *recipes] if r not in fake_quant.generations]
    if missing:
        raise ValueError(f"fake_quant: the comparison has no images of {missing}; run S.compare with "
                         f"{list(recipes)} first (notebook 04's res).")
    for r in ["fp", *recipes]:
        if len(fake_quant.generations[r]) != len(prompts):
            raise ValueError(f"fake_quant: {r} has {len(fake_quant.generations[r])} images but prompts has "
                             f"{len(prompts)}; pass the prompts the comparison ran on.")
    timing_prompts = list(timing_prompts) if timing_prompts is not None else prompts[:S.sampler.batch_size]
    fp = S.ctx.pipe
    if is_quantized(fp):
        raise RuntimeError("eight_bit_study needs the FP pipeline (S.ctx.pipe is quantized); dequantize it first.")
    fp_bytes = unet_weight_bytes(fp.unet)
    fp_paths = fake_quant.generations["fp"].paths
    runs, rows = [], []
    for recipe in recipes:
        for backend in backends:
            with stage("eight_bit", recipe=recipe, backend=backend, n=len(prompts)):
                run = _one(S, fp, recipe, backend, prompts, timing_prompts, device, progress)
            run.weight_bytes["fp"] = fp_bytes
            run.psnr_vs_fake_quant = psnr_per_image(run.images.paths, fake_quant.generations[recipe].paths).tolist()
            runs.append(run)
            rows.append(_row(run, fp_paths, fake_quant.generations[recipe].paths, device))
    return EightBitStudy(pd.DataFrame(rows), runs, str(device))


def _one(S, fp, recipe: str, backend: str, prompts, timing_prompts, device, progress) -> EightBitRun:
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # from_pipe's notes on float32 modules and the safety checker
    try:
        pipe = type(fp).from_pipe(fp, unet=copy.deepcopy(fp.unet))
    finally:
        diffusers_logging.set_verbosity(verbosity)
    mid = S.ctx.model_key
    calibration = S.calibration_set(None)
    state = S.states.quantize(pipe, recipe, calibration, S.sampler, seed=S.seed, model_id=mid, progress=progress)
    qs = require_state(pipe)
    fq_bytes = unet_weight_bytes(pipe.unet)
    watched = {n: layer for n, layer in qs.layers.items()
               if layer.enabled and fallback_reason(layer, qs.recipe) is None}
    latents = _initial_latents(pipe, len(timing_prompts), S.sampler, S.seed)
    first = _FirstCall(watched)
    try:
        fq_ms, fq_peak, fq_out = _timed(pipe, timing_prompts, S.sampler, latents, device)
    finally:
        first.remove()
    # the control: the same fake-quant pipeline with a rounding-level difference at each of the same layers
    nudge = rounding_nudge(pipe.unet.dtype)
    nudged = _Nudge(watched, nudge, S.seed + 1)
    try:
        _, _, nudged_out = _timed(pipe, timing_prompts, S.sampler, latents, device)
    finally:
        nudged.remove()
    report = convert_to_8bit(pipe, backend=backend)
    agreement = {}
    with torch.no_grad():
        for name, (x, y, set_index) in first.io.items():
            layer = qs.layers[name]
            keep = layer.act.state.set_index
            layer.act.state.set_index = set_index
            try:
                agreement[name] = _rel_l2(layer(x), y)
            finally:
                layer.act.state.set_index = keep
    del first
    q_ms, q_peak, q_out = _timed(pipe, timing_prompts, S.sampler, latents, device)
    images = generate_images(pipe, prompts, [S.seed], S.ctx.work_dir("images"), recipe=recipe, model_id=mid,
                             settings=S.sampler, progress=progress, calibration=f"{state.name}+8bit-{backend}")
    peak = {k: v for k, v in (("fake_quant", fq_peak), ("8bit", q_peak)) if v is not None}
    fq_images = _decoded(pipe, fq_out)
    run = EightBitRun(
        recipe, backend, report, images, agreement, call_ms={"fake_quant": fq_ms, "8bit": q_ms},
        weight_bytes={"fake_quant": fq_bytes, "8bit": unet_weight_bytes(pipe.unet)}, n_layers=len(qs.layers),
        n_timed=len(timing_prompts), nudge=nudge,
        latent_rel_l2={"8bit_vs_fake_quant": _rel_l2(q_out, fq_out), "nudged_vs_fake_quant": _rel_l2(nudged_out, fq_out)},
        timed_psnr={"8bit_vs_fake_quant": psnr_per_image(_decoded(pipe, q_out), fq_images),
                    "nudged_vs_fake_quant": psnr_per_image(_decoded(pipe, nudged_out), fq_images)},
        peak_mib=peak)
    del pipe
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
        "conv_weights_only": len(run.report.weights_only),
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
        "n_images": len(run.images), "n_timed": run.n_timed, "control_nudge": run.nudge,
    }
    for k, v in run.peak_mib.items():
        row[f"peak_mib_{k}"] = v
    return row


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
            f"{r.weight_mib_fake_quant:.1f} MiB fake-quantized. On identical inputs the 8-bit layers match the "
            f"fake-quant layers to a relative L2 of {r.layer_rel_l2_median:.1e} (median; max {r.layer_rel_l2_max:.1e}). "
            f"Images: {r.psnr_vs_fake_quant_mean:.1f} dB mean PSNR to the fake-quant image (min "
            f"{r.psnr_vs_fake_quant_min:.1f}), {r.psnr_vs_fp_mean:.1f} dB to FP (fake quant: "
            f"{r.fake_quant_psnr_vs_fp_mean:.1f} dB). The control, on the {r.n_timed}-prompt timing batch: the 8-bit "
            f"images are {r.timed_psnr_8bit_vs_fake_quant:.1f} dB from the fake-quant ones (final latents: relative L2 "
            f"{r.latent_rel_l2_8bit_vs_fake_quant:.2f}); the fake-quant pipeline itself, with the output of each of "
            f"the same layers moved by a relative {r.control_nudge:.1e} (one rounding), lands "
            f"{r.timed_psnr_nudged_vs_fake_quant:.1f} dB ({r.latent_rel_l2_nudged_vs_fake_quant:.2f}) from its own "
            "images. "
            f"Median UNet call {r.call_ms_8bit:.1f} ms against "
            f"{r.call_ms_fake_quant:.1f} ms fake-quantized ({r.time_8bit_vs_fake_quant:.2f}x).")
    dev = torch.device(study.device)
    if dev.type == "cpu":
        parts.append(
            "On the CPU no 8-bit tensor-core kernel runs. The integer arithmetic is emulated exactly: "
            "`torch._int_mm` for the pixel and tensor groups, and one float64 GEMM of the exact terms for the "
            "channel groups. The time ratio is therefore the emulation's cost, not a speed result. The storage "
            "numbers are real. The Triton kernels run with `-p device cuda`; the SD-scale GPU measurements are in "
            "`benchmarks/results/8bit_sd15_h200*.md`.")
    t = study.table
    within = bool((t["timed_psnr_8bit_vs_fake_quant"] >= t["timed_psnr_nudged_vs_fake_quant"] - CONTROL_MARGIN_DB).all())
    if within:
        parts.append(
            "Why the images differ more than the layers do: each quantizer turns a rounding-level difference at its "
            "input into a whole quantization step for the few values that sit at a rounding threshold, and over "
            "every layer and step this grows. The control measures it: one rounding at each converted layer moves "
            f"the fake-quant pipeline's images as far as the 8-bit path does (within {CONTROL_MARGIN_DB:.0f} dB "
            "in every row). The layer check, on identical inputs, is the test of the 8-bit arithmetic.")
    else:
        gap = t["timed_psnr_nudged_vs_fake_quant"] - t["timed_psnr_8bit_vs_fake_quant"]
        worst = t.loc[gap.idxmax()]
        parts.append(
            f"The 8-bit images of {worst.recipe} ({worst.backend}) lie {gap.max():.1f} dB further from the fake-quant "
            f"ones than the control's, more than the {CONTROL_MARGIN_DB:.0f} dB this report allows for chance. The "
            f"control is one noise draw on {int(worst.n_timed)} prompts, so a gap of a few dB can still be chance. A "
            "large gap while the layers agree would point at what the layer check leaves out: the 3x3 convolutions, "
            "whose weights are stored in 8 bits and dequantized on every call.")
    return "\n\n".join(parts)
