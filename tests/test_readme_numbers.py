"""The README's numbers come from the committed run: its result tables (and the prose numbers listed in
:data:`PROSE`) are parsed and every number is checked against the committed CSVs in ``results/``, to the
printed rounding (a number printed with d decimals may differ from the CSV by half a unit of its last digit).
Bold entries of the paired tables must be exactly those whose CI excludes 0. ``results/RUN.json`` must declare the
run that the README's results heading names.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "results"
NUMBER = re.compile(r"[+\-−]?\d+(?:\.\d+)?")

#: columns of the README's tables -> metric names in the CSVs
METRICS = {"caption alignment": "alignment_caption", "CLIP score": "clip_score", "FID": "fid", "KID": "kid",
           "PSNR": "psnr", "SSIM": "ssim"}


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _table(header_start: str) -> tuple[list[str], list[list[str]]]:
    """The markdown table whose header line starts with ``header_start``: (header cells, body rows' cells)."""
    lines = _readme().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(header_start)]
    assert len(starts) == 1, f"expected one README table starting {header_start!r}, found {len(starts)}"
    i = starts[0]
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    header = cells(lines[i])
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return header, rows


def _metric(column: str) -> str:
    for label, metric in METRICS.items():
        if column.startswith(label):
            return metric
    raise AssertionError(f"README column {column!r} maps to no metric")


def _numbers(cell: str) -> list[str]:
    return NUMBER.findall(cell.replace("**", ""))


def _value(text: str) -> float:
    return float(text.replace("−", "-"))


def _matches(printed: str, actual: float) -> bool:
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(_value(printed) - float(actual)) <= 0.5 * 10 ** -decimals * (1 + 1e-9) + 1e-12


def _check(cell: str, values: tuple, where: str, problems: list[str], *, bold_rule: bool = False) -> None:
    printed = _numbers(cell)
    if len(printed) != len(values):
        problems.append(f"{where}: README {cell!r} has {len(printed)} numbers, CSV has {len(values)}")
        return
    for p, v in zip(printed, values):
        if not _matches(p, v):
            problems.append(f"{where}: README {p} vs CSV {v:.6g} (cell {cell!r})")
    if bold_rule:
        excludes_zero = values[1] > 0 or values[2] < 0
        if excludes_zero != cell.startswith("**"):
            problems.append(f"{where}: bold is {cell.startswith('**')} but the CI "
                            f"[{values[1]:.4g}, {values[2]:.4g}] {'excludes' if excludes_zero else 'includes'} 0")


def test_results_table_matches_05_results_csv():
    header, rows = _table("| recipe | caption alignment")
    df = pd.read_csv(RESULTS / "05_results.csv").set_index(["recipe", "metric"])
    problems = []
    assert [r[0] for r in rows] == ["fp", "baseline-w8a8", "dgq-w8a8", "baseline-w8a6", "dgq-w8a6",
                                    "baseline-w4a8", "dgq-w4a8"]
    for row in rows:
        for column, cell in zip(header[1:], row[1:]):
            key = (row[0], _metric(column))
            if cell == "—":
                assert key not in df.index or row[0] == "fp", f"{key}: README shows no value"
                continue
            r = df.loc[key]
            _check(cell, (r.value, r.ci_low, r.ci_high), f"05_results {key}", problems)
    assert not problems, "\n".join(problems)


def test_dgq_vs_baseline_table_matches_its_csv():
    header, rows = _table("| setting | caption alignment")
    df = pd.read_csv(RESULTS / "05_dgq_vs_baseline.csv").set_index(["setting", "metric"])
    problems = []
    assert [r[0] for r in rows] == ["W8A8", "W8A6", "W4A8"]
    for row in rows:
        for column, cell in zip(header[1:], row[1:]):
            r = df.loc[(row[0], _metric(column))]
            _check(cell, (r["diff"], r.ci_low, r.ci_high), f"05_dgq_vs_baseline {row[0]} {column}", problems,
                   bold_rule=True)
    assert not problems, "\n".join(problems)


