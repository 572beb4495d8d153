"""Quantization recipes: one frozen dataclass describes a quantization end to end.

The paper's method (DGQ), the per-tensor baselines and every ablation are *configs*, not code paths::

    from dgq_utils.config import get_preset
    dgq = get_preset("dgq-w8a6")
    no_groups = dgq.replace(activations={"grouping": "contiguous"})   # nested dicts update nested configs
    print(no_groups.summary())

A :class:`QuantRecipe` holds three optional parts -- :class:`WeightQuantConfig`, :class:`ActQuantConfig`,
:class:`AttentionQuantConfig` -- where ``None`` means "left in full precision". Every config validates itself on
construction (so a typo fails at once, with a message saying what to use instead), serialises to a plain dict /
JSON (``to_dict`` / ``from_dict`` / ``to_json`` / ``from_json`` round-trip exactly; unknown keys are errors), and
has a ``replace(**changes)`` convenience. :func:`recipe_hash` gives a short stable content hash for caches.

Faithful-vs-sound choices (default first, with the reason)
---------------------------------------------------------
"Official" means what the public DGQ code does (see ``shared/dgq-official-code.md``); "sound" means what we
believe the paper intends or what is numerically well-founded. Where the official behaviour is a plain bug or an
accident of the implementation, the default is the sound variant; the official one stays one option away, and the
``dgq-official-*`` presets switch all of them to the official side at once.

=================================  ======================  =====================================================
option                             default                 alternative / why
=================================  ======================  =====================================================
``act.group_range_includes_zero``  ``False`` (official)    ``True`` forces 0 into each group range. Official
                                                           groups do not contain 0, which wastes no levels but
                                                           makes 0 unrepresentable for all-positive groups; we
                                                           keep the official choice (it is the method as
                                                           evaluated) and measure the other.
``act.range_estimator``            ``"minmax"`` (official  ``"ema"`` (momentum 0.95) is the official K = 1
                                   DGQ)                    baseline path; the baseline presets use it.
``act.conv_input_layout``          ``"tensor"`` (sound)    ``"unfold"`` (official) quantizes im2col rows: conv
                                                           "channel" groups become channel x kernel-offset rows,
                                                           a 9x larger, padding-polluted problem. ``"tensor"``
                                                           groups the C channels / H*W pixels of the conv input
                                                           directly, which is what the paper describes.
``act.calibration_upstream``       ``"fp"`` (sound)        ``"per_tensor_quantized"`` (official): statistics of
                                                           layer l are gathered while layers < l quantize with
                                                           their per-tensor init. ``"fp"`` gathers them with
                                                           every quantizer off, independent of order.
``act.axis_rule``                  ``"official_spread"``   ``"outlier_ratio"`` compares max/median of the
                                   (official)              per-index ranges (where the outliers are) instead of
                                                           the spread of the range vectors.
``act.grouping``                   ``"kmeans"`` (official) ``"contiguous"`` (naive blocks), ``"sorted"``
                                                           (equal-count bins of indices sorted by range).
``attention.scale``                ``"per_prompt"`` (paper) ``"batch"`` (official code: one max over the whole
                                                           batch incl. both CFG halves), ``"static"``
                                                           (calibrated once per timestep).
``attention.zero_level``           ``True`` (sound)        ``False`` (official): 0 maps to
                                                           ``scale * 2^-(2^b-1)``; see quantizers.fake_quant_log2.
``attention.start_in``             ``"cross"`` (official)  ``"both"`` also keeps column 0 of self-attention
                                                           FP, which is an image token there (rarely useful).
``attention.keep_start_key_fp``    ``True`` (official)     the official code also keeps key token 0 FP.
``recipe.timestep_mapping``        ``"exact"`` (sound)     ``"official"``: (1000 - t) // (1000 // steps), which
                                                           is off by one after PLMS's repeated first step.
``recipe.per_timestep``            ``True`` (official)     ``False``: one activation parameter set for all
                                                           steps (Q-Diffusion-naive baseline).
=================================  ======================  =====================================================

Presets (:data:`PRESETS`, :func:`list_presets`)
-----------------------------------------------
* ``fp`` -- nothing quantized.
* ``baseline-wXaY`` -- **TFMQ-like** per-tensor baseline (the official K = 1 path): per-tensor asymmetric
  activations with an EMA range (momentum 0.95, 0 included), per-output-channel weights with the same MSE range search as DGQ (so the comparison isolates the activation and attention quantizers), a *uniform*
  softmax quantizer (``always_zero``-style: scale = max / (2^b - 1) calibrated per timestep, i.e.
  ``scale="static"``) with the activation bit-width, no ``<start>`` handling, one parameter set per timestep.
* ``baseline-wXaY-shared`` -- the same with one parameter set for all timesteps (**Q-Diffusion-naive**).
* ``dgq-wXaY`` -- DGQ: K = 16 K-means groups on the axis picked by the official spread rule, min/max ranges,
  log2 softmax quantizer with a per-prompt scale and the ``<start>`` column (and key) of cross-attention kept FP,
  per-timestep parameters, MSE-searched per-channel weights; sound defaults for the implementation quirks.
* ``dgq-wXaY-g8`` / ``-g4`` -- the same with K = 8 / 4 groups.
* ``dgq-official-wXaY`` -- DGQ with every option on the official-code side (unfolded conv inputs, upstream
  per-tensor-quantized calibration, batch-wide softmax scale, no log2 zero level, official timestep index).

* ``dgq-w4aY-adaround`` / ``baseline-w4aY-adaround`` -- the W4 recipes with layer-wise AdaRound weight rounding
  (``weights.rounding="adaround"``, default :class:`AdaRoundConfig`) instead of round-to-nearest.

with ``wXaY`` in ``w8a8``, ``w8a6``, ``w4a8``, ``w4a6``. The other presets round weights to nearest on the
MSE-searched grid (the official SD code reconstructs them block-wise, BRECQ-style; see ``WeightQuantConfig``).
"""
from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping

