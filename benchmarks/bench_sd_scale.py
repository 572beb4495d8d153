"""DGQ at Stable Diffusion scale on one GPU: UNet step latency, generation, calibration time and memory, in one run.

Model: the SD v1.5 UNet *architecture* (``UNet2DConditionModel`` with the v1.5 config written below, 859.5 M
parameters), random weights from a seeded generator, no download. The text encoder is replaced by seeded random
"text states" of SD's shape (77 x 768 per prompt, one fixed state for the empty negative prompt), and the VAE is
not run: :class:`MiniPipeline` is the smallest pipeline ``quantize_pipeline`` can calibrate and generate with
(seeded latents, classifier-free guidance, SD's PNDM scheduler, ``output_type="latent"``). So "generation" below
is the 25-step denoising loop of SD (26 UNet calls with PLMS), without text encoding (~1 ms on SD) and VAE decode.

Measured (``--device cuda --dtype float16``; every number from this one run, so the ratios compare like with like):

* UNet step latency: CUDA-event medians of ``--step-calls`` consecutive UNet calls of one sampling trajectory
  (the quantized UNet picks its per-timestep parameter set per call, as in sampling) after ``--warmup-calls``
  warm-up calls, at batch 2 x 1 and 2 x 8 (CFG doubles the batch), for FP eager / ``torch.compile`` and each
  preset eager / compiled. Compiled: ``torch.compile(unet)``; the run counts graph breaks and recompiles (dynamo's
  counters) and the relative L2 difference of compiled vs eager output (FP shows the tolerance to expect).
* 25-step generation time at batch 8 (wall time, synchronised).
* Calibration wall time of ``quantize_pipeline`` for ``--calib-prompts`` (e.g. 8, 32, 64) prompts x 25 steps,
  split into the calibration passes, the finishing of parameters and the rest, plus a linear fit
  ``time = fixed + per_prompt * n``.
* Memory: ``torch.cuda.memory_allocated`` of the FP pipeline, held after calibration and after a generation, and
  the peak during calibration and generation.
* A ``torch.profiler`` table of one quantized step (top ops by device time).

Results: a table on stdout, ``benchmarks/results/sd_scale_<device>.json`` and ``.md`` (``--out`` to change). The
file is rewritten after every section, so a run stopped by ``--deadline`` (seconds) keeps what it finished.

    python benchmarks/bench_sd_scale.py                         # one H200: the full benchmark (~8 min)
    python benchmarks/bench_sd_scale.py --tiny --out /tmp/x     # a tiny UNet on the CPU (smoke test, seconds)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgq_utils.atomic import atomic_write_text

from dgq_utils.quantize.pipeline import dequantize_pipeline, quantize_pipeline  # noqa: E402
from dgq_utils.testing.sd_scale import SD15_UNET  # noqa: E402  (SD v1.5 UNet config, 859.5 M parameters)

#: The same block structure, tiny (CPU smoke test).
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32,
)
TEXT_TOKENS = 77
PRESETS = ("baseline-w8a8", "dgq-w8a8", "dgq-w8a6")
PROMPT_WORDS = ("a", "photo", "of", "red", "blue", "dog", "cat", "house", "river", "city", "at", "night", "old",
                "painting", "forest", "car", "in", "the", "snow", "beach")


def prompts(n: int) -> list[str]:
    """``n`` distinct deterministic prompts (their text only seeds their random text states)."""
    out = []
    for i in range(n):
        words = [PROMPT_WORDS[(i * 7 + j * 3 + j * j) % len(PROMPT_WORDS)] for j in range(4 + i % 5)]
        out.append(" ".join(words) + f" #{i}")
    return out


class MiniPipeline:
    """The smallest text-to-image pipeline ``quantize_pipeline`` works with: UNet + PNDM + seeded text states.

    ``pipe(prompt=[...], num_inference_steps, guidance_scale, height, width, generator, output_type)`` runs SD's
    denoising loop (CFG batch doubling, ``scale_model_input``, ``scheduler.step``) and returns the latents in
    ``.images``. Text states: ``N(0, 1)`` of shape ``(77, cross_attention_dim)`` seeded by the prompt's CRC32
    (deterministic; the empty negative prompt has its own fixed state), in the UNet's dtype and device.
    """

    def __init__(self, unet, scheduler):
        self.unet = unet
        self.scheduler = scheduler
        self._progress_bar_config = {}

    vae_scale_factor = 8  # the latents are 1/8 of the image side, as in SD

    def set_progress_bar_config(self, **kwargs):
        self._progress_bar_config = dict(kwargs)

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    def text_states(self, texts) -> torch.Tensor:
        dim = self.unet.config.cross_attention_dim
        out = [torch.randn(TEXT_TOKENS, dim, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
               for t in texts]
        return torch.stack(out).to(self.device, self.dtype)

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps=25, guidance_scale=7.5, height=None, width=None,
                 generator=None, output_type="latent", unet=None, negative_prompt=None, eta=0.0):
        unet_call = unet if unet is not None else self.unet
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        b = len(prompt)
        cfg = guidance_scale > 1.0
        cond = self.text_states(prompt)
        if cfg:
            cond = torch.cat([self.text_states([negative_prompt or ""] * b), cond])
        side = self.unet.config.sample_size
        h = (height // 8) if height else side
        w = (width // 8) if width else side
        latents = torch.randn((b, self.unet.config.in_channels, h, w), generator=generator)
        latents = latents.to(self.device, self.dtype) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        for t in self.scheduler.timesteps:
            inp = torch.cat([latents] * 2) if cfg else latents
            inp = self.scheduler.scale_model_input(inp, t)
            noise = unet_call(inp, t, encoder_hidden_states=cond).sample
            if cfg:
                uncond, text = noise.chunk(2)
                noise = uncond + guidance_scale * (text - uncond)
            extra = {"eta": eta} if eta else {}
            latents = self.scheduler.step(noise, t, latents, **extra).prev_sample
        return SimpleNamespace(images=latents)


def build(tiny: bool, device: str, dtype: torch.dtype, seed: int = 0) -> MiniPipeline:
    from diffusers import PNDMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
    unet = unet.to(dtype=dtype).eval().requires_grad_(False)
    sched = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
                          skip_prk_steps=True)
    return MiniPipeline(unet, sched)


# ----------------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mem_mib(device) -> float | None:
    return round(torch.cuda.memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def peak_mib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def step_inputs(pipe, batch: int, seed: int = 0):
    """UNet inputs of one CFG step at ``batch`` prompts: latents ``(2b, 4, h, w)`` and text states."""
    g = torch.Generator().manual_seed(seed)
    c = pipe.unet.config
    lat = torch.randn((2 * batch, c.in_channels, c.sample_size, c.sample_size), generator=g)
    texts = prompts(batch)
    cond = torch.cat([pipe.text_states([""] * batch), pipe.text_states(texts)])
    return lat.to(pipe.device, pipe.dtype), cond


@torch.no_grad()
def time_steps(pipe, unet_call, batch: int, steps: int, warmup: int, calls: int) -> dict:
    """Median latency (ms) of ``calls`` consecutive UNet calls of one trajectory after ``warmup`` calls."""
    device = pipe.device
    lat, cond = step_inputs(pipe, batch)
    sched = pipe.scheduler
    sched.set_timesteps(steps, device=device)  # a new trajectory (the timestep controller restarts)
    ts = list(sched.timesteps)
    if warmup + calls > len(ts):
        raise ValueError(f"warmup + calls must be <= {len(ts)} UNet calls of a {steps}-step trajectory.")
    times = []
    for i, t in enumerate(ts[: warmup + calls]):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            unet_call(lat, t, encoder_hidden_states=cond)
            b.record()
            b.synchronize()
            ms = a.elapsed_time(b)
        else:
            t0 = time.perf_counter()
            unet_call(lat, t, encoder_hidden_states=cond)
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return {"median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3),
            "calls": len(times), "all_ms": [round(x, 3) for x in times]}


@torch.no_grad()
def first_output(pipe, unet_call, batch: int, steps: int) -> torch.Tensor:
    """The UNet output of the first call of a fresh trajectory (for compiled-vs-eager comparisons)."""
    lat, cond = step_inputs(pipe, batch)
    pipe.scheduler.set_timesteps(steps, device=pipe.device)
    return unet_call(lat, pipe.scheduler.timesteps[0], encoder_hidden_states=cond).sample.float()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"graph_breaks": int(sum(counters["graph_break"].values())),
            "unique_graphs": int(counters["stats"]["unique_graphs"]),
            "break_reasons": sorted(counters["graph_break"])[:8]}


@torch.no_grad()
def time_generation(pipe, batch: int, steps: int, unet=None) -> float:
    device = pipe.device
    sync(device)
    t0 = time.perf_counter()
    pipe(prompt=prompts(batch), num_inference_steps=steps, guidance_scale=7.5,
         generator=torch.Generator().manual_seed(0), unet=unet)
    sync(device)
    return round(time.perf_counter() - t0, 3)


def profile_step(pipe, batch: int, steps: int, rows: int = 18) -> list[dict]:
    """Top ops of one UNet call by device (CUDA) or CPU self time."""
    from torch.profiler import ProfilerActivity, profile

    lat, cond = step_inputs(pipe, batch)
    pipe.scheduler.set_timesteps(steps, device=pipe.device)
    cuda = pipe.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad():
        pipe.unet(lat, pipe.scheduler.timesteps[0], encoder_hidden_states=cond)  # warm
        sync(pipe.device)
        with profile(activities=acts) as prof:
            pipe.unet(lat, pipe.scheduler.timesteps[1], encoder_hidden_states=cond)
            sync(pipe.device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ev = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)
    total = sum(getattr(e, key, 0.0) for e in ev) or 1.0
    out = []
    for e in ev[:rows]:
        t = getattr(e, key, 0.0)
        out.append({"op": e.key[:80], "self_ms": round(t / 1e3, 3), "share": round(t / total, 4),
                    "calls": int(e.count)})
    return out


# ----------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.res: dict = {"settings": vars(args).copy(), "machine": machine(), "fp": {}, "presets": {},
                          "calibration": {}, "profile": {}, "errors": [], "skipped": []}

    def time_left(self) -> float:
        return self.args.deadline - (time.perf_counter() - self.t0)

    def section(self, name: str, fn, *, need_s: float = 0.0):
        """Run ``fn`` unless the deadline is near; record exceptions instead of stopping the run."""
        if self.time_left() < need_s:
            self.res["skipped"].append(name)
            print(f"[skip] {name}: {self.time_left():.0f} s left", flush=True)
            return None
        t = time.perf_counter()
        try:
            out = fn()
        except Exception as err:  # noqa: BLE001 - a benchmark reports a failed section and goes on
            import traceback

            self.res["errors"].append({"section": name, "error": f"{type(err).__name__}: {err}"[:2000],
                                       "traceback": traceback.format_exc()[-3000:]})
            print(f"[error] {name}: {type(err).__name__}: {err}", flush=True)
            out = None
        print(f"[done] {name} in {time.perf_counter() - t:.1f} s (elapsed {time.perf_counter() - self.t0:.0f} s)",
              flush=True)
        self.save()
        return out

    def save(self):
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.res["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.res["summary"] = summarize(self.res)
        atomic_write_text(out.with_suffix(".json"), json.dumps(self.res, indent=1, default=str) + "\n")
        atomic_write_text(out.with_suffix(".md"), markdown(self.res))


def machine() -> dict:
    m = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    try:
        import diffusers

        m["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    try:
        import triton

        m["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        m["gpu"] = torch.cuda.get_device_name(0)
    import subprocess

    if os.environ.get("DGQ_ATTENTION_LAUNCH"):  # launch-config override of the fused attention (a sweep's winners)
        m["attention_launch"] = os.environ["DGQ_ATTENTION_LAUNCH"]
    if os.environ.get("DGQ_GIT_COMMIT"):  # a copy without .git (the GPU machine's staging folder)
        m["git"] = os.environ["DGQ_GIT_COMMIT"]
        return m
    try:
        m["git"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        m["git"] = None
    return m


def compiled(unet, mode: str = "default"):
    import torch._dynamo

    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    return torch.compile(unet, dynamic=False, mode=None if mode == "default" else mode)


def graphed(pipe):
    """The UNet call replayed from CUDA graphs (``dgq_utils.quantize.graphs.CUDAGraphUNet``), or ``None``."""
    if pipe.device.type != "cuda":
        return None
    try:
        from dgq_utils.quantize.graphs import CUDAGraphUNet
    except ImportError:  # pragma: no cover - before CUDA graphs existed
        return None
    return CUDAGraphUNet(pipe)


def bench_variant(run: Run, pipe, tag: str, slot: dict):
    a = run.args
    for b in a.batches:
        slot[f"eager_b{b}"] = run.section(f"{tag} eager step batch 2x{b}",
                                          lambda b=b: time_steps(pipe, pipe.unet, b, a.steps, a.warmup_calls,
                                                                 a.step_calls))
    slot["generation_s"] = run.section(f"{tag} {a.steps}-step generation batch {a.gen_batch}",
                                       lambda: time_generation(pipe, a.gen_batch, a.steps))
    if a.graphs and pipe.device.type == "cuda":
        slot["graph"] = run.section(f"{tag} CUDA graphs", lambda: bench_graphs(pipe, a), need_s=20)
    run.save()


def bench_graphs(pipe, a) -> dict:
    """Steps and generation replayed from CUDA graphs (one capture per batch shape), with the relative L2 of the
    graphed output vs eager for the first call of a trajectory."""
    g = graphed(pipe)
    info = {}
    for b in a.batches:
        ref = first_output(pipe, pipe.unet, b, a.steps)
        got = first_output(pipe, g, b, a.steps)  # captures this shape
        info[f"rel_l2_vs_eager_b{b}"] = rel_l2(got, ref)
        info[f"b{b}"] = time_steps(pipe, g, b, a.steps, a.warmup_calls, a.step_calls)
    sync(pipe.device)
    t0 = time.perf_counter()
    pipe(prompt=prompts(a.gen_batch), num_inference_steps=a.steps, guidance_scale=7.5,
         generator=torch.Generator().manual_seed(0), unet=g)
    sync(pipe.device)
    info["generation_s_incl_capture"] = round(time.perf_counter() - t0, 3)
    info["generation_s"] = time_generation(pipe, a.gen_batch, a.steps, unet=g)
    info["captures"] = g.captures
    info["memory_with_graphs_mib"] = mem_mib(pipe.device)
    g.reset()
    del g
    torch.cuda.empty_cache()
    return info


def bench_channels_last(pipe, a) -> dict:
    """Eager (and graphed) step at the largest batch with the UNet's weights in channels-last memory format
    (cuDNN's NHWC kernels without NCHW <-> NHWC conversions); the UNet is put back afterwards."""
    unet = pipe.unet
    b = max(a.batches)
    ref = first_output(pipe, unet, b, a.steps)
    unet.to(memory_format=torch.channels_last)
    try:
        info = {"rel_l2_vs_eager": rel_l2(first_output(pipe, unet, b, a.steps), ref),
                f"eager_b{b}": time_steps(pipe, unet, b, a.steps, a.warmup_calls, a.step_calls)}
        g = graphed(pipe)
        if g is not None:
            first_output(pipe, g, b, a.steps)
            info[f"graph_b{b}"] = time_steps(pipe, g, b, a.steps, a.warmup_calls, a.step_calls)
            g.reset()
    finally:
        unet.to(memory_format=torch.contiguous_format)
        torch.cuda.empty_cache()
    return info


def bench_compiled(run: Run, pipe, tag: str, slot: dict, mode: str = "default"):
    """``torch.compile(unet, mode=mode)`` at the compile batches: first-call time, steps, graph breaks, recompiles
    across the timesteps of the trajectory, relative L2 of compiled vs eager output."""
    a = run.args

    def comp():
        cu = compiled(pipe.unet, mode)
        info = {}
        for b in a.compile_batches:
            t = time.perf_counter()
            ref = first_output(pipe, pipe.unet, b, a.steps)
            got = first_output(pipe, cu, b, a.steps)
            sync(pipe.device)
            info[f"first_call_b{b}_s"] = round(time.perf_counter() - t, 1)
            info[f"rel_l2_vs_eager_b{b}"] = rel_l2(got, ref)
            info[f"b{b}"] = time_steps(pipe, cu, b, a.steps, a.warmup_calls, a.step_calls)
        info["rel_l2_vs_eager"] = max(v for k, v in info.items() if k.startswith("rel_l2_vs_eager_b"))
        info.update(dynamo_counts())
        # recompiles across timesteps: graphs beyond one per compiled batch shape
        info["recompiles"] = max(0, info["unique_graphs"] - len(a.compile_batches))
        return info

    key = "compiled" if mode == "default" else f"compiled_{mode}"
    slot[key] = run.section(f"{tag} torch.compile mode={mode}", comp, need_s=a.compile_need_s)
    run.save()


def run_all(args) -> dict:
    """Eager measurements of FP and every preset first (saving each preset's calibrated state), then the
    compiled ones (re-loading the states: no second calibration) while ``--deadline`` allows."""
    import tempfile

    try:
        from dgq_utils.quantize.state import load_quant_state, save_quant_state
    except ImportError:  # pragma: no cover - old layout
        from dgq_utils.pipeline import load_quant_state, save_quant_state
    run = Run(args)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    pipe = run.section("build", lambda: build(args.tiny, args.device, dtype))
    if pipe is None:
        return run.res
    fp = run.res["fp"]
    fp["unet_params_m"] = round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 1)
    sync(device)
    fp["memory_mib"] = mem_mib(device)
    reset_peak(device)
    bench_variant(run, pipe, "fp", fp)
    fp["peak_mib"] = peak_mib(device)
    if "fp" in args.profile_presets:
        run.res["profile"]["fp"] = run.section("fp profile", lambda: profile_step(pipe, max(args.batches),
                                                                                  args.steps))
    if args.channels_last and device.type == "cuda":
        fp["channels_last"] = run.section("fp channels-last", lambda: bench_channels_last(pipe, args), need_s=20)
    early = args.compile_modes[0] if args.compile and args.compile_early else None
    done = set()  # (tag, mode) compiled already
    if early is not None and args.fp_compile:
        bench_compiled(run, pipe, "fp", fp, early)
        done.add(("fp", early))

    tmp = tempfile.TemporaryDirectory(prefix="dgq_bench_")
    states = {}
    cal_sizes = sorted(set(args.calib_prompts))
    for name in args.presets:
        slot = run.res["presets"].setdefault(name, {})
        cal = run.section(f"{name} calibration {cal_sizes[0]} prompts",
                          lambda name=name: calibrate_once(pipe, name, cal_sizes[0], args, device), need_s=20)
        if cal is None:
            dequantize_pipeline(pipe)
            continue
        slot["calibration"] = cal
        run.res["calibration"].setdefault(name, {})[str(cal_sizes[0])] = cal
        if name in args.compile_presets:
            states[name] = Path(tmp.name) / f"{name}.safetensors"
            save_quant_state(pipe, states[name])
        reset_peak(device)
        bench_variant(run, pipe, name, slot)
        slot["memory_after_generation_mib"] = mem_mib(device)
        slot["peak_inference_mib"] = peak_mib(device)
        if name in args.profile_presets:
            run.res["profile"][name] = run.section(f"{name} profile", lambda: profile_step(pipe, max(args.batches),
                                                                                           args.steps))
            run.save()
        if args.channels_last and device.type == "cuda" and name in args.profile_presets:
            slot["channels_last"] = run.section(f"{name} channels-last", lambda: bench_channels_last(pipe, args),
                                                need_s=20)
        if early is not None and name in args.compile_presets:  # still quantized from this calibration
            if run.time_left() < args.compile_need_s:
                run.res["skipped"].append(f"{name} torch.compile mode={early}")
            else:
                bench_compiled(run, pipe, name, slot, early)
            done.add((name, early))
        for n in cal_sizes[1:]:
            if name not in args.calib_presets:
                break

            def again(name=name, n=n):
                dequantize_pipeline(pipe)
                return calibrate_once(pipe, name, n, args, device)

            cal_n = run.section(f"{name} calibration {n} prompts", again, need_s=args.calib_need_s * n / 64)
            if cal_n is not None:
                run.res["calibration"][name][str(n)] = cal_n
        dequantize_pipeline(pipe)
        release_attention_workspace()
        run.save()
    if args.compile:
        for mode in args.compile_modes:
            if args.fp_compile and ("fp", mode) not in done:
                bench_compiled(run, pipe, "fp", fp, mode)
            for name in args.compile_presets:
                if name not in states or (name, mode) in done:
                    continue
                if run.time_left() < args.compile_need_s:
                    run.res["skipped"].append(f"{name} torch.compile mode={mode}")
                    continue
                load_quant_state(pipe, states[name])
                bench_compiled(run, pipe, name, run.res["presets"][name], mode)
                dequantize_pipeline(pipe)
    tmp.cleanup()
    run.save()
    return run.res