def test_ablation_table_matches_06_csvs():
    header, rows = _table("| variant | caption alignment")
    labels = pd.read_csv(RESULTS / "06_ablations_wide.csv").set_index("variant").recipe
    df = pd.read_csv(RESULTS / "06_ablations_vs_dgq.csv").set_index(["recipe", "metric"])
    problems = []
    assert len(rows) == len(df.index.get_level_values(0).unique())
    for row in rows:
        label = row[0].replace("`", "")
        assert label in labels.index, f"README ablation {label!r} is no variant of 06_ablations_wide.csv"
        for column, cell in zip(header[1:], row[1:]):
            r = df.loc[(labels[label], _metric(column))]
            _check(cell, (r["diff"], r.ci_low, r.ci_high), f"06_ablations_vs_dgq {label} {column}", problems,
                   bold_rule=True)
    assert not problems, "\n".join(problems)


def test_table2_layout_matches_07_csv():
    """The paper's grid in the README (laid out like its Table 2): the paper's numbers and ours, row by row."""
    header, rows = _table("| setting | method | paper FID")
    df = pd.read_csv(RESULTS / "07_table2_layout.csv")
    assert len(rows) == len(df), f"README Table 2 has {len(rows)} rows, 07_table2_layout.csv {len(df)}"
    problems = []
    columns = {"paper FID": ("paper_fid",), "paper CLIP": ("paper_clip_score",)}
    for column in header[4:]:
        metric = _metric(column)
        columns[column] = tuple(f"ours_{metric}{s}" for s in ("", "_low", "_high"))
    for row, r in zip(rows, df.itertuples()):
        method = r.method if pd.isna(r.k) else f"{r.method} K = {int(r.k)}"
        assert (row[0], row[1]) == (r.setting, method), f"README Table 2 row {row[:2]} vs CSV {(r.setting, method)}"
        for column, cell in zip(header[2:], row[2:]):
            values = tuple(getattr(r, c) for c in columns[column])
            if cell == "—":
                assert all(pd.isna(v) for v in values), f"{r.setting} {method} {column}: README shows no value"
                continue
            _check(cell, values, f"07_table2_layout {r.setting} {method} {column}", problems)
    assert not problems, "\n".join(problems)


def _cell(csv: str, column: str, **where) -> float:
    df = pd.read_csv(RESULTS / csv)
    for k, v in where.items():
        df = df[df[k] == v]
    assert len(df) == 1, f"{csv} {where}: {len(df)} rows"
    return float(df[column].iloc[0])


def _paired(recipe, metric):
    return [("05_paired_vs_fp.csv", c, {"recipe": recipe, "metric": metric}) for c in ("value", "ci_low", "ci_high")]


