#!/usr/bin/env python
"""Measure FP generation speed of the embedded pipeline on this machine's CPU and record it.

    python scripts/train/measure_cpu_speed.py [--repeats 7] [--write data/embedded/metrics.json]

Batch 8, 25 steps (the pipeline's PNDM scheduler), guidance 7.5, fp32, torch's default thread count; one
warm-up call, then ``--repeats`` timed calls (text encoding + 25x2 UNet passes + VAE decode + postprocess).
The CPU may be shared with other processes: the median and the minimum are both reported. With
``--quiet-batches N`` the script keeps generating (up to ``--max-minutes``) and also reports the median over
the batches during which all *other* processes together used less than ``--quiet-threshold`` cores (from
/proc/stat minus this process's own CPU time) -- the figure for an otherwise idle machine.
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
from dgq_utils.model.loading import load_pipeline  # noqa: E402
from dgq_utils.world import scenes as W  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--key", default="cpu_generation", help="entry name in metrics.json")
    p.add_argument("--write", default=None, help="metrics.json to add the entry to")
    p.add_argument("--quiet-batches", type=int, default=0)
    p.add_argument("--quiet-threshold", type=float, default=0.15, help="cores used by other processes")
    p.add_argument("--max-minutes", type=float, default=30.0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = W.captions(W.sample_scenes(a.batch, "test", seed=11))
    kw = dict(num_inference_steps=25, guidance_scale=7.5, output_type="np")
    pipe(prompts, generator=torch.Generator().manual_seed(0), **kw)
    times, others, quiet = [], [], []
    load_before = os.getloadavg()
    start = time.time()
    r = 0
    while r < a.repeats or (len(quiet) < a.quiet_batches and time.time() - start < a.max_minutes * 60):
        c0, s0, t0 = _cpu_total(), _cpu_self(), time.perf_counter()
        pipe(prompts, generator=torch.Generator().manual_seed(r), **kw)
        dt = time.perf_counter() - t0
        other = max(0.0, (_cpu_total() - c0) - (_cpu_self() - s0)) / dt    # cores used by other processes
        if r < a.repeats:
            times.append(dt)
        others.append(round(other, 2))
        if other < a.quiet_threshold:
            quiet.append(dt)
        print(f"batch {a.batch}: {dt:.2f} s ({dt / a.batch:.3f} s/image), other processes {other:.2f} cores",
              flush=True)
        r += 1
    res = {
        "s_per_image_median": round(statistics.median(times) / a.batch, 4),
        "s_per_image_min": round(min(times) / a.batch, 4),
        "batch_seconds": [round(t, 3) for t in times], "batch": a.batch, "num_inference_steps": 25,
        "guidance_scale": 7.5, "dtype": "float32", "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_name(), "cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
        "other_processes_cores_per_batch": others,
        "python": platform.python_version(),
    }
    if a.quiet_batches:
        res["quiet"] = {"threshold_cores": a.quiet_threshold, "n": len(quiet),
                        "s_per_image_median": round(statistics.median(quiet) / a.batch, 4) if quiet else None,
                        "s_per_image_min": round(min(quiet) / a.batch, 4) if quiet else None,
                        "batch_seconds": [round(t, 3) for t in quiet]}
    print(json.dumps(res, indent=1))
    if a.write:
        path = Path(a.write)
        m = json.loads(path.read_text())
        m[a.key] = res
        path.write_text(json.dumps(m, indent=2))


def _cpu_total() -> float:
    """Busy CPU seconds of the whole machine (all processes) from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")       # minus idle and iowait


def _cpu_self() -> float:
    t = os.times()
    return t.user + t.system


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
