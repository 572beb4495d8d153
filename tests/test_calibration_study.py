"""Notebook 07's computations: the calibration-size sweep table, the component study and its sentence, the paper
grid's Table-2 layout, and the keys that keep states / images of different calibration sets apart (fast, tiny
synthetic tables; no pipeline)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dgq_utils.config import SamplerSettings, get_preset
from dgq_utils.generate.images import cache_key
from dgq_utils.quantize.cache import state_key
from dgq_utils import report as A
from dgq_utils.report import calibration_study as C
from dgq_utils.report.prose import describe_calibration_components, describe_calibration_sizes
from dgq_utils.report.session import Session, SetupConfig


def _per_image(values: dict[str, np.ndarray], metric: str = "psnr") -> dict[str, pd.DataFrame]:
    n = len(next(iter(values.values())))
    return {name: pd.DataFrame({"prompt_index": range(n), "seed": 0, "prompt": [f"p{i}" for i in range(n)],
                                metric: v}) for name, v in values.items()}


def _noise(n=64, seed=0, scale=0.05):
    return np.random.default_rng(seed).normal(0, scale, n)


# ------------------------------------------------------------------------------------------------ recipes
def test_component_recipes_change_one_thing_each_and_filter():
    rs = C.component_recipes("w8a8")
    names = [r.name for r in rs]
    assert names[0] == "dgq-w8a8" and "baseline-w8a8" in names and len(set(names)) == len(names)
    d, b = get_preset("dgq-w8a8"), get_preset("baseline-w8a8")
    by = {r.name: r for r in rs}
    assert by["dgq-w8a8-contiguous"].activations.grouping == "contiguous"
    assert by["dgq-w8a8-contiguous"].attention == d.attention
    ema = by["dgq-w8a8-per-tensor-ema"].activations
    assert (ema.granularity, ema.range_estimator) == ("per_tensor", "ema")
    assert by["dgq-w8a8-shared-timesteps"].per_timestep is False
    assert by["dgq-w8a8-baseline-softmax"].attention == b.attention
    assert by["baseline-w8a8-log2-softmax"].attention == d.attention
    assert by["baseline-w8a8-log2-softmax"].activations == b.activations
    few = [r.name for r in C.component_recipes("w8a8", ["-contiguous"])]
    assert few == ["dgq-w8a8", "dgq-w8a8-contiguous", "baseline-w8a8"]
    with pytest.raises(ValueError, match="components: unknown"):
        C.component_recipes("w8a8", ["-kmeans"])
    assert all(C.component_label(n) != n for n in names)


def test_paper_grid_recipes_map_k_to_presets():
    assert C.paper_grid_recipes(["w4a6"], [8, 16]) == ["baseline-w4a6", "dgq-w4a6-g8", "dgq-w4a6"]
    with pytest.raises(ValueError, match="unknown preset"):
        C.paper_grid_recipes(["w4a6"], [32])
    assert C.sweep_sizes([16, 4, 4]) == [4, 16]
    with pytest.raises(ValueError, match="calibration_sizes"):
        C.sweep_sizes([0])


# ------------------------------------------------------------------------------------------------ tables
def test_component_table_shares_of_the_gap():
    n = 64
    fp = np.full(n, 30.0)
    dgq = 20.0 + _noise(n, 1)
    base = 24.0 + _noise(n, 2)
    per = _per_image({"fp": fp, "dgq-w8a8": dgq, "dgq-w8a8-contiguous": dgq + 0.1 + _noise(n, 3, 0.01),
                      "dgq-w8a8-per-tensor-ema": base + _noise(n, 4, 0.01), "baseline-w8a8": base})
    t = C.component_table(per, ["psnr"], base="dgq-w8a8", baseline="baseline-w8a8", n_boot=200)
    t = t.set_index("recipe")
    assert t.loc["baseline-w8a8", "gap"] == pytest.approx(4.0, abs=0.1)
    assert bool(t.loc["baseline-w8a8", "gap_resolved"])
    assert t.loc["dgq-w8a8-per-tensor-ema", "gap_closed"] == pytest.approx(1.0, abs=0.05)
    assert t.loc["dgq-w8a8-contiguous", "gap_closed"] == pytest.approx(0.025, abs=0.02)
    text = describe_calibration_components(t.reset_index(), "psnr", n_calibration=4)
    assert "What closes the gap:** groups → per-tensor EMA" in text and "4 calibration prompts" in text
    assert "DGQ worse than the baseline" in text


def test_component_sentence_without_a_gap_or_without_a_closer():
    n = 64
    same = 20.0 + _noise(n, 1)
    per = _per_image({"dgq-w8a8": same, "baseline-w8a8": same + _noise(n, 2, 0.01),
                      "dgq-w8a8-contiguous": same})
    t = C.component_table(per, ["psnr"], base="dgq-w8a8", baseline="baseline-w8a8", n_boot=200)
    assert t.gap_closed.isna().all()
    assert "not resolved" in describe_calibration_components(t, "psnr")
    per = _per_image({"dgq-w8a8": same, "baseline-w8a8": same + 3, "dgq-w8a8-contiguous": same + 0.5})
    t = C.component_table(per, ["psnr"], base="dgq-w8a8", baseline="baseline-w8a8", n_boot=200)
    assert "No single component closes the gap" in describe_calibration_components(t, "psnr")
    with pytest.raises(ValueError, match="per_image needs"):
        C.component_table(per, ["psnr"], base="dgq-w8a6", baseline="baseline-w8a8")


def test_sweep_table_and_its_sentence():
    n = 64
    paired, per = {}, {}
    for n_cal, gap in ((4, -3.0), (64, 0.0)):
        dgq = 20.0 + gap + _noise(n, n_cal)
        base = 20.0 + _noise(n, n_cal + 1)
        per[n_cal] = _per_image({"fp": np.full(n, 30.0), "baseline-w8a8": base, "dgq-w8a8": dgq})
        paired[n_cal] = pd.DataFrame([{"recipe": r, "metric": "psnr", "value": v.mean() - 30, "ci_low": -11,
                                       "ci_high": -9, "n": n} for r, v in (("baseline-w8a8", base), ("dgq-w8a8", dgq))])
    t = C.calibration_sweep_table(paired, per, ["psnr"], n_boot=200)
    assert set(t.comparison) == {"vs fp", "dgq - baseline"} and set(t.n_calibration) == {4, 64}
    assert (t.setting == "W8A8").all()
    g = t[t.comparison == "dgq - baseline"].set_index("n_calibration")
    assert g.loc[4, "diff"] == pytest.approx(-3.0, abs=0.1)
    text = describe_calibration_sizes(t, "psnr")
    assert "DGQ worse than the baseline at 4 calibration prompts" in text and "not resolved at 64" in text


def test_table2_layout_puts_paper_numbers_beside_ours():
    recipes = C.paper_grid_recipes(["w8a8", "w4a6"], [8, 16])
    table = pd.DataFrame([{"recipe": r, "metric": "fid", "value": 10.0 + i, "ci_low": 9.0 + i, "ci_high": 11.0 + i}
                          for i, r in enumerate(["fp", "baseline-w8a8", "dgq-w8a8"])])
    lay = C.paper_table2_layout(table, recipes, ["fid"]).set_index("recipe")
    assert list(lay.index) == ["fp"] + recipes
    assert lay.loc["fp", "paper_fid"] == pytest.approx(14.44)
    assert lay.loc["baseline-w8a8", "paper_fid"] == pytest.approx(18.85)  # the TFMQ row
    assert lay.loc["dgq-w4a6-g8", "paper_fid"] == pytest.approx(51.94) and lay.loc["dgq-w4a6-g8", "k"] == 8
    assert lay.loc["dgq-w8a8", "ours_fid"] == 12.0 and lay.loc["dgq-w8a8", "ours_fid_low"] == 11.0
    assert math.isnan(lay.loc["dgq-w4a6", "ours_fid"])


def test_table2_layout_follows_the_paper_model_of_the_family():
    """SDXL-Turbo gets the paper's Turbo rows (DGQ at K = 8 only), a family the paper did not run gets none."""
    recipes = C.paper_grid_recipes(["w8a6"], [8, 16])
    table = pd.DataFrame([{"recipe": "fp", "metric": "fid", "value": 1.0, "ci_low": 0.5, "ci_high": 1.5}])
    turbo = C.paper_table2_layout(table, recipes, ["fid"], paper_model="sdxl-turbo").set_index("recipe")
    assert turbo.loc["fp", "paper_fid"] == pytest.approx(21.25)
    assert turbo.loc["baseline-w8a6", "paper_fid"] == pytest.approx(163.02)
    assert turbo.loc["dgq-w8a6-g8", "paper_fid"] == pytest.approx(34.31)
    assert math.isnan(turbo.loc["dgq-w8a6", "paper_fid"])
    none = C.paper_table2_layout(table, recipes, ["fid"], paper_model=None)
    assert none[["paper_is", "paper_fid", "paper_clip_score"]].isna().all().all() and none.ours_fid.iloc[0] == 1.0
    assert A.paper_model_for("sdxl-turbo") == "sdxl-turbo" and A.paper_model_for("sd2") is None


