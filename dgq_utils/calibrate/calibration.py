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
    AXIS_RULES,
    AxisStats,
    assign_groups,
    assign_groups_many,
    axis_scores,
    axis_scores_many,
    decide_axis,
    params_view,
    per_index_qparams,
    per_index_qparams_many,
    prestart_kmeans_workers,
)
from dgq_utils.core.quantizers import uniform_qparams
from dgq_utils.core.stats import axes_for, stats_to_host
from dgq_utils.model.layers import ActQuantizer
from dgq_utils.timing import stage

logger = logging.getLogger(__name__)

__all__ = ["CalibrationNotes", "calibrate", "finalize_act_quantizer", "finalize_act_quantizer_reference",
           "finalize_act_quantizers", "needs_calibration"]


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
        warm = None
        if act_cfg is not None and act_cfg.granularity == "group":
            fits = len(act_quantizers) * (int(num_inference_steps) + 1)  # about one fit per quantizer, UNet call

            def warm(_batch=None):  # K-means workers started while the GPU observes (kept from their idle exit)
                prestart_kmeans_workers(fits, act_cfg.grouping)

            warm()
        try:
            with stage("observe", recipe=recipe.name, n=len(prompts)), \
                    Trace(pipe, sampler, seed, controller=controller, progress=progress,
                          desc=f"calibrating {recipe.name}") as trace:
                trace.run(prompts, on_batch=warm)
        finally:
            controller.callback = None
            _set_all_modes(qstate, "off")
            samples = reconstruction.detach(qstate, handles) if reconstruct else {}
        observation_memo.remember(memo_key, qstate, inputs=samples)
    controller.finish_calibration()
    t_passes = time.perf_counter()

    notes = CalibrationNotes()
    timings: dict = {}
    grouped, clamped = finalize_act_quantizers(act_quantizers, act_cfg, notes=notes, timings=timings)
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
        "seconds_groups": timings.get("seconds_groups", 0.0),
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
def _choose_axes(stats, cfg, layout: str) -> list[str]:
    """The group axis of each of one quantizer's observed sets (``stats``: their :class:`TensorStats`), with the
    axis rule's scores computed for all sets at once (:func:`~dgq_utils.core.grouping.axis_scores_many`)."""
    if cfg.axis != "auto":
        return [cfg.axis] * len(stats)
    out: list[str | None] = ["channel" if st.pixel is None else None for st in stats]
    both = [j for j, a in enumerate(out) if a is None]
    if not both:
        return out  # type: ignore[return-value]
    rule = "official_spread" if layout == "unfold" and cfg.axis_rule == "official_spread" else cfg.axis_rule
    if AXIS_RULES.lookup(rule).forces is not None:
        for j in both:
            out[j] = decide_axis(stats[j].channel, stats[j].pixel, rule)
        return out  # type: ignore[return-value]
    c, p = axis_scores_many([stats[j].channel for j in both], [stats[j].pixel for j in both], rule)
    for j, cj, pj in zip(both, c, p):
        if layout == "unfold" and cfg.axis_rule == "official_spread":
            out[j] = "pixel" if pj > cj else "channel"  # official: last dim (= output positions) only if larger
        else:
            out[j] = "channel" if cj > pj else "pixel"  # decide_axis: ties -> pixel
    return out  # type: ignore[return-value]


def finalize_act_quantizer(q: ActQuantizer, cfg, *, notes: list | None = None) -> tuple[int, int]:
    """Set ``q.params`` for every set it observed; returns (#grouped sets, #sets whose K was clamped)."""
    return finalize_act_quantizers([q], cfg, notes=notes)


