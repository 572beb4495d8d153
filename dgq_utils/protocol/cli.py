"""``python -m dgq_utils.protocol``: the paper's SD v1.4 / SDXL-Turbo protocols from the command line.

    python -m dgq_utils.protocol sd-v1.4 --model /models/stable-diffusion-v1-4 \\
        --coco-captions metadata.csv --fid-reference real_im256.npz \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --clip-weights open_clip_pytorch_model.bin \\
        --settings W8A8 W8A6 W4A8 W4A6 --k 8 16 --partiprompts PartiPrompts.tsv --out runs/sd14
    accelerate launch --num_processes 8 -m dgq_utils.protocol sd-v1.4 ...      # the same over 8 GPUs

Every input is a local path (nothing is downloaded); a missing one stops the run before any model is loaded,
naming the option and where the paper's copy comes from. ``--check`` only checks the inputs and prints the plan.
Errors in the arguments exit with status 2 and one message naming the option.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from dgq_utils.config import SamplerSettings
from dgq_utils.config import validation as V
from dgq_utils.evaluate.config import BootstrapConfig
from dgq_utils.evaluate.protocol import (
    PAPER_CLIP_MODEL,
    PAPER_N_CALIBRATION,
    PAPER_N_CLIP,
    PAPER_N_IMAGES,
    PAPER_RESIZE,
    PAPER_SEED,
    ProtocolConfig,
)
from dgq_utils.model.loading import ModelNotAvailableOffline, UnsupportedPipeline
from dgq_utils.protocol.inputs import MissingInput
from dgq_utils.protocol.paper import (
    K_VALUES,
    METHODS,
    PAPER_N_PARTI_PROMPTS,
    PAPER_PARTI_IMAGES_PER_PROMPT,
    PROTOCOLS,
    SETTINGS,
    plan_entries,
)
from dgq_utils.protocol.run import ProtocolRun, check_run, run_protocol

__all__ = ["build_parser", "build_run", "main", "plan_text"]

PROG = "python -m dgq_utils.protocol"
#: the errors that are the user's to fix: printed as one line, exit status 2
USER_ERRORS = (MissingInput, V.InvalidArgumentError, UnsupportedPipeline, ModelNotAvailableOffline)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Protocols: " + "; ".join(
                                     f"{p.name}: {p.title}, {p.sampler.num_inference_steps} steps, guidance "
                                     f"{p.sampler.guidance_scale:g}, {p.sampler.height}x{p.sampler.width}, DGQ K "
                                     f"{'/'.join(map(str, p.default_k))} by default" for p in PROTOCOLS.values()))
    ap.add_argument("protocol", choices=list(PROTOCOLS), help="which of the paper's protocols")
    f = ap.add_argument_group("inputs (local paths)")
    f.add_argument("--model", help="local diffusers folder of the model (SD v1.4 / SDXL-Turbo)")
    f.add_argument("--coco-captions", required=True, help="BK-SDM's metadata.csv (30k val2014 captions)")
    f.add_argument("--fid-reference", required=True, help="BK-SDM's real_im256.npz (FID reference statistics)")
    f.add_argument("--inception-weights", help="torch-fidelity's Inception weights file (default: its cache folder)")
    f.add_argument("--clip-weights", help="open_clip weights of --clip-model (ViT-g-14 laion2b_s34b_b88k)")
    f.add_argument("--clip-model", default=PAPER_CLIP_MODEL, help=f"open_clip model name (default {PAPER_CLIP_MODEL})")
    f.add_argument("--calibration-captions", help="COCO captions_train2017.json (default: captions after the "
                                                  "evaluation rows of --coco-captions)")
    f.add_argument("--partiprompts", help="PartiPrompts.tsv: adds the PartiPrompts CLIP column")
    w = ap.add_argument_group("what to run")
    w.add_argument("--settings", nargs="+", default=list(SETTINGS), metavar="WxAy",
                   help=f"bit settings (default: all four: {' '.join(SETTINGS)})")
    w.add_argument("--k", nargs="+", type=int, default=None, metavar="K",
                   help=f"DGQ group counts, of {', '.join(map(str, K_VALUES))} (default: the paper's for the model)")
    w.add_argument("--methods", nargs="+", default=["dgq"], metavar="METHOD",
                   help=f"of {', '.join(METHODS)} (tfmq / qdiff: this repository's per-tensor stand-ins; default dgq)")
    n = ap.add_argument_group("sizes (defaults: the paper's)")
    n.add_argument("--n-images", type=int, default=PAPER_N_IMAGES, help="MS-COCO captions, one image each")
    n.add_argument("--n-clip", type=int, default=PAPER_N_CLIP, help="CLIP-scored images (the first ones)")
    n.add_argument("--n-calibration", type=int, default=PAPER_N_CALIBRATION, help="calibration captions")
    n.add_argument("--n-parti-prompts", type=int, default=PAPER_N_PARTI_PROMPTS, help="PartiPrompts prompts")
    n.add_argument("--parti-images-per-prompt", type=int, default=PAPER_PARTI_IMAGES_PER_PROMPT)
    n.add_argument("--resize", type=int, default=PAPER_RESIZE, help="side before FID / IS / CLIP")
    n.add_argument("--seed", type=int, default=PAPER_SEED)
    n.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates for CLIP")
    n.add_argument("--n-boot-set", type=int, default=50, help="bootstrap replicates for FID / IS")
    n.add_argument("--no-fidelity", action="store_true", help="skip PSNR / SSIM of each recipe vs FP")
    r = ap.add_argument_group("running")
    r.add_argument("--out", required=True, help="output folder (results, table2.md, caches; rerun to resume)")
    r.add_argument("--device", default="cuda")
    r.add_argument("--dtype", default="float32", help="float32 (the paper's FP), float16 or bfloat16")
    r.add_argument("--batch-size", type=int, default=None, help="images per pipeline call (default 8)")
    r.add_argument("--image-format", choices=["png", "jpg"], default="png",
                   help="jpg reproduces the official JPEG intermediates")
    r.add_argument("--check", action="store_true", help="check the inputs, print the plan, run nothing")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def build_run(args: argparse.Namespace) -> ProtocolRun:
    """The :class:`~dgq_utils.protocol.run.ProtocolRun` of parsed arguments (every value checked, each error naming
    its option)."""
    spec = PROTOCOLS[args.protocol]
    for name in ("n_images", "n_clip", "n_calibration", "n_parti_prompts", "parti_images_per_prompt", "resize",
                 "n_boot", "n_boot_set"):
        V.check_count(getattr(args, name), "--" + name.replace("_", "-"), 1)
    if args.batch_size is not None:
        V.check_batch_size(args.batch_size, "--batch-size")
    V.check_seed(args.seed, "--seed")
    V.check_device(args.device, "--device")
    dtype = V.check_dtype(args.dtype, "--dtype")
    entries = plan_entries(args.settings, args.k if args.k is not None else spec.default_k, args.methods)
    sampler = spec.sampler.replace(image_format=args.image_format,
                                   **({"batch_size": args.batch_size} if args.batch_size else {}))
    return ProtocolRun(
        protocol=args.protocol, out_dir=args.out, model=args.model, coco_captions=args.coco_captions,
        fid_reference=args.fid_reference, inception_weights=args.inception_weights, clip_model=args.clip_model,
        clip_weights=args.clip_weights, calibration_captions=args.calibration_captions,
        partiprompts=args.partiprompts, entries=tuple(entries),
        config=ProtocolConfig(n_images=args.n_images, n_clip=args.n_clip, resize=args.resize, seed=args.seed,
                              n_calibration=args.n_calibration, fidelity_to_fp=not args.no_fidelity),
        n_parti_prompts=args.n_parti_prompts, parti_images_per_prompt=args.parti_images_per_prompt,
        sampler=sampler, bootstrap=BootstrapConfig(n_boot=args.n_boot, n_set=args.n_boot_set),
        device=args.device, dtype=dtype)


def plan_text(run: ProtocolRun) -> str:
    """What the run will do, in a few lines (printed by ``--check`` and at the start)."""
    s: SamplerSettings = run.the_sampler
    per = run.config.n_images + (run.n_parti_prompts * run.parti_images_per_prompt if run.partiprompts else 0)
    lines = [f"{run.spec.title}: {s.num_inference_steps} steps, guidance {s.guidance_scale:g}, "
             f"{s.height}x{s.width}, batch {s.batch_size}, {run.dtype}, {run.device}",
             f"{len(run.entries)} recipes x {per} images = {len(run.entries) * per} images "
             f"({run.config.n_images} MS-COCO" + (f" + {run.n_parti_prompts} x {run.parti_images_per_prompt} "
                                                  "PartiPrompts)" if run.partiprompts else ")")]
    lines += [f"  {e.setting:7s} {e.label:9s} -> {e.recipe}" for e in run.entries]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:  # everything about the inputs is checked before any model is loaded
        run = build_run(args)
        check_run(run)
    except USER_ERRORS + (ValueError, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(plan_text(run), flush=True)
    if args.check:
        print("inputs: all present and consistent")
        return 0
    try:
        outcome = run_protocol(run, progress=not args.quiet)
    except USER_ERRORS as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if outcome.table2_md is not None:
        print(outcome.table2_md.read_text())
    return 0
