"""The README's four result tables, rendered from the committed CSVs in results/ (after
`python -m dgq_utils.report.publish RUN`): the recipes table (05_results.csv), DGQ minus baseline
(05_dgq_vs_baseline.csv; bold = the CI excludes 0), the ablations (06_ablations_vs_dgq.csv) and the paper's grid
laid out like its Table 2 (07_table2_layout.csv).

    python scripts/readme_tables.py            # print the four tables
    python scripts/readme_tables.py --write    # replace their bodies in README.md (headers and prose stay)

tests/test_readme_numbers.py checks the README's tables and quoted numbers against the same CSVs; the prose
numbers it lists in PROSE are not rewritten here and must be updated by hand.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
README = ROOT / "README.md"

RECIPES = ["fp", "baseline-w8a8", "dgq-w8a8", "baseline-w8a6", "dgq-w8a6", "baseline-w4a8", "dgq-w4a8"]
#: README column order and printed decimals of each table
RESULT_COLUMNS = {"alignment_caption": 4, "clip_score": 4, "fid": 1, "kid": 0, "psnr": 2, "ssim": 4}
PAIRED_COLUMNS = {"alignment_caption": 3, "clip_score": 3, "psnr": 2, "ssim": 4}
ABLATION_COLUMNS = {"alignment_caption": 3, "clip_score": 3, "psnr": 2}
TABLE2_COLUMNS = {"fid": 1, "clip_score": 4, "alignment_caption": 4, "psnr": 2}
#: the header line each table starts with in README.md
HEADERS = {"results": "| recipe | caption alignment", "paired": "| setting | caption alignment",
           "ablations": "| variant | caption alignment", "table2": "| setting | method | paper FID"}


def _num(value: float, decimals: int, signed: bool = False) -> str:
    text = f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"
    return "+0" + text[2:] if text.startswith("-0") and float(text) == 0 else text


def _ci(value: float, low: float, high: float, decimals: int, *, signed: bool = False, bold: bool = False) -> str:
    cell = f"{_num(value, decimals, signed)} [{_num(low, decimals)}, {_num(high, decimals)}]"
    return f"**{cell}**" if bold and (low > 0 or high < 0) else cell


def results_rows() -> list[str]:
    df = pd.read_csv(RESULTS / "05_results.csv").set_index(["recipe", "metric"])
    rows = []
    for recipe in RECIPES:
        cells = []
        for metric, decimals in RESULT_COLUMNS.items():
            if (recipe, metric) not in df.index:
                cells.append("—")
                continue
            r = df.loc[(recipe, metric)]
            cells.append(_ci(r.value, r.ci_low, r.ci_high, decimals))
        rows.append("| " + " | ".join([recipe] + cells) + " |")
    return rows


def paired_rows() -> list[str]:
    df = pd.read_csv(RESULTS / "05_dgq_vs_baseline.csv").set_index(["setting", "metric"])
    rows = []
    for setting in ("W8A8", "W8A6", "W4A8"):
        cells = [_ci(r["diff"], r.ci_low, r.ci_high, d, signed=True, bold=True)
                 for r, d in ((df.loc[(setting, m)], d) for m, d in PAIRED_COLUMNS.items())]
        rows.append("| " + " | ".join([setting] + cells) + " |")
    return rows


def ablation_rows() -> list[str]:
    wide = pd.read_csv(RESULTS / "06_ablations_wide.csv")
    df = pd.read_csv(RESULTS / "06_ablations_vs_dgq.csv").set_index(["recipe", "metric"])
    rows = []
    for recipe, variant in zip(wide.recipe, wide.variant):
        if (recipe, "psnr") not in df.index:
            continue  # FP and the full method itself have no difference to the full method
        label = variant.replace("<start>", "`<start>`")
        cells = [_ci(r["diff"], r.ci_low, r.ci_high, d, signed=True, bold=True)
                 for r, d in ((df.loc[(recipe, m)], d) for m, d in ABLATION_COLUMNS.items())]
        rows.append("| " + " | ".join([label] + cells) + " |")
    return rows


def table2_rows() -> list[str]:
    """Notebook 07's grid laid out like the paper's Table 2 (07_table2_layout.csv): the paper's SD v1.4 FID and
    CLIP score beside ours on the embedded model (FID / CLIP under the embedded evaluators: compare the ordering,
    not the values)."""
    df = pd.read_csv(RESULTS / "07_table2_layout.csv")
    rows = []
    for r in df.itertuples():
        method = r.method if pd.isna(r.k) else f"{r.method} K = {int(r.k)}"
        cells = [r.setting, method, _num(r.paper_fid, 2), _num(r.paper_clip_score, 3)]
        for metric, decimals in TABLE2_COLUMNS.items():
            value = getattr(r, f"ours_{metric}")
            cells.append("—" if pd.isna(value) else _ci(value, getattr(r, f"ours_{metric}_low"),
                                                         getattr(r, f"ours_{metric}_high"), decimals))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def replace_table(text: str, header_start: str, rows: list[str]) -> str:
    """``text`` with the body of the one table whose header starts with ``header_start`` replaced by ``rows``."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(header_start)]
    if len(starts) != 1:
        raise SystemExit(f"README.md: expected one table starting {header_start!r}, found {len(starts)}")
    body = starts[0] + 2
    end = body
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[:body] + rows + lines[end:]) + ("\n" if text.endswith("\n") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="replace the table bodies in README.md")
    args = parser.parse_args()
    tables = {"results": results_rows(), "paired": paired_rows(), "ablations": ablation_rows(),
              "table2": table2_rows()}
    if not args.write:
        for name, rows in tables.items():
            print(HEADERS[name] + " ...")
            print("\n".join(rows), end="\n\n")
        return
    text = README.read_text(encoding="utf-8")
    for name, rows in tables.items():
        text = replace_table(text, HEADERS[name], rows)
    README.write_text(text, encoding="utf-8")
    print(f"README.md: {sum(len(r) for r in tables.values())} table rows rewritten from results/")


if __name__ == "__main__":
    main()