def release_attention_workspace():
    for mod in ("dgq_utils.model.attention", "dgq_utils.attention"):
        try:
            m = __import__(mod, fromlist=["release_workspace"])
        except ImportError:
            continue
        m.release_workspace()
        return


def calibrate_once(pipe, name: str, n: int, args, device) -> dict:
    sync(device)
    reset_peak(device)
    before = mem_mib(device)
    t = time.perf_counter()
    try:  # the sampler settings as one object (current API)
        from dgq_utils.config import SamplerSettings

        sampler = SamplerSettings(num_inference_steps=args.steps, guidance_scale=7.5, batch_size=args.calib_batch)
        report = quantize_pipeline(pipe, name, prompts(n), sampler, progress=False)
    except ImportError:  # pragma: no cover - the API before SamplerSettings (the "before" measurement)
        report = quantize_pipeline(pipe, name, prompts(n), num_inference_steps=args.steps, guidance_scale=7.5,
                                   batch_size=args.calib_batch, progress=False)
    sync(device)
    wall = time.perf_counter() - t
    cal = report.calibration
    out = {"prompts": n, "wall_s": round(wall, 2), "calibrate_s": cal.get("seconds"),
           "memory_before_mib": before, "memory_after_mib": mem_mib(device), "peak_mib": peak_mib(device)}
    for k in ("seconds_passes", "seconds_finalize", "seconds_groups"):
        if k in cal:
            out[k] = cal[k]
    if cal.get("seconds") is not None:  # layer swap + weight range search (+ the report)
        out["install_s"] = round(wall - cal["seconds"], 2)
    return out