from dgq_utils.core.grouping import AXIS_RULES, GROUPING_METHODS
from dgq_utils.core.quantizers import PROB_QUANTIZERS, check_bits
from dgq_utils.core.registry import RegisteredNames, suggest
from dgq_utils.keys import stable_hash

__all__ = [
    "AdaRoundConfig",
    "WeightQuantConfig",
    "ActQuantConfig",
    "AttentionQuantConfig",
    "QuantRecipe",
    "recipe_hash",
]


# ----------------------------------------------------------------------------------------------------------
# shared machinery
# ----------------------------------------------------------------------------------------------------------
def _check_choice(owner: str, name: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ValueError(
            f"{owner}.{name} must be one of {', '.join(repr(o) for o in options)}; got {value!r}."
            + suggest(value, options)
        )


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be True or False; got {value!r} ({type(value).__name__}).")


def _check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an integer >= {minimum}; got {value!r}.")


class _ConfigMixin:
    """to_dict / from_dict / to_json / from_json / replace for the frozen config dataclasses."""

    _NESTED: ClassVar[dict[str, type]] = {}

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, _ConfigMixin):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        if isinstance(d, cls):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f"{cls.__name__}.from_dict needs a dict; got {type(d).__name__}.")
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        unknown = [k for k in d if k not in names]
        if unknown:
            hints = "".join(suggest(k, names) for k in unknown)
            raise ValueError(
                f"unknown key(s) for {cls.__name__}: {', '.join(repr(k) for k in unknown)}. "
                f"Valid keys: {', '.join(names)}.{hints}"
            )
        kw = {}
        for k, v in d.items():
            sub = cls._NESTED.get(k)
            if sub is not None and v is not None:
                v = sub.from_dict(v)
            kw[k] = v
        return cls(**kw)

    def to_json(self, **json_kw) -> str:
        json_kw.setdefault("sort_keys", True)
        return json.dumps(self.to_dict(), **json_kw)

    @classmethod
    def from_json(cls, s: str):
        return cls.from_dict(json.loads(s))

    def replace(self, **changes):
        """A copy with ``changes`` applied. For a nested config field a dict updates the nested config (starting
        from its defaults if it is ``None``); a config instance or ``None`` replaces it outright."""
        names = [f.name for f in fields(self)]  # type: ignore[arg-type]
        unknown = [k for k in changes if k not in names]
        if unknown:
            hints = "".join(suggest(k, names) for k in unknown)
            raise ValueError(
                f"{type(self).__name__}.replace got unknown field(s) {', '.join(repr(k) for k in unknown)}; "
                f"valid fields: {', '.join(names)}.{hints}"
            )
        kw = {}
        for k, v in changes.items():
            sub = self._NESTED.get(k)
            if sub is not None and isinstance(v, Mapping):
                current = getattr(self, k)
                v = (current if current is not None else sub()).replace(**v)
            kw[k] = v
        return dataclasses.replace(self, **kw)  # type: ignore[type-var]


