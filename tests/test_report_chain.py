"""The papermill chain runner, on throw-away notebooks (the real chain runs in tests/test_notebooks.py)."""
import json
from pathlib import Path

import nbformat
import pytest

from dgq_utils.report.chain import ChainError, _parse_value, default_lanes, list_notebooks, plan_lanes, run_chain


def _notebook(path, cells):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("x = 1\nquick = False")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_chain_runs_in_order_injects_parameters_and_exports_html(tmp_path):
    src = tmp_path / "nb"
    src.mkdir()
    _notebook(src / "02_second.ipynb", ["open('order.txt', 'a').write('2')"])
    _notebook(src / "01_first.ipynb", ["open('order.txt', 'a').write('1')", "assert x == 5 and quick is True"])
    out = tmp_path / "out"
    runs = run_chain({"x": 5, "quick": True}, out_dir=out, notebooks=list_notebooks(src), lanes=1,
                     log=lambda m: None)
    assert [r.notebook for r in runs] == ["01_first.ipynb", "02_second.ipynb"]
    assert (src / "order.txt").read_text() == "12"
    assert all(r.html.exists() and r.output.exists() for r in runs)
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings["seconds"]) == {"01_first.ipynb", "02_second.ipynb"}
    assert timings["total_seconds"] >= sum(timings["seconds"].values()) - 1


def test_stages_inside_notebooks_reach_the_chain_timing_log(tmp_path):
    src = tmp_path / "nb"
    src.mkdir()
    _notebook(src / "01_first.ipynb", ["from dgq_utils.timing import stage",
                                       "with stage('calibrate', recipe='r'):\n    with stage('kmeans'):\n        pass"])
    _notebook(src / "02_second.ipynb", ["from dgq_utils.timing import stage", "with stage('generate'):\n    pass"])
    out = tmp_path / "out"
    lines = []
    run_chain({}, out_dir=out, notebooks=list_notebooks(src), html=False, lanes=1, log=lines.append)
    rows = [json.loads(x) for x in (out / "timings.jsonl").read_text().splitlines()]
    assert [(r["notebook"], r["stage"]) for r in rows] == [("01_first.ipynb", "kmeans"), ("01_first.ipynb", "calibrate"),
                                                          ("02_second.ipynb", "generate")]
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings["stages"]["01_first.ipynb"]) == {"calibrate", "kmeans"}
    assert "calibrate" in (out / "timings_stages.csv").read_text()
    assert "total" in lines[-1] and "calibrate" in lines[-1]


def test_failure_names_notebook_and_cell(tmp_path):
    src = tmp_path / "nb"
    src.mkdir()
    _notebook(src / "01_ok.ipynb", ["y = 2"])
    _notebook(src / "02_bad.ipynb", ["y = 2", "raise ValueError('boom here')"])
    _notebook(src / "03_never.ipynb", ["open('ran.txt', 'w').write('x')"])
    with pytest.raises(ChainError, match=r"02_bad.ipynb failed in cell 2.*ValueError: boom here"):
        run_chain({}, out_dir=tmp_path / "out", notebooks=list_notebooks(src), html=False, lanes=1,
                  log=lambda m: None)
    assert not (src / "ran.txt").exists()


def test_parameter_values_parse_as_literals():
    assert _parse_value("3") == 3 and _parse_value("0.5") == 0.5 and _parse_value("True") is True
    assert _parse_value("cuda") == "cuda" and _parse_value("/a/b") == "/a/b"


def test_no_notebooks_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No numbered notebooks"):
        list_notebooks(tmp_path)


def test_each_notebook_gets_only_what_it_declares_and_typos_stop_the_chain(tmp_path):
    src = tmp_path / "nb"
    src.mkdir()
    _notebook(src / "01_first.ipynb", ["assert x == 3"])
    nb = nbformat.v4.new_notebook()  # declares y, not x
    params = nbformat.v4.new_code_cell("y = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("assert y == 4 and 'x' not in globals()")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, src / "02_second.ipynb")
    run_chain({"x": 3, "y": 4}, out_dir=tmp_path / "out", notebooks=list_notebooks(src), html=False,
              log=lambda m: None)
    with pytest.raises(ChainError, match=r"unknown parameter\(s\) n_promts.*declare: quick, x, y"):
        run_chain({"n_promts": 5}, out_dir=tmp_path / "out2", notebooks=list_notebooks(src), html=False,
                  log=lambda m: None)
    assert not (tmp_path / "out2").exists()  # nothing ran


def test_lanes_balance_by_measured_seconds_and_keep_numeric_order():
    books = [Path(f"{n}_x.ipynb") for n in ("01", "02", "03", "04", "05", "06", "07")]
    assert [[b.name[:2] for b in lane] for lane in plan_lanes(books, 2)] == [["03", "06", "07"],
                                                                          ["01", "02", "04", "05"]]
    assert plan_lanes(books, 1) == [books]
    assert len(plan_lanes(books[:2], 4)) == 2  # no empty lanes
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="lanes: got"):
            plan_lanes(books, bad)
    assert default_lanes({"device": "cuda"}) == 1 and default_lanes({"threads": 2}) == 1


