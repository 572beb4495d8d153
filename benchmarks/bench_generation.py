"""Images per second on this CPU (or a GPU): FP vs ``dgq-w8a6``, through the generation runner, in one run.

    python benchmarks/bench_generation.py                 # embedded model if data/embedded exists, else tiny
    python benchmarks/bench_generation.py --model tiny --n-images 8 --steps 25
    python benchmarks/bench_generation.py --device cuda --n-images 1000 --batch-size 500 --n-calibration 64 \
        --out benchmarks/results/generation_cuda

Writes ``benchmarks/results/generation_cpu.json`` and ``.md``: images/s (and s/image) for FP and the quantized
recipe, the calibration time, and what those imply for the embedded comparison's default N
(:data:`dgq_utils.evaluate.EMBEDDED_N_PROMPTS`): FP once + 6 quantized recipes, each calibrated once.
Timings exclude model loading; images are generated into a temporary cache (nothing reused between runs). Each
batch is timed separately and the fastest batch is reported (with the median): on a shared machine it is the one
least disturbed by other processes. The 1-minute load average is recorded too.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("auto", "embedded", "tiny"), default="auto")
    ap.add_argument("--model-path", default=None,
                    help="a diffusers folder of the embedded architecture to use instead of data/embedded/pipeline")
    ap.add_argument("--recipe", default="dgq-w8a6")
    ap.add_argument("--n-images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n-calibration", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: 1 on a machine with <= 2 cores -- two OpenMP threads next to any "
                         "other process were up to 100x slower there -- else torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default=None,
                    help="output stem (default benchmarks/results/generation_<device type>)")
    a = ap.parse_args()
    if a.out is None:
        a.out = str(ROOT / "benchmarks" / "results" / f"generation_{a.device.split(':')[0]}")

    import numpy as np
    import torch

    if a.threads is None and (os.cpu_count() or 1) <= 2:
        a.threads = 1
    if a.threads:
        torch.set_num_threads(a.threads)
    from dgq_utils.atomic import atomic_write_json, atomic_write_text
    from dgq_utils.evaluate.compare import DEFAULT_RECIPES, EMBEDDED_N_PROMPTS
    from dgq_utils.config import SamplerSettings
    from dgq_utils.generate.images import generate_images, model_identity
    from dgq_utils.model.loading import EMBEDDED_PIPELINE_DIR
    from dgq_utils.quantize.pipeline import dequantize_pipeline, quantize_pipeline

    use_embedded = a.model_path is not None or a.model == "embedded" or (
        a.model == "auto" and (EMBEDDED_PIPELINE_DIR / "model_index.json").exists())
    if use_embedded:
        from dgq_utils.evaluate.compare import embedded_calibration_prompts, embedded_prompts
        from dgq_utils.model.loading import load_pipeline

        pipe = load_pipeline(a.model_path, device=a.device)
        prompts, _ = embedded_prompts(a.n_images)
        calib = embedded_calibration_prompts(a.n_calibration, exclude=prompts)
        model_name = "embedded" if a.model_path is None else f"embedded architecture ({a.model_path})"
    else:
        from dgq_utils.testing.tiny import TINY_PROMPTS, build_tiny_pipeline

        pipe = build_tiny_pipeline(seed=0, scheduler="pndm").to(a.device)
        prompts = [TINY_PROMPTS[i % 4] for i in range(a.n_images)]  # repeated texts get their own index/noise
        calib = list(TINY_PROMPTS[4:8])
        model_name = "tiny"
    pipe.set_progress_bar_config(disable=True)
    settings = SamplerSettings(num_inference_steps=a.steps, guidance_scale=7.5, batch_size=a.batch_size)
    res = settings.resolved(pipe)
    mid = model_identity(pipe)

    def timed_generation(recipe, root):
        """Seconds per image of each batch (one generate_images call per batch, fresh images every time)."""
        per_image = []
        for b in range(0, len(prompts), a.batch_size):
            chunk = prompts[b:b + a.batch_size]
            t0 = time.perf_counter()
            r = generate_images(pipe, chunk, [0], root, recipe=recipe, model_id=mid, settings=settings,
                                progress=False, prompt_indices=list(range(b, b + len(chunk))))
            per_image.append((time.perf_counter() - t0) / len(chunk))
            assert r.generated == len(chunk)
        return per_image

    out: dict = {"model": model_name, "recipe": a.recipe, "n_images": len(prompts), "steps": a.steps,
                 "batch_size": a.batch_size, "resolution": f"{res.height}x{res.width}",
                 "scheduler": type(pipe.scheduler).__name__, "torch_threads": torch.get_num_threads(),
                 "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                 "device": a.device,
                 "device_name": torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up (first-call allocations) on one batch, not timed
        generate_images(pipe, prompts[:1], [99], Path(tmp) / "warm", model_id=mid, settings=settings, progress=False)
        fp_batches = timed_generation(None, Path(tmp) / "fp")
        t0 = time.perf_counter()
        quantize_pipeline(pipe, a.recipe, calib, res.replace(batch_size=min(a.batch_size, len(calib))),
                          progress=False)
        out["calibration_seconds"] = round(time.perf_counter() - t0, 3)
        out["n_calibration"] = len(calib)
        q_batches = timed_generation(a.recipe, Path(tmp) / "q")
        dequantize_pipeline(pipe)
    n = len(prompts)
    out["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    busy = out["load_average_1m_at_end"] > (os.cpu_count() or 1) + 0.5
    out["machine_busy"] = busy
    # per batch: the fastest batch is the least disturbed by other processes on a shared machine
    out["fp_s_per_image_batches"] = [round(x, 4) for x in fp_batches]
    out["quant_s_per_image_batches"] = [round(x, 4) for x in q_batches]
    per_fp, per_q = min(fp_batches), min(q_batches)
    out["fp_images_per_s"] = round(1 / per_fp, 3)
    out["quant_images_per_s"] = round(1 / per_q, 3)
    out["fp_images_per_s_median_batch"] = round(1 / float(np.median(fp_batches)), 3)
    out["quant_images_per_s_median_batch"] = round(1 / float(np.median(q_batches)), 3)
    out["quant_slowdown"] = round(per_q / per_fp, 2)
    # what the default embedded comparison costs (generation + calibration; metrics are measured separately)
    k = len(DEFAULT_RECIPES)
    est = EMBEDDED_N_PROMPTS * (per_fp + k * per_q) + k * out["calibration_seconds"]
    out["estimate_default_comparison_seconds"] = round(est, 1)
    out["estimate_note"] = (f"N={EMBEDDED_N_PROMPTS} prompts x 1 seed: FP once + {k} recipes, each calibrated on "
                            f"{len(calib)} prompts like {a.recipe}; generation and calibration only")

    print(f"model={model_name} {res.height}x{res.width} steps={a.steps} batch={a.batch_size} "
          f"threads={torch.get_num_threads()} n={n}")
    print(f"FP       : {out['fp_images_per_s']:.3f} images/s ({per_fp:.3f} s/image; fastest of "
          f"{len(fp_batches)} batches, median batch {out['fp_images_per_s_median_batch']:.3f} images/s)")
    print(f"{a.recipe}: {out['quant_images_per_s']:.3f} images/s ({per_q:.3f} s/image; median batch "
          f"{out['quant_images_per_s_median_batch']:.3f} images/s), "
          f"x{out['quant_slowdown']} vs FP; calibration {out['calibration_seconds']:.1f} s on {len(calib)} prompts")
    print(f"default embedded comparison (N={EMBEDDED_N_PROMPTS}): ~{est / 60:.1f} min generation + calibration")
    if busy:
        print(f"WARNING: load average {out['load_average_1m_at_end']} on {os.cpu_count()} CPUs: other processes "
              "shared the CPU, so these timings are pessimistic")

    stem = Path(a.out)
    atomic_write_json(stem.with_suffix(".json"), out)
    where = "the CPU" if a.device == "cpu" else out["device_name"]
    md = [f"# Generation speed on {where} ({model_name} model)\n",
          "| recipe | images/s (fastest batch) | s/image | images/s (median batch) | n | steps | batch | resolution |",
          "|---|---|---|---|---|---|---|---|",
          f"| fp | {out['fp_images_per_s']:.3f} | {per_fp:.3f} | {out['fp_images_per_s_median_batch']:.3f} | {n} | "
          f"{a.steps} | {a.batch_size} | {out['resolution']} |",
          f"| {a.recipe} | {out['quant_images_per_s']:.3f} | {per_q:.3f} | {out['quant_images_per_s_median_batch']:.3f} | "
          f"{n} | {a.steps} | {a.batch_size} | {out['resolution']} |", "",
          f"Calibration of {a.recipe}: {out['calibration_seconds']:.1f} s on {len(calib)} prompts (one run). "
          f"Quantized generation (fake quantization in float32) takes x{out['quant_slowdown']} the time of FP.", "",
          f"Estimate for the default embedded comparison: {out['estimate_note']}: "
          f"~{est:.0f} s (~{est / 60:.1f} min).", "",
          f"Machine: {out['device_name']}, {out['cpu_count']} CPUs, torch {out['torch']} with {out['torch_threads']} threads, "
          f"{out['platform']}; 1-minute load average at the end {out['load_average_1m_at_end']}"
          + (" — **the CPU was shared with other work: timings are pessimistic**." if busy else "."), ""]
    atomic_write_text(stem.with_suffix(".md"), "\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
