#!/usr/bin/env python
"""Measure FP generation speed of the embedded pipeline on this machine's CPU and record it.

    python scripts/train/measure_cpu_speed.py [--repeats 7] [--write data/embedded/metrics.json]

Batch 8, 25 steps (the pipeline's PNDM scheduler), guidance 7.5, fp32, torch's default thread count; one
warm-up call, then ``--repeats`` timed calls (text encoding + 25x2 UNet passes + VAE decode + postprocess).
The CPU may be shared with other processes: the median and the minimum are both reported.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dgq_utils.loading import load_pipeline  # noqa: E402
from dgq_utils.world import scenes as W  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--key", default="cpu_generation", help="entry name in metrics.json")
    p.add_argument("--write", default=None, help="metrics.json to add the entry to")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = W.captions(W.sample_scenes(a.batch, "test", seed=11))
    kw = dict(num_inference_steps=25, guidance_scale=7.5, output_type="np")
    pipe(prompts, generator=torch.Generator().manual_seed(0), **kw)
    times = []
    load_before = os.getloadavg()
    for r in range(a.repeats):
        t0 = time.perf_counter()
        pipe(prompts, generator=torch.Generator().manual_seed(r), **kw)
        times.append(time.perf_counter() - t0)
        print(f"batch {a.batch}: {times[-1]:.2f} s ({times[-1] / a.batch:.3f} s/image)", flush=True)
    res = {
        "s_per_image_median": round(statistics.median(times) / a.batch, 4),
        "s_per_image_min": round(min(times) / a.batch, 4),
        "batch_seconds": [round(t, 3) for t in times], "batch": a.batch, "num_inference_steps": 25,
        "guidance_scale": 7.5, "dtype": "float32", "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_name(), "cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(json.dumps(res, indent=1))
    if a.write:
        path = Path(a.write)
        m = json.loads(path.read_text())
        m[a.key] = res
        path.write_text(json.dumps(m, indent=2))


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
