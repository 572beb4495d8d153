"""Fused attention with a quantized softmax: ``quant_attention(q, k, v, softmax_scale, spec)``.

Computes what :class:`dgq_utils.model.attention.DGQAttnProcessor` computes after Q/K/V quantization --
``Q(softmax(Q K^T * scale)) V`` with the probability quantizer described by a :class:`ProbQuantSpec` -- without
an ``Nq x Nk`` tensor in memory (two Triton launches; see :mod:`dgq_utils.kernels.triton_attention`):

1. row statistics: per (sample, head, query) the max logit ``m``, the normaliser ``l`` and the largest probability
   excluding ``<start>`` (key 0) when it is kept FP, ``pmax = exp(max_excl - m) / l``;
2. the quantizer's scale from those rows (:func:`prob_multiplier`, plain torch, no host sync): ``per_prompt`` -- the
   max over one sample's heads and queries (each CFG half is its own sample, as in the reference);
   ``batch`` -- the max over the whole call; ``static`` -- the calibrated value. Uniform: the step
   ``max(scale / (2^b - 1), SCALE_FLOOR)``;
3. the blockwise recomputation of ``P``, quantized in registers, times ``V`` with float32 accumulation.

Numerics against the materialising reference (the same grid, rounding, zero level, clamping and FP ``<start>``
column; what differs is only floating-point order): the logits come from a tensor-core product of the input
dtype with float32 accumulation (float32 inputs: 3xTF32 products, about float32 accuracy), ``exp`` is computed as ``exp2``
of base-2 logits, and ``p / scale`` as ``exp2(t - m) / (l * scale)``. These differ from the reference's
float32 probabilities by a few ulps to ~1e-6 relative, so a probability lying that close to a log2 level boundary
(``scale * 2^-(k + 1/2)``) or a uniform half-step can land on the neighbouring level. Measured on an H200 at SD v1.5 shapes
(``tests/test_kernels_attention.py``, which states its tolerances; ``benchmarks/results/attention_h200_gpu_tests_*``):
at most 1.5e-5 of the levels per case in fp16/bf16 (mean 8e-7), 3e-5 in float32. A flipped *large* probability
moves its whole output row, so the output's relative L2 distance to the reference reaches ~1e-3 (fp16) to 5e-3
(float32, whose 3xTF32 logits flip more often than exact fp16 products); against the kernel's own levels the output
is exact to the dtype's rounding. The kernel's output is float32 until the final store; the reference rounds
``levels @ V``, the multiplication by the scale and the ``<start>`` term to the input dtype separately, so in
fp16/bf16 the two differ by about that dtype's rounding (2e-4 to 7e-4 rel L2 for the processor in fp16).

Speed (``benchmarks/results/attention_h200.md``, H200, batch 16, fp16): the SD v1.5 UNet's 32 attention calls
per step take 37 ms through the fused processor, 227 ms through the reference, 15 ms through plain fp16 SDPA;
the 4096-token self-attention dominates (3.9 ms vs SDPA's 1.1 ms: two passes over K, an exp2 per logit in each,
head dim 40 padded to 64). With the head dim a compile-time constant (16-byte, pipelined K/V loads) the 32 calls
take 25.5 ms against 27.4 (the 77-key calls 2x faster, the 4096-token ones unchanged: they are bound by pass 2's
arithmetic, not by loads; ``benchmarks/results/attention_speed_notes.md``).

:func:`unsupported_reason` says why a call cannot take the kernel (no Triton, not on CUDA, an attention mask,
head dim > 256, mixed or unsupported dtypes); the caller then uses the reference. Under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported) the kernels also run on CPU tensors (slowly; used by a
test on tiny shapes).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from dgq_utils.core.quantizers import SCALE_FLOOR, check_bits

__all__ = ["ProbQuantSpec", "prob_multiplier", "quant_attention", "row_statistics", "triton_available",
           "unsupported_reason", "default_config", "launch_overrides", "LaunchConfig", "LAUNCH_ENV", "MAX_HEAD_DIM",
           "SUPPORTED_DTYPES"]

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_QUANTIZERS = ("log2", "uniform", None)
_SCALES = ("per_prompt", "batch", "static")
_TRITON: list = []  # [module or None], filled on first use


@dataclass(frozen=True)
class ProbQuantSpec:
    """What the probability quantizer does (mirrors :class:`dgq_utils.model.attention.ProbQuantizer`).

    ``quantizer``: ``"log2"``, ``"uniform"``, or ``None`` (unquantized softmax). ``scale``: ``"per_prompt"``,
    ``"batch"`` or ``"static"`` (then pass ``static_max``). ``keep_start``: column 0 stays FP and is left out of
    the scale (ignored when there is only one key, as in the reference). ``zero_level``: see
    :func:`dgq_utils.core.quantizers.fake_quant_log2`.
    """

    quantizer: str | None = "log2"
    bits: int = 8
    scale: str = "per_prompt"
    keep_start: bool = False
    zero_level: bool = True

    def __post_init__(self):
        if self.quantizer not in _QUANTIZERS:
            raise ValueError(f"ProbQuantSpec.quantizer must be 'log2', 'uniform' or None; got {self.quantizer!r}.")
        if self.scale not in _SCALES:
            raise ValueError(f"ProbQuantSpec.scale must be one of {_SCALES}; got {self.scale!r}.")
        check_bits(self.bits, what="ProbQuantSpec.bits")


def triton_available() -> bool:
    """Whether the Triton kernels can be imported (cached)."""
    return _triton_module() is not None


def _triton_module():
    if not _TRITON:
        try:
            from . import triton_attention
        except ImportError:  # no Triton on this platform: every call takes the reference
            triton_attention = None
        _TRITON.append(triton_attention)
    return _TRITON[0]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unsupported_reason(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None) -> str | None:
    """``None`` if :func:`quant_attention` can run on these ``(B, heads, N, d)`` tensors, else why not."""
    if query.device.type != "cuda" and not _interpreting():
        return f"tensors on {query.device.type}, the kernel runs on CUDA"
    if not triton_available():
        return "Triton is not installed"
    if mask is not None:
        return "an attention mask is given (the kernel has no mask input)"
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        return "Q/K/V are not 4-D (B, heads, N, d)"
    if not (query.dtype == key.dtype == value.dtype):
        return f"mixed dtypes (Q {query.dtype}, K {key.dtype}, V {value.dtype})"
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype} (the kernel takes float16, bfloat16, float32)"
    d = query.shape[-1]
    if key.shape[-1] != d or value.shape[-1] != d:
        return f"head dims differ (Q {d}, K {key.shape[-1]}, V {value.shape[-1]})"
    if d > MAX_HEAD_DIM:
        return f"head dim {d} > {MAX_HEAD_DIM}"
    if key.shape[2] == 0 or key.shape[2] != value.shape[2] or key.shape[:2] != query.shape[:2] \
            or value.shape[:2] != query.shape[:2]:
        return f"inconsistent shapes Q {tuple(query.shape)}, K {tuple(key.shape)}, V {tuple(value.shape)}"
    return None


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: switch only when the tensors live on another one."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _keep_start(spec: ProbQuantSpec, num_keys: int) -> bool:
    return spec.quantizer is not None and spec.keep_start and num_keys > 1


def prob_multiplier(pmax: Tensor, spec: ProbQuantSpec, static_max: Tensor | float | None = None) -> Tensor:
    """Per-sample float32 multiplier ``(B,)`` of the quantized levels, from the row maxima ``pmax (B, ...)``.

    ``pmax`` holds, per row, the largest probability the quantizer's scale may see (the ``<start>`` column
    already left out where it is kept FP). The scale is the max over a sample's rows (``per_prompt``), over all
    rows (``batch``), or ``static_max``; log2 levels are multiplied by the scale, uniform codes by the step
    ``max(scale / (2^b - 1), SCALE_FLOOR)``. ``quantizer=None``: ones.
    """
    b = pmax.shape[0]
    if spec.quantizer is None:
        return torch.ones(b, dtype=torch.float32, device=pmax.device)
    if spec.scale == "per_prompt":
        m = pmax.reshape(b, -1).amax(dim=1)
    elif spec.scale == "batch":
        m = pmax.amax().expand(b)
    else:
        if static_max is None:
            raise ValueError("prob_multiplier: spec.scale is 'static' but static_max is None; pass the calibrated "
                             "maximum of the timestep set.")
        m = torch.as_tensor(static_max, dtype=torch.float32, device=pmax.device).reshape(()).expand(b)
    m = m.float()
    if spec.quantizer == "uniform":
        m = (m / (2**spec.bits - 1)).clamp_min(SCALE_FLOOR)
    return m.contiguous()


#: One launch configuration: (BLOCK_M, BLOCK_N, num_warps, num_stages).
LaunchConfig = tuple[int, int, int, int]
#: Environment variable overriding :func:`default_config` for fp16/bf16 inputs (tuning on another GPU; the
#: benchmarks' sweeps): ``"64l=128,128,8,3;128s=128,32,8,3"`` -- padded head dim (16..256), ``l`` (more than
#: 128 keys) or ``s`` (at most 128), ``=BLOCK_M,BLOCK_N,num_warps,num_stages``; entries separated by ``;``.
LAUNCH_ENV = "DGQ_ATTENTION_LAUNCH"
_LAUNCH_OVERRIDES: dict[str, dict[tuple[int, bool], LaunchConfig]] = {}  # env text -> parsed


def launch_overrides() -> dict[tuple[int, bool], LaunchConfig]:
    """``{(padded head dim, short keys?): config}`` parsed from ``$DGQ_ATTENTION_LAUNCH`` (cached per value)."""
    text = os.environ.get(LAUNCH_ENV, "").strip()
    if text in _LAUNCH_OVERRIDES:
        return _LAUNCH_OVERRIDES[text]
    out: dict[tuple[int, bool], LaunchConfig] = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        try:
            key, cfg = entry.split("=")
            bd, kind = int(key[:-1]), key[-1]
            vals = tuple(int(v) for v in cfg.split(","))
            if kind not in "sl" or len(vals) != 4 or bd != _block_d(bd):
                raise ValueError
        except ValueError:
            raise ValueError(f"{LAUNCH_ENV}: bad entry {entry!r}; expected e.g. '64l=128,64,4,3' (padded head dim, "
                             "l or s for long / short keys, BLOCK_M,BLOCK_N,num_warps,num_stages).") from None
        out[(bd, kind == "s")] = vals
    _LAUNCH_OVERRIDES[text] = out
    return out


def default_config(head_dim: int, dtype: torch.dtype, num_keys: int = 4096) -> LaunchConfig:
    """The launch configuration used for ``head_dim``, ``dtype`` and ``num_keys`` (fixed, no autotuning: a
    quantized UNet hits few shapes, and compiling a tuning sweep on first use would cost more than it saves).
    fp16/bf16: the fastest of ``benchmarks/bench_attention.py --sweep`` on an H200 at the SD v1.5 shapes
    (``benchmarks/results/attention_h200.json``): BLOCK_N 32 for the 77 text keys, 64 for self-attention;
    ``$DGQ_ATTENTION_LAUNCH`` (:data:`LAUNCH_ENV`) overrides them.
    float32 (3xTF32 products) is a correctness path, not tuned (it spills registers at head dims > 64)."""
    block_d = _block_d(head_dim)
    if dtype != torch.float32:
        override = launch_overrides().get((block_d, num_keys <= 128))
        if override is not None:
            return override
    if dtype == torch.float32:
        return (64, 32, 4, 2) if block_d <= 64 else (64, 32, 8, 2) if block_d <= 128 else (64, 32, 8, 1)
    short = num_keys <= 128
    if block_d <= 64:
        return (128, 32, 4, 3) if short else (128, 64, 4, 3)
    if block_d <= 128:  # self-attention: 64x64 blocks measured 4 % faster (sd_scale_h200_speed run's sweep)
        return (128, 32, 8, 3) if short else (64, 64, 4, 3)
    return 32, 64, 4, 2


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def _launch_args(query: Tensor, key: Tensor, launch: LaunchConfig | None):
    b, h, nq, d = query.shape
    nk = key.shape[2]
    bm, bn, warps, stages = launch if launch is not None else default_config(d, query.dtype, nk)
    if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(f"launch blocks must be powers of two >= 16; got BLOCK_M={bm}, BLOCK_N={bn}.")
    grid = (math.ceil(nq / bm), b * h)
    return b, h, nq, nk, d, _block_d(d), bm, bn, warps, stages, grid


def row_statistics(query: Tensor, key: Tensor, softmax_scale: float, exclude_first: bool,
                   launch: LaunchConfig | None = None):
    """Pass 1 alone: ``(m, l, pmax)``, each ``(B, heads, Nq)`` float32, ``m`` in base-2 logits
    (``max_j (q . k_j) * softmax_scale * log2(e)``), ``l = sum_j 2^(t_j - m)``, ``pmax`` the largest probability
    over keys ``1..`` (``exclude_first``) or all keys. :func:`dgq_utils.kernels.reference.row_statistics_reference`
    is the same in plain torch."""
    reason = unsupported_reason(query, key, key)
    if reason is not None:
        raise ValueError(f"row_statistics cannot run the kernel: {reason}.")
    tk = _triton_module()
    b, h, nq, nk, d, block_d, bm, bn, warps, stages, grid = _launch_args(query, key, launch)
    m, l_, pmax = torch.empty(3, b, h, nq, dtype=torch.float32, device=query.device).unbind(0)  # one allocation
    with _on_device(query.device):
        tk.row_stats_kernel[grid](
            query, key, m, l_, pmax, *query.stride(), *key.stride(), h, nq, nk,
            float(softmax_scale) * math.log2(math.e), D=d,
            EXCL_FIRST=bool(exclude_first and nk > 1), F32=query.dtype == torch.float32, EVEN_N=nk % bn == 0,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    return m, l_, pmax


@torch.library.custom_op("dgq::quant_attention", mutates_args=())
def _quant_attention_op(query: Tensor, key: Tensor, value: Tensor, softmax_scale: float, quantizer: str, bits: int,
                        scale: str, keep_start: bool, zero_level: bool, static_max: Tensor | None) -> Tensor:
    """:func:`quant_attention` as a registered op: opaque to ``torch.compile`` (no graph break, no tracing into
    the Triton launches); its fake implementation gives the output's shape, dtype and strides."""
    spec = ProbQuantSpec(None if quantizer == "none" else quantizer, bits, scale, keep_start, zero_level)
    return quant_attention(query, key, value, softmax_scale, spec, static_max)


