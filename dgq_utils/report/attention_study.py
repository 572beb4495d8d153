"""Notebook 03: attention probabilities -- capture, ``<start>`` mass, log2 vs uniform error, scales.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd
import torch

from dgq_utils.calibrate.trace import TRACE_SAMPLER, Trace
from dgq_utils.config.sampler import SamplerSettings, check_sampler, takes_sampler
from dgq_utils.model.attention import ProbQuantizer
from dgq_utils.report.layer_names import short_name, unet_rank
from dgq_utils.timing import timed_stage

__all__ = [
    "AttentionCapture",
    "capture_attention",
    "start_mass_table",
    "prob_error_table",
    "scale_table",
]


# ==============================================================================================================
# 03: attention
# ==============================================================================================================
@dataclass
class AttentionCapture:
    """What :func:`capture_attention` recorded.

    ``kinds[layer]``: ``"self"`` / ``"cross"``. ``key_mass[(layer, ti)]``: ``(B, Nk)`` mean probability each key
    receives (over heads and queries) for every sample. ``probs[(layer, ti)]`` / ``values[(layer, ti)]``:
    ``(B, heads, Nq, Nk)`` probabilities and ``(B, heads, Nk, d)`` values, for the selected layers and timesteps.
    Batch layout under classifier-free guidance: samples ``0..n-1`` are the unconditional halves of the
    ``n`` prompts of a batch, ``n..2n-1`` the conditional ones (diffusers' order), batches concatenated;
    ``sample_prompt`` / ``sample_half`` give the prompt index and ``"uncond"``/``"cond"`` of every sample.
    ``tokens[i]``: the token strings of prompt ``i`` (77 positions, ``<start>`` first).
    """

    prompts: list[str]
    kinds: dict[str, str] = field(default_factory=dict)
    key_mass: dict[tuple, torch.Tensor] = field(default_factory=dict)
    probs: dict[tuple, torch.Tensor] = field(default_factory=dict)
    values: dict[tuple, torch.Tensor] = field(default_factory=dict)
    timesteps: list[float] = field(default_factory=list)
    sample_prompt: list[int] = field(default_factory=list)
    sample_half: list[str] = field(default_factory=list)
    tokens: list[list[str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    _parts: dict = field(default_factory=dict, repr=False)

    def record(self, name, kind, ti, probs, v, full):
        """Add one call's attention of layer ``name`` at timestep index ``ti`` (full tensors if ``full``)."""
        self.kinds[name] = kind
        self._parts.setdefault(("mass", name, ti), []).append(probs.mean(dim=(1, 2)).detach().cpu())
        if full:
            self._parts.setdefault(("probs", name, ti), []).append(probs.detach().cpu().clone())
            self._parts.setdefault(("values", name, ti), []).append(v.detach().float().cpu().clone())

    def finish(self):
        """Concatenate the recorded batches (called once, after the run)."""
        for (what, name, ti), parts in self._parts.items():
            target = {"mass": self.key_mass, "probs": self.probs, "values": self.values}[what]
            target[(name, ti)] = torch.cat(parts)
        self._parts.clear()

    def layers(self, kind: str | None = None) -> list[str]:
        return [n for n, k in self.kinds.items() if kind is None or k == kind]


@timed_stage("capture_attention")
@takes_sampler
@torch.no_grad()
def capture_attention(
    pipe,
    prompts: Sequence[str],
    sampler: SamplerSettings | None = None,
    seed: int = 0,
    *,
    full_layers: Sequence[str] | None = None,
    full_timesteps: Sequence[int] | None = None,
    max_elements_per_sample: int = 2**23,
    progress: bool = True,
) -> AttentionCapture:
    """Run ``prompts`` through the FP pipeline and record the attention of every UNet attention layer.

    ``sampler``: steps, guidance, resolution and batch size (default
    :data:`~dgq_utils.calibrate.trace.TRACE_SAMPLER`); batch ``i`` is seeded ``seed + i``.
    Per-key mass is kept for every layer, timestep and sample (small). Full probabilities and values are kept for
    ``full_layers`` (default: every attention) at ``full_timesteps`` (UNet-call indices; default: first, middle,
    last), except layers whose probabilities exceed ``max_elements_per_sample`` per sample (e.g. SD v1.4's
    64x64 self-attention, 8 x 4096^2 values) unless named explicitly -- those are listed in ``skipped``.
    The attention is the engine's :class:`~dgq_utils.model.attention.DGQAttnProcessor` (quantizers off) with a
    record hook; the pipeline's processors are restored afterwards.
    """
    sampler = check_sampler(sampler, TRACE_SAMPLER, "capture_attention")
    unet = pipe.unet
    prompts = list(prompts)
    cap = AttentionCapture(prompts)
    n_calls = sampler.num_inference_steps + (1 if type(pipe.scheduler).__name__ == "PNDMScheduler" else 0)
    tis = set(full_timesteps) if full_timesteps is not None else {0, n_calls // 2, n_calls - 1}
    lat = int(unet.config.sample_size) if sampler.height is None else sampler.height // int(pipe.vae_scale_factor)
    explicit_layers = set(full_layers) if full_layers is not None else set()
    full: dict[str, bool] = {}
    for key in unet.attn_processors:
        name = key[: -len(".processor")]
        attn = unet.get_submodule(name)
        kind = "cross" if attn.is_cross_attention else "self"
        explicit = name in explicit_layers
        full[name] = full_layers is None or explicit
        if full[name] and not explicit:
            # queries at this layer: the latent side of its resolution level, squared
            level = _attention_level(name, len(unet.config.block_out_channels))
            nq = (lat // 2**level) ** 2
            nk = 77 if kind == "cross" else nq
            if attn.heads * nq * nk > max_elements_per_sample:
                full[name] = False
                cap.skipped.append(name)

    def record(proc, probs, query, key, value):
        ti = proc.state.set_index
        cap.record(proc.name, proc.kind, ti, probs, value, full[proc.name] and ti in tis)

    with Trace(pipe, sampler, seed, progress=progress, desc="capturing attention") as trace:
        trace.on_attention(record)
        cap.timesteps = trace.run(prompts)
    cap.finish()
    bs = sampler.batch_size
    cfg = sampler.guidance_scale > 1
    for start in range(0, len(prompts), bs):
        idx = list(range(start, min(start + bs, len(prompts))))
        if cfg:
            cap.sample_prompt += idx + idx
            cap.sample_half += ["uncond"] * len(idx) + ["cond"] * len(idx)
        else:
            cap.sample_prompt += idx
            cap.sample_half += ["cond"] * len(idx)
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    cap.tokens = [tok.convert_ids_to_tokens(r) for r in ids]
    return cap


def _attention_level(name: str, n_levels: int) -> int:
    """Resolution level (0 = full latent size) of an attention module from its name."""
    m = re.match(r"^down_blocks\.(\d+)", name)
    if m:
        return int(m.group(1))
    m = re.match(r"^up_blocks\.(\d+)", name)
    if m:
        return n_levels - 1 - int(m.group(1))
    return n_levels - 1  # mid block


def start_mass_table(stats) -> pd.DataFrame:
    """From ``ActivationStats.attention_frame()``: per (attention layer, timestep) the mean probability on key 0
    (``<start>`` in cross-attention; the top-left latent pixel in self-attention), averaged over heads, and the
    uniform share ``1 / num_keys`` for comparison."""
    af = stats.attention_frame()
    if af.empty:
        return af
    g = af.groupby(["layer", "kind", "timestep_index", "timestep"], sort=False).agg(
        start_mass=("start_mass", "mean"), start_mass_max=("start_mass_max", "max"),
        max_prob=("max_prob", "max"), max_prob_excl_start=("max_prob_excl_start", "max"),
        num_keys=("num_keys", "first")).reset_index()
    g["uniform_share"] = 1.0 / g["num_keys"]
    g["start_over_uniform"] = g["start_mass"] / g["uniform_share"]
    g["short"] = g["layer"].map(short_name)
    g = g.iloc[sorted(range(len(g)), key=lambda i: unet_rank(g["layer"].iat[i]))]
    return g.reset_index(drop=True)


def _prob_quant(p: torch.Tensor, quantizer: str, bits: int, scale: str, keep_start: bool) -> torch.Tensor:
    pq = ProbQuantizer("analysis", bits, quantizer=quantizer, scale=scale, keep_start=keep_start, zero_level=True)
    pq.mode = "quant"
    return pq.quantize(p)


@timed_stage("prob_error_table")
def prob_error_table(cap: AttentionCapture, *, bits: Sequence[int] = (4, 6, 8),
                     quantizers: Sequence[str] = ("uniform", "log2"),
                     scales: Sequence[str] = ("per_prompt", "batch")) -> pd.DataFrame:
    """Error of quantizing the captured softmax probabilities, per (layer, timestep, quantizer, bits, scale,
    ``<start>`` FP).

    Quantization uses the engine's :class:`dgq_utils.model.attention.ProbQuantizer` (what the quantized model runs).
    Columns: ``prob_mse`` (mean squared error of the probabilities), ``out_rel_err`` (``||(P^ - P) V|| / ||P V||``,
    the relative error of the attention output, the quantity that matters downstream), ``zeroed`` (share of
    nonzero probabilities that became exactly 0), ``row_sum`` (mean row sum after quantization; 1 before).
    ``keep_start=True`` is only evaluated in cross-attention (where ``<start>`` is a text token).
    """
    rows = []
    for (name, ti), p in cap.probs.items():
        v = cap.values[(name, ti)]
        kind = cap.kinds[name]
        ref = torch.matmul(p, v)
        ref_norm = float(ref.double().norm())
        nz = p > 0
        for q in quantizers:
            for b in bits:
                for s in scales:
                    for keep in ((False, True) if kind == "cross" else (False,)):
                        pq = _prob_quant(p, q, b, s, keep)
                        out = torch.matmul(pq, v)
                        rows.append({
                            "layer": name, "short": short_name(name), "kind": kind, "timestep_index": ti,
                            "timestep": cap.timesteps[ti] if ti < len(cap.timesteps) else math.nan,
                            "quantizer": q, "bits": b, "scale": s, "start_fp": keep,
                            "prob_mse": float((pq - p).double().pow(2).mean()),
                            "out_rel_err": float((out - ref).double().norm()) / max(ref_norm, 1e-30),
                            "zeroed": float(((pq == 0) & nz).sum()) / max(int(nz.sum()), 1),
                            "row_sum": float(pq.sum(-1).mean()),
                        })
    return pd.DataFrame(rows)


def scale_table(cap: AttentionCapture, *, bits: int = 6) -> pd.DataFrame:
    """Per-prompt vs batch max: per (layer, timestep, sample) the sample's own max probability (excluding
    ``<start>`` in cross-attention, as DGQ's scale does), the batch max, their ratio, and the output error of
    one sample under each scale for the log2 and uniform quantizers at ``bits``.

    The batch is the whole capture batch (both CFG halves, all prompts of a ``batch_size`` chunk), which is what
    the official code's ``x.max()`` sees.
    """
    rows = []
    n_batch = None
    for (name, ti), p in cap.probs.items():
        v = cap.values[(name, ti)]
        kind = cap.kinds[name]
        keep = kind == "cross"
        rest = p[..., 1:] if keep else p
        own = rest.amax(dim=(1, 2, 3))
        batch_max = float(rest.amax())
        ref = torch.matmul(p, v)
        errs = {}
        for q in ("log2", "uniform"):
            for s in ("per_prompt", "batch"):
                out = torch.matmul(_prob_quant(p, q, bits, s, keep), v)
                errs[(q, s)] = ((out - ref).flatten(1).double().norm(dim=1)
                                / ref.flatten(1).double().norm(dim=1).clamp_min(1e-30))
        n_batch = p.shape[0]
        for i in range(n_batch):
            row = {"layer": name, "short": short_name(name), "kind": kind, "timestep_index": ti,
                   "sample": i, "prompt_index": cap.sample_prompt[i] if i < len(cap.sample_prompt) else -1,
                   "half": cap.sample_half[i] if i < len(cap.sample_half) else "cond",
                   "sample_max": float(own[i]), "batch_max": batch_max,
                   "batch_over_sample": batch_max / max(float(own[i]), 1e-30)}
            for (q, s), e in errs.items():
                row[f"{q}_{s}_err"] = float(e[i])
            rows.append(row)
    return pd.DataFrame(rows)
