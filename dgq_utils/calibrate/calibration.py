"""Calibration: run prompts through the pipeline, gather activation statistics, turn them into parameters.

:func:`calibrate` is called by ``pipeline.quantize_pipeline`` after the quantized layers and attention
processors are installed. It runs the calibration prompts through the *pipeline itself* (seeded batches,
classifier-free guidance exactly as in sampling, ``output_type="latent"`` so the VAE is skipped), with the
:class:`~dgq_utils.model.timesteps.TimestepController` giving every UNet call of a generation its own parameter set.

Upstream choice (``ActQuantConfig.calibration_upstream``; default first)
-----------------------------------------------------------------------
* ``"fp"`` (default, sound): every quantizer observes with everything unquantized -- statistics of the FP model
  (FP weights too), independent of the order in which layers are calibrated.
* ``"per_tensor_quantized"`` (official, ``cali_model_aq``): for every UNet call of the FP sampling trajectory,
  (1) the first time a timestep set is seen, one extra forward in ``"init"`` mode gives every quantizer a
  per-tensor min/max init (0 included) from that batch, quantizing as it goes; (2) one extra forward in
  ``"observe_quant"`` mode records statistics of every layer's unquantized input while all layers quantize with
  their per-tensor init params (and weights quantized), so downstream statistics see per-tensor-quantized
  upstream activations; (3) the ordinary FP forward continues the FP trajectory. (The official code replays
  cached FP-trajectory UNet inputs; running the extra forwards inside the same call is equivalent.)

Turning statistics into parameters (per quantizer x timestep set)
-----------------------------------------------------------------
* ``granularity="per_tensor"`` (baselines): range = EMA of (min, max) (``range_estimator="ema"``, momentum
  ``ema_momentum``, initialised from the first call) or min/max over all calls (``"minmax"``); 0 included.
* ``granularity="group"`` (DGQ): axis = ``axis`` if forced, else :func:`~dgq_utils.core.grouping.decide_axis` with
  ``axis_rule`` on the channel- vs pixel-wise statistics; groups by ``grouping`` (K-means with ``seed``);
  per-group min/max ranges (``group_range_includes_zero``), every index getting its group's scale / zero point,
  pre-shaped for broadcasting. ``range_estimator`` does not apply to groups (official: min/max).
  For the official ``"unfold"`` conv layout the official tie rule is kept: the last dim (output positions, our
  "pixel") wins only when its spread is strictly larger, so ties go to the im2col rows ("channel").
* **2-D inputs** ``(B, C)`` (time-embedding linears, every ``time_emb_proj``) are quantized **per tensor** even
  in group mode (official: no group statistics are recorded for them). With ``"fp"`` upstream their range is the
  min/max over all calibration calls of the set (0 included); with ``"per_tensor_quantized"`` they keep the init
  from the first batch (official).
* **More groups than indices**: a layer whose chosen axis has ``n < num_groups`` indices (SD has small ones: e.g.
  40-wide head dims, 64-token pixel axes at the lowest resolution) uses ``K = n`` (every index its own group) and
  the clamp is logged and listed in the report. If the requested ``num_groups`` exceeds the axis size of *every*
  grouped quantizer, that is an impossible request and raises ``ValueError``.
* Static softmax scale (``AttentionQuantConfig.scale="static"``): the max over all calibration calls of the set
  (``"fp"`` upstream) or of the first batch (``"per_tensor_quantized"``, the official baseline).

Robustness: every observed tensor is checked for NaN / inf (``FloatingPointError`` naming the layer, timestep
index and ``t``); an empty prompt list raises ``ValueError``; all calibration batches must follow the same
schedule. Deterministic: the same prompts, seed and recipe give bit-identical parameters.
"""
from __future__ import annotations

import logging
import time

import torch

