"""Round-to-nearest on the MSE-searched grid vs layer-wise AdaRound, at W4A8 (and W4A6), on the embedded model (CPU).

For each weight rounding the same recipe family (``dgq`` by default) is calibrated on the same calibration
prompts with the same sampler, and then generates the same seeded images as the FP pipeline. Reported per
recipe: calibration seconds (all of it, and the AdaRound part), the layer-output reconstruction error on the
sampled calibration inputs (sum over layers of mean_rows ||x (W_q - W)^T||^2, nearest vs learned rounding, and
the median per-layer ratio), and the PSNR of the images vs FP (mean over prompts). W4A6 runs after W4A8 in the
same process: its observation passes and every layer's AdaRound result are reused (same FP-upstream inputs), so
its calibration seconds show the reuse, not a second optimisation.

Results go to ``benchmarks/results/adaround_cpu.json`` and ``.md`` (atomically).

    python benchmarks/bench_adaround.py [--family dgq|baseline] [--bits w4a8,w4a6] [--iters 300]
        [--calib-prompts 8] [--prompts 24] [--steps 10] [--threads 1] [--out benchmarks/results/adaround_cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgq_utils.atomic import atomic_write_text  # noqa: E402
from dgq_utils.config import SamplerSettings, get_preset  # noqa: E402
from dgq_utils.evaluate.metrics.pairwise import psnr_per_image  # noqa: E402
from dgq_utils.model.loading import load_pipeline  # noqa: E402
from dgq_utils.quantize.pipeline import dequantize_pipeline, quantize_pipeline  # noqa: E402
from dgq_utils.world.comparison import embedded_calibration_prompts, embedded_prompts  # noqa: E402


def images(pipe, prompts, steps, seed=0):
    out = pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(seed), output_type="np").images
    x = torch.from_numpy(np.asarray(out)).permute(0, 3, 1, 2).float().clamp(0, 1)
    return (x * 255).round().to(torch.uint8)  # the pairwise metrics take uint8 images


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="dgq", choices=["dgq", "baseline"])
    ap.add_argument("--bits", default="w4a8,w4a6", help="comma-separated, e.g. w4a8 or w4a8,w4a6")
    ap.add_argument("--iters", type=int, default=300, help="AdaRound iterations per layer (config default 1000)")
    ap.add_argument("--granularity", default="layer", choices=["layer", "block"],
                    help="AdaRound per layer, or BRECQ-style per ResnetBlock2D / BasicTransformerBlock")
    ap.add_argument("--calib-prompts", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=24, help="evaluation prompts (one seeded image each)")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps, calibration and generation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adaround_cpu"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()

    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts, _ = embedded_prompts(args.prompts)
    calib = embedded_calibration_prompts(args.calib_prompts, exclude=prompts)
    sampler = SamplerSettings(num_inference_steps=args.steps, batch_size=min(8, args.calib_prompts))
    t = time.perf_counter()
    fp = images(pipe, prompts, args.steps)
    fp_seconds = time.perf_counter() - t

    rows = []
    for wa in [b.strip() for b in args.bits.split(",") if b.strip()]:
        for rounding in ("adaround", "nearest"):
            name = f"{args.family}-{wa}" + ("-adaround" if rounding == "adaround" else "")
            recipe = get_preset(name)
            if rounding == "adaround":
                recipe = recipe.replace(weights={"adaround": {"iters": args.iters, "granularity": args.granularity}})
            t = time.perf_counter()
            rep = quantize_pipeline(pipe, recipe, calib, sampler, 0, progress=False)
            cal_s = time.perf_counter() - t
            q = images(pipe, prompts, args.steps)
            dequantize_pipeline(pipe)
            psnr = psnr_per_image(q, fp)
            cal = rep.calibration
            wr = cal.get("weight_rounding", {})
            row = {"recipe": name, "bits": wa.upper(), "rounding": rounding, "calibration_s": round(cal_s, 1),
                   "adaround_s": round(float(cal.get("seconds_reconstruction", 0.0)), 1),
                   "observation_reused": bool(cal.get("observation_reused")),
                   "psnr_db": round(float(np.mean(psnr)), 3), "psnr_per_image": [round(float(v), 3) for v in psnr]}
            if rounding == "adaround":
                row.update(blocks=wr.get("blocks", 0), block_layers=wr.get("block_layers", 0),
                           block_err_nearest=wr.get("block_loss_nearest", 0.0),
                           block_err_adaround=wr.get("block_loss_adaround", 0.0))
                per = wr["per_layer"].values()
                ratios = [d["loss_adaround"] / d["loss_nearest"] for d in per if d["loss_nearest"] > 0]
                row.update(layer_err_nearest=wr["loss_nearest"], layer_err_adaround=wr["loss_adaround"],
                           layer_err_ratio_median=round(statistics.median(ratios), 4) if ratios else float("nan"),
                           layers=wr["layers"], kept_nearest=wr["kept_nearest"])
            rows.append(row)
            print(f"{name:28s} cal {cal_s:7.1f} s  adaround {row['adaround_s']:6.1f} s  PSNR {row['psnr_db']:.2f} dB",
                  flush=True)

    by = {(r["bits"], r["rounding"]): r for r in rows}
    lines = [
        f"# AdaRound vs round-to-nearest (MSE-searched grid), embedded model, CPU ({args.threads} thread)",
        "",
        f"`python benchmarks/bench_adaround.py --family {args.family} --bits {args.bits} --iters {args.iters} "
        f"--granularity {args.granularity} "
        f"--calib-prompts {args.calib_prompts} --prompts {args.prompts} --steps {args.steps} "
        f"--threads {args.threads}`",
        "",
        f"{args.calib_prompts} calibration prompts, {args.steps} PNDM steps, guidance 7.5; {args.prompts} evaluation "
        f"prompts, one seeded 64x64 image each, PSNR vs FP (mean over images). Layer error: sum over the "
        f"{rows[0].get('layers', '?') if rows else '?'} quantized layers of mean_rows ||x (W_q - W)^T||^2 on the "
        "sampled calibration inputs (the rows AdaRound was fitted on), nearest vs learned rounding"
        + (" -- for the layers reconstructed layer-wise; block error: sum over blocks of the block-output error "
           "on the sampled block calls." if args.granularity == "block" else "."),
        "",
        "| recipe | rounding | calibration s | of which AdaRound s | layer error (nearest -> learned) | "
        "median layer ratio | PSNR vs FP dB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = ratio = ""
        if r["rounding"] == "adaround":
            err = f"{r['layer_err_nearest']:.4g} -> {r['layer_err_adaround']:.4g}"
            ratio = f"{r['layer_err_ratio_median']:.3f}"
        # the observation memo says whether the passes were reused; whether the learned rounding was (layer-wise:
        # the weight memo) shows in the AdaRound seconds beside it, so the label claims only the first
        reused = " (observation reused)" if r["observation_reused"] and r["rounding"] == "adaround" else ""
        lines.append(f"| {r['recipe']} | {r['rounding']} | {r['calibration_s']}{reused} | {r['adaround_s']} | "
                     f"{err} | {ratio} | {r['psnr_db']:.2f} |")
    lines.append("")
    for r in rows:
        if r["rounding"] == "adaround" and r.get("blocks"):
            lines.append(f"* {r['recipe']}: {r['blocks']} blocks ({r['block_layers']} layers) reconstructed jointly; "
                         f"block error {r['block_err_nearest']:.4g} -> {r['block_err_adaround']:.4g}.")
    for bits in dict.fromkeys(r["bits"] for r in rows):
        a, n = by.get((bits, "adaround")), by.get((bits, "nearest"))
        if a and n:
            diff = np.array(a["psnr_per_image"]) - np.array(n["psnr_per_image"])
            half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
            a["psnr_diff_vs_nearest"] = {"mean": round(float(diff.mean()), 3), "ci95": [
                round(float(diff.mean() - half), 3), round(float(diff.mean() + half), 3)]}
            lines.append(f"* {bits}: PSNR AdaRound - nearest (paired over images) = {diff.mean():+.2f} dB "
                         f"[95 % CI {diff.mean() - half:+.2f}, {diff.mean() + half:+.2f}] (normal approximation); "
                         f"{int((diff > 0).sum())}/{len(diff)} images better.")
    total = time.perf_counter() - t_all
    lines += ["", f"FP generation {fp_seconds:.1f} s; whole benchmark {total:.0f} s on {platform.processor() or platform.machine()}, "
              f"torch {torch.__version__}."]
    md = "\n".join(lines) + "\n"
    print("\n" + md)
    result = {"settings": vars(args), "prompts": prompts, "calibration_prompts": calib, "rows": rows,
              "fp_generation_s": round(fp_seconds, 2), "total_s": round(total, 1),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__}}
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    atomic_write_text(out.with_suffix(".md"), md)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
