"""The report's pieces that follow the model family (fast): the sampler defaults, the prompt set, the recorded
settings of a run, the metrics note and the paper's rows. The whole chain on each family: test_notebook_families.py
(slow)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from dgq_utils.config.validation import InvalidArgumentError
from dgq_utils.model.tokenizer import build_word_level_tokenizer
from dgq_utils.report import chain
from dgq_utils.report import comparison as C
from dgq_utils.report.context import ModelContext, model_family_of, prompt_set_for
from dgq_utils.report.runs import start_run
from dgq_utils.report.sampling import QUICK_MAX_STEPS, report_sampling
from dgq_utils.testing.families import build_tiny_sd2_pipeline, build_tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def turbo_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("turbo") / "sdxl-turbo"
    build_tiny_sdxl_pipeline(turbo=True).save_pretrained(folder)
    return folder


def test_the_sampler_is_the_familys_unless_set_and_quick_caps_the_steps():
    turbo = report_sampling("sdxl-turbo")
    assert (turbo.num_inference_steps, turbo.guidance_scale) == (4, 0.0)
    assert turbo.steps_from == turbo.guidance_from == "family default"
    sdxl = report_sampling("sdxl", quick=True)
    assert (sdxl.num_inference_steps, sdxl.guidance_scale) == (QUICK_MAX_STEPS, 5.0)
    assert sdxl.steps_from == "family default, quick cap"
    mine = report_sampling("sd2", 10, 3, quick=False)
    assert (mine.num_inference_steps, mine.guidance_scale, mine.steps_from) == (10, 3.0, "parameter")
    assert report_sampling("sdxl-turbo", quick=True).num_inference_steps == 4  # already within the cap
    assert report_sampling("sd1", 2, quick=True).num_inference_steps == 2
    assert "4 steps (family default), guidance 0" in turbo.describe()


@pytest.mark.parametrize("args,name", [(("sdxl-turbo", 0), "num_inference_steps"),
                                       (("sdxl", None, -1.0), "guidance_scale"),
                                       (("sd3",), "family")])
def test_bad_sampler_values_name_the_argument(args, name):
    with pytest.raises(InvalidArgumentError, match=f"^{name}: got"):
        report_sampling(*args)


def test_the_chain_checks_family_sampler_parameters_declared_none(tmp_path, monkeypatch):
    import papermill as pm

    monkeypatch.setattr(pm, "execute_notebook", lambda *a, **k: pytest.fail("a notebook ran"))
    with pytest.raises(chain.ChainError, match="-p num_inference_steps: got int \\(0\\)"):
        chain.run_chain({"num_inference_steps": 0}, out_dir=tmp_path / "r", html=False)
    with pytest.raises(chain.ChainError, match="-p guidance_scale: got float \\(-2.0\\)"):
        chain.run_chain({"guidance_scale": -2.0}, out_dir=tmp_path / "r", html=False)


def test_model_family_of_report_model_ids(turbo_folder, tmp_path):
    assert model_family_of(None) == "embedded"
    assert model_family_of("tiny") == "sd1"
    assert model_family_of(str(turbo_folder)) == "sdxl-turbo"
    with pytest.raises(FileNotFoundError):
        model_family_of(str(tmp_path / "no-such-model"))


def test_prompts_follow_the_models_vocabulary():
    """A tiny family pipeline's word-level tokenizer knows the tiny grammar, not the world's captions."""
    assert prompt_set_for(build_tiny_sd2_pipeline(), "external") == "tiny"
    assert prompt_set_for(None, "embedded") == "world"
    assert prompt_set_for(None, "tiny") == "tiny"

    class Foreign:
        tokenizer = build_word_level_tokenizer(["zebra", "giraffe"], _tmp_folder())

    with pytest.raises(ValueError, match="knows neither the world's captions .* nor the tiny grammar"):
        prompt_set_for(Foreign(), "external")


def _tmp_folder():
    import tempfile

    return tempfile.mkdtemp(prefix="dgq_tok_")


def test_a_run_records_the_family_and_the_sampler_it_uses(turbo_folder, tmp_path):
    run = start_run({"model_id": str(turbo_folder), "quick": True, "save_to": str(tmp_path / "run")},
                    chain.list_notebooks())
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["settings"]["family"] == "sdxl-turbo"
    assert record["settings"]["sampler"] == {"family": "sdxl-turbo", "num_inference_steps": 4, "guidance_scale": 0.0,
                                             "steps_from": "family default", "guidance_from": "family default"}
    for values in record["resolved"].values():  # None in the notebooks = the family's values
        assert values["num_inference_steps"] == 4 and values["guidance_scale"] == 0.0
    assert run.parameters["save_to"] == str((tmp_path / "run").resolve())


def test_the_embedded_runs_resolved_settings_are_unchanged(tmp_path):
    """The embedded family's defaults are the notebooks' former literals (25, 7.5): run folders keep their names."""
    start_run({"save_to": str(tmp_path / "run")}, chain.list_notebooks())
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["settings"]["family"] == "embedded"
    assert {(v["num_inference_steps"], v["guidance_scale"]) for v in record["resolved"].values()} == {(25, 7.5)}


def test_a_model_the_chain_cannot_find_is_recorded_not_guessed(tmp_path):
    start_run({"model_id": str(tmp_path / "missing"), "save_to": str(tmp_path / "run")}, chain.list_notebooks())
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert settings["family"] is None and settings["sampler"] is None
    assert "FileNotFoundError" in settings["family_error"]


def test_metrics_a_non_embedded_model_cannot_have_are_named(capsys):
    ctx = ModelContext("/models/sdxl", "external", "cpu", None, "sdxl-key", family="sdxl")
    chosen, setup = C.comparison_setup(ctx, ["clip_score", "alignment", "psnr", "ssim"])
    assert chosen == ["psnr", "ssim"] and list(setup.metrics) == ["psnr", "ssim"]
    out = capsys.readouterr().out
    assert "metrics not computed -- clip_score, alignment:" in out and "family sdxl" in out
    assert "The tables hold: psnr, ssim." in out
    C.comparison_setup(ctx, ["psnr"])
    assert capsys.readouterr().out == ""  # nothing dropped, nothing said


def test_the_papers_rows_follow_the_family():
    assert C.paper_model_for("embedded") == C.paper_model_for("sd1") == "sd-v1.4"
    assert C.paper_model_for("sdxl-turbo") == "sdxl-turbo"
    assert C.paper_model_for("sd2") is None and C.paper_model_for("sdxl") is None
    ours = pd.DataFrame([("fp", "fid", 20.0), ("baseline-w8a8", "fid", 100.0), ("dgq-w8a8", "fid", 25.0)],
                        columns=["recipe", "metric", "value"])
    comp = C.paper_comparison(ours, metrics=["fid"], settings=["w8a8"], paper_model="sdxl-turbo")
    row = comp.iloc[0]
    # the paper's SDXL-Turbo rows: FP 21.25, TFMQ 111.69, DGQ (K = 8, the only K it reports) 22.46
    assert (row.paper_fp, row.paper_baseline, row.paper_dgq, row.paper_dgq_k) == (21.25, 111.69, 22.46, 8)
    assert row.ours_gap_closed == pytest.approx(75 / 80)
    sd = C.paper_comparison(ours, metrics=["fid"], settings=["w8a8"])
    assert (sd.iloc[0].paper_dgq, sd.iloc[0].paper_dgq_k, sd.iloc[0].paper_model) == (13.15, 16, "sd-v1.4")
