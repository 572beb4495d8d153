"""QuantLinear / QuantConv2d / ActQuantizer: cached weights, broadcast-shaped groups, unfold path, modes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dgq_utils.core.grouping import AxisStats, fake_quant_along_axis
from dgq_utils.model.layers import ActQuantizer, QuantConv2d, QuantLinear, check_unfoldable
from dgq_utils.core.quantizers import fake_quant_uniform, uniform_qparams
from dgq_utils.model.timesteps import TimestepState


def _calibrated(name, x, layout, axis, k=4, bits=8):
    """An ActQuantizer observed on ``x`` and finalized with K groups on ``axis`` (via calibrate's code)."""
    from dgq_utils.calibrate.calibration import finalize_act_quantizer
    from dgq_utils.config import ActQuantConfig

    q = ActQuantizer(name, bits, layout=layout)
    q.mode = "observe"
    assert torch.equal(q(x), x)  # observe is the identity
    cfg = ActQuantConfig(bits=bits, num_groups=k, axis=axis, grouping="contiguous")
    finalize_act_quantizer(q, cfg)
    q.mode = "quant"
    return q


@pytest.mark.parametrize(
    "layout,shape,axis,dims,expect",
    [
        ("linear", (2, 6, 8), "channel", 2, (1, 1, 8)),
        ("linear", (2, 6, 8), "pixel", 1, (1, 6, 1)),
        ("conv", (2, 8, 3, 4), "channel", 1, (1, 8, 1, 1)),
        ("conv", (2, 8, 3, 4), "pixel", (2, 3), (1, 1, 3, 4)),
        ("qkv", (2, 3, 6, 4), "channel", 3, (1, 1, 1, 4)),
        ("qkv", (2, 3, 6, 4), "pixel", 2, (1, 1, 6, 1)),
        ("unfold", (2, 18, 5), "pixel", 2, (1, 1, 5)),
    ],
)
def test_group_params_are_broadcast_shaped(layout, shape, axis, dims, expect):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, shape[-1])
    q = _calibrated("t", x, layout, axis, k=2)
    scale, zp = q.params[0]
    assert tuple(scale.shape) == expect and tuple(zp.shape) == expect
    info = q.info[0]
    assert info["axis"] == axis and info["k"] == 2 and info["ids"].shape == (info["n"],)
    # the forward is exactly one vectorised fake_quant with those tensors
    assert torch.equal(q(x), fake_quant_uniform(x, scale, zp, 8))
    # and equals the core's per-index reference along the same axis
    stats = AxisStats.from_tensor(x, dims)
    from dgq_utils.core.grouping import per_index_qparams

    s_ref, z_ref = per_index_qparams(stats, info["ids"], 2, 8)
    assert torch.equal(q(x), fake_quant_along_axis(x, s_ref, z_ref, 8, dims))


def test_per_tensor_and_2d_inputs():
    from dgq_utils.calibrate.calibration import finalize_act_quantizer
    from dgq_utils.config import ActQuantConfig

    x = torch.randn(4, 16) + 2.0  # all-positive-ish 2-D input (time embedding style)
    q = ActQuantizer("temb", 8, layout="linear")
    q.set_observe(axes=("channel", "pixel"))
    q.mode = "observe"
    q(x)
    finalize_act_quantizer(q, ActQuantConfig(bits=8, num_groups=4))  # group mode, but 2-D -> per tensor
    assert q.info[0]["axis"] == "tensor"
    s, z = uniform_qparams(x.min(), x.max(), 8, include_zero=True)
    q.mode = "quant"
    assert torch.equal(q(x), fake_quant_uniform(x, s, z, 8))


def test_ema_range_estimator():
    from dgq_utils.calibrate.calibration import finalize_act_quantizer
    from dgq_utils.config import ActQuantConfig

    q = ActQuantizer("a", 8, layout="linear")
    q.set_observe(axes=(), ema_momentum=0.5)
    q.mode = "observe"
    q(torch.tensor([[-1.0, 1.0]]))
    q(torch.tensor([[-3.0, 5.0]]))
    st = q.stats[0]
    assert (st.ema_min, st.ema_max) == (-2.0, 3.0) and (st.min, st.max) == (-3.0, 5.0)
    finalize_act_quantizer(q, ActQuantConfig(bits=8, granularity="per_tensor", range_estimator="ema",
                                             ema_momentum=0.5))
    s, z = q.params[0]
    assert torch.allclose(s, torch.tensor(5.0 / 255)) and q.info[0]["source"] == "ema"


