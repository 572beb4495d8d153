"""Attention-aware quantization: a diffusers attention processor that quantizes Q, K, V and the softmax output.

:class:`DGQAttnProcessor` is installed on the UNet's ``Attention`` modules with ``unet.set_attn_processor`` (the
original processors are kept and restored by ``dequantize_pipeline``). It recomputes diffusers' attention
explicitly -- ``softmax(Q K^T * scale) V`` with the softmax in float32 -- because the probabilities must be
materialised to be quantized (PyTorch's fused ``scaled_dot_product_attention`` never exposes them). With every
quantizer off it matches diffusers' default processor to ~1e-6 (tested). ``processor.enabled = False`` hands
the call to the original processor, i.e. bit-identical FP.

Self- vs cross-attention: decided at install time from ``attn.is_cross_attention`` (``attn1`` is self-attention,
``attn2`` cross-attention over the 77 text tokens, whose key 0 is ``<start>``/BOS).

What gets quantized (each part optional; see ``config.AttentionQuantConfig``)
----------------------------------------------------------------------------
* **Q, K, V** (``quantize_qkv``, official: on): head-split ``(B, heads, N, d)`` tensors, each with an
  :class:`~dgq_utils.model.layers.ActQuantizer` (layout ``"qkv"``): "channel" = head-dim index ``d`` pooled across heads
  (official), "pixel" = token position ``N``. The ``1/sqrt(d)`` scale is applied in FP (reference path: to
  ``Q K^T`` as the official code does; inference path: to the quantized ``Q`` before the product -- the same up to
  float rounding).
* **Key token 0 FP** (``keep_start_key_fp``, official: on): in the attentions where ``<start>`` is handled, key
  token 0 bypasses the K quantizer (which then sees -- and groups -- tokens 1..N-1 only).
  ``bos_kv_fp`` (MixDQ): key *and value* of token 0 stay FP in cross-attention.
* **Probabilities** (``apply_to``: cross / self / both): after the FP32 softmax, quantized with
  ``"log2"`` (DGQ: ``scale * 2^-e``) or ``"uniform"`` (baseline: zero point 0, step ``max / (2^b - 1)``) at
  ``bits`` (default: the activation bits), with the scale ("max") chosen by ``scale``:

  - ``"per_prompt"`` (default, the paper's "prompt-specific" scale): max over one sample's probabilities
    (all heads, queries, keys), shape ``(B, 1, 1, 1)``, so a prompt's output never depends on the other prompts
    in the batch (nor on its CFG partner);
  - ``"batch"`` (official code): one max over the whole tensor (all prompts, both CFG halves, all heads);
  - ``"static"``: one max per timestep set, calibrated (max over all calibration calls of that set; with the
    official upstream-quantized calibration, from the first calibration batch only, as the official baseline).

  ``keep_start_fp`` (official: on, in ``start_in="cross"`` attentions): column 0 (``<start>``) is excluded from
  the max and passed through **bit-exactly** in FP; the remaining columns are quantized. Nothing renormalises
  the rows afterwards (official).

Record hook: ``processor.record = fn`` calls ``fn(processor, probs, query, key, value)`` on every call with the
float32 probabilities (before any probability quantizer) and the head-split Q/K/V (after their quantizers), and
makes the processor take the reference path (the one that materialises them); :class:`dgq_utils.calibrate.trace.
Trace` uses it for the notebooks' attention captures and the embedded world's phenomena check.

Statistics mode: ``processor.record_attention = True`` folds every call's probabilities into
:class:`~dgq_utils.core.stats.AttentionStats` per timestep set (mass on key 0 per head, maxima, log2 histograms);
``collect_activation_stats`` uses it for notebook 03.

Speed (inference, no autograd): the probabilities are computed into a reused float32 workspace (allocating a
fresh multi-megabyte tensor per call costs more than the arithmetic on CPU) -- ``Q K^T`` with ``out=``, the softmax
in place (the same ATen kernel as ``Tensor.softmax``, checked once at first use; a manual in-place softmax
otherwise) -- and quantized in place; the quantizer's last multiplication (by the scale or step) and the FP ``<start>`` column
are folded into ``P V`` (``out = scale * (levels @ V) + p_0 v_0``), saving a pass over the largest tensor. The
in-place **log2** quantizer computes ``2^round(log2 r)`` with two integer
operations on the float32 bits (``r = p / scale``; adding ``0x800000 - 0x3504F4`` to the bits carries into the
exponent exactly when the mantissa is ``>= sqrt(2)``, then masking the mantissa leaves the power of two): this is
the *exact* round-to-nearest in the log domain. It equals :func:`dgq_utils.core.quantizers.fake_quant_log2` except where
float32 ``torch.log2`` itself rounds across a threshold (values within about one ulp of ``scale * 2^-(k+1/2)``,
a few per million, which then land on the neighbouring level) and, at 8 bits, for results below ``2^-126 * scale``
(float32 subnormals). With autograd active the reference path (``quantizers.fake_quant_log2`` /
``fake_quant_uniform``, straight-through gradients) is used instead. The workspace is shared by all processors
(one buffer per device, the size of the largest probability tensor seen; :func:`release_workspace` frees it;
not thread-safe).

Fused path (CUDA): with Triton installed, inference calls whose probability quantizer quantizes (``"quant"``,
``"observe_quant"``, ``"init"``) go to :func:`dgq_utils.kernels.quant_attention` (two Triton passes, no
``Nq x Nk`` tensor: row statistics give the per-prompt / batch scale, the second pass quantizes ``P`` in registers
and multiplies by ``V``); calls without an active probability quantizer, or observing only, go to
``torch.nn.functional.scaled_dot_product_attention``. The calibration modes take the max they record (observed
max, static scale) from the row statistics: equal to the materialised max up to float rounding (~1e-6 relative). It agrees with the
reference below within the tolerance stated in :mod:`dgq_utils.kernels.quant_attention` (a ~1e-5 fraction of
levels may flip at a level boundary; fp16/bf16 rounding of the output). Everything the kernel does not cover
(autograd, recording attention statistics, masks, ...) and every CPU call take the reference; ``backend="reference"``
or ``DGQ_ATTENTION_BACKEND=reference`` forces it. The rest of this docstring describes the reference.

Memory (reference path): the probabilities are materialised, ``B * heads * Nq * Nk`` float32 values (SD v1.4 at 512 px,
self-attention at 64x64: 0.5 GiB per sample and head group of 8). For the per-sample scales (``per_prompt``,
``static``, or no probability quantizer) the batch is processed in chunks of at most
``max_prob_elements`` probabilities (default 2^28 = 1 GiB); the ``"batch"`` scale needs the whole batch at once.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import Tensor, nn

from dgq_utils.core.quantizers import PROB_QUANTIZERS
from dgq_utils.core.stats import AttentionStats
from dgq_utils.kernels import ProbQuantSpec, quant_attention, row_statistics, unsupported_reason
from dgq_utils.model.timesteps import TimestepState

__all__ = ["DGQAttnProcessor", "ProbQuantizer", "release_workspace", "attention_prologue", "attention_epilogue",
           "BACKEND_ENV", "BACKENDS"]

logger = logging.getLogger(__name__)
#: Environment variable that overrides every processor's ``backend`` (e.g. ``DGQ_ATTENTION_BACKEND=reference`` to
#: debug the fused kernel against the materialising path).
BACKEND_ENV = "DGQ_ATTENTION_BACKEND"
BACKENDS = ("auto", "reference", "fused")
_LOGGED_FALLBACKS: set[tuple[str, str]] = set()  # (processor name, reason) already logged

_WORKSPACE: dict[torch.device, Tensor] = {}
_INPLACE_SOFTMAX_OK: dict[str, bool] = {}  # device type -> the in-place ATen softmax was checked and is exact


def _workspace(numel: int, device: torch.device) -> Tensor:
    """A float32 buffer of at least ``numel`` elements on ``device`` (reused across calls and processors)."""
    buf = _WORKSPACE.get(device)
    if buf is None or buf.numel() < numel:
        _WORKSPACE.pop(device, None)
        buf = _WORKSPACE[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return buf[:numel]


def release_workspace() -> None:
    """Free the shared attention-probability workspace (it is re-created on the next call)."""
    _WORKSPACE.clear()


def attention_prologue(attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None, temb: Tensor | None = None):
    """The part of diffusers' ``Attention`` forward before Q/K/V: spatial norm, ``(B, C, H, W)`` -> tokens,
    group norm, and the context the keys/values read (the normed hidden states for self-attention, the
    ``norm_cross``-normed encoder states for cross-attention).

    Returns ``(residual, hidden_states (B, N, C), context, spatial)`` with ``spatial = (C, H, W)`` for 4-D inputs
    (else ``None``); :func:`attention_epilogue` undoes it. Shared by every explicit-softmax processor here.
    """
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    spatial = None
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        spatial = (c, h, w)
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if encoder_hidden_states is None:
        context = hidden_states
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(encoder_hidden_states)
    else:
        context = encoder_hidden_states
    return residual, hidden_states, context, spatial


def attention_epilogue(attn, out: Tensor, residual: Tensor, spatial: tuple[int, int, int] | None) -> Tensor:
    """Output projection, back to ``(B, C, H, W)`` when the input was spatial, residual, rescale."""
    out = attn.to_out[1](attn.to_out[0](out))
    if spatial is not None:
        out = out.transpose(-1, -2).reshape(out.shape[0], *spatial)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _inplace_softmax_ok(device: torch.device) -> bool:
    """Whether ATen's ``_softmax.out`` with ``out`` aliasing the input is exact on ``device``'s type (checked once
    per device type, on that device: each backend has its own kernels; CUDA's differ for short and long rows)."""
    ok = _INPLACE_SOFTMAX_OK.get(device.type)
    if ok is None:
        g = torch.Generator().manual_seed(0)
        shapes = [(3, 5, 37)] if device.type == "cpu" else [(3, 5, 37), (2, 3, 4133)]
        try:
            ok = True
            for shape in shapes:
                probe = torch.randn(*shape, generator=g).to(device)
                expected = probe.softmax(dim=-1)
                torch.ops.aten._softmax.out(probe, -1, False, out=probe)
                ok = ok and bool(torch.equal(probe, expected))
        except Exception:  # noqa: BLE001 - any failure means: use the manual version
            ok = False
        _INPLACE_SOFTMAX_OK[device.type] = ok
    return ok


def _softmax_inplace(s: Tensor) -> Tensor:
    """Softmax over the last dim of ``s``, written into ``s``."""
    if _inplace_softmax_ok(s.device):
        return torch.ops.aten._softmax.out(s, -1, False, out=s)
    m = s.amax(dim=-1, keepdim=True)
    s.sub_(m).exp_()
    return s.div_(s.sum(dim=-1, keepdim=True))


class ProbQuantizer(nn.Module):
    """Quantizer of the softmax output ``(B, heads, Nq, Nk)`` (float32 in, float32 out).

    Modes as :class:`~dgq_utils.model.layers.ActQuantizer`: ``"off"``, ``"observe"`` (record the max per set, for the
    static scale), ``"quant"``, ``"init"`` (static scale from the first batch of a set, then quantize),
    ``"observe_quant"``. The per-prompt and batch scales need no calibration.
    """

    def __init__(self, name: str, bits: int, *, quantizer: str = "log2", scale: str = "per_prompt",
                 keep_start: bool = False, zero_level: bool = True, state: TimestepState | None = None):
        super().__init__()
        self.impl = PROB_QUANTIZERS.lookup(quantizer)  # how: the registered reference and in-place kernels
        if scale not in ("per_prompt", "batch", "static"):
            raise ValueError(f"probability scale must be 'per_prompt', 'batch' or 'static'; got {scale!r}.")
        self.name = name
        self.bits = int(bits)
        self.quantizer = quantizer
        self.scale_mode = scale
        self.keep_start = bool(keep_start)
        self.zero_level = bool(zero_level)
        self.state = state if state is not None else TimestepState()
        self.mode = "off"
        self.static: dict[int, Tensor] = {}  # set -> 0-d max
        self._static_stack: Tensor | None = None  # (S,) for compiled graphs
        self._static_key: tuple | None = None
        self.observed_max: dict[int, Tensor] = {}  # set -> running 0-d max (static scale calibration)

    def extra_repr(self) -> str:
        return (f"{self.name!r}, {self.quantizer}, bits={self.bits}, scale={self.scale_mode}, "
                f"keep_start={self.keep_start}, mode={self.mode}")

    def _rest(self, p: Tensor) -> Tensor:
        return p[..., 1:] if self.keep_start and p.shape[-1] > 1 else p

    def forward(self, p: Tensor) -> Tensor:
        mode = self.mode
        if mode == "off":
            return p
        if self.needs_max():
            self.note_max(self._rest(p).amax())
        if mode == "observe":
            return p
        return self.quantize(p)

    def needs_max(self) -> bool:
        """Whether this call's mode records the max of the probabilities (``<start>`` column excluded where it
        is kept FP), which only a static scale uses: ``observe`` / ``observe_quant``, and ``init`` for a static
        scale not yet set. (Per-prompt and batch scales record nothing: no row statistics, no sync.)"""
        if self.scale_mode != "static":
            return False
        mode = self.mode
        return mode in ("observe", "observe_quant") or (mode == "init" and self.state.set_index not in self.static)

    def note_max(self, m: Tensor) -> None:
        """Record the 0-d max ``m`` as the mode asks (see :meth:`needs_max`); the fused attention passes the max
        of its row statistics here instead of materialising the probabilities. The running max per set stays a
        float32 0-d tensor on ``m``'s device (no host sync per call; calibration reads them all at the end)."""
        if not self.needs_max():
            return
        i = self.state.set_index
        m = m.detach().float()
        if self.mode in ("observe", "observe_quant"):
            old = self.observed_max.get(i)
            self.observed_max[i] = m.clamp_min(0.0) if old is None else torch.maximum(old, m)
        else:
            self.static[i] = m

    def max_of(self, p: Tensor) -> Tensor:
        """The scale (maximum) the quantizer uses for ``p`` under the current mode and set."""
        if self.scale_mode == "per_prompt":
            return self._rest(p).amax(dim=(1, 2, 3), keepdim=True)
        if self.scale_mode == "batch":
            return self._rest(p).amax()
        return self.static_max(p.device)

    def static_max(self, device: torch.device) -> Tensor:
        """The calibrated 0-d maximum of the current timestep set, on ``device`` (moved there once).

        Under ``torch.compile`` and CUDA-graph capture the maxima of all sets are one ``(S,)`` tensor (stacked by an
        eager call) gathered with the state's device set index, so the graph does not specialise on the set (no
        recompiles; a captured graph replays correctly for every timestep)."""
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if torch.compiler.is_compiling() or capturing:  # a graph serves every set: gather by the device index
            stack = self._static_stack
            if stack is not None and stack.device == device:
                return stack.index_select(0, self.state.index_tensor(device).reshape(1).long()).reshape(())
            if capturing:
                raise RuntimeError(f"{self.name}: the static softmax scales are not stacked on {device} (run one "
                                   "eager call before capturing a CUDA graph).")
        else:
            key = (id(self.static), len(self.static), device)
            if self._static_key != key and self.static and sorted(self.static) == list(range(len(self.static))):
                self._static_stack = torch.stack([self.static[j].reshape(()).float().to(device)
                                                  for j in range(len(self.static))])
                self._static_key = key
                self.state.index_tensor(device)
        i = self.state.set_index
        m = self.static.get(i)
        if m is None:
            raise RuntimeError(f"{self.name}: no static softmax scale for timestep set {i} (calibrated: "
                               f"{sorted(self.static)}).")
        if m.device != device:
            m = self.static[i] = m.to(device)
        return m

    def kernel_spec(self) -> ProbQuantSpec:
        """This quantizer as the fused kernel's :class:`~dgq_utils.kernels.ProbQuantSpec`."""
        return ProbQuantSpec(self.quantizer, self.bits, self.scale_mode, self.keep_start, self.zero_level)

    def forward_(self, p: Tensor) -> Tensor:
        """In-place version of :meth:`forward` for inference (``p`` is overwritten and returned)."""
        mode = self.mode
        if mode == "quant":
            return self.quantize_(p)
        if mode == "off":
            return p
        if mode == "observe":
            return self.forward(p)
        out = self.forward(p)
        p.copy_(out)
        return p

    def quantize_(self, p: Tensor) -> Tensor:
        """Quantize ``p`` (float32, contiguous) in place; the fast path of :meth:`quantize`."""
        y, mult, start = self.quantize_unscaled_(p)
        y.mul_(mult)
        if start is not None:
            y[..., :1] = start  # <start> column passes through bit-exactly
        return y

    def quantize_unscaled_(self, p: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """In place: ``p`` becomes the quantized levels *before* the final multiplication, i.e. ``2^-e`` (log2)
        or the integer codes (uniform), with column 0 set to 0 when it is kept FP.

        Returns ``(levels, multiplier, start)``: the quantized probabilities are ``levels * multiplier`` with
        column 0 replaced by ``start`` (the FP column, or ``None``). The attention folds ``multiplier`` and the
        start column into ``P V`` instead of materialising the product (one pass fewer over the big tensor).
        """
        m = self.max_of(p)
        start = p[..., :1].clone() if self.keep_start and p.shape[-1] > 1 else None
        # a static max can be exceeded; dynamic maxima give r <= 1 already (column 0 is overwritten)
        mult = self.impl.levels_(p, m, self.bits, zero_level=self.zero_level, clamp_max=self.scale_mode == "static")
        if start is not None:
            p[..., :1] = 0.0
        return p, mult, start

    def quantize(self, p: Tensor) -> Tensor:
        """Reference (allocating, autograd-friendly) quantization with :mod:`dgq_utils.core.quantizers`."""
        m = self.max_of(p)
        out = self.impl.fake_quant(p, m, self.bits, zero_level=self.zero_level)
        if self.keep_start:
            out[..., :1] = p[..., :1]  # <start> column passes through bit-exactly
        return out


class DGQAttnProcessor(nn.Module):
    """Attention processor with optional Q/K/V and probability quantization (see the module docstring).

    Args:
        name: the ``Attention`` module's name in the UNet. kind: ``"self"`` or ``"cross"``.
        original: the processor it replaces (used when ``enabled`` is False, and restored on dequantize).
        state: the shared :class:`TimestepState`.
        q_quant, k_quant, v_quant: :class:`~dgq_utils.model.layers.ActQuantizer` (layout ``"qkv"``) or ``None``.
        prob_quant: :class:`ProbQuantizer` or ``None``.
        key_start_fp: key token 0 bypasses ``k_quant``. value_start_fp: value token 0 bypasses ``v_quant``.
        backend: ``"auto"`` (default) -- on CUDA with Triton, inference calls take the fused path, which never
            materialises the probabilities: :func:`dgq_utils.kernels.quant_attention` when the probability
            quantizer is in ``"quant"``, ``"observe_quant"`` or ``"init"`` mode, PyTorch's
            ``scaled_dot_product_attention`` when it is absent, off or ``"observe"`` (the calibration modes read
            the max of P from the kernel's row statistics). Everything else (CPU, autograd, recording attention
            statistics, attention masks, head dims > 256, ...) takes the reference below, and on CUDA the reason
            is logged once per processor. ``"reference"``: always the reference. ``"fused"``: the fused path
            wherever the kernel can run, also on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``;
            tests). The environment variable ``DGQ_ATTENTION_BACKEND`` (``auto`` / ``reference`` / ``fused``)
            overrides it. ``last_path`` records which path the last call took (``"fused"``, ``"sdpa"`` or
            ``"reference"``).
    """

    def __init__(self, name: str, kind: str, original, *, state: TimestepState | None = None,
                 q_quant=None, k_quant=None, v_quant=None, prob_quant: ProbQuantizer | None = None,
                 key_start_fp: bool = False, value_start_fp: bool = False, max_prob_elements: int = 2**28,
                 backend: str = "auto"):
        super().__init__()
        if kind not in ("self", "cross"):
            raise ValueError(f"kind must be 'self' or 'cross'; got {kind!r}.")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
        self.backend = backend
        self.last_path: str | None = None
        self.name = name
        self.kind = kind
        self._original = (original,)  # tuple: never registered as a submodule
        self.state = state if state is not None else TimestepState()
        self.q_quant, self.k_quant, self.v_quant = q_quant, k_quant, v_quant
        self.prob_quant = prob_quant
        self.key_start_fp = bool(key_start_fp)
        self.value_start_fp = bool(value_start_fp)
        self.max_prob_elements = int(max_prob_elements)
        self.enabled = True
        self.record_attention = False
        self.attention_stats: dict[int, AttentionStats] = {}
        #: record hook ``record(processor, probs, query, key, value)`` (or ``None``): called on every call with
        #: the float32 probabilities and the head-split Q/K/V of the reference path; while it is set, the
        #: reference (materialising) path runs, so what is recorded is what the reference computes
        self.record = None

    @property
    def original(self):
        return self._original[0]

    def extra_repr(self) -> str:
        return f"{self.name!r}, kind={self.kind}, key_start_fp={self.key_start_fp}, value_start_fp={self.value_start_fp}"

    def quantizers(self) -> dict[str, nn.Module]:
        """The present quantizers by role (``q``, ``k``, ``v``, ``prob``)."""
        out = {"q": self.q_quant, "k": self.k_quant, "v": self.v_quant, "prob": self.prob_quant}
        return {k: v for k, v in out.items() if v is not None}

    def set_mode(self, mode: str) -> None:
        for qz in self.quantizers().values():
            qz.mode = mode

    # -- the attention ---------------------------------------------------------------------------------------
    @staticmethod
    def _quant_tokens(quant, x: Tensor, keep_first: bool) -> Tensor:
        """Quantize ``x`` (B, h, N, d) with ``quant``; token 0 bypasses it if ``keep_first``."""
        if quant is None or quant.mode == "off":
            return x
        if keep_first and x.shape[2] > 1:
            return torch.cat([x[:, :, :1], quant(x[:, :, 1:])], dim=2)
        return quant(x)

    def forward(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        if not self.enabled:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual, hidden_states, context, spatial = attention_prologue(
            attn, hidden_states, encoder_hidden_states, temb)
        batch_size, sequence_length = context.shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # (B, h, Nq, d)
        key = key.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # (B, h, Nk, d)
        value = value.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        query = self._quant_tokens(self.q_quant, query, False)
        key = self._quant_tokens(self.k_quant, key, self.key_start_fp)
        value = self._quant_tokens(self.v_quant, value, self.value_start_fp)

        hidden_states = self._attend(attn, query, key, value, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        return attention_epilogue(attn, hidden_states, residual, spatial)

    def fused_unavailable(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> str | None:
        """``None`` if this call can take the fused path, else why not (see ``backend`` in the class doc)."""
        backend = os.environ.get(BACKEND_ENV) or self.backend
        if backend not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}; got {backend!r}.")
        if backend == "reference":
            return "backend 'reference' asked for"
        if backend == "auto" and query.device.type != "cuda":
            return "not on CUDA"
        if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
            return "autograd is active"
        if self.record_attention:
            return "recording attention statistics"
        if self.record is not None:
            return "record hook set"
        pq = self.prob_quant
        if pq is not None and pq.mode not in ("off", "quant", "observe", "observe_quant", "init"):
            return f"probability quantizer in mode {pq.mode!r}"
        return unsupported_reason(query, key, value, mask)

    def _attend(self, attn, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        reason = self.fused_unavailable(query, key, value, mask)
        if reason is None:
            return self._attend_fused(attn, query, key, value)
        self.last_path = "reference"
        if reason != "not on CUDA" and (self.name, reason) not in _LOGGED_FALLBACKS:
            _LOGGED_FALLBACKS.add((self.name, reason))
            logger.info("%s: reference attention (materialised probabilities): %s.", self.name, reason)
        b, h, nq, _ = query.shape
        nk = key.shape[2]
        pq = self.prob_quant
        whole_batch = pq is not None and pq.mode != "off" and pq.scale_mode == "batch"
        per_sample = h * nq * nk
        chunk = b if whole_batch else max(1, min(b, self.max_prob_elements // max(per_sample, 1)))
        if chunk >= b:
            return self._attend_chunk(attn, query, key, value, mask)
        outs = []
        for s in range(0, b, chunk):
            m = None if mask is None else mask[s : s + chunk] if mask.shape[0] == b else mask
            outs.append(self._attend_chunk(attn, query[s : s + chunk], key[s : s + chunk],
                                           value[s : s + chunk], m))
        return torch.cat(outs, dim=0)

    def _attend_fused(self, attn, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        pq = self.prob_quant
        if pq is None or pq.mode == "off":
            # unquantized softmax: PyTorch's fused attention (float32 softmax inside, like the reference)
            self.last_path = "sdpa"
            return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        spec = pq.kernel_spec()
        stats = None
        if pq.needs_max():  # calibration modes: the max of P from the row statistics, no N x N tensor
            stats = row_statistics(query, key, attn.scale, spec.keep_start)
            pq.note_max(stats[2].amax())
        if pq.mode == "observe":  # the probabilities pass unquantized
            self.last_path = "sdpa"
            return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        self.last_path = "fused"
        static = pq.static_max(query.device) if spec.scale == "static" else None
        return quant_attention(query, key, value, attn.scale, spec, static, row_stats=stats)

    def _attend_chunk(self, attn, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        if self.record is not None or (
                torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
            return self._attend_chunk_reference(attn, query, key, value, mask)
        b, h, nq, _ = query.shape
        nk = key.shape[2]
        shape = (b, h, nq, nk)
        probs = _workspace(b * h * nq * nk, query.device).view(shape)
        torch.matmul(query.float() * attn.scale, key.float().transpose(-1, -2), out=probs)
        if mask is not None:
            probs.add_(mask.float())
        _softmax_inplace(probs)
        if self.record_attention:
            self._record(probs)
        pq = self.prob_quant
        if pq is not None and pq.mode == "quant":
            levels, mult, start = pq.quantize_unscaled_(probs)
            out = torch.matmul(levels.to(value.dtype), value).mul_(mult.to(value.dtype))
            if start is not None:  # the FP <start> column's contribution p_0 * v_0
                out.add_(start.to(value.dtype) * value[:, :, :1])
            return out
        if pq is not None:
            probs = pq.forward_(probs)
        return torch.matmul(probs.to(value.dtype), value)

    def _attend_chunk_reference(self, attn, query, key, value, mask) -> Tensor:
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
        if mask is not None:
            scores = scores + mask.float()
        probs = scores.softmax(dim=-1)
        del scores
        if self.record is not None:
            self.record(self, probs, query, key, value)
        if self.record_attention:
            self._record(probs)
        if self.prob_quant is not None:
            probs = self.prob_quant(probs)
        return torch.matmul(probs.to(value.dtype), value)

    def _record(self, probs: Tensor) -> None:
        st = self.attention_stats.get(self.state.set_index)
        if st is None:
            st = self.attention_stats[self.state.set_index] = AttentionStats()
        st.update(probs)
