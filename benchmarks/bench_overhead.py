"""Per-step time of the fake-quantized UNet (default recipe ``dgq-w8a6``) relative to FP, on CPU, in one run.

What is measured: the wall time of every UNet call (forward pre-hook -> forward hook) during seeded text-to-image
generations (CFG on, so each call sees a doubled batch). The pipeline is calibrated once and its state saved; then
each round runs three generations back to back -- the pristine FP pipeline, the quantized pipeline (re-loaded from
the saved state) with quantization switched off (``set_quantization_enabled(pipe, False)``: shows the wrappers
cost nothing), and the quantized pipeline -- so drifting machine load hits all alike. Round 0 is a warm-up.
Reported: median per-step time of each variant, ratio quantized / pristine FP, the per-round ratios, and the
quantize (calibration) time. Goal: ratio <= 1.5.

Model (``--size auto``, default): the embedded model from ``dgq_utils.model.loading.load_pipeline()`` when its weights
exist, else a mid-size random-weight SD-like pipeline (``--size mid``: UNet widths 128/256/256,
2 layers per block, 8 heads, 32x32 latents = 256 px images, 41 M UNet parameters); ``--model`` loads any local
SD v1.x folder. The tiny test pipeline is available as ``--size tiny`` but is dominated by Python
overhead and not meaningful for this ratio.

Results go to ``benchmarks/results/overhead_cpu.json`` and ``.md`` (written atomically with ``dgq_utils.atomic``).

    python benchmarks/bench_overhead.py [--recipe dgq-w8a6] [--steps 4] [--repeats 3] [--threads N] [--size auto] [--model PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgq_utils.atomic import atomic_write_text  # noqa: E402
from dgq_utils.model.loading import load_pipeline  # noqa: E402
from dgq_utils.config import SamplerSettings  # noqa: E402
from dgq_utils.quantize.pipeline import dequantize_pipeline, quantize_pipeline, set_quantization_enabled
from dgq_utils.quantize.state import load_quant_state, save_quant_state
from dgq_utils.testing.tiny import TINY_PROMPTS, build_tiny_pipeline  # noqa: E402

SIZES = {
    "tiny": dict(),
    "mid": dict(block_out_channels=(128, 256, 256), layers_per_block=2, attention_heads=8, sample_size=32,
                cross_attention_dim=128, text_layers=2),
}


def build_pipeline(model: str | None, size: str):
    """``--model`` or the embedded model (``--size auto``/``embedded``) via dgq_utils.model.loading, else random."""
    if model is not None:
        return load_pipeline(model), f"load_pipeline({model!r})"
    if size in ("auto", "embedded"):
        try:
            return load_pipeline(), "embedded model (load_pipeline())"
        except FileNotFoundError as err:
            if size == "embedded":
                raise
            print(f"note: embedded model unavailable ({type(err).__name__}); using the random 'mid' pipeline")
    size = "mid" if size in ("auto", "embedded") else size
    return build_tiny_pipeline(seed=0, **SIZES[size]), f"random SD-like pipeline ({size}: {SIZES[size]})"


class StepTimer:
    """Records the wall time of every UNet forward call."""

    def __init__(self, unet):
        self.times: list[float] = []
        self._t0 = None
        self._h = [unet.register_forward_pre_hook(self._pre), unet.register_forward_hook(self._post)]

    def _pre(self, *_):
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self.times.append(time.perf_counter() - self._t0)

    def take(self) -> list[float]:
        out, self.times = self.times, []
        return out

    def remove(self):
        for h in self._h:
            h.remove()


def generate(pipe, prompts, steps, seed=0):
    pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=7.5,
         generator=torch.Generator().manual_seed(seed), output_type="latent")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="dgq-w8a6")
    ap.add_argument("--model", default=None, help="model id/path for dgq_utils.model.loading.load_pipeline")
    ap.add_argument("--size", default="auto", choices=["auto", "embedded", "mid", "tiny"],
                    help="auto: the embedded model if available, else 'mid'")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="measured rounds (after one warm-up round)")
    ap.add_argument("--batch", type=int, default=1, help="prompts per generation (CFG doubles it)")
    ap.add_argument("--calib-prompts", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overhead_cpu"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe, model_desc = build_pipeline(args.model, args.size)
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    prompts = list(TINY_PROMPTS[: args.batch])

    t0 = time.perf_counter()
    report = quantize_pipeline(pipe, args.recipe, list(TINY_PROMPTS[: args.calib_prompts]),
                               SamplerSettings(num_inference_steps=args.steps, batch_size=args.calib_prompts),
                               progress=False)
    quantize_s = time.perf_counter() - t0
    state_file = Path(tempfile.mkdtemp(prefix="dgq_bench_")) / "state.safetensors"
    save_quant_state(pipe, state_file)
    quantized_tensors = int((~report.layers["skipped"]).sum())
    dequantize_pipeline(pipe)

    times = {"fp": [], "fp_switched": [], "q": []}
    round_ratios = []
    for r in range(args.repeats + 1):  # round 0 is the warm-up
        per_round = {}
        for variant in ("fp", "fp_switched", "q"):
            if variant == "fp":
                dequantize_pipeline(pipe)
            elif variant == "fp_switched":
                load_quant_state(pipe, state_file)
                set_quantization_enabled(pipe, False)
            else:
                set_quantization_enabled(pipe, True)
            timer = StepTimer(pipe.unet)
            generate(pipe, prompts, args.steps)
            per_round[variant] = timer.take()
            timer.remove()
        if r > 0:
            for k, v in per_round.items():
                times[k] += v
            round_ratios.append(statistics.median(per_round["q"]) / statistics.median(per_round["fp"]))
    dequantize_pipeline(pipe)
    state_file.unlink()

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["q"] / med["fp"]
    result = {
        "recipe": args.recipe,
        "model": model_desc,
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "latent_hw": [pipe.unet.config.sample_size] * 2,
        "batch_per_call": 2 * args.batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "median_step_s_fp": med["fp"],
        "median_step_s_fp_switched_off": med["fp_switched"],
        "median_step_s_quant": med["q"],
        "ratio": ratio,
        "ratio_per_round": round_ratios,
        "ratio_per_round_median": statistics.median(round_ratios),
        "goal": 1.5,
        "quantize_s": quantize_s,
        "step_times": times,
        "quantized_tensors": quantized_tensors,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    rows = [
        ("FP (pristine pipeline)", med["fp"], 1.0),
        ("FP (quantized, switched off)", med["fp_switched"], med["fp_switched"] / med["fp"]),
        (f"{args.recipe} fake-quant", med["q"], ratio),
    ]
    md = [f"# Fake-quant overhead on CPU ({args.recipe})", "",
          f"model: {model_desc}; UNet parameters: {result['unet_parameters']:,}; latents "
          f"{result['latent_hw'][0]}x{result['latent_hw'][1]}, batch per UNet call {result['batch_per_call']}, "
          f"{args.steps} steps x {args.repeats} repeats, {result['threads']} threads", "",
          "| variant | median s / step | ratio vs FP |", "|---|---:|---:|"]
    md += [f"| {n} | {t:.4f} | {r:.3f} |" for n, t, r in rows]
    md += ["", f"per-round ratios (median of Q steps / median of FP steps, same round): "
           + ", ".join(f"{x:.3f}" for x in round_ratios) + f"; median {statistics.median(round_ratios):.3f}",
           f"calibration + quantize: {quantize_s:.1f} s; load average at the end: {result['load_average']}", ""]
    text = "\n".join(md)
    print(text)
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2))
    atomic_write_text(out.with_suffix(".md"), text)
    return result


if __name__ == "__main__":
    main()