#: numbers quoted in the README's prose: (the exact text, [(csv, column, row selector[, scale]) per number in it])
PROSE = [
    ("-0.030 [-0.041, -0.017]", _paired("baseline-w8a8", "alignment_caption")),
    ("-0.025 [-0.038, -0.009]", _paired("baseline-w4a8", "alignment_caption")),
    ("CLIP score (-0.019, -0.016", [("05_paired_vs_fp.csv", "value", {"recipe": r, "metric": "clip_score"})
                                    for r in ("baseline-w8a8", "baseline-w4a8")]),
    ("alignment -0.009 [-0.021, 0.006]", _paired("dgq-w8a8", "alignment_caption")),
    ("CLIP\n-0.004 [-0.010, 0.003]", _paired("dgq-w8a8", "clip_score")),
    ("CLIP -0.006 [-0.014, 0.002]", _paired("dgq-w4a8", "clip_score")),
    ("loss is resolved in this run (-0.018 [-0.033, -0.003]", _paired("dgq-w4a8", "alignment_caption")),
    ("(alignment -0.153 vs -0.330)", [("05_paired_vs_fp.csv", "value", {"recipe": r, "metric": "alignment_caption"})
                                      for r in ("dgq-w8a6", "baseline-w8a6")]),
    ("(W4A8: +0.007 [-0.007, 0.021]", [("05_dgq_vs_baseline.csv", c, {"setting": "W4A8", "metric": "alignment_caption"})
                                       for c in ("diff", "ci_low", "ci_high")]),
    ("DGQ closes 71 % of the baseline's CLIP-score gap to FP at W8A6 (paper: 84 %), 81 % at W8A8 (paper: 92 %)\n"
     "  and 63 % at W4A8 (paper: 76 %)",
     [("05_vs_paper.csv", c, {"setting": s, "metric": "clip_score"}, 100)
      for s in ("W8A6", "W8A8", "W4A8") for c in ("ours_gap_closed", "paper_gap_closed")]),
    ("(baseline FID 141, DGQ 68, FP 49)", [("05_results.csv", "value", {"recipe": r, "metric": "fid"})
                                           for r in ("baseline-w8a6", "dgq-w8a6", "fp")]),
    ("(FID 49.3 vs 48.8", [("05_results.csv", "value", {"recipe": r, "metric": "fid"}) for r in ("dgq-w8a8", "fp")]),
    ("Per-tensor activations lose 0.17 alignment, contiguous instead of K-means groups 0.08, shared instead of\n"
     "  per-timestep parameters 0.05 (all CIs exclude zero). Uniform instead of log2 softmax (0.01) and quantizing the "
     "`<start>` column (0.03)",
     [("06_ablations_vs_dgq.csv", "diff", {"recipe": r, "metric": "alignment_caption"}, -1)
      for r in ("dgq-w8a6-per-tensor", "dgq-w8a6-contiguous", "dgq-w8a6-shared-timesteps",
                "dgq-w8a6-uniform-softmax", "dgq-w8a6-no-start-fp")]),
    ("raises PSNR (+0.55 dB", [("06_ablations_vs_dgq.csv", "diff", {"recipe": "dgq-w8a6-uniform-softmax",
                                                                    "metric": "psnr"})]),
    ("(at 2000 prompts: ±0.021, ±0.011, ±0.24 dB", [("05_ci_halfwidths.csv", "median_halfwidth", {"metric": m})
                                                    for m in ("alignment_caption", "clip_score", "psnr")]),
    ("for only 52 % of inputs (the outlier-ratio alternative: 44 %)",
     [("02_axis_rule_accuracy.csv", "picks_better_axis", {"rule": r}, 100)
      for r in ("official_spread", "outlier_ratio")]),
    ("K-means groups cut the error to 0.40x of per-tensor at K = 16 (contiguous 0.58x, sorted 0.64x; an oracle axis\n"
     "  choice would give 0.31x)",
     [("02_error_vs_groups.csv", "gmean_rel_mse", {"method": m, "k": 16, "axis_choice": a})
      for m, a in (("kmeans", "official"), ("contiguous", "official"), ("sorted", "official"), ("kmeans", "oracle"))]),
    ("the official spread rule groups 156 of 160 inputs channel-wise",
     [lambda: (pd.read_csv(RESULTS / "02_axis_decisions_per_layer.csv").official_spread_majority == "channel").sum(),
      lambda: len(pd.read_csv(RESULTS / "02_axis_decisions_per_layer.csv"))]),
    ("(cross-attention 0.096 vs 0.065 with `<start>` FP, self-attention 0.095 vs 0.015",
     [lambda kind=k, q=q, fp=fp: _prob_error(kind, q, fp)
      for k, q, fp in (("cross", "log2", True), ("cross", "uniform", True), ("self", "log2", False),
                       ("self", "uniform", False))]),
    # notebook 07: the calibration-size sweep (DGQ - baseline PSNR) and the components at 4 prompts
    ("W8A8 PSNR is -10.10 dB [-10.46, -9.75] at\n4 calibration prompts, -3.49 at 16, +0.10 [-0.23, +0.44] at 64 and "
     "+0.86 [+0.50, +1.21] at 256",
     [source for n, cols in ((4, ("diff", "ci_low", "ci_high")), (16, ("diff",)),
                             (64, ("diff", "ci_low", "ci_high")), (256, ("diff", "ci_low", "ci_high")))
      for source in [("07_calibration_sizes.csv", c, {"n_calibration": n, "setting": "W8A8", "metric": "psnr",
                                                      "comparison": "dgq - baseline"}) for c in cols]
      + [lambda n=n: _sweep_size(n)]]),
    ("At W8A6 it is\n-1.53, +2.48, +3.37 and +3.37 dB",
     [("07_calibration_sizes.csv", "diff", {"n_calibration": n, "setting": "W8A6", "metric": "psnr",
                                            "comparison": "dgq - baseline"}) for n in (4, 16, 64, 256)]),
    ("W8A8 PSNR to FP falls from 36.9 to 35.7 dB",
     [("07_calibration_sizes.csv", "diff", {"n_calibration": n, "recipe": "baseline-w8a8", "metric": "psnr",
                                            "comparison": "vs fp"}) for n in (4, 256)]),
    ("per-tensor activations 79 %, contiguous instead of K-means groups 49 %, shared timestep sets 33 %, group ranges\n"
     "that include zero 0 %, the baseline's softmax quantizer 1 %",
     [("07_calibration_components.csv", "gap_closed", {"recipe": r, "metric": "psnr"}, 100)
      for r in ("dgq-w8a8-per-tensor", "dgq-w8a8-contiguous", "dgq-w8a8-shared-timesteps", "dgq-w8a8-zero-in-range",
                "dgq-w8a8-baseline-softmax")]),
    ("(W8A6 FID 67.7 vs 76.0, CLIP score 0.682 vs 0.664",
     [("07_table2_layout.csv", c, {"setting": "W8A6", "recipe": r}) for c in ("ours_fid", "ours_clip_score")
      for r in ("dgq-w8a6", "dgq-w8a6-g8")]),
    # notebook 06: AdaRound vs nearest rounding at large N
    ("AdaRound minus nearest is +1.73 dB [1.37, 2.06] PSNR and\n+0.012 [0.009, 0.015] SSIM at W4A8, +0.73 dB "
     "[0.46, 0.98] and +0.010 [0.006, 0.013] at W4A6",
     [("06_weight_rounding.csv", c, {"recipe": r, "reference": "nearest", "metric": m})
      for r in ("dgq-w4a8-adaround", "dgq-w4a6-adaround") for m in ("psnr", "ssim")
      for c in ("diff", "ci_low", "ci_high")]),
]


