"""``python -m dgq_utils.protocol`` with tiny stand-ins: what the protocol tests launch (1 or N processes).

    python -m dgq_utils.testing.protocol_run sd-v1.4 --coco-captions C --fid-reference R --out OUT [...]
    torchrun --nproc_per_node 2 -m dgq_utils.testing.protocol_run sd-v1.4 ...        # over 2 CPU processes

Takes the protocol command's arguments (``--model``, ``--inception-weights`` and ``--clip-weights`` are not
needed) and runs :func:`dgq_utils.protocol.run.run_protocol` with a tiny random pipeline of the protocol's family
(SD 1.x-like for ``sd-v1.4``, SDXL-Turbo-like for ``sdxl-turbo``) at 32x32 and 2 steps, the weight-free
``pixels-debug`` feature extractor and a tiny random open_clip model, on the CPU. Every rank writes
``OUT/rank<k>.json`` (what it generated). ``--die-after K`` makes the last rank exit abruptly after writing K
images (a killed rank, for the resume test).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

import torch

from dgq_utils.atomic import atomic_write_json
from dgq_utils.evaluate import metrics as M
from dgq_utils.protocol.cli import build_parser, build_run
from dgq_utils.protocol.run import check_run, run_protocol
from dgq_utils.testing.families import build_tiny_sdxl_pipeline
from dgq_utils.testing.tiny import build_tiny_open_clip, build_tiny_pipeline

#: the tiny run's sampler: the protocol's guidance, 2 steps, 32x32, batches of 2
TINY_SAMPLER = {"num_inference_steps": 2, "height": 32, "width": 32, "batch_size": 2}


def tiny_pipe_factory(protocol: str):
    if protocol == "sdxl-turbo":
        return lambda: build_tiny_sdxl_pipeline(seed=0, turbo=True)
    return lambda: build_tiny_pipeline(seed=0)


def tiny_clip_scorer(name: str = "dgq-protocol-run-clip") -> M.ClipScorer:
    """The same random tiny open_clip model in every process (seeded), registered from a temporary folder."""
    with tempfile.TemporaryDirectory() as d:
        _, weights = build_tiny_open_clip(d, name)
        return M.ClipScorer.from_open_clip(name, weights)


def main(argv=None) -> int:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--die-after", type=int, default=None)
    mine, rest = extra.parse_known_args(argv)
    args = build_parser().parse_args(rest + ["--device", "cpu", "--quiet"])
    torch.set_num_threads(1)
    run = build_run(args)
    run = dataclasses.replace(run, sampler=run.the_sampler.replace(**TINY_SAMPLER))
    factory, scorer = tiny_pipe_factory(run.protocol), tiny_clip_scorer()
    check_run(run, pipe_factory=factory, feature_extractor=M.PIXELS_DEBUG, clip_scorer=scorer)
    written: list[str] = []
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))

    def on_image(rec):
        written.append(f"{rec['recipe_name']}/{rec['file']}")
        if mine.die_after is not None and rank == world - 1 and len(written) >= mine.die_after:
            os._exit(17)  # a killed rank: no clean-up, no barrier

    outcome = run_protocol(run, pipe_factory=factory, feature_extractor=M.PIXELS_DEBUG, clip_scorer=scorer,
                           on_image=on_image, progress=False)
    atomic_write_json(os.path.join(args.out, f"rank{outcome.shard.rank}.json"), {
        "rank": outcome.shard.rank, "world_size": outcome.shard.world_size, "generated": written})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
