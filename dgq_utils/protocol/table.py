"""Our numbers beside the paper's, laid out like its Table 2: rows = settings, columns = method x metric.

:func:`table2_long` joins the protocol's results tables (MS-COCO: IS / FID / CLIP; PartiPrompts: CLIP) with
:func:`dgq_utils.protocol.paper.paper_table2`, one row per (setting, method, K, metric) with our value, its CI and
the paper's number. :func:`table2_wide` turns that into the paper's layout, each cell ``ours [low, high] · paper
X``; :func:`write_table2` writes both (``table2.csv``, ``table2.md``) atomically.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Sequence

import pandas as pd

from dgq_utils.atomic import atomic_write_text
from dgq_utils.evaluate.results import to_markdown
from dgq_utils.protocol.paper import TableEntry, paper_table2

__all__ = ["TABLE2_METRICS", "table2_long", "table2_wide", "write_table2"]

#: (our metric name, column label, paper column, decimals), in the paper's column order
TABLE2_METRICS = (
    ("isc", "IS", "is", 2),
    ("fid", "FID", "fid", 2),
    ("clip_score", "CLIP", "clip_score", 3),
    ("parti_clip", "Parti CLIP", "parti_clip", 3),
)
LONG_COLUMNS = ["setting", "method", "k", "recipe", "metric", "ours", "ci_low", "ci_high", "n", "paper"]


def _lookup(table: pd.DataFrame | None, recipe: str, metric: str) -> dict:
    if table is None or table.empty:
        return {}
    hit = table[(table["recipe"] == recipe) & (table["metric"] == metric)]
    return hit.iloc[-1].to_dict() if len(hit) else {}


def _paper_value(paper: pd.DataFrame, entry: TableEntry, column: str) -> float:
    sel = (paper["bits"] == entry.setting) & (paper["method"] == entry.method)
    sel &= paper["k"].isna() if entry.k is None else (paper["k"] == entry.k).fillna(False)
    hit = paper.loc[sel, column]
    return float(hit.iloc[0]) if len(hit) and not pd.isna(hit.iloc[0]) else math.nan


def table2_long(model: str, entries: Sequence[TableEntry], coco: pd.DataFrame | None,
                parti: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per entry x metric: our value and CI (from ``coco`` / ``parti``, the tidy results tables of the
    MS-COCO and PartiPrompts runs; PartiPrompts' ``clip_score`` becomes ``parti_clip``) and the paper's number for
    ``model`` (``"sd-v1.4"`` or ``"sdxl-turbo"``; NaN where the paper has none)."""
    paper = paper_table2(model)
    rows = []
    for e in entries:
        for metric, _, paper_col, _ in TABLE2_METRICS:
            ours = _lookup(parti, e.recipe, "clip_score") if metric == "parti_clip" else _lookup(coco, e.recipe, metric)
            rows.append({"setting": e.setting, "method": e.method, "k": e.k, "recipe": e.recipe, "metric": metric,
                         "ours": float(ours.get("value", math.nan)), "ci_low": float(ours.get("ci_low", math.nan)),
                         "ci_high": float(ours.get("ci_high", math.nan)), "n": ours.get("n", None),
                         "paper": _paper_value(paper, e, paper_col)})
    out = pd.DataFrame(rows, columns=LONG_COLUMNS)
    out["k"] = out["k"].astype("Int64")
    out["n"] = pd.array([None if pd.isna(x) else int(x) for x in out["n"]], dtype="Int64")
    return out


def _cell(r, decimals: int) -> str:
    def f(x):
        return "–" if pd.isna(x) else f"{x:.{decimals}f}"

    ours = f(r["ours"])
    if not (pd.isna(r["ci_low"]) or pd.isna(r["ci_high"])):
        ours += f" [{f(r['ci_low'])}, {f(r['ci_high'])}]"
    return f"{ours} · paper {f(r['paper'])}"


def table2_wide(long: pd.DataFrame) -> pd.DataFrame:
    """The paper's layout: one row per setting (``W32A32`` = FP first), one column per method x metric
    (``"DGQ K=16 FID"``), each cell ``ours [low, high] · paper X`` (``–`` where a number is missing). Metrics
    we measured for no entry (e.g. Parti CLIP without ``--partiprompts``) are left out; empty cells are
    settings a method was not run at."""
    decimals = {m: d for m, _, _, d in TABLE2_METRICS}
    labels = {m: lab for m, lab, _, _ in TABLE2_METRICS}
    measured = [m for m, *_ in TABLE2_METRICS if long.loc[long["metric"] == m, "ours"].notna().any()]
    metrics = measured or [m for m, *_ in TABLE2_METRICS]
    methods = list(dict.fromkeys(f"{m} K={k}" if not pd.isna(k) else m for m, k in zip(long["method"], long["k"])))
    settings = list(dict.fromkeys(long["setting"]))
    cells: dict[str, dict[str, str]] = {s: {} for s in settings}
    for _, r in long[long["metric"].isin(metrics)].iterrows():
        method = f"{r['method']} K={r['k']}" if not pd.isna(r["k"]) else r["method"]
        cells[r["setting"]][f"{method} {labels[r['metric']]}"] = _cell(r, decimals[r["metric"]])
    columns = [f"{m} {labels[x]}" for m in methods for x in metrics]
    wide = pd.DataFrame([{c: cells[s].get(c, "") for c in columns} for s in settings], columns=columns)
    wide.insert(0, "setting", settings)
    return wide.loc[:, (wide != "").any(axis=0)]


def write_table2(out_dir: str | os.PathLike, long: pd.DataFrame, *, title: str, notes: Sequence[str] = ()) -> Path:
    """``out_dir/table2.csv`` (the long table) and ``out_dir/table2.md`` (title, the wide table, ``notes``);
    returns the Markdown file's path."""
    out_dir = Path(out_dir)
    buf = io.StringIO()
    long.to_csv(buf, index=False)
    atomic_write_text(out_dir / "table2.csv", buf.getvalue())
    md = [f"# {title}\n", "Ours: value [95% bootstrap CI] · paper: its Table 2.\n", to_markdown(table2_wide(long))]
    if notes:
        md += ["\n"] + [f"* {n}\n" for n in notes]
    path = out_dir / "table2.md"
    atomic_write_text(path, "".join(md))
    return path