from dgq_utils.calibrate import observation_memo, reconstruction
from dgq_utils.calibrate.trace import TRACE_SAMPLER, Trace
from dgq_utils.config.sampler import SamplerSettings, check_sampler, takes_sampler
from dgq_utils.config.validation import check_prompts, check_seed
from dgq_utils.model.tokenizer import warn_unknown_words
from dgq_utils.core.grouping import (
    AxisStats,
    assign_groups_many,
    axis_scores,
    decide_axis,
    params_view,
    per_index_qparams,
)
from dgq_utils.core.quantizers import uniform_qparams
from dgq_utils.core.stats import axes_for, stats_to_host
from dgq_utils.model.layers import ActQuantizer
from dgq_utils.timing import stage

logger = logging.getLogger(__name__)

__all__ = ["CalibrationNotes", "calibrate", "finalize_act_quantizer", "needs_calibration"]


class CalibrationNotes(list):
    """Human-readable notes collected during calibration (clamped K, ...), listed in the report."""


def needs_calibration(recipe) -> bool:
    """Whether the recipe has anything that needs calibration data (activations, a static softmax scale, or
    learned weight rounding)."""
    att = recipe.attention
    return (recipe.activations is not None or (att is not None and att.enabled and att.scale == "static")
            or reconstruction.wants_reconstruction(recipe))


def _set_all_modes(qstate, mode: str) -> None:
    for layer in qstate.layers.values():
        layer.set_mode(mode)
    for proc in qstate.processors.values():
        proc.set_mode(mode)


def _observe_axes(cfg) -> tuple[str, ...]:
    if cfg.granularity == "per_tensor":
        return ()
    if cfg.axis == "auto":
        return ("channel", "pixel")
    return (cfg.axis,)


