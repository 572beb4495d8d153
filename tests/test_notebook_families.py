"""The whole report on every family (slow): ``python -m dgq_utils.report --quick -p model_id <folder>`` on a tiny
random SD 2.x (v-prediction), SDXL and SDXL-Turbo pipeline (:mod:`dgq_utils.testing.families`) saved as a diffusers
folder, the way a user points the chain at a real checkpoint.

All seven notebooks run on each of the three families (papermill, one kernel per notebook, the chain's default
lanes). Measured on a 2-core CPU machine: about 60 s per family, 3.5 min for the three. What is checked, per
family: the chain completes; ``run.json`` names the family and the sampler the notebooks used (SD 2.x 4 steps
under quick mode's cap at guidance 7.5, SDXL 4 at 5.0, SDXL-Turbo its own 4 steps at guidance 0 -- family
defaults, since no -p sets them); every notebook's main table exists and has rows; the evaluation tables hold
fidelity-to-FP metrics only (the embedded world's FID / CLIP / alignment would score these images meaninglessly)
and the notebooks say so; the prompts are in the model's vocabulary (no unknown-word warning); and a calibrated
state from the shared cache loads onto a fresh pipeline with one parameter set per sampling step, at the
family's timesteps (Turbo: Euler-ancestral, trailing spacing).
"""
from __future__ import annotations

import json

import nbformat
import pandas as pd
import pytest

from dgq_utils.model.loading import load_pipeline
from dgq_utils.quantize.pipeline import get_quant_state
from dgq_utils.quantize.state import load_quant_state
from dgq_utils.report import chain
from dgq_utils.report.session import RECIPES
from dgq_utils.testing.families import build_tiny_sd2_pipeline, build_tiny_sdxl_pipeline

pytestmark = pytest.mark.slow

FAMILIES = {
    # family: (builder, steps, guidance, where the step count comes from)
    "sd2": (lambda: build_tiny_sd2_pipeline(prediction_type="v_prediction"), 4, 7.5, "family default, quick cap"),
    "sdxl": (lambda: build_tiny_sdxl_pipeline(), 4, 5.0, "family default, quick cap"),
    "sdxl-turbo": (lambda: build_tiny_sdxl_pipeline(turbo=True), 4, 0.0, "family default"),
}
TABLES = ("01_outliers_per_layer.csv", "02_error_vs_groups.csv", "03_prob_quant_error.csv", "04_fidelity.csv",
          "05_results.csv", "06_ablations.csv", "07_calibration_sizes.csv", "07_calibration_components.csv",
          "07_table2_layout.csv")
FIDELITY = {"psnr", "ssim", "lpips"}


def _outputs(path) -> str:
    """All text a notebook printed (stdout, stderr, displayed text)."""
    nb = nbformat.read(path, as_version=4)
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") if "text" in out else str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_run(request, tmp_path_factory):
    family = request.param
    build = FAMILIES[family][0]
    base = tmp_path_factory.mktemp(family)
    folder = base / f"tiny-{family}"
    build().save_pretrained(folder)
    out = base / "run"
    rc = chain.main(["--quick", "-p", "model_id", str(folder), "-p", "save_to", str(out),
                     "-p", "work_dir", str(base / "work"), "--no-html"])
    return family, folder, out, base / "work", rc


def test_the_quick_chain_completes_and_records_the_familys_sampler(family_run):
    family, folder, out, _, rc = family_run
    _, steps, guidance, steps_from = FAMILIES[family]
    assert rc == 0
    record = json.loads((out / "run.json").read_text())
    assert record["complete"] and record["error"] is None
    assert record["notebooks"] == [p.name for p in chain.list_notebooks()]
    settings = record["settings"]
    assert settings["model_id"] == str(folder) and settings["family"] == family
    assert settings["sampler"] == {"family": family, "num_inference_steps": steps, "guidance_scale": guidance,
                                   "steps_from": steps_from, "guidance_from": "family default"}
    text = _outputs(out / "notebooks" / "04_quantized_inference.ipynb")
    assert f"family {family}" in text
    assert f"sampler of the {family} family: {steps} steps ({steps_from}), guidance {guidance:g}" in text


def test_every_notebook_wrote_its_tables_with_fidelity_metrics_only(family_run):
    family, _, out, _, _ = family_run
    res = out / "results"
    for name in TABLES:
        table = pd.read_csv(res / name)
        assert len(table) > 0, f"{family}: {name} is empty"
    fidelity = pd.read_csv(res / "04_fidelity.csv")
    assert set(fidelity.recipe) == set(RECIPES) and set(fidelity.metric) <= FIDELITY
    assert fidelity.value.notna().all()
    results = pd.read_csv(res / "05_results.csv")
    assert set(results.metric) <= FIDELITY and {"fp", *RECIPES} >= set(results.recipe)
    note = _outputs(out / "notebooks" / "05_evaluation.ipynb")
    assert "metrics not computed -- fid, kid, clip_score, alignment" in note
    for book in sorted((out / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert "UnknownWordsWarning" not in _outputs(book), f"{family}: {book.name} used prompts outside the vocabulary"


def test_a_cached_state_has_one_set_per_step_at_the_familys_timesteps(family_run):
    family, folder, _, work, _ = family_run
    steps = FAMILIES[family][1]
    states = sorted(work.glob("*/quant_states/dgq-w8a8-*.safetensors"))
    assert states, f"{family}: no calibrated dgq-w8a8 state in the shared cache"
    pipe = load_pipeline(folder)
    load_quant_state(pipe, states[0])
    controller = get_quant_state(pipe).controller
    assert controller.num_sets == steps
    pipe.scheduler.set_timesteps(steps)
    assert controller.schedule == [float(t) for t in pipe.scheduler.timesteps]
    if family == "sdxl-turbo":
        assert controller.schedule == [999.0, 749.0, 499.0, 249.0]  # trailing spacing: t = 1000 - 250 k - 1
