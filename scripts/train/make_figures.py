#!/usr/bin/env python
"""Figures of the embedded model: training curves, a sample grid (generated on the CPU), real scenes, phenomena.

    python scripts/train/make_figures.py [--emb data/embedded] [--figures figures] [--skip-samples]

Writes figures/embedded_training_curves.png, figures/embedded_samples.png (FP model, default sampling:
PNDM 25 steps, guidance 7.5, fixed seeds, test prompts incl. held-out pairs), figures/embedded_real_scenes.png
and figures/embedded_phenomena.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dgq_utils.world import scenes as W  # noqa: E402
from dgq_utils.world.figures import save_grid  # noqa: E402


def curves(emb: Path, out: Path):
    logs = emb / "logs"
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    specs = [("clip", "loss", "CLIP contrastive loss"), ("vae", "psnr", "VAE train PSNR (dB, [-1,1] range)"),
             ("evaluator", "loss", "evaluator loss"), ("unet", "loss", "UNet loss (min-SNR-5 weighted eps MSE)")]
    for ax, (stage, key, title) in zip(axes, specs):
        rows = [json.loads(l) for l in (logs / f"{stage}.jsonl").read_text().splitlines() if '"step"' in l]
        x, y = [r["step"] for r in rows], [r[key] for r in rows]
        ax.plot(x, y, label=stage if stage != "unet" else "unet phase 1")
        if stage == "unet" and (logs / "unet_phase2.jsonl").exists():
            r2 = [json.loads(l) for l in (logs / "unet_phase2.jsonl").read_text().splitlines() if '"step"' in l]
            off = x[-1]
            ax.plot([off + r["step"] for r in r2], [r[key] for r in r2], label="unet phase 2 (restart from phase-1 EMA)")
            ax.axvline(off, color="grey", lw=0.8, ls=":")
            ax.legend(fontsize=8)
        if key == "loss":
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "embedded_training_curves.png", dpi=110)
    plt.close(fig)


def samples(out: Path):
    from dgq_utils.model.loading import load_pipeline
    from dgq_utils.world.quality import generate

    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    sc = W.Scenes.cat([W.sample_scenes(16, "test", seed=31, p_two=0.0), W.sample_scenes(16, "test", seed=32, p_two=1.0),
                       W.sample_scenes(8, "heldout", seed=33, p_two=0.5)])
    caps = W.captions(sc)
    ims = generate(pipe, caps, seed=7, batch_size=8)
    caps = [c + ("  [held-out pair]" if i >= 32 else "") for i, c in enumerate(caps)]
    save_grid(ims, caps, out / "embedded_samples.png", ncol=8)


def real(out: Path):
    sc = W.sample_scenes(16, "test", seed=34)
    save_grid(W.render(sc), W.captions(sc), out / "embedded_real_scenes.png", ncol=8)


def phenomena(emb: Path, out: Path):
    d = json.loads((emb / "phenomena.json").read_text())
    act, xa = d["activation_channel_ranges"]["per_layer"], d["cross_attention"]
    names = list(act)
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.2), gridspec_kw={"width_ratios": [3, 1.3]})
    r = [act[n]["ratio_median_over_steps"] for n in names]
    axes[0].bar(range(len(r)), r, color=["C3" if v > 5 else "C0" for v in r])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("max / median channel range (median over steps)")
    axes[0].set_xlabel(f"UNet Linear/Conv2d inputs in module order ({len(r)} layers, time-embedding path excluded)")
    axes[0].set_title("Per-channel activation ranges of the embedded UNet", fontsize=10)
    axes[0].grid(alpha=0.3, axis="y")
    layers = list(xa["per_layer"])
    axes[1].barh(range(len(layers)), [xa["per_layer"][n] for n in layers])
    axes[1].set_yticks(range(len(layers)), [n.replace(".transformer_blocks.0.attn2", "").replace("attentions.", "att")
                                            for n in layers], fontsize=7)
    axes[1].set_xlim(0, 1)
    axes[1].set_xlabel("mean cross-attention probability on <start>")
    axes[1].set_title(f"<start> mass: mean {xa['start_mass_mean']:.3f}; EOS/padding {xa['eos_padding_mass_mean']:.3f}",
                      fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "embedded_phenomena.png", dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--emb", default="data/embedded")
    p.add_argument("--figures", default="figures")
    p.add_argument("--skip-samples", action="store_true")
    a = p.parse_args()
    emb, out = Path(a.emb), Path(a.figures)
    out.mkdir(parents=True, exist_ok=True)
    curves(emb, out)
    real(out)
    if (emb / "phenomena.json").exists():
        phenomena(emb, out)
    if not a.skip_samples:
        samples(out)


if __name__ == "__main__":
    main()
