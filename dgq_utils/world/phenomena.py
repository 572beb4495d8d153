"""Measure the two distributions DGQ is about on a trained UNet (hooks of the engine's trace harness, FP model).

1. Per-channel activation ranges of the inputs of every ``nn.Linear``/``nn.Conv2d`` of the UNet: at each
   sampling step, each input channel's range (max - min over batch, pixels/tokens); per layer the ratio
   ``max channel range / median channel range`` (large = a few outlier channels), reported per step and
   summarised over steps and layers.
2. Cross-attention probability mass on ``<start>`` (key 0): the mean over heads and query pixels of the
   softmax probability of key 0, per cross-attention layer and step, for the text-conditioned half of the
   classifier-free-guidance batch; plus the mass on the prompt's words and on the EOS/padding keys.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch import nn

from dgq_utils.calibrate.trace import Trace
from dgq_utils.config.sampler import SamplerSettings


@torch.no_grad()
def measure(pipe, prompts: list[str], num_inference_steps: int = 25, guidance_scale: float = 7.5,
            seed: int = 0) -> dict:
    """Run the pipeline once on ``prompts`` (one batch, generator seeded ``seed``) with hooks on every
    Linear/Conv2d input and the cross-attention probabilities (the engine's trace harness); return the
    phenomena summary (JSON-able)."""
    ranges: dict = defaultdict(dict)        # layer -> step -> (min, max) per channel
    attn_store: dict = defaultdict(lambda: defaultdict(list))
    sampler = SamplerSettings(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              batch_size=len(prompts))
    trace = Trace(pipe, sampler, seed, desc="phenomena")
    state = trace.state

    def channel_ranges(name, module, x):
        channel_dim = -1 if isinstance(module, nn.Linear) else 1
        x = x.detach().float()
        x = x.movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1)
        mn, mx = x.amin(1), x.amax(1)
        prev = ranges[name].get(state.call_index)
        if prev is not None:
            mn, mx = torch.minimum(prev[0], mn), torch.maximum(prev[1], mx)
        ranges[name][state.call_index] = (mn, mx)

    def key_mass(proc, probs, query, key, value):
        if proc.kind == "cross":
            attn_store[f"{proc.name}.processor"][state.call_index].append(probs.float().mean((1, 2)).cpu())

    with trace:
        trace.on_layer_input(channel_ranges)
        trace.on_attention(key_mass, layers="*attn2")
        trace.run(list(prompts))

    # ---- activation ranges
    # Layers fed by the time embedding see one input row per step (all images share t): their per-channel
    # range within a step is zero, so they are summarised across steps instead and kept out of the ratio
    # statistics of the spatial/token layers.
    per_layer, time_layers = {}, {}
    for name, steps in ranges.items():
        mins = torch.stack([v[0] for _, v in sorted(steps.items())])
        maxs = torch.stack([v[1] for _, v in sorted(steps.items())])
        absmax = float(torch.maximum(mins.abs(), maxs.abs()).max())
        if name.startswith("time_embedding") or name.endswith("time_emb_proj"):
            r = maxs.amax(0) - mins.amin(0)
            time_layers[name] = {"ratio_across_steps": round(float(r.max() / r.median().clamp(min=1e-12)), 3),
                                 "absmax": round(absmax, 3)}
            continue
        r = maxs - mins                                           # (steps, channels)
        ratios = (r.amax(1) / r.median(1).values.clamp(min=1e-12)).tolist()
        per_layer[name] = {"ratio_median_over_steps": float(np.median(ratios)), "ratio_max_over_steps": max(ratios),
                           "absmax": absmax, "channels": int(r.shape[1])}
    med_ratios = np.array([v["ratio_median_over_steps"] for v in per_layer.values()])
    top = sorted(per_layer.items(), key=lambda kv: -kv[1]["ratio_median_over_steps"])[:10]
    by_kind = {}
    for kind, pred in (("conv", lambda n: "conv" in n.split(".")[-1] or n.endswith("proj_in") or n.endswith("proj_out")),
                       ("attention_qkv", lambda n: n.split(".")[-1] in ("to_q", "to_k", "to_v")),
                       ("attention_out", lambda n: n.endswith("to_out.0")),
                       ("feed_forward", lambda n: ".ff." in n)):
        vals = [v["ratio_median_over_steps"] for n, v in per_layer.items() if pred(n)]
        if vals:
            by_kind[kind] = {"n": len(vals), "median": round(float(np.median(vals)), 3), "max": round(max(vals), 3)}
    act = {
        "n_layers": len(per_layer),
        "excluded_time_embedding_layers": time_layers,
        "ratio_by_layer_kind": by_kind,
        "ratio_summary_over_layers": {
            "median": float(np.median(med_ratios)), "p90": float(np.percentile(med_ratios, 90)),
            "max": float(med_ratios.max()),
            "n_layers_ratio_gt_5": int((med_ratios > 5).sum()), "n_layers_ratio_gt_10": int((med_ratios > 10).sum()),
            "n_layers_ratio_gt_20": int((med_ratios > 20).sum()),
        },
        "top10_layers": [{"layer": n, **{k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}}
                         for n, d in top],
        "per_layer": {n: {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}
                      for n, d in per_layer.items()},
    }
    # ---- cross-attention mass
    tok = pipe.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    n = len(prompts)
    first_eos = (ids == tok.eos_token_id).float().argmax(1)
    pos = torch.arange(ids.shape[1])[None]
    words = (pos >= 1) & (pos < first_eos[:, None])
    pad = pos >= first_eos[:, None]
    layer_start, step_start = {}, defaultdict(list)
    mass_words, mass_pad, mass_start_uncond = [], [], []
    for name, steps in attn_store.items():
        vals = []
        for s, recs in sorted(steps.items()):
            pk = torch.cat(recs)                   # (2n, 77): [uncond; cond] under CFG
            cond = pk[-n:]
            vals.append(float(cond[:, 0].mean()))
            step_start[s].append(vals[-1])
            mass_words.append(float((cond * words).sum(1).mean()))
            mass_pad.append(float((cond * pad).sum(1).mean()))
            if pk.shape[0] == 2 * n:
                mass_start_uncond.append(float(pk[:n, 0].mean()))
        layer_start[name.replace(".processor", "")] = round(float(np.mean(vals)), 4)
    all_vals = [v for vs in step_start.values() for v in vs]
    xattn = {
        "n_cross_attention_layers": len(layer_start),
        "start_mass_mean": round(float(np.mean(all_vals)), 4),
        "start_mass_min_layer": round(min(layer_start.values()), 4),
        "start_mass_max_layer": round(max(layer_start.values()), 4),
        "start_mass_uncond_mean": round(float(np.mean(mass_start_uncond)), 4) if mass_start_uncond else None,
        "word_mass_mean": round(float(np.mean(mass_words)), 4),
        "eos_padding_mass_mean": round(float(np.mean(mass_pad)), 4),
        "per_layer": layer_start,
        "per_step": [round(float(np.mean(step_start[s])), 4) for s in sorted(step_start)],
    }
    return {"prompts": len(prompts), "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
            "activation_channel_ranges": act, "cross_attention": xattn}
