"""Demo: the same prompts and seeds through FP, the per-tensor baseline and DGQ, as one labelled image grid.

::

    python -m dgq_utils.report.demo [--out figures/demo_grid.png] [--model PATH] [--steps N] [--prompts N] [--threads N]

Rows are recipes -- ``fp``, ``baseline-w8a8``, ``dgq-w8a8``, ``dgq-w8a6``, ``dgq-w4a8`` and, for contrast, a
deliberately broken ``baseline-w4a4`` (per-tensor 4-bit activations) -- columns are prompts; every row uses the
same seeds. Each row label carries the PSNR of that row's images against the FP row.

Model: ``--model`` (a local diffusers folder or cached hub id, through ``dgq_utils.model.loading.load_pipeline``); by
default the embedded model from ``load_pipeline()`` when that module and its weights are present, otherwise the
tiny random-weight pipeline of :mod:`dgq_utils.testing.tiny` (whose "images" are noise-like textures: the grid then shows
how far each recipe drifts from FP, not image quality). Calibration uses the same sampler settings as generation.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from dgq_utils.calibrate.trace import TRACE_SAMPLER
from dgq_utils.config import get_preset
from dgq_utils.quantize.pipeline import dequantize_pipeline, quantize_pipeline

logger = logging.getLogger(__name__)

MAIN_PRESETS = ("fp", "baseline-w8a8", "dgq-w8a8", "dgq-w8a6", "dgq-w4a8")
GENERIC_PROMPTS = (
    "a photo of a cat sitting on a table",
    "a red car parked on a street",
    "a bowl of fruit on a wooden table",
    "a mountain lake at sunrise",
    "a dog running on the beach",
    "a city skyline at night",
)


def broken_recipe():
    """``baseline-w4a4``: the per-tensor baseline at 4-bit activations (expected to fall apart)."""
    return get_preset("baseline-w4a6").replace(name="baseline-w4a4", activations={"bits": 4})


def demo_recipes() -> list:
    return [get_preset(n) for n in MAIN_PRESETS] + [broken_recipe()]


def load_demo_pipeline(model: str | None = None):
    """``(pipe, description, default_prompts)``: --model, else the embedded model, else the tiny pipeline."""
    from dgq_utils.model.loading import load_pipeline

    if model is not None:
        return load_pipeline(model), f"model {model}", GENERIC_PROMPTS
    try:
        pipe = load_pipeline()
        return pipe, "embedded model", _world_prompts() or GENERIC_PROMPTS
    except FileNotFoundError as err:  # embedded weights not there (yet)
        logger.warning("embedded model unavailable (%s); using the tiny random pipeline", err)
    from dgq_utils.testing.tiny import TINY_PROMPTS, build_tiny_pipeline

    return build_tiny_pipeline(), "tiny random-weight pipeline", TINY_PROMPTS


def _world_prompts(n: int = 8) -> list[str] | None:
    """Captions of the synthetic world the embedded model was trained on (None if unavailable)."""
    try:
        from dgq_utils.world.scenes import captions, sample_scenes

        return list(captions(sample_scenes(n, split="test", seed=0)))
    except Exception:  # noqa: BLE001 - optional nicety; fall back to generic prompts
        return None


def _to_uint8(images) -> np.ndarray:
    arr = np.asarray(images, dtype=np.float32)
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def make_grid(rows: list[np.ndarray], labels: list[str], prompts: list[str], cell: int = 128):
    """A PIL image: one row per recipe (label on the left), one column per prompt (prompt on top)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    label_w, header_h, pad = 230, 28, 4
    n_rows, n_cols = len(rows), len(prompts)
    grid = Image.new("RGB", (label_w + n_cols * (cell + pad), header_h + n_rows * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, prompt in enumerate(prompts):
        text = prompt if len(prompt) <= 24 else prompt[:22] + "..."
        draw.text((label_w + j * (cell + pad) + 2, 4), text, fill="black", font=font)
    for i, (imgs, label) in enumerate(zip(rows, labels)):
        y = header_h + i * (cell + pad)
        for k, line in enumerate(label.split("\n")):
            draw.text((6, y + 6 + 14 * k), line, fill="black", font=font)
        for j, img in enumerate(imgs):
            tile = Image.fromarray(img).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (label_w + j * (cell + pad), y))
    return grid


def run_demo(out: str | Path = "figures/demo_grid.png", model: str | None = None, steps: int | None = None,
             n_prompts: int = 4, seed: int = 0, calibration_prompts: int = 8, progress: bool = True) -> Path:
    """Quantize with each demo recipe, generate the same prompts/seeds, and save the labelled grid."""
    from dgq_utils.atomic import atomic_save_image

    pipe, desc, default_prompts = load_demo_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    tiny = desc.startswith("tiny")
    steps = steps or (4 if tiny else 25)
    prompts = list(default_prompts[:n_prompts])
    calib = list(default_prompts[:calibration_prompts])
    rows, labels, fp_row = [], [], None
    for recipe in demo_recipes():
        if not recipe.is_fp:
            quantize_pipeline(pipe, recipe, calib, TRACE_SAMPLER.replace(num_inference_steps=steps), 1000 + seed,
                              progress=progress)
        try:
            images = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=7.5,
                          generator=torch.Generator().manual_seed(seed), output_type="np").images
        finally:
            dequantize_pipeline(pipe)
        row = _to_uint8(images)
        if fp_row is None:
            fp_row = row
        psnr = _psnr(row / 255.0, fp_row / 255.0)
        labels.append(f"{recipe.name}\n[{recipe.tag}]\nPSNR vs FP: " + ("-" if recipe.is_fp else f"{psnr:.1f} dB"))
        rows.append(row)
        print(f"{recipe.name:>16s}  {recipe.tag:>5s}  PSNR vs FP {psnr:6.2f} dB", flush=True)
    grid = make_grid(rows, labels, prompts)
    out = Path(out)
    atomic_save_image(grid, out)
    print(f"saved {out} ({desc}, {steps} steps, seed {seed})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dgq_utils.report.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="figures/demo_grid.png")
    ap.add_argument("--model", default=None, help="local diffusers folder or cached hub id (default: embedded/tiny)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 4 for tiny, else 25)")
    ap.add_argument("--prompts", type=int, default=4, help="number of prompts (columns)")
    ap.add_argument("--calibration-prompts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (1 is often fastest on small shared machines)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_demo(args.out, args.model, args.steps, args.prompts, args.seed, args.calibration_prompts,
             progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
