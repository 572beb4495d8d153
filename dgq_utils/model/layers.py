"""Quantized twins of ``nn.Linear`` / ``nn.Conv2d`` and the activation quantizer they (and attention) use.

:class:`ActQuantizer`
    Fake-quantizes one activation tensor with parameters that depend on the current *parameter set* (one set per
    sampling timestep, chosen by :mod:`dgq_utils.model.timesteps` through a shared :class:`TimestepState`). A set holds
    either one ``(scale, zero_point)`` pair (per tensor) or per-index vectors laid along the chosen axis
    (DGQ's groups: every index carries its group's parameters), **pre-shaped for broadcasting** onto the input,
    e.g. ``(1, 1, C)`` channel-wise or ``(1, N, 1)`` pixel-wise for a ``(B, N, C)`` Linear input. The forward is a
    single vectorised :func:`dgq_utils.core.quantizers.fake_quant_uniform` -- no Python loop over groups, no
    allocation of parameters per call (they are created once at calibration / load time; a device move happens
    at most once, lazily, and is cached).

    Modes (``quantizer.mode``): ``"off"`` (identity), ``"observe"`` (record :class:`~dgq_utils.core.stats.TensorStats`
    of the input for the current set, return it unchanged), ``"quant"`` (fake-quantize with the current set's
    parameters). Calibration also uses ``"init"`` (per-tensor min/max init from the first batch a set sees --
    0 included -- then quantize; the official code's first pass) and ``"observe_quant"`` (record the *unquantized*
    input's statistics, then quantize with the current parameters; the official upstream-quantized pass).

:class:`QuantLinear`, :class:`QuantConv2d`
    Own the original module (kept outside the module tree, so ``dequantize`` can put the very same object back) and
    share its ``weight`` / ``bias`` Parameters, so ``unet.state_dict()`` keys and values are unchanged by
    quantization. The weight is fake-quantized **once**, at quantize (or load) time, and cached in the
    non-persistent buffer ``weight_fq`` on the CPU; on a GPU (``layer.weight_cache = "auto"``) it is recomputed in
    every forward by one fused kernel into a transient tensor instead (bit-identical; the GPU then holds no second
    copy of the weights -- at SD scale 1.6 GiB). The bias is never quantized. If you change
    the weights after quantizing, call :meth:`QuantLinear.quantize_weight` again (the cache does not track them).
    Memory: on the CPU the cache doubles the UNet's weight memory (the FP weights are kept for exact
    dequantization); on a GPU only the transient copy of one layer's weight exists at a time.

    ``layer.enabled = False`` makes the layer compute exactly like the original (FP weight, no activation
    quantizer): bit-identical outputs. Layer modes (:meth:`set_mode`) pair the activation mode with the weight
    used: ``"off"`` and ``"observe"`` use the FP weight (observing gathers statistics of the FP model),
    ``"quant"``, ``"init"`` and ``"observe_quant"`` use the fake-quantized weight (if weights are quantized).

Conv input layouts (``ActQuantConfig.conv_input_layout``; default first)
    * ``"tensor"`` (default, sound): the ``(B, C, H, W)`` input is quantized directly, per channel ``(1, C, 1, 1)``
      or per pixel ``(1, 1, H, W)``, then the original convolution runs (zero padding is added *after*
      quantization, so padded zeros stay exact zeros).
    * ``"unfold"`` (official): the input is unfolded with ``F.unfold`` to ``(B, C*kh*kw, L)``, that tensor is
      quantized (its "channel" index is a channel x kernel-offset row, its "pixel" index an output position; the
      padded zeros are quantized too), and the convolution is computed as ``W.view(O, -1) @ cols`` plus bias.
      Only square kernels / strides / paddings / dilations, ``groups=1`` and zero padding are supported (as in the
      official code); anything else raises a ``ValueError`` naming the layer at quantize time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgq_utils.core.adaround import fake_quant_rounded
from dgq_utils.core.quantizers import (
    fake_quant_uniform,
    uniform_qparams,
)
from dgq_utils.core.stats import TensorStats, axes_for
from dgq_utils.core.weight_memo import memo_weight_qparams
from dgq_utils.kernels import fake_quant as fused
from dgq_utils.model.timesteps import TimestepState

__all__ = ["LAYER_MODES", "QUANT_MODES", "ActQuantizer", "QuantConv2d", "QuantLinear"]

QUANT_MODES = ("off", "observe", "quant", "init", "observe_quant")
LAYER_MODES = QUANT_MODES
_QUANTIZING_MODES = ("quant", "init", "observe_quant")
_OBSERVING_MODES = ("observe", "observe_quant")


class ActQuantizer(nn.Module):
    """Per-timestep-set fake quantizer of one activation (see the module docstring).

    Args:
        name: for messages (the layer name plus ``.act`` or the attention name plus ``.q``/``.k``/``.v``).
        bits: activation bit-width. ``symmetric``: symmetric grid (zero point 0).
        layout: ``"linear"``, ``"conv"``, ``"unfold"`` or ``"qkv"`` -- which dims are channel / pixel
            (:func:`dgq_utils.core.stats.axes_for`).
        state: the shared :class:`TimestepState` (a private one if omitted: set 0 always).

    Parameter sets live in ``self.params[set_index] = (scale, zero_point)`` (float32, broadcast-ready) with a
    description in ``self.info[set_index]`` (``axis`` in ``tensor``/``channel``/``pixel``, ``k`` groups, ``n``
    indices, ``ids`` group id per index or ``None``, ``requested_k``).
    """

    def __init__(self, name: str, bits: int, *, symmetric: bool = False, layout: str = "linear",
                 state: TimestepState | None = None):
        super().__init__()
        if layout not in ("linear", "conv", "unfold", "qkv"):
            raise ValueError(f"unknown layout {layout!r}.")
        self.name = name
        self.bits = int(bits)
        self.symmetric = bool(symmetric)
        self.layout = layout
        self.state = state if state is not None else TimestepState()
        self.mode = "off"
        self.params: dict[int, tuple[Tensor, Tensor]] = {}
        self.info: dict[int, dict] = {}
        self.stats: dict[int, TensorStats] = {}
        self._stack: fused.ParamStack | None = None  # the sets stacked for the GPU / compiled path
        self._stack_key: tuple | None = None
        self.stats_device: torch.device | None = None  # where the observed inputs lived (calibration)
        self._observe_axes: tuple[str, ...] = ("channel", "pixel")
        self._ema_momentum = 0.95
        self._percentiles: tuple[float, ...] = ()

    def extra_repr(self) -> str:
        return f"{self.name!r}, bits={self.bits}, layout={self.layout}, mode={self.mode}, sets={len(self.params)}"

    # -- configuration ---------------------------------------------------------------------------------------
    def set_observe(self, axes=("channel", "pixel"), ema_momentum: float = 0.95, percentiles=()) -> None:
        """What ``"observe"`` records: which axes' :class:`AxisStats` (``()`` = per-tensor only), EMA momentum."""
        self._observe_axes = tuple(axes)
        self._ema_momentum = float(ema_momentum)
        self._percentiles = tuple(percentiles)

    @property
    def observe_settings(self) -> tuple:
        """What ``"observe"`` records, as set by :meth:`set_observe`: ``(axes, ema_momentum, percentiles)``."""
        return self._observe_axes, self._ema_momentum, self._percentiles

    def clear_stats(self) -> None:
        self.stats = {}

    def set_params(self, set_index: int, scale: Tensor, zero_point: Tensor, info: dict | None = None) -> None:
        """Install parameters for ``set_index`` (``scale``/``zero_point`` already shaped for broadcasting)."""
        scale = scale.detach().to(torch.float32).contiguous()
        zero_point = zero_point.detach().to(torch.float32).contiguous()
        if scale.shape != zero_point.shape:
            raise ValueError(f"{self.name}: scale {tuple(scale.shape)} and zero point {tuple(zero_point.shape)} differ.")
        self.params[int(set_index)] = (scale, zero_point)
        self.info[int(set_index)] = dict(info or {"axis": "tensor", "k": 1, "n": 1, "ids": None})
        self._stack = self._stack_key = None

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        mode = self.mode
        if mode == "off":
            return x
        if mode == "quant":
            return self._quant(x)
        if mode == "observe":
            self._observe(x)
            return x
        if mode == "init":
            if self.state.set_index not in self.params:
                self._init_per_tensor(x)
            return self._quant(x)
        if mode == "observe_quant":
            self._observe(x)
            return self._quant(x)
        raise ValueError(f"{self.name}: unknown mode {mode!r}; use one of {QUANT_MODES}.")

    def _quant(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            st = self._stack  # built by an eager call before compiling (dynamo guards on the object)
            if st is not None and st.fits(x) and not (torch.is_grad_enabled() and x.requires_grad):
                # the set is gathered on the device (no guard on the set index, so no recompile per timestep);
                # on CUDA the eager kernel as one opaque op (bit-identical to eager, short compiles), elsewhere
                # PyTorch operations that the compiler fuses into the neighbouring ops
                if fused.available(x):
                    return fused.fake_quant_stacked_op(x, st, self.state.index_tensor(x.device), self.bits,
                                                       self.symmetric)
                return fused.fake_quant_stacked_reference(x, st, self.state.index_tensor(x.device), self.bits,
                                                          self.symmetric)
            return self._quant_reference(x)
        st = self._stacked(x.device)
        usable = st is not None and st.fits(x) and not (torch.is_grad_enabled() and x.requires_grad)
        if usable and fused.available(x):
            if self.state.set_index not in self.params:
                self._missing_set(self.state.set_index)
            return fused.fake_quant_uniform_fused(x, st, self.state.index_tensor(x.device), self.bits,
                                                  symmetric=self.symmetric)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            # a CUDA graph replays for every timestep: the set must be read on the device, never baked in
            if not usable:
                raise RuntimeError(f"{self.name}: cannot be captured in a CUDA graph (input of shape "
                                   f"{tuple(x.shape)} does not fit the stacked parameter sets); run it eagerly.")
            return fused.fake_quant_stacked_reference(x, st, self.state.index_tensor(x.device), self.bits,
                                                      self.symmetric)
        return self._quant_reference(x)

    def _missing_set(self, i: int):
        raise RuntimeError(
            f"{self.name}: no quantization parameters for timestep set {i} (calibrated sets: "
            f"{sorted(self.params)}). Was the pipeline calibrated with this sampler / number of steps?"
        )

    def _stacked(self, device: torch.device) -> fused.ParamStack | None:
        """The parameter sets stacked on ``device`` (cached; rebuilt when the sets change). ``None`` when there
        are none or they cannot be stacked (then the reference path is used)."""
        params = self.params
        if not params:
            return None
        key = (id(params), len(params), device)
        if self._stack_key == key:
            return self._stack
        ndims = {s.ndim for s, _ in params.values()} - {0}  # 0-d sets are per tensor
        st = None
        if len(ndims) <= 1 and not ndims & {1}:
            if ndims:
                ch, px = axes_for(torch.empty((1,) * ndims.pop(), device="meta"), self.layout)
                px = () if px is None else ((px,) if isinstance(px, int) else tuple(px))
            else:
                ch, px = 0, ()
            try:
                st = fused.ParamStack.from_sets(params, ch, px).to(device)
            except ValueError:
                st = None
        self._stack, self._stack_key = st, key
        self.state.index_tensor(device)  # created eagerly: a compiled graph must find it
        return st

    def _quant_reference(self, x: Tensor) -> Tensor:
        i = self.state.set_index
        p = self.params.get(i)
        if p is None:
            raise RuntimeError(
                f"{self.name}: no quantization parameters for timestep set {i} (calibrated sets: "
                f"{sorted(self.params)}). Was the pipeline calibrated with this sampler / number of steps?"
            )
        scale, zp = p
        if scale.device != x.device:
            p = self.params[i] = (scale.to(x.device), zp.to(x.device))
            scale, zp = p
        try:
            return fake_quant_uniform(x, scale, zp, self.bits, symmetric=self.symmetric)
        except RuntimeError as err:
            if "size of tensor" not in str(err) and "broadcast" not in str(err):
                raise
            raise RuntimeError(
                f"{self.name}: input of shape {tuple(x.shape)} does not match the {self.info[i].get('axis')}-wise "
                f"parameters of shape {tuple(scale.shape)} calibrated for set {i}. Pixel-wise groups are tied to "
                "the calibration resolution: generate at the calibration height/width or re-calibrate."
            ) from err

    def _where(self) -> str:
        t = self.state.t
        return f"{self.name!r} (timestep index {self.state.set_index}, t={t if t is None else f'{t:g}'})"

    def prepare(self, device) -> None:
        """Build the device-side parameter stack now (calibration / loading do this once; else the first call)."""
        self._stacked(torch.device(device))

    def _observe(self, x: Tensor) -> None:
        self.stats_device = x.device
        st = self.stats.get(self.state.set_index)
        if st is None:
            st = self.stats[self.state.set_index] = TensorStats()
        st.update(x, self.layout, axes=self._observe_axes, ema_momentum=self._ema_momentum,
                  percentiles=self._percentiles, where=self._where())

    def _init_per_tensor(self, x: Tensor) -> None:
        xd = x.detach()
        lo, hi = torch.aminmax(xd.reshape(-1))
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise FloatingPointError(f"Non-finite activation at {self._where()} during the per-tensor init pass.")
        scale, zp = uniform_qparams(lo.float(), hi.float(), self.bits, symmetric=self.symmetric, include_zero=True)
        self.set_params(self.state.set_index, scale, zp,
                        {"axis": "tensor", "k": 1, "n": 1, "ids": None, "source": "init"})


def _set_layer_mode(layer, mode: str) -> None:
    if mode not in LAYER_MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {LAYER_MODES}.")
    if layer.act is not None:
        layer.act.mode = mode
    layer.mode = mode
    layer.use_quantized_weight = mode in _QUANTIZING_MODES and layer.weight_quantized


class _QuantLayerMixin:
    """Shared weight handling of :class:`QuantLinear` / :class:`QuantConv2d`."""

    def _setup(self, module: nn.Module, name: str, act: ActQuantizer | None) -> None:
        self.name = name
        self._original = (module,)  # a tuple: not registered as a submodule
        self.weight = module.weight  # the same Parameter objects: state_dict unchanged
        self.bias = module.bias
        self.act = act
        self.register_buffer("weight_fq", None, persistent=False)
        self.weight_scale: Tensor | None = None
        self.weight_zp: Tensor | None = None
        self.weight_bits: int | None = None
        self.weight_symmetric = False
        #: bool mask, weight-shaped: learned rounding (AdaRound; ``True`` = the level above ``floor(w / s)``), or
        #: ``None`` for round-to-nearest
        self.weight_round_up: Tensor | None = None
        #: an :class:`~dgq_utils.core.input_sample.InputSample` fed with this layer's raw input on every forward in
        #: an observing mode (``"observe"`` / ``"observe_quant"``) while set (calibration sets it for weight
        #: reconstruction), else ``None``
        self.capture = None
        self.mode = "off"
        #: a callable returning the weight to use instead of any other (block reconstruction's soft-rounded
        #: weight, differentiable), or ``None``
        self.soft_weight = None
        self.use_quantized_weight = False
        self.enabled = True
        #: ``"auto"`` (default): cache the fake-quantized weight on the CPU, recompute it per forward on a GPU
        #: (one fused kernel; no second copy of the weights in GPU memory); ``True`` / ``False``: always / never.
        self.weight_cache: bool | str = "auto"
        self._weight_stack = None

    @property
    def original(self) -> nn.Module:
        """The wrapped, untouched ``nn.Linear`` / ``nn.Conv2d``."""
        return self._original[0]

    @torch.no_grad()
    def quantize_weight(self, cfg=None, *, scale: Tensor | None = None, zero_point: Tensor | None = None,
                        bits: int | None = None, symmetric: bool | None = None,
                        round_up: Tensor | None = None) -> None:
        """Fake-quantize the weight once and cache it (``cfg``: a ``WeightQuantConfig``; or explicit params).

        ``round_up`` (bool, weight-shaped): learned rounding instead of round-to-nearest (AdaRound); the weight is
        then always cached, on a GPU too (the fused kernel rounds to nearest)."""
        w = self.weight.detach()
        if not bool(torch.isfinite(w).all()):
            raise FloatingPointError(f"Layer {self.name!r} has non-finite (NaN/inf) weights; cannot quantize them.")
        if scale is None:
            if cfg is None:
                raise ValueError("quantize_weight needs a WeightQuantConfig or explicit scale / zero_point.")
            bits, symmetric = cfg.bits, cfg.symmetric
            scale, zero_point = memo_weight_qparams(w, bits, granularity=cfg.granularity, symmetric=symmetric,
                                                    range_method=cfg.range_method)
        if bits is None or symmetric is None or zero_point is None:
            raise ValueError("explicit weight parameters need scale, zero_point, bits and symmetric.")
        scale = scale.to(device=w.device, dtype=torch.float32)
        zero_point = zero_point.to(device=w.device, dtype=torch.float32)
        self.weight_scale, self.weight_zp = scale, zero_point
        self.weight_bits, self.weight_symmetric = int(bits), bool(symmetric)
        if round_up is not None:
            if tuple(round_up.shape) != tuple(w.shape):
                raise ValueError(f"Layer {self.name!r}: round_up has shape {tuple(round_up.shape)}, the weight "
                                 f"{tuple(w.shape)}.")
            round_up = round_up.to(device=w.device, dtype=torch.bool)
        self.weight_round_up = round_up
        self._weight_stack = None
        cache = self.weight_cache if self.weight_cache != "auto" else (w.device.type == "cpu" or round_up is not None)
        self.weight_fq = self._fake_quant_weight() if cache else None

    @property
    def weight_quantized(self) -> bool:
        """Whether :meth:`quantize_weight` has set weight parameters (the weight may be cached or not)."""
        return self.weight_bits is not None

    @torch.no_grad()
    def _fake_quant_weight(self) -> Tensor:
        """The fake-quantized weight, computed now (bit-identical to the cached one)."""
        w = self.weight.detach()
        if self.weight_scale.device != w.device:
            self.weight_scale, self.weight_zp = self.weight_scale.to(w.device), self.weight_zp.to(w.device)
            self._weight_stack = None
        if self.weight_round_up is not None:
            up = self.weight_round_up
            if up.device != w.device:
                up = self.weight_round_up = up.to(w.device)
            return fake_quant_rounded(w, self.weight_scale, self.weight_zp, self.weight_bits, up,
                                      symmetric=self.weight_symmetric)
        if torch.compiler.is_compiling() and fused.available(w) and self._weight_stack is not None:
            st = self._weight_stack  # built by an eager call: the kernel as one opaque op, as for activations
            return fused.fake_quant_stacked_op(w, st[0], st[1], self.weight_bits, self.weight_symmetric)
        if not torch.compiler.is_compiling() and fused.available(w):
            st = self._weight_stack
            if st is None:
                st = self._weight_stack = (
                    fused.ParamStack.from_sets({0: (self.weight_scale, self.weight_zp)}, 0, ()),
                    torch.zeros((), dtype=torch.int32, device=w.device))
            return fused.fake_quant_uniform_fused(w, st[0], st[1], self.weight_bits,
                                                  symmetric=self.weight_symmetric)
        return fake_quant_uniform(w, self.weight_scale, self.weight_zp, self.weight_bits,
                                  symmetric=self.weight_symmetric).to(w.dtype)

    def set_mode(self, mode: str) -> None:
        """Activation mode plus which weight is used (see the module docstring)."""
        _set_layer_mode(self, mode)

    def _weight(self) -> Tensor:
        if self.soft_weight is not None:
            return self.soft_weight()
        if not self.use_quantized_weight:
            return self.weight
        if self.weight_fq is not None:
            return self.weight_fq
        return self._fake_quant_weight()  # transient: freed after the layer's forward


class QuantLinear(_QuantLayerMixin, nn.Module):
    """``nn.Linear`` with a cached fake-quantized weight and an input :class:`ActQuantizer` (both optional)."""

    def __init__(self, linear: nn.Linear, name: str, act: ActQuantizer | None = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear wraps nn.Linear; {name} is {type(linear).__name__}.")
        self._setup(linear, name, act)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def extra_repr(self) -> str:
        return f"{self.name!r}, in={self.in_features}, out={self.out_features}, w_bits={self.weight_bits}"

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        if self.capture is not None and self.mode in _OBSERVING_MODES:
            self.capture.add(x)
        if self.act is not None:
            x = self.act(x)
        return F.linear(x, self._weight(), self.bias)


class QuantConv2d(_QuantLayerMixin, nn.Module):
    """``nn.Conv2d`` with a cached fake-quantized weight and an input :class:`ActQuantizer` (both optional).

    ``layout="tensor"`` quantizes the conv input as is; ``layout="unfold"`` quantizes the im2col matrix and
    computes the convolution as a matmul (official; see the module docstring for the restrictions).
    """

    def __init__(self, conv: nn.Conv2d, name: str, act: ActQuantizer | None = None, layout: str = "tensor"):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"QuantConv2d wraps nn.Conv2d; {name} is {type(conv).__name__}.")
        if layout not in ("tensor", "unfold"):
            raise ValueError(f"conv layout must be 'tensor' or 'unfold'; got {layout!r}.")
        if layout == "unfold":
            check_unfoldable(conv, name)
        self._setup(conv, name, act)
        self.layout = layout
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode"):
            setattr(self, attr, getattr(conv, attr))

    def extra_repr(self) -> str:
        return (f"{self.name!r}, {self.in_channels}->{self.out_channels}, k={self.kernel_size}, "
                f"layout={self.layout}, w_bits={self.weight_bits}")

    def forward(self, x: Tensor) -> Tensor:
        conv = self._original[0]
        if not self.enabled:
            return conv._conv_forward(x, self.weight, self.bias)
        if self.capture is not None and self.mode in _OBSERVING_MODES:
            self.capture.add(x)
        act = self.act
        if self.layout == "unfold" and act is not None and act.mode != "off":
            if act.mode == "observe":  # statistics of the unfolded input, FP convolution for the output
                act(self._unfold(x))
                return conv._conv_forward(x, self._weight(), self.bias)
            return self._unfolded_conv(act(self._unfold(x)), x.shape)
        if act is not None:
            x = act(x)
        return conv._conv_forward(x, self._weight(), self.bias)

    def _unfold(self, x: Tensor) -> Tensor:
        return F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)

    def _unfolded_conv(self, cols: Tensor, in_shape) -> Tensor:
        b, _, h, w = in_shape
        k, s, p, d = self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0]
        h_out = (h + 2 * p - d * (k - 1) - 1) // s + 1
        w_out = (w + 2 * p - d * (k - 1) - 1) // s + 1
        weight = self._weight()
        out = torch.matmul(weight.reshape(weight.shape[0], -1), cols)  # (B, O, L)
        out = out.reshape(b, weight.shape[0], h_out, w_out)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1)
        return out


def check_unfoldable(conv: nn.Conv2d, name: str) -> None:
    """Raise ``ValueError`` unless ``conv`` fits the official unfold path (square, groups=1, zero padding)."""
    problems = []
    if isinstance(conv.padding, str):
        problems.append(f"padding={conv.padding!r} (string padding)")
    for attr in ("kernel_size", "stride", "padding", "dilation"):
        v = getattr(conv, attr)
        if not isinstance(v, str) and len(set(v)) != 1:
            problems.append(f"non-square {attr}={tuple(v)}")
    if conv.groups != 1:
        problems.append(f"groups={conv.groups}")
    if conv.padding_mode != "zeros":
        problems.append(f"padding_mode={conv.padding_mode!r}")
    if problems:
        raise ValueError(
            f"conv_input_layout='unfold' cannot handle layer {name!r}: {', '.join(problems)}. The official unfold "
            "path supports only square kernels/strides/paddings/dilations, groups=1 and zero padding; use "
            "conv_input_layout='tensor' or add the layer to skip_layers."
        )


def weight_bits_per_param(layer) -> float:
    """Bits per weight parameter of a quantized layer (32 if its weight is FP)."""
    return float(layer.weight_bits) if layer.weight_quantized else 32.0