# ------------------------------------------------------------------------------------------------ keys
def test_calibration_count_reaches_the_state_and_image_keys():
    prompts = [f"a red dog {i}" for i in range(16)]
    s = SamplerSettings()
    assert state_key("m", "dgq-w8a8", prompts[:4], s, 0) != state_key("m", "dgq-w8a8", prompts, s, 0)
    old = cache_key("m", s, "h")
    assert cache_key("m", s, "h", calibration=None) == old  # FP and callers without a state keep their key
    assert cache_key("m", s, "h", calibration="dgq-a.safetensors") not in (
        old, cache_key("m", s, "h", calibration="dgq-b.safetensors"))


class _Ctx:
    def calibration_prompts(self, n, *, exclude=(), seed=0):
        return [f"cal {seed} {i}" for i in range(n) if f"cal {seed} {i}" not in exclude]


def test_session_calibration_set_by_count():
    cfg = SetupConfig(n_prompts=2, n_calibration=3)
    own = ["cal 0 0", "cal 0 1", "cal 0 2"]
    s = Session(cfg, _Ctx(), None, None, ["p0", "p1"], own, SamplerSettings())
    assert s.calibration_set() == own and s.calibration_set(3) == own
    assert s.calibration_set(5) == [f"cal 0 {i}" for i in range(5)]
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="n_calibration: got"):
            s.calibration_set(bad)


def test_sweep_takes_fidelity_metrics_from_the_results_table():
    per = {4: _per_image({"fp": np.full(8, 30.0), "baseline-w8a8": 20 + _noise(8, 1), "dgq-w8a8": 18 + _noise(8, 2)})}
    paired = {4: pd.DataFrame(columns=["recipe", "metric", "value", "ci_low", "ci_high", "n"])}
    tables = {4: pd.DataFrame([{"recipe": r, "metric": "psnr", "value": v, "ci_low": v - 1, "ci_high": v + 1, "n": 8}
                               for r, v in (("fp", np.inf), ("baseline-w8a8", 20.0), ("dgq-w8a8", 18.0))])}
    t = C.calibration_sweep_table(paired, per, ["psnr"], tables_by_size=tables, n_boot=100)
    vs = t[t.comparison == "vs fp"].set_index("recipe")
    assert list(vs.index) == ["baseline-w8a8", "dgq-w8a8"] and vs.loc["dgq-w8a8", "diff"] == 18.0
