#!/usr/bin/env python
"""Train the embedded SD-architecture model of the synthetic world from scratch, and evaluate it.

    python scripts/train_embedded.py --out data/embedded --device cuda            # everything (one H200)
    python scripts/train_embedded.py --out data/embedded --device cuda --stages clip,vae,evaluator
    python scripts/train_embedded.py --out data/embedded --device cuda --stages unet,eval
    python scripts/train_embedded.py --smoke --tiny --device cpu --out runs/smoke  # CPU end-to-end check

The UNet trains in phases (``--unet-schedule``, default two: 3600 steps at peak LR 1e-3, then 3900 steps at
6e-4 restarted from the phase-1 EMA weights), so each phase fits in one 10-minute command of the GPU machine:
``--stages unet --unet-schedule 3600:1e-3:500`` and then ``--stages unet --unet-schedule 3900:6e-4:100
--unet-first-phase 2 --unet-init data/embedded/pipeline/unet`` give the same run as ``--stages unet``.

Stages and what they write under ``--out``:

    clip       clip/ (CLIPModel + tokenizer), pipeline/text_encoder, pipeline/tokenizer
    vae        pipeline/vae (scaling_factor measured)
    evaluator  evaluator/ (classifier + config with its test accuracy)
    unet       pipeline/ (the full StableDiffusionPipeline, fp16 safetensors), after every phase
    eval       metrics.json ["quality"] (alignment, FID/KID/IS-style, CLIP score), logs/eval_samples.png

Each stage reads what the earlier ones wrote, so a run can be split over several machines/calls.
``metrics.json`` collects per-stage timings, the environment and the evaluation; ``logs/<stage>.jsonl``
the loss curves. Seeds are fixed (``--seed``); data are rendered on the fly from seeded generators.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgq_utils.world import scenes as W  # noqa: E402
from dgq_utils.world import train as T  # noqa: E402
from dgq_utils.world.evaluator import AttributeEvaluator, real_accuracy  # noqa: E402
from dgq_utils.world.models import ARCH, count_params, make_scheduler, text_encoder_from_clip  # noqa: E402
from dgq_utils.world.text import CaptionIds, build_world_tokenizer, load_world_tokenizer  # noqa: E402

DEFAULTS = {
    # stage: (steps, batch, lr)
    "clip": (2000, 1024, 1e-3),
    "vae": (2000, 256, 1e-3),
    "evaluator": (1500, 512, 2e-3),
}
UNET_BATCH = 2048
# UNet phases "steps:peak_lr:warmup": phase k > 1 starts from the fp16 weights saved by phase k - 1 with a fresh
# optimizer, LR schedule and encoded pool (this is how the shipped model was trained: each phase fits in one
# 10-minute command of the GPU machine).
UNET_SCHEDULE = "3600:1e-3:500,3900:6e-4:100"
SMOKE_STEPS = 30


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/embedded")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stages", default="clip,vae,evaluator,unet,eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="few steps per stage (--smoke-steps), tiny evaluation")
    p.add_argument("--smoke-steps", type=int, default=SMOKE_STEPS)
    p.add_argument("--tiny", action="store_true", help="batch 16 everywhere (CPU checks)")
    for st, (steps, batch, lr) in DEFAULTS.items():
        p.add_argument(f"--{st}-steps", type=int, default=steps)
        p.add_argument(f"--{st}-batch", type=int, default=batch)
        p.add_argument(f"--{st}-lr", type=float, default=lr)
        p.add_argument(f"--{st}-max-minutes", type=float, default=float("inf"),
                       help="stop the stage early (logged) when it runs longer than this")
    p.add_argument("--unet-batch", type=int, default=UNET_BATCH)
    p.add_argument("--unet-schedule", default=UNET_SCHEDULE, help="comma-separated phases steps:peak_lr:warmup")
    p.add_argument("--unet-max-minutes", type=float, default=float("inf"), help="per phase, as for the other stages")
    p.add_argument("--unet-pool", type=int, default=400_000,
                   help="pre-encoded training scenes for the UNet (0: render + encode every batch)")
    p.add_argument("--unet-ema", type=float, default=0.9985)
    p.add_argument("--unet-init", default=None,
                   help="start the first phase from these UNet weights (a diffusers unet folder)")
    p.add_argument("--unet-first-phase", type=int, default=1,
                   help="number of the first phase run (names logs/metrics; phase k uses seed + 17 (k - 1))")
    p.add_argument("--eval-n", type=int, default=500, help="prompts per evaluation set (one-object, two, held-out)")
    p.add_argument("--eval-real", type=int, default=2000)
    p.add_argument("--eval-batch", type=int, default=250)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args()
    a.unet_phases = []
    for ph in a.unet_schedule.split(","):
        steps, lr, warmup = ph.split(":")
        a.unet_phases.append((int(steps), float(lr), int(warmup)))
    if a.smoke:
        for st in DEFAULTS:
            setattr(a, f"{st}_steps", min(getattr(a, f"{st}_steps"), a.smoke_steps))
        a.unet_phases = [(min(st, a.smoke_steps), lr, min(w, 10)) for st, lr, w in a.unet_phases]
        a.eval_n, a.eval_real = min(a.eval_n, 16), min(a.eval_real, 64)
    if a.tiny:
        for st in DEFAULTS:
            setattr(a, f"{st}_batch", 16)
        a.unet_batch = 16
        a.eval_batch = min(a.eval_batch, 16)
    if a.smoke:
        a.unet_pool = min(a.unet_pool, 4 * a.unet_batch)
    return a


def environment(device: torch.device) -> dict:
    import diffusers
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def update_metrics(out: Path, **entries) -> dict:
    path = out / "metrics.json"
    m = json.loads(path.read_text()) if path.exists() else {}
    for k, v in entries.items():
        if isinstance(v, dict) and isinstance(m.get(k), dict):
            m[k].update(v)
        else:
            m[k] = v
    path.write_text(json.dumps(m, indent=2))
    return m


def fp16_copy(module):
    """Round weights to fp16 and back (what the shipped fp16 files give) for frozen use in later stages."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def record_float32_load_dtype(text_encoder_dir: Path) -> None:
    """Store fp16 weights but declare float32 as the text encoder's load dtype.

    transformers 5 loads a model in the ``dtype`` its config.json records, diffusers loads the UNet and VAE in
    float32 whatever the file holds: with ``"dtype": "float16"`` a plain ``DiffusionPipeline.from_pretrained``
    mixes half and float modules and crashes at the first matmul. Recording float32 keeps the files small
    (fp16 on disk) and makes every component load in float32 by default.
    """
    cfg_path = text_encoder_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main():
    a = parse()
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    out = Path(a.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = set(stages) - {"clip", "vae", "evaluator", "unet", "eval"}
    if unknown:
        raise SystemExit(f"Unknown stages {sorted(unknown)}")
    pipe_dir = out / "pipeline"
    env = environment(dev)
    print("environment", env, flush=True)
    update_metrics(out, environment={**env, "command": " ".join(sys.argv)}, smoke=bool(a.smoke))

    def logger(stage):
        path = out / "logs" / f"{stage}.jsonl"
        if path.exists():
            path.unlink()
        return T.Logger(path, quiet=a.quiet)

    def record(stage, steps_done, seconds, **extra):
        steps = getattr(a, f"{stage}_steps")
        batch = getattr(a, f"{stage}_batch")
        info = {"steps": steps_done, "planned_steps": steps, "batch": batch, "lr": getattr(a, f"{stage}_lr"),
                "seconds": round(seconds, 1), "steps_per_s": round(steps_done / max(seconds, 1e-9), 2), **extra}
        print(f"== {stage}: {info}", flush=True)
        update_metrics(out, training={stage: info})

    tok_dir = pipe_dir / "tokenizer"
    if "clip" in stages:
        tok = build_world_tokenizer(tok_dir)
        caption_ids = CaptionIds(tok)
        t0 = time.time()
        clip = T.train_clip(tok, caption_ids, dev, a.clip_steps, a.clip_batch, a.clip_lr, a.seed, logger("clip"),
                            max_seconds=a.clip_max_minutes * 60)
        T._sync(dev)
        dt = time.time() - t0
        steps_done = _last_step(out / "logs" / "clip.jsonl")
        clip = fp16_copy(clip.float())
        acc = T.clip_retrieval_accuracy(clip, caption_ids, dev)
        clip.half().save_pretrained(out / "clip", safe_serialization=True)
        tok.save_pretrained(out / "clip")
        te = text_encoder_from_clip(clip.float().cpu())
        te.half().save_pretrained(pipe_dir / "text_encoder", safe_serialization=True)
        record_float32_load_dtype(pipe_dir / "text_encoder")
        record("clip", steps_done, dt, retrieval_top1_val=round(acc, 4),
               params={"text": count_params(clip.text_model), "vision": count_params(clip.vision_model),
                       "total": count_params(clip)})
        del clip
    if "vae" in stages:
        t0 = time.time()
        vae = T.train_vae(dev, a.vae_steps, a.vae_batch, a.vae_lr, a.seed, logger("vae"),
                          max_seconds=a.vae_max_minutes * 60)
        T._sync(dev)
        dt = time.time() - t0
        vae = fp16_copy(vae.float())
        std = T.latent_std(vae, dev, n=4096 if not a.smoke else 256, seed=a.seed)
        vae.register_to_config(scaling_factor=round(1.0 / std, 5))
        psnr = T.vae_psnr(vae, dev, n=512 if not a.smoke else 32)
        vae.half().save_pretrained(pipe_dir / "vae", safe_serialization=True)
        record("vae", _last_step(out / "logs" / "vae.jsonl"), dt, latent_std=round(std, 5),
               scaling_factor=round(1.0 / std, 5), test_psnr_db=round(psnr, 2), params=count_params(vae))
        del vae
    if "evaluator" in stages:
        t0 = time.time()
        clf = T.train_evaluator(dev, a.evaluator_steps, a.evaluator_batch, a.evaluator_lr, a.seed,
                                logger("evaluator"), max_seconds=a.evaluator_max_minutes * 60)
        T._sync(dev)
        dt = time.time() - t0
        ev = AttributeEvaluator(fp16_copy(clf.float()), dev)
        n = 4000 if not a.smoke else 64
        acc = {split: real_accuracy(ev, W.sample_scenes(n, split, seed=a.seed + 7)) for split in ("test", "heldout")}
        ev.save(out / "evaluator", extra={"real_accuracy": acc})
        record("evaluator", _last_step(out / "logs" / "evaluator.jsonl"), dt, real_accuracy=acc,
               params=count_params(clf))
        update_metrics(out, evaluator_accuracy=acc)
        del clf, ev
    if "unet" in stages:
        from diffusers import AutoencoderKL, StableDiffusionPipeline
        from transformers import CLIPTextModel

        for k, (steps, lr, warmup) in enumerate(a.unet_phases, start=a.unet_first_phase):
            name = "unet" if k == 1 else f"unet_phase{k}"
            init = a.unet_init if k == a.unet_first_phase else str(pipe_dir / "unet")
            tok = load_world_tokenizer(tok_dir)
            caption_ids = CaptionIds(tok)
            te = CLIPTextModel.from_pretrained(pipe_dir / "text_encoder", dtype=torch.float32).to(dev)
            vae = AutoencoderKL.from_pretrained(pipe_dir / "vae", dtype=torch.float32).to(dev)
            t0 = time.time()
            unet, steps_done = T.train_unet(te, vae, caption_ids, dev, steps, a.unet_batch, lr, a.seed + 17 * (k - 1),
                                            logger(name), max_seconds=a.unet_max_minutes * 60, pool_size=a.unet_pool,
                                            ema_decay=a.unet_ema, init_from=init, warmup=warmup, stage=name)
            T._sync(dev)
            dt = time.time() - t0
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                           scheduler=make_scheduler("pndm"), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
            pipe.to(dtype=torch.float16)
            pipe.save_pretrained(pipe_dir, safe_serialization=True)
            record_float32_load_dtype(pipe_dir / "text_encoder")
            info = {"phase": k, "steps": steps_done, "planned_steps": steps, "batch": a.unet_batch, "lr": lr,
                    "warmup": warmup, "seconds": round(dt, 1), "steps_per_s": round(steps_done / dt, 2),
                    "params": count_params(unet), "pool": a.unet_pool, "ema_decay": a.unet_ema, "init": init}
            print(f"== {name}: {info}", flush=True)
            update_metrics(out, training={name: info})
            update_metrics(out, architecture={"unet": dict(ARCH["unet"]), "vae": dict(ARCH["vae"]),
                                              "text": dict(ARCH["text"]), "vision": dict(ARCH["vision"]),
                                              "params": {"unet": count_params(unet), "vae": count_params(vae),
                                                         "text_encoder": count_params(te)}})
        del pipe, unet, te, vae
    if "eval" in stages:
        from dgq_utils.model.loading import load_pipeline
        from dgq_utils.world.clip import load_world_clip
        from dgq_utils.world.figures import save_grid
        from dgq_utils.world.quality import evaluate_pipeline

        if dev.type == "cuda":   # evaluate in plain fp32 arithmetic, as on a CPU
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        t0 = time.time()
        pipe = load_pipeline(pipe_dir, device=dev)
        ev = AttributeEvaluator.load(out / "evaluator", dev)
        clip = load_world_clip(out / "clip", device=dev)
        metrics, samples = evaluate_pipeline(pipe, ev, n_one=a.eval_n, n_two=a.eval_n, n_heldout=a.eval_n,
                                             n_real=a.eval_real, seed=a.seed, batch_size=a.eval_batch, clip=clip,
                                             cuda=dev.type == "cuda", evaluator_dir=out / "evaluator")
        metrics["seconds"] = round(time.time() - t0, 1)
        update_metrics(out, quality=metrics)
        print(json.dumps(metrics, indent=1), flush=True)
        ims, caps = [], []
        for name, (im, cp) in samples.items():
            ims.append(im[:16])
            caps += cp[:16]
        save_grid(torch.cat(ims), caps, out / "logs" / "eval_samples.png", ncol=8)
    total = json.loads((out / "metrics.json").read_text()).get("training", {})
    print("== stage seconds:", {k: v.get("seconds") for k, v in total.items()}, flush=True)


def _last_step(path: Path) -> int:
    step = 0
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            step = row.get("step", step)
    return step


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
