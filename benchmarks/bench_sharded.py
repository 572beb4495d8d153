"""Sharded generation throughput at SD v1.5 scale: images/s of the paper protocol's generation step per recipe, on
one process or many (accelerate), with the identity and resume checks.

    python benchmarks/bench_sharded.py OUT                                         # 1 process (1 GPU)
    accelerate launch --multi_gpu --num_processes 8 benchmarks/bench_sharded.py OUT # 8 GPUs, same images
    python benchmarks/bench_sharded.py OUT --report                                 # table + scaling of all runs
    python benchmarks/bench_sharded.py OUT --tiny --device cpu --n-images 8         # CPU smoke test (seconds)
    torchrun --nproc_per_node 2 benchmarks/bench_sharded.py OUT --tiny --device cpu # 2 CPU processes (gloo)
    torchrun --nproc_per_node 2 benchmarks/bench_sharded.py OUT --one-device        # 2 processes on one GPU

Model: :func:`dgq_utils.testing.sd_scale.build_sd15_pipeline` (SD v1.5 architecture, random weights, fp16 on
GPUs). Per recipe (default ``fp`` and ``dgq-w8a8``), every rank: calibration once (rank 0 calibrates on
``--n-calibration`` prompts and saves the state, the others load it: :func:`~dgq_utils.generate.sharding.
quantize_once`), then :func:`~dgq_utils.generate.sharding.generate_sharded` of ``--n-images`` prompts x 1 seed,
25 PNDM steps, guidance 7.5, 512x512 (``--batch-size`` images per pipeline call), into a cache folder of this
run. Generation wall time is taken on rank 0 between two barriers (so it is the time of the slowest rank).

Each run writes ``OUT/run-w<world>-<tag>.json``: per recipe the image count, calibration seconds, generation
seconds, images/s in all and per process, the projected wall time of the paper protocol's 30,000 images, and a
digest of the manifest (SHA-256 over sorted (file, sha256) pairs) -- equal digests mean bit-identical images.
``--report`` reads every run file of OUT and writes ``OUT/summary.json`` + ``.md`` (scaling efficiency vs the
1-process run, identity of the images across runs).

Kill test: ``--die-rank R --die-after K`` makes rank R exit abruptly after writing K images of the first recipe;
rerunning the same command (without those flags) resumes: only the missing images are generated (the JSON
counts ``generated`` vs ``reused``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgq_utils.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from dgq_utils.config import SamplerSettings  # noqa: E402
from dgq_utils.generate.sharding import generate_sharded, process_shard, quantize_once  # noqa: E402
from dgq_utils.quantize.pipeline import dequantize_pipeline  # noqa: E402
from dgq_utils.testing.sd_scale import bench_prompts, build_sd15_pipeline  # noqa: E402

PAPER_IMAGES = 30_000


def digest(manifest) -> str:
    h = hashlib.sha256()
    for f, s in sorted(zip(manifest["file"], manifest["sha256"])):
        h.update(f"{f}:{s}\n".encode())
    return h.hexdigest()[:16]


def run(args) -> dict:
    # --one-device: every rank on --device itself, the process group on gloo (NCCL refuses two ranks on one GPU)
    shard = process_shard("cpu" if args.one_device else args.device)
    device = args.device
    if device.startswith("cuda") and shard.world_size > 1:
        if not args.one_device:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', shard.rank))}"
        elif torch.device(device).index is None:  # set_device needs an index: the current device
            device = f"cuda:{torch.cuda.current_device()}"
        torch.cuda.set_device(device)
    if device == "cpu":  # the same thread count in every run: CPU kernels are not bit-identical across counts
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if device == "cpu" else torch.float16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipe = build_sd15_pipeline(device=device, dtype=dtype, tiny=args.tiny)
    build_s = time.perf_counter() - t0
    steps = 2 if args.tiny else args.steps
    settings = SamplerSettings(num_inference_steps=steps, guidance_scale=7.5, batch_size=args.batch_size)
    prompts = bench_prompts(args.n_images + args.n_calibration)
    calib, evalp = prompts[args.n_images:], prompts[:args.n_images]
    result = {"world_size": shard.world_size, "one_device": bool(args.one_device), "device": torch.cuda.get_device_name() if device != "cpu" else
              platform.processor() or "cpu", "dtype": str(dtype), "tiny": args.tiny, "steps": steps,
              "batch_size": args.batch_size, "n_images": args.n_images, "n_calibration": args.n_calibration,
              "build_s": round(build_s, 2), "recipes": {}}
    for i, recipe in enumerate(args.recipes):
        written = []

        def on_image(rec, _first=(i == 0)):
            written.append(rec["file"])
            if _first and args.die_after is not None and shard.rank == args.die_rank and len(written) >= args.die_after:
                os._exit(17)  # a killed rank: no clean-up, no barrier

        shard.barrier()
        t = time.perf_counter()
        if recipe != "fp":
            quantize_once(pipe, recipe, calib, out / f"state-{recipe}{'-tiny' if args.tiny else ''}.safetensors",
                          shard=shard, progress=shard.is_main,
                          sampler=SamplerSettings(num_inference_steps=steps, guidance_scale=7.5,
                                                  batch_size=min(8, args.batch_size)))
        shard.barrier()
        calib_s = time.perf_counter() - t
        t = time.perf_counter()
        res = generate_sharded(pipe, evalp, [0], out / f"cache-w{shard.world_size}{'-tiny' if args.tiny else ''}",
                               shard=shard, recipe=recipe, model_id="sd15-architecture-random", settings=settings,
                               progress=shard.is_main, on_image=on_image)
        gen_s = time.perf_counter() - t
        counts = torch.tensor([len(written)], device="cpu" if device == "cpu" or args.one_device else device)
        if shard.world_size > 1:
            torch.distributed.all_reduce(counts)
        n_new = int(counts.item())
        ips = len(res) / gen_s if n_new == len(res) else n_new / gen_s
        result["recipes"][recipe] = {
            "calibration_s": round(calib_s, 2), "generation_s": round(gen_s, 2), "images": len(res),
            "generated": n_new, "reused": len(res) - n_new, "images_per_s": round(ips, 3),
            "images_per_s_per_process": round(ips / shard.world_size, 3),
            "paper_protocol_h": round(PAPER_IMAGES / ips / 3600, 2) if n_new else None,
            "manifest_digest": digest(res.manifest),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device != "cpu" else None}
        if recipe != "fp":
            dequantize_pipeline(pipe)
    if shard.is_main:
        name = f"run-w{shard.world_size}-{args.tag}{'-tiny' if args.tiny else ''}.json"
        atomic_write_json(out / name, result)
        print(json.dumps(result, indent=1))
    return result


def report(out: Path) -> dict:
    runs = [json.loads(p.read_text()) | {"file": p.name} for p in sorted(out.glob("run-w*.json"))]
    if not runs:
        raise SystemExit(f"no run-w*.json in {out}: run the benchmark first")
    rows = []
    base = {r: v for run in runs if run["world_size"] == 1 for r, v in run["recipes"].items()}
    for run in runs:
        for recipe, v in run["recipes"].items():
            b = base.get(recipe)
            eff = (v["images_per_s"] / (run["world_size"] * b["images_per_s"])) if b and v["generated"] else None
            rows.append({"run": run["file"], "world_size": run["world_size"], "recipe": recipe, **v,
                         "scaling_efficiency": round(eff, 3) if eff else None,
                         "same_images_as_1_process": (v["manifest_digest"] == b["manifest_digest"]) if b else None})
    summary = {"runs": runs, "rows": rows}
    atomic_write_json(out / "summary.json", summary)
    cols = ["world_size", "recipe", "images", "generated", "calibration_s", "generation_s", "images_per_s",
            "images_per_s_per_process", "scaling_efficiency", "paper_protocol_h", "same_images_as_1_process"]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r.get(c)) for c in cols) + " |" for r in rows]
    atomic_write_text(out / "summary.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--recipes", nargs="+", default=["fp", "dgq-w8a8"])
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--n-calibration", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process on the CPU")
    ap.add_argument("--tiny", action="store_true", help="tiny model of the same structure (CPU smoke test)")
    ap.add_argument("--tag", default="run", help="names the run file (e.g. 'resume')")
    ap.add_argument("--die-rank", type=int, default=0)
    ap.add_argument("--die-after", type=int, default=None)
    ap.add_argument("--one-device", action="store_true",
                    help="every process on --device (gloo process group): N-process identity on one GPU")
    ap.add_argument("--report", action="store_true", help="only summarise the run files of OUT")
    args = ap.parse_args(argv)
    if args.report:
        report(Path(args.out))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