# ----------------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------------
def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def summarize(res: dict) -> dict:
    s: dict = {}
    fp = res.get("fp", {})
    batches = res["settings"]["batches"]
    big = max(batches)
    fpe = _get(fp, f"eager_b{big}", "median_ms")
    fpc = _get(fp, "compiled", f"b{big}", "median_ms")
    fpm = fp.get("memory_mib")
    for name, slot in res.get("presets", {}).items():
        e = _get(slot, f"eager_b{big}", "median_ms")
        c = _get(slot, "compiled", f"b{big}", "median_ms")
        held = _get(slot, "calibration", "memory_after_mib")
        row = {"eager_vs_fp": round(e / fpe, 3) if e and fpe else None,
               "compiled_vs_fp_compiled": round(c / fpc, 3) if c and fpc else None,
               "memory_vs_fp": round(held / fpm, 3) if held and fpm else None}
        for mode, (got, ref) in _modes(slot, fp, big).items():  # the other execution modes, informative
            row[f"{mode}_vs_fp_same_mode"] = round(got / ref, 3) if got and ref else None
            row[f"{mode}_vs_fp_eager"] = round(got / fpe, 3) if got and fpe else None
        cal = res.get("calibration", {}).get(name, {})
        pts = sorted((int(k), v["wall_s"]) for k, v in cal.items())
        if len(pts) >= 2:
            xs, ys = zip(*pts)
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            row["calibration_fixed_s"] = round(my - slope * mx, 2)
            row["calibration_per_prompt_s"] = round(slope, 3)
        if "64" in cal:
            row["calibration_64_s"] = cal["64"]["wall_s"]
        row["goals"] = {
            "step_eager<=1.3x": None if row["eager_vs_fp"] is None else row["eager_vs_fp"] <= 1.3,
            "step_compiled<=1.3x": (None if row["compiled_vs_fp_compiled"] is None
                                    else row["compiled_vs_fp_compiled"] <= 1.3),
            "calibration_64<=45s": None if "calibration_64_s" not in row else row["calibration_64_s"] <= 45,
            "calibration_fixed<=5s": (None if "calibration_fixed_s" not in row
                                      else row["calibration_fixed_s"] <= 5),
            "memory<=1.1x": None if row["memory_vs_fp"] is None else row["memory_vs_fp"] <= 1.1,
        }
        s[name] = row
    return s