# ----------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------
def _check_real(owner: str, name: str, value: Any, *, minimum: float, maximum: float | None = None,
                open_min: bool = False, hint: str = "") -> None:
    bad = isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value
    if not bad:
        v = float(value)
        bad = (v <= minimum if open_min else v < minimum) or (maximum is not None and v > maximum) or v == float("inf")
    if bad:
        lo = f"> {minimum}" if open_min else f">= {minimum}"
        rng = lo + (f" and <= {maximum}" if maximum is not None else "")
        raise ValueError(f"{owner}.{name} must be a finite number {rng}; got {value!r}." + (f" {hint}" if hint else ""))


@dataclass(frozen=True)
class AdaRoundConfig(_ConfigMixin):
    """Settings of the AdaRound rounding optimisation (``WeightQuantConfig.rounding="adaround"``).

    Per quantized layer, the rounding of every weight (down or up from ``floor(w / scale)``; the scale and zero
    point stay those of the range search) is learned so that the layer's output on a sample of its calibration
    inputs stays close to the FP output (Nagel et al. 2020): rectified-sigmoid soft rounding
    ``h(a) = clamp(1.2 sigmoid(a) - 0.1, 0, 1)`` started from the fractional part, Adam on ``a``, the rounding
    regulariser ``sum(1 - |2h - 1|^beta)`` (weight ``reg_weight``) switched on after ``warmup`` of the iterations
    with ``beta`` annealed linearly from ``beta_start`` to ``beta_end``, and finally hard rounding ``a >= 0``.

    * ``samples``: at most this many input rows per layer (token vectors of a Linear, kernel patches of a Conv at
      sampled output positions), drawn uniformly over every calibration call with ``seed``.
    * ``iters`` / ``lr`` / ``batch_size``: Adam iterations, learning rate and rows per iteration. The official
      SD setting (Q-Diffusion/BRECQ code) is 20,000 iterations at lr 1e-3 with batches of 8 whole samples; the
      default here (1,000 at lr 1e-2 on 64 rows) moves the rounding variables about as far at 1/20 of the cost.
    * ``keep_better``: if the learned hard rounding reconstructs the layer's sampled outputs worse than nearest
      rounding, keep nearest (guards short runs; ``False`` keeps the learned rounding regardless).
    * ``granularity``: ``"layer"`` (each layer on its own, the default) or ``"block"`` (BRECQ-style, as in the
      official SD code: the rounding of every quantized layer inside one ``ResnetBlock2D`` /
      ``BasicTransformerBlock`` is learned jointly to reconstruct the block's output, on ``block_calls`` whole
      calibration calls of the block kept per block; layers outside such blocks are reconstructed layer-wise).
    """

    iters: int = 1000
    lr: float = 1e-2
    batch_size: int = 64
    samples: int = 1024
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    seed: int = 0
    keep_better: bool = True
    granularity: str = "layer"  # "layer" | "block"
    block_calls: int = 8

    GRANULARITIES: ClassVar[tuple] = ("layer", "block")

    def __post_init__(self):
        o = "AdaRoundConfig"
        _check_choice(o, "granularity", self.granularity, self.GRANULARITIES)
        _check_int(o, "block_calls", self.block_calls, 1)
        _check_int(o, "iters", self.iters, 1)
        _check_real(o, "lr", self.lr, minimum=0.0, open_min=True, hint="Adam's learning rate, e.g. 1e-2.")
        _check_int(o, "batch_size", self.batch_size, 1)
        _check_int(o, "samples", self.samples, 1)
        _check_real(o, "reg_weight", self.reg_weight, minimum=0.0, hint="the official value is 0.01.")
        _check_real(o, "beta_start", self.beta_start, minimum=0.0, open_min=True, hint="the official value is 20.")
        _check_real(o, "beta_end", self.beta_end, minimum=0.0, open_min=True, hint="the official value is 2.")
        if float(self.beta_end) > float(self.beta_start):
            raise ValueError(f"{o}.beta_end must be <= beta_start (beta is annealed downwards); got "
                             f"beta_start={self.beta_start!r}, beta_end={self.beta_end!r}.")
        _check_real(o, "warmup", self.warmup, minimum=0.0, maximum=1.0,
                    hint="the fraction of iterations without the rounding regulariser (official 0.2).")
        if float(self.warmup) >= 1.0:
            raise ValueError(f"{o}.warmup must be < 1 (a fraction of the iterations; the regulariser must get "
                             f"some); got {self.warmup!r}. The official value is 0.2.")
        _check_int(o, "seed", self.seed, 0)
        _check_bool(o, "keep_better", self.keep_better)


