"""Training loops of the embedded model (used by ``scripts/train_embedded.py``).

Stages, each fed by scenes sampled on the CPU from a seeded generator and rendered on the training device
on the fly (no dataset on disk):

* ``clip``      small ``CLIPModel`` (text + vision towers), contrastive loss with several positives per row
                (captions that state the same canonical scene are positives of each other);
* ``vae``       ``AutoencoderKL``: L1 + MSE reconstruction + 1e-6 KL (SD's weight), then the latent
                ``scaling_factor`` = 1 / std of the latents, measured as SD did;
* ``evaluator`` the attribute classifier on all 40 (colour, shape) pairs (its own stream), with mild
                augmentation;
* ``unet``      ``UNet2DConditionModel`` with the epsilon objective (min-SNR-5 weighting over timesteps),
                10 % empty-caption dropout for classifier-free guidance, frozen text encoder and VAE, EMA.

All but the evaluator see only the ``train`` split (held-out colour x shape pairs never appear).
"""
from __future__ import annotations

import copy
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from dgq_utils.world import scenes as W
from dgq_utils.world.clip import image_embeds, text_embeds
from dgq_utils.world.evaluator import augment, classifier_loss
from dgq_utils.world.models import (
    SCHEDULER_CONFIG,
    AttributeClassifier,
    make_clip,
    make_unet,
    make_vae,
)


