"""Tidy results tables: dedupe by (recipe, metric), atomic CSV + Markdown, partial tables stay valid."""
import math
import os

import pandas as pd
import pytest

from dgq_utils.evaluate.confidence import bootstrap_mean
from dgq_utils.evaluate.results import COLUMNS, ResultsTable, make_row, report_view, row_from_ci, tidy, to_markdown


def test_add_writes_csv_and_markdown(tmp_path):
    t = ResultsTable(tmp_path / "results")
    t.add([make_row("fp", "clip_score", 0.3, 0.29, 0.31, 64), make_row("fp", "fid", 12.0, 10.0, 14.5, 64)])
    assert (tmp_path / "results.csv").exists() and (tmp_path / "results.md").exists()
    df = pd.read_csv(tmp_path / "results.csv")
    assert list(df.columns[:6]) == COLUMNS and len(df) == 2
    md = (tmp_path / "results.md").read_text()
    assert "| recipe | clip_score | fid |" in md and "0.3 [0.29, 0.31]" in md and "12 [10, 14.5]" in md


def test_rows_replace_by_key_and_survive_reload(tmp_path):
    t = ResultsTable(tmp_path / "r.csv")
    t.add([make_row("fp", "clip_score", 0.3, n=1)])
    t.add([make_row("dgq-w8a8", "clip_score", 0.29, n=1)])
    t.add([make_row("fp", "clip_score", 0.31, n=2)])  # recomputed: replaces, no duplicate
    again = ResultsTable(tmp_path / "r")
    assert len(again.df) == 2
    assert again.df.set_index(["recipe", "metric"]).loc[("fp", "clip_score"), "value"] == 0.31
    assert again.recipes() == ["fp", "dgq-w8a8"] and again.has("fp", "clip_score") and not again.has("fp", "fid")


def test_interrupted_write_keeps_the_previous_table(tmp_path, monkeypatch):
    t = ResultsTable(tmp_path / "results")
    t.add([make_row("fp", "psnr", 30.0, n=3)])
    before = (tmp_path / "results.csv").read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        t.add([make_row("dgq-w8a8", "psnr", 28.0, n=3)])
    monkeypatch.undo()
    assert (tmp_path / "results.csv").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temp file left behind
    assert ResultsTable(tmp_path / "results").recipes() == ["fp"]


def test_row_from_ci_and_report_view():
    ci = bootstrap_mean([0.1, 0.2, 0.3, 0.4])
    row = row_from_ci("dgq-w8a6", "clip_score", ci, note="x")
    assert row["n"] == 4 and row["ci_method"] == "percentile" and row["note"] == "x"
    df = tidy([row, make_row("fp", "clip_score", 0.5), make_row("fp", "lpips", math.nan, note="skipped: no weights")])
    wide = report_view(df, recipe_order=["fp", "dgq-w8a6"])
    assert list(wide["recipe"]) == ["fp", "dgq-w8a6"]
    assert wide.loc[0, "clip_score"] == "0.5" and wide.loc[0, "lpips"] == ""
    assert wide.loc[1, "clip_score"].startswith("0.25 [")


def test_markdown_escapes_pipes():
    md = to_markdown(pd.DataFrame({"a": ["x|y"], "b": [1.0]}))
    assert "x\\|y" in md and md.count("\n") == 3


def test_bad_columns_and_foreign_csv(tmp_path):
    with pytest.raises(ValueError, match="unknown result columns"):
        make_row("fp", "fid", 1.0, colour="red")
    (tmp_path / "results.csv").write_text("not,a,results\ntable,,\n")
    t = ResultsTable(tmp_path / "results")
    assert t.df.empty and (tmp_path / "results.csv.corrupt").exists()