@dataclass(frozen=True)
class WeightQuantConfig(_ConfigMixin):
    """Weight quantization (bias is never quantized).

    ``range_method="mse"`` is the official SD init (per-channel search over 80 shrink factors, ``|.|^2.4``
    error); ``"minmax"`` is the plain per-channel min/max with 0 included (the official SDXL setting).

    ``rounding``: ``"nearest"`` (default) rounds every weight to the nearest level of the searched grid;
    ``"adaround"`` keeps that grid and learns per weight whether to round down or up so that each layer's output
    on its calibration inputs stays close to FP (layer-wise AdaRound by default; settings in ``adaround``, an
    :class:`AdaRoundConfig`, whose ``granularity="block"`` reconstructs whole ResNet / transformer blocks as the
    official SD code does, BRECQ-style); see ``dgq_utils.calibrate.reconstruction``. ``adaround`` is ignored for ``"nearest"``.
    """

    bits: int = 8
    granularity: str = "per_channel"  # "per_channel" | "per_tensor"
    symmetric: bool = False
    range_method: str = "mse"  # "minmax" | "mse"
    rounding: str = "nearest"  # "nearest" | "adaround"
    adaround: AdaRoundConfig = AdaRoundConfig()

    GRANULARITIES: ClassVar[tuple] = ("per_channel", "per_tensor")
    RANGE_METHODS: ClassVar[tuple] = ("minmax", "mse")
    ROUNDINGS: ClassVar[tuple] = ("nearest", "adaround")
    _NESTED: ClassVar[dict[str, type]] = {"adaround": AdaRoundConfig}

    def __post_init__(self):
        check_bits(self.bits, what="WeightQuantConfig.bits")
        _check_choice("WeightQuantConfig", "granularity", self.granularity, self.GRANULARITIES)
        _check_bool("WeightQuantConfig", "symmetric", self.symmetric)
        _check_choice("WeightQuantConfig", "range_method", self.range_method, self.RANGE_METHODS)
        _check_choice("WeightQuantConfig", "rounding", self.rounding, self.ROUNDINGS)
        ada = self.adaround
        if isinstance(ada, Mapping):
            ada = AdaRoundConfig.from_dict(ada)
            object.__setattr__(self, "adaround", ada)
        if not isinstance(ada, AdaRoundConfig):
            raise ValueError(f"WeightQuantConfig.adaround must be an AdaRoundConfig or a dict of its fields; "
                             f"got {ada!r}.")

    def to_dict(self) -> dict:
        """As for every config, except that a round-to-nearest config with default AdaRound settings leaves out
        ``rounding`` / ``adaround``: recipes written before those fields existed keep their dicts, hashes and
        caches (``from_dict`` fills the defaults back in, so the round trip stays exact)."""
        out = super().to_dict()
        if self.rounding == "nearest" and self.adaround == AdaRoundConfig():
            del out["rounding"], out["adaround"]
        return out


