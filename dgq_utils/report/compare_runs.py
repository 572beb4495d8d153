"""How a run's main numbers compare with the committed run: printed at the end of ``make report``.

The main numbers are notebook 05's DGQ-minus-baseline paired differences (``05_dgq_vs_baseline.csv``: per
setting and metric, the mean difference on the same prompts and seeds with its 95 % CI). :func:`compare_tables`
puts a run's table beside the committed one (``results/`` of the repository, described by ``results/RUN.json``);
:func:`summary` is the text the chain prints: where the run's outputs went, both runs' settings, and the table::

    python -m dgq_utils.report.compare_runs RUN_FOLDER [--committed RESULTS_DIR]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import pandas as pd

from dgq_utils.report.folders import ROOT
from dgq_utils.report.runs import describe, read_run

__all__ = [
    "MAIN_TABLE",
    "compare_tables",
    "format_diff",
    "summary",
]

#: the table of main numbers (written by notebook 05)
MAIN_TABLE = "05_dgq_vs_baseline.csv"
KEY = ["setting", "metric"]


#: decimals shown per metric (as the README: dB 2, SSIM 4, the rest 3)
DIGITS = {"psnr": 2, "ssim": 4}


def format_diff(diff: float, low: float, high: float, digits: int = 3) -> str:
    """``+0.023 [0.008, 0.038]`` with a ``*`` when the CI excludes 0."""
    if any(isinstance(v, float) and math.isnan(v) for v in (diff, low, high)):
        return "—"
    star = "*" if (low > 0 or high < 0) else ""
    return f"{diff:+.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]{star}"


def compare_tables(run_results: str | os.PathLike, committed_results: str | os.PathLike = ROOT / "results",
                   table: str = MAIN_TABLE) -> pd.DataFrame:
    """``setting, metric, this_run, committed, n_run, n_committed, agree`` for ``table`` in both results folders.

    ``this_run`` / ``committed``: :func:`format_diff` strings; ``agree``: the two CIs overlap (``None`` where one
    side is missing). Raises ``FileNotFoundError`` naming the file when the run has no such table.
    """
    run_path = Path(run_results) / table
    if not run_path.is_file():
        raise FileNotFoundError(f"{run_path}: the run has no {table} (notebook 05 did not run or did not finish)")
    ours = pd.read_csv(run_path)
    committed_path = Path(committed_results) / table
    theirs = pd.read_csv(committed_path) if committed_path.is_file() else pd.DataFrame(columns=ours.columns)
    merged = ours.merge(theirs, on=KEY, how="outer", suffixes=("_run", "_committed"), sort=False)
    # rows in the order the tables list them (W8A8, W8A6, W4A8; the metrics as notebook 05 writes them)
    order = {key: i for i, key in enumerate(dict.fromkeys(
        [tuple(k) for k in ours[KEY].values.tolist()] + [tuple(k) for k in theirs[KEY].values.tolist()]))}
    merged = merged.assign(_order=[order[(a, b)] for a, b in zip(merged.setting, merged.metric)])
    merged = merged.sort_values("_order").drop(columns="_order")
    rows = []
    for r in merged.itertuples(index=False):
        d = r._asdict()
        have_run = not pd.isna(d.get("diff_run"))
        have_committed = not pd.isna(d.get("diff_committed"))
        digits = DIGITS.get(str(d["metric"]), 3)
        agree = None
        if have_run and have_committed:
            agree = bool(d["ci_low_run"] <= d["ci_high_committed"] and d["ci_low_committed"] <= d["ci_high_run"])
        rows.append({
            "setting": d["setting"], "metric": d["metric"],
            "this_run": format_diff(d["diff_run"], d["ci_low_run"], d["ci_high_run"], digits) if have_run else "—",
            "committed": (format_diff(d["diff_committed"], d["ci_low_committed"], d["ci_high_committed"], digits)
                          if have_committed else "—"),
            "n_run": int(d["n_run"]) if have_run else None,
            "n_committed": int(d["n_committed"]) if have_committed else None,
            "agree": agree,
        })
    return pd.DataFrame(rows)


def summary(run_folder: str | os.PathLike, committed_root: str | os.PathLike = ROOT) -> str:
    """The end-of-chain text: where the run wrote, what it and the committed run are, and the main table side by
    side (or why it cannot be shown)."""
    run_folder = Path(run_folder)
    committed_root = Path(committed_root)
    committed_results = committed_root / "results"
    lines = [f"this run wrote into {run_folder}: figures/, results/, notebooks/ (executed + HTML), run.json",
             f"  this run:      {describe(read_run(run_folder))}",
             f"  committed run: {describe(read_run(committed_results))}  ({committed_results})"]
    if run_folder.resolve() == committed_root.resolve():
        lines.append("  this run wrote into the repository's own figures/ and results/ (save_to = the repository).")
        return "\n".join(lines)
    try:
        table = compare_tables(run_folder / "results", committed_results)
    except FileNotFoundError as err:
        lines.append(f"  no comparison: {err}")
        return "\n".join(lines)
    lines.append("DGQ minus baseline (paired, 95 % CI; * = CI excludes 0), this run vs the committed run:")
    shown = table.assign(agree=table.agree.map({True: "yes", False: "NO", None: "—"}))
    shown = shown.rename(columns={"agree": "CIs overlap"})
    lines.append(shown.to_string(index=False))
    record = read_run(run_folder) or {}
    hint = ("" if (record.get("settings") or {}).get("quick") else
            f"; to make this run the committed one: python -m dgq_utils.report.publish {run_folder}")
    lines.append(f"The repository's figures/ and results/ are unchanged{hint}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_folder", help="a run folder (outputs/runs/...)")
    ap.add_argument("--committed", default=str(ROOT), help="the repository root whose results/ are compared with")
    args = ap.parse_args(argv)
    print(summary(args.run_folder, args.committed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
