#!/usr/bin/env python
"""Re-check the GPU evaluation on this CPU: the first batch (250 prompts) of the one-object test set,
with the same prompts and the same initial latents (CPU generator, seed 0) as the training run's eval.

    python scripts/train/cpu_recheck.py [--n 250] [--write data/embedded/metrics.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dgq_utils.model.loading import load_pipeline  # noqa: E402
from dgq_utils.world import scenes as W  # noqa: E402
from dgq_utils.world.evaluator import AttributeEvaluator, alignment, summarize  # noqa: E402
from dgq_utils.world.quality import generate, standard_prompt_sets  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=250)
    p.add_argument("--write", default=None)
    a = p.parse_args()
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    ev = AttributeEvaluator.load("data/embedded/evaluator")
    sc = standard_prompt_sets(500, 0, 0)["test_one_object"][: a.n]
    t0 = time.time()
    ims = generate(pipe, W.captions(sc), seed=0, batch_size=250)
    res = summarize(alignment(ev.predict(ims), sc))
    res["seconds"] = round(time.time() - t0, 1)
    res["note"] = (f"first {a.n} of the 500 one-object test prompts, same initial latents as the GPU evaluation "
                   "(its first batch of 250); float32 on the CPU, weights loaded from the fp16 files")
    print(json.dumps(res, indent=1))
    if a.write:
        path = Path(a.write)
        m = json.loads(path.read_text())
        m["cpu_recheck_one_object"] = res
        path.write_text(json.dumps(m, indent=2))


if __name__ == "__main__":
    main()
