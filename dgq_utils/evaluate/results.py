"""One tidy results table per run: ``recipe × metric`` rows with a value, a confidence interval and n.

The table lives in two files written side by side, atomically, every time rows are added:

* ``<stem>.csv`` — the machine-readable source of truth (re-read on resume);
* ``<stem>.md``  — the same rows as a Markdown table, plus the wide "report" view
  (recipe × metric, cells ``value [lo, hi]``).

Rows are keyed by ``(recipe, metric)``: adding a row whose key is already there *replaces* it, so a resumed run
that recomputes a recipe never duplicates it, and a run killed between two recipes leaves a valid table holding
every recipe that had finished.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd

from dgq_utils.atomic import atomic_write_text

COLUMNS = ["recipe", "metric", "value", "ci_low", "ci_high", "n"]
OPTIONAL_COLUMNS = ["ci_method", "n_boot", "p_value", "significant", "note"]
KEY = ["recipe", "metric"]


def make_row(recipe: str, metric: str, value: float, ci_low: float = math.nan, ci_high: float = math.nan,
             n: int = 0, **extra) -> dict:
    """One tidy row. ``extra`` may hold any of :data:`OPTIONAL_COLUMNS`."""
    unknown = set(extra) - set(OPTIONAL_COLUMNS)
    if unknown:
        raise ValueError(f"unknown result columns {sorted(unknown)}; optional columns are {OPTIONAL_COLUMNS}")
    return {"recipe": recipe, "metric": metric, "value": float(value), "ci_low": float(ci_low),
            "ci_high": float(ci_high), "n": int(n), **extra}


def row_from_ci(recipe: str, metric: str, ci, note: str = "") -> dict:
    """A row from a :class:`dgq_utils.evaluate.confidence.CI`."""
    extra = {"ci_method": ci.method, "n_boot": ci.n_boot, "note": note}
    if getattr(ci, "p_value", None) is not None:  # a difference: does its CI exclude 0?
        extra["p_value"] = ci.p_value
        extra["significant"] = bool(ci.significant)
    return make_row(recipe, metric, ci.value, ci.low, ci.high, ci.n, **extra)


def tidy(rows: Iterable[Mapping] | pd.DataFrame) -> pd.DataFrame:
    """Rows → a DataFrame with the standard columns first, last-writer-wins on ``(recipe, metric)``."""
    df = pd.DataFrame(list(rows)) if not isinstance(rows, pd.DataFrame) else rows.copy()
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = pd.Series(dtype="float64" if c not in ("recipe", "metric") else "object")
    if len(df):  # last writer wins, but a replaced row keeps the position of the key's first appearance
        first = df.groupby(KEY, sort=False).cumcount() == 0
        order = {k: i for i, k in enumerate(zip(df.loc[first, "recipe"], df.loc[first, "metric"]))}
        df = df.drop_duplicates(KEY, keep="last")
        df = df.iloc[sorted(range(len(df)), key=lambda i: order[(df["recipe"].iat[i], df["metric"].iat[i])])]
    extra = [c for c in OPTIONAL_COLUMNS if c in df.columns] + [
        c for c in df.columns if c not in COLUMNS and c not in OPTIONAL_COLUMNS]
    return df[COLUMNS + extra].reset_index(drop=True)


def _fmt(x, digits: int = 4) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return ""
        return f"{x:.{digits}g}"
    if x is None or (isinstance(x, str) and x == "nan"):
        return ""
    return str(x)


def to_markdown(df: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-flavoured Markdown pipe table (no extra dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        cells = [_fmt(v, digits).replace("|", "\\|").replace("\n", " ") for v in r.tolist()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report_view(df: pd.DataFrame, digits: int = 4, recipe_order: list[str] | None = None,
                metric_order: list[str] | None = None) -> pd.DataFrame:
    """Wide view: one row per recipe, one column per metric, cells ``"value [lo, hi]"``."""
    df = tidy(df)
    if df.empty:
        return pd.DataFrame()

    def cell(r):
        v = _fmt(r["value"], digits)
        if not math.isnan(r["ci_low"]) and not math.isnan(r["ci_high"]):
            v += f" [{_fmt(r['ci_low'], digits)}, {_fmt(r['ci_high'], digits)}]"
        return v

    d = df.assign(cell=df.apply(cell, axis=1))
    wide = d.pivot(index="recipe", columns="metric", values="cell")
    recipes = recipe_order or list(dict.fromkeys(df["recipe"]))
    metrics = metric_order or list(dict.fromkeys(df["metric"]))
    wide = wide.reindex(index=[r for r in recipes if r in wide.index],
                        columns=[m for m in metrics if m in wide.columns])
    wide.columns.name = None
    return wide.fillna("").reset_index()


class ResultsTable:
    """A results table backed by ``<stem>.csv`` + ``<stem>.md``; every change is written atomically.

    >>> t = ResultsTable("runs/x/results")      # doctest: +SKIP
    >>> t.add([make_row("fp", "clip_score", 0.3, 0.29, 0.31, 100)])   # doctest: +SKIP
    """

    def __init__(self, path_stem: str | os.PathLike, title: str = "Results"):
        stem = Path(path_stem)
        if stem.suffix in (".csv", ".md"):
            stem = stem.with_suffix("")
        self.csv_path = stem.with_suffix(".csv")
        self.md_path = stem.with_suffix(".md")
        self.title = title
        self.df = self._read()

    def _read(self) -> pd.DataFrame:
        if self.csv_path.exists():
            try:
                df = pd.read_csv(self.csv_path, keep_default_na=True)
                if set(COLUMNS) <= set(df.columns):
                    return tidy(df)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
                pass
            # Atomic writes make this unreachable in normal use; a hand-edited / foreign file is set aside.
            os.replace(self.csv_path, self.csv_path.with_suffix(".csv.corrupt"))
        return tidy([])

    def recipes(self) -> list[str]:
        return list(dict.fromkeys(self.df["recipe"]))

    def has(self, recipe: str, metric: str | None = None) -> bool:
        m = self.df["recipe"] == recipe
        if metric is not None:
            m &= self.df["metric"] == metric
        return bool(m.any())

    def add(self, rows: Iterable[Mapping] | pd.DataFrame) -> pd.DataFrame:
        """Add (or replace, by ``(recipe, metric)``) rows and rewrite both files atomically."""
        new = tidy(rows)
        if new.empty:
            return self.df
        self.df = tidy(pd.concat([self.df, new], ignore_index=True)) if len(self.df) else new
        self.write()
        return self.df

    def write(self) -> None:
        buf = io.StringIO()
        self.df.to_csv(buf, index=False)
        atomic_write_text(self.csv_path, buf.getvalue())
        md = [f"# {self.title}\n", "## Report (value [95% CI low, high])\n", to_markdown(report_view(self.df)),
              "\n## Tidy rows\n", to_markdown(self.df)]
        atomic_write_text(self.md_path, "\n".join(md))
