"""Quantize a diffusers Stable Diffusion pipeline with a recipe; undo it; save and load the calibrated state.

::

    from dgq_utils.quantize.pipeline import quantize_pipeline, dequantize_pipeline, save_quant_state, load_quant_state
    report = quantize_pipeline(pipe, "dgq-w8a6", calibration_prompts, SamplerSettings(num_inference_steps=25))
    print(report.summary()); report.layers            # per layer: axis, K, bits
    images = pipe(prompts, num_inference_steps=25).images
    save_quant_state(pipe, "dgq-w8a6.safetensors")     # one file: tensors + recipe + calibration metadata
    dequantize_pipeline(pipe)                          # back to the exact FP pipeline

What is quantized
-----------------
Only the **UNet** (as in the official code and the paper); the text encoder and the VAE stay FP.

* Every ``nn.Linear`` and ``nn.Conv2d`` of the UNet becomes a :class:`~dgq_utils.model.layers.QuantLinear` /
  :class:`~dgq_utils.model.layers.QuantConv2d`: weight fake-quantized once with ``recipe.weights`` (per output channel
  by default), input activation quantized with ``recipe.activations``; the bias is never quantized.
* **Skipped** (FP weights and inputs): UNet modules matching ``recipe.skip_layers`` (``fnmatch`` patterns on
  module names). The default ``("conv_in", "conv_out")`` keeps the first and last convolution FP, exactly like the
  official code (``disable_out_quantization``): they touch the 4-channel latent space directly, are tiny, and
  errors there go straight into the denoised output. A pattern that matches an ``Attention`` module name (e.g.
  ``"*attn2"``) also keeps that attention's Q/K/V/softmax FP.
* Every ``Attention`` gets a :class:`~dgq_utils.model.attention.DGQAttnProcessor` when ``recipe.attention`` asks for
  something there (Q/K/V quantizers need ``recipe.activations`` and ``attention.quantize_qkv``; the softmax
  quantizer follows ``attention.apply_to``). ``attention=None`` or ``enabled=False`` leaves attention internals
  FP (the to_q/to_k/to_v/to_out Linear layers are still quantized as layers).

Calibration is needed when there are activation quantizers or a static softmax scale; otherwise (weight-only,
fp) ``calibration_prompts`` may be empty. See :mod:`dgq_utils.calibrate` for the procedure and its options, and
:mod:`dgq_utils.model.timesteps` for how a UNet call picks its parameter set (``on_timestep_mismatch``).

Guarantees (tested): ``dequantize_pipeline`` restores the very same module and processor objects, so outputs are
bit-identical to before; ``unet.state_dict()`` is unchanged while quantized (the quantized twins share the
original Parameters and keep their own tensors out of the state dict); ``save_quant_state`` + ``load_quant_state``
onto a freshly built pipeline reproduces images bit-identically without calibration; loading onto a different
architecture or attention layout, or loading a changed, truncated or foreign file, raises a ``QuantStateError``
(a ``ValueError``) naming the file and every problem (see :mod:`dgq_utils.quantize.state`).
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dgq_utils.calibrate.calibration import calibrate, needs_calibration
from dgq_utils.config import QuantRecipe, get_preset
from dgq_utils.config.sampler import SamplerSettings, takes_sampler
from dgq_utils.config.validation import check_choice, check_prompts, check_seed
from dgq_utils.model.attention import DGQAttnProcessor, ProbQuantizer
from dgq_utils.model.layers import ActQuantizer, QuantConv2d, QuantLinear
from dgq_utils.timing import stage
from dgq_utils.model.timesteps import MISMATCH_POLICIES, TimestepController, TimestepState, mapping_for

__all__ = [
    "QuantState",
    "QuantizationReport",
    "quantize_pipeline",
    "dequantize_pipeline",
    "is_quantized",
    "get_quant_state",
    "set_timestep_mismatch_policy",
    "set_quantization_enabled",
]


# ----------------------------------------------------------------------------------------------------------
# state and report
# ----------------------------------------------------------------------------------------------------------
@dataclass
class QuantState:
    """Everything ``quantize_pipeline`` installed on a UNet (stored as ``pipe.unet._dgq_state``)."""

    recipe: QuantRecipe
    state: TimestepState
    controller: TimestepController
    layers: dict[str, nn.Module] = field(default_factory=dict)  # module name -> QuantLinear / QuantConv2d
    processors: dict[str, DGQAttnProcessor] = field(default_factory=dict)  # Attention name -> processor
    original_processors: dict[str, Any] = field(default_factory=dict)  # processor key -> original
    skipped: list[str] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    architecture: list[dict] = field(default_factory=list)

    def act_quantizers(self) -> list[ActQuantizer]:
        """Every activation quantizer: the layers' inputs (module order), then each attention's Q/K/V."""
        out = [layer.act for layer in self.layers.values() if layer.act is not None]
        for proc in self.processors.values():
            out += [q for role, q in proc.quantizers().items() if role != "prob"]
        return out

    def prob_quantizers(self) -> list[ProbQuantizer]:
        """Every attention's softmax-output quantizer."""
        return [p.prob_quant for p in self.processors.values() if p.prob_quant is not None]


