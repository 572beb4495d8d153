"""Every figure function draws from small synthetic tables, returns a Figure and writes a readable PNG."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dgq_utils.report import plots as P  # noqa: E402
from dgq_utils.core.grouping import AxisStats  # noqa: E402

LAYERS = ["down_blocks.0.resnets.0.conv1", "down_blocks.1.attentions.0.proj_in", "mid_block.resnets.0.conv2",
          "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2", "time_embedding.linear_1"]


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _png_ok(path, min_side=200):
    assert path.is_file()
    im = Image.open(path)
    assert min(im.size) >= min_side
    assert not any(p.name.startswith(".") and ".tmp-" in p.name for p in path.parent.iterdir()), "temp file left"


def _summary():
    rng = np.random.default_rng(0)
    rows = []
    for i, name in enumerate(LAYERS):
        rows.append({"layer": name, "short": name.split(".")[-1], "block": ".".join(name.split(".")[:2]),
                     "layer_type": "conv" if "conv" in name or "proj_in" in name else "linear",
                     "channel_ratio": 1 + 5 * rng.random(), "pixel_ratio": math.nan if i == 4 else 1 + 3 * rng.random(),
                     "tail_ratio": 1 + rng.random(), "outliers": "channel"})
    return pd.DataFrame(rows)


def _table():
    rows = []
    for name in LAYERS:
        for ti in range(4):
            rows.append({"layer": name, "block": ".".join(name.split(".")[:2]), "timestep_index": ti,
                         "absmax": 1.0 + 0.3 * ti})
    return pd.DataFrame(rows)


def test_outlier_figures(tmp_path):
    s = _summary()
    assert isinstance(P.outlier_scatter(s, path=tmp_path / "a.png"), plt.Figure)
    P.range_over_timesteps(_table(), path=tmp_path / "b.png")
    P.heavy_tail(s, path=tmp_path / "c.png")
    for n in "abc":
        _png_ok(tmp_path / f"{n}.png")


def test_layer_ranges_image_and_token_axes(tmp_path):
    ch = AxisStats(-torch.rand(32), torch.rand(32) * 3)
    px = AxisStats(-torch.rand(64), torch.rand(64))
    P.layer_ranges(ch, px, pixel_shape=(8, 8), path=tmp_path / "img.png", title="conv")
    P.layer_ranges(ch, AxisStats(-torch.rand(77), torch.rand(77)), path=tmp_path / "tok.png", title="tokens")
    P.layer_ranges(ch, None, path=tmp_path / "one.png", title="2-D input")
    for n in ("img", "tok", "one"):
        _png_ok(tmp_path / f"{n}.png")


def test_grouping_figures(tmp_path):
    summary = pd.DataFrame({"layer": LAYERS[:4], "block": ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.1"],
                            "official_spread_majority": ["channel", "pixel", "channel", "channel"],
                            "outlier_ratio_majority": ["pixel", "pixel", "channel", "channel"]})
    P.axis_decisions(summary, path=tmp_path / "d.png")
    ex = pd.DataFrame({"index": range(20), "min": -np.linspace(0, 1, 20), "max": np.linspace(0, 3, 20),
                       "contiguous": np.repeat(range(4), 5), "sorted": np.repeat(range(4), 5),
                       "kmeans": [0] * 10 + [1] * 6 + [2] * 3 + [3]})
    P.kmeans_groups(ex, path=tmp_path / "k.png", title="example")
    curves = []
    for choice in ("official", "oracle"):
        curves.append({"method": "per-tensor", "k": 1, "gmean_rel_mse": 1.0, "axis_choice": choice})
        for m in ("contiguous", "kmeans"):
            for k in (2, 4, 8):
                curves.append({"method": m, "k": k, "gmean_rel_mse": 1 / k, "axis_choice": choice})
    P.error_vs_groups(pd.DataFrame(curves), path=tmp_path / "e.png")
    for n in "dke":
        _png_ok(tmp_path / f"{n}.png")


def test_attention_figures(tmp_path):
    start = pd.DataFrame([{"layer": f"l{i}.{k}", "short": f"l{i}.{k}", "kind": k, "timestep_index": t,
                           "start_mass": 0.5 if k == "cross" else 0.02, "uniform_share": 1 / 77 if k == "cross" else 1 / 64,
                           "start_over_uniform": 38.5 if k == "cross" else 1.3}
                          for i in range(2) for k in ("self", "cross") for t in range(3)])
    P.start_sink(start, path=tmp_path / "s.png")
    edges = [-math.inf] + list(range(-30, 1))
    hist = pd.DataFrame([{"kind": k, "bin_low": edges[b], "bin_high": edges[b + 1], "count": float(b)}
                         for k in ("self", "cross") for b in range(len(edges) - 1)])
    P.prob_histograms(hist, bits=6, max_prob={"cross": 0.9, "self": 0.2}, path=tmp_path / "h.png")
    err = pd.DataFrame([{"kind": k, "quantizer": q, "bits": b, "scale": "per_prompt", "start_fp": k == "cross",
                         "out_rel_err": 2.0 ** -b * (2 if q == "uniform" else 1)}
                        for k in ("self", "cross") for q in ("log2", "uniform") for b in (4, 6, 8)])
    P.prob_error(err, path=tmp_path / "p.png")
    sc = pd.DataFrame({"kind": ["cross", "self"] * 5, "batch_over_sample": np.linspace(1, 3, 10),
                       "log2_per_prompt_err": 0.1, "log2_batch_err": 0.11, "uniform_per_prompt_err": 0.05,
                       "uniform_batch_err": 0.07})
    P.scale_comparison(sc, path=tmp_path / "c.png")
    P.attention_example(np.r_[0.6, np.full(76, 0.4 / 76)], kind="cross",
                        tokens=["<|startoftext|>", "a</w>", "red</w>", "<|endoftext|>"] + ["!"] * 73, n_tokens=4,
                        path=tmp_path / "x.png", title="cross")
    P.attention_example(np.full(64, 1 / 64), kind="self", path=tmp_path / "y.png", title="self")
    for n in "shpcxy":
        _png_ok(tmp_path / f"{n}.png")


def _results():
    rows = []
    for r, v in (("fp", 0.9), ("baseline-w8a6", 0.5), ("dgq-w8a6", 0.8)):
        for m in ("alignment_caption", "psnr"):
            if m == "psnr" and r == "fp":
                continue
            rows.append({"recipe": r, "metric": m, "value": v, "ci_low": v - 0.05, "ci_high": v + 0.05, "n": 10})
    return pd.DataFrame(rows)


def test_result_figures(tmp_path):
    t = _results()
    P.metric_bars(t, ["alignment_caption", "psnr", "absent"], path=tmp_path / "m.png", title="results")
    paired = t[t.recipe != "fp"].assign(value=lambda d: d["value"] - 0.9)
    P.paired_bars(paired, ["alignment_caption"], path=tmp_path / "q.png")
    comp = pd.DataFrame({"setting": ["W8A8", "W8A6"], "metric": ["fid", "fid"], "paper_gap_closed": [1.0, 0.9],
                         "ours_gap_closed": [0.5, -0.2]})
    P.paper_vs_ours(comp, path=tmp_path / "v.png")
    ab = pd.DataFrame({"recipe": ["a", "b"], "metric": ["psnr", "psnr"], "diff": [-1.0, 0.2], "ci_low": [-1.5, -0.1],
                       "ci_high": [-0.5, 0.5]})
    P.ablation_bars(ab, ["psnr"], labels={"a": "no groups", "b": "contiguous"}, path=tmp_path / "a.png")
    for n in "mqva":
        _png_ok(tmp_path / f"{n}.png")


def test_image_grid_from_arrays_and_files(tmp_path):
    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    f = tmp_path / "img.png"
    Image.fromarray(arr + 200).save(f)
    fig = P.image_grid([[arr, arr], [str(f), f]], row_labels=["FP32", "DGQ"], col_labels=["a prompt", "another"],
                       notes=[["", ""], ["30.1 dB", "28.0 dB"]], path=tmp_path / "g.png", title="grid")
    assert len(fig.axes) == 4
    _png_ok(tmp_path / "g.png", min_side=150)


def test_recipe_family():
    assert [P.recipe_family(n) for n in ("fp", "baseline-w8a8", "dgq-w4a8", "dgq-official-w8a6", "x")] == \
        ["fp", "baseline", "dgq", "dgq", "other"]


def test_explorers_build_without_a_kernel():
    """The widgets construct and draw their default view headless (papermill must not break on them)."""
    from types import SimpleNamespace

    ts = SimpleNamespace(channel=AxisStats(-torch.rand(8), torch.rand(8)), pixel=AxisStats(-torch.rand(16),
                                                                                          torch.rand(16)),
                         shape=(8, 4, 4))
    stats = SimpleNamespace(stats=lambda layer, ti: ts, timesteps=[999.0, 500.0])
    box = P.layer_explorer(lambda i: stats, ["a.conv", "b.conv"], 2, ["p0", "p1"], default_layer="b.conv")
    assert len(box.children) == 4
    cap = SimpleNamespace(kinds={"x.attn2": "cross"}, timesteps=[999.0], prompts=["p0"],
                          key_mass={("x.attn2", 0): torch.full((2, 77), 1 / 77)}, sample_prompt=[0, 0],
                          sample_half=["uncond", "cond"], tokens=[["<|startoftext|>", "p0</w>", "<|endoftext|>"] + ["!"] * 74])
    box = P.attention_explorer(cap)
    assert len(box.children) == 5
