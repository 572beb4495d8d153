#!/usr/bin/env python
"""Phenomena check of the embedded model (what DGQ is about), measured with plain hooks.

    python scripts/train/phenomena_check.py [--n 16] [--out data/embedded/phenomena.json]

Per-channel activation ranges of every UNet Linear/Conv2d input (max/median channel range per layer and
sampling step) and the cross-attention probability mass on <start>, over ``--n`` test prompts (half one-,
half two-object), 25 PNDM steps, guidance 7.5, fp32 on the CPU. Writes the full JSON and adds a summary
to metrics.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dgq_utils.model.loading import load_pipeline  # noqa: E402
from dgq_utils.world import scenes as W  # noqa: E402
from dgq_utils.world.phenomena import measure  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--out", default="data/embedded/phenomena.json")
    p.add_argument("--metrics", default="data/embedded/metrics.json")
    a = p.parse_args()
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    one = W.captions(W.sample_scenes(a.n // 2, "test", seed=21, p_two=0.0))
    two = W.captions(W.sample_scenes(a.n - a.n // 2, "test", seed=22, p_two=1.0))
    res = measure(pipe, one + two)
    res["prompt_examples"] = (one + two)[:4]
    Path(a.out).write_text(json.dumps(res, indent=1))
    act, xa = res["activation_channel_ranges"], res["cross_attention"]
    summary = {
        "activation_ratio_max_over_median": act["ratio_summary_over_layers"],
        "top5_layers": [(d["layer"], d["ratio_median_over_steps"], d["absmax"]) for d in act["top10_layers"][:5]],
        "cross_attention": {k: v for k, v in xa.items() if k not in ("per_layer", "per_step")},
        "cross_attention_start_mass_by_step_first_mid_last": [xa["per_step"][0], xa["per_step"][len(xa["per_step"]) // 2],
                                                               xa["per_step"][-1]],
        "details": Path(a.out).name,
    }
    m = json.loads(Path(a.metrics).read_text())
    m["phenomena"] = summary
    Path(a.metrics).write_text(json.dumps(m, indent=2))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
