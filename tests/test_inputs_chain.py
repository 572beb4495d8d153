"""The report chain: every -p value is checked against its notebooks' declared default type and an obvious
range before the first notebook runs, naming the parameter."""
from __future__ import annotations

import pytest
import torch

from dgq_utils.report import chain
from dgq_utils.report.chain import ChainError, run_chain


@pytest.fixture()
def nothing_runs(monkeypatch):
    import papermill as pm

    def refuse(*args, **kwargs):
        raise AssertionError("a notebook ran despite a bad parameter")

    monkeypatch.setattr(pm, "execute_notebook", refuse)


BAD = [
    ({"n_prompts": "abc"}, "-p n_prompts: got str ('abc'); allowed: an integer >= 1"),
    ({"n_prompts": -5}, "-p n_prompts: got int (-5)"),
    ({"n_calibration": 2.5}, "-p n_calibration: got float"),
    ({"quick": 1}, "-p quick: got int (1); allowed: True or False"),
    ({"seed": -1}, "-p seed: got int (-1)"),
    ({"guidance_scale": "high"}, "-p guidance_scale: got str"),
    ({"batch_size": 0}, "-p batch_size: got int (0)"),
    ({"group_counts": [1, 0]}, "-p group_counts: got int (0)"),
    ({"group_counts": 8}, "-p group_counts: got int (8); allowed: a non-empty list"),
    ({"bits_grid": [4, 40]}, "-p bits_grid: got int (40); allowed: an integer >= 2 and <= 16"),
    ({"act_bits": 1}, "-p act_bits: got int (1)"),
    ({"threads": 0}, "-p threads: got int (0)"),
    ({"device": "gpu"}, "-p device: got str ('gpu')"),
    ({"ablation_base": 3}, "-p ablation_base: got int (3); allowed: a string"),
]


@pytest.mark.parametrize("params,expected", BAD)
def test_bad_values_stop_the_chain_before_anything_runs(nothing_runs, tmp_path, params, expected):
    with pytest.raises(ChainError) as info:
        run_chain(params, out_dir=tmp_path / "report", html=False)
    assert expected in str(info.value) and "nothing was run" in str(info.value)
    assert not (tmp_path / "report").exists()


def test_every_problem_is_listed(nothing_runs, tmp_path):
    with pytest.raises(ChainError) as info:
        run_chain({"n_prompts": "abc", "seed": -1}, out_dir=tmp_path / "report", html=False)
    assert "-p n_prompts" in str(info.value) and "-p seed" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_unavailable_device_is_named(nothing_runs, tmp_path):
    with pytest.raises(ChainError, match="-p device: got str \\('cuda'\\).*no usable CUDA"):
        run_chain({"device": "cuda"}, out_dir=tmp_path / "report", html=False)


def test_main_reports_the_parameter_and_fails(nothing_runs, tmp_path, capsys):
    assert chain.main(["-p", "n_prompts", "abc", "--out", str(tmp_path / "r"), "--no-html"]) == 1
    assert "-p n_prompts: got str ('abc')" in capsys.readouterr().err


def test_good_values_pass_the_check():
    import papermill as pm

    from dgq_utils.report.parameters import check_chain_parameters

    inspected = {b: pm.inspect_notebook(str(b)) for b in chain.list_notebooks()}
    ok = {"n_prompts": 2, "quick": True, "guidance_scale": 7, "model_id": "/models/sd-v1-4", "threads": 2,
          "group_counts": [1, 4], "n_show": 0, "device": "cpu", "seed": 3, "save_to": None}
    assert check_chain_parameters(ok, inspected) == []
