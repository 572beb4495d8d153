"""Weight reconstruction during calibration: layer-wise AdaRound (``WeightQuantConfig.rounding="adaround"``).

Where the inputs come from: the calibration passes already run every quantized layer on the calibration
prompts. When the recipe asks for AdaRound, :func:`attach` gives every quantized layer an
:class:`~dgq_utils.core.input_sample.InputSample` (at most ``adaround.samples`` rows, seeded with
``adaround.seed`` plus the layer's position) which the layer feeds with its raw input on every forward of those
passes -- so with the default ``calibration_upstream="fp"`` the inputs are those of the FP model (every quantizer
off, FP weights), over all timesteps, both CFG halves and every calibration prompt. (With the official
``"per_tensor_quantized"`` upstream only the ``"observe_quant"`` forward of each call is sampled: the inputs of
the per-tensor-quantized model, as in the official reconstruction, which also feeds quantized-model inputs.) No extra sampling pass is run; the observation memo
keeps the samples with the statistics.

What is optimised: :func:`reconstruct` runs :func:`~dgq_utils.core.adaround.adaround` per layer, independently
(layer-wise; the layers' inputs do not change while their neighbours are rounded), starting from the grid of the
range search (``range_method``, MSE by default) that ``quantize_weight`` already set, and installs the learned
rounding mask. Activations are not quantized during the optimisation (official). Layers it cannot handle (a
grouped convolution, or a non-zero padding mode) keep round-to-nearest, recorded as a mask equal to nearest and a
note.

Block-wise (``AdaRoundConfig.granularity="block"``, BRECQ-style as in the official SD code): every outermost
``ResnetBlock2D`` / ``BasicTransformerBlock`` gets a :class:`BlockSample` (at most ``block_calls`` whole calls of
the block, positional and keyword inputs, kept on the CPU) from a forward pre-hook during the observing passes;
:func:`reconstruct` then learns the rounding of all quantized layers inside the block jointly (one
:class:`~dgq_utils.core.adaround.SoftRounding` per layer, :func:`~dgq_utils.core.adaround.optimise_rounding`, one
sampled call per iteration) to reconstruct the block's FP output (squared error summed over channels), with
activations off; ``keep_better`` compares learned and nearest rounding on all kept calls. Layers outside such
blocks are reconstructed layer-wise. Tested on the tiny pipeline (block loss below nearest, within one step,
bit-identical given a seed); not yet measured on the embedded model.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict

import torch
from torch import nn

from dgq_utils.core.adaround import SoftRounding, fake_quant_rounded, nearest_round_up, optimise_rounding
from dgq_utils.core.input_sample import InputSample
from dgq_utils.core.weight_memo import memo_adaround
from dgq_utils.timing import stage

logger = logging.getLogger(__name__)

__all__ = ["BLOCK_TYPES", "BlockSample", "attach", "capture_key", "detach", "reconstruct", "wants_reconstruction"]

#: module classes (by name) reconstructed as one block with ``AdaRoundConfig.granularity="block"`` (official SD)
BLOCK_TYPES = ("ResnetBlock2D", "BasicTransformerBlock")
_OBSERVING = ("observe", "observe_quant")


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.detach().to(device).clone() if device == "cpu" else obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class BlockSample:
    """At most ``n`` whole calls (positional and keyword inputs) of one block, a seeded uniform sample over the
    calls it was shown (bottom-k on one random key per call); tensors kept on the CPU."""

    def __init__(self, n: int, seed: int = 0):
        self.n = int(n)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.calls: list[tuple[float, tuple, dict]] = []
        self.seen = 0

    def __len__(self) -> int:
        return len(self.calls)

    def add(self, args, kwargs) -> None:
        key = float(torch.rand(1, generator=self.generator))
        self.seen += 1
        if len(self.calls) >= self.n:
            worst = max(range(len(self.calls)), key=lambda i: self.calls[i][0])
            if key >= self.calls[worst][0]:
                return
            del self.calls[worst]
        self.calls.append((key, _to(tuple(args), "cpu"), _to(dict(kwargs), "cpu")))
        self.calls.sort(key=lambda c: c[0])

    def close(self) -> None:
        self.generator = None



def wants_reconstruction(recipe) -> bool:
    """Whether ``recipe`` learns its weight rounding (and so needs calibration inputs)."""
    return recipe.weights is not None and recipe.weights.rounding == "adaround"


def capture_key(recipe) -> dict | None:
    """What the input capture depends on (for the observation memo's key), ``None`` when nothing is captured."""
    if not wants_reconstruction(recipe):
        return None
    ada = recipe.weights.adaround
    return {"samples": int(ada.samples), "seed": int(ada.seed), "granularity": ada.granularity,
            "block_calls": int(ada.block_calls)}


def _conv_geometry(layer) -> dict | None:
    conv = layer.original
    if not isinstance(conv, nn.Conv2d):
        return None
    return {"kernel_size": tuple(conv.kernel_size), "stride": tuple(conv.stride),
            "padding": tuple(conv.padding), "dilation": tuple(conv.dilation)}


def _supported(layer) -> bool:
    conv = layer.original
    if not isinstance(conv, nn.Conv2d):
        return True
    return conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _blocks(qstate, unet) -> dict:
    """Block name -> (module, [names of the quantized layers inside it]) for the block types, outermost first."""
    out = {}
    for name, module in unet.named_modules():
        if type(module).__name__ in BLOCK_TYPES and not any(name.startswith(b + ".") for b in out):
            inside = [n for n in qstate.layers if n.startswith(name + ".")]
            if inside:
                out[name] = (module, inside)
    return out


def attach(qstate, unet=None) -> list:
    """Give every quantized layer of ``qstate`` an input sample (see the module docstring); with block
    granularity, every block of ``unet`` a :class:`BlockSample` through a forward pre-hook (the layers inside a
    block then sample nothing). Returns the hook handles (for :func:`detach`)."""
    ada = qstate.recipe.weights.adaround
    blocks = _blocks(qstate, unet) if ada.granularity == "block" and unet is not None else {}
    in_block = {n for _, inside in blocks.values() for n in inside}
    for i, (name, layer) in enumerate(qstate.layers.items()):
        layer.capture = InputSample(ada.samples, seed=ada.seed * 1_000_003 + i,
                                    conv=_conv_geometry(layer)) if _supported(layer) and name not in in_block else None
    handles = []
    qstate.block_samples = {}
    for j, (bname, (module, inside)) in enumerate(blocks.items()):
        sample = qstate.block_samples[bname] = BlockSample(ada.block_calls, seed=ada.seed * 1_000_003 + 500_000 + j)
        first = qstate.layers[inside[0]]

        def hook(mod, args, kwargs, sample=sample, first=first):
            if first.mode in _OBSERVING:
                sample.add(args, kwargs)

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def detach(qstate, handles=()) -> dict:
    """Stop capturing; returns the samples (layer name -> InputSample or None; ``"block:" + name`` ->
    BlockSample) and clears the layers' ``capture`` attribute."""
    for h in handles:
        h.remove()
    out = {}
    for name, layer in qstate.layers.items():
        if layer.capture is not None:
            layer.capture.close()
        out[name] = layer.capture
        layer.capture = None
    for bname, sample in getattr(qstate, "block_samples", {}).items():
        sample.close()
        out["block:" + bname] = sample
    qstate.block_samples = {}
    return out


def _block_error(module, calls, targets) -> float:
    total = 0.0
    for (args, kwargs), target in zip(calls, targets):
        total += float(_output_error(module(*args, **kwargs), target))
    return total / max(1, len(calls))


def _output_error(out, target):
    out = out[0] if isinstance(out, tuple) else out
    d = (out - target).pow(2)
    return d.sum(dim=1 if d.ndim == 4 else -1).mean()  # over channels, averaged over the rest (official)


def _reconstruct_block(module, layers: dict, sample: BlockSample, ada) -> dict:
    """Learn the rounding of ``layers`` (name -> quantized layer inside ``module``) jointly on ``sample``."""
    device = next(iter(layers.values())).weight.device
    calls = [(_to(a, device), _to(k, device)) for _, a, k in sample.calls]
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            targets = [(lambda o: o[0] if isinstance(o, tuple) else o)(module(*a, **k)) for a, k in calls]
        softs = {n: SoftRounding(layer.weight, layer.weight_scale, layer.weight_zp, layer.weight_bits,
                                 symmetric=layer.weight_symmetric) for n, layer in layers.items()}
        for n, layer in layers.items():
            layer.soft_weight = softs[n].weight
        gen = torch.Generator().manual_seed(int(ada.seed))

        def rec(it):
            i = int(torch.randint(0, len(calls), (1,), generator=gen))
            args, kwargs = calls[i]
            return _output_error(module(*args, **kwargs), targets[i])

        with torch.enable_grad():
            optimise_rounding(list(softs.values()), rec, iters=ada.iters, lr=ada.lr, reg_weight=ada.reg_weight,
                              beta_start=ada.beta_start, beta_end=ada.beta_end, warmup=ada.warmup)
        learned = {n: sr.round_up() for n, sr in softs.items()}
        nearest = {n: nearest_round_up(layer.weight, layer.weight_scale) for n, layer in layers.items()}
        errors = {}
        with torch.no_grad():
            for label, masks in (("nearest", nearest), ("learned", learned)):
                for n, layer in layers.items():
                    wq = fake_quant_rounded(layer.weight, layer.weight_scale, layer.weight_zp, layer.weight_bits,
                                            masks[n], symmetric=layer.weight_symmetric)
                    layer.soft_weight = (lambda wq=wq: wq)
                errors[label] = _block_error(module, calls, targets)
    finally:
        for layer in layers.values():
            layer.soft_weight = None
        for p in params:
            p.requires_grad_(True)
    kept = bool(ada.keep_better and errors["learned"] > errors["nearest"])
    masks = nearest if kept else learned
    for n, layer in layers.items():
        layer.quantize_weight(scale=layer.weight_scale, zero_point=layer.weight_zp, bits=layer.weight_bits,
                              symmetric=layer.weight_symmetric, round_up=masks[n])
    flipped = sum(int((masks[n] != nearest[n]).sum()) for n in layers) / max(1, sum(m.numel() for m in masks.values()))
    return {"calls": len(calls), "seen": int(sample.seen), "layers": len(layers), "loss_nearest": errors["nearest"],
            "loss_adaround": errors["nearest"] if kept else errors["learned"], "kept_nearest": kept,
            "flipped": round(flipped, 6)}


def reconstruct(qstate, samples: dict, *, unet=None, notes: list | None = None) -> dict:
    """Learn every quantized layer's weight rounding from ``samples`` (as returned by :func:`detach`) and install
    it; returns a summary for the calibration metadata (per-layer / per-block losses, totals, seconds). Block
    granularity needs ``unet`` (the blocks are its modules)."""
    w_cfg = qstate.recipe.weights
    ada = w_cfg.adaround
    settings = {k: v for k, v in asdict(ada).items() if k not in ("samples", "granularity", "block_calls")}
    t0 = time.perf_counter()
    per_layer, per_block = {}, {}
    skipped = []
    done: set[str] = set()
    if ada.granularity == "block" and unet is not None:
        with stage("adaround_blocks"):
            for bname, (module, inside) in _blocks(qstate, unet).items():
                sample = samples.get("block:" + bname)
                layers = {n: qstate.layers[n] for n in inside if qstate.layers[n].weight_quantized}
                if sample is None or len(sample) == 0 or not layers:
                    continue
                per_block[bname] = _reconstruct_block(module, layers, sample, ada)
                done |= set(layers)
    with stage("adaround", n=len(qstate.layers)):
        for name, layer in qstate.layers.items():
            if not layer.weight_quantized or name in done:
                continue
            w = layer.weight.detach()
            sample = samples.get(name)
            if sample is None or len(sample) == 0:
                skipped.append(name)
                layer.quantize_weight(scale=layer.weight_scale, zero_point=layer.weight_zp, bits=layer.weight_bits,
                                      symmetric=layer.weight_symmetric,
                                      round_up=nearest_round_up(w, layer.weight_scale.expand(w.shape)))
                continue
            res = memo_adaround(w, layer.weight_scale, layer.weight_zp, layer.weight_bits,
                                sample.rows.to(w.device), symmetric=layer.weight_symmetric, **settings)
            layer.quantize_weight(scale=layer.weight_scale, zero_point=layer.weight_zp, bits=layer.weight_bits,
                                  symmetric=layer.weight_symmetric, round_up=res.round_up)
            per_layer[name] = {"rows": len(sample), "seen": int(sample.seen), "loss_nearest": res.loss_nearest,
                               "loss_adaround": res.loss_adaround, "kept_nearest": res.kept_nearest,
                               "flipped": round(res.flipped, 6)}
    if skipped and notes is not None:
        msg = (f"AdaRound: {len(skipped)} layer(s) without captured inputs (grouped / non-zero-padded convs, or "
               f"never called) keep round-to-nearest: {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
        notes.append(msg)
        logger.info(msg)
    near = sum(d["loss_nearest"] for d in per_layer.values())
    learned = sum(d["loss_adaround"] for d in per_layer.values())
    return {
        "rounding": "adaround",
        "granularity": ada.granularity,
        "layers": len(per_layer),
        "kept_nearest": sum(d["kept_nearest"] for d in per_layer.values()),
        "loss_nearest": near,
        "loss_adaround": learned,
        "blocks": len(per_block),
        "block_layers": len(done),
        "block_kept_nearest": sum(d["kept_nearest"] for d in per_block.values()),
        "block_loss_nearest": sum(d["loss_nearest"] for d in per_block.values()),
        "block_loss_adaround": sum(d["loss_adaround"] for d in per_block.values()),
        "seconds": round(time.perf_counter() - t0, 3),
        "per_layer": per_layer,
        "per_block": per_block,
    }
