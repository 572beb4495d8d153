"""Save and load a calibrated quantization state: one safetensors file with the recipe JSON and
calibration metadata; loading onto a fresh pipeline reproduces images without calibration.

What a state file guarantees (format ``dgq-quant-state/2``)
-----------------------------------------------------------
* **Integrity**: the metadata carries ``content_hash``, a SHA-256 over every tensor (name, dtype, shape, bytes)
  and every other metadata entry. A flipped byte, an edited recipe JSON, a removed or added tensor changes it;
  :func:`load_quant_state` refuses such a file (:class:`QuantStateError`, naming the file) before touching the
  pipeline. A truncated or foreign file is refused with the file named, not with a bare safetensors error.
* **Consistency**: even with a matching hash, loading checks that the recipe agrees with the stored parameters
  (the bit widths the parameters were made for, group ids against K, the number of timestep sets against the
  timestep mapping, per-index parameter sizes against the layers) and that the pipeline's UNet has the same
  layers (names, weight shapes) and the same attention layout (heads, head dim, cross-attention dim per
  attention, sample size). Every problem found is listed, each naming the layer and what to do.
* **Old files**: format ``dgq-quant-state/1`` (no hash, no attention layout) is refused with a message saying to
  recalibrate and save again; it cannot be verified, and no such file is shipped with the project.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from itertools import zip_longest
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from dgq_utils.atomic import atomic_write_bytes
from dgq_utils.config import QuantRecipe
from dgq_utils.config.validation import check_choice
from dgq_utils.core.adaround import pack_mask, unpack_mask
from dgq_utils.model.timesteps import MISMATCH_POLICIES, mapping_for
from dgq_utils.quantize.pipeline import (
    QuantizationReport,
    architecture,
    build_report,
    dequantize_pipeline,
    install,
    is_quantized,
    require_state,
)

__all__ = [
    "save_quant_state",
    "load_quant_state",
    "attention_layout",
    "content_hash",
    "QuantStateError",
    "FORMAT",
]

FORMAT = "dgq-quant-state/2"
OLD_FORMATS = ("dgq-quant-state/1",)
_REQUIRED_META = ("recipe", "architecture", "attention_layout", "grids", "quantizers", "calibration", "controller",
                  "skipped", "content_hash")
_RECALIBRATE = "recalibrate (quantize_pipeline on the same model) and save the state again"


class QuantStateError(ValueError):
    """A quantization state file that cannot be loaded as it is: unreadable, foreign, an old format, changed
    after saving, or inconsistent with its recipe or with the pipeline. The message names the file and, per
    problem, the layer and what to do."""


def attention_layout(unet) -> dict:
    """The UNet's attention layout: per ``Attention`` module its heads, head dim and cross-attention (key/value
    input) width, plus the UNet's ``cross_attention_dim`` and ``sample_size`` (the latent side that pixel-wise
    groups are laid over by default). Two UNets can have equal weight shapes and different layouts (8 heads of
    40 vs 5 heads of 64): the calibrated Q/K/V parameters only fit the layout they were made on."""
    attentions = {}
    for key in unet.attn_processors:
        name = key[: -len(".processor")]
        attn = unet.get_submodule(name)
        heads = int(attn.heads)
        attentions[name] = {"heads": heads, "head_dim": int(attn.inner_dim) // heads,
                            "cross_attention_dim": int(attn.cross_attention_dim),
                            "is_cross_attention": bool(attn.is_cross_attention)}
    cfg = unet.config
    return {"sample_size": cfg.sample_size if isinstance(cfg.sample_size, int) else list(cfg.sample_size),
            "cross_attention_dim": cfg.cross_attention_dim, "attentions": attentions}


def content_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over the tensors (sorted by name: name, dtype, shape, raw bytes) and the metadata entries
    (sorted, ``content_hash`` itself excluded)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"tensor\0{key}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for key in sorted(metadata):
        if key != "content_hash":
            h.update(f"meta\0{key}\0{metadata[key]}\0".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------------------
def save_quant_state(pipe, path: str | os.PathLike) -> Path:
    """Write the calibrated quantization state of ``pipe`` to ONE ``.safetensors`` file (atomically).

    Tensors: per quantized layer its weight scale / zero point (``{layer}.weight.scale|zero_point``) and, for
    learned rounding (``weights.rounding="adaround"``), its round-up mask packed 8 per byte
    (``{layer}.weight.round_up``); per
    activation quantizer and timestep set its scale / zero point (broadcast-shaped) and group ids
    (``{quantizer}.set{i}.scale|zero_point|ids``); static softmax maxima (``{attention}.prob.set{i}.max``).
    Metadata (strings): ``format``, ``recipe`` (JSON), ``architecture`` (the UNet's layer list with weight shapes),
    ``quantizers`` (per set: axis, K, n, source), ``calibration`` (steps, sampler and its config, timesteps, seed,
    prompts count, guidance, resolution), ``skipped``. The FP weights are *not* stored: load onto the same model.
    """
    qs = require_state(pipe)
    tensors: dict[str, torch.Tensor] = {}

    def put(key, t):
        tensors[key] = t.detach().to("cpu").contiguous().clone()

    for name, layer in qs.layers.items():
        if layer.weight_quantized:
            put(f"{name}.weight.scale", layer.weight_scale)
            put(f"{name}.weight.zero_point", layer.weight_zp)
            if layer.weight_round_up is not None:
                put(f"{name}.weight.round_up", pack_mask(layer.weight_round_up))
    quant_meta = {}
    for q in qs.act_quantizers():
        sets = {}
        for i, (scale, zp) in sorted(q.params.items()):
            put(f"{q.name}.set{i}.scale", scale)
            put(f"{q.name}.set{i}.zero_point", zp)
            info = dict(q.info.get(i, {}))
            ids = info.pop("ids", None)
            if ids is not None:
                put(f"{q.name}.set{i}.ids", ids.to(torch.int64))
            sets[str(i)] = info
        quant_meta[q.name] = sets
    for proc in qs.processors.values():
        pq = proc.prob_quant
        if pq is not None and pq.scale_mode == "static":
            for i, m in sorted(pq.static.items()):
                put(f"{pq.name}.set{i}.max", m.reshape(()))
    recipe = qs.recipe
    grids = {"weights": recipe.weights.bits if recipe.weights is not None else None,
             "activations": recipe.activations.bits if recipe.activations is not None else None,
             "weights_symmetric": recipe.weights.symmetric if recipe.weights is not None else None}
    metadata = {
        "format": FORMAT,
        "recipe": recipe.to_json(),
        "architecture": json.dumps(qs.architecture),
        "attention_layout": json.dumps(attention_layout(pipe.unet)),
        "grids": json.dumps(grids),
        "quantizers": json.dumps(quant_meta),
        "calibration": json.dumps(qs.calibration),
        "controller": json.dumps(qs.controller.to_dict()),
        "skipped": json.dumps(qs.skipped),
    }
    metadata["content_hash"] = content_hash(tensors, metadata)
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def _read_state_file(path: Path) -> tuple[dict, dict]:
    """Metadata and tensors of ``path``, with every way a file can be unreadable turned into a QuantStateError."""
    where = f"Quantization state {str(path)!r}"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            fmt = meta.get("format")
            if fmt in OLD_FORMATS:
                raise QuantStateError(
                    f"{where} was saved in the old format {fmt!r}, which has no content hash and no attention "
                    f"layout, so it cannot be verified; {_RECALIBRATE} (this version writes {FORMAT!r}).")
            if fmt != FORMAT:
                raise QuantStateError(f"{where} is not a DGQ quantization state (format {fmt!r}, expected "
                                      f"{FORMAT!r}); pass a file written by save_quant_state.")
            tensors = {k: f.get_tensor(k) for k in keys}
    except QuantStateError:
        raise
    except Exception as err:  # SafetensorError (truncated, bad header), OSError, ...
        raise QuantStateError(
            f"{where} cannot be read as a safetensors file ({type(err).__name__}: {err}); it is truncated, "
            f"damaged or not a state file. Save it again with save_quant_state, or {_RECALIBRATE}.") from err
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise QuantStateError(f"{where} lacks the metadata entries {missing}; it was not written by "
                              f"save_quant_state (or was edited). {_RECALIBRATE[0].upper()}{_RECALIBRATE[1:]}.")
    stored = meta["content_hash"]
    actual = content_hash(tensors, meta)
    problems = []
    if stored != actual:
        problems.append(
            f"it was changed after it was saved: its content hash does not match (stored {stored[:16]}..., "
            f"computed {actual[:16]}...): tensor bytes, tensors or metadata (e.g. the recipe JSON) were edited or "
            f"corrupted. Do not edit state files; to change the recipe, {_RECALIBRATE}.")
    parsed = {"hash_problems": problems}
    for key in _REQUIRED_META:
        if key in ("recipe", "content_hash"):
            continue
        try:
            parsed[key] = json.loads(meta[key])
        except json.JSONDecodeError as err:
            raise QuantStateError(f"{where}: metadata entry {key!r} is not valid JSON ({err}); "
                                  f"{' '.join(problems)} {_RECALIBRATE}.") from err
    try:
        parsed["recipe"] = QuantRecipe.from_json(meta["recipe"])
    except Exception as err:
        raise QuantStateError(f"{where}: its recipe cannot be read ({type(err).__name__}: {err}); "
                              f"{' '.join(problems)} {_RECALIBRATE}.") from err
    return parsed, tensors


def _architecture_problems(saved: list[dict], current: list[dict]) -> list[str]:
    for i, (s, c) in enumerate(zip_longest(saved, current)):
        if s == c:
            continue
        def fmt(d):
            return "nothing" if d is None else f"{d['name']!r} ({d['type']}, weight {tuple(d['weight_shape'])})"
        return [f"it was calibrated for a different UNet architecture: first mismatch at layer #{i}: the file has "
                f"{fmt(s)}, this pipeline has {fmt(c)}. Load it onto the model it was calibrated on."]
    return []


def _layout_problems(saved: dict, current: dict) -> list[str]:
    fix = "Load it onto the model it was calibrated on, or recalibrate on this one."
    out = []
    for key in ("sample_size", "cross_attention_dim"):
        if saved.get(key) != current.get(key):
            out.append(f"UNet {key}: the file has {saved.get(key)!r}, this pipeline has {current.get(key)!r}. {fix}")
    cur = current["attentions"]
    for name, s in saved.get("attentions", {}).items():
        c = cur.get(name)
        if c is None:
            out.append(f"attention {name!r}: in the file, not in this pipeline's UNet. {fix}")
            continue
        for key in ("heads", "head_dim", "cross_attention_dim", "is_cross_attention"):
            if s.get(key) != c.get(key):
                out.append(f"attention {name!r} {key}: the file has {s.get(key)!r}, this pipeline has "
                           f"{c.get(key)!r}. {fix}")
    for name in cur:
        if name not in saved.get("attentions", {}):
            out.append(f"attention {name!r}: in this pipeline's UNet, not in the file. {fix}")
    return out


def _parameter_problems(recipe: QuantRecipe, parsed: dict, tensors: dict, unet) -> list[str]:
    """The recipe against the stored parameters: bit widths, group ids vs K, set counts vs the timestep mapping,
    per-index parameter sizes vs the layers; and every tensor the recipe needs present, none extra."""
    out = []
    grids, quant_meta, controller = parsed["grids"], parsed["quantizers"], parsed["controller"]
    w_bits = recipe.weights.bits if recipe.weights is not None else None
    a_bits = recipe.activations.bits if recipe.activations is not None else None
    if grids.get("weights") != w_bits:
        out.append(f"the weight parameters were made for a {grids.get('weights')}-bit grid but the recipe says "
                   f"weights.bits={w_bits}; {_RECALIBRATE} with the recipe you want.")
    if grids.get("activations") != a_bits:
        out.append(f"the activation parameters were made for a {grids.get('activations')}-bit grid but the recipe "
                   f"says activations.bits={a_bits}; {_RECALIBRATE} with the recipe you want.")
    expected: set[str] = set()
    arch = parsed["architecture"]
    layers = {d["name"]: d for d in arch if d["type"] in ("linear", "conv")}
    skipped = set(parsed["skipped"])
    if recipe.weights is not None:
        learned = recipe.weights.rounding == "adaround"
        for name in layers:
            if name not in skipped:
                expected |= {f"{name}.weight.scale", f"{name}.weight.zero_point"}
                if learned:
                    expected.add(f"{name}.weight.round_up")
                    packed = tensors.get(f"{name}.weight.round_up")
                    numel = 1
                    for d in layers[name]["weight_shape"]:
                        numel *= int(d)
                    if packed is not None and packed.numel() != (numel + 7) // 8:
                        out.append(f"layer {name!r}: its rounding mask has {packed.numel()} bytes, the weight "
                                   f"needs {(numel + 7) // 8}; {_RECALIBRATE}.")
    mapping = controller.get("mapping")
    schedule = controller.get("schedule", [])
    if recipe.activations is not None and mapping != mapping_for(recipe):
        out.append(f"the stored timestep mapping is {mapping!r} but the recipe implies {mapping_for(recipe)!r}; "
                   f"{_RECALIBRATE}.")
    num_sets = 1 if mapping == "shared" else len(schedule)
    layout = parsed["attention_layout"]["attentions"]
    k_req = recipe.activations.num_groups if recipe.activations is not None else None
    for qname, sets in quant_meta.items():
        indices = sorted(int(i) for i in sets)
        if mapping is not None and indices and (indices[0] < 0 or indices[-1] >= max(num_sets, 1)):
            out.append(f"quantizer {qname!r}: parameter sets {indices} do not fit the {num_sets} timestep set(s) of "
                       f"the {mapping!r} mapping; {_RECALIBRATE}.")
        owner, _, role = qname.rpartition(".")
        for i_str, info in sets.items():
            where = f"quantizer {qname!r} set {i_str}"
            for part in ("scale", "zero_point"):
                expected.add(f"{qname}.set{i_str}.{part}")
            k, n, axis = int(info.get("k", 1)), int(info.get("n", 1)), info.get("axis")
            if info.get("source") == "groups":
                expected.add(f"{qname}.set{i_str}.ids")
                if k_req is not None and info.get("requested_k") != k_req:
                    out.append(f"{where}: grouped with K={info.get('requested_k')} but the recipe says "
                               f"activations.num_groups={k_req}; {_RECALIBRATE}.")
                ids = tensors.get(f"{qname}.set{i_str}.ids")
                if ids is not None and (ids.numel() != n or (n and (int(ids.min()) < 0 or int(ids.max()) >= k))):
                    out.append(f"{where}: its group ids do not fit K={k} groups over n={n} indices; {_RECALIBRATE}.")
            scale = tensors.get(f"{qname}.set{i_str}.scale")
            if scale is not None and scale.numel() not in (1, n):
                out.append(f"{where}: {scale.numel()} scales for an axis of n={n} indices; {_RECALIBRATE}.")
            if axis == "channel":
                want = None
                if role == "act" and owner in layers:
                    shape = layers[owner]["weight_shape"]
                    if layers[owner]["type"] == "linear":
                        want = shape[1]
                    elif recipe.activations is not None and recipe.activations.conv_input_layout != "unfold":
                        want = shape[1]
                elif role in ("q", "k", "v") and owner in layout:
                    want = layout[owner]["head_dim"]
                if want is not None and want != n:
                    out.append(f"{where}: channel-wise parameters for {n} channels, but layer {owner!r} has {want}; "
                               f"{_RECALIBRATE}.")
    for key in tensors:
        if key.endswith(".max") and ".prob.set" in key:
            expected.add(key)
    missing = sorted(expected - set(tensors))
    extra = sorted(set(tensors) - expected)
    for key in missing:
        out.append(f"tensor {key!r} is missing (the recipe needs it); {_RECALIBRATE}.")
    for key in extra:
        out.append(f"tensor {key!r} is not produced by this recipe (foreign or edited file); {_RECALIBRATE}.")
    return out


def load_quant_state(pipe, path: str | os.PathLike, *, on_timestep_mismatch: str = "error") -> QuantizationReport:
    """Quantize ``pipe`` from a file written by :func:`save_quant_state` -- no calibration.

    The file is verified first (see the module docstring): its content hash, its format version, the recipe
    against the stored parameters, and ``pipe``'s UNet against the stored architecture (layer names, weight
    shapes) and attention layout (heads, head dim, cross-attention dim, sample size). Any problem raises
    :class:`QuantStateError` (a ``ValueError``) naming the file and listing every problem found; the pipeline is
    left untouched. ``pipe`` must also have the same FP weights as the calibrated one (weights are re-quantized
    from the stored scales / zero points, so identical FP weights give identical images).
    """
    if is_quantized(pipe):
        raise RuntimeError("This pipeline is already quantized; call dequantize_pipeline(pipe) first.")
    check_choice(on_timestep_mismatch, "on_timestep_mismatch", MISMATCH_POLICIES)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No quantization state at {str(path)!r}.")
    parsed, tensors = _read_state_file(path)
    recipe = parsed["recipe"]
    problems = list(parsed["hash_problems"])
    problems += _architecture_problems(parsed["architecture"], architecture(pipe.unet))
    problems += _layout_problems(parsed["attention_layout"], attention_layout(pipe.unet))
    try:
        problems += _parameter_problems(recipe, parsed, tensors, pipe.unet)
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # metadata of an unexpected structure
        problems.append(f"its metadata has an unexpected structure ({type(err).__name__}: {err}); {_RECALIBRATE}.")
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise QuantStateError(f"Quantization state {str(path)!r} cannot be loaded onto this pipeline "
                              f"({len(problems)} problem(s)):\n{listed}")
    quant_meta = parsed["quantizers"]
    controller_meta = parsed["controller"]
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            qs = install(pipe, recipe, quantize_weights=False, on_timestep_mismatch=on_timestep_mismatch)
            qs.calibration = parsed["calibration"]
            if recipe.weights is not None:
                for name, layer in qs.layers.items():
                    packed = tensors.get(f"{name}.weight.round_up")
                    layer.quantize_weight(scale=tensors[f"{name}.weight.scale"],
                                          zero_point=tensors[f"{name}.weight.zero_point"],
                                          bits=recipe.weights.bits, symmetric=recipe.weights.symmetric,
                                          round_up=None if packed is None
                                          else unpack_mask(packed, tuple(layer.weight.shape)))
            for q in qs.act_quantizers():
                sets = quant_meta.get(q.name)
                if sets is None:
                    raise ValueError(f"{str(path)!r} has no parameters for quantizer {q.name!r}.")
                device = next(pipe.unet.parameters()).device
                for i_str, info in sets.items():
                    i = int(i_str)
                    info = dict(info)
                    info["ids"] = tensors.get(f"{q.name}.set{i}.ids")
                    q.set_params(i, tensors[f"{q.name}.set{i}.scale"].to(device),
                                 tensors[f"{q.name}.set{i}.zero_point"].to(device), info)
            for proc in qs.processors.values():
                pq = proc.prob_quant
                if pq is not None and pq.scale_mode == "static":
                    prefix = f"{pq.name}.set"
                    pq.static = {int(k[len(prefix):-len(".max")]): v for k, v in tensors.items()
                                 if k.startswith(prefix) and k.endswith(".max")}
            c = qs.controller
            c.schedule = [float(t) for t in controller_meta.get("schedule", [])]
            c.num_inference_steps = controller_meta.get("num_inference_steps")
            c.num_train_timesteps = controller_meta.get("num_train_timesteps", 1000)
            c.mapping = controller_meta.get("mapping", c.mapping)
            c.mode = "infer"
            c.reset()
            for layer in qs.layers.values():
                layer.set_mode("quant")
            for proc in qs.processors.values():
                proc.set_mode("quant")
    except BaseException:
        dequantize_pipeline(pipe)
        raise
    return build_report(qs, time.perf_counter() - t0)
