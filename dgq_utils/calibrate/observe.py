"""Activation statistics of the UNet, per layer x timestep, as tidy tables (notebooks 01-03) and for calibration.

Two users:

* **Calibration** (``layers.ActQuantizer`` in ``"observe"`` mode) keeps one :class:`TensorStats` per parameter set
  and turns it into quantizer parameters.
* **Analysis** -- :func:`collect_activation_stats` runs prompts through an *unquantized* pipeline with the trace
  harness (:class:`dgq_utils.calibrate.trace.Trace`): hooks on the input of every ``nn.Linear`` / ``nn.Conv2d`` of
  the UNet (their *inputs* are what DGQ quantizes), observers of the Q/K/V of every attention and its
  probabilities (a :class:`~dgq_utils.model.attention.DGQAttnProcessor` in statistics mode), and returns an
  :class:`ActivationStats` whose methods give pandas DataFrames.

Axes (what "channel" and "pixel" mean for each input; see ``shared/dgq-official-code.md`` section 1.3)
----------------------------------------------------------------------------------------------------
=========================  ===================  ======================================  ========================
input                      layout               channel axis                            pixel axis
=========================  ===================  ======================================  ========================
Linear on tokens           ``(B, N, C)``        last dim ``C``                          token position ``N``
Linear on vectors          ``(B, C)``           ``C``                                   -- (none)
Conv2d (``"tensor"``)      ``(B, C, H, W)``     dim 1 ``C``                             ``H*W`` (row-major)
Conv2d (``"unfold"``)      ``(B, C*kh*kw, L)``  im2col row (channel x kernel offset)    output position ``L``
attention Q / K / V        ``(B, heads, N, d)`` head-dim index ``d``, pooled over heads token position ``N``
=========================  ===================  ======================================  ========================

Per index the statistics are the min and max over everything else (batch, other axis), aggregated over
batches by elementwise min / max (:class:`dgq_utils.core.grouping.AxisStats`, the official aggregation). Per tensor we
keep min / max, an EMA of min / max (momentum 0.95 by default, initialised from the first batch -- the official
K = 1 baseline estimator), and approximate percentiles of ``|x|`` (from a strided subsample of at most
65,536 elements per call, averaged over calls -- cheap, and labelled approximate).

Every observed tensor is checked for NaN / inf; a non-finite value raises ``FloatingPointError`` naming the
layer, the timestep index and ``t``.

Tidy tables (:class:`ActivationStats`)
--------------------------------------
* :meth:`ActivationStats.axis_frame` -- one row per (layer, timestep_index, axis, index): columns ``layer``,
  ``layer_type`` (``linear``, ``conv``, ``attn_q``, ``attn_k``, ``attn_v``), ``timestep_index``, ``timestep``,
  ``axis`` (``channel`` / ``pixel``), ``index``, ``min``, ``max``.
* :meth:`ActivationStats.tensor_frame` -- one row per (layer, timestep_index): ``min``, ``max``, ``absmax``,
  ``ema_min``, ``ema_max``, ``p99``/``p99.9`` of ``|x|`` (approximate), ``calls``, ``shape``.
* :meth:`ActivationStats.attention_frame` -- one row per (attention layer, timestep_index, head): ``kind``
  (``self`` / ``cross``), ``start_mass`` (mean probability on key 0 -- the ``<start>`` token in
  cross-attention), ``start_mass_max`` (largest per-sample mean), ``max_prob``, ``max_prob_excl_start``.
* :meth:`ActivationStats.attention_histogram_frame` -- ``log2(p)`` histograms per attention layer x timestep.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from dgq_utils.calibrate.trace import TRACE_SAMPLER, Trace, layer_selector
from dgq_utils.config.sampler import SamplerSettings, check_sampler, takes_sampler
from dgq_utils.config.validation import check_prompts, check_seed
from dgq_utils.model.tokenizer import warn_unknown_words
from dgq_utils.core.grouping import AxisStats
from dgq_utils.core.stats import (
    LOG2_HIST_EDGES,
    PERCENTILE_SAMPLES,
    AttentionStats,
    TensorStats,
    stats_to_host,
)
from dgq_utils.model.attention import DGQAttnProcessor
from dgq_utils.model.layers import ActQuantizer

__all__ = [
    "ActivationStats",
    "collect_activation_stats",
]


# ----------------------------------------------------------------------------------------------------------
# the analysis result
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ActivationStats:
    """Statistics collected by :func:`collect_activation_stats`.

    ``layers[name] = (layer_type, {timestep_index: TensorStats})``; ``attention[name] = (kind,
    {timestep_index: AttentionStats})``; ``timesteps[i]`` = the ``t`` of UNet call ``i``; ``meta``: how the
    statistics were collected (prompts, steps, guidance, seed, scheduler, resolution, conv layout).
    """

    layers: dict[str, tuple[str, dict[int, TensorStats]]] = field(default_factory=dict)
    attention: dict[str, tuple[str, dict[int, AttentionStats]]] = field(default_factory=dict)
    timesteps: list[float] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def layer_names(self, layer_type: str | None = None) -> list[str]:
        return [n for n, (lt, _) in self.layers.items() if layer_type is None or lt == layer_type]

    def stats(self, layer: str, timestep_index: int) -> TensorStats:
        try:
            return self.layers[layer][1][timestep_index]
        except KeyError:
            raise KeyError(f"no statistics for layer {layer!r} at timestep index {timestep_index}.") from None

    def axis_stats(self, layer: str, timestep_index: int, axis: str) -> AxisStats | None:
        """The :class:`AxisStats` of ``layer`` at ``timestep_index`` along ``axis`` (``"channel"``/``"pixel"``)."""
        return self.stats(layer, timestep_index).axis(axis)

    def merged(self, layer: str, axis: str) -> AxisStats | None:
        """``axis`` statistics of ``layer`` merged over all timesteps (None if that axis was not recorded)."""
        out = None
        for st in self.layers[layer][1].values():
            s = st.axis(axis)
            if s is not None:
                out = s if out is None else out.merge(s)
        return out

    def _t(self, i: int) -> float:
        return self.timesteps[i] if i < len(self.timesteps) else float("nan")

    def axis_frame(self, layers: Iterable[str] | None = None, axis: str | None = None, timestep_index=None):
        """Tidy per-index table: layer, layer_type, timestep_index, timestep, axis, index, min, max."""
        # numpy / pandas are imported when a table is asked for (here and below): calibration never needs them
        import numpy as np
        import pandas as pd

        names = list(layers) if layers is not None else list(self.layers)
        cols: dict[str, list] = {k: [] for k in ("layer", "layer_type", "timestep_index", "timestep", "axis")}
        idx_parts, mins, maxs = [], [], []
        for name in names:
            lt, per_t = self.layers[name]
            for ti, st in sorted(per_t.items()):
                if timestep_index is not None and ti != timestep_index:
                    continue
                for ax in ("channel", "pixel"):
                    if axis is not None and ax != axis:
                        continue
                    s = st.axis(ax)
                    if s is None:
                        continue
                    n = s.n
                    for k, v in (("layer", name), ("layer_type", lt), ("timestep_index", ti),
                                 ("timestep", self._t(ti)), ("axis", ax)):
                        cols[k].append(np.full(n, v, dtype=object if isinstance(v, str) else None))
                    idx_parts.append(np.arange(n))
                    mins.append(s.mins.cpu().numpy())
                    maxs.append(s.maxs.cpu().numpy())
        if not idx_parts:
            return pd.DataFrame(columns=list(cols) + ["index", "min", "max"])
        df = pd.DataFrame({k: np.concatenate(v) for k, v in cols.items()})
        df["index"] = np.concatenate(idx_parts)
        df["min"] = np.concatenate(mins)
        df["max"] = np.concatenate(maxs)
        for c in ("layer", "layer_type", "axis"):
            df[c] = df[c].astype("category")
        df["timestep_index"] = df["timestep_index"].astype(int)
        df["timestep"] = df["timestep"].astype(float)
        return df

    def tensor_frame(self):
        """Per (layer, timestep_index): min, max, absmax, ema_min, ema_max, approx. |x| percentiles, calls, shape."""
        import pandas as pd

        rows = []
        for name, (lt, per_t) in self.layers.items():
            for ti, st in sorted(per_t.items()):
                row = {
                    "layer": name, "layer_type": lt, "timestep_index": ti, "timestep": self._t(ti),
                    "min": st.min, "max": st.max, "absmax": max(abs(st.min), abs(st.max)),
                    "ema_min": st.ema_min, "ema_max": st.ema_max, "calls": st.calls, "shape": st.shape,
                }
                for p, total in st.abs_percentiles.items():
                    row[f"p{p:g}"] = total / max(st.calls, 1)
                rows.append(row)
        return pd.DataFrame(rows)

    def attention_frame(self):
        """Per (attention layer, timestep_index, head): kind, start_mass, start_mass_max, max_prob(_excl_start)."""
        import pandas as pd

        rows = []
        for name, (kind, per_t) in self.attention.items():
            for ti, st in sorted(per_t.items()):
                # one device -> host copy per tensor (the statistics live on the model's device)
                sms, smm, mp, mpe = (t.cpu() for t in (st.start_mass_sum, st.start_mass_max, st.max_prob,
                                                        st.max_prob_excl_start))
                for h in range(st.heads):
                    rows.append({
                        "layer": name, "kind": kind, "timestep_index": ti, "timestep": self._t(ti), "head": h,
                        "start_mass": float(sms[h]) / max(st.samples, 1),
                        "start_mass_max": float(smm[h]),
                        "max_prob": float(mp[h]),
                        "max_prob_excl_start": float(mpe[h]),
                        "num_keys": st.num_keys, "samples": st.samples,
                    })
        return pd.DataFrame(rows)

    def attention_histogram_frame(self, per_head: bool = False):
        """``log2(p)`` histograms: layer, kind, timestep_index, timestep, [head], bin_low, bin_high, count.

        Bin 0 collects ``p <= 2^-30`` (incl. exact zeros), bin ``i`` is ``(edge[i-1], edge[i]]``.
        """
        import pandas as pd

        edges = (-math.inf,) + LOG2_HIST_EDGES
        rows = []
        for name, (kind, per_t) in self.attention.items():
            for ti, st in sorted(per_t.items()):
                hist = (st.hist if per_head else st.hist.sum(0, keepdim=True)).cpu()
                for h in range(hist.shape[0]):
                    for b in range(len(LOG2_HIST_EDGES)):
                        row = {"layer": name, "kind": kind, "timestep_index": ti, "timestep": self._t(ti),
                               "bin_low": edges[b], "bin_high": edges[b + 1], "count": float(hist[h, b])}
                        if per_head:
                            row["head"] = h
                        rows.append(row)
        return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------
# collection on an FP pipeline
# ----------------------------------------------------------------------------------------------------------
@takes_sampler
@torch.no_grad()
def collect_activation_stats(
    pipe,
    prompts: Sequence[str],
    sampler: SamplerSettings | None = None,
    seed: int = 0,
    *,
    layers: Sequence[str] | str | None = None,
    include_qkv: bool = True,
    include_attention: bool = True,
    conv_layout: str = "tensor",
    percentiles: Sequence[float] = (99.0, 99.9),
    ema_momentum: float = 0.95,
    progress: bool = True,
) -> ActivationStats:
    """Run ``prompts`` through an unquantized ``pipe`` and record activation statistics of its UNet.

    ``sampler``: steps, guidance, resolution and batch size (default
    :data:`~dgq_utils.calibrate.trace.TRACE_SAMPLER`: 25 steps, guidance 7.5, 8 prompts per batch).
    Per UNet call (timestep index = call index within a generation; ``t`` values in ``result.timesteps``):
    channel- and pixel-wise :class:`AxisStats` of every Linear / Conv2d input (``layers``: fnmatch patterns of
    UNet module names, default all), of the head-split Q / K / V (``include_qkv``), and attention-probability
    statistics (``include_attention``). Batch ``i`` uses ``torch.Generator().manual_seed(seed + i)``; CFG as in sampling (``guidance_scale > 1`` doubles the batch);
    the VAE is not run (``output_type="latent"``). ``conv_layout="unfold"`` records conv inputs as the official
    code sees them (im2col rows x output positions). The pipeline is left exactly as it was.
    """
    sampler = check_sampler(sampler, TRACE_SAMPLER, "collect_activation_stats")
    prompts = check_prompts(prompts)
    check_seed(seed)
    warn_unknown_words(pipe, prompts)
    if conv_layout not in ("tensor", "unfold"):
        raise ValueError(f"conv_layout must be 'tensor' or 'unfold'; got {conv_layout!r}.")
    if getattr(pipe.unet, "_dgq_state", None) is not None:
        raise RuntimeError("collect_activation_stats needs an unquantized pipeline; call dequantize_pipeline first.")
    select = layer_selector(layers)
    result = ActivationStats()
    percentiles = tuple(percentiles)
    trace = Trace(pipe, sampler, seed, progress=progress, desc="collecting activation statistics")
    state = trace.state

    def observe(name, mod, x):
        lt, per_t = result.layers[name]
        layout = "linear" if lt == "linear" else ("unfold" if conv_layout == "unfold" else "conv")
        if layout == "unfold":
            x = torch.nn.functional.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
        st = per_t.setdefault(state.set_index, TensorStats())
        st.update(x, layout, ema_momentum=ema_momentum, percentiles=percentiles,
                  where=f"layer {name!r} (timestep index {state.set_index}, t={state.t:g})")

    def observer(attn_name, kind, original):
        qkv = {}
        if include_qkv:
            for part in ("q", "k", "v"):
                qkv[part] = ActQuantizer(f"{attn_name}.{part}", bits=8, layout="qkv", state=state)
                qkv[part].set_observe(ema_momentum=ema_momentum, percentiles=percentiles)
                qkv[part].mode = "observe"
        if not qkv and not include_attention:
            return None  # not observed: keep the original processor
        p = DGQAttnProcessor(attn_name, kind, original, state=state, q_quant=qkv.get("q"),
                             k_quant=qkv.get("k"), v_quant=qkv.get("v"))
        p.record_attention = include_attention
        return p

    with trace:
        for name in trace.on_layer_input(observe, select):
            module = pipe.unet.get_submodule(name)
            result.layers[name] = ("linear" if isinstance(module, torch.nn.Linear) else "conv", {})
        recorders = trace.set_attention_processors(observer, select) if include_qkv or include_attention else {}
        result.timesteps = trace.run(prompts)

    for attn_name, p in recorders.items():
        for part in ("q", "k", "v"):
            qz = getattr(p, f"{part}_quant")
            if qz is not None:
                result.layers[f"{attn_name}.{part}"] = (f"attn_{part}", dict(qz.stats))
        if p.attention_stats:
            result.attention[attn_name] = (p.kind, dict(p.attention_stats))
    # GPU statistics: finished on the host with one copy (and the NaN check) instead of one sync per object
    stats_to_host([st for _, per_t in result.layers.values() for st in per_t.values()])
    result.meta = {
        "num_prompts": len(prompts), "num_inference_steps": sampler.num_inference_steps,
        "guidance_scale": sampler.guidance_scale, "seed": seed, "batch_size": sampler.batch_size,
        "height": sampler.height, "width": sampler.width, "conv_layout": conv_layout,
        "scheduler": type(pipe.scheduler).__name__, "percentiles": list(percentiles),
        "percentile_note": f"approximate: strided subsample of <= {PERCENTILE_SAMPLES} elements per call",
    }
    return result
