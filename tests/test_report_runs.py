"""Run folders, the committed run, publishing and the end-of-chain comparison (dgq_utils.report.runs / publish /
compare_runs): a default run of the report never writes into the repository's figures/ and results/."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from dgq_utils.report import chain, compare_runs, folders, publish, runs, session

ROOT = Path(__file__).resolve().parents[1]


def _snapshot() -> dict:
    """Name, size and mtime of every file of the repository's figures/ and results/."""
    out = {}
    for sub in ("figures", "results"):
        for p in sorted((ROOT / sub).rglob("*")):
            if p.is_file():
                st = p.stat()
                out[str(p.relative_to(ROOT))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture()
def outputs(tmp_path, monkeypatch):
    """``DGQ_OUTPUT_DIR`` in a temporary folder (where runs/, quick/, tiny/ go)."""
    out = tmp_path / "outputs"
    monkeypatch.setenv("DGQ_OUTPUT_DIR", str(out))
    return out


# a notebook that saves the way the report's notebooks do (output_dirs of a real model, no save_to of its own)
PARAMS = 'model_id = None\ndevice = "cpu"\nquick = False\nseed = 0\nsave_to = None\nn_prompts = 64\nn_calibration = 16'
SAVES = '''
from dgq_utils.report.folders import output_dirs
figures, results = output_dirs(save_to, quick=quick, kind="embedded")
(figures / "05_fake.png").write_bytes(b"png")
rows = [("W8A8", "psnr", -3.5, -4.9, -2.2), ("W8A6", "psnr", 3.0, 2.5, 3.5)]
text = "setting,recipe,metric,diff,ci_low,ci_high,n,p_value\\n" + "".join(
    f"{s},dgq,{m},{d},{lo},{hi},{n_prompts},0\\n" for s, m, d, lo, hi in rows)
(results / "05_dgq_vs_baseline.csv").write_text(text)
'''


def _notebook(path: Path, source: str = SAVES) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(PARAMS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(source)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_output_dirs_default_is_a_run_folder_never_the_repository(outputs):
    f, r = folders.output_dirs(None, quick=False, kind="embedded",
                               settings={"model_id": None, "device": "cpu", "n_prompts": 64, "n_calibration": 16})
    assert f.parent == r.parent and f.parent.parent == outputs / "runs"
    assert f.parent.name.startswith("embedded-n64-c16-cpu-")
    assert not str(f).startswith(str(ROOT / "figures")) and not str(r).startswith(str(ROOT / "results"))
    same = folders.default_run_folder({"model_id": None, "device": "cpu", "n_prompts": 64, "n_calibration": 16,
                                       "threads": 2, "work_dir": "/elsewhere"})
    assert same == f.parent  # where caches live and how many threads: not part of the name
    other = folders.default_run_folder({"model_id": None, "device": "cpu", "n_prompts": 64, "n_calibration": 64})
    assert other != f.parent and other.name.startswith("embedded-n64-c64-cpu-")
    assert folders.default_run_folder({"model_id": "tiny"}) == outputs / "tiny"
    assert folders.default_run_folder({}, quick=True) == outputs / "quick"


def test_a_notebook_run_by_hand_writes_into_its_own_run_folder(outputs, monkeypatch, tmp_path):
    """setup() without save_to on a real model's kind: a run folder named by the notebook's settings."""
    real_open = session.open_model

    def as_embedded(*args, **kwargs):
        ctx = real_open("tiny", work_root=tmp_path / "work")
        ctx.kind = "embedded"  # what a real model reports; the folder logic is the same
        return ctx

    monkeypatch.setattr(session, "open_model", as_embedded)
    before = _snapshot()
    S = session.setup({"model_id": None, "quick": False, "n_prompts": 4, "n_calibration": 2, "save_to": None,
                       "num_inference_steps": 2})
    assert S.figures.parent.parent == outputs / "runs" and S.figures.parent.name.startswith("embedded-n4-c2-cpu-")
    S.table(pd.DataFrame({"a": [1]}), "05_x.csv")
    assert (S.results / "05_x.csv").is_file() and _snapshot() == before


def test_the_chain_writes_its_run_folder_and_compares_with_the_committed_run(outputs, monkeypatch, tmp_path, capsys):
    src = tmp_path / "nb"
    src.mkdir()
    books = [_notebook(src / "01_saves.ipynb")]
    monkeypatch.setattr(chain, "list_notebooks", lambda folder=None: list(books))
    before = _snapshot()
    assert chain.main(["--no-html", "-p", "n_prompts", "8"]) == 0
    assert _snapshot() == before, "a default run changed the repository's figures/ or results/"
    (folder,) = (outputs / "runs").iterdir()
    assert folder.name.startswith("embedded-n8-c16-cpu-")
    assert (folder / "figures" / "05_fake.png").is_file() and (folder / "results" / "05_dgq_vs_baseline.csv").is_file()
    assert (folder / "notebooks" / "01_saves.ipynb").is_file() and (folder / "notebooks" / "timings.json").is_file()
    record = json.loads((folder / "run.json").read_text())
    assert record["complete"] and record["parameters"] == {"n_prompts": 8}
    assert record["settings"]["n_prompts"] == 8 and record["settings"]["n_calibration"] == 16
    assert record["command"] == "python -m dgq_utils.report --no-html -p n_prompts 8"
    assert record["machine"]["cpus"] and record["machine"]["torch"] and "commit" in record["git"]
    assert set(record["notebooks_seconds"]) == {"01_saves.ipynb"}
    out = capsys.readouterr().out
    assert f"this run wrote into {folder}" in out and "committed run: embedded model, 2000 prompts" in out
    # the main numbers side by side: this run's -3.5 dB with the committed W8A8 PSNR difference (read from the
    # committed table, so a later publish does not break this test)
    committed = pd.read_csv(compare_runs.ROOT / "results" / compare_runs.MAIN_TABLE).set_index(["setting", "metric"])
    psnr = committed.loc[("W8A8", "psnr")]
    shown = compare_runs.format_diff(psnr["diff"], psnr.ci_low, psnr.ci_high, compare_runs.DIGITS["psnr"])
    assert "-3.50 [-4.90, -2.20]*" in out and shown in out and "NO" in out
    assert "python -m dgq_utils.report.publish" in out
    # the same settings again (e.g. --only of one notebook): the same folder, its record kept
    assert chain.main(["--no-html", "-p", "n_prompts", "8", "--only", "01"]) == 0
    assert [p.name for p in (outputs / "runs").iterdir()] == [folder.name]


def test_each_finished_notebook_is_recorded_at_once_and_complete_means_every_notebook(outputs, monkeypatch,
                                                                                       tmp_path):
    """A chain killed after its first notebook (a device call's time limit) still says what it finished; --only
    calls into the same folder add to it, and the run is complete once every notebook of the chain has run."""
    src = tmp_path / "nb"
    src.mkdir()
    books = [_notebook(src / "01_saves.ipynb"), _notebook(src / "02_stops.ipynb", "raise SystemExit('killed')")]
    monkeypatch.setattr(chain, "list_notebooks", lambda folder=None: list(books))
    assert chain.main(["--no-html", "-p", "n_prompts", "8"]) == 1
    (folder,) = (outputs / "runs").iterdir()
    record = json.loads((folder / "run.json").read_text())
    assert set(record["notebooks_seconds"]) == {"01_saves.ipynb"} and not record["complete"]
    assert record["chain_notebooks"] == ["01_saves.ipynb", "02_stops.ipynb"]
    # written as the notebook finished, not only at the chain's end: the record a killed process leaves
    seen = []
    real_note = runs.RunRecord.note

    def spy(self, run):
        real_note(self, run)
        seen.append(set(json.loads((self.folder / "run.json").read_text())["notebooks_seconds"]))

    monkeypatch.setattr(runs.RunRecord, "note", spy)
    assert chain.main(["--no-html", "-p", "n_prompts", "8", "--only", "01"]) == 0
    assert seen == [{"01_saves.ipynb"}]
    record = json.loads((folder / "run.json").read_text())
    assert not record["complete"], "only 01 of 01-02 has run: not a complete run"
    _notebook(books[1], SAVES)  # 02 fixed
    assert chain.main(["--no-html", "-p", "n_prompts", "8", "--only", "02"]) == 0
    record = json.loads((folder / "run.json").read_text())
    assert record["complete"] and set(record["notebooks_seconds"]) == {"01_saves.ipynb", "02_stops.ipynb"}


def test_bad_parameters_leave_no_run_folder(outputs, monkeypatch, tmp_path, capsys):
    src = tmp_path / "nb"
    src.mkdir()
    books = [_notebook(src / "01_saves.ipynb")]
    monkeypatch.setattr(chain, "list_notebooks", lambda folder=None: list(books))
    assert chain.main(["--no-html", "-p", "n_prompts", "abc"]) == 1
    assert "-p n_prompts" in capsys.readouterr().err
    assert not (outputs / "runs").exists() or not any((outputs / "runs").iterdir())


def _fake_run(folder: Path, *, complete=True, quick=False, notebooks=("01", "02", "03", "04", "05", "06", "07")) -> Path:
    (folder / "figures").mkdir(parents=True)
    (folder / "results").mkdir()
    (folder / "figures" / "05_results.png").write_bytes(b"new")
    (folder / "results" / "05_results.csv").write_text("recipe,metric,value\nfp,psnr,1\n")
    record = {"format": "dgq-run/1", "name": folder.name, "complete": complete, "error": None,
              "settings": {"model_id": None, "device": "cpu", "quick": quick, "n_prompts": 64, "n_calibration": 16},
              "machine": {"cpus": 2, "torch": "x", "device_name": "cpu"}, "git": {"commit": "abc"},
              "notebooks_seconds": {f"{nb}_x.ipynb": 1.0 for nb in notebooks}, "started": "2026-12-03"}
    (folder / "run.json").write_text(json.dumps(record))
    return folder


def test_publish_copies_the_run_and_declares_it(tmp_path):
    repo = tmp_path / "repo"
    (repo / "figures").mkdir(parents=True)
    (repo / "results").mkdir()
    (repo / "figures" / "05_results.png").write_bytes(b"old")
    (repo / "figures" / "demo_grid.png").write_bytes(b"demo")     # not a notebook output: never listed or pruned
    (repo / "results" / "06_gone.csv").write_text("x\n")          # a notebook output this run did not make
    run = _fake_run(tmp_path / "outputs" / "runs" / "embedded-n64-c16-cpu-0123456789")
    lines = []
    record = publish.publish(run, into=repo, log=lines.append)
    assert (repo / "figures" / "05_results.png").read_bytes() == b"new"
    assert (repo / "results" / "05_results.csv").is_file() and (repo / "figures" / "demo_grid.png").is_file()
    declared = json.loads((repo / "results" / "RUN.json").read_text())
    assert declared == record and declared["published_from"] == str(run.resolve())
    assert sorted(declared["files"]) == ["figures/05_results.png", "results/05_results.csv"]
    assert any("results/06_gone.csv" in m for m in lines) and (repo / "results" / "06_gone.csv").is_file()
    publish.publish(run, into=repo, prune=True, log=lambda m: None)
    assert not (repo / "results" / "06_gone.csv").exists() and (repo / "figures" / "demo_grid.png").exists()


@pytest.mark.parametrize("kwargs,reason", [({"quick": True}, "quick run"),
                                           ({"notebooks": ("01", "05")}, "notebooks 02, 03, 04, 06, 07")])
def test_publish_refuses_unfit_runs_unless_forced(tmp_path, kwargs, reason):
    repo = tmp_path / "repo"
    run = _fake_run(tmp_path / "run", **kwargs)
    with pytest.raises(publish.PublishError, match=reason):
        publish.publish(run, into=repo, log=lambda m: None)
    assert not (repo / "results").exists()
    assert publish.publish(run, into=repo, force=True, log=lambda m: None)["forced"]
    assert publish.main([str(tmp_path / "nothing"), "--into", str(repo)]) == 1


def test_publish_dry_run_changes_nothing(tmp_path):
    repo = tmp_path / "repo"
    publish.publish(_fake_run(tmp_path / "run"), into=repo, dry_run=True, log=lambda m: None)
    assert not repo.exists()


def test_compare_tables_side_by_side(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    head = "setting,recipe,metric,diff,ci_low,ci_high,n,p_value\n"
    (a / compare_runs.MAIN_TABLE).write_text(head + "W8A8,dgq,psnr,-3.53,-4.89,-2.21,64,0\n"
                                             "W8A8,dgq,ssim,0.01,-0.01,0.02,64,0.3\n")
    (b / compare_runs.MAIN_TABLE).write_text(head + "W8A8,dgq,psnr,-0.04,-0.28,0.20,2000,0.7\n")
    t = compare_runs.compare_tables(a, b).set_index("metric")
    assert t.loc["psnr", "this_run"] == "-3.53 [-4.89, -2.21]*" and t.loc["psnr", "committed"] == "-0.04 [-0.28, 0.20]"
    assert t.loc["psnr", "agree"] is False or t.loc["psnr", "agree"] == False  # noqa: E712
    assert t.loc["ssim", "committed"] == "—" and t.loc["ssim", "agree"] is None
    with pytest.raises(FileNotFoundError, match="05_dgq_vs_baseline.csv"):
        compare_runs.compare_tables(tmp_path / "none", b)
    assert "no comparison" in compare_runs.summary(tmp_path / "none", committed_root=tmp_path)


def test_the_committed_run_record_reads():
    record = runs.read_run(ROOT / "results")
    assert record and record["settings"]["n_prompts"] == 2000 and record["settings"]["n_calibration"] == 64
    assert "2000 prompts, 64 calibration prompts, cuda (NVIDIA H200" in runs.describe(record)
