"""The stage timing log: written only when asked, nested stages marked, read back and summed per stage."""
import json

import pytest
import torch

from dgq_utils import timing
from dgq_utils.core import weight_memo
from dgq_utils.core.quantizers import weight_qparams


def test_stage_writes_nothing_without_the_log_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(timing.LOG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with timing.stage("x", recipe="r") as info:
        info["n"] = 3
    assert list(tmp_path.iterdir()) == []


def test_stages_nest_and_sum_per_notebook(tmp_path, monkeypatch):
    log = tmp_path / "t.jsonl"
    monkeypatch.setenv(timing.LOG_ENV, str(log))
    monkeypatch.setenv(timing.NOTEBOOK_ENV, "05_evaluation.ipynb")
    with timing.stage("calibrate", recipe="dgq-w8a6") as info:
        with timing.stage("kmeans", n=4):
            pass
        info["cached"] = False
    with timing.stage("calibrate", recipe="dgq-w8a8"):
        pass

    @timing.timed_stage("figure")
    def draw():
        return 7

    assert draw() == 7
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(x["stage"], x["depth"]) for x in lines] == [("kmeans", 1), ("calibrate", 0), ("calibrate", 0),
                                                         ("figure", 0)]
    assert lines[1]["info"] == {"recipe": "dgq-w8a6", "cached": False}
    assert all(x["notebook"] == "05_evaluation.ipynb" and x["seconds"] >= 0 for x in lines)
    with open(log, "a") as f:
        f.write('{"notebook": "05", "stage": "trunc')  # a killed process's half line is skipped
    top = timing.summarise(log)
    assert dict(zip(top.stage, top["count"])) == {"calibrate": 2, "figure": 1}
    both = timing.summarise(log, all_depths=True)
    assert set(both.stage) == {"calibrate", "kmeans", "figure"}


def test_stage_times_even_when_the_block_raises(tmp_path, monkeypatch):
    log = tmp_path / "t.jsonl"
    monkeypatch.setenv(timing.LOG_ENV, str(log))
    with pytest.raises(RuntimeError):
        with timing.stage("generate"):
            raise RuntimeError("boom")
    assert json.loads(log.read_text())["stage"] == "generate"
    with timing.stage("after"):
        pass
    assert json.loads(log.read_text().splitlines()[-1])["depth"] == 0


def test_bad_stage_name_is_a_clear_error():
    with pytest.raises(ValueError, match="stage name"):
        with timing.stage(""):
            pass


def test_empty_or_missing_log_summarises_to_an_empty_table(tmp_path):
    assert timing.summarise(tmp_path / "none.jsonl").empty
    assert timing.read_log(tmp_path / "none.jsonl").empty


@pytest.mark.parametrize("range_method", ["minmax", "mse"])
def test_weight_memo_returns_the_search_result_and_copies(range_method):
    weight_memo.clear_weight_memo()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, 3, 3, generator=g)
    want = weight_qparams(w, 4, granularity="per_channel", symmetric=False, range_method=range_method)
    a = weight_memo.memo_weight_qparams(w, 4, range_method=range_method)
    b = weight_memo.memo_weight_qparams(w.clone(), 4, range_method=range_method)  # same bytes: a hit
    assert weight_memo.weight_memo_info() == {"entries": 1, "hits": 1, "misses": 1, "rounding_entries": 0,
                                              "rounding_hits": 0, "rounding_misses": 0}
    for got in (a, b):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    b[0].mul_(2)  # a caller changing its copy does not change the memo
    c = weight_memo.memo_weight_qparams(w, 4, range_method=range_method)
    assert torch.equal(c[0], want[0])
    # other bits, other weight bytes: misses, not wrong answers
    d = weight_memo.memo_weight_qparams(w, 8, range_method=range_method)
    assert torch.equal(d[0], weight_qparams(w, 8, range_method=range_method)[0])
    w2 = w.clone()
    w2[0, 0, 0, 0] += 1.0
    e = weight_memo.memo_weight_qparams(w2, 4, range_method=range_method)
    assert torch.equal(e[0], weight_qparams(w2, 4, range_method=range_method)[0])
    assert weight_memo.weight_memo_info()["misses"] == 3
