"""Calibration statistics observed once, reused by every recipe that would observe the same thing.

With the sound ``calibration_upstream="fp"`` every quantizer observes the FP model: what it records depends on
the model, the calibration prompts, sampler and seed, which quantizers exist (names, layouts, what each records:
axes, EMA momentum, percentiles, ``<start>`` column kept out of the softmax max) and whether the timestep sets are
shared, and -- for recipes with AdaRound weights, whose passes also sample every layer's inputs -- the sample
size and seed -- not on bit-widths, groups, K, weights or the rest of the recipe. So the report's W8A8 / W8A6 / W4A8
recipes of one method, and most ablation variants of DGQ, would run the same observation passes (a full sampling
run per calibration prompt, most of a CPU calibration's time). :func:`lookup` / :func:`remember` keep the last
:data:`MEMO_SIZE` observations of this process, keyed by all of that; :func:`dgq_utils.calibrate.calibration
.calibrate` restores one instead of running the passes, bit-identically (deep copies of the same statistics).

Only CPU pipelines are remembered: the model part of the key is a hash of every parameter's bytes (0.3 s for
the embedded model), which on a GPU would copy every weight to the host. The official ``per_tensor_quantized``
upstream observes a partly quantized model and is never remembered.
"""
from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch

from dgq_utils.calibrate.reconstruction import capture_key
from dgq_utils.keys import stable_hash

__all__ = ["MEMO_SIZE", "Observation", "clear", "lookup", "observation_key", "remember", "restore"]

#: observations kept (each holds every quantizer's statistics for every timestep set)
MEMO_SIZE = 3

_memo: "OrderedDict[str, Observation]" = OrderedDict()


@dataclass
class Observation:
    """What the observation passes leave behind: the statistics per activation quantizer name, the observed
    softmax maxima per probability quantizer name, the device the inputs lived on, the calibration schedule, and
    the sampled layer inputs for weight reconstruction (when the recipe captures them)."""

    act_stats: dict
    prob_max: dict
    stats_device: dict
    schedule: list
    generations: int
    inputs: dict = None  # layer name -> InputSample (weight reconstruction), {} when none were captured

    def __post_init__(self):
        if self.inputs is None:
            self.inputs = {}


def _weights_hash(pipe) -> str | None:
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):  # not a diffusers pipeline: nothing to key the model by
        return None
    h = hashlib.blake2b(digest_size=16)
    for comp_name in sorted(components):
        comp = pipe.components[comp_name]
        if not isinstance(comp, torch.nn.Module):
            continue
        for p in comp.parameters():
            if p.device.type != "cpu":
                return None
            h.update(f"{comp_name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(p.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def observation_key(pipe, qstate, prompts, sampler, seed: int) -> str | None:
    """The key of what calibrating ``qstate`` on ``prompts`` would observe, or ``None`` when it is not
    remembered (quantized upstream, a pipeline not on the CPU)."""
    act_cfg = qstate.recipe.activations
    if act_cfg is not None and act_cfg.calibration_upstream != "fp":
        return None
    weights = _weights_hash(pipe)
    if weights is None:
        return None
    sched = pipe.scheduler
    return stable_hash({
        "weights": weights,
        "scheduler": [type(sched).__name__, {k: str(v) for k, v in dict(sched.config).items()}],
        "prompts": [str(p) for p in prompts],
        "sampler": {k: str(v) for k, v in asdict(sampler).items()},
        "seed": int(seed),
        "shared_sets": qstate.controller.mapping == "shared",
        "acts": [[q.name, q.layout, *map(str, q.observe_settings)] for q in qstate.act_quantizers()],
        # only a static softmax scale records maxima (a per-prompt / batch one observes nothing)
        "probs": [[pq.name, bool(pq.keep_start), str(pq.scale_mode)] for pq in qstate.prob_quantizers()],
        # token 0 of K / V bypassing their quantizers changes what those observe
        "procs": [[name, bool(p.enabled), bool(p.key_start_fp), bool(p.value_start_fp)]
                  for name, p in sorted(qstate.processors.items())],
        # weight reconstruction (AdaRound) also samples every quantized layer's inputs: which layers, how many
        # rows, which seed (None: nothing captured)
        "capture": None if capture_key(qstate.recipe) is None
        else [capture_key(qstate.recipe), [[name, type(layer).__name__] for name, layer in qstate.layers.items()]],
    }, 32)


def lookup(key: str | None) -> Observation | None:
    """A deep copy of the remembered observation ``key`` (``None`` if there is none)."""
    if key is None or key not in _memo:
        return None
    _memo.move_to_end(key)
    return copy.deepcopy(_memo[key])


def remember(key: str | None, qstate, inputs: dict | None = None) -> None:
    """Keep a deep copy of what ``qstate``'s quantizers and controller observed (and of the captured layer
    ``inputs``, if any), under ``key``."""
    if key is None:
        return
    acts, probs, ctl = qstate.act_quantizers(), qstate.prob_quantizers(), qstate.controller
    _memo[key] = Observation(
        act_stats=copy.deepcopy({q.name: q.stats for q in acts}),
        # running maxima are 0-d tensors (kept on the device while observing): copies, not the live objects
        prob_max=copy.deepcopy({pq.name: dict(pq.observed_max) for pq in probs}),
        stats_device={q.name: q.stats_device for q in acts},
        schedule=list(ctl.schedule),
        generations=int(ctl.calibration_generations),
        inputs=copy.deepcopy(dict(inputs or {})),
    )
    _memo.move_to_end(key)
    while len(_memo) > MEMO_SIZE:
        _memo.popitem(last=False)


def restore(obs: Observation, qstate) -> None:
    """Put ``obs`` into ``qstate``'s quantizers and controller, as if the observation passes had just run."""
    for q in qstate.act_quantizers():
        q.stats = obs.act_stats[q.name]
        q.stats_device = obs.stats_device[q.name]
    for pq in qstate.prob_quantizers():
        pq.observed_max = obs.prob_max[pq.name]
    qstate.controller.schedule = list(obs.schedule)
    qstate.controller.calibration_generations = obs.generations


def clear() -> None:
    _memo.clear()
