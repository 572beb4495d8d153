"""The report's notebooks: output hygiene, the parameters contract, and that they execute in quick mode.

* Hygiene (fast): every ``notebooks/NN_*.ipynb`` is committed without outputs or execution counts and has exactly
  one ``parameters``-tagged cell declaring ``model_id = None``, ``device = "cpu"``, ``quick = False``,
  ``seed = 0``, followed by the cell that shrinks the N-like knobs when ``quick`` is set.
* Execution, fast variant: each notebook's code runs in-process (no kernel start-up) in quick mode on the tiny
  random pipeline, writing into a temporary folder.
* Execution, the real chain (``slow``): ``python -m dgq_utils.report --quick`` semantics -- papermill, one kernel
  per notebook, the default (embedded) model -- into a temporary folder; and the chain's results table is the same
  when it is recomputed from scratch.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import nbformat
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
EXPECTED = [
    "01_activation_outliers.ipynb",
    "02_grouping_decisions.ipynb",
    "03_attention_distributions.ipynb",
    "04_quantized_inference.ipynb",
    "05_evaluation.ipynb",
    "06_ablations.ipynb",
    "07_calibration_sensitivity.ipynb",
]
REQUIRED = {"model_id": None, "device": "cpu", "quick": False, "seed": 0}


def _books():
    return sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))


def _read(path):
    return nbformat.read(path, as_version=4)


def _parameters(nb) -> tuple[int, dict]:
    idx = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(idx) == 1, f"expected exactly one parameters cell, found {len(idx)}"
    cell = nb.cells[idx[0]]
    assert cell.cell_type == "code"
    values = {}
    for node in ast.parse(cell.source).body:
        assert isinstance(node, ast.Assign), f"parameters cell must hold plain assignments: {ast.dump(node)[:80]}"
        for target in node.targets:
            values[target.id] = ast.literal_eval(node.value)
    return idx[0], values


def test_the_seven_notebooks_exist():
    assert [p.name for p in _books()] == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_without_outputs(name):
    nb = _read(NB_DIR / name)
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code":
            assert c.outputs == [], f"{name} cell {i} has outputs; save notebooks without outputs"
            assert c.execution_count is None, f"{name} cell {i} has an execution count"
    assert "widgets" not in nb.metadata, f"{name} stores widget state; save without it"


@pytest.mark.parametrize("name", EXPECTED)
def test_parameters_cell_contract(name):
    nb = _read(NB_DIR / name)
    i, values = _parameters(nb)
    for key, default in REQUIRED.items():
        assert key in values and values[key] == default, f"{name}: parameters cell must declare {key} = {default!r}"
    quick_cell = nb.cells[i + 1]
    assert quick_cell.cell_type == "code" and "if quick:" in quick_cell.source, \
        f"{name}: the cell after the parameters must shrink the N-like knobs when quick is set"


def test_shared_parameters_agree_across_notebooks():
    """Notebooks 04-07 share caches and prompt lists: their common knobs must have the same defaults."""
    params = {p.name[:2]: _parameters(_read(p))[1] for p in _books()}
    for key in ("n_prompts", "n_calibration", "num_inference_steps", "guidance_scale", "batch_size", "work_dir"):
        values = {nb: v[key] for nb, v in params.items() if nb in ("04", "05", "06", "07")}
        assert len(set(map(repr, values.values()))) == 1, f"{key} differs across 04-07: {values}"
    for key in ("num_inference_steps", "guidance_scale"):
        values = {nb: v[key] for nb, v in params.items() if key in v}
        assert len(set(values.values())) == 1, f"{key} differs: {values}"


def run_in_process(path: Path, overrides: dict) -> dict:
    """Execute a notebook's code cells in this process (cwd = its folder), injecting ``overrides`` right after
    the parameters cell, as papermill does. Returns the namespace."""
    import matplotlib.pyplot as plt

    nb = _read(path)
    ns: dict = {"__name__": "__notebook__"}
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            exec(compile(cell.source, f"{path.name}[cell {i}]", "exec"), ns)  # noqa: S102
            if "parameters" in cell.metadata.get("tags", []):
                ns.update(overrides)
    finally:
        os.chdir(cwd)
        plt.close("all")
    return ns


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One shared output / work folder, so 05 and 06 reuse 04's calibrations and images, as in the chain."""
    base = tmp_path_factory.mktemp("tiny_chain")
    return {"model_id": "tiny", "quick": True, "save_to": str(base / "out"), "work_dir": str(base / "work"),
            "num_inference_steps": 2, "group_counts": [1, 4, 16], "sweep_timesteps": 2}


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs_quick_on_tiny_model(name, tiny_run):
    overrides = dict(tiny_run)
    params = _parameters(_read(NB_DIR / name))[1]
    overrides = {k: v for k, v in overrides.items() if k in params}
    run_in_process(NB_DIR / name, overrides)
    out = Path(tiny_run["save_to"])
    prefix = name[:2]
    assert list((out / "figures").glob(f"{prefix}_*.png")), f"{name} saved no figure"
    assert list((out / "results").glob(f"{prefix}_*.csv")), f"{name} wrote no table"


@pytest.mark.slow
def test_quick_chain_with_papermill_on_default_model(tmp_path):
    """What CI's smoke run of the report does: all seven notebooks, papermill, the embedded model, quick mode."""
    from dgq_utils.report.chain import run_chain

    params = {"quick": True, "save_to": str(tmp_path / "out"), "work_dir": str(tmp_path / "work")}
    runs = run_chain(params, out_dir=tmp_path / "executed", html=True, log=lambda m: None)
    assert [r.notebook for r in runs] == EXPECTED
    assert all(r.output.exists() and r.html.exists() for r in runs)
    res = tmp_path / "out" / "results"
    for table in ("01_outliers_per_layer.csv", "02_error_vs_groups.csv", "03_prob_quant_error.csv",
                  "04_fidelity.csv", "05_results.csv", "06_ablations.csv",
                  "07_calibration_sizes.csv", "07_calibration_components.csv", "07_table2_layout.csv"):
        assert (res / table).is_file(), table


@pytest.mark.slow
def test_results_table_is_the_same_when_recomputed(tmp_path):
    """Re-running with the same parameters and nothing cached gives the same results table (05)."""
    tables = []
    for run in ("a", "b"):
        params = {"model_id": "tiny", "quick": True, "save_to": str(tmp_path / run / "out"),
                  "work_dir": str(tmp_path / run / "work"), "num_inference_steps": 2}
        run_in_process(NB_DIR / "05_evaluation.ipynb", params)
        tables.append(pd.read_csv(tmp_path / run / "out" / "results" / "05_results.csv"))
    pd.testing.assert_frame_equal(tables[0], tables[1])
