"""8-bit execution of a calibrated W8A8 layer: :class:`EightBitLinear` (Linear / 1x1 conv, integer GEMMs) and
:class:`EightBitConv2d` (other convolutions: weights stored in 8 bits, computed on the fake-quant path).

Built by :func:`dgq_utils.quantize.int8.convert_to_8bit` from a calibrated quantized layer. Both hold the weight
**only** in 8 bits (the FP weight and the fake-quantized copy are gone) and reuse the layer's
:class:`~dgq_utils.model.layers.ActQuantizer` for its calibrated per-timestep parameter sets and the shared
timestep state (which set a UNet call uses). In :class:`EightBitLinear`, per set, a *plan* says how the
activation is executed:

* ``rows``: per-tensor or pixel / token groups -- one int8 GEMM with per-row scale / zero point
  (:func:`dgq_utils.kernels.int8_gemm.rows_gemm_reference` is the math);
* ``blocked``: channel groups -- channels permuted into contiguous groups padded to the K-block, K-blocked
  accumulation with per-block scales (:func:`~dgq_utils.kernels.int8_gemm.blocked_gemm_reference`).

Backends: ``"int8"`` is exact integer arithmetic on the calibrated grid (equal to the fake-quant layer up to
float rounding). ``"fp8"`` (e4m3, Hopper ``torch._scaled_mm``) is an *approximation*: e4m3 has 3 mantissa bits and
cannot hold the 256 levels of an 8-bit uniform grid, so the fake-quantized activation and weight are re-rounded
to e4m3 with per-row / per-output-channel scales; it is measured, not assumed, to stay close.

On a CUDA device the int8 path runs the fused Triton kernels; elsewhere (CPU tests) the pure-torch reference
computes the same math. A 1x1 convolution is a GEMM over pixels: its output is returned as a channels-last
``(B, N, H, W)`` view of the ``(B*H*W, N)`` result (no copy).

:class:`EightBitConv2d` (3x3 and other convolutions, tensor input layout): there is no int8 implicit-GEMM conv
kernel yet, so it dequantizes its int8 codes into a transient weight per call (bit-identical to the fake-quant
weight) and runs the fake-quant activation plus the ordinary convolution: the fake-quant layer's arithmetic
exactly, with half the weight bytes.

Converted layers cannot go back to FP (``reversible = False``): ``enabled = False`` and ``original`` raise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgq_utils.kernels import int8_gemm as k8

__all__ = ["BACKENDS", "EightBitConv2d", "EightBitLinear", "FP8_MAX"]

BACKENDS = ("int8", "fp8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _weight_codes(layer) -> k8.Int8Weight:
    """The layer's calibrated weight as int8 codes (per-tensor parameters broadcast to every output channel)."""
    w = layer.weight.detach()
    n = int(w.shape[0])
    ws = layer.weight_scale.reshape(-1).expand(n) if layer.weight_scale.numel() == 1 else layer.weight_scale
    wz = layer.weight_zp.reshape(-1).expand(n) if layer.weight_zp.numel() == 1 else layer.weight_zp
    return k8.quantize_weight_int8(w, ws, wz, layer.weight_bits, layer.weight_symmetric)


class _Converted:
    """What a converted layer shares: the calibrated weight parameters (kept for ``save_quant_state``), no way
    back to FP."""

    reversible = False

    def _keep_weight_params(self, layer) -> None:
        self.name = layer.name
        self.weight_bits = layer.weight_bits
        self.weight_symmetric = layer.weight_symmetric
        self.weight_scale = layer.weight_scale.detach().clone()
        self.weight_zp = layer.weight_zp.detach().clone()
        self.weight_quantized = True
        self.weight_round_up = None  # layers with learned (AdaRound) rounding are never converted

    @property
    def enabled(self) -> bool:
        return True

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if not value:
            raise RuntimeError(f"{self.name}: a layer converted by convert_to_8bit has no FP weights to switch to; "
                               "build (or load) the pipeline again for the FP model.")

    @property
    def original(self):
        raise RuntimeError(f"{self.name}: this layer was converted by convert_to_8bit and its FP weights were "
                           "freed; build (or load) the pipeline again to get the FP model back.")