def finalize_act_quantizers(quantizers, cfg, *, notes: list | None = None, n_jobs: int | None = None,
                            timings: dict | None = None) -> tuple[int, int]:
    """Set ``params`` of every quantizer for every set it observed; returns (#grouped sets, #clamped sets).

    Batched per quantizer, with no per-set host work beyond the K-means fits: the statistics come to the host in
    one copy (:func:`~dgq_utils.core.stats.stats_to_host`; K-means runs there anyway), the axis rule scores all
    sets of a quantizer at once, the groups of all layers and timesteps are formed in one
    :func:`~dgq_utils.core.grouping.assign_groups_many` call (K-means in parallel worker processes) and each
    quantizer's per-index parameters in one :func:`~dgq_utils.core.grouping.per_index_qparams_many` call per
    axis. The same float32 operations as one set at a time (:func:`finalize_act_quantizer_reference`), so the
    same parameters bit for bit; sets are installed in set order. ``timings`` (a dict, optional) receives
    ``seconds_groups`` (the grouping call, K-means fits) and ``fits`` (grouped sets).
    """
    grouped = clamped = 0
    quantizers = list(quantizers)
    if not quantizers:
        return grouped, clamped
    official = cfg.calibration_upstream == "per_tensor_quantized"
    # GPU statistics: checked for NaN / inf and copied to the host in one transfer (no per-set syncs below)
    stats_to_host([st for q in quantizers for st in q.stats.values()])
    pending: list[dict] = []  # per quantizer: set index -> (scale, zero point, info)
    plans = []  # (quantizer index, axis, [(set index, stats, AxisStats)], k, requested k)
    for qi, q in enumerate(quantizers):
        done: dict = {}
        pending.append(done)
        tensor_sets, group_sets = [], []
        for i, st in sorted(q.stats.items()):
            if st.calls == 0:
                continue
            two_d = st.shape is not None and len(st.shape) == 1
            if cfg.granularity == "per_tensor" or two_d:
                if two_d and cfg.granularity == "group" and official and i in q.params:
                    continue  # official: 2-D inputs keep the per-tensor init of the first batch
                use_ema = cfg.granularity == "per_tensor" and cfg.range_estimator == "ema"
                lo, hi = (st.ema_min, st.ema_max) if use_ema else (st.min, st.max)
                tensor_sets.append((i, float(lo), float(hi), "ema" if use_ema else "minmax"))
            else:
                group_sets.append((i, st))
        if tensor_sets:  # float32 0-d ranges, as torch.tensor(float) gives them
            scale, zp = uniform_qparams(torch.tensor([t[1] for t in tensor_sets]),
                                        torch.tensor([t[2] for t in tensor_sets]), q.bits,
                                        symmetric=cfg.symmetric, include_zero=True)
            for j, (i, _, _, source) in enumerate(tensor_sets):
                done[i] = (scale[j], zp[j], {"axis": "tensor", "k": 1, "requested_k": 1, "n": 1, "ids": None,
                                             "source": source})
        if not group_sets:
            continue
        by_axis: dict[str, list] = {}
        for (i, st), axis in zip(group_sets, _choose_axes([st for _, st in group_sets], cfg, q.layout)):
            stats: AxisStats | None = st.axis(axis)
            if stats is None:
                raise ValueError(f"{q.name}: axis {axis!r} was requested but the input has no such axis "
                                 f"(input shape without batch: {st.shape}).")
            by_axis.setdefault(axis, []).append((i, st, stats))
        for axis, members in by_axis.items():
            k_req = int(cfg.num_groups)
            k = min(k_req, members[0][2].n)  # one input shape per quantizer: one n per axis
            grouped += len(members)
            if k < k_req:
                clamped += len(members)
            plans.append((qi, axis, members, k, k_req))
    t_groups = time.perf_counter()
    with stage("kmeans" if cfg.grouping == "kmeans" else "groups", n=grouped):
        all_ids = assign_groups_many([(m[2], k) for _, _, members, k, _ in plans for m in members],
                                     method=cfg.grouping, seed=cfg.seed, n_jobs=n_jobs)
    if timings is not None:
        timings["seconds_groups"] = round(time.perf_counter() - t_groups, 3)
        timings["fits"] = grouped
    pos = 0
    for qi, axis, members, k, k_req in plans:
        q = quantizers[qi]
        ids = [t.cpu() for t in all_ids[pos:pos + len(members)]]
        pos += len(members)
        scale, zp = per_index_qparams_many(torch.stack([m[2].mins for m in members]),
                                           torch.stack([m[2].maxs for m in members]), torch.stack(ids), k, q.bits,
                                           include_zero=cfg.group_range_includes_zero, symmetric=cfg.symmetric)
        dummy_shape = (1,) + tuple(members[0][1].shape)
        ch_axis, px_axis = axes_for(torch.empty(dummy_shape, device="meta"), q.layout)
        dims = ch_axis if axis == "channel" else px_axis
        for j, (i, _st, stats) in enumerate(members):
            pending[qi][i] = (params_view(scale[j], dummy_shape, dims), params_view(zp[j], dummy_shape, dims),
                              {"axis": axis, "k": k, "requested_k": k_req, "n": stats.n, "ids": ids[j],
                               "source": "groups"})
    for q, done in zip(quantizers, pending):
        for i in sorted(done):
            q.set_params(i, *done[i])
    return grouped, clamped


def finalize_act_quantizer_reference(q: ActQuantizer, cfg) -> tuple[int, int]:
    """One set at a time with the per-set functions of :mod:`dgq_utils.core.grouping` (:func:`decide_axis`,
    :func:`assign_groups`, :func:`per_index_qparams`): the definition :func:`finalize_act_quantizers` must equal
    (tests). Returns (#grouped sets, #clamped sets)."""
    grouped = clamped = 0
    official = cfg.calibration_upstream == "per_tensor_quantized"
    stats_to_host(list(q.stats.values()))
    for i, st in sorted(q.stats.items()):
        if st.calls == 0:
            continue
        two_d = st.shape is not None and len(st.shape) == 1
        if cfg.granularity == "per_tensor" or two_d:
            if two_d and cfg.granularity == "group" and official and i in q.params:
                continue
            use_ema = cfg.granularity == "per_tensor" and cfg.range_estimator == "ema"
            lo, hi = (st.ema_min, st.ema_max) if use_ema else (st.min, st.max)
            scale, zp = uniform_qparams(torch.tensor(float(lo)), torch.tensor(float(hi)), q.bits,
                                        symmetric=cfg.symmetric, include_zero=True)
            q.set_params(i, scale, zp, {"axis": "tensor", "k": 1, "requested_k": 1, "n": 1, "ids": None,
                                        "source": "ema" if use_ema else "minmax"})
            continue
        if cfg.axis != "auto":
            axis = cfg.axis
        elif st.pixel is None:
            axis = "channel"
        elif q.layout == "unfold" and cfg.axis_rule == "official_spread":
            c, p = axis_scores(st.channel, st.pixel, "official_spread")
            axis = "pixel" if p > c else "channel"
        else:
            axis = decide_axis(st.channel, st.pixel, cfg.axis_rule)
        stats = st.axis(axis)
        if stats is None:
            raise ValueError(f"{q.name}: axis {axis!r} was requested but the input has no such axis "
                             f"(input shape without batch: {st.shape}).")
        k_req = int(cfg.num_groups)
        k = min(k_req, stats.n)
        grouped += 1
        clamped += int(k < k_req)
        ids = assign_groups(stats, k, method=cfg.grouping, seed=cfg.seed)
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
        items = sorted(pq.observed_max.items())  # 0-d device tensors: to the host in one copy
        values = torch.stack([m.reshape(()).float().to(items[0][1].device) for _, m in items]).cpu().tolist() \
            if items else []
        pq.static = {i: torch.tensor(float(v)) for (i, _), v in zip(items, values)}
    pq.observed_max = {}