class Logger:
    """Appends JSON lines (one per logged step) and prints a short line."""

    def __init__(self, path: Path | None, quiet: bool = False):
        self.path = path
        self.quiet = quiet
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, **row):
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if not self.quiet:
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def lr_at(step: int, steps: int, lr: float, warmup: int, final: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``final * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr


def _adamw(params, lr, device, wd=0.01, betas=(0.9, 0.999)):
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=betas, fused=device.type == "cuda")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _stream(split: str, seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(W._split_seed(seed, split) ^ (salt * 0x9E3779B97F4A7C15 & ((1 << 62) - 1)))


# -------------------------------------------------------------------------------------------------- CLIP
def multi_positive_contrastive(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every pair with the same semantic key is a positive."""
    pos = (keys[:, None] == keys[None, :]).float()
    tgt = pos / pos.sum(1, keepdim=True)
    l_t = -(tgt * F.log_softmax(logits, 1)).sum(1).mean()
    l_i = -(tgt * F.log_softmax(logits.t(), 1)).sum(1).mean()
    return (l_t + l_i) / 2


@torch.no_grad()
def clip_retrieval_accuracy(clip, caption_ids, device, n: int = 1024, seed: int = 1, split: str = "val") -> float:
    """Text -> image top-1 accuracy among ``n`` scenes (a hit = an image of the same canonical scene)."""
    s = W.sample_scenes(n, split, seed)
    with autocast(device):
        fi = F.normalize(image_embeds(clip, W.render(s, device)).float(), dim=-1)
        ft = F.normalize(text_embeds(clip, caption_ids(s, device)).float(), dim=-1)
    best = (ft @ fi.t()).argmax(1).cpu()
    keys = W.semantic_keys(s)
    return float((keys[best] == keys).float().mean())


def train_clip(tok, caption_ids, device, steps: int, batch: int, lr: float, seed: int, log: Logger,
               max_seconds: float = float("inf")):
    torch.manual_seed(seed)
    clip = make_clip(tok).to(device).train()
    opt = _adamw(clip.parameters(), lr, device, wd=0.1, betas=(0.9, 0.98))
    g = _stream("train", seed, 1)
    t0 = time.time()
    acc_loss = torch.zeros((), device=device)
    for step in range(steps):
        _set_lr(opt, lr_at(step, steps, lr, warmup=min(200, steps // 10 + 1)))
        s = W.sample_scenes(batch, "train", generator=g)
        keys = W.semantic_keys(s).to(device)
        with autocast(device):
            x = W.render(s, device)
            fi = F.normalize(image_embeds(clip, x).float(), dim=-1)
            ft = F.normalize(text_embeds(clip, caption_ids(s, device)).float(), dim=-1)
            logits = clip.logit_scale.exp().clamp(max=100) * ft @ fi.t()
            loss = multi_positive_contrastive(logits, keys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        acc_loss += loss.detach()
        if (step + 1) % 50 == 0 or step == steps - 1:
            _sync(device)
            n = 50 if (step + 1) % 50 == 0 else (step + 1) % 50
            log(stage="clip", step=step + 1, loss=float(acc_loss) / n, lr=opt.param_groups[0]["lr"],
                logit_scale=float(clip.logit_scale.detach().exp()), seconds=time.time() - t0)
            acc_loss.zero_()
            if time.time() - t0 > max_seconds:
                log(stage="clip", note=f"stopped at step {step + 1}: time limit {max_seconds:.0f}s")
                break
    clip.eval()
    return clip


# --------------------------------------------------------------------------------------------------- VAE
def train_vae(device, steps: int, batch: int, lr: float, seed: int, log: Logger, kl_weight: float = 1e-6,
              max_seconds: float = float("inf")):
    torch.manual_seed(seed + 1)
    vae = make_vae().to(device).train()
    opt = _adamw(vae.parameters(), lr, device, wd=0.0)
    g = _stream("train", seed, 2)
    t0 = time.time()
    acc = torch.zeros(2, device=device)
    npix = 3 * W.IMAGE_SIZE * W.IMAGE_SIZE
    for step in range(steps):
        _set_lr(opt, lr_at(step, steps, lr, warmup=min(200, steps // 10 + 1)))
        s = W.sample_scenes(batch, "train", generator=g)
        with autocast(device):
            x = W.render(s, device) * 2 - 1
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
            l1 = (rec - x).abs().mean()
            mse = ((rec - x) ** 2).mean()
            kl = post.kl().float().mean() / npix      # per-image sum, per pixel (SD: 1e-6 x per-image sums)
            loss = l1 + mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        acc += torch.stack([loss.detach(), mse.detach()])
        if (step + 1) % 50 == 0 or step == steps - 1:
            _sync(device)
            n = 50 if (step + 1) % 50 == 0 else (step + 1) % 50
            l, m = (acc / n).tolist()
            psnr = 10 * math.log10(4.0 / max(m, 1e-12))   # images in [-1, 1]: peak-to-peak 2
            log(stage="vae", step=step + 1, loss=l, psnr=psnr, lr=opt.param_groups[0]["lr"], seconds=time.time() - t0)
            acc.zero_()
            if time.time() - t0 > max_seconds:
                log(stage="vae", note=f"stopped at step {step + 1}: time limit {max_seconds:.0f}s")
                break
    vae.eval()
    return vae


@torch.no_grad()
def latent_std(vae, device, n: int = 4096, seed: int = 0, batch: int = 512) -> float:
    """Std of sampled latents over ``n`` training scenes (SD sets ``scaling_factor`` = 1 / this)."""
    g = _stream("train", seed, 3)
    zs = []
    for i in range(0, n, batch):
        s = W.sample_scenes(min(batch, n - i), "train", generator=g)
        zs.append(vae.encode(W.render(s, device) * 2 - 1).latent_dist.sample().float().flatten())
    return float(torch.cat(zs).std())


@torch.no_grad()
def vae_psnr(vae, device, n: int = 512, seed: int = 0) -> float:
    s = W.sample_scenes(n, "test", seed)
    x = W.render(s, device)
    rec = (vae.decode(vae.encode(x * 2 - 1).latent_dist.mode()).sample.float() / 2 + 0.5).clamp(0, 1)
    mse = float(((rec - x) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


# ---------------------------------------------------------------------------------------------- evaluator
def train_evaluator(device, steps: int, batch: int, lr: float, seed: int, log: Logger,
                    max_seconds: float = float("inf")):
    torch.manual_seed(seed + 2)
    model = AttributeClassifier().to(device).train()
    opt = _adamw(model.parameters(), lr, device, wd=0.01)
    g = _stream("evaluator", seed, 4)
    ga = torch.Generator(device=device).manual_seed(seed + 5)
    t0 = time.time()
    acc = torch.zeros((), device=device)
    for step in range(steps):
        _set_lr(opt, lr_at(step, steps, lr, warmup=min(200, steps // 10 + 1), final=0.02))
        s = W.sample_scenes(batch, "evaluator", generator=g)
        t = {k: v.to(device) for k, v in W.canonical_targets(s).items()}
        with autocast(device):
            x = augment(W.render(s, device), ga)
            loss = classifier_loss(model(x), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc += loss.detach()
        if (step + 1) % 50 == 0 or step == steps - 1:
            _sync(device)
            n = 50 if (step + 1) % 50 == 0 else (step + 1) % 50
            log(stage="evaluator", step=step + 1, loss=float(acc) / n, lr=opt.param_groups[0]["lr"],
                seconds=time.time() - t0)
            acc.zero_()
            if time.time() - t0 > max_seconds:
                log(stage="evaluator", note=f"stopped at step {step + 1}: time limit {max_seconds:.0f}s")
                break
    model.eval()
    return model


# --------------------------------------------------------------------------------------------------- UNet
@torch.no_grad()
def build_pool(text_encoder, vae, caption_ids, device, n: int, seed: int, batch: int = 2048):
    """Encode ``n`` training scenes once: posterior mean/std of the latents and the text encoder's hidden
    states (bf16 on the GPU), so UNet steps only gather. Returns a dict of tensors on ``device``."""
    g = _stream("train", seed, 5)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    mean = torch.empty(n, 4, 16, 16, dtype=dt, device=device)
    std = torch.empty_like(mean)
    ctx = None
    for i in range(0, n, batch):
        m = min(batch, n - i)
        s = W.sample_scenes(m, "train", generator=g)
        with autocast(device):
            post = vae.encode(W.render(s, device) * 2 - 1).latent_dist
            h = text_encoder(input_ids=caption_ids(s, device)).last_hidden_state
        if ctx is None:
            ctx = torch.empty(n, *h.shape[1:], dtype=dt, device=device)
        mean[i:i + m], std[i:i + m], ctx[i:i + m] = post.mean.to(dt), post.std.to(dt), h.to(dt)
    return {"mean": mean, "std": std, "ctx": ctx}


def train_unet(text_encoder, vae, caption_ids, device, steps: int, batch: int, lr: float, seed: int, log: Logger,
               p_uncond: float = 0.1, min_snr_gamma: float = 5.0, ema_decay: float = 0.999,
               max_seconds: float = float("inf"), cross_attention_dim: int | None = None, pool_size: int = 0,
               init_from: str | None = None, warmup: int = 500, stage: str = "unet"):
    """Returns ``(ema_unet, steps_done)``. ``pool_size`` > 0: train on a pool of pre-encoded scenes (fresh
    posterior samples, noise and timesteps every step); 0: render and encode every batch on the fly."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed + 3)
    unet = make_unet(cross_attention_dim or text_encoder.config.hidden_size)
    if init_from is not None:   # continue training saved weights (fresh optimizer and LR schedule)
        from diffusers import UNet2DConditionModel

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(init_from).state_dict())
    unet = unet.to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    params = [p for p in unet.parameters()]
    ema_params = [p for p in ema.parameters()]
    opt = _adamw(params, lr, device, wd=0.01)
    cfg = {k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("skip_prk_steps", "set_alpha_to_one", "steps_offset")}
    noise_sched = DDPMScheduler(**cfg)
    ac = noise_sched.alphas_cumprod.to(device)
    sf = vae.config.scaling_factor
    text_encoder.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    g = _stream("train", seed, 5)
    gd = torch.Generator(device=device).manual_seed(seed + 6)
    empty = caption_ids.empty_ids(1, device)
    with torch.no_grad(), autocast(device):
        empty_ctx = text_encoder(input_ids=empty).last_hidden_state.float()
    t0 = time.time()
    pool = None
    if pool_size > 0:
        pool = build_pool(text_encoder, vae, caption_ids, device, pool_size, seed)
        _sync(device)
        log(stage=stage, note=f"pool of {pool_size} encoded scenes built in {time.time() - t0:.1f}s")
    acc = torch.zeros((), device=device)
    stopped = steps
    for step in range(steps):
        _set_lr(opt, lr_at(step, steps, lr, warmup=min(warmup, steps // 10 + 1), final=0.05))
        with torch.no_grad():
            if pool is not None:
                idx = torch.randint(0, pool_size, (batch,), generator=gd, device=device)
                eps = torch.randn((batch, 4, 16, 16), generator=gd, device=device)
                lat = (pool["mean"][idx].float() + pool["std"][idx].float() * eps) * sf
                ctx = pool["ctx"][idx].float()
            else:
                s = W.sample_scenes(batch, "train", generator=g)
                with autocast(device):
                    x = W.render(s, device) * 2 - 1
                    lat = vae.encode(x).latent_dist.sample(generator=gd).float() * sf
                    ctx = text_encoder(input_ids=caption_ids(s, device)).last_hidden_state.float()
            drop = torch.rand(batch, generator=gd, device=device) < p_uncond
            ctx = torch.where(drop[:, None, None], empty_ctx, ctx)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=gd, device=device)
        noise = torch.randn(lat.shape, generator=gd, device=device)
        a = ac[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
        with autocast(device):
            pred = unet(noisy, t, encoder_hidden_states=ctx).sample
        snr = ac[t] / (1 - ac[t])
        w = snr.clamp(max=min_snr_gamma) / snr
        loss = (w * ((pred.float() - noise) ** 2).mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - d)
        acc += loss.detach()
        if (step + 1) % 100 == 0 or step == steps - 1:
            _sync(device)
            n = 100 if (step + 1) % 100 == 0 else (step + 1) % 100
            log(stage=stage, step=step + 1, loss=float(acc) / n, lr=opt.param_groups[0]["lr"], seconds=time.time() - t0)
            acc.zero_()
            if time.time() - t0 > max_seconds:
                log(stage=stage, note=f"stopped at step {step + 1}: time limit {max_seconds:.0f}s")
                stopped = step + 1
                break
    del pool
    for b_ema, b in zip(ema.buffers(), unet.buffers()):
        b_ema.copy_(b)
    return ema, stopped