def test_two_lanes_run_side_by_side_each_kernel_with_its_own_log_name_and_folder(tmp_path):
    src = tmp_path / "nb"
    src.mkdir()
    body = ["import os, time\nfrom dgq_utils.timing import stage",
            "t0 = time.time()\nwith stage('generate'):\n    time.sleep(3)\nt1 = time.time()",
            "open(f'{NAME}.txt', 'w').write(f'{t0} {t1} {os.getcwd()}')"]
    _notebook(src / "01_a.ipynb", ["NAME = 'a'"] + body)
    _notebook(src / "04_b.ipynb", ["NAME = 'b'"] + body)
    out = tmp_path / "out"
    lines = []
    runs = run_chain({}, out_dir=out, notebooks=list_notebooks(src), html=False, lanes=2, log=lines.append)
    assert [r.notebook for r in runs] == ["01_a.ipynb", "04_b.ipynb"]
    (a0, a1, cwd_a), (b0, b1, cwd_b) = [(src / f"{n}.txt").read_text().split() for n in "ab"]
    assert float(a0) < float(b1) and float(b0) < float(a1), "the two lanes did not overlap"
    assert Path(cwd_a) == Path(cwd_b) == src.resolve()
    rows = [json.loads(x) for x in (out / "timings.jsonl").read_text().splitlines()]
    assert sorted(r["notebook"] for r in rows) == ["01_a.ipynb", "04_b.ipynb"]
    timings = json.loads((out / "timings.json").read_text())
    assert sorted(timings["lanes"]) == [["01_a.ipynb"], ["04_b.ipynb"]]
    assert timings["total_seconds"] < timings["notebook_seconds_sum"]
    assert any("2 lanes" in line for line in lines)


def test_a_failure_in_one_lane_stops_the_other_lanes_next_notebook(tmp_path):
    src = tmp_path / "nb"
    src.mkdir()
    _notebook(src / "04_bad.ipynb", ["raise ValueError('boom in a lane')"])  # lane 1
    _notebook(src / "01_slow.ipynb", ["import time\ntime.sleep(6)"])  # lane 2, then 02
    _notebook(src / "02_never.ipynb", ["open('ran.txt', 'w').write('x')"])
    with pytest.raises(ChainError, match=r"04_bad.ipynb failed in cell 1.*boom in a lane"):
        run_chain({}, out_dir=tmp_path / "out", notebooks=list_notebooks(src), html=False, lanes=2,
                  log=lambda m: None)
    assert not (src / "ran.txt").exists()


def test_side_by_side_kernels_share_the_cpus_and_a_lone_one_keeps_them(tmp_path, monkeypatch):
    from dgq_utils.report.chain import LANE_THREAD_VARS, lane_cpu_env

    assert lane_cpu_env(1, cpus=16, environ={}) == {}
    assert lane_cpu_env(4, cpus=16, environ={}) == {name: "4" for name in LANE_THREAD_VARS}
    assert lane_cpu_env(2, cpus=2, environ={}) == {}  # the 2-core default keeps its measured form
    assert lane_cpu_env(4, cpus=3, environ={})["DGQ_KMEANS_JOBS"] == "1"  # never 0
    assert "OMP_NUM_THREADS" not in lane_cpu_env(4, cpus=16, environ={"OMP_NUM_THREADS": "2"})  # the user's wins
    # the kernels of a two-lane chain see their share
    for name in LANE_THREAD_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("dgq_utils.report.chain.available_cpus", lambda: 6)
    src = tmp_path / "nb"
    src.mkdir()
    for n in ("01", "02"):
        _notebook(src / f"{n}_env.ipynb", ["import os, json",
                                           f"open('{n}.json', 'w').write(json.dumps({{k: os.environ.get(k) for k in "
                                           f"{list(LANE_THREAD_VARS)!r}}}))"])
    lines = []
    run_chain({}, out_dir=tmp_path / "out", notebooks=list_notebooks(src), html=False, lanes=2, log=lines.append)
    for n in ("01", "02"):
        assert json.loads((src / f"{n}.json").read_text()) == {name: "3" for name in LANE_THREAD_VARS}
    assert "OMP_NUM_THREADS=3" in lines[0]
