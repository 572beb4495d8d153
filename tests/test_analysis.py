"""Notebook-level computations (dgq_utils.report): unit checks on synthetic data and the tiny pipeline."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from dgq_utils import report as A
from dgq_utils.core.grouping import AxisStats, decide_axis
from dgq_utils.calibrate.observe import ActivationStats
from dgq_utils.calibrate.trace import TRACE_SAMPLER
from dgq_utils.core.stats import TensorStats

STEPS = 2  # DDIM: 2 UNet calls
SAMPLER = TRACE_SAMPLER.replace(num_inference_steps=STEPS)


# ----------------------------------------------------------------------------------------------------------
# prompts, names, files
# ----------------------------------------------------------------------------------------------------------
def test_balanced_interleave_keeps_order_and_balances_prefixes():
    a, b, c = list(range(12)), [f"b{i}" for i in range(6)], [f"c{i}" for i in range(6)]
    out = A.balanced_interleave([a, b, c])
    assert sorted(map(str, out)) == sorted(map(str, a + b + c))
    assert [x for x in out if isinstance(x, int)] == a  # order within a list kept
    for k in range(4, len(out) + 1, 4):  # every prefix holds each list in proportion (within one item)
        pre = out[:k]
        assert abs(sum(isinstance(x, int) for x in pre) - k / 2) <= 1
        assert abs(sum(str(x).startswith("c") for x in pre) - k / 4) <= 1


def test_tiny_prompts_deterministic_and_offset_disjoint():
    p = A.tiny_prompts(10, seed=3)
    assert p == A.tiny_prompts(10, seed=3) and len(set(p)) == 10
    assert not set(p) & set(A.tiny_prompts(10, seed=3, offset=10))
    with pytest.raises(ValueError):
        A.tiny_prompts(10_000)


def test_names_blocks_and_order():
    assert A.block_of("down_blocks.1.attentions.0.proj_in") == "down_blocks.1"
    assert A.block_of("mid_block.resnets.0.conv1") == "mid_block"
    assert A.block_of("time_embedding.linear_1") == "time_embedding"
    assert A.short_name("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k") == "down1.attn0.attn2.to_k"
    names = ["up_blocks.0.resnets.0.conv1", "conv_out", "mid_block.resnets.0.conv1", "down_blocks.1.x",
             "time_embedding.linear_1", "conv_in", "down_blocks.0.x"]
    assert sorted(names, key=A.unet_rank) == ["conv_in", "time_embedding.linear_1", "down_blocks.0.x",
                                              "down_blocks.1.x", "mid_block.resnets.0.conv1",
                                              "up_blocks.0.resnets.0.conv1", "conv_out"]
    assert A.quantized_inputs(["conv_in", "a.conv1", "conv_out", "b.attn1.q"]) == ["a.conv1", "b.attn1.q"]


def test_output_dirs_never_touch_the_repo_for_smoke_runs(tmp_path, monkeypatch):
    f, r = A.output_dirs(None, quick=True, kind="embedded")
    assert f == A.ROOT / "outputs" / "quick" / "figures" and r.name == "results"
    f, _ = A.output_dirs(None, quick=False, kind="tiny")
    assert f == A.ROOT / "outputs" / "tiny" / "figures"
    f, r = A.output_dirs(tmp_path / "x", quick=False, kind="embedded")
    assert f == tmp_path / "x" / "figures" and r.is_dir()
    monkeypatch.setenv("DGQ_OUTPUT_DIR", str(tmp_path / "outputs"))  # a full run's folder: no empty one in outputs/
    f, r = A.output_dirs(None, quick=False, kind="embedded", settings={"n_prompts": 64, "n_calibration": 16})
    assert f.parent.parent == A.runs_dir() and f.parent.name.startswith("embedded-n64-c16-cpu-")  # never ROOT


def test_write_table_is_deterministic_and_atomic(tmp_path):
    df = pd.DataFrame({"a": [1.0 / 3, 2.0], "b": ["x", "y"]})
    p = A.write_table(df, tmp_path / "t.csv")
    text = p.read_text()
    assert "0.333333" in text and text == A.write_table(df, tmp_path / "t.csv").read_text()
    assert [q.name for q in tmp_path.iterdir()] == ["t.csv"]


def test_evenly_spaced():
    assert A.evenly_spaced(26, 3) == [0, 12, 25] or A.evenly_spaced(26, 3) == [0, 13, 25]
    assert A.evenly_spaced(5, 1) == [0] and A.evenly_spaced(4, 10) == [0, 1, 2, 3]


def test_open_model_tiny_and_missing_path():
    ctx = A.open_model("tiny")
    assert ctx.kind == "tiny" and ctx.model_key.startswith("tiny-")
    p = ctx.prompts(5)
    assert not set(p) & set(ctx.calibration_prompts(5, exclude=p))
    with pytest.raises(FileNotFoundError):
        A.open_model("/no/such/model/folder")


def test_setup_reads_the_parameters_and_matches_the_manual_set_up(tmp_path, capsys):
    """A.setup(globals()) gives what the notebooks' set-up cells built by hand: the same prompts, folders,
    sampler and state-cache folder; other names in the namespace are ignored."""
    ns = {"model_id": "tiny", "quick": True, "seed": 3, "save_to": str(tmp_path / "out"),
          "work_dir": str(tmp_path / "work"), "n_prompts": 4, "n_calibration": 2, "num_inference_steps": 2,
          "batch_size": 2, "n_show": 7, "A": A}
    S = A.setup(ns)
    ctx = A.open_model("tiny", work_root=tmp_path / "work")
    prompts = ctx.prompts(4, seed=3)
    assert S.ctx.model_key == ctx.model_key
    assert S.prompts == prompts and S.calibration == ctx.calibration_prompts(2, exclude=prompts, seed=3)
    assert (S.figures, S.results) == A.output_dirs(tmp_path / "out", quick=True, kind="tiny")
    assert S.sampler.num_inference_steps == 2 and S.sampler.batch_size == 2 and S.sampler.guidance_scale == 7.5
    assert S.states.state_dir == ctx.state_cache().state_dir
    assert "4 evaluation prompts, 2 calibration prompts, 2 steps" in capsys.readouterr().out
    df = pd.DataFrame({"a": [1.5, 2.0]})
    assert S.table(df, "t.csv") is df
    assert (S.results / "t.csv").read_text() == "a\n1.5\n2\n"
    assert S.fig("f.png") == S.figures / "f.png"
    # a notebook whose counts have their own names overrides them; no prompts asked for -> none drawn
    S1 = A.setup(ns, n_prompts=None, n_calibration=3)
    assert S1.prompts == [] and S1.calibration == ctx.calibration_prompts(3, seed=3)


def test_setup_rejects_unknown_settings_and_bad_parameters():
    with pytest.raises(TypeError, match="n_promts"):
        A.setup({"model_id": "tiny"}, n_promts=3)
    with pytest.raises(TypeError, match="SetupConfig or a mapping"):
        A.setup(["tiny"])


def test_protocol_comparison_needs_prompt_counts():
    S = A.setup(A.SetupConfig(model_id="tiny", quick=True))
    with pytest.raises(ValueError, match="n_prompts and n_calibration"):
        A.run_protocol_comparison(S, None, [], bootstrap=S.bootstrap())


# ----------------------------------------------------------------------------------------------------------
# statistics tables on synthetic ActivationStats
# ----------------------------------------------------------------------------------------------------------
def _stats():
    """Two layers x two timesteps: 'a' has one outlier channel, 'b' one outlier pixel."""
    st = ActivationStats()
    per_a, per_b = {}, {}
    for ti in range(2):
        xa = torch.ones(2, 8, 4, 4) * torch.linspace(0.5, 1.0, 16).view(1, 1, 4, 4)
        xa[:, 3] *= 10  # channel 3 outlier
        ta = TensorStats()
        ta.update(xa, "conv", percentiles=(99.9,))
        per_a[ti] = ta
        xb = torch.ones(2, 16, 8) * torch.linspace(0.5, 1.0, 8)
        xb[:, 5] *= 10  # token 5 outlier
        tb = TensorStats()
        tb.update(xb, "linear", percentiles=(99.9,))
        per_b[ti] = tb
    st.layers = {"down_blocks.0.resnets.0.conv1": ("conv", per_a),
                 "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": ("linear", per_b),
                 "conv_in": ("conv", per_a)}
    st.timesteps = [999.0, 1.0]
    return st


def test_outlier_table_finds_the_planted_outliers():
    st = _stats()
    t = A.outlier_table(st, threshold=4)
    assert "conv_in" not in set(t.layer)  # kept FP by every recipe
    s = A.outlier_summary(t, threshold=4).set_index("layer")
    a = s.loc["down_blocks.0.resnets.0.conv1"]
    b = s.loc["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"]
    assert a.outliers == "channel" and a.channel_ratio > 4
    assert b.outliers == "pixel" and b.pixel_ratio > 4
    assert a.n_channels == 8 and a.n_pixels == 16
    text = A.describe_outliers(s.reset_index(), threshold=4)
    assert "**1** have outlier channels only" in text and "**1** outlier pixels only" in text


def test_axis_decisions_match_grouping_rules():
    st = _stats()
    d = A.axis_decision_table(st)
    for r in d.itertuples():
        ts = st.stats(r.layer, r.timestep_index)
        assert r.official_spread == decide_axis(ts.channel, ts.pixel, "official_spread")
        assert r.outlier_ratio == decide_axis(ts.channel, ts.pixel, "outlier_ratio")
    s = A.decision_summary(d)
    assert set(s.columns) >= {"official_spread_channel_share", "outlier_ratio_majority", "rules_agree"}
    assert "rule" in A.describe_decisions(s, decisions=d)


def test_example_groups_assign_every_index():
    s = AxisStats(-torch.rand(40), torch.rand(40) * torch.linspace(1, 10, 40))
    g = A.example_groups(s, 8)
    assert len(g) == 40 and g["kmeans"].nunique() <= 8 and g["contiguous"].is_monotonic_increasing


# ----------------------------------------------------------------------------------------------------------
# on the tiny pipeline
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from dgq_utils.testing.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0, scheduler="ddim")


@pytest.fixture(scope="module")
def calib_stats(tiny):
    from dgq_utils.calibrate.observe import collect_activation_stats

    return collect_activation_stats(tiny, A.tiny_prompts(2, seed=1), SAMPLER, progress=False)


def test_group_error_sweep(tiny, calib_stats):
    layers = ["down_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"]
    sw = A.group_error_sweep(tiny, calib_stats, A.tiny_prompts(1), SAMPLER, bits=6, ks=(1, 2, 4), layers=layers,
                             progress=False)
    assert set(sw.layer) == set(layers) and set(sw.timestep_index) == {0, 1}
    base = sw[sw.axis == "tensor"]
    assert np.allclose(base.rel_mse, 1.0) and (sw.mse >= 0).all()
    grouped = sw[sw.axis != "tensor"]
    assert set(grouped.method) == {"contiguous", "sorted", "kmeans"} and set(grouped.k) == {2, 4}
    assert (grouped.k_used <= grouped.k).all()
    assert np.isfinite(sw.sqnr_db).all()
    curves = pd.concat([A.error_curve(sw, axis=a) for a in ("official", "oracle", "channel")])
    assert (curves[curves.method == "per-tensor"].gmean_rel_mse == 1).all()
    orc = A.error_curve(sw, axis="oracle").set_index(["method", "k"]).gmean_rel_mse
    off = A.error_curve(sw, axis="official").set_index(["method", "k"]).gmean_rel_mse
    assert (orc <= off + 1e-12).all()  # the oracle axis is never worse
    acc = A.axis_rule_accuracy(sw)
    assert set(acc.rule) == {"official_spread", "outlier_ratio"} and acc.picks_better_axis.between(0, 1).all()
    assert "groups" in A.describe_error_curve(curves)


def test_group_error_sweep_is_deterministic(tiny, calib_stats):
    kw = dict(sampler=SAMPLER, bits=6, ks=(1, 4), layers=["up_blocks.1.resnets.0.conv1"], progress=False)
    a = A.group_error_sweep(tiny, calib_stats, A.tiny_prompts(1), **kw)
    b = A.group_error_sweep(tiny, calib_stats, A.tiny_prompts(1), **kw)
    pd.testing.assert_frame_equal(a, b)


def test_group_error_sweep_rejects_other_schedule(tiny, calib_stats):
    with pytest.raises(ValueError, match="schedule"):
        A.group_error_sweep(tiny, calib_stats, A.tiny_prompts(1), SAMPLER.replace(num_inference_steps=STEPS + 1),
                            ks=(1,), layers=["up_blocks.1.resnets.0.conv1"], progress=False)


@pytest.fixture(scope="module")
def capture(tiny):
    return A.capture_attention(tiny, A.tiny_prompts(2), SAMPLER.replace(batch_size=2), progress=False)


def test_capture_attention(tiny, capture):
    cap = capture
    assert set(cap.kinds.values()) == {"self", "cross"}
    assert cap.sample_half == ["uncond", "uncond", "cond", "cond"] and cap.sample_prompt == [0, 1, 0, 1]
    assert cap.tokens[0][0].startswith("<|startoftext|>")
    (layer, ti), p = next(iter(cap.probs.items()))
    assert p.shape[0] == 4 and torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)
    assert cap.values[(layer, ti)].shape[:3] == (4, p.shape[1], p.shape[3])
    for (layer, ti), m in cap.key_mass.items():
        assert m.shape[0] == 4 and torch.allclose(m.sum(-1), torch.ones(()), atol=1e-5)
    # the processors are restored: the pipeline is unchanged
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(isinstance(p, AttnProcessor2_0) for p in tiny.unet.attn_processors.values())


def test_capture_attention_size_limit(tiny):
    cap = A.capture_attention(tiny, A.tiny_prompts(1), SAMPLER, max_elements_per_sample=1, progress=False)
    assert not cap.probs and len(cap.skipped) == len(cap.kinds)


def test_prob_error_and_scale_tables(capture):
    err = A.prob_error_table(capture, bits=(4, 8))
    assert set(err.quantizer) == {"log2", "uniform"} and set(err.scale) == {"per_prompt", "batch"}
    assert set(err[err.kind == "self"].start_fp) == {False}
    u = err[err.quantizer == "uniform"].groupby("bits").out_rel_err.median()
    assert u[8] < u[4]  # more bits, less error
    assert err.zeroed.between(0, 1).all()
    sc = A.scale_table(capture, bits=6)
    assert (sc.batch_over_sample >= 1 - 1e-6).all()
    assert {"log2_per_prompt_err", "uniform_batch_err"} <= set(sc.columns)
    text = A.describe_attention(pd.DataFrame(), err.assign(bits=6), sc, bits=6)
    assert "log2" in text and "batch" in text


def test_cached_quantizer_reuses_state(tiny, tmp_path):
    from dgq_utils.quantize.cache import StateCache
    from dgq_utils.quantize.pipeline import dequantize_pipeline

    q = StateCache(tmp_path)
    prompts = A.tiny_prompts(2, seed=5)
    kw = dict(model_id="tiny-test", progress=False)
    gen = lambda: tiny(["a red dog near the river"], num_inference_steps=STEPS, output_type="latent",  # noqa: E731
                       generator=torch.Generator().manual_seed(0)).images
    try:
        q.quantize(tiny, "dgq-w8a6", prompts, SAMPLER, **kw)
        first = gen()
        dequantize_pipeline(tiny)
        q.quantize(tiny, "dgq-w8a6", prompts, SAMPLER, **kw)
        second = gen()
    finally:
        dequantize_pipeline(tiny)
    assert len(q.calibrated) == 1 and len(q.hits) == 1
    assert torch.equal(first, second)
    assert len(list(tmp_path.glob("dgq-w8a6-*.safetensors"))) == 1


# ----------------------------------------------------------------------------------------------------------
# evaluation helpers
# ----------------------------------------------------------------------------------------------------------
def test_ablation_recipes_switch_one_thing_each():
    from dgq_utils.config import get_preset

    base = get_preset("dgq-w8a6")
    rs = A.ablation_recipes("dgq-w8a6")
    names = [r.name for r in rs]
    assert names[0] == "dgq-w8a6" and names[-1] == "dgq-official-w8a6" and len(set(names)) == len(names)
    d0 = base.to_dict()
    for r in rs[1:-1]:
        d = r.to_dict()
        changed = {k for k in d if k != "name" and d[k] != d0[k]}
        assert len(changed) == 1, (r.name, changed)
        assert A.ablation_label(r.name) != r.name
    assert rs[1].activations.granularity == "per_tensor" and rs[2].activations.grouping == "contiguous"
    assert rs[3].attention.quantizer == "uniform" and rs[5].attention.scale == "batch"
    assert rs[6].per_timestep is False and rs[7].attention.bos_kv_fp is True


def _per_image(values, n=50, seed=0):
    rng = np.random.default_rng(seed)
    return {name: pd.DataFrame({"prompt_index": range(n), "seed": 0, "psnr": v + rng.normal(0, 0.1, n)})
            for name, v in values.items()}


def test_paired_vs_and_dgq_vs_baseline():
    per = _per_image({"baseline-w8a6": 20.0, "dgq-w8a6": 25.0, "fp": 0.0})
    v = A.paired_vs(per, "baseline-w8a6", ["psnr", "absent"])
    row = v[v.recipe == "dgq-w8a6"].iloc[0]
    assert abs(row["diff"] - 5) < 0.1 and row.ci_low > 4.8 and row.n == 50
    d = A.dgq_vs_baseline(per, ["psnr"])
    assert list(d.setting) == ["W8A6"] and d.iloc[0]["diff"] > 4.8
    table = pd.DataFrame([{"recipe": "dgq-w8a6", "metric": "psnr", "value": 25.0},
                          {"recipe": "baseline-w8a6", "metric": "psnr", "value": 20.0}])
    assert "(better)" in A.describe_comparison(table, d, ["psnr"])
    ab = A.paired_vs(_per_image({"dgq-w8a6": 25.0, "dgq-w8a6-per-tensor": 20.0}), "dgq-w8a6", ["psnr"])
    assert "variant worse" in A.describe_ablations(ab, ["psnr"])


def test_paper_comparison_gap_closed():
    rows = []
    for r, fid, clip in (("fp", 10.0, 0.30), ("baseline-w8a8", 20.0, 0.20), ("dgq-w8a8", 15.0, 0.25)):
        rows += [{"recipe": r, "metric": "fid", "value": fid}, {"recipe": r, "metric": "clip_score", "value": clip}]
    comp = A.paper_comparison(pd.DataFrame(rows), settings=("w8a8",))
    c = comp.set_index("metric")
    assert math.isclose(c.loc["fid", "ours_gap_closed"], 0.5) and math.isclose(c.loc["clip_score", "ours_gap_closed"], 0.5)
    assert c.loc["fid", "ours_dgq_beats_baseline"] and c.loc["fid", "paper_dgq_beats_baseline"]
    # the paper's row: (TFMQ 18.85 - DGQ 13.15) / (18.85 - 14.44)
    assert math.isclose(c.loc["fid", "paper_gap_closed"], (18.85 - 13.15) / (18.85 - 14.44))


def test_headline_metrics_and_ci_halfwidths():
    assert A.headline_metrics(["psnr", "fid", "alignment_caption", "x"]) == ["alignment_caption", "fid", "psnr"]
    t = pd.DataFrame([{"recipe": "a", "metric": "psnr", "value": 1.0, "ci_low": 0.5, "ci_high": 1.5, "n": 9}])
    assert A.ci_halfwidths(t).iloc[0].median_halfwidth == 0.5
    assert A.prompt_length(["<|startoftext|>", "a</w>", "<|endoftext|>", "<|endoftext|>"]) == 3