class EightBitConv2d(_Converted, nn.Module):
    """A convolution whose weight is stored as int8 codes per output channel and dequantized per call (module
    docstring); the input goes through the layer's calibrated activation quantizer as before.

    Args:
        layer: the calibrated ``QuantConv2d`` (``layout="tensor"``, zero padding).
    """

    def __init__(self, layer):
        super().__init__()
        conv = layer.original
        if layer.layout != "tensor" or conv.padding_mode != "zeros":
            raise ValueError(f"{layer.name}: EightBitConv2d needs the tensor input layout and zero padding.")
        self._keep_weight_params(layer)
        w = layer.weight.detach()
        self.weight_dtype = w.dtype
        self.weight_shape = tuple(w.shape)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, attr, getattr(conv, attr))
        self.act = layer.act
        if self.act is not None:
            self.act.stats = {}
        wq = _weight_codes(layer)
        self.register_buffer("codes", wq.codes)
        self.register_buffer("w_scale", wq.scale)
        self.register_buffer("w_offset", wq.offset)
        self.register_buffer("bias", layer.bias.detach().clone() if layer.bias is not None else None)

    def extra_repr(self) -> str:
        return (f"{self.name!r}, {self.in_channels}->{self.out_channels}, k={self.kernel_size}, int8 weight "
                "storage, fake-quant compute")

    def dequantized_weight(self) -> Tensor:
        """``s_w (u - c_w)`` in the weight's dtype: bit-identical to the fake-quant layer's weight."""
        w = (self.codes.float() - self.w_offset[:, None]) * self.w_scale[:, None]
        return w.to(self.weight_dtype).reshape(self.weight_shape)

    def forward(self, x: Tensor) -> Tensor:
        if self.act is not None:
            x = self.act(x)
        return F.conv2d(x, self.dequantized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class EightBitLinear(_Converted, nn.Module):
    """A Linear (``kind="linear"``) or 1x1 convolution (``kind="conv1x1"``) executed in 8 bits (module docstring).

    Args:
        layer: the calibrated ``QuantLinear`` / ``QuantConv2d`` (1x1, stride 1, no padding, groups 1).
        backend: ``"int8"`` or ``"fp8"``. ``block``: the K-block of channel groups (int8 path, >= 32).
    """

    def __init__(self, layer, backend: str = "int8", block: int = 32):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
        self._keep_weight_params(layer)
        self.backend = backend
        self.block = int(block)
        self.kind = "linear" if isinstance(layer.original, nn.Linear) else "conv1x1"
        w = layer.weight.detach()
        self.out_features, self.in_features = int(w.shape[0]), int(w.numel() // w.shape[0])
        self.act = layer.act
        self.act.stats = {}
        self.register_buffer("bias", layer.bias.detach().clone() if layer.bias is not None else None)
        wq = _weight_codes(layer)
        if backend == "int8":
            self.register_buffer("codes", wq.codes)
            self.register_buffer("w_scale", wq.scale)
            self.register_buffer("w_offset", wq.offset)
            self.register_buffer("code_sum", wq.code_sum)
        else:
            what = wq.dequantize()  # the fake-quantized weight, re-rounded to e4m3 per output channel
            s8 = (what.abs().amax(dim=1) / FP8_MAX).clamp_min(1e-12)
            self.register_buffer("w_fp8", (what / s8[:, None]).to(torch.float8_e4m3fn))
            self.register_buffer("w_fp8_scale", s8.float())
        self.plans = {i: self._plan(i) for i in sorted(self.act.params)}
        self._plans_device: dict = {}

    # -- plans -------------------------------------------------------------------------------------------------
    def _plan(self, i: int) -> dict:
        s, z = self.act.params[i]
        bits, sym = self.act.bits, self.act.symmetric
        axis = self.act.info[i].get("axis", "tensor") if s.numel() > 1 else "tensor"
        if axis in ("tensor", "pixel"):
            scale, zp = s.reshape(-1).float(), z.reshape(-1).float()
            return {"kind": "rows", "scale": scale, "zp": zp, "params": k8.rows_params(scale, zp, bits, sym)}
        ids = self.act.info[i].get("ids")
        s_idx, z_idx = s.reshape(-1).float().cpu(), z.reshape(-1).float().cpu()
        if ids is None or ids.numel() != self.in_features or s_idx.numel() != self.in_features:
            raise ValueError(f"{self.name}: channel-wise set {i} has no group ids of length {self.in_features}.")
        ids = ids.reshape(-1).to(torch.long).cpu()
        layout = k8.block_layout(ids, self.block)
        first = layout.perm.to(torch.long)[:: self.block]  # the first column of every block is a real channel
        g = int(ids.max()) + 1
        gs = torch.ones(g)
        gz = torch.zeros(g)
        gs[ids], gz[ids] = s_idx, z_idx
        return {"kind": "blocked", "layout": layout, "group_scale": gs, "group_zp": gz, "ids": ids,
                "params": k8.blocked_params(layout, s_idx[first], z_idx[first], bits, sym)}

    def plan_on(self, device: torch.device) -> dict:
        """The current timestep set's plan with its tensors on ``device`` (moved once, then cached)."""
        i = self.act.state.set_index
        key = (i, device)
        p = self._plans_device.get(key)
        if p is None:
            base = self.plans.get(i)
            if base is None:
                raise RuntimeError(f"{self.name}: no quantization parameters for timestep set {i} (calibrated sets: "
                                   f"{sorted(self.plans)}). Was the pipeline calibrated with this sampler / number "
                                   "of steps?")
            mv = (lambda v: v.to(device) if isinstance(v, (Tensor, k8.BlockLayout, k8.RowsParams,
                                                           k8.BlockedParams)) else v)
            p = {k: mv(v) for k, v in base.items()}
            self._plans_device[key] = p
        return p

    def prepare(self, device) -> None:
        """Move every set's plan (and the weight) to ``device`` now: no host-to-device copy is left for the
        forward (needed before capturing the UNet in a CUDA graph)."""
        device = torch.device(device)
        state = self.act.state
        keep = state.set_index
        for i in self.plans:
            state.set_index = i
            self.plan_on(device)
        state.set_index = keep

    def weight_int8(self) -> k8.Int8Weight:
        return k8.Int8Weight(self.codes, self.w_scale, self.w_offset, self.code_sum)

    def extra_repr(self) -> str:
        return (f"{self.name!r}, {self.kind}, in={self.in_features}, out={self.out_features}, "
                f"backend={self.backend}, sets={len(self.plans)}")

    # -- forward -----------------------------------------------------------------------------------------------
    def _as_bpk(self, x: Tensor) -> tuple[Tensor, tuple]:
        if self.kind == "conv1x1":
            b, c, h, w = x.shape
            return x.flatten(2).transpose(1, 2), (b, h, w)
        if x.ndim == 2:
            return x.reshape(1, x.shape[0], x.shape[1]), (x.shape[:-1],)
        return x.reshape(-1, x.shape[-2], x.shape[-1]), (x.shape[:-1],)

    def _shape_out(self, y: Tensor, shape) -> Tensor:
        if self.kind == "conv1x1":
            b, h, w = shape
            return y.view(b, h, w, self.out_features).permute(0, 3, 1, 2)
        return y.reshape(*shape[0], self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1 if self.kind == "conv1x1" else -1] != self.in_features:
            raise RuntimeError(f"{self.name}: input has {x.shape} but the layer takes {self.in_features} features.")
        if self.backend == "fp8":  # the calibrated fake quantizer (one fused kernel on a GPU), then e4m3
            xh3, shape = self._as_bpk(self.act(x))
            return self._shape_out(self._fp8(xh3), shape)
        x3, shape = self._as_bpk(x)
        p = self.plan_on(x.device)
        if p["kind"] == "rows" and p["scale"].numel() not in (1, x3.shape[1]):
            raise RuntimeError(f"{self.name}: input of shape {tuple(x.shape)} does not match the pixel-wise "
                               f"parameters ({p['scale'].numel()} positions) calibrated for set "
                               f"{self.act.state.set_index}. Pixel-wise groups are tied to the calibration "
                               "resolution: generate at the calibration height/width or re-calibrate.")
        if k8.available(x):
            y = self._int8_triton(x3, p)
        else:
            y = self._int8_reference(x3, p)
        return self._shape_out(y, shape)

    def _int8_triton(self, x3: Tensor, p: dict) -> Tensor:
        return k8.int8_linear(x3, self.weight_int8(), self.bias, p["params"], bits=self.act.bits,
                              symmetric=self.act.symmetric)

    def _rows_params(self, x3: Tensor, p: dict) -> tuple[Tensor, Tensor]:
        b, n, _ = x3.shape
        s, z = p["scale"], p["zp"]
        if s.numel() == 1:
            return s.expand(b * n), z.expand(b * n)
        return s.repeat(b), z.repeat(b)

    def _int8_reference(self, x3: Tensor, p: dict) -> Tensor:
        x2 = x3.reshape(-1, self.in_features)
        w = self.weight_int8()
        bias = self.bias
        bits, sym = self.act.bits, self.act.symmetric
        if p["kind"] == "rows":
            s, z = self._rows_params(x3, p)
            a, c = k8.quantize_act_reference(x2, s[:, None], z[:, None], bits, sym)
            return k8.rows_gemm_reference(a, s, c.reshape(-1), w, bias, out_dtype=x3.dtype)
        ids = p["ids"]
        return k8.channel_gemm_reference(x2, p["group_scale"][ids], p["group_zp"][ids], w, bias, bits, sym,
                                         out_dtype=x3.dtype)

    def _fp8(self, xh3: Tensor) -> Tensor:
        """``xh3``: the fake-quantized activation ``(B, P, K)``, re-rounded to e4m3 with a per-row scale."""
        xh = xh3.reshape(-1, self.in_features)
        sa = (xh.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)
        a8 = (xh / sa).to(torch.float8_e4m3fn)
        out_dtype = xh3.dtype
        if xh3.is_cuda:
            return self._scaled_mm(a8, sa, out_dtype)
        y = (a8.float() * sa) @ (self.w_fp8.float() * self.w_fp8_scale[:, None]).t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(out_dtype)

    def _scaled_mm(self, a8: Tensor, sa: Tensor, out_dtype) -> Tensor:
        sb = self.w_fp8_scale[None, :]
        dt = out_dtype if out_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        if not getattr(self, "_fp8_bf16_only", False):
            try:
                b = None if self.bias is None else self.bias.to(dt)
                return torch._scaled_mm(a8, self.w_fp8.t(), scale_a=sa, scale_b=sb, out_dtype=dt, bias=b).to(out_dtype)
            except RuntimeError:  # some builds take row-wise scales only with a bf16 output and no bias
                self._fp8_bf16_only = True
        y = torch._scaled_mm(a8, self.w_fp8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        if self.bias is not None:
            y = y + self.bias.to(torch.bfloat16)
        return y.to(out_dtype)