@dataclass
class QuantizationReport:
    """What ``quantize_pipeline`` / ``load_quant_state`` did.

    ``layers``: DataFrame, one row per quantized tensor -- ``layer`` (UNet module name), ``role``
    (``input`` of a Linear/Conv, ``q``/``k``/``v``/``prob`` inside an attention), ``layer_type``, ``weight_bits``
    (32 = FP), ``act_bits`` (32 = FP), ``granularity``, ``axis`` (the axis used in most timestep sets, with
    ``axis_counts`` per axis), ``k`` (largest effective group count), ``requested_k``, ``n`` (axis size), ``sets``,
    ``skipped``. ``sets``: DataFrame, one row per (quantizer, timestep set): ``quantizer``, ``set``, ``timestep``,
    ``axis``, ``k``, ``n``, ``source``. ``calibration``: metadata (steps, sampler, timesteps, seed, ...).
    """

    recipe: QuantRecipe
    layers: Any
    sets: Any
    skipped: list[str]
    calibration: dict
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        df = self.layers
        lines = [self.recipe.summary()]
        if len(df):
            q = df[~df["skipped"]]
            lines.append(f"{len(q)} quantized tensors in {q['layer'].nunique()} modules; "
                         f"{len(self.skipped)} modules skipped (FP): {', '.join(self.skipped) or '-'}")
            grouped = q[q["granularity"] == "group"]
            if len(grouped):
                counts = grouped["axis"].value_counts().to_dict()
                lines.append("group axis (majority over sets): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        cal = self.calibration
        if cal:
            lines.append(f"calibrated on {cal.get('num_prompts')} prompts, {cal.get('num_inference_steps')} steps "
                         f"({cal.get('scheduler')}, {cal.get('num_sets')} timestep sets) in {cal.get('seconds')} s")
        lines += self.notes
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"QuantizationReport({self.summary()})"

    def to_frame(self):
        return self.layers


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _resolve_recipe(recipe) -> QuantRecipe:
    if isinstance(recipe, str):
        return get_preset(recipe)
    if isinstance(recipe, QuantRecipe):
        return recipe
    raise TypeError(f"recipe must be a QuantRecipe or a preset name; got {type(recipe).__name__}.")


def _skip(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def architecture(unet) -> list[dict]:
    """The UNet's Linear / Conv2d layers (name, type, weight shape) and Attention modules, in module order."""
    out = []
    for name, m in unet.named_modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            m = m.original
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            out.append({"name": name, "type": "linear" if isinstance(m, nn.Linear) else "conv",
                        "weight_shape": list(m.weight.shape)})
    for key in unet.attn_processors:
        out.append({"name": key[: -len(".processor")], "type": "attention", "weight_shape": []})
    return out


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def get_quant_state(pipe) -> QuantState | None:
    """The installed :class:`QuantState`, or ``None`` for an unquantized pipeline."""
    unet = getattr(pipe, "unet", pipe)
    return unet.__dict__.get("_dgq_state")


def is_quantized(pipe) -> bool:
    """True if ``quantize_pipeline`` / ``load_quant_state`` has been applied and not undone."""
    return get_quant_state(pipe) is not None


def set_timestep_mismatch_policy(pipe, policy: str) -> None:
    """``"error"`` (default), ``"nearest"`` or ``"strict"``: what happens when a UNet call's ``t`` is not the
    calibrated one (see :mod:`dgq_utils.model.timesteps`)."""
    qs = require_state(pipe)
    check_choice(policy, "policy", MISMATCH_POLICIES)
    qs.controller.on_mismatch = policy


def set_quantization_enabled(pipe, enabled: bool) -> None:
    """Switch every quantized layer and attention processor to exact FP (``False``) or back (``True``)
    without uninstalling anything (outputs with ``False`` are bit-identical to the FP pipeline)."""
    qs = require_state(pipe)
    if not enabled:
        _refuse_if_irreversible(qs, "set_quantization_enabled(pipe, False)")
    for layer in qs.layers.values():
        layer.enabled = bool(enabled)
    for proc in qs.processors.values():
        proc.enabled = bool(enabled)


def _refuse_if_irreversible(qs: QuantState, what: str) -> None:
    """Raise before anything changes when layers have no FP weights any more (``reversible = False``: converted
    by :func:`dgq_utils.quantize.int8.convert_to_8bit`)."""
    gone = [name for name, layer in qs.layers.items() if not getattr(layer, "reversible", True)]
    if gone:
        raise RuntimeError(f"{what}: {len(gone)} layers ({', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''}) "
                           "were converted by convert_to_8bit and hold no FP weights any more; build (or load) the "
                           "pipeline again to get the FP model back.")


def require_state(pipe) -> QuantState:
    qs = get_quant_state(pipe)
    if qs is None:
        raise RuntimeError("This pipeline is not quantized (no DGQ state on its UNet).")
    return qs


# ----------------------------------------------------------------------------------------------------------
# install / uninstall
# ----------------------------------------------------------------------------------------------------------
def install(pipe, recipe: QuantRecipe, *, quantize_weights: bool, on_timestep_mismatch: str) -> QuantState:
    unet = pipe.unet
    state = TimestepState()
    controller = TimestepController(mapping=mapping_for(recipe), on_mismatch=on_timestep_mismatch, state=state)
    qs = QuantState(recipe=recipe, state=state, controller=controller, architecture=architecture(unet))
    unet.__dict__["_dgq_state"] = qs  # set first, so a failure below can be undone by dequantize_pipeline
    act = recipe.activations
    layout = act.conv_input_layout if act is not None else "tensor"

    if recipe.weights is not None or act is not None:
        targets = [(n, m) for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        for name, module in targets:
            if _skip(name, recipe.skip_layers):
                qs.skipped.append(name)
                continue
            is_linear = isinstance(module, nn.Linear)
            aq = None
            if act is not None:
                aq = ActQuantizer(f"{name}.act", act.bits, symmetric=act.symmetric,
                                  layout="linear" if is_linear else ("unfold" if layout == "unfold" else "conv"),
                                  state=state)
            wrapper = QuantLinear(module, name, aq) if is_linear else QuantConv2d(module, name, aq, layout=layout)
            if quantize_weights and recipe.weights is not None:
                with stage("weights"):
                    wrapper.quantize_weight(recipe.weights)
            _set_submodule(unet, name, wrapper)
            qs.layers[name] = wrapper
    else:
        qs.skipped = [n for n, m in unet.named_modules()
                      if isinstance(m, (nn.Linear, nn.Conv2d)) and _skip(n, recipe.skip_layers)]

    qs.original_processors = dict(unet.attn_processors)
    att = recipe.attention
    if att is not None and att.enabled:
        new_procs = dict(qs.original_processors)
        for key, original in qs.original_processors.items():
            attn_name = key[: -len(".processor")]
            if _skip(attn_name, recipe.skip_layers):
                qs.skipped.append(attn_name)
                continue
            attn = unet.get_submodule(attn_name)
            kind = "cross" if attn.is_cross_attention else "self"
            qkv = {}
            if act is not None and att.quantize_qkv:
                for part in ("q", "k", "v"):
                    qkv[part] = ActQuantizer(f"{attn_name}.{part}", act.bits, symmetric=act.symmetric,
                                             layout="qkv", state=state)
            prob = None
            if att.applies_to(kind):
                prob = ProbQuantizer(f"{attn_name}.prob", recipe.softmax_bits, quantizer=att.quantizer,
                                     scale=att.scale, keep_start=att.start_fp_in(kind), zero_level=att.zero_level,
                                     state=state)
            if not qkv and prob is None:
                continue
            start_handled = kind == "cross" or att.start_in == "both"
            proc = DGQAttnProcessor(
                attn_name, kind, original, state=state, q_quant=qkv.get("q"), k_quant=qkv.get("k"),
                v_quant=qkv.get("v"), prob_quant=prob,
                key_start_fp=(att.keep_start_key_fp and start_handled) or (att.bos_kv_fp and kind == "cross"),
                value_start_fp=att.bos_kv_fp and kind == "cross",
            )
            new_procs[key] = proc
            qs.processors[attn_name] = proc
        if qs.processors:
            unet.set_attn_processor(new_procs)
    controller.install(unet, pipe)
    return qs


def dequantize_pipeline(pipe) -> bool:
    """Undo quantization: put back the original modules and attention processors, remove the timestep hook.

    Returns ``True`` if something was undone, ``False`` if the pipeline was not quantized. Afterwards the pipeline
    is exactly the FP pipeline (the very same module objects; outputs bit-identical).
    """
    qs = get_quant_state(pipe)
    if qs is None:
        return False
    _refuse_if_irreversible(qs, "dequantize_pipeline")
    unet = pipe.unet
    qs.controller.remove()
    for name, layer in qs.layers.items():
        _set_submodule(unet, name, layer.original)
    if qs.processors:
        unet.set_attn_processor(dict(qs.original_processors))
    del unet.__dict__["_dgq_state"]
    return True


# ----------------------------------------------------------------------------------------------------------
# quantize
# ----------------------------------------------------------------------------------------------------------
@takes_sampler
def quantize_pipeline(
    pipe,
    recipe: QuantRecipe | str,
    calibration_prompts: list[str],
    sampler: SamplerSettings | None = None,
    seed: int = 0,
    *,
    progress: bool = True,
    on_timestep_mismatch: str = "error",
) -> QuantizationReport:
    """Quantize ``pipe``'s UNet in place with ``recipe`` (a :class:`QuantRecipe` or a preset name) and calibrate.

    Calibration runs ``calibration_prompts`` through the pipeline with the *same* ``sampler``
    (:class:`~dgq_utils.config.SamplerSettings`) you will generate with: steps, guidance (CFG doubles the batch,
    as in sampling), height/width (pixel-wise groups are tied to the resolution), batches of ``batch_size``
    prompts (default :data:`~dgq_utils.calibrate.trace.TRACE_SAMPLER`: 25 steps, guidance 7.5, 8 per batch),
    seeds ``seed + batch_index``. With ``timestep_mapping="exact"`` a later generation with another sampler or step
    count raises (``on_timestep_mismatch="error"``, default) or uses the nearest calibrated timestep
    (``"nearest"``, with a warning). Skipped layers and their reason: see the module docstring (``conv_in`` /
    ``conv_out`` FP like the official code; text encoder and VAE always FP).

    Returns a :class:`QuantizationReport` (``report.layers`` is a DataFrame: per layer the chosen axis, K, bits).
    Raises ``ValueError`` for an empty prompt list (when calibration is needed) or an unknown preset, and
    ``RuntimeError`` if the pipeline is already quantized. On any error the pipeline is left unquantized.
    """
    recipe = _resolve_recipe(recipe)
    if is_quantized(pipe):
        raise RuntimeError("This pipeline is already quantized; call dequantize_pipeline(pipe) first.")
    calib = needs_calibration(recipe)
    if calib:
        calibration_prompts = check_prompts(calibration_prompts, "calibration_prompts")
    check_seed(seed)
    check_choice(on_timestep_mismatch, "on_timestep_mismatch", MISMATCH_POLICIES)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            qs = install(pipe, recipe, quantize_weights=True, on_timestep_mismatch=on_timestep_mismatch)
        if calib:
            qs.calibration = calibrate(pipe, qs, calibration_prompts, sampler, seed, progress=progress)
        else:
            for layer in qs.layers.values():
                layer.set_mode("quant")
            for proc in qs.processors.values():
                proc.set_mode("quant")
            qs.controller.mode = "infer"
            qs.controller.mapping = "shared"
    except BaseException:
        dequantize_pipeline(pipe)
        raise
    return build_report(qs, time.perf_counter() - t0)


def build_report(qs: QuantState, seconds: float) -> QuantizationReport:
    import pandas as pd  # the report's tables only: keeps the quantization floor's import free of pandas

    recipe = qs.recipe
    act_bits = recipe.activations.bits if recipe.activations is not None else 32
    gran = recipe.activations.granularity if recipe.activations is not None else "fp"
    schedule = qs.calibration.get("timesteps", [])
    rows, set_rows = [], []

    def add(layer, role, layer_type, wbits, q, granularity, bits):
        info = getattr(q, "info", {}) if q is not None else {}
        axes = [d.get("axis") for d in info.values()]
        counts = {a: axes.count(a) for a in dict.fromkeys(axes)}
        rows.append({
            "layer": layer, "role": role, "layer_type": layer_type, "weight_bits": wbits, "act_bits": bits,
            "granularity": granularity, "axis": max(counts, key=counts.get) if counts else None,
            "axis_counts": counts, "k": max((d.get("k", 1) for d in info.values()), default=None),
            "requested_k": max((d.get("requested_k", 1) for d in info.values()), default=None),
            "n": max((d.get("n", 1) for d in info.values()), default=None),
            "sets": len(info) if q is not None else None, "skipped": False,
        })
        for i, d in sorted(info.items()):
            set_rows.append({"quantizer": q.name, "set": i, "timestep": schedule[i] if i < len(schedule) else None,
                             "axis": d.get("axis"), "k": d.get("k"), "n": d.get("n"), "source": d.get("source")})

    for name, layer in qs.layers.items():
        wbits = layer.weight_bits if layer.weight_quantized else 32
        lt = "linear" if isinstance(layer, QuantLinear) else "conv"
        add(name, "input", lt, wbits, layer.act, gran if layer.act is not None else "fp",
            act_bits if layer.act is not None else 32)
    for name, proc in qs.processors.items():
        for role, q in proc.quantizers().items():
            if role == "prob":
                rows.append({"layer": name, "role": "prob", "layer_type": f"attn_{proc.kind}", "weight_bits": None,
                             "act_bits": q.bits, "granularity": q.quantizer, "axis": f"scale={q.scale_mode}",
                             "axis_counts": {}, "k": None, "requested_k": None, "n": None,
                             "sets": len(q.static) if q.scale_mode == "static" else None, "skipped": False})
            else:
                add(name, role, f"attn_{proc.kind}", None, q, gran, q.bits)
    for name in qs.skipped:
        rows.append({"layer": name, "role": "all", "layer_type": "skipped", "weight_bits": 32, "act_bits": 32,
                     "granularity": "fp", "axis": None, "axis_counts": {}, "k": None, "requested_k": None,
                     "n": None, "sets": None, "skipped": True})
    layers = pd.DataFrame(rows)
    sets = pd.DataFrame(set_rows, columns=["quantizer", "set", "timestep", "axis", "k", "n", "source"])
    return QuantizationReport(recipe=recipe, layers=layers, sets=sets, skipped=list(qs.skipped),
                              calibration=dict(qs.calibration), seconds=round(seconds, 3),
                              notes=list(qs.calibration.get("notes", [])))