@takes_sampler
def calibrate(
    pipe,
    qstate,
    prompts,
    sampler: SamplerSettings | None = None,
    seed: int = 0,
    *,
    progress: bool = True,
) -> dict:
    """Calibrate every quantizer of ``qstate`` on ``prompts``; returns the calibration metadata.

    ``qstate`` is the ``quantize.pipeline.QuantState`` installed on ``pipe`` (layers, processors, controller,
    recipe; :meth:`act_quantizers` / :meth:`prob_quantizers` list its quantizers). ``sampler``: steps, guidance,
    resolution and batch size (default :data:`~dgq_utils.calibrate.trace.TRACE_SAMPLER`); batch ``i`` is seeded
    ``seed + i``. Leaves all quantizers in ``"quant"`` mode and the controller in inference mode.
    """
    sampler = check_sampler(sampler, TRACE_SAMPLER, "calibrate")
    num_inference_steps = sampler.num_inference_steps
    prompts = check_prompts(prompts)
    check_seed(seed)
    warn_unknown_words(pipe, prompts, "calibration prompts")
    recipe = qstate.recipe
    act_cfg = recipe.activations
    upstream = act_cfg.calibration_upstream if act_cfg is not None else "fp"
    t0 = time.perf_counter()

    act_quantizers = qstate.act_quantizers()
    prob_quantizers = qstate.prob_quantizers()
    for q in act_quantizers:
        q.clear_stats()
        q.params, q.info = {}, {}
        q.set_observe(axes=_observe_axes(act_cfg), ema_momentum=act_cfg.ema_momentum)
    for pq in prob_quantizers:
        pq.static, pq.observed_max = {}, {}

    controller = qstate.controller
    controller.start_calibration()
    controller.num_inference_steps = int(num_inference_steps)
    controller.num_train_timesteps = int(getattr(pipe.scheduler.config, "num_train_timesteps", 1000))

    if upstream == "fp":
        _set_all_modes(qstate, "observe")
        controller.callback = None
    else:
        initialized: set[int] = set()

        def official_passes(unet, args, kwargs):
            i = qstate.state.set_index
            if i not in initialized:
                _set_all_modes(qstate, "init")
                unet(*args, **kwargs)
                initialized.add(i)
            _set_all_modes(qstate, "observe_quant")
            unet(*args, **kwargs)
            _set_all_modes(qstate, "off")

        controller.callback = official_passes
    reconstruct = reconstruction.wants_reconstruction(recipe)
    memo_key = observation_memo.observation_key(pipe, qstate, prompts, sampler, seed)
    seen = observation_memo.lookup(memo_key)
    if seen is not None:  # the same observation was made for another recipe in this process: reuse it
        _set_all_modes(qstate, "off")
        observation_memo.restore(seen, qstate)
        samples = dict(seen.inputs)
    else:
        handles = reconstruction.attach(qstate, pipe.unet) if reconstruct else []
        try:
            with stage("observe", recipe=recipe.name, n=len(prompts)), \
                    Trace(pipe, sampler, seed, controller=controller, progress=progress,
                          desc=f"calibrating {recipe.name}") as trace:
                trace.run(prompts)
        finally:
            controller.callback = None
            _set_all_modes(qstate, "off")
            samples = reconstruction.detach(qstate, handles) if reconstruct else {}
        observation_memo.remember(memo_key, qstate, inputs=samples)
    controller.finish_calibration()
    t_passes = time.perf_counter()

    notes = CalibrationNotes()
    grouped, clamped = finalize_act_quantizers(act_quantizers, act_cfg, notes=notes)
    if act_cfg is not None and act_cfg.granularity == "group" and grouped and clamped == grouped:
        raise ValueError(
            f"num_groups={act_cfg.num_groups} is larger than the axis size of every grouped activation "
            "(no layer has that many channels/pixels along its chosen axis). Use fewer groups."
        )
    if clamped:
        msg = (f"{clamped} of {grouped} grouped (quantizer, timestep) pairs have fewer indices than "
               f"num_groups={act_cfg.num_groups} along their axis and use K = n (one group per index).")
        notes.append(msg)
        logger.info(msg)
    for pq in prob_quantizers:
        finalize_prob_quantizer(pq, upstream)
    for q in act_quantizers:
        q.clear_stats()
    t_finalize = time.perf_counter()
    weight_rounding = {"rounding": "nearest"}
    if reconstruct:
        weight_rounding = reconstruction.reconstruct(qstate, samples, unet=pipe.unet, notes=notes)
    del samples

    _set_all_modes(qstate, "quant")
    for q in act_quantizers:  # the parameter stacks the GPU kernel / compiled graph read, built once, now
        if q.stats_device is not None:
            q.prepare(q.stats_device)
    return {
        "num_prompts": len(prompts),
        "num_inference_steps": int(num_inference_steps),
        "guidance_scale": float(sampler.guidance_scale),
        "height": sampler.height,
        "width": sampler.width,
        "seed": int(seed),
        "batch_size": int(sampler.batch_size),
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": {k: _jsonable(v) for k, v in dict(pipe.scheduler.config).items()},
        "timesteps": list(controller.schedule),
        "num_sets": controller.num_sets,
        "upstream": upstream,
        "seconds": round(time.perf_counter() - t0, 3),
        "seconds_passes": round(t_passes - t0, 3),
        "observation_reused": seen is not None,
        "seconds_finalize": round(t_finalize - t_passes, 3),
        "seconds_reconstruction": round(time.perf_counter() - t_finalize, 3),
        "weight_rounding": weight_rounding,
        "notes": list(notes),
    }


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


# ----------------------------------------------------------------------------------------------------------
# statistics -> parameters
# ----------------------------------------------------------------------------------------------------------
def _choose_axis(st, cfg, layout: str) -> str:
    if cfg.axis != "auto":
        return cfg.axis
    if st.pixel is None:
        return "channel"
    if layout == "unfold" and cfg.axis_rule == "official_spread":
        c, p = axis_scores(st.channel, st.pixel, "official_spread")
        return "pixel" if p > c else "channel"  # official: last dim (= output positions) only if strictly larger
    return decide_axis(st.channel, st.pixel, cfg.axis_rule)