def _sweep_size(n: int) -> float:
    """``n`` when notebook 07's sweep has that many calibration prompts (a printed size the CSV must hold)."""
    sizes = set(pd.read_csv(RESULTS / "07_calibration_sizes.csv").n_calibration)
    return float(n) if n in sizes else float("nan")


def _prob_error(kind: str, quantizer: str, start_fp: bool) -> float:
    """Notebook 03's mean attention-output error at 6 bits with the per-prompt scale."""
    df = pd.read_csv(RESULTS / "03_prob_quant_error.csv")
    df = df[(df.bits == 6) & (df.scale == "per_prompt") & (df.kind == kind) & (df.quantizer == quantizer)
            & (df.start_fp == start_fp)]
    assert len(df), (kind, quantizer, start_fp)
    return float(df.out_rel_err.mean())


@pytest.mark.parametrize("text,sources", PROSE, ids=[p[0][:40] for p in PROSE])
def test_prose_numbers_match_the_committed_csvs(text, sources):
    readme = _readme()
    assert text in readme, f"the README no longer says {text!r}: update PROSE in this test with the new text"
    # drop the numbers that are part of names (W8A6, K = 16, 2000 prompts): keep those the sources describe
    printed = NUMBER.findall(re.sub(r"W\dA\d|K = \d+|2000 prompts|log2|`<start>`", "", text))
    assert len(printed) == len(sources), f"{text!r}: {printed} vs {len(sources)} sources"
    problems = []
    for p, source in zip(printed, sources):
        if callable(source):
            actual = float(source())
        else:
            csv, column, where, *scale = source
            actual = _cell(csv, column, **where) * (scale[0] if scale else 1)
        if not _matches(p, actual):
            problems.append(f"{text!r}: README {p} vs {source if callable(source) else source[:3]} = {actual:.6g}")
    assert not problems, "\n".join(problems)


def test_the_committed_run_is_declared():
    run = json.loads((RESULTS / "RUN.json").read_text(encoding="utf-8"))
    s = run["settings"]
    heading = next(line for line in _readme().splitlines() if line.startswith("### Results"))
    assert f"{s['n_prompts']} evaluation prompts" in heading and f"{s['n_calibration']} calibration prompts" in heading
    assert run["complete"] and run["command"] and run["machine"]["device_name"]
    n = int(pd.read_csv(RESULTS / "05_dgq_vs_baseline.csv").n.max())
    assert n == s["n_prompts"], f"05_dgq_vs_baseline.csv has n = {n}, RUN.json says {s['n_prompts']} prompts"