# ----------------------------------------------------------------------------------------------------------
# activations
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActQuantConfig(_ConfigMixin):
    """Quantization of every quantized layer's input activation (and of the head-split Q, K, V).

    ``granularity="group"`` is DGQ: per layer (and per timestep) the indices of one axis -- channels or pixels
    (token positions) -- are clustered into ``num_groups`` groups, each with its own scale / zero point.
    ``granularity="per_tensor"`` is the baseline: one scale / zero point per tensor (``num_groups`` is then
    ignored). See the module docstring for the faithful-vs-sound options.
    """

    bits: int = 8
    symmetric: bool = False
    granularity: str = "group"  # "per_tensor" | "group"
    num_groups: int = 16
    axis: str = "auto"  # "auto" | "channel" | "pixel"
    axis_rule: str = "official_spread"  # rule used when axis == "auto" (grouping.decide_axis)
    grouping: str = "kmeans"  # "kmeans" | "contiguous" | "sorted"
    group_range_includes_zero: bool = False  # official: False
    range_estimator: str = "minmax"  # "minmax" (official DGQ) | "ema" (official K = 1 baseline)
    ema_momentum: float = 0.95
    conv_input_layout: str = "tensor"  # "tensor" (sound) | "unfold" (official)
    calibration_upstream: str = "fp"  # "fp" (sound) | "per_tensor_quantized" (official)
    seed: int = 0  # K-means random_state

    GRANULARITIES: ClassVar[tuple] = ("per_tensor", "group")
    AXES: ClassVar[tuple] = ("auto", "channel", "pixel")
    # the comparative rules registered in core.grouping (a forced axis is set with ``axis=``)
    AXIS_RULES = RegisteredNames(AXIS_RULES, where=lambda rule: rule.forces is None)
    GROUPINGS = RegisteredNames(GROUPING_METHODS)
    RANGE_ESTIMATORS: ClassVar[tuple] = ("minmax", "ema")
    CONV_INPUT_LAYOUTS: ClassVar[tuple] = ("tensor", "unfold")
    CALIBRATION_UPSTREAMS: ClassVar[tuple] = ("fp", "per_tensor_quantized")

    def __post_init__(self):
        o = "ActQuantConfig"
        check_bits(self.bits, what=f"{o}.bits")
        _check_bool(o, "symmetric", self.symmetric)
        _check_choice(o, "granularity", self.granularity, self.GRANULARITIES)
        k = self.num_groups
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(
                f"{o}.num_groups must be an integer >= 1; got {self.num_groups!r}. "
                "Use 16 or 8 for DGQ, or granularity='per_tensor' for one range per tensor."
            )
        _check_choice(o, "axis", self.axis, self.AXES)
        if self.axis_rule in ("channel", "pixel"):
            raise ValueError(
                f"{o}.axis_rule={self.axis_rule!r} is a forced axis, not a rule; set axis={self.axis_rule!r} "
                f"instead and keep axis_rule one of {self.AXIS_RULES}."
            )
        _check_choice(o, "axis_rule", self.axis_rule, self.AXIS_RULES)
        _check_choice(o, "grouping", self.grouping, self.GROUPINGS)
        _check_bool(o, "group_range_includes_zero", self.group_range_includes_zero)
        _check_choice(o, "range_estimator", self.range_estimator, self.RANGE_ESTIMATORS)
        m = self.ema_momentum
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not 0.0 <= float(m) < 1.0:
            raise ValueError(f"{o}.ema_momentum must be a number in [0, 1); got {m!r}. The official value is 0.95.")
        _check_choice(o, "conv_input_layout", self.conv_input_layout, self.CONV_INPUT_LAYOUTS)
        _check_choice(o, "calibration_upstream", self.calibration_upstream, self.CALIBRATION_UPSTREAMS)
        _check_int(o, "seed", self.seed, 0)

    @property
    def effective_num_groups(self) -> int:
        """1 for per-tensor quantization, else ``num_groups``."""
        return 1 if self.granularity == "per_tensor" else int(self.num_groups)


