"""Notebook 04's real 8-bit section (:mod:`dgq_utils.report.eightbit_study`) on the tiny random pipeline: the FP
pipeline is left untouched, the 8-bit weights really are smaller, the converted layers agree with the fake-quant
layers on identical inputs, the 8-bit images get their own cache folder, and bad input is named."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from dgq_utils import report as A
from dgq_utils.quantize.pipeline import is_quantized


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eightbit")
    S = A.setup(dict(model_id="tiny", device="cpu", quick=True, n_prompts=3, n_calibration=2, batch_size=2,
                     save_to=str(root / "run"), work_dir=str(root / "work")))
    pipe = S.ctx.pipe
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    before["components"] = {k: (id(v), getattr(v, "dtype", None)) for k, v in pipe.components.items()}
    metrics, setup = A.comparison_setup(S.ctx, ["psnr"])
    show = S.prompts[:3]
    res = S.compare(["baseline-w8a8", "dgq-w8a8"], show, tag="04", metrics=metrics, metric_setup=setup,
                    bootstrap=S.bootstrap(n_boot=50), title="8-bit test", n=3)
    study = A.eight_bit_study(S, res, show, progress=False)
    return S, res, show, study, before


def test_one_row_per_recipe_and_the_fp_pipeline_is_untouched(run):
    S, _, _, study, before = run
    t = study.table
    assert list(zip(t.recipe, t.backend)) == [("baseline-w8a8", "int8"), ("dgq-w8a8", "int8")]
    assert not is_quantized(S.ctx.pipe)
    components = before.pop("components")
    after = S.ctx.pipe.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the shared modules are the same objects, in the same dtype (nothing cast by the copy)
    assert {k: (id(v), getattr(v, "dtype", None)) for k, v in S.ctx.pipe.components.items()} == components


def test_weights_are_stored_in_8_bits_and_the_layers_agree(run):
    _, _, _, study, _ = run
    t = study.table
    assert (t.gemm_layers_8bit > 0).all() and (t.gemm_layers_8bit <= t.quantized_layers).all()
    # 1 byte per weight plus per-channel scales: well under the 4-byte float32 weights and the fake-quant copy
    assert (t.weight_mib_8bit < 0.5 * t.weight_mib_fp).all()
    assert (t.weight_mib_fake_quant > t.weight_mib_fp).all()
    assert (t.layer_rel_l2_max < 1e-5).all()  # float rounding, nothing more
    assert (t.timestep_sets > 1).all()  # the check ran under every calibrated set, not only the first call's
    for r in study.runs:
        assert len(r.agreement) == len(r.report.converted)  # every converted layer was checked


def test_images_are_their_own_cache_entries_and_the_numbers_are_finite(run):
    _, res, show, study, _ = run
    for r in study.runs:
        assert len(r.images) == len(show) and len(r.psnr_vs_fake_quant) == len(show)
        assert r.images.folder != res.generations[r.recipe].folder
        assert "+8bit-int8" in r.images.meta["calibration"]
    cols = ["psnr_vs_fake_quant_mean", "psnr_vs_fp_mean", "timed_psnr_8bit_vs_fake_quant",
            "timed_psnr_nudged_vs_fake_quant", "call_ms_fake_quant", "call_ms_8bit"]
    assert study.table[cols].notna().all().all() and (study.table[cols] > 0).all().all()
    assert (study.table.control_nudge == torch.finfo(torch.float32).eps).all()


def test_the_timing_batch_is_the_grids_first_batch(run):
    """The timed fake-quant batch uses the grid's noise and generators: its images are the cached ones."""
    S, _, show, study, _ = run
    from dgq_utils.evaluate.metrics.pairwise import PSNR_CAP_DB

    assert (study.table.n_timed == min(len(show), S.sampler.batch_size)).all()
    assert (study.table.timed_psnr_fake_quant_vs_grid == PSNR_CAP_DB).all()  # bit-identical images