@_quant_attention_op.register_fake
def _(query, key, value, softmax_scale, quantizer, bits, scale, keep_start, zero_level, static_max):
    b, h, nq, d = query.shape
    return query.new_empty((b, nq, h, d), dtype=value.dtype).transpose(1, 2)


def quant_attention(query: Tensor, key: Tensor, value: Tensor, softmax_scale: float, spec: ProbQuantSpec,
                    static_max: Tensor | float | None = None, *, return_probs: bool = False,
                    launch: LaunchConfig | None = None, row_stats: tuple[Tensor, Tensor, Tensor] | None = None):
    """``Q(softmax(query @ key^T * softmax_scale)) @ value`` for ``(B, heads, N, d)`` inputs (any strides).

    Returns ``(B, heads, Nq, d)`` in ``value``'s dtype, laid out as ``(B, Nq, heads, d)`` in memory (so the
    usual ``transpose(1, 2).reshape(B, Nq, heads * d)`` is free). ``return_probs=True`` (tests only: it writes
    the ``Nq x Nk`` tensor the kernel otherwise avoids) also returns the quantized probabilities as float32
    ``(B, heads, Nq, Nk)``. Under ``torch.compile`` the plain call goes through the registered op
    ``torch.ops.dgq.quant_attention`` (opaque to the compiler). ``launch`` overrides :func:`default_config` (benchmarks). ``row_stats``: pass 1's
    output, ``row_statistics(query, key, softmax_scale, spec.keep_start)``, when the caller already has it
    (calibration reads the max from it). Raises ``ValueError``
    with the reason when :func:`unsupported_reason` objects.
    """
    if not isinstance(spec, ProbQuantSpec):
        raise TypeError(f"quant_attention: spec must be a ProbQuantSpec; got {type(spec).__name__}.")
    if torch.compiler.is_compiling() and not return_probs and launch is None and row_stats is None:
        static = None if static_max is None else torch.as_tensor(static_max, dtype=torch.float32,
                                                                 device=query.device)
        return _quant_attention_op(query, key, value, float(softmax_scale), spec.quantizer or "none", spec.bits,
                                   spec.scale, spec.keep_start, spec.zero_level, static)
    reason = unsupported_reason(query, key, value)
    if reason is not None:
        raise ValueError(f"quant_attention cannot run the kernel: {reason}; use the reference processor.")
    tk = _triton_module()
    b, h, nq, nk, d, block_d, bm, bn, warps, stages, grid = _launch_args(query, key, launch)
    keep_start = _keep_start(spec, nk)
    if row_stats is None:
        row_stats = row_statistics(query, key, softmax_scale, keep_start, launch)
    m, l_, pmax = row_stats
    mult = prob_multiplier(pmax, spec, static_max)
    if spec.quantizer == "log2":
        quant, level_min, level_max = tk.QUANT_LOG2, 2.0 ** -(2**spec.bits - 1), 1.0
    elif spec.quantizer == "uniform":
        quant, level_min, level_max = tk.QUANT_UNIFORM, 0.0, float(2**spec.bits - 1)
    else:
        quant, level_min, level_max = tk.QUANT_NONE, 0.0, 1.0
    # float32 kernel arguments: 2^-(2^b-1) underflows to 0.0 for b = 8, exactly like the reference's float32
    # comparison with the same Python float.
    out = torch.empty(b, nq, h, d, dtype=value.dtype, device=value.device).transpose(1, 2)
    probs = torch.empty(b, h, nq, nk, dtype=torch.float32, device=value.device) if return_probs else out
    with _on_device(query.device):
        tk.quant_attention_kernel[grid](
            query, key, value, out, m, l_, mult, probs,
            *query.stride(), *key.stride(), *value.stride(), *out.stride(),
            h, nq, nk, float(softmax_scale) * math.log2(math.e), level_min, level_max, D=d,
            QUANT=quant, ZERO_LEVEL=bool(spec.zero_level), KEEP_START=keep_start, WRITE_P=bool(return_probs),
            F32=query.dtype == torch.float32, EVEN_N=nk % bn == 0,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    return (out, probs) if return_probs else out