# ----------------------------------------------------------------------------------------------------------
# attention probabilities
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionQuantConfig(_ConfigMixin):
    """Quantization of the softmax output (attention probabilities) and the ``<start>`` token handling.

    * ``quantizer="log2"`` (DGQ) or ``"uniform"`` (baseline: unsigned uniform with zero point 0 and
      scale = max / (2^b - 1)).
    * ``bits=None``: same as the activation bits (official: the softmax bit-width is A).
    * ``scale``: ``"per_prompt"`` -- max per sample (paper; excluding the FP ``<start>`` column when it is kept
      FP); ``"batch"`` -- one max over the whole batch tensor (official code); ``"static"`` -- calibrated once
      per timestep parameter set.
    * ``keep_start_fp``: column 0 of the probabilities (the BOS / ``<start>`` key) stays FP, in the attentions
      selected by ``start_in``: ``"cross"`` (official) or ``"both"`` (self-attention too, where key 0 is just the
      top-left latent pixel -- rarely meaningful, offered for the ablation).
    * ``apply_to``: which attentions get the probability quantizer (official: ``"both"``).
    * ``keep_start_key_fp``: the official code also keeps *key* token 0 of cross-attention FP (the K quantizer
      only sees tokens 1..76). ``bos_kv_fp``: MixDQ-style, BOS key and value both FP in cross-attention.
    * ``quantize_qkv``: the head-split Q, K, V get activation quantizers like any activation (official).
    * ``zero_level``: see :func:`dgq_utils.core.quantizers.fake_quant_log2`.
    """

    enabled: bool = True
    quantizer: str = "log2"  # "log2" | "uniform"
    bits: int | None = None  # None -> activation bits
    scale: str = "per_prompt"  # "per_prompt" | "batch" | "static"
    keep_start_fp: bool = True
    start_in: str = "cross"  # "cross" | "both"
    apply_to: str = "both"  # "cross" | "self" | "both"
    keep_start_key_fp: bool = True
    bos_kv_fp: bool = False
    quantize_qkv: bool = True
    zero_level: bool = True

    QUANTIZERS = RegisteredNames(PROB_QUANTIZERS)  # registered in core.quantizers
    SCALES: ClassVar[tuple] = ("per_prompt", "batch", "static")
    START_IN: ClassVar[tuple] = ("cross", "both")
    APPLY_TO: ClassVar[tuple] = ("cross", "self", "both")

    def __post_init__(self):
        o = "AttentionQuantConfig"
        _check_bool(o, "enabled", self.enabled)
        _check_choice(o, "quantizer", self.quantizer, self.QUANTIZERS)
        if self.bits is not None:
            check_bits(self.bits, what=f"{o}.bits")
        _check_choice(o, "scale", self.scale, self.SCALES)
        _check_bool(o, "keep_start_fp", self.keep_start_fp)
        _check_choice(o, "start_in", self.start_in, self.START_IN)
        _check_choice(o, "apply_to", self.apply_to, self.APPLY_TO)
        for name in ("keep_start_key_fp", "bos_kv_fp", "quantize_qkv", "zero_level"):
            _check_bool(o, name, getattr(self, name))

    def resolve_bits(self, act_bits: int | None) -> int:
        """The softmax bit-width: ``bits`` if set, else ``act_bits``."""
        if self.bits is not None:
            return int(self.bits)
        if act_bits is None:
            raise ValueError(
                "AttentionQuantConfig.bits is None (= 'same as the activations') but the recipe has no activation "
                "quantization; set attention bits explicitly, e.g. AttentionQuantConfig(bits=8)."
            )
        return int(act_bits)

    def applies_to(self, kind: str) -> bool:
        """Whether the probability quantizer is active for ``kind`` in {"self", "cross"}."""
        _check_choice(type(self).__name__, "applies_to(kind)", kind, ("self", "cross"))
        return self.enabled and self.apply_to in (kind, "both")

    def start_fp_in(self, kind: str) -> bool:
        """Whether column 0 (``<start>``) of the probabilities stays FP for ``kind`` in {"self", "cross"}."""
        _check_choice(type(self).__name__, "start_fp_in(kind)", kind, ("self", "cross"))
        return self.keep_start_fp and (kind == "cross" or self.start_in == "both")