def test_timestep_sets_and_missing_set_error():
    state = TimestepState()
    q = ActQuantizer("x", 8, state=state)
    q.set_params(0, torch.tensor(0.1), torch.tensor(0.0))
    q.set_params(1, torch.tensor(0.5), torch.tensor(0.0))
    q.mode = "quant"
    x = torch.linspace(-1, 1, 11).view(1, 11)
    a = q(x)
    state.set_index = 1
    b = q(x)
    assert not torch.equal(a, b)
    state.set_index = 7
    with pytest.raises(RuntimeError, match="no quantization parameters for timestep set 7"):
        q(x)


def test_pixel_groups_are_tied_to_resolution():
    x = torch.randn(2, 6, 8)
    q = _calibrated("blocks.0.proj", x, "linear", "pixel", k=2)
    with pytest.raises(RuntimeError, match="blocks.0.proj.*resolution"):
        q(torch.randn(2, 10, 8))


def test_quant_linear_weights_cached_and_off_is_exact():
    from dgq_utils.config import WeightQuantConfig

    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randn(3, 5, 16)
    layer = QuantLinear(lin, "lin", None)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    layer.quantize_weight(WeightQuantConfig(bits=4, range_method="minmax"))
    layer.set_mode("quant")
    ptr = layer.weight_fq.data_ptr()
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2) and layer.weight_fq.data_ptr() == ptr  # cached, not recomputed
    assert not torch.equal(y1, lin(x))
    assert torch.unique(layer.weight_fq[0]).numel() <= 16  # 4-bit per-channel grid
    assert "weight_fq" not in layer.state_dict() and set(layer.state_dict()) == {"weight", "bias"}
    layer.enabled = False
    assert torch.equal(layer(x), lin(x))  # bit-identical FP path
    layer.enabled = True
    layer.set_mode("observe")  # observing uses the FP weight
    assert torch.equal(layer(x), lin(x))


def test_quant_conv_unfold_path_matches_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2)
    x = torch.randn(2, 4, 7, 7)
    q = ActQuantizer("c.act", 16, layout="unfold")
    q.set_params(0, torch.tensor(2e-4), torch.tensor(2.0**15))  # 16-bit, +-6.5: ~lossless
    layer = QuantConv2d(conv, "c", q, layout="unfold")
    layer.set_mode("quant")
    y = layer(x)
    assert y.shape == conv(x).shape
    assert torch.allclose(y, conv(x), atol=1e-3)
    # quantization happens on the unfolded matrix
    q.set_params(0, torch.tensor(0.25), torch.tensor(8.0))
    q.bits = 4
    cols = torch.nn.functional.unfold(x, 3, padding=1, stride=2)
    ref = conv.weight.view(6, -1) @ fake_quant_uniform(cols, torch.tensor(0.25), torch.tensor(8.0), 4)
    ref = ref.view(2, 6, 4, 4) + conv.bias.view(1, -1, 1, 1)
    assert torch.allclose(layer(x), ref, atol=1e-5)


def test_unfold_rejects_unsupported_convs():
    with pytest.raises(ValueError, match="'odd'.*non-square kernel_size"):
        check_unfoldable(nn.Conv2d(2, 2, (1, 3)), "odd")
    with pytest.raises(ValueError, match="groups=2"):
        QuantConv2d(nn.Conv2d(2, 2, 3, groups=2), "grouped", None, layout="unfold")
    QuantConv2d(nn.Conv2d(2, 2, 3, groups=2), "grouped", None, layout="tensor")  # fine in tensor layout


def test_observe_rejects_nan_naming_the_layer():
    q = ActQuantizer("down.conv1.act", 8, layout="conv")
    q.mode = "observe"
    x = torch.randn(1, 2, 3, 3)
    x[0, 1, 1, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="down.conv1.act.*timestep index 0"):
        q(x)
