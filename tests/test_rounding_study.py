"""Notebook 06's weight-rounding section (dgq_utils.report.rounding_study): what runs where, and the paired table."""
import numpy as np
import pandas as pd
import pytest

from dgq_utils.report.rounding_study import describe_rounding, rounding_comparison, rounding_plan, rounding_recipes


def test_plan_defaults_by_device_and_quick():
    assert rounding_plan(device="cuda").bits == ("w4a8", "w4a6") and rounding_plan(device="cuda").iters is None
    assert rounding_plan(device="cuda:1").mode == "full"
    assert not rounding_plan(device="cpu").runs  # the CPU default chain has no budget for AdaRound's calibration
    quick = rounding_plan(device="cpu", quick=True)
    assert quick.mode == "reduced" and quick.bits == ("w4a8",) and quick.iters == 20
    assert rounding_plan("full", device="cpu").bits == ("w4a8", "w4a6")
    assert not rounding_plan("skip", device="cuda").runs
    with pytest.raises(ValueError, match="weight_rounding"):
        rounding_plan("fast")


def test_recipes_pair_nearest_with_adaround():
    rr = rounding_recipes(rounding_plan("reduced"))
    assert [r.weights.rounding for r in rr] == ["nearest", "adaround"]
    assert rr[1].weights.adaround.iters == 20 and rr[0].weights.bits == rr[1].weights.bits == 4
    full = rounding_recipes(rounding_plan("full"), family="baseline")
    assert [r.name for r in full] == ["baseline-w4a8", "baseline-w4a8-adaround", "baseline-w4a6",
                                      "baseline-w4a6-adaround"]
    assert full[1].weights.adaround.iters == 1000


def test_comparison_pairs_vs_fp_and_vs_nearest():
    rr = rounding_recipes(rounding_plan("reduced"))
    rng = np.random.default_rng(0)
    base = rng.normal(20, 2, 16)

    def frame(shift):
        return pd.DataFrame({"prompt_index": range(16), "seed": 0, "psnr": base + shift + rng.normal(0, 0.01, 16)})

    per_image = {"fp": frame(0.0), rr[0].name: frame(-3.0), rr[1].name: frame(-2.0)}
    t = rounding_comparison(per_image, rr, ["psnr"], n_boot=200)
    assert set(t.reference) == {"fp", "nearest"} and len(t) == 3
    row = t[(t.reference == "nearest")].iloc[0]
    assert row.recipe == rr[1].name and row.bits == "W4A8" and row.rounding == "adaround"
    assert abs(row["diff"] - 1.0) < 0.05 and row.ci_low > 0
    text = describe_rounding(t, ["psnr"])
    assert text.startswith("W4A8 psnr: AdaRound - nearest = +0.99") and "not resolved" not in text


def test_metrics_measured_against_fp_come_from_the_table():
    rr = rounding_recipes(rounding_plan("reduced"))
    per_image = {k: pd.DataFrame({"prompt_index": range(4), "seed": 0, "psnr": [np.nan] * 4 if k == "fp" else
                                  [20.0, 21, 22, 23]}) for k in ["fp"] + [r.name for r in rr]}
    table = pd.DataFrame({"recipe": [r.name for r in rr], "metric": "psnr", "value": [21.5, 22.0],
                          "ci_low": [20.0, 20.5], "ci_high": [23.0, 23.5], "n": 4})
    t = rounding_comparison(per_image, rr, ["psnr"], n_boot=100, table=table)
    fp = t[t.reference == "fp"]
    assert list(fp["diff"]) == [21.5, 22.0] and set(fp.kind) == {"measured vs FP"}
    assert t[t.reference == "nearest"].kind.tolist() == ["paired difference"]
