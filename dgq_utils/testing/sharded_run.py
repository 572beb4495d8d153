"""A complete sharded run on the tiny pipeline (what the sharding tests launch, and an example to copy).

    python -m dgq_utils.testing.sharded_run OUT [--n-prompts 6] [--recipe dgq-w8a8] [--die-after K]
    torchrun --nproc_per_node 2 -m dgq_utils.testing.sharded_run OUT          # the same, over 2 CPU processes

Quantizes the tiny random pipeline once (rank 0 calibrates, the others load the state), generates
``n_prompts`` x 2 seeds into ``OUT/cache`` with the prompts split across the processes, and rank 0 writes
``OUT/manifest.json`` ({file: sha256}); every rank writes ``OUT/rank<k>.json`` (what it did). ``--die-after K``
makes the last rank exit abruptly after writing K images (a killed rank, for the resume test).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from dgq_utils.atomic import atomic_write_json
from dgq_utils.config import SamplerSettings
from dgq_utils.calibrate.trace import TRACE_SAMPLER
from dgq_utils.generate.sharding import generate_sharded, process_shard, quantize_once
from dgq_utils.testing.tiny import TINY_PROMPTS, build_tiny_pipeline


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--n-prompts", type=int, default=6)
    ap.add_argument("--recipe", default="dgq-w8a8")
    ap.add_argument("--die-after", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shard = process_shard("cpu")
    pipe = build_tiny_pipeline()
    settings = SamplerSettings(num_inference_steps=2, guidance_scale=7.5, batch_size=2)
    existed = (out / "state.safetensors").exists()
    quantize_once(pipe, args.recipe, list(TINY_PROMPTS[:4]), out / "state.safetensors", shard=shard,
                  sampler=TRACE_SAMPLER.replace(num_inference_steps=2, guidance_scale=7.5), progress=False)
    prompts = [TINY_PROMPTS[i % len(TINY_PROMPTS)] for i in range(args.n_prompts)]
    written = []

    def on_image(rec):
        written.append(rec["file"])
        if args.die_after is not None and shard.rank == shard.world_size - 1 and len(written) >= args.die_after:
            os._exit(17)  # a killed rank: no clean-up, no barrier

    result = generate_sharded(pipe, prompts, [0, 1], out / "cache", shard=shard, recipe=args.recipe,
                              model_id="tiny-sharded", settings=settings, progress=False, on_image=on_image)
    atomic_write_json(out / f"rank{shard.rank}.json", {
        "rank": shard.rank, "world_size": shard.world_size, "generated": written,
        "calibrated": shard.is_main and not existed})
    if shard.is_main:
        atomic_write_json(out / "manifest.json", dict(zip(result.manifest["file"], result.manifest["sha256"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