#: execution modes of the modes table: name -> where its step median sits in a slot ({b}: the batch)
MODES = {
    "eager": ("eager_b{b}",),
    "CUDA graphs": ("graph", "b{b}"),
    "channels-last eager": ("channels_last", "eager_b{b}"),
    "channels-last CUDA graphs": ("channels_last", "graph_b{b}"),
    "compiled": ("compiled", "b{b}"),
    "compiled reduce-overhead": ("compiled_reduce-overhead", "b{b}"),
}


def _mode_ms(slot: dict, mode: str, b: int):
    return _get(slot, *[k.format(b=b) for k in MODES[mode]], "median_ms")


def _modes(slot: dict, fp: dict, b: int) -> dict:
    """mode -> (this variant's step, FP's step in the same mode), for the modes this variant was measured in."""
    out = {}
    for mode in MODES:
        got = _mode_ms(slot, mode, b)
        if got is not None and mode != "eager":
            out[mode.replace(" ", "_")] = (got, _mode_ms(fp, mode, b))
    return out


def _f(v, nd=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown(res: dict) -> str:
    st = res["settings"]
    batches = st["batches"]
    m = res["machine"]
    lines = [f"# DGQ at SD scale ({'tiny UNet' if st['tiny'] else 'SD v1.5 UNet architecture'}, random weights, "
             f"{st['dtype']}, {m.get('gpu', st['device'])})", "",
             f"torch {m.get('torch')}, diffusers {m.get('diffusers')}, triton {m.get('triton')}, git "
             f"{m.get('git')}; UNet {res['fp'].get('unet_params_m')} M parameters; {st['steps']} PNDM steps; "
             f"step = median of {st['step_calls']} UNet calls after {st['warmup_calls']} warm-up calls "
             f"({'CUDA events' if st['device'] == 'cuda' else 'wall clock'}); elapsed {res.get('elapsed_s')} s."
             + (f" Fused-attention launch override `DGQ_ATTENTION_LAUNCH={m['attention_launch']}`."
                if m.get("attention_launch") else ""),
             "", "Command: `python benchmarks/bench_sd_scale.py " + " ".join(st.get("argv", [])) + "`", ""]
    hdr = ["recipe"] + [f"step 2×{b} (ms)" for b in batches] + [f"vs FP 2×{max(batches)}"]
    cbatches = st.get("compile_batches") or [max(batches)]
    hdr += [f"compiled 2×{b} (ms)" for b in cbatches] + ["vs FP compiled", "compiled rel. L2 vs eager",
                                                        "graph breaks", "recompiles",
                                                        f"{st['steps']}-step gen. batch {st['gen_batch']} (s)",
                                                        "memory held (MiB)", "peak (MiB)"]
    lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    fp = res["fp"]
    big = max(batches)
    fpe = _get(fp, f"eager_b{big}", "median_ms")
    fpc = _get(fp, "compiled", f"b{big}", "median_ms")

    def row(name, slot, held, peak):
        e = [_get(slot, f"eager_b{b}", "median_ms") for b in batches]
        c = [_get(slot, "compiled", f"b{b}", "median_ms") for b in cbatches]
        comp = slot.get("compiled") or {}
        r = [name] + [_f(x) for x in e] + [_f(e[-1] / fpe, 2) if e[-1] and fpe else "–"]
        r += [_f(x) for x in c] + [_f(c[-1] / fpc, 2) if c[-1] and fpc else "–",
                                   _f(comp.get("rel_l2_vs_eager"), 4) if comp else "–",
                                   _f(comp.get("graph_breaks")), _f(comp.get("recompiles")),
                                   _f(slot.get("generation_s"), 2), _f(held), _f(peak)]
        lines.append("| " + " | ".join(r) + " |")

    row("FP", fp, fp.get("memory_mib"), fp.get("peak_mib"))
    for name, slot in res["presets"].items():
        row(name, slot, _get(slot, "calibration", "memory_after_mib"), slot.get("peak_inference_mib"))
    variants = [("FP", fp)] + list(res["presets"].items())
    measured = [m for m in MODES if any(_mode_ms(sl, m, big) is not None for _, sl in variants)]
    if len(measured) > 1:
        lines += ["", f"## Execution modes at batch 2×{big} (UNet step, ms; ratio to FP in the same mode, and to "
                  "FP eager)", "", "| recipe | " + " | ".join(measured) + " |", "|---|" + "---|" * len(measured)]
        for name, sl in variants:
            cells = []
            for mode in measured:
                got, ref = _mode_ms(sl, mode, big), _mode_ms(fp, mode, big)
                if got is None:
                    cells.append("–")
                elif name == "FP":
                    cells.append(f"{got:.1f} ({got / fpe:.2f}× eager)" if fpe and mode != "eager" else f"{got:.1f}")
                else:
                    same = f"{got / ref:.2f}×" if ref else "–"
                    cells.append(f"{got:.1f} ({same}; {got / fpe:.2f}× FP eager)" if fpe else f"{got:.1f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        gr = [(name, sl["graph"]) for name, sl in variants if isinstance(sl.get("graph"), dict)]
        if gr:
            lines += ["", "CUDA graphs (`dgq_utils.quantize.graphs.CUDAGraphUNet`): " + "; ".join(
                f"{name}: relative L2 vs eager {max(v for k, v in g.items() if k.startswith('rel_l2')):.1e}, "
                f"{st['steps']}-step generation {_f(g.get('generation_s'), 2)} s"
                f" ({_f(g.get('memory_with_graphs_mib'))} MiB held with the graphs)" for name, g in gr) + "."]
        ro = [(name, sl["compiled_reduce-overhead"]) for name, sl in variants
              if isinstance(sl.get("compiled_reduce-overhead"), dict)]
        if ro:
            lines += ["", "`torch.compile(mode='reduce-overhead')`: " + "; ".join(
                f"{name}: rel. L2 vs eager {_f(c.get('rel_l2_vs_eager'), 4)}, graph breaks {c.get('graph_breaks')}, "
                f"recompiles {c.get('recompiles')}, first call {_f(c.get(f'first_call_b{big}_s'))} s"
                for name, c in ro) + "."]
    if res["calibration"]:
        lines += ["", "## Calibration (quantize_pipeline wall time, s)", "",
                  "| recipe | prompts | wall | layer swap + weight search | calibrate | passes | finishing | "
                  "of which K-means | peak (MiB) | held after (MiB) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, per in res["calibration"].items():
            for n, c in sorted(per.items(), key=lambda kv: int(kv[0])):
                lines.append(f"| {name} | {n} | {_f(c['wall_s'], 2)} | {_f(c.get('install_s'), 2)} | "
                             f"{_f(c.get('calibrate_s'), 2)} | "
                             f"{_f(c.get('seconds_passes'), 2)} | {_f(c.get('seconds_finalize'), 2)} | "
                             f"{_f(c.get('seconds_groups'), 2)} | "
                             f"{_f(c.get('peak_mib'))} | {_f(c.get('memory_after_mib'))} |")
    summ = res.get("summary", {})
    if summ:
        lines += ["", "## Goals", "", "| recipe | eager vs FP | compiled vs FP compiled | memory vs FP | "
                  "calibration fixed (s) | per prompt (s) | 64 prompts (s) | goals met |", "|---|---|---|---|---|---|---|---|"]
        for name, r in summ.items():
            met = ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in r["goals"].items() if v is not None)
            lines.append(f"| {name} | {_f(r['eager_vs_fp'], 2)} | {_f(r['compiled_vs_fp_compiled'], 2)} | "
                         f"{_f(r['memory_vs_fp'], 3)} | {_f(r.get('calibration_fixed_s'), 2)} | "
                         f"{_f(r.get('calibration_per_prompt_s'), 3)} | {_f(r.get('calibration_64_s'), 2)} | "
                         f"{met or '–'} |")
    for name, prof in res.get("profile", {}).items():
        if not prof:
            continue
        lines += ["", f"## Profile of one {name} UNet call at batch 2×{big} (self time, top ops)", "",
                  "| op | self (ms) | share | calls |", "|---|---|---|---|"]
        lines += [f"| `{p['op']}` | {p['self_ms']:.2f} | {100 * p['share']:.1f} % | {p['calls']} |" for p in prof]
    if res["errors"] or res["skipped"]:
        lines += ["", "## Errors / skipped", ""]
        lines += [f"- error in {e['section']}: {e['error'][:300]}" for e in res["errors"]]
        lines += [f"- skipped (deadline): {s}" for s in res["skipped"]]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny UNet on the CPU (smoke test)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument("--dtype", default=None, help="default: float16 (float32 with --tiny)")
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--batches", nargs="+", type=int, default=None, help="prompts per step (CFG doubles): 1 8")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup-calls", type=int, default=3)
    p.add_argument("--step-calls", type=int, default=10)
    p.add_argument("--gen-batch", type=int, default=None, help="prompts of the timed generation (8)")
    p.add_argument("--calib-prompts", nargs="+", type=int, default=None, help="8 32 64")
    p.add_argument("--calib-presets", nargs="+", default=["dgq-w8a8"],
                   help="presets calibrated at every --calib-prompts size (the others at the smallest only)")
    p.add_argument("--calib-batch", type=int, default=8)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--no-fp-compile", dest="fp_compile", action="store_false",
                   help="compile only the presets (when the device time is short; FP compiled from another run)")
    p.add_argument("--compile-presets", nargs="+", default=list(PRESETS))
    p.add_argument("--compile-batches", nargs="+", type=int, default=None,
                   help="batches timed compiled (default: the largest of --batches; each shape compiles anew)")
    p.add_argument("--profile-presets", nargs="+", default=["fp", "dgq-w8a8"],
                   help="variants profiled (one UNet call at the largest batch); 'fp' for the FP UNet")
    p.add_argument("--compile-early", action="store_true",
                   help="compile (first of --compile-modes) right after each variant's eager measurements, before "
                        "the larger calibrations and the next presets, so a --deadline keeps the compiled numbers")
    p.add_argument("--compile-modes", nargs="+", default=["default"],
                   help="torch.compile modes measured: default, reduce-overhead (CUDA graphs), ...")
    p.add_argument("--no-graphs", dest="graphs", action="store_false",
                   help="skip the CUDA-graph replay (dgq_utils.quantize.graphs.CUDAGraphUNet) of every variant")
    p.add_argument("--channels-last", action="store_true",
                   help="also time FP and the profiled presets with channels-last weights (GPU)")
    p.add_argument("--deadline", type=float, default=1e9, help="seconds: skip sections that would not fit")
    p.add_argument("--compile-need-s", type=float, default=60.0)
    p.add_argument("--calib-need-s", type=float, default=60.0, help="expected seconds for 64 prompts")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.tiny:
        args.device = args.device or "cpu"
        args.dtype = args.dtype or "float32"
        args.batches = args.batches or [1, 2]
        args.gen_batch = args.gen_batch or 2
        args.calib_prompts = args.calib_prompts or [2, 4]
        args.out = args.out or str(ROOT / "benchmarks" / "results" / "sd_scale_tiny_cpu")
    else:
        args.device = args.device or "cuda"
        args.dtype = args.dtype or "float16"
        args.batches = args.batches or [1, 8]
        args.gen_batch = args.gen_batch or 8
        args.calib_prompts = args.calib_prompts or [8, 32, 64]
        args.out = args.out or str(ROOT / "benchmarks" / "results" / f"sd_scale_{'h200' if args.device == 'cuda' else args.device}")
    args.compile_batches = args.compile_batches or [max(args.batches)]
    args.out = str(Path(args.out).with_suffix(""))
    return args


def main(argv=None):
    args = parse_args(argv)
    res = run_all(args)
    print(markdown(res))
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