def finalize_act_quantizer(q: ActQuantizer, cfg, *, notes: list | None = None) -> tuple[int, int]:
    """Set ``q.params`` for every set it observed; returns (#grouped sets, #sets whose K was clamped)."""
    return finalize_act_quantizers([q], cfg, notes=notes)


def finalize_act_quantizers(quantizers, cfg, *, notes: list | None = None,
                            n_jobs: int | None = None) -> tuple[int, int]:
    """Set ``params`` of every quantizer for every set it observed; returns (#grouped sets, #clamped sets).

    Per-tensor sets are finished at once; the grouped ones are planned first and their groups formed in one
    :func:`~dgq_utils.core.grouping.assign_groups_many` call (the K-means fits of all layers and timesteps run in
    parallel worker processes; same ids as one by one).
    """
    grouped = clamped = 0
    quantizers = list(quantizers)
    if not quantizers:
        return grouped, clamped
    official = cfg.calibration_upstream == "per_tensor_quantized"
    # GPU statistics: checked for NaN / inf and copied to the host in one transfer (no per-set syncs below)
    stats_to_host([st for q in quantizers for st in q.stats.values()])
    planned = []  # (quantizer, set index, observed stats, axis, AxisStats, k, requested k)
    for q in quantizers:
        for i, st in sorted(q.stats.items()):
            if st.calls == 0:
                continue
            two_d = st.shape is not None and len(st.shape) == 1
            if cfg.granularity == "per_tensor" or two_d:
                if two_d and cfg.granularity == "group" and official and i in q.params:
                    continue  # official: 2-D inputs keep the per-tensor init of the first batch
                use_ema = cfg.granularity == "per_tensor" and cfg.range_estimator == "ema"
                lo, hi = (st.ema_min, st.ema_max) if use_ema else (st.min, st.max)
                scale, zp = uniform_qparams(torch.tensor(float(lo)), torch.tensor(float(hi)), q.bits,
                                            symmetric=cfg.symmetric, include_zero=True)
                q.set_params(i, scale, zp, {"axis": "tensor", "k": 1, "requested_k": 1, "n": 1, "ids": None,
                                            "source": "ema" if use_ema else "minmax"})
                continue
            axis = _choose_axis(st, cfg, q.layout)
            stats: AxisStats | None = st.axis(axis)
            if stats is None:
                raise ValueError(f"{q.name}: axis {axis!r} was requested but the input has no such axis "
                                 f"(input shape without batch: {st.shape}).")
            k_req = int(cfg.num_groups)
            k = min(k_req, stats.n)
            grouped += 1
            if k < k_req:
                clamped += 1
            planned.append((q, i, st, axis, stats, k, k_req))
    with stage("kmeans" if cfg.grouping == "kmeans" else "groups", n=len(planned)):
        all_ids = assign_groups_many([(p[4], p[5]) for p in planned], method=cfg.grouping, seed=cfg.seed,
                                     n_jobs=n_jobs)
    for (q, i, st, axis, stats, k, k_req), ids in zip(planned, all_ids):
        scale, zp = per_index_qparams(stats, ids, k, q.bits, include_zero=cfg.group_range_includes_zero,
                                      symmetric=cfg.symmetric)
        dummy_shape = (1,) + tuple(st.shape)
        ch_axis, px_axis = axes_for(torch.empty(dummy_shape, device="meta"), q.layout)
        dims = ch_axis if axis == "channel" else px_axis
        q.set_params(i, params_view(scale, dummy_shape, dims), params_view(zp, dummy_shape, dims),
                     {"axis": axis, "k": k, "requested_k": k_req, "n": stats.n, "ids": ids.cpu(),
                      "source": "groups"})
    return grouped, clamped


def finalize_prob_quantizer(pq, upstream: str = "fp") -> None:
    """Static softmax scales from the observed maxima (``"fp"``) or keep the first-batch init (official)."""
    if pq.scale_mode != "static":
        return
    if upstream == "fp" or not pq.static:
        pq.static = {i: torch.tensor(float(m)) for i, m in sorted(pq.observed_max.items())}
    pq.observed_max = {}