# ----------------------------------------------------------------------------------------------------------
# the recipe
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantRecipe(_ConfigMixin):
    """A full quantization recipe of the UNet (text encoder and VAE are never quantized).

    ``weights`` / ``activations`` / ``attention`` set to ``None`` leave that part in full precision.
    ``skip_layers`` are ``fnmatch`` patterns of UNet module names kept FP (weights and input activations).
    ``per_timestep``: one activation parameter set per sampling timestep (official) or one shared set.
    ``timestep_mapping``: which parameter set a UNet call uses -- ``"exact"`` (the set calibrated on that call)
    or ``"official"`` (``(1000 - t) // (1000 // steps)``, off by one after PLMS's repeated step).
    """

    name: str = "custom"
    weights: WeightQuantConfig | None = None
    activations: ActQuantConfig | None = None
    attention: AttentionQuantConfig | None = None
    skip_layers: tuple[str, ...] = ("conv_in", "conv_out")
    per_timestep: bool = True
    timestep_mapping: str = "exact"  # "exact" | "official"

    TIMESTEP_MAPPINGS: ClassVar[tuple] = ("exact", "official")
    _NESTED: ClassVar[dict[str, type]] = {
        "weights": WeightQuantConfig,
        "activations": ActQuantConfig,
        "attention": AttentionQuantConfig,
    }

    def __post_init__(self):
        o = "QuantRecipe"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"{o}.name must be a non-empty string; got {self.name!r}.")
        for fname, cls in self._NESTED.items():
            v = getattr(self, fname)
            if isinstance(v, Mapping):  # allow QuantRecipe(weights={"bits": 4}) for convenience
                v = cls.from_dict(v)
                object.__setattr__(self, fname, v)
            if v is not None and not isinstance(v, cls):
                raise ValueError(f"{o}.{fname} must be a {cls.__name__}, a dict of its fields, or None; got {v!r}.")
        sl = self.skip_layers
        if isinstance(sl, str):
            raise ValueError(
                f"{o}.skip_layers must be a list/tuple of patterns, e.g. ('conv_in', 'conv_out'); "
                f"got the string {sl!r}."
            )
        try:
            sl = tuple(sl)
        except TypeError:
            raise ValueError(f"{o}.skip_layers must be a list/tuple of patterns; got {sl!r}.") from None
        if not all(isinstance(p, str) and p for p in sl):
            raise ValueError(f"{o}.skip_layers must contain non-empty strings (fnmatch patterns); got {sl!r}.")
        object.__setattr__(self, "skip_layers", sl)
        _check_bool(o, "per_timestep", self.per_timestep)
        _check_choice(o, "timestep_mapping", self.timestep_mapping, self.TIMESTEP_MAPPINGS)
        att = self.attention
        if att is not None and att.enabled and att.bits is None and self.activations is None:
            raise ValueError(
                "QuantRecipe: attention.bits=None means 'same as the activation bits', but activations is None. "
                "Set attention bits explicitly (e.g. attention={'bits': 8}) or add an ActQuantConfig."
            )

    @property
    def is_fp(self) -> bool:
        """True when nothing is quantized."""
        return (
            self.weights is None
            and self.activations is None
            and (self.attention is None or not self.attention.enabled)
        )

    @property
    def softmax_bits(self) -> int | None:
        """Bit-width of the softmax quantizer, or None when the softmax stays FP."""
        if self.attention is None or not self.attention.enabled:
            return None
        return self.attention.resolve_bits(self.activations.bits if self.activations is not None else None)

    @property
    def tag(self) -> str:
        """``"W8A6"``-style short label (``"FP"`` where a part is unquantized)."""
        w = f"W{self.weights.bits}" if self.weights is not None else "W32"
        a = f"A{self.activations.bits}" if self.activations is not None else "A32"
        return "FP" if self.is_fp else w + a

    def summary(self) -> str:
        """One human-readable line, for notebooks and logs."""
        parts = [f"{self.name} [{self.tag}]"]
        if self.weights is not None:
            w = self.weights
            ada = f" adaround({w.adaround.iters} it)" if w.rounding == "adaround" else ""
            parts.append(f"weights {w.bits}b {w.granularity} {w.range_method}{' sym' if w.symmetric else ''}{ada}")
        if self.activations is not None:
            a = self.activations
            if a.granularity == "per_tensor":
                parts.append(f"acts {a.bits}b per-tensor {a.range_estimator}")
            else:
                axis = a.axis if a.axis != "auto" else f"auto/{a.axis_rule}"
                parts.append(
                    f"acts {a.bits}b {a.num_groups} {a.grouping} groups, axis {axis}, conv {a.conv_input_layout}"
                )
        if self.attention is not None and self.attention.enabled:
            t = self.attention
            start = f", <start> FP in {t.start_in}" if t.keep_start_fp else ""
            parts.append(f"softmax {t.quantizer} {self.softmax_bits}b scale {t.scale}{start}")
        parts.append("per-timestep" if self.per_timestep else "shared over timesteps")
        return "; ".join(parts)


def recipe_hash(recipe: QuantRecipe, *, length: int = 12, include_name: bool = True) -> str:
    """Short stable hex hash (sha256 of the sorted-key JSON) of a recipe, for cache keys.

    ``include_name=False`` hashes the content only, so two recipes that differ only in ``name`` share a hash.
    """
    d = recipe.to_dict()
    if not include_name:
        d.pop("name", None)
    return stable_hash(d, length)