def test_prose_names_the_cpu_emulation_and_the_numbers(run):
    _, _, _, study, _ = run
    text = A.describe_eight_bit(study)
    assert "emulated exactly" in text and "not a speed result" in text
    first = study.table.iloc[0]
    assert f"{first.weight_mib_8bit:.1f} MiB" in text
    for r in study.table.itertuples():
        gap = r.timed_psnr_nudged_vs_fake_quant - r.timed_psnr_8bit_vs_fake_quant
        said = "no further than rounding-size noise moves them" if gap <= A.CONTROL_MARGIN_DB else \
            f"lie {gap:.1f} dB further"
        assert said in text
    assert A.describe_eight_bit(A.EightBitStudy(pd.DataFrame(), [], "cpu")) == "No 8-bit run."


def test_a_second_run_reuses_the_8bit_images(run):
    S, res, show, study, _ = run
    again = A.eight_bit_study(S, res, show, recipes=["dgq-w8a8"], progress=False)
    (r,) = again.runs
    assert r.images.generated == 0 and r.images.reused == len(show)
    assert list(r.images.manifest.sha256) == list(study.runs[1].images.manifest.sha256)


def test_bad_input_is_named(run):
    S, res, show, _, _ = run
    with pytest.raises(ValueError, match="only W8A8"):
        A.eight_bit_study(S, res, show, recipes=["dgq-w4a8"])
    with pytest.raises(ValueError, match="recipes"):
        A.eight_bit_study(S, res, show, recipes="dgq-w8a8")
    with pytest.raises(ValueError, match="backends"):
        A.eight_bit_study(S, res, show, backends=["int4"])
    with pytest.raises(ValueError, match="has 3 images but prompts has 2"):
        A.eight_bit_study(S, res, show[:2])
    with pytest.raises(ValueError, match="backends"):
        A.eight_bit_study(S, res, show, backends="int8")
    with pytest.raises(ValueError, match="twice"):
        A.eight_bit_study(S, res, show, recipes=["dgq-w8a8", "dgq-w8a8"])


def test_a_comparison_made_with_another_state_is_refused(run, tmp_path):
    S, res, show, _, _ = run
    other = A.setup(dict(model_id="tiny", device="cpu", quick=True, n_prompts=3, n_calibration=1, batch_size=2,
                         save_to=str(tmp_path / "run"), work_dir=str(tmp_path / "work")))
    with pytest.raises(ValueError, match="calibrated state"):
        A.eight_bit_study(other, res, show, recipes=["dgq-w8a8"])


def test_the_numbers_are_the_same_when_recomputed(run):
    S, res, show, study, _ = run
    again = A.eight_bit_study(S, res, show, recipes=["dgq-w8a8"], progress=False).table
    fixed = [c for c in again.columns if not c.startswith(("call_ms", "time_"))]
    pd.testing.assert_frame_equal(again[fixed].reset_index(drop=True),
                                  study.table[study.table.recipe == "dgq-w8a8"][fixed].reset_index(drop=True))


def test_backends_follow_the_device():
    assert A.eight_bit_backends("cpu") == ("int8",)


@pytest.mark.gpu
def test_gpu_section_runs_the_triton_kernels_and_both_backends(tmp_path):
    """The section with ``device="cuda"``: int8 (and fp8 on Hopper / Ada) rows, the layers agree with the fake-quant
    layers (float32 tiny pipeline: the int8 kernel's fp32 epilogue), peak memory recorded."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    S = A.setup(dict(model_id="tiny", device="cuda", quick=True, n_prompts=3, n_calibration=2, batch_size=2,
                     save_to=str(tmp_path / "run"), work_dir=str(tmp_path / "work")))
    metrics, setup = A.comparison_setup(S.ctx, ["psnr"])
    show = S.prompts[:3]
    res = S.compare(["dgq-w8a8"], show, tag="04", metrics=metrics, metric_setup=setup,
                    bootstrap=S.bootstrap(n_boot=50), title="8-bit gpu test", n=3)
    study = A.eight_bit_study(S, res, show, recipes=["dgq-w8a8"], progress=False)
    t = study.table
    assert list(t.backend) == list(A.eight_bit_backends("cuda"))
    int8 = t[t.backend == "int8"].iloc[0]
    assert int8.layer_rel_l2_max < 1e-4
    assert (t.weight_mib_8bit < 0.5 * t.weight_mib_fp).all()
    assert t.peak_mib_8bit.notna().all() and t.peak_mib_fake_quant.notna().all()
    assert "emulated exactly" not in A.describe_eight_bit(study)
    assert not is_quantized(S.ctx.pipe)
